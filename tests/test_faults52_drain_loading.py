"""A drain (SIGTERM, a first Ctrl-C) while requests wait for their model's load: they are in flight too. They get
the grace period (the load may finish in it), and at its end an answer -- a 503 in OpenAI's error JSON, a stream's
error event and [DONE] -- where the drain counted none of them, stopped at once, and uvicorn cancelled them 5 s later:
a plain-text "Internal Server Error" 500 and a traceback in the log. An operator's cancel of such a request answers
at once, where it waited for the load to end."""

from __future__ import annotations

import asyncio
import time

import httpx
import uvicorn

from controller.app import build_app
from controller.config import ModelSpec, ServerConfig
from controller.pool import EngineHandle, Replica
from controller.shutdown import GracefulServer


class _Conn:
    def is_closing(self) -> bool:
        return False


def _loading_server():
    """A server whose one engine is loading model "slow" (a load that never ends here)."""
    app = build_app(ServerConfig(models=[ModelSpec(name="slow", path=None, engine={"kind": "pace"}, memory_gb=1)]))
    return app, app.state.controller  # (no lifespan: no workers start)


async def _waiting(app, ctl, body: dict) -> tuple[asyncio.Task, httpx.AsyncClient]:
    """A request for "slow" (`body`), admitted and waiting for its load: the task of its answer, and its client."""
    for spec in ctl.cfg.models:
        await ctl.add_model(spec)
    e = EngineHandle("w0", None, "cpu", "node1", 1234, 20 * 10**9, _Conn())
    e.replicas = {"slow": Replica("slow", state="loading")}
    ctl.pool.engines["w0"] = e
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    task = asyncio.ensure_future(client.post("/v1/completions", json={"model": "slow", "prompt": "hi", **body}))
    while not ctl.activity.live:  # admitted: now waiting for the load
        await asyncio.sleep(0.01)
    return task, client


def test_a_drain_gives_requests_waiting_for_a_load_the_grace_then_a_503():
    async def main():
        app, ctl = _loading_server()
        task, client = await _waiting(app, ctl, {"max_tokens": 3})
        server = GracefulServer(uvicorn.Config(app), app.state.serving, grace_s=0.3, url="http://t")
        t0 = time.monotonic()
        await server.drain()
        took = time.monotonic() - t0
        r = await asyncio.wait_for(task, 2)
        await client.aclose()
        return took, r

    took, r = asyncio.run(main())
    assert took >= 0.3, f"the drain did not wait for the request waiting for its load ({took:.2f} s)"
    assert r.status_code == 503, r.text
    assert "shutting down" in r.json()["error"]["message"], r.text


def test_a_stream_waiting_for_a_load_ends_with_an_error_event_at_the_drains_end():
    async def main():
        app, ctl = _loading_server()
        task, client = await _waiting(app, ctl, {"max_tokens": 3, "stream": True})
        server = GracefulServer(uvicorn.Config(app), app.state.serving, grace_s=0.1, url="http://t")
        await server.drain()
        r = await asyncio.wait_for(task, 2)
        await client.aclose()
        return r

    r = asyncio.run(main())
    assert r.status_code == 200, r.text
    assert "shutting down" in r.text and r.text.rstrip().endswith("data: [DONE]"), r.text


def test_an_operators_cancel_of_a_request_waiting_for_a_load_answers_at_once():
    async def main():
        app, ctl = _loading_server()
        task, client = await _waiting(app, ctl, {"max_tokens": 3})
        (rid,) = ctl.activity.live
        assert ctl.cancel(rid) is not None
        r = await asyncio.wait_for(task, 2)  # (the load never ends: it waited for ever, LOAD_TIMEOUT_S)
        await client.aclose()
        return r

    r = asyncio.run(main())
    assert r.status_code == 503 and "cancelled" in r.json()["error"]["message"], r.text
