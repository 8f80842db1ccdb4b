"""Prefetch: bring a model into free arena space ahead of its turn, while another model decodes.

A prefetch copies in pieces (default 256 MiB) and keeps at most `window` bytes enqueued on the copy stream;
`poll()` (once per engine step) tops the window up. Two reasons for the window rather than enqueuing the whole
model at once: `cancel` then really stops using the link (copies already enqueued cannot be recalled), and an
urgent `Swapper.swap_in` queues behind at most `window` bytes (~20 ms at 53 GB/s) instead of a whole 15 GB
model. `window=None` enqueues everything at once (no polling needed; cancel only frees the slot).

While a prefetch is alive its host copy is pinned (`HostModel.pins`), so the host cache will not evict it;
its slot is allocated, so nothing else lands there. `take` turns it into a ResidentModel (enqueuing whatever
is left); `cancel` gives the slot back, ordered after the pieces already enqueued.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

from gpu_pool.arena import Slot
from model_swapper.host_cache import HostModel
from model_swapper.swapper import SPLIT_ALIGN, ResidentModel, SwapHandle, Swapper, enqueue_copy, split

PIECE = 256 << 20
WINDOW = 1 << 30


@dataclass(eq=False)
class Prefetch:
    host: HostModel
    slot: Slot
    handle: SwapHandle
    plan: list[int]  # end offsets of every piece
    state: str = "running"  # running | taken | cancelled
    name: str = ""  # what it is prefetched as (default: the host copy's key)
    landed_pieces: int = 0  # pieces known to have landed (a prefix: events fire in stream order)

    @property
    def enqueued(self) -> int:
        return self.handle.ends[-1] if self.handle.ends else 0

    @property
    def key(self) -> str:
        return self.name or self.host.key


class Prefetcher:
    def __init__(self, swapper: Swapper, piece: int = PIECE, window: int | None = WINDOW):
        self.swapper, self.piece, self.window = swapper, piece, window
        self.active: dict[str, Prefetch] = {}  # by model key

    def prefetch(self, host: HostModel, slot: Slot | None = None, name: str | None = None) -> Prefetch:
        """Start bringing `host` in. Raises ArenaFull when there is no free space for it: the scheduler
        decides whether to evict something for a prefetch (usually not). `name` tells apart several served
        models backed by one host copy (each gets its own slot); default: the host copy's key."""
        key = name or host.key
        if key in self.active:
            return self.active[key]
        slot = self.swapper.slot_for(host, slot)
        host.pins += 1  # held for the prefetch's whole life, on CPU too
        p = Prefetch(host, slot, SwapHandle(host.layout, device=self.swapper.device),
                     split(host.nbytes, -(-host.nbytes // self.piece), align=min(SPLIT_ALIGN, self.piece)))
        p.handle.more = lambda: self._enqueue(p, everything=True)
        p.name = key
        self.active[key] = p
        self.swapper.before_copy()
        self._enqueue(p, everything=self.window is None)
        return p

    def poll(self) -> None:
        """Top up every running prefetch's window; unpin finished copies."""
        self.swapper.poll()
        for p in list(self.active.values()):
            self._enqueue(p, everything=False)

    def take(self, p: Prefetch) -> ResidentModel:
        """The prefetched model as a ResidentModel (remaining pieces enqueued now). Compute still waits on
        `rm.ready` — usually already fired, which is the point."""
        if p.state != "running":
            raise RuntimeError(f"prefetch of {p.key} is {p.state}")
        self._enqueue(p, everything=True)
        p.state = "taken"
        self._finish(p)
        dst = self.swapper.arena.slot_bytes(p.slot)
        return ResidentModel(p.key, p.host.layout, p.slot, p.host.layout.views(dst), p.handle, p.host)

    def cancel(self, p: Prefetch, free_slot: bool = True) -> None:
        """Stop the prefetch and free its slot (with `free_slot=False` the slot is the caller's to free, as in
        `Swapper.release`). Pieces already enqueued still run; later copies into the slot are queued behind
        them on the same stream, so the slot may be reused at once."""
        if p.state != "running":
            return
        p.state = "cancelled"
        self._finish(p)
        if free_slot:
            self.swapper.arena.free(p.slot)

    def _finish(self, p: Prefetch) -> None:
        p.handle.more = None
        self.active.pop(p.key, None)
        p.host.pins -= 1
        if p.handle.events:
            self.swapper.track(p.handle.events[-1], p.host)  # stay pinned until the last piece lands

    def _enqueue(self, p: Prefetch, everything: bool) -> None:
        if p.state != "running":
            return
        # Every poll (every step) comes here for every prefetch alive: one wholly enqueued (its last pieces
        # landing, or landed and waiting for its model's turn) returns at once; one still being fed slices its
        # plan (sorted) where two scans of every piece ran (a 7B model's plan is 57 pieces of 256 MiB).
        enqueued = p.enqueued
        if enqueued >= p.host.nbytes:
            return
        todo = p.plan[bisect_right(p.plan, enqueued):]
        if not everything and self.window is not None:
            # Events fire in stream order, so the landed bytes are a prefix: query only past the pieces
            # already known to have landed (a poll costs O(newly landed) event queries, not O(pieces)).
            i, evs = p.landed_pieces, p.handle.events
            while i < len(evs) and (evs[i] is None or evs[i].query()):
                i += 1
            p.landed_pieces = i
            landed = p.handle.ends[i - 1] if i else 0
            fit = todo[:bisect_right(todo, landed + self.window)]
            # a piece larger than the window still goes, alone, once the link is idle
            todo = fit or (todo[:1] if landed == p.enqueued else [])
        if not todo:
            return
        dst = self.swapper.arena.slot_bytes(p.slot)
        p.handle.events += enqueue_copy(dst, self.swapper.source(p.host), p.enqueued, todo, self.swapper.stream)
        p.handle.ends += todo
