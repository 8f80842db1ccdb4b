"""The controller's event stream: what happens in the pool, for live views (admin SSE, dashboard).

    bus = EventBus()
    bus.publish("switch", engine="w0", model="qwen-7b")       # from any code on the event loop
    async for ev in bus.subscribe(): ...                        # each subscriber gets every later event

Events are plain dicts {"seq", "t", "kind", ...fields}. A bounded ring keeps the latest ones so a client that
reconnects can ask for what it missed (`since(seq)`); a slow subscriber's queue is bounded and it loses the
oldest events rather than slowing the publisher (serving never waits for a dashboard).
Kinds: switch, load, evict, admit, reject, register, unregister, worker_join, worker_death, drain, resume,
cancel, tenant_created, tenant_updated, tenant_revoked, tenant_requests_ended (a deleted tenant's requests in flight were ended),
pin_blocked (placement passed a GPU over: its pins would starve the model),
update (a model's SLO, priority, replica bounds or keep_alive changed in place).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

RING = 2048
QUEUE = 1024


class EventBus:
    def __init__(self, ring: int = RING):
        self._seq = itertools.count(1)
        self.recent: deque[dict[str, Any]] = deque(maxlen=ring)
        self._subs: set[asyncio.Queue] = set()
        self.counts: dict[str, int] = {}
        self.watchers = 0  # readers that follow the ring by themselves (the SSE streams: controller.dashboard.stream)

    def publish(self, kind: str, **fields: Any) -> dict[str, Any]:
        ev = {"seq": next(self._seq), "t": time.time(), "kind": kind, **fields}
        self.recent.append(ev)
        self.counts[kind] = self.counts.get(kind, 0) + 1
        for q in self._subs:
            if q.full():
                q.get_nowait()  # drop the oldest: a slow reader never holds the publisher back
            q.put_nowait(ev)
        return ev

    def since(self, seq: int) -> list[dict[str, Any]]:
        """Events after `seq` still in the ring (a reconnecting client's Last-Event-ID)."""
        return [e for e in self.recent if e["seq"] > seq]

    @property
    def subscribers(self) -> int:
        return len(self._subs) + self.watchers

    async def subscribe(self, since: int | None = None) -> AsyncIterator[dict[str, Any]]:
        q: asyncio.Queue = asyncio.Queue(QUEUE)
        self._subs.add(q)
        try:
            if since is not None:
                for e in self.since(since):
                    yield e
            while True:
                yield await q.get()
        finally:
            self._subs.discard(q)
