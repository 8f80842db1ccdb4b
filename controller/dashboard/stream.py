"""The admin event stream as server-sent events: `id: SEQ` frames from the EventBus, reconnectable.

A client that reconnects with Last-Event-ID (browsers' EventSource does it by itself) gets the events it
missed that the bus's ring still holds. Each connection wakes on the bus's one shared "changed" future (a
publish resolves it once, whatever the number of connections), waits COALESCE_S for a burst to gather and then
sends everything newer than what it sent, read from the ring, as one write; a frame is JSON-encoded once for
all connections. Many dashboards therefore cost a few writes a second each, and the publisher never waits for
any of them.
A `Ticker` adds the dashboard's gauges to the stream: one snapshot a second for all connections that ask.
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
HEARTBEAT_S = 15.0
TICK_S = 1.0
COALESCE_S = 0.4  # a burst gathers this long before a write: <= 1 s from event to screen, few writes
RETRY = b"retry: 1000\n\n"  # EventSource reconnects after 1 s
PING = b": keep-alive\n\n"


class Frames:
    """Encoded SSE frames by event seq, shared by every connection (bounded LRU)."""

    def __init__(self, cap: int = 4096):
        self.cap = cap
        self._f: OrderedDict[int, bytes] = OrderedDict()

    def __call__(self, ev: dict[str, Any]) -> bytes:
        seq = ev["seq"]
        f = self._f.get(seq)
        if f is None:
            f = self._f[seq] = b"id: %d\ndata: %s\n\n" % (seq, json.dumps(ev, default=str).encode())
            if len(self._f) > self.cap:
                self._f.popitem(last=False)
        return f


def after(bus: EventBus, seq: int) -> list[dict[str, Any]]:
    """The ring's events newer than seq, oldest first (reads back from the newest: O(new events))."""
    out = []
    for e in reversed(bus.recent):
        if e["seq"] <= seq:
            break
        out.append(e)
    out.reverse()
    return out


def last_seq(bus: EventBus) -> int:
    return bus.recent[-1]["seq"] if bus.recent else 0


class Ticker:
    """A snapshot (SSE bytes, e.g. `event: pool`) rebuilt every `interval_s` while any connection wants it.

    The dashboard's gauges come this way rather than by each browser polling: one build a second for the
    whole server, however many dashboards are open, each of which gets the same bytes.
    """

    def __init__(self, build: Callable[[], bytes], interval_s: float = TICK_S):
        self.build, self.interval_s = build, interval_s
        self.frame = b""
        self.version = 0
        self.listeners = 0
        self._task: asyncio.Task | None = None
        self._next: asyncio.Future | None = None

    def next(self) -> asyncio.Future:
        """Resolved at the next tick (one future shared by every waiting connection)."""
        if self._next is None or self._next.done():
            self._next = asyncio.get_running_loop().create_future()
        return self._next

    def attach(self) -> None:
        self.listeners += 1
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    def detach(self) -> None:
        self.listeners -= 1
        if self.listeners <= 0 and self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                self.frame = self.build()
                self.version += 1
            except Exception:  # noqa: BLE001 - a view bug must not end the stream; the next tick tries again
                log.exception("building the dashboard snapshot failed")
            if self._next is not None and not self._next.done():
                self._next.set_result(None)
            await asyncio.sleep(self.interval_s)


def snapshot_frame(event: str, body: bytes | str) -> bytes:
    """An SSE frame with an event type and no id (so it does not move a client's Last-Event-ID)."""
    return b"event: %s\ndata: %s\n\n" % (event.encode(), body.encode() if isinstance(body, str) else body)


async def event_stream(bus: EventBus, frames: Frames, since: int | None, ticker: Ticker | None = None,
                       heartbeat_s: float = HEARTBEAT_S, coalesce_s: float = COALESCE_S) -> AsyncIterator[bytes]:
    """SSE bytes: the events after `since` (None: from now on), then each new one, with keep-alive comments;
    with a ticker, its snapshot too, at once and then at each tick."""
    sent = last_seq(bus) if since is None else since
    if sent > last_seq(bus):  # a seq from before the server restarted: all the new server has
        sent = 0
    bus.watchers += 1
    seen = 0
    if ticker is not None:
        ticker.attach()
    try:
        backlog = after(bus, sent)
        if backlog:
            sent = backlog[-1]["seq"]
        out = [RETRY, *(frames(e) for e in backlog)]
        if ticker is not None and ticker.version:
            seen = ticker.version
            out.append(ticker.frame)
        yield b"".join(out)
        while True:
            # Wake on the bus's one shared "changed" future (a publish costs O(1) however many streams follow
            # it), then gather a burst for coalesce_s and send what the ring holds past `sent`.
            changed = bus.changed()
            waits = {changed} if ticker is None else {changed, ticker.next()}
            behind = ticker is not None and ticker.version != seen  # a tick came while this one was writing
            new = last_seq(bus) > sent  # events came while this one was writing
            done, _ = await asyncio.wait(waits, timeout=0 if behind or new else heartbeat_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if new or changed in done:
                await asyncio.sleep(coalesce_s)
            out = []
            batch = after(bus, sent)
            if batch:
                sent = batch[-1]["seq"]
                out += [frames(e) for e in batch]
            if ticker is not None and ticker.version != seen:
                seen = ticker.version
                out.append(ticker.frame)
            if out:
                yield b"".join(out)
            elif not done and not behind:
                yield PING
    finally:
        bus.watchers -= 1
        if ticker is not None:
            ticker.detach()
