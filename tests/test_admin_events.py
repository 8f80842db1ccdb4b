"""The admin event stream: server-sent events from the EventBus, reconnectable with Last-Event-ID.

The hub is tested directly through connections that collect what they are sent (frames, coalescing,
keep-alives, reconnect, a reader that stopped reading, no leaked subscription), its ASGI response with a fake
server, then the route over real HTTP against a live `tokenpool serve` (pace models, no weights): an event
published by an admin action arrives, and a client that reconnects with Last-Event-ID gets what it missed.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from controller.dashboard.stream import PING, RETRY, EventStream, Hub, snapshot_frame
from controller.events import EventBus
from controller.keys import hash_key
from load_tests.live_server import LiveServer
from tests.conftest import Listener

ADMIN = "admin-events-token"
H = {"Authorization": f"Bearer {ADMIN}"}


def parse(chunk: bytes) -> list[dict]:
    """The events in SSE bytes: [{'id': int, 'data': {...}}] (comments and retry lines skipped)."""
    out = []
    for block in chunk.decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n") if line and not line.startswith(":")
                      and ": " in line)
        if "data" in fields:
            out.append({"id": int(fields["id"]), "data": json.loads(fields["data"])})
    return out


def test_stream_delivers_coalesces_pings_and_resumes():
    async def main():
        bus = EventBus()
        bus.publish("register", model="a")  # before the client: not sent to a fresh client
        hub = Hub(bus, beat_s=0.05, heartbeat_s=0.2)
        s = Listener(hub)
        assert await s.next() == RETRY
        assert bus.subscribers == 1
        for i in range(300):  # a burst: a few writes, not 300
            bus.publish("switch", engine="w0", model=f"m{i % 3}")
        got, writes = [], 0
        while len(got) < 300:
            got += parse(await s.next())
            writes += 1
        assert [g["id"] for g in got] == list(range(2, 302)) and writes <= 3
        assert hub.frames.encoded == 300
        assert got[0]["data"] == {"seq": 2, "t": got[0]["data"]["t"], "kind": "switch", "engine": "w0", "model": "m0"}
        assert await s.next() == PING  # nothing for heartbeat_s: a comment keeps it open
        s.close()
        assert bus.subscribers == 0  # the subscription ended with the connection

        # reconnect after event 150: the rest of the burst, then live events
        bus.publish("drain", engine="w0")
        hub.heartbeat_s = 5
        r = Listener(hub, 150)
        first = await r.next()
        assert first.startswith(RETRY)
        assert [e["id"] for e in parse(first)] == list(range(151, 303))
        bus.publish("resume", engine="w0")
        (ev,) = parse(await r.next())
        assert (ev["id"], ev["data"]["kind"]) == (303, "resume")
        r.close()
        # a Last-Event-ID from before a restart (beyond this bus's last seq): the whole ring
        z = Listener(hub, 10_000)
        assert [e["id"] for e in parse(await z.next())] == list(range(1, 304))
        z.close()
        assert bus.subscribers == 0

    asyncio.run(main())


def test_a_client_that_never_reads_does_not_hold_the_publisher():
    async def main():
        bus = EventBus()
        hub = Hub(bus)
        streams = [Listener(hub) for _ in range(50)]
        for s in streams:
            await s.next()  # connected, then never read again
            s.gate = asyncio.get_running_loop().create_future()
        t0 = time.perf_counter()
        for i in range(20_000):
            bus.publish("switch", engine="w0", model="a", i=i)
        per_event = (time.perf_counter() - t0) / 20_000
        assert per_event < 500e-6, per_event  # bounded queues: publishing never waits for a reader
        for s in streams:
            s.close()
        assert bus.subscribers == 0

    asyncio.run(main())


def test_a_reader_that_stopped_reading_holds_no_one_and_catches_up():
    async def main():
        bus = EventBus()
        hub = Hub(bus, beat_s=0.02, heartbeat_s=5)
        slow, fast = Listener(hub), Listener(hub)
        for c in (slow, fast):
            await c.next()
        slow.gate = asyncio.get_running_loop().create_future()  # its socket's buffer is full from now on
        bus.publish("drain", engine="w0")  # not routine: written at the next beat
        assert [e["id"] for e in parse(await fast.next())] == [1]
        assert slow.conn.blocked is not None  # its write waits in a task of its own...
        bus.publish("resume", engine="w0")
        assert [e["id"] for e in parse(await fast.next())] == [2]  # ...and the hub writes on to the others
        slow.gate.set_result(None)  # it reads again: the write that waited, then what it missed, at once
        ids = [e["id"] for e in parse(await slow.next()) + parse(await slow.next(timeout=0.5))]
        assert ids == [1, 2] and slow.conn.blocked is None
        # a connection that goes while its write waits: that write ends with it
        slow.gate = asyncio.get_running_loop().create_future()
        bus.publish("pin", model="a")
        await fast.next()
        waiting = slow.conn.blocked
        assert waiting is not None
        slow.close()
        await asyncio.sleep(0)
        assert waiting.cancelled() and hub.conns == {fast.conn}
        fast.close()
        assert not hub.conns and hub._task is None and bus.subscribers == 0

    asyncio.run(main())


def test_snapshots_are_built_once_a_tick_for_every_connection():
    async def main():
        bus = EventBus()
        builds = []

        def build() -> bytes:
            builds.append(time.monotonic())
            return snapshot_frame("pool", json.dumps({"n": len(builds)}))

        cpu: list[float] = []
        hub = Hub(bus, build, beat_s=0.05, tick_beats=2, heartbeat_s=5, on_cpu=cpu.append)
        conns = [Listener(hub, None, snapshots=True) for _ in range(20)]
        for c in conns:
            assert b"event: pool" in await c.next()  # the gauges at once (built by the first connection)
        assert len(builds) == 1
        got = [[] for _ in conns]
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.55:
            for i, c in enumerate(conns):
                chunk = await c.next()
                got[i] += [json.loads(b.split(b"data: ", 1)[1]) for b in chunk.split(b"\n\n")
                           if b.startswith(b"event: pool")]
        assert 4 <= len(builds) <= 8  # one build a tick for all 20 connections, not one each
        assert len(cpu) >= 2 * len(builds) - 3 and sum(cpu) > 0  # each beat's CPU told
        for g in got:
            ns = [x["n"] for x in g]
            assert ns == sorted(set(ns)) and len(ns) >= 3  # each tick's snapshot once, in order
        bus.publish("load", model="a")  # events still come between snapshots
        chunk = await conns[0].next()
        while b'"kind": "load"' not in chunk:
            chunk = await conns[0].next()
        for c in conns:
            c.close()
        assert not hub.conns and hub._task is None  # nobody listens: no more builds
        n = len(builds)
        await asyncio.sleep(0.3)
        assert len(builds) == n

    asyncio.run(main())


class FakeServer:
    """What an ASGI server gives EventStream: a send that suspends once on every message (as a server's send
    may: Hub._write then finishes it in a task), or raises from `fail_after` messages on; a receive that
    answers the request, then the disconnect once `gone` is set."""

    def __init__(self, fail_after: int | None = None):
        self.sent: asyncio.Queue[dict] = asyncio.Queue()
        self.gone = asyncio.Event()
        self.fail_after, self.sends = fail_after, 0
        self._request = [{"type": "http.request", "body": b"", "more_body": False}]

    async def send(self, message: dict) -> None:
        await asyncio.sleep(0)
        if self.sends == self.fail_after:
            raise RuntimeError("the send broke")
        self.sends += 1
        self.sent.put_nowait(message)

    async def receive(self) -> dict:
        if self._request:
            return self._request.pop()
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def next(self) -> dict:
        return await asyncio.wait_for(self.sent.get(), 2)

    def serve(self, response: EventStream) -> asyncio.Future:
        return asyncio.ensure_future(response({"type": "http"}, self.receive, self.send))


def test_the_asgi_response_writes_the_stream_and_closes_on_disconnect():
    async def main():
        bus = EventBus()
        bus.publish("register", model="a")
        hub = Hub(bus, beat_s=0.02, heartbeat_s=5)
        srv = FakeServer()
        served = srv.serve(EventStream(hub, 0, False, headers={"Cache-Control": "no-cache"}))
        start = await srv.next()
        assert start["status"] == 200
        assert dict(start["headers"])[b"content-type"] == b"text/event-stream; charset=utf-8"
        assert dict(start["headers"])[b"cache-control"] == b"no-cache"
        first = await srv.next()
        assert first["more_body"] and first["body"].startswith(RETRY)
        assert [e["id"] for e in parse(first["body"])] == [1]  # since=0: the ring
        bus.publish("drain", engine="w0")
        assert [e["id"] for e in parse((await srv.next())["body"])] == [2]
        assert len(hub.conns) == 1
        srv.gone.set()  # the client goes: the response returns and the hub lets the connection go
        await asyncio.wait_for(served, 2)
        assert not hub.conns and hub._task is None and bus.subscribers == 0

    asyncio.run(main())


def test_a_connection_whose_send_fails_ends_and_the_others_go_on(caplog):
    async def main():
        bus = EventBus()
        hub = Hub(bus, beat_s=0.02, heartbeat_s=5)
        broken, good = FakeServer(fail_after=2), FakeServer()  # broken: the start and the first write, no more
        served = [broken.serve(EventStream(hub, None, False)), good.serve(EventStream(hub, None, False))]
        for srv in (broken, good):
            await srv.next()
            await srv.next()
        bus.publish("drain", engine="w0")
        assert [e["id"] for e in parse((await good.next())["body"])] == [1]
        with pytest.raises(asyncio.CancelledError):  # (uvicorn then logs it and closes the socket)
            await asyncio.wait_for(served[0], 2)
        assert len(hub.conns) == 1 and bus.subscribers == 1
        bus.publish("resume", engine="w0")
        assert [e["id"] for e in parse((await good.next())["body"])] == [2]
        good.gone.set()
        await asyncio.wait_for(served[1], 2)
        assert not hub.conns

    asyncio.run(main())
    assert "writing to an event stream failed" in caplog.text



@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = {"admin_token_hash": hash_key(ADMIN),
           "workers": {"local": "cpu", "standby": False},
           "tenants_file": str(tmp_path_factory.mktemp("tenants") / "tenants.yaml"),
           "models": [{"name": "pace-a", "path": None, "engine": {"kind": "pace", "pace_s_per_token": 0.01}}]}
    with LiveServer(cfg, tmp_path_factory.mktemp("srv")) as srv:
        yield srv


TENANT_KINDS = ("tenant_created", "tenant_revoked")


def read_events(r: httpx.Response, n: int, timeout: float = 10) -> list[dict]:
    """The next n tenant events on the stream (the pool's own events, e.g. a worker's loads, skipped)."""
    got: list[dict] = []
    deadline = time.monotonic() + timeout
    buf = b""
    for chunk in r.iter_raw():
        buf += chunk
        while b"\n\n" in buf:
            block, buf = buf.split(b"\n\n", 1)
            got += [e for e in parse(block + b"\n\n") if e["data"]["kind"] in TENANT_KINDS]
        if len(got) >= n or time.monotonic() > deadline:
            break
    return got


def test_events_over_http_survive_a_reconnect(server):
    url = server.url + "/admin/events"
    for bad in ({}, {"Authorization": "Bearer not-the-token"}):
        denied = httpx.get(url, headers=bad, timeout=5)
        assert denied.status_code == 401 and denied.headers["content-type"] == "application/json"
        assert denied.json()["error"]["code"] == "invalid_admin_token"  # OpenAI's error shape, not a stream
    with httpx.stream("GET", url, headers=H, timeout=10) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
        httpx.post(server.url + "/admin/tenants", headers=H, json={"name": "t1"}).raise_for_status()
        (ev,) = read_events(r, 1)
    assert ev["data"]["kind"] == "tenant_created" and ev["data"]["tenant"] == "t1"
    # while no client listens, two more things happen
    httpx.post(server.url + "/admin/tenants", headers=H, json={"name": "t2"}).raise_for_status()
    httpx.delete(server.url + "/admin/tenants/t1", headers=H).raise_for_status()
    with httpx.stream("GET", url, headers={**H, "Last-Event-ID": str(ev["id"])}, timeout=10) as r:
        missed = read_events(r, 2)
    assert [(e["data"]["kind"], e["data"]["tenant"]) for e in missed] == [("tenant_created", "t2"),
                                                                          ("tenant_revoked", "t1")]
    assert [e["id"] for e in missed] == sorted(e["id"] for e in missed) and missed[0]["id"] > ev["id"]
    # the connections are gone: so are their subscriptions
    deadline = time.monotonic() + 10
    while httpx.get(server.url + "/admin/pool", headers=H).json()["event_subscribers"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(server.url + "/admin/pool", headers=H).json()["event_subscribers"] == 0


def test_the_dashboards_stream_carries_pool_and_requests_snapshots(server):
    with httpx.stream("GET", server.url + "/admin/events?snapshots=true", headers=H, timeout=10) as r:
        buf = b""
        for chunk in r.iter_raw():
            buf += chunk
            if buf.count(b"event: requests") >= 2:  # the one at once, then a tick's
                break
        # what the writer's beats cost is counted where it is spent (the dashboards' CPU, for the suite)
        metrics = httpx.get(server.url + "/metrics", headers=H).text.splitlines()
        (line,) = [x for x in metrics if x.startswith("tokenpool_event_stream_cpu_seconds_total ")]
        assert float(line.split()[1]) > 0
    frames = {b.split(b"\n", 1)[0]: json.loads(b.split(b"data: ", 1)[1]) for b in buf.split(b"\n\n")
              if b.startswith(b"event: ")}
    pool, reqs = frames[b"event: pool"], frames[b"event: requests"]
    assert [m["name"] for m in pool["models"]] == ["pace-a"] and pool["engines"][0]["id"] == "w0"
    assert reqs == []
