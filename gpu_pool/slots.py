"""Which model holds which weight slot of an arena: the one slot bookkeeping of the real pool and the simulator.

Plain Python over a `RangeAllocator`. The real pool (token_scheduler/residency.py, over its arena's allocator)
keeps the tensors, copies and streams and asks a `SlotTable` every slot decision; the simulator
(load_tests/simulator.py, over an allocator of its own) drives the same table in virtual time. So both carve
the KV region the same way, place slots at the same offsets and evict the same models when free space is
fragmented (`placement_victims`, gpu_pool/placement.py).

    t = SlotTable(arena.alloc, kv_bytes=4 * 10**9)
    t.carve_kv(per_token)                        # the KV region first, sized by the first model registered
    victims = t.claim("a", nbytes, owner_evict)  # a slot for "a", after the owner evicted what must go
    t.take("a", now)                             # "a" is in use: a fallback victim from now on
    t.free("a")
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from gpu_pool.arena import RangeAllocator, Slot
from gpu_pool.placement import kv_pages, kv_region_bytes, placement_victims
from tokenpool import env

GRAPH_HOMES = env.GRAPH_HOMES.on()  # see SlotTable.homes


class SlotTable:
    """Weight slots by model name over `alloc`, with a KV region carved first.

    `slots`: every slot held, landed or landing (a blocking load or a prefetch). `taken`: the models in use --
    a blocking load, or a prefetch once its model first steps -- with the time they were taken: the fallback's
    least-recently-used candidates (a prefetch in flight is never one).
    """

    def __init__(self, alloc: RangeAllocator, kv_bytes: int, block_tokens: int = 16, page_bytes: int | None = None,
                 min_page_bytes: int = 0):
        self.alloc = alloc
        self.kv_bytes, self.block_tokens = kv_bytes, block_tokens
        self.page_bytes = page_bytes  # fixed by `carve_kv` (the first model registered) unless given
        # a page is at least this (the largest model the pool expects, a few of its tokens: `carve_kv`)
        self.min_page_bytes = min_page_bytes
        self.kv_slot: Slot | None = None
        self.kv_pages = 0  # pages of the KV region, the scratch page included
        self.slots: dict[str, Slot] = {}
        self.taken: dict[str, float] = {}
        # Offsets slots of each size have held, first used first. A model replays the CUDA graphs captured at its
        # slot's offset for its shapes (ModelRunner keys them by slot); anywhere else each decode bucket it runs
        # is captured anew, on the step thread (H200: 32 ms a capture). Best fit alone scatters a mix of sizes
        # over many offsets: the simulator with that cost (models_per_gpu --graph-capture-ms 32), 33 models on
        # 120 GB, 361-381 captures in 360 s and attainment 92-94% -> 74-79%. So a slot goes to the first of its
        # size's earlier offsets whose range is free (`RangeAllocator.allocate`'s `prefer`): 140-147 captures,
        # 90-91%. TOKENPOOL_GRAPH_HOMES=0: best fit only (A/B runs).
        self.homes: dict[int, list[int]] = {}

    # -- the KV region --------------------------------------------------------------------------------------
    def carve_kv(self, per_token: int) -> Slot:
        """Carve the KV region: pages of `block_tokens` tokens of a model of `per_token` KV bytes, at least
        `min_page_bytes` (`kv_pages`). Pages are the first model's: without the floor, a model registered later whose
        one token of KV is more than a page could never load (a 0.5B first, a 32B after it)."""
        self.page_bytes, n = kv_pages(self.kv_bytes, per_token, self.block_tokens, self.page_bytes, self.min_page_bytes)
        if n < 2:
            raise ValueError(f"kv_cache_gb={self.kv_bytes / 1e9} holds fewer than 2 pages of {self.page_bytes} B")
        self.kv_slot = self.alloc.allocate(n * self.page_bytes, tag="kv")
        self.kv_pages = n
        return self.kv_slot

    @property
    def kv_usable(self) -> int:
        """Bytes of the KV pages models may hold: all but the last, the scratch page padded rows write into."""
        return (self.kv_pages - 1) * self.page_bytes if self.kv_slot else 0

    def block_tokens_of(self, per_token: int) -> int:
        """Tokens a page holds for a model of `per_token` KV bytes: the largest power of two that fits."""
        return 1 << (max(1, self.page_bytes // per_token).bit_length() - 1)

    # -- weight slots ---------------------------------------------------------------------------------------
    @property
    def weight_capacity(self) -> int:
        """Bytes the weight slots may use: the allocator's capacity less the KV region (before it is carved, the most
        it can take: `kv_region_bytes`)."""
        return self.alloc.capacity - kv_region_bytes(self.kv_bytes, self.page_bytes, self.alloc.align)

    def slot_bytes(self, nbytes: int) -> int:
        """Bytes a slot of `nbytes` takes (rounded up to the alignment)."""
        return self.alloc._round(nbytes)

    def lru(self, exclude: Iterable[str] = ()) -> list[str]:
        """The models taken, but `exclude`, least recently taken first: the fallback's victims."""
        exclude = set(exclude)
        return sorted((n for n in self.taken if n not in exclude), key=self.taken.__getitem__)

    def victims(self, name: str, nbytes: int, order: list[str] | None = None, protect: Iterable[str] = (),
                blocking: bool = True) -> list[str] | None:
        """What must go before `name`'s slot fits (`placement_victims`): [] if it fits now, None if it cannot
        (or must not: a prefetch without an order). `order`: the policy's evictable models, preferred first;
        without one a blocking load falls back on `lru()`, never `name` or `protect`."""
        slots = {n: (s.offset, s.nbytes) for n, s in self.slots.items() if n != name}
        lru = self.lru({name, *protect}) if blocking else []
        return placement_victims(self.alloc.free_runs(), slots, self.slot_bytes(nbytes), self.alloc.align, order,
                                 lru, blocking)

    def claim(self, name: str, nbytes: int, evict: Callable[[str], None], order: list[str] | None = None,
              protect: Iterable[str] = (), blocking: bool = True) -> list[str] | None:
        """Place `name`'s slot, first evicting what `victims` says through `evict` (the owner's eviction, which
        `free`s the slot): the victims, or None when a prefetch (`blocking=False`) is skipped. A blocking load
        that nothing may make room for raises `ArenaFull` from the allocator."""
        victims = self.victims(name, nbytes, order, protect, blocking)
        if victims is None and not blocking:
            return None
        for v in victims or ():
            evict(v)
        n = self.slot_bytes(nbytes)
        homes = self.homes.setdefault(n, [])
        slot = self.slots[name] = self.alloc.allocate(nbytes, name, homes if GRAPH_HOMES else ())
        if slot.offset not in homes:
            homes.append(slot.offset)
        return victims or []

    def take(self, name: str, now: float) -> None:
        """`name` is in use from `now` (its blocking load, or its first step after a prefetch); later calls keep
        the first time until it is freed."""
        self.taken.setdefault(name, now)

    def free(self, name: str) -> Slot | None:
        """Give `name`'s slot back (no-op if it holds none)."""
        self.taken.pop(name, None)
        slot = self.slots.pop(name, None)
        if slot is not None:
            self.alloc.free(slot)
        return slot
