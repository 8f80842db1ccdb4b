"""A request whose client goes away while it waits to be admitted (its model loading, say) is cancelled then, not
placed after the wait to run for nobody; an awaited call is cancelled with the watch that awaits it."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from controller.api import openai_routes
from controller.api.serving import ClientGone, unless_disconnected


class _GoneRequest:
    """A request whose client disconnects once `leave` is set (its body was read: the next message is that)."""

    def __init__(self):
        self.leave = asyncio.Event()
        counted = []
        self.app = SimpleNamespace(state=SimpleNamespace(controller=SimpleNamespace(
            count_refusal=lambda *a: counted.append(a))))

    async def receive(self):
        await self.leave.wait()
        return {"type": "http.disconnect"}


def test_a_client_gone_while_its_request_waits_for_admission_cancels_it():
    async def run():
        req, reached, cancelled = _GoneRequest(), asyncio.Event(), asyncio.Event()

        async def call():  # (a serving call still in Controller.generate's wait for the model's load)
            reached.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise

        serve = asyncio.ensure_future(openai_routes._serve(req, call(), "m", SimpleNamespace(name="t")))
        await reached.wait()
        req.leave.set()
        resp = await asyncio.wait_for(serve, 5)
        assert resp.status_code == 499
        await asyncio.wait_for(cancelled.wait(), 5)

    asyncio.run(run())


def test_a_cancelled_watch_cancels_what_it_awaits():
    """The non-streamed reply's own watch inside the call's: cancelled from outside, it left the collecting task
    running alone, awaiting a generation already closed."""
    async def run():
        req, inner_cancelled = _GoneRequest(), asyncio.Event()

        async def collect():
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                inner_cancelled.set()
                raise

        outer = asyncio.ensure_future(unless_disconnected(req, collect()))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        outer.cancel()
        try:
            await outer
        except (asyncio.CancelledError, ClientGone):
            pass
        await asyncio.wait_for(inner_cancelled.wait(), 5)

    asyncio.run(run())


def test_an_ollama_request_whose_client_left_during_admission_is_cancelled(monkeypatch):
    """/api/chat and /api/generate: the same, for the ollama CLI's Ctrl-C while its model loads."""
    from controller.api import ollama

    async def run():
        cancelled = asyncio.Event()

        async def waiting_run(request, body, chat):
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise

        monkeypatch.setattr(ollama, "_run", waiting_run)
        for route, body in ((ollama.chat, b'{"model": "m", "messages": []}'), (ollama.generate, b'{"model": "m"}')):
            cancelled.clear()
            req = _GoneRequest()

            async def read_body(b=body):
                return b

            req.body = read_body
            serve = asyncio.ensure_future(route(req))
            req.leave.set()  # (gone before or after the run started: either way it is cancelled)
            assert (await asyncio.wait_for(serve, 5)).status_code == 499
            await asyncio.wait_for(cancelled.wait(), 5)

    asyncio.run(run())
