"""A dashboard's event stream lives as long as its session: signing out (or the session's expiry) ends the open
streams that the session's cookie opened, not only the next request. Streams opened with a token are not
touched. (The stream as EventStream serves it, over an ASGI server's send and receive, without a server.)"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from controller.dashboard import session
from controller.dashboard.stream import EventStream, Hub
from controller.events import EventBus


class Client:
    """An ASGI server's side of one GET /admin/events: the request's scope (its headers), a send that records
    what it is handed, and a receive that says the client is gone once the response's body ended (as uvicorn's
    does) or once `gone` is set."""

    def __init__(self, app, headers: dict[str, str]):
        self.scope = {"type": "http", "app": app,
                      "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
        self.bodies: list[dict] = []
        self.ended = asyncio.Event()
        self.gone = asyncio.Event()

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.body":
            self.bodies.append(message)
            if not message.get("more_body", False):
                self.ended.set()

    async def receive(self) -> dict:
        done = [asyncio.ensure_future(e.wait()) for e in (self.ended, self.gone)]
        try:
            await asyncio.wait(done, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in done:
                t.cancel()
        return {"type": "http.disconnect"}

    def serve(self, hub: Hub) -> asyncio.Future:
        return asyncio.ensure_future(EventStream(hub, None, True)(self.scope, self.receive, self.send))


def test_signing_out_ends_the_sessions_open_streams_only():
    async def main():
        app = SimpleNamespace(state=SimpleNamespace())
        sessions = session.sessions(app)
        mine, other = sessions.new(), sessions.new()
        bus = EventBus()
        hub = Hub(bus, build=lambda: b"event: pool\ndata: {}\n\n", beat_s=0.02, heartbeat_s=5)
        cookie = lambda sid: {"cookie": f"{session.COOKIE}={sid}"}  # noqa: E731
        tabs = [Client(app, cookie(mine)), Client(app, cookie(mine))]
        others = [Client(app, cookie(other)),  # another operator's session
                  Client(app, {"authorization": "Bearer a-token", **cookie(mine)})]  # a token's, beside the cookie
        served = [c.serve(hub) for c in tabs + others]
        await asyncio.sleep(0.1)
        assert len(hub.conns) == 4 and bus.watchers == 4
        assert all(any(b["body"].startswith(b"event: pool") for b in c.bodies) for c in tabs + others)

        sessions.drop(mine)  # signed out (in a third tab)
        await asyncio.wait_for(asyncio.gather(*served[:2]), 2)  # both tabs' responses returned ...
        assert all(c.ended.is_set() and c.bodies[-1] == {"type": "http.response.body", "body": b"",
                                                         "more_body": False} for c in tabs)  # ... their bodies ended
        assert len(hub.conns) == 2 and bus.watchers == 2  # each let go once
        before = [len(c.bodies) for c in others]
        await asyncio.sleep(0.1)
        assert not any(c.ended.is_set() for c in others)
        assert all(len(c.bodies) > n for c, n in zip(others, before)), "the other streams go on being written"

        sessions._s[other] = 0.0  # that session expires: its stream ends as a signed-out one does
        await asyncio.wait_for(served[2], 2)
        assert others[0].ended.is_set() and len(hub.conns) == 1  # the token's stream goes on
        others[1].gone.set()
        await asyncio.wait_for(served[3], 2)
        assert not hub.conns and bus.watchers == 0 and hub._task is None

    asyncio.run(main())
