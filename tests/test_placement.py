"""Placement under fragmentation (gpu_pool/placement.py), and the slot table (gpu_pool/slots.py) that the real
ModelPool and the simulator share, driven directly against the pool."""

from __future__ import annotations

import itertools
import random

import pytest

from gpu_pool.arena import ArenaFull, RangeAllocator
from gpu_pool.placement import kv_pages, placement_victims
from gpu_pool.slots import SlotTable


def _layout(sizes: dict[str, int], holes: list[str], capacity: int, align: int = 1):
    """Allocate `sizes` in order, then free the names in `holes`: (allocator, slots by name)."""
    a = RangeAllocator(capacity, align)
    slots = {n: a.allocate(b, n) for n, b in sizes.items()}
    for n in holes:
        a.free(slots.pop(n))
    return a, {n: (s.offset, s.nbytes) for n, s in slots.items()}


def _evict_and_allocate(a: RangeAllocator, victims: list[str], need: int) -> None:
    for s in a.slots():
        if s.tag in victims:
            a.free(s)
    a.allocate(need)  # raises ArenaFull if the victims did not make a contiguous range


def test_fits_now_evicts_nothing_and_a_prefetch_without_order_is_skipped():
    # [A 10][free 10][B 10][free 10][C 10]: 20 free bytes, no run of 15
    a, slots = _layout({"A": 10, "h1": 10, "B": 10, "h2": 10, "C": 10}, ["h1", "h2"], 50)
    assert placement_victims(a.free_runs(), slots, 10, 1, None, ["A"]) == []
    assert placement_victims(a.free_runs(), slots, 15, 1, None, [], blocking=False) is None
    assert placement_victims(a.free_runs(), slots, 15, 1, ["A", "B", "C"], blocking=False) == ["A"]
    assert placement_victims(a.free_runs(), slots, 15, 1, ["C", "B"], blocking=False) == ["C"]


def test_lru_fallback_evicts_in_order_until_it_fits_even_models_that_do_not_help():
    # [A 10][B 10][free 10][C 10][D 10]; a load of 25. LRU order A, D, B: A borders no free run (it is
    # evicted anyway, as the retry loop did), D neither, B joins A's hole with the free run: 30 contiguous.
    a, slots = _layout({"A": 10, "B": 10, "h": 10, "C": 10, "D": 10}, ["h"], 50)
    v = placement_victims(a.free_runs(), slots, 25, 1, None, ["A", "D", "B", "C"])
    assert v == ["A", "D", "B"]
    _evict_and_allocate(a, v, 25)


def test_window_takes_the_cheapest_contiguous_window():
    # [A 10][free 10][B 10][C 10][free 10][D 10], need 20. Order (preferred victim first): D, A, C, B.
    # Windows: A+free (worst rank 1), free+B (3), C+free (2), free+D (0): D goes, only D.
    a, slots = _layout({"A": 10, "h1": 10, "B": 10, "C": 10, "h2": 10, "D": 10}, ["h1", "h2"], 60)
    order = ["D", "A", "C", "B"]
    assert placement_victims(a.free_runs(), slots, 20, 1, order) == ["D"]
    # D protected (not in the order): A is next cheapest
    assert placement_victims(a.free_runs(), slots, 20, 1, ["A", "C", "B"]) == ["A"]
    # a slot outside the order breaks windows: with A and D protected, C (next to a free run) beats B
    assert placement_victims(a.free_runs(), slots, 20, 1, ["C", "B"]) == ["C"]
    # nothing allowed to go makes room: a prefetch is skipped, a load falls back to LRU
    assert placement_victims(a.free_runs(), slots, 35, 1, ["A"], blocking=False) is None
    assert placement_victims(a.free_runs(), slots, 35, 1, ["A"], ["B", "C", "D"]) == ["B", "C"]


def test_window_respects_alignment():
    # align 8: [A 8][free 8][B 8][free 8] needs 16 aligned. A+free or free+B both work; B is preferred.
    a, slots = _layout({"A": 8, "h1": 8, "B": 8, "h2": 8}, ["h1", "h2"], 32, align=8)
    assert placement_victims(a.free_runs(), slots, 16, 8, ["B", "A"]) == ["B"]
    _evict_and_allocate(a, ["B"], 16)


@pytest.mark.parametrize("seed", range(30))
def test_window_is_the_cheapest_subset_that_makes_room(seed):
    """Against brute force over all subsets of the allowed models: the chosen victims make a contiguous range,
    and no subset that does has an earlier worst victim (then fewer bytes)."""
    rng = random.Random(seed)
    align = rng.choice([1, 4])
    names = [f"m{i}" for i in range(7)]
    sizes = {n: rng.choice([4, 8, 12, 20]) for n in names}
    cap = sum(sizes.values()) + rng.choice([0, 4, 8])
    holes = rng.sample(names, 2)
    a, slots = _layout(sizes, holes, cap, align)
    held = [n for n in names if n in slots]
    order = rng.sample(held, rng.randint(1, len(held)))
    need = rng.choice([12, 20, 28, 36])
    rank = {n: i for i, n in enumerate(order)}

    def works(sub) -> bool:
        b, _ = _layout(sizes, holes, cap, align)
        for s in b.slots():
            if s.tag in sub:
                b.free(s)
        return b.can_allocate(need)

    best = None
    for k in range(len(order) + 1):
        for sub in itertools.combinations(order, k):
            if works(sub):
                key = (max((rank[n] for n in sub), default=-1), sum(sizes[n] for n in sub))
                best = key if best is None or key < best else best
    v = placement_victims(a.free_runs(), slots, need, align, order, blocking=False)
    if best is None:
        assert v is None
        return
    assert v is not None and set(v) <= set(order) and works(set(v))
    assert (max((rank[n] for n in v), default=-1), sum(sizes[n] for n in v)) == best


def test_kv_pages_as_the_pool_carves_them():
    assert kv_pages(4 * 10**9, 57344) == (917504, 4359)  # qwen2-7b bf16: 16 tokens a page
    assert kv_pages(100, 3, block_tokens=16) == (256, 0)
    assert kv_pages(10_000, 3, page_bytes=1000) == (1000, 10)


def test_slot_table_claims_takes_and_frees():
    """In units of 1: KV region [0, 4) (2 pages of 2), then A, B, C of 4 each, and 4 free at the end."""
    t = SlotTable(RangeAllocator(20, 1), kv_bytes=4, page_bytes=2)
    assert t.carve_kv(1).nbytes == 4 and (t.kv_pages, t.kv_usable, t.weight_capacity) == (2, 2, 16)
    evicted = []

    def evict(name):
        evicted.append(name)
        t.free(name)

    for n in "ABC":
        assert t.claim(n, 4, evict) == []
    t.take("B", 1.0)
    t.take("A", 2.0)
    t.take("B", 3.0)  # the first time stays: B was taken before A
    assert t.lru() == ["B", "A"] and t.lru({"B"}) == ["A"]  # C is a prefetch in flight: never a fallback victim
    assert t.claim("D", 8, evict, blocking=False) is None and "D" not in t.slots  # a prefetch without an order
    assert t.claim("D", 8, evict, order=["C"], blocking=False) == ["C"] and evicted == ["C"]  # [12, 20) free
    assert t.claim("E", 4, evict, protect=["B"]) == ["A"] and t.slots["E"].offset == 4 and evicted == ["C", "A"]
    assert t.lru() == ["B"] and t.free("nobody") is None
    with pytest.raises(ArenaFull):  # evicting B (the only model taken) leaves no run of 8: nothing goes
        t.claim("F", 8, evict)
    assert evicted == ["C", "A"] and set(t.slots) == {"B", "D", "E"}
    with pytest.raises(ValueError, match="fewer than 2 pages"):
        SlotTable(RangeAllocator(20, 1), kv_bytes=3, page_bytes=2).carve_kv(1)


def test_a_slot_goes_back_to_an_offset_its_size_held(monkeypatch):
    """Best fit would put D right after X, at the start of the one free run; D's size held offset 8 before, where
    the CUDA graphs captured for that size replay, so it goes there (TOKENPOOL_GRAPH_HOMES=0: best fit)."""
    from gpu_pool import slots

    for homes, want in ((True, 8), (False, 6)):
        monkeypatch.setattr(slots, "GRAPH_HOMES", homes)
        t = SlotTable(RangeAllocator(20, 1), kv_bytes=4, page_bytes=2)
        t.carve_kv(1)  # [0, 4)
        assert t.claim("A", 4, t.free) == [] and t.claim("B", 4, t.free) == []  # A [4, 8), B [8, 12)
        t.free("A")
        t.free("B")
        assert t.claim("X", 2, t.free) == [] and t.slots["X"].offset == 4  # another size: best fit
        assert t.claim("D", 4, t.free) == [] and t.slots["D"].offset == want
        assert t.homes[4] == [4, 8] + ([] if homes else [6])


def _pool(make_tiny, host_cache, align=64 << 10):
    import torch

    from model_swapper.model_config import ModelConfig
    from token_scheduler.residency import ModelPool

    pool = ModelPool("cpu", gpu_budget=6 << 20, kv_cache_gb=64 * 16 * 512 / 1e9, host_cache=host_cache, align=align)
    for arch in ("qwen2", "llama", "qwen3"):  # slots of 22, 38 and 24 units of 64 KiB
        d = make_tiny(arch)
        for k in "ab":
            pool.register(f"{arch}-{k}", d, ModelConfig.from_pretrained(d), torch.float32, 64)
    return pool


@pytest.mark.parametrize("seed", range(4))
def test_slot_table_places_exactly_as_the_real_pool(make_tiny, host_cache, seed):
    """The same loads, prefetches and evictions on ModelPool (CPU) and on a SlotTable of its own (as the
    simulator drives it) give the same slots, the same forced evictions and the same skipped prefetches, with
    and without a policy order: the pool's tensors, copies and host copies follow its table."""
    pool = _pool(make_tiny, host_cache)
    names = list(pool.entries)
    nbytes = {n: pool.entries[n].host.nbytes for n in names}
    sim = SlotTable(RangeAllocator(pool.arena.capacity, pool.arena.alloc.align), pool.kv_bytes)
    sim.carve_kv(512)  # the first model's (qwen2) fp32 KV bytes per token
    assert sim.kv_slot.nbytes == pool.slot_table.kv_slot.nbytes and sim.weight_capacity == pool.weight_capacity
    rng = random.Random(seed)
    forced = skipped = 0
    for t in range(200):
        name = rng.choice(names)
        held = [n for n in names if n in sim.slots and n != name]
        order = rng.sample(held, len(held)) if rng.random() < 0.5 else None
        op = rng.random()
        if op < 0.3:
            pool.evict(name)
            sim.free(name)
        elif op < 0.65:  # a step of `name`: MultiModelEngine calls load unless its weights are resident
            if pool.entries[name].resident is None:
                protect = (rng.choice(names),)
                if name in sim.slots:
                    pool.load(name, protect=protect, order=order)
                    sim.take(name, float(t))
                else:
                    try:  # nothing the fallback may evict (prefetches in flight are not) makes room: both raise
                        forced += len(sim.claim(name, nbytes[name], sim.free, order, protect))
                        sim.take(name, float(t))
                    except ArenaFull:
                        with pytest.raises(ArenaFull):
                            pool.load(name, protect=protect, order=order)
                    else:
                        pool.load(name, protect=protect, order=order)
        else:
            ok = pool.prefetch(name, order=order)
            if name in sim.slots:
                assert ok
            else:
                v = sim.claim(name, nbytes[name], sim.free, order, blocking=False)
                assert ok == (v is not None)
                forced += len(v or ())
                skipped += v is None
        real = {n: (e.resident or e.prefetch).slot.offset for n, e in pool.entries.items() if pool.holds(n)}
        assert real == {n: s.offset for n, s in sim.slots.items()}, t
        assert pool.stats.forced_evictions == forced and pool.stats.prefetch_skipped == skipped, t
    assert forced > 0 and skipped > 0  # the sequence did hit fragmentation
    pool.close()


def test_pool_load_and_prefetch_under_fragmentation(make_tiny, host_cache):
    """In 64 KiB units: KV [0, 8), weight space [8, 96); slots qwen2 22, llama 38, qwen3 24."""
    pool = _pool(make_tiny, host_cache)
    u = 64 << 10

    def where():
        return {n: (e.resident or e.prefetch).slot.offset // u for n, e in pool.entries.items() if pool.holds(n)}

    pool.load("llama-a")
    pool.load("llama-b")
    assert where() == {"llama-a": 8, "llama-b": 46}  # free: [84, 96)
    pool.load("qwen2-a")  # 22 > 12 free: the fallback evicts the least recently used model
    assert where() == {"qwen2-a": 8, "llama-b": 46} and pool.stats.forced_evictions == 1
    # free [30, 46) and [84, 96): 28 units, no run of 24
    assert not pool.prefetch("qwen3-a") and not pool.prefetch("qwen3-a", order=[])
    assert pool.stats.prefetch_skipped == 2 and pool.stats.forced_evictions == 1
    # llama-b preferred over qwen2-a: its window [30, 96) goes, although qwen2-a's [8, 46) is fewer bytes
    assert pool.prefetch("qwen3-a", order=["llama-b", "qwen2-a"])
    assert where() == {"qwen2-a": 8, "qwen3-a": 30} and pool.stats.forced_evictions == 2
    pool.close()
