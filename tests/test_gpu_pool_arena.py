"""VRAM arena and free list: plain-Python allocation invariants (property tests) and tensor views on CPU."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_pool.arena import Arena, ArenaFull, ArenaTooSmall, RangeAllocator, parse_budget
from gpu_pool.freelist import FreeList

ops = st.lists(st.one_of(st.tuples(st.just("alloc"), st.integers(1, 9000)),
                         st.tuples(st.just("free"), st.integers(0, 1000))), max_size=80)


def check_invariants(a: RangeAllocator) -> None:
    slots = a.slots()
    for s in slots:
        assert s.offset % a.align == 0 and s.nbytes % a.align == 0
        assert 0 <= s.offset and s.offset + s.nbytes <= a.capacity
    for x, y in zip(slots, slots[1:], strict=False):
        assert x.offset + x.nbytes <= y.offset, "overlap"
    runs = a._free.runs()
    for (s1, n1), (s2, _) in zip(runs, runs[1:], strict=False):
        assert s1 + n1 < s2, "adjacent free runs were not coalesced"
    free_ranges = [(s, s + n) for s, n in runs]
    for s in slots:
        for f0, f1 in free_ranges:
            assert s.offset + s.nbytes <= f0 or f1 <= s.offset, "a slot overlaps free space"
    assert a.free_bytes + sum(s.nbytes for s in slots) == a.capacity, "leak"


@settings(max_examples=150, deadline=None)
@given(capacity=st.integers(0, 40000), align=st.sampled_from([1, 256, 1024]), seq=ops)
def test_range_allocator_random_sequences(capacity, align, seq):
    a = RangeAllocator(capacity, align)
    live = []
    for op, n in seq:
        if op == "alloc":
            could = a.can_allocate(n)
            try:
                live.append(a.allocate(n))
                assert could
            except ArenaTooSmall as e:
                assert -(-n // align) * align > capacity and e.needed > capacity
            except ArenaFull as e:
                assert not could and e.free == a.free_bytes
        elif live:
            a.free(live.pop(n % len(live)))
        check_invariants(a)
    for s in live:
        a.free(s)
    assert a._free.runs() == ([(0, capacity)] if capacity else [])  # everything coalesced back


def test_errors_name_needed_and_free_bytes():
    a = RangeAllocator(10 << 20, align=1 << 20)
    with pytest.raises(ArenaTooSmall, match=r"never fit"):
        a.allocate(11 << 20, tag="big-model")
    s1 = a.allocate(4 << 20)
    a.allocate(4 << 20)
    a.free(s1)  # 6 MiB free in two runs of 4 and 2
    with pytest.raises(ArenaFull) as ei:
        a.allocate(5 << 20, tag="m")
    assert ei.value.needed == 5 << 20 and ei.value.free == 6 << 20 and ei.value.largest_free == 4 << 20
    assert "free now" in str(ei.value) and str(6 << 20) in str(ei.value)


def test_best_fit_and_coalescing():
    a = RangeAllocator(100, align=1)
    s = [a.allocate(10) for _ in range(10)]
    a.free(s[1])
    a.free(s[5])
    a.free(s[6])  # free runs: [10,20) and [50,70)
    assert a.allocate(10).offset == 10  # best fit takes the exact hole, not the bigger one
    a.free(s[4])
    assert a._free.runs() == [(40, 30)]


def test_freelist_double_free_and_take_upto():
    f = FreeList(10)
    assert f.take(4) == 0
    with pytest.raises(ValueError, match="double free"):
        f.give(5, 2)
    f.give(0, 4)
    with pytest.raises(ValueError):
        f.give(0, 1)
    assert f.take_upto(100) == (0, 10) and f.free == 0 and f.take_upto(1) is None


def test_freelist_take_at_takes_exactly_that_range_or_nothing():
    f = FreeList(10)
    assert f.take_at(3, 4) and f.runs() == [(0, 3), (7, 3)] and f.free == 6  # inside a run: split in two
    assert not f.take_at(2, 2) and not f.take_at(6, 2) and not f.take_at(8, 3)  # overlaps a taken or the end
    assert f.runs() == [(0, 3), (7, 3)] and f.free == 6  # a refused take changes nothing
    assert f.take_at(0, 3) and f.take_at(9, 1) and f.runs() == [(7, 2)] and f.free == 2  # whole run, run's end
    f.give(3, 4)
    assert f.runs() == [(3, 6)]
    with pytest.raises(ValueError):
        f.take_at(3, 0)


def free_ranges_hold(a: RangeAllocator, off: int, n: int) -> bool:
    return any(s <= off and off + n <= s + length for s, length in a.free_runs())


@settings(max_examples=150, deadline=None)
@given(seq=st.lists(st.tuples(st.sampled_from(["alloc", "free"]), st.integers(1, 30), st.integers(0, 1000)),
                    max_size=80))
def test_allocate_prefers_the_first_free_preferred_offset(seq):
    """Weight slots go back to offsets their size held (their CUDA graphs replay there): the first preferred
    offset whose range is free wins, else best fit, and the allocator's invariants hold either way."""
    a = RangeAllocator(200, 1)
    live, seen = [], {}
    for op, n, r in seq:
        if op == "alloc":
            prefer = seen.get(n, [])[r % 3:]  # a tail of the offsets this size held
            want = next((o for o in prefer if free_ranges_hold(a, o, n)), None)
            try:
                slot = a.allocate(n, prefer=prefer)
            except ArenaFull:
                assert want is None and not a.can_allocate(n)
            else:
                assert want is None or slot.offset == want
                seen.setdefault(n, []).append(slot.offset)
                live.append(slot)
        elif live:
            a.free(live.pop(r % len(live)))
        check_invariants(a)


def test_arena_views_alias_the_buffer_without_allocating():
    arena = Arena(8 << 20, "cpu", align=256)
    slot = arena.allocate(4096, tag="w")
    v = arena.view(slot.offset + 256, (4, 8), torch.float32)
    v.fill_(2.5)
    assert v.data_ptr() == arena.data_ptr(slot) + 256
    assert v.untyped_storage().data_ptr() == arena.buffer.untyped_storage().data_ptr()
    back = arena.slot_bytes(slot)[256:256 + 128].view(torch.float32)
    assert torch.equal(back, torch.full((32,), 2.5))
    with pytest.raises(ValueError, match="outside"):
        arena.view(arena.capacity - 4, (2,), torch.float32)
    with pytest.raises(ValueError, match="aligned"):
        arena.view(2, (2,), torch.float32)
    arena.free(slot)
    with pytest.raises(ValueError):
        arena.free(slot)


def test_parse_budget():
    total = 80 * 2**30
    assert parse_budget(1234, total) == 1234
    assert parse_budget("40GB", total) == 40 * 10**9
    assert parse_budget("40GiB", total) == 40 * 2**30
    assert parse_budget("512MiB", total) == 512 * 2**20
    assert parse_budget(0.5, total) == total // 2
    assert parse_budget("0.25", total) == total // 4
    for bad in ("lots", 1.5, -3):
        with pytest.raises(ValueError):
            parse_budget(bad, total)
    assert Arena.reserve("2MiB", "cpu").capacity == 2 << 20
    from gpu_pool.inventory import host_memory_bytes

    assert Arena.reserve(0.0001, "cpu").capacity == int(0.0001 * host_memory_bytes())
