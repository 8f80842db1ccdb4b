"""Swap-in of a model's weights from the pinned host cache into an arena slot, on a dedicated copy stream.

The host copy and the slot share one layout (`ModelLayout`), so a swap-in is a flat byte copy of one
contiguous region: a few large `cudaMemcpyAsync`s (default 4), which run at link speed, instead of hundreds
of per-tensor copies. After each piece an event is recorded; `handle.wait(stream)` makes compute wait for the
whole model without blocking the CPU, and `handle.wait_layer(n, stream)` only for the pieces covering layers
0..n (the layout is in layer order), so layer 0 can run while later layers still land.

Swap-out is free: the host copy stays, `release` records an event on the compute stream (so the next copy
into those bytes waits for the last kernel that read them) and returns the slot. Nothing here calls the CUDA
caching allocator: slots and weight views are views of the arena's one buffer, so
`torch.cuda.memory_reserved()` is flat across any number of swaps.

On CPU the same API runs synchronously: copies complete inside `swap_in` and handles are already ready.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gpu_pool.arena import Arena, Slot
from model_swapper.host_cache import HostModel
from model_swapper.layout import ModelLayout

log = logging.getLogger(__name__)

SPLIT_ALIGN = 2 << 20


def split(nbytes: int, pieces: int, align: int = SPLIT_ALIGN) -> list[int]:
    """End offsets of `pieces` near-equal byte ranges covering [0, nbytes), cut on `align` boundaries."""
    pieces = max(1, pieces)
    ends = sorted({min(nbytes, -(-nbytes * i // pieces // align) * align) for i in range(1, pieces)} | {nbytes})
    return [e for e in ends if e > 0]


def enqueue_copy(dst: torch.Tensor, src: torch.Tensor, start: int, ends: list[int],
                 stream: torch.cuda.Stream | None) -> list[torch.cuda.Event | None]:
    """Copy src[start:end] -> dst[start:end] piece by piece on `stream`; one event after each piece.
    On CPU (stream None) the copies are synchronous and the events are None."""
    events: list[torch.cuda.Event | None] = []
    a = start
    for b in ends:
        if stream is None:
            dst[a:b].copy_(src[a:b])
            events.append(None)
        else:
            with torch.cuda.stream(stream):
                dst[a:b].copy_(src[a:b], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(stream)
            events.append(ev)
        a = b
    return events


@dataclass
class SwapHandle:
    """Readiness of a region: `events[i]` fires when bytes [0, ends[i]) have landed (None: already there).

    `more` (prefetch only) enqueues whatever has not been enqueued yet; waiting calls it first, so a waiter
    never waits on copies that were never issued."""

    layout: ModelLayout
    ends: list[int] = field(default_factory=list)
    events: list = field(default_factory=list)
    more: Callable[[], None] | None = None
    device: torch.device | None = None  # whose current stream `wait` defaults to

    def _flush(self) -> None:
        if self.more is not None:
            self.more()

    def _event_for(self, nbytes: int):
        self._flush()
        for end, ev in zip(self.ends, self.events, strict=True):
            if end >= nbytes:
                return ev
        raise RuntimeError(f"bytes [0, {nbytes}) were never enqueued (cancelled prefetch?)")

    def wait(self, stream: torch.cuda.Stream | None = None) -> None:
        """Make `stream` (default: current) wait until the whole model has landed. No CPU block."""
        self._wait_event(self._event_for(self.layout.nbytes), stream)

    def wait_layer(self, layer: int, stream: torch.cuda.Stream | None = None) -> None:
        """Make `stream` wait until the embedding and layers 0..layer have landed (-1: the embedding only)."""
        self._wait_event(self._event_for(self.layout.layer_end(layer)), stream)

    def _wait_event(self, ev, stream) -> None:
        if ev is not None:
            (stream or torch.cuda.current_stream(self.device)).wait_event(ev)

    def synchronize(self) -> None:
        """Block the CPU until the whole model has landed."""
        ev = self._event_for(self.layout.nbytes)
        if ev is not None:
            ev.synchronize()

    def done(self) -> bool:
        if not self.ends or self.ends[-1] < self.layout.nbytes:  # not all enqueued yet (prefetch window)
            return False
        ev = self.events[-1]
        return ev is None or ev.query()


@dataclass
class ResidentModel:
    key: str
    layout: ModelLayout
    slot: Slot
    weights: dict[str, torch.Tensor]  # views into the arena slot, keyed by weight_specs names
    ready: SwapHandle
    host: HostModel | None = None

    @property
    def slot_id(self) -> int:
        """Stable for the slot's life. Same slot_id and same `layout.signature` -> same data_ptrs, so CUDA
        graphs captured for the previous occupant can be replayed for this one."""
        return self.slot.offset


class Swapper:
    def __init__(self, arena: Arena, chunks: int = 4):
        self.arena = arena
        self.device = arena.device
        self.chunks = chunks
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        if self.stream is not None:  # should the arena ever be freed, not before our copies into it are done
            arena.buffer.record_stream(self.stream)
        self._released: list[torch.cuda.Event] = []  # compute-stream events the next copy must follow
        self._inflight: list[tuple[object, HostModel]] = []  # (last event, host model pinned until it fires)
        self._warned_unpinned = False

    # -- weights ----------------------------------------------------------------------------------------
    def allocate_slot(self, host: HostModel) -> Slot:
        return self.arena.allocate(host.nbytes, tag=host.key)

    def swap_in(self, host: HostModel, slot: Slot | None = None, chunks: int | None = None) -> ResidentModel:
        """Start copying `host` into `slot` (default: a new slot from free arena space; raises ArenaFull /
        ArenaTooSmall). Returns at once on CUDA; compute must `rm.ready.wait(stream)` before reading."""
        self.poll()
        slot = self.slot_for(host, slot)
        dst = self.arena.slot_bytes(slot)
        ends = split(host.nbytes, chunks or self.chunks)
        self.before_copy()
        events = enqueue_copy(dst, self.source(host), 0, ends, self.stream)
        self.track(events[-1], host)
        return ResidentModel(host.key, host.layout, slot, host.layout.views(dst),
                             SwapHandle(host.layout, ends, events, device=self.device), host)

    def release(self, rm: ResidentModel, stream: torch.cuda.Stream | None = None, free_slot: bool = True) -> Slot:
        """Swap out (free: the host copy stays). Work already queued on `stream` (default: current) may still
        read the weights; the next copy into these bytes waits for it. With `free_slot=False` the slot is
        kept for the caller, e.g. to swap a same-shaped model into it and keep its CUDA graphs."""
        if self.stream is not None:
            ev = torch.cuda.Event()
            ev.record(stream or torch.cuda.current_stream(self.device))
            self._released.append(ev)
        rm.weights = {}
        if free_slot:
            self.arena.free(rm.slot)
        return rm.slot

    # -- shared with prefetch ---------------------------------------------------------------------------
    def slot_for(self, host: HostModel, slot: Slot | None) -> Slot:
        """`slot` if it is big enough for `host`, else a new slot from free arena space (raises on shortage)."""
        if slot is None:
            return self.allocate_slot(host)
        if slot.nbytes < host.nbytes:
            raise ValueError(f"slot of {slot.nbytes} B is too small for {host.key} ({host.nbytes} B)")
        return slot

    def source(self, host: HostModel) -> torch.Tensor:
        if self.stream is not None and not host.region.pinned and not self._warned_unpinned:
            self._warned_unpinned = True
            log.warning("%s: host copy is not page-locked; swaps will be synchronous and slow", host.key)
        return host.buffer

    def before_copy(self) -> None:
        """Order the copy stream after every release recorded so far (the bytes may be reused)."""
        if self.stream is not None:
            for ev in self._released:
                self.stream.wait_event(ev)
        self._released.clear()

    def track(self, last_event, host: HostModel) -> None:
        """Keep `host` pinned in its cache until `last_event` fires."""
        if last_event is None:
            return
        host.pins += 1
        self._inflight.append((last_event, host))

    def poll(self) -> None:
        """Unpin host copies whose copies have finished. Cheap; call once per engine step."""
        keep = []
        for ev, host in self._inflight:
            if ev.query():
                host.pins -= 1
            else:
                keep.append((ev, host))
        self._inflight = keep

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()
        self.poll()
