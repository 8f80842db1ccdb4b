"""The admin event stream as server-sent events: `id: SEQ` frames from the EventBus, reconnectable.

A client that reconnects with Last-Event-ID (browsers' EventSource does it by itself) gets the events it
missed that the bus's ring still holds. A dashboard's connection asks for snapshots too (`event: pool`,
`event: requests`): its gauges, once a second, without polling.

One `Hub` task writes to every connection, on a fixed grid of beats (BEAT_S). About once a second (the tick, 0.9 s)
it joins the events published since its last write into one frame, each event JSON-encoded once, and, while a
connection wants them, builds the snapshot once and appends it; then it hands those bytes (the same object for
all) to each connection's ASGI `send` in turn. Events that come with the traffic (ROUTINE: an admission per
request, a model switch per step under contention) ride the tick, at most 0.9 s after they happen; any other (an
operator's action, a worker joining or dying) makes the next beat write at once, within BEAT_S. Under load a
dashboard therefore costs one write a second, however many events and dashboards there are: no task of its own
wakes for it (its response, `EventStream`, only waits for the client to go), nor a generator, nor a
StreamingResponse; the hub's other work per beat depends on the events, not on the connections, and the
publisher never waits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from controller.dashboard import session
from controller.events import EventBus

log = logging.getLogger("tokenpool.dashboard")
# A tick of 0.9 s, not 1 s: a routine event waits at most one tick for its write, and the issue's "<= 1 s from
# event to screen" needs room for the write, the network and the browser's next frame after it.
BEAT_S = 0.45  # a non-routine event waits at most this long for a write
TICK_BEATS = 2  # a snapshot, and the routine events, every 2 beats (0.9 s)
ROUTINE = frozenset({"admit", "reject", "switch", "prefetch", "load", "evict"})  # their rate follows the traffic
HEARTBEAT_S = 15.0
RETRY = b"retry: 1000\n\n"  # EventSource reconnects after 1 s
PING = b": keep-alive\n\n"


class Frames:
    """Encoded SSE frames by event seq (bounded LRU): an event a reconnecting client catches up on is not
    encoded again."""

    def __init__(self, cap: int = 4096):
        self.cap = cap
        self._f: OrderedDict[int, bytes] = OrderedDict()
        self.encoded = 0

    def __call__(self, ev: dict[str, Any]) -> bytes:
        seq = ev["seq"]
        f = self._f.get(seq)
        if f is None:
            f = self._f[seq] = b"id: %d\ndata: %s\n\n" % (seq, json.dumps(ev, default=str).encode())
            self.encoded += 1
            if len(self._f) > self.cap:
                self._f.popitem(last=False)
        return f


def after(bus: EventBus, seq: int, upto: int | None = None) -> list[dict[str, Any]]:
    """The ring's events newer than seq (and not newer than upto), oldest first (reads back from the newest:
    O(new events))."""
    out = []
    for e in reversed(bus.recent):
        if e["seq"] <= seq:
            break
        if upto is None or e["seq"] <= upto:
            out.append(e)
    out.reverse()
    return out


def last_seq(bus: EventBus) -> int:
    return bus.recent[-1]["seq"] if bus.recent else 0


# A signed-out stream's end tells EventSource not to reconnect on its own (a day): the reconnect would be a 401. The
# dashboard closes the stream in its error handler, but Chromium begins its own reconnect `retry` (1 s) after the body
# ends whether or not that handler has run; on a loaded host it ran later, and its close aborted the reconnect (a
# failed request in the browser's log: test_signed_out_elsewhere_goes_to_the_login_once failed so in CI, 2 runs of 4).
# A server stopping keeps the 1 s: a plain EventSource client comes back once it is up again.
NO_RETRY = b"retry: 86400000\n"


def end_frame(why: str) -> bytes:
    """The last frame of a stream the server ends (no id: it does not move a client's Last-Event-ID)."""
    return (NO_RETRY if why == "signed out" else b"") + snapshot_frame("end", json.dumps({"reason": why}))


def snapshot_frame(event: str, body: bytes | str) -> bytes:
    """An SSE frame with an event type and no id (so it does not move a client's Last-Event-ID)."""
    return b"event: %s\ndata: %s\n\n" % (event.encode(), body.encode() if isinstance(body, str) else body)


@dataclass(eq=False, slots=True)
class Conn:
    """One open event stream: its ASGI send, and how far it has been written."""
    send: Send
    snapshots: bool  # a dashboard's: it gets the snapshots too
    sent: int  # the last event seq handed to `send`
    seen: int  # the last snapshot number handed to it
    task: asyncio.Task = field(default_factory=asyncio.current_task)  # its response's: waits for the client
    blocked: asyncio.Task | None = None  # the rest of a write that waits for room in the socket's buffer
    ends: Callable[[], str | None] | None = None  # why it ends now (`stream_ends`); None while it goes on


class Hub:
    """What every connection is sent, built once a beat and written by this hub (see the module's docstring).

    After a beat: `events` holds the frames of the events after `start` up to `seq`, and `full` is `events`
    followed by snapshot number `in_full` (0: none, when the beat built none). A connection that had been sent
    up to `start` gets one of them as it is; one that fell behind (a write that waited for a slow reader) catches
    up from the ring.
    """

    def __init__(self, bus: EventBus, build: Callable[[], bytes] | None = None, beat_s: float = BEAT_S,
                 tick_beats: int = TICK_BEATS, heartbeat_s: float = HEARTBEAT_S,
                 on_cpu: Callable[[float], None] = lambda s: None):
        self.bus, self.build = bus, build
        self.on_cpu = on_cpu  # told each beat's CPU time (the dashboards' cost, measured where it is spent)
        self.beat_s, self.tick_beats, self.heartbeat_s = beat_s, tick_beats, heartbeat_s
        self.frames = Frames()
        self.start = self.seq = 0
        self.events = self.full = self.snapshot = b""
        self.snapshots = 0  # how many snapshots were built (a connection compares it with what it was sent)
        self.in_full = 0
        self.builds_wanted = 0  # connections that asked for snapshots
        self.conns: set[Conn] = set()
        self._task: asyncio.Task | None = None

    def open(self, send: Send, since: int | None, snapshots: bool = False,
             ends: Callable[[], str | None] | None = None) -> Conn:
        """A new connection (its response has started): the events after `since` (None: from now on), with
        `snapshots` the current snapshot, written at once; then what each beat has. With `ends`
        (`stream_ends`), the connection ends at the first beat that it gives a reason (its dashboard session signed
        out or expired, the server stopping): an `event: end` frame says which, then the body ends."""
        bus = self.bus
        sent = last_seq(bus) if since is None else since
        if sent > last_seq(bus):  # a seq from before the server restarted: all the new server has
            sent = 0
        bus.watchers += 1
        self.builds_wanted += snapshots
        if self._task is None:  # (re)starting: the beats begin from now, not from where they stopped
            self.start = self.seq = last_seq(bus)
            self.events = self.full = b""
            self._task = asyncio.ensure_future(self._run())
        if snapshots and not self.snapshot:
            self._build()  # the first dashboard gets its gauges at once, not at the next tick (later ones
            # get the current one, at most a tick old)
        backlog = after(bus, sent)
        c = Conn(send, snapshots, backlog[-1]["seq"] if backlog else sent, self.snapshots, ends=ends)
        self.conns.add(c)
        self._write(c, b"".join([RETRY, *(self.frames(e) for e in backlog), self.snapshot if snapshots else b""]))
        return c

    def close(self, c: Conn) -> None:
        if c not in self.conns:  # (ended by the hub, then closed by its response)
            return
        self.conns.discard(c)
        if c.blocked is not None:
            c.blocked.cancel()
        self.bus.watchers -= 1
        self.builds_wanted -= c.snapshots
        if not self.builds_wanted:
            self.snapshot = b""  # not kept current without a reader: the next dashboard builds a fresh one
        if not self.conns and self._task is not None:
            self._task.cancel()
            self._task = None

    def _build(self) -> bool:
        try:
            self.snapshot = self.build()  # type: ignore[misc]
        except Exception:  # noqa: BLE001 - a view bug must not end the streams; the next tick tries again
            log.exception("building the dashboard snapshot failed")
            return False
        self.snapshots += 1
        return True

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        t, beat, quiet = loop.time(), 0, 0.0
        while True:
            t += self.beat_s  # a fixed grid: a routine event waits at most one tick, not a tick plus drift
            await asyncio.sleep(max(0.0, t - loop.time()))
            beat += 1
            cpu = time.thread_time()  # (the socket writes' system time included)
            try:
                quiet = self._beat(beat % self.tick_beats == 0, quiet)
            except Exception:  # noqa: BLE001 - every open stream hangs on this task: it must go on
                log.exception("the event stream's beat failed")
            self.on_cpu(time.thread_time() - cpu)

    def end_due(self) -> list[asyncio.Future]:
        """End each connection whose `ends` gives a reason now; returns the writes of their end frames. Each beat
        does it first, and a sign-out at once (its session's streams then end before its answer, not a beat or a
        stalled loop's wait after it: the page's fallback, which starts at that answer, aborted a stream on a
        loaded host)."""
        return [self._end(c, why) for c, why in [(c, c.ends()) for c in self.conns if c.ends is not None]
                if why is not None]

    def _beat(self, tick: bool, quiet: float) -> float:
        """Write what this beat has to every connection; returns how long nothing was written."""
        self.end_due()
        new = after(self.bus, self.seq)
        if not tick and all(e["kind"] in ROUTINE for e in new):
            new = []  # left in the ring for the tick
        built = tick and self.builds_wanted > 0 and self._build()
        events = b"".join([self.frames(e) for e in new])
        if not events and not built:
            if quiet + self.beat_s < self.heartbeat_s:
                return quiet + self.beat_s
            events = PING
        self.start, self.seq = self.seq, new[-1]["seq"] if new else self.seq
        self.events = events
        self.full, self.in_full = (events + self.snapshot, self.snapshots) if built else (events, 0)
        for c in self.conns:
            if c.blocked is None:  # (one whose last write still waits catches up once it is done)
                self._send(c)
        return 0.0

    def _send(self, c: Conn) -> None:
        out = self._out(c)
        c.sent, c.seen = max(c.sent, self.seq), self.snapshots
        if out:
            self._write(c, out)

    def _out(self, c: Conn) -> bytes:
        """What connection `c` is sent at this beat."""
        fresh = c.snapshots and c.seen != self.snapshots
        if c.sent == self.start:  # the usual case: the beat's bytes as they are, shared by every connection
            if not fresh:
                return self.events
            # (a snapshot built since the beat, for a new dashboard, is not in `full`)
            return self.full if self.in_full == self.snapshots else self.events + self.snapshot
        # behind by more than a beat: what it missed, from the ring (frames still encoded once)
        return b"".join([*(self.frames(e) for e in after(self.bus, c.sent, self.seq)),
                         self.snapshot if fresh else b""])

    def _write(self, c: Conn, data: bytes) -> None:
        """Hand `data` to the connection's send without waiting for it. The send's coroutine is started here,
        in the hub's task, as an eager task would start it (asyncio's eager_start, Python 3.12+): uvicorn's send
        writes to the socket and returns without suspending unless the socket's buffer is full (a reader that
        stopped reading). Only then does the rest of it get a task, and the connection is skipped until it ends."""
        step = c.send({"type": "http.response.body", "body": data, "more_body": True})
        try:
            waiting = step.send(None)
        except StopIteration:
            return
        except Exception:  # noqa: BLE001 - one connection's failure must not stop the others' writes
            self._failed(c)
            return
        c.blocked = asyncio.ensure_future(self._resume(c, step, waiting))

    async def _resume(self, c: Conn, step: Coroutine, waiting: Any) -> None:
        """Run the rest of a send that `_write` started and that suspended on `waiting` (a future, or None for a
        bare yield), as its task would have; then what the connection missed meanwhile."""
        try:
            while True:
                if waiting is None:
                    await asyncio.sleep(0)
                else:
                    await asyncio.wait((waiting,))  # (what it ended with, the send's own code reads)
                waiting = step.send(None)
        except StopIteration:
            c.blocked = None
            if c.sent < self.seq or (c.snapshots and c.seen != self.snapshots):
                self._send(c)
        except Exception:  # noqa: BLE001
            self._failed(c)
        finally:
            step.close()  # (a no-op once it has returned; unwinds it when the connection closed first)

    def _end(self, c: Conn, why: str) -> asyncio.Future:
        """End a connection: nothing more is written to it but an `event: end` frame saying why (a dashboard signed
        out goes to its login form at once, not through a reconnect answered 401), then its response's body ends
        (the ASGI server's receive then says the client is gone, so the response returns)."""
        self.close(c)

        async def end() -> None:
            await c.send({"type": "http.response.body", "body": end_frame(why), "more_body": True})
            await c.send({"type": "http.response.body", "body": b"", "more_body": False})

        done = asyncio.ensure_future(end())
        done.add_done_callback(lambda t: t.cancelled() or t.exception())  # (a client already gone: nothing to say)
        return done

    @staticmethod
    def _failed(c: Conn) -> None:
        log.exception("writing to an event stream failed")
        c.task.cancel()  # that connection ends (its response's `finally` closes it here; a browser reconnects)


def session_alive(scope: Scope) -> Callable[[], bool] | None:
    """For a stream that a dashboard session opened (its cookie, no token: as controller.api.auth.admin lets it
    in), whether that session is still signed in; None for one a token opened. A stream outlives the check made
    when it opened: without this, signing out (or the session's expiry) left every open tab of it live."""
    if "app" not in scope or "headers" not in scope:
        return None
    conn = HTTPConnection(scope)
    if conn.headers.get("authorization") or conn.headers.get("x-api-key"):
        return None
    sid = conn.cookies.get(session.COOKIE)
    if not sid:
        return None
    sessions = session.sessions(conn.app)
    return lambda: sessions.valid(sid)


def server_stopping(scope: Scope) -> Callable[[], bool] | None:
    """Whether the server is about to stop: it drains (SIGTERM, controller.shutdown) and no request is left in
    flight, so the drain is over and uvicorn closes its connections next. A stream does not end by itself: uvicorn
    waited its whole graceful timeout (5 s) for each open dashboard, then cancelled it with a traceback logged as an
    ERROR. While requests still finish, the streams go on (an operator watches the drain). None without the app's
    serving layer (a bare test app)."""
    serving = getattr(getattr(scope.get("app"), "state", None), "serving", None)
    if serving is None or not hasattr(serving, "draining"):
        return None
    return lambda: serving.draining and not serving.active


def stream_ends(scope: Scope) -> Callable[[], str | None]:
    """A new stream's `ends` (Hub.open): "signed out" once its dashboard session ended, "stopping" once the
    server stops, else None."""
    signed_in, stopping = session_alive(scope), server_stopping(scope)

    def ends() -> str | None:
        if stopping is not None and stopping():
            return "stopping"
        if signed_in is not None and not signed_in():
            return "signed out"
        return None
    return ends


class EventStream(Response):
    """The response of GET /admin/events: `Hub` writes the stream; this only registers the connection and
    waits for the client to go (the disconnect, which is what this connection's task does all along)."""

    media_type = "text/event-stream"

    def __init__(self, hub: Hub, since: int | None, snapshots: bool, headers: dict[str, str] | None = None):
        self.hub, self.since, self.snapshots = hub, since, snapshots
        self.status_code, self.background = 200, None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        c = self.hub.open(send, self.since, self.snapshots, ends=stream_ends(scope))
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        finally:
            self.hub.close(c)
