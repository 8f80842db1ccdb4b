"""VRAM for a multi-model engine: one arena holding a KV region shared by every model and the weight slots.

    pool = ModelPool("cuda", gpu_budget="60GB", kv_cache_gb=4)
    kv = pool.register("qwen-7b", model_dir, cfg, dtype)   # host copy loaded (pinned, shared per node)
    rm = pool.load("qwen-7b")                              # async copy into a slot; rm.ready to wait on
    pool.prefetch("qwen-1.5b"); pool.poll(); pool.evict("qwen-7b")

Mechanism only: the multi-model policy decides what to load, prefetch and evict; this executes it and
measures (load seconds, stalls). The KV region is carved into pages of one byte size; each model sees it
as its own block shape (tokens per block chosen so a block fills a page) and every model's allocator draws
from one free list, so KV space moves between models block by block. Host KV pages (swap space) are shared
the same way. The last GPU page is the scratch page padded CUDA-graph rows write into.

Which model holds which slot is a `gpu_pool.slots.SlotTable` over the arena's best-fit allocator, the one the
simulator drives too; this pool keeps the tensors, copies, host copies and streams beside it. A model that
lands at the offset of an earlier model of the same graph key replays that model's CUDA graphs (ModelRunner
keys graphs by slot). If a load or a prefetch does not fit because free space is fragmented, the table says
what else must go (`gpu_pool.placement.placement_victims`): the window of slots the policy lets go (`order`)
that costs least, or without an order, for a load, least recently used models until it fits, and for a
prefetch nothing (skipped, `stats.prefetch_skipped`). Evictions made here are counted in
`stats.forced_evictions`.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gpu_pool.slots import SlotTable
from model_swapper.model_config import ModelConfig
from token_scheduler import graph_cap
from token_scheduler.block_manager import BlockAllocator
from token_scheduler.engine import SharedKV


@dataclass
class _Entry:
    name: str
    host: object  # model_swapper.HostModel
    graph_key: tuple
    resident: object | None = None  # model_swapper.ResidentModel
    prefetch: object | None = None  # model_swapper.Prefetch
    load_started: float | None = None  # monotonic, for the load-time measurement
    load_hidden: bool = False  # started as a prefetch


@dataclass
class PoolStats:
    """What the pool did since `reset_stats`: weights brought in and what they cost, then weights let go."""

    loads: int = 0  # blocking loads (a step waits for them); prefetches are counted apart
    prefetches: int = 0
    load_bytes: int = 0  # of both
    # (bytes, seconds, hidden seconds) of the latest completed loads: bounded, a serving worker loads for days
    load_s: deque = field(default_factory=lambda: deque(maxlen=4096))
    loads_done: int = 0  # completed loads ever recorded (load_s keeps the latest)
    stall_s: float = 0.0  # CPU-visible waits for weights at switches
    evictions: int = 0  # every weight slot given back (a cancelled prefetch too), planned or forced
    forced_evictions: int = 0  # of those, the ones the slot table asked for to make a slot contiguous
    prefetch_skipped: int = 0  # prefetches that found no contiguous range (and no order allowing evictions)


class ModelPool:
    def __init__(self, device: str | torch.device, gpu_budget: int | float | str, kv_cache_gb: float = 4.0,
                 host_kv_gb: float | None = None, host_cache=None, host_budget: int | float | str = "64GB",
                 page_bytes: int | None = None, namespace: str = "tokenpool", block_tokens: int = 16,
                 align: int | None = None, min_page_bytes: int = 0):
        from gpu_pool.arena import DEFAULT_ALIGN, Arena
        from model_swapper import HostModelCache, Prefetcher, Swapper

        self.device = torch.device(device)
        self.arena = Arena.reserve(gpu_budget, self.device, align or DEFAULT_ALIGN)
        self.swapper = Swapper(self.arena)
        self.prefetcher = Prefetcher(self.swapper)
        self._own_cache = host_cache is None
        self.cache = host_cache or HostModelCache(host_budget, namespace=namespace)
        self.kv_bytes = int(kv_cache_gb * 1e9)
        self.host_kv_bytes = int((kv_cache_gb if host_kv_gb is None else host_kv_gb) * 1e9)
        self.slot_table = SlotTable(self.arena.alloc, self.kv_bytes, block_tokens, page_bytes, min_page_bytes)
        self.kv_flat: torch.Tensor | None = None
        self.pages: BlockAllocator | None = None
        self.host_kv = None
        self.entries: dict[str, _Entry] = {}
        self.graphs: dict = {}  # CUDA graphs shared by every runner of this pool
        self.pinned: set[str] = set()  # never a fallback victim (the policy does not plan them either)
        self.stats = PoolStats()

    # -- capacity -------------------------------------------------------------------------------------------
    @property
    def weight_capacity(self) -> int:
        """Bytes the weight slots may use (the arena minus the KV region)."""
        return self.slot_table.weight_capacity

    @property
    def page_bytes(self) -> int | None:
        """Bytes of a KV page: fixed by the first model registered unless given."""
        return self.slot_table.page_bytes

    @property
    def _kv_slot(self):  # MultiModelEngine.snapshot reads it
        return self.slot_table.kv_slot

    def _carve_kv(self, per_token: int) -> None:
        slot, n = self.slot_table.carve_kv(per_token), self.slot_table.kv_pages
        self.kv_flat = self.arena.slot_bytes(slot)[: n * self.page_bytes]
        self.pages = BlockAllocator(n - 1, 1)  # the last page is scratch
        nh = self.host_kv_bytes // self.page_bytes
        from model_swapper import HostKVPool

        self.host_kv = HostKVPool(nh, (self.page_bytes,), torch.uint8) if nh else None

    # -- models ---------------------------------------------------------------------------------------------
    def register(self, name: str, model_dir: str | Path, cfg: ModelConfig, dtype: torch.dtype,
                 max_model_len: int, progress=None) -> SharedKV:
        """Load the model's host copy (once per node) and give it its view of the KV region."""
        from model_swapper.kv_swap import strided_blocks

        if name in self.entries:
            raise ValueError(f"model {name!r} is already registered")
        per_token = cfg.kv_bytes_per_token(dtype)
        if self.pages is None:
            self._carve_kv(per_token)
        bs = self.slot_table.block_tokens_of(per_token)
        if bs * per_token > self.page_bytes:
            raise ValueError(f"{name}: one token of KV ({per_token} B) is larger than a page ({self.page_bytes} B)")
        host = self.cache.get(model_dir, dtype, progress)
        # a slot is the weights rounded up to the arena's alignment: a model within that of the weight space
        # passed a check of its bytes and then waited for a slot for ever
        if (slot := self.slot_table.slot_bytes(host.nbytes)) > self.weight_capacity:
            raise ValueError(f"{name}: weights of {host.nbytes / 2**20:.1f} MiB (a slot of "
                             f"{slot / 2**20:.1f} MiB) can never fit the "
                             f"{self.weight_capacity / 2**20:.1f} MiB of weight space in the GPU budget")
        shape = (cfg.num_layers, 2, bs, cfg.num_kv_heads, cfg.head_dim)
        kv = strided_blocks(self.kv_flat, self.pages.num_blocks + 1, self.page_bytes, shape, dtype)
        hv = self.host_kv.view(shape, dtype) if self.host_kv is not None else None
        gkey = (repr(cfg), str(dtype), max_model_len, bs)
        self.entries[name] = _Entry(name, host, gkey)
        return SharedKV(kv, self.pages.share(bs), hv, bs, self.graphs, gkey)

    def slot_bytes(self, name: str) -> int:
        """Arena bytes the model's weights take (its size rounded up to the arena's alignment)."""
        return self.slot_table.slot_bytes(self.entries[name].host.nbytes)

    def unregister(self, name: str) -> None:
        """Forget `name`: its slot is freed; its CUDA graphs and its host copy go too unless another registered
        model shares them (same shapes / same checkpoint). The host copy stays in the node's cache for other
        processes (and for a later registration); this process only stops holding it."""
        e = self.entries.get(name)
        if e is None:
            return
        self.evict(name)
        del self.entries[name]
        if not any(o.graph_key == e.graph_key for o in self.entries.values()):
            graph_cap.drop_key(self.graphs, e.graph_key)
        if not any(o.host is e.host for o in self.entries.values()):
            from model_swapper.host_cache import HostCacheFull

            self.swapper.synchronize()  # no copy out of the host copy may still be in flight
            self.cache.release(e.host)
            try:  # and out of the node's cache, unless another process (a worker of another GPU) holds it
                self.cache.evict(e.host.key)
            except HostCacheFull:
                pass

    def host_bytes(self) -> int:
        """Bytes of host copies this pool holds (each shared checkpoint once)."""
        return sum({id(e.host): e.host.nbytes for e in self.entries.values()}.values())

    def is_resident(self, name: str) -> bool:
        return self.entries[name].resident is not None

    def is_loading(self, name: str) -> bool:
        e = self.entries[name]
        return e.prefetch is not None or (e.resident is not None and not e.resident.ready.done())

    def landed(self, name: str) -> bool:
        """All of `name`'s weights are in VRAM (a finished prefetch its first step has not taken yet counts)."""
        e = self.entries[name]
        if e.resident is not None:
            return e.resident.ready.done()
        return e.prefetch is not None and e.prefetch.handle.done()

    def holds(self, name: str) -> bool:
        """A slot is `name`'s: its weights landed, or are landing (blocking load or prefetch)."""
        e = self.entries[name]
        return e.resident is not None or e.prefetch is not None

    def resident_names(self) -> list[str]:
        return [n for n in self.entries if self.holds(n)]

    # -- moving weights -------------------------------------------------------------------------------------
    def load(self, name: str, protect: tuple[str, ...] = (), order: list[str] | None = None):
        """Make `name` resident and wait (CPU) until its weights have landed; returns the ResidentModel.
        The wait is the switch stall, measured; compute would have waited for it anyway. If no contiguous
        range is free, models in `order` (the policy's, preferred victim first) or, without one, the least
        recently taken models (`SlotTable.take`: their blocking load, or their first step after a prefetch)
        other than `name`, `protect` and the pinned ones are evicted (module docstring)."""
        e = self.entries[name]
        if e.resident is None:
            if e.prefetch is not None:
                e.resident, e.prefetch = self.prefetcher.take(e.prefetch), None
            else:  # raises ArenaFull if nothing could make room
                self.slot_table.claim(name, e.host.nbytes, self._evict_forced, order, (*protect, *self.pinned))
                e.resident = self.swapper.swap_in(e.host, self.slot_table.slots[name])
                e.load_started, e.load_hidden = time.monotonic(), False
                self.stats.loads += 1
                self.stats.load_bytes += e.host.nbytes
        self.slot_table.take(name, time.monotonic())
        t0 = time.perf_counter()
        e.resident.ready.synchronize()
        stall = time.perf_counter() - t0
        self.stats.stall_s += stall
        self._finish_load(e, stall)
        return e.resident

    def can_load(self, name: str) -> bool:
        """Whether `load(name)` would find `name` a range, evicting what a load may: the least recently taken models
        but the pinned ones (a prefetch in flight, not taken yet, stays) -- the policy's question where free bytes
        cannot answer it (`PoolState.can_load`)."""
        e = self.entries[name]
        if e.resident is not None or e.prefetch is not None:
            return True
        return self.slot_table.victims(name, e.host.nbytes, None, tuple(self.pinned)) is not None

    def prefetch(self, name: str, order: list[str] | None = None) -> bool:
        """Start bringing `name` in. Without an `order` only into free space (never evicts for a prefetch);
        with one, the models in it may go to make a contiguous range. False if there is no room."""
        e = self.entries[name]
        if e.resident is not None or e.prefetch is not None:
            return True
        if self.slot_table.claim(name, e.host.nbytes, self._evict_forced, order, blocking=False) is None:
            self.stats.prefetch_skipped += 1
            return False
        e.prefetch = self.prefetcher.prefetch(e.host, self.slot_table.slots[name], name=name)
        e.load_started, e.load_hidden = time.monotonic(), True
        self.stats.prefetches += 1
        self.stats.load_bytes += e.host.nbytes
        return True

    def _evict_forced(self, name: str) -> None:
        """An eviction the slot table asked for to make a slot contiguous, beyond the policy's plan."""
        self.stats.forced_evictions += 1
        self.evict(name)

    def evict(self, name: str) -> None:
        """Drop the weights (the host copy stays); later copies into the slot wait for queued compute."""
        e = self.entries[name]
        if e.prefetch is not None:
            self.prefetcher.cancel(e.prefetch, free_slot=False)
            e.prefetch = None
            self.stats.evictions += 1
        if e.resident is not None:
            self.swapper.release(e.resident, free_slot=False)
            e.resident = None
            self.stats.evictions += 1
        self.slot_table.free(name)
        e.load_started = None

    def reset_stats(self) -> None:
        self.stats = PoolStats()

    def poll(self) -> list[str]:
        """Top up prefetch windows; returns the models whose loads completed since the last poll."""
        self.prefetcher.poll()
        done = []
        for e in self.entries.values():
            if e.load_started is None:
                continue
            h = e.resident.ready if e.resident is not None else (e.prefetch.handle if e.prefetch else None)
            if h is not None and h.done():
                self._finish_load(e)
                done.append(e.name)
        return done

    def _finish_load(self, e: _Entry, stall: float = 0.0) -> None:
        """Record a completed load as (bytes, seconds, seconds hidden behind other work): a blocking load hides
        nothing; a prefetch hides all of its time but the stall of the step that finally needed it."""
        if e.load_started is not None:
            secs = time.monotonic() - e.load_started
            self.stats.load_s.append((e.host.nbytes, secs, max(0.0, secs - stall) if e.load_hidden else 0.0))
            self.stats.loads_done += 1
            e.load_started = None

    def close(self) -> None:
        for n in list(self.entries):
            self.evict(n)
        self.swapper.synchronize()
        if self.host_kv is not None:
            self.host_kv.close()
        self.entries.clear()
        self.graphs.clear()
        self.kv_flat = None
        self.arena.buffer = None  # the arena's one allocation goes back to torch's caching allocator
        if self._own_cache:  # a cache the caller passed in is the caller's to close
            self.cache.close()
