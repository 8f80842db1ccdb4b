"""The admin event stream as server-sent events: `id: SEQ` frames from the EventBus, reconnectable.

A client that reconnects with Last-Event-ID (browsers' EventSource does it by itself) gets the events it
missed that the bus's ring still holds. A dashboard's connection asks for snapshots too (`event: pool`,
`event: requests`): its gauges, once a second, without polling.

One `Hub` task serves every connection, on a fixed grid of beats (BEAT_S). About once a second (the tick, 0.9 s) it joins
the events published since its last write into one frame, each event JSON-encoded once, and, while a
connection wants them, builds the snapshot once and appends it; every connection then wakes once and writes
those bytes (the same object for all). Events that come with the traffic (ROUTINE: an admission per request,
a model switch per step under contention) ride the tick, at most 0.9 s after they happen; any other (an
operator's action, a worker joining or dying) makes the next beat write at once, within BEAT_S. Under load a
dashboard therefore costs about one wake-up and one write a second, however many events and dashboards there are;
the hub's work per beat depends on the events, not on the connections, and the publisher never waits.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Any

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


def snapshot_frame(event: str, body: bytes | str) -> bytes:
    """An SSE frame with an event type and no id (so it does not move a client's Last-Event-ID)."""
    return b"event: %s\ndata: %s\n\n" % (event.encode(), body.encode() if isinstance(body, str) else body)


class Hub:
    """What every connection writes, built once a beat (see the module's docstring).

    After a beat: `events` holds the frames of the events after `start` up to `seq`, and `full` is `events`
    followed by snapshot number `in_full` (0: none, when the beat built none). A connection that had sent up to
    `start` writes one of them as it is; one that fell behind (a slow reader, a reconnect) catches up from the
    ring.
    """

    def __init__(self, bus: EventBus, build: Callable[[], bytes] | None = None, beat_s: float = BEAT_S,
                 tick_beats: int = TICK_BEATS, heartbeat_s: float = HEARTBEAT_S):
        self.bus, self.build = bus, build
        self.beat_s, self.tick_beats, self.heartbeat_s = beat_s, tick_beats, heartbeat_s
        self.frames = Frames()
        self.start = self.seq = 0
        self.events = self.full = self.snapshot = b""
        self.snapshots = 0  # how many snapshots were built (a connection compares it with what it sent)
        self.in_full = 0
        self.builds_wanted = 0  # connections that asked for snapshots
        self.listeners = 0
        self._waiters: list[asyncio.Future] = []
        self._task: asyncio.Task | None = None

    def attach(self, snapshots: bool) -> None:
        self.listeners += 1
        self.bus.watchers += 1
        self.builds_wanted += snapshots
        if self._task is None:  # (re)starting: the beats begin from now, not from where they stopped
            self.start = self.seq = last_seq(self.bus)
            self.events = self.full = b""
            self._task = asyncio.ensure_future(self._run())
        if snapshots and not self.snapshot:
            self._build()  # the first dashboard gets its gauges at once, not at the next tick (later ones
            # get the current one, at most a tick old)

    def detach(self, snapshots: bool) -> None:
        self.listeners -= 1
        self.bus.watchers -= 1
        self.builds_wanted -= snapshots
        if not self.builds_wanted:
            self.snapshot = b""  # not kept current without a reader: the next dashboard builds a fresh one
        if self.listeners <= 0 and self._task is not None:
            self._task.cancel()
            self._task, self._waiters = None, []

    def wait(self) -> asyncio.Future:
        """A future resolved at the next beat that has something to send (one per connection: cancelling it,
        as a closed connection's task does, touches no one else)."""
        f = asyncio.get_running_loop().create_future()
        self._waiters.append(f)
        return f

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
            try:
                quiet = self._beat(beat % self.tick_beats == 0, quiet)
            except Exception:  # noqa: BLE001 - every open stream hangs on this task: it must go on
                log.exception("the event stream's beat failed")

    def _beat(self, tick: bool, quiet: float) -> float:
        """Send what this beat has to every waiting connection; returns how long nothing was sent."""
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
        waiters, self._waiters = self._waiters, []
        for f in waiters:
            if not f.done():
                f.set_result(None)
        return 0.0


async def event_stream(hub: Hub, since: int | None, snapshots: bool = False) -> AsyncIterator[bytes]:
    """SSE bytes: the events after `since` (None: from now on), then each new one at the hub's beats, with
    keep-alive comments; with `snapshots`, the hub's snapshot too, at once and then at each tick."""
    bus = hub.bus
    sent = last_seq(bus) if since is None else since
    if sent > last_seq(bus):  # a seq from before the server restarted: all the new server has
        sent = 0
    hub.attach(snapshots)
    try:
        backlog = after(bus, sent)
        if backlog:
            sent = backlog[-1]["seq"]
        seen = hub.snapshots
        yield b"".join([RETRY, *(hub.frames(e) for e in backlog), hub.snapshot if snapshots else b""])
        while True:
            if sent >= hub.seq and (not snapshots or seen == hub.snapshots):
                await hub.wait()
            if sent == hub.start:  # the usual case: the beat's bytes as they are, shared by every connection
                if not snapshots or seen == hub.snapshots:
                    out = hub.events
                else:  # (a snapshot built since the beat, for a new dashboard, is not in `full`)
                    out = hub.full if hub.in_full == hub.snapshots else hub.events + hub.snapshot
            else:  # behind by more than a beat: what it missed, from the ring (frames still encoded once)
                out = b"".join([*(hub.frames(e) for e in after(bus, sent, hub.seq)),
                                hub.snapshot if snapshots and seen != hub.snapshots else b""])
            sent, seen = max(sent, hub.seq), hub.snapshots
            if out:
                yield out
    finally:
        hub.detach(snapshots)
