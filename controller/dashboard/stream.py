"""The admin event stream as server-sent events: `id: SEQ` frames from the EventBus, reconnectable.

A client that reconnects with Last-Event-ID (browsers' EventSource does it by itself) gets the events it
missed that the bus's ring still holds. Each connection wakes on the bus's subscriber queue, waits
COALESCE_S for a burst to gather and then sends everything newer than what it sent, read from the ring, as one
write; a frame is JSON-encoded once for all connections. Many dashboards therefore cost a few writes a second
each, and the publisher never waits for any of them (the bus drops a slow reader's oldest wake-ups).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from controller.events import EventBus

HEARTBEAT_S = 15.0
COALESCE_S = 0.1
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


async def event_stream(bus: EventBus, frames: Frames, since: int | None, heartbeat_s: float = HEARTBEAT_S,
                       coalesce_s: float = COALESCE_S) -> AsyncIterator[bytes]:
    """SSE bytes: the events after `since` (None: from now on), then each new one, with keep-alive comments."""
    sent = last_seq(bus) if since is None else since
    if sent > last_seq(bus):  # a seq from before the server restarted: all the new server has
        sent = 0
    wake = bus.subscribe()
    pending: asyncio.Future | None = asyncio.ensure_future(anext(wake))
    try:
        await asyncio.sleep(0)  # the subscription is made before the backlog is read: no event falls between
        backlog = after(bus, sent)
        if backlog:
            sent = backlog[-1]["seq"]
        yield RETRY + b"".join(frames(e) for e in backlog)
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(wake))
            done, _ = await asyncio.wait({pending}, timeout=heartbeat_s)
            if done:
                ev = pending.result()
                pending = None
                if ev["seq"] <= sent:
                    continue  # a wake-up for an event already sent (read from the ring with an earlier one)
                await asyncio.sleep(coalesce_s)
            batch = after(bus, sent)
            if batch:
                sent = batch[-1]["seq"]
                yield b"".join(frames(e) for e in batch)
            elif not done:
                yield PING
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await pending
        await wake.aclose()  # ends the subscription: the bus forgets its queue
