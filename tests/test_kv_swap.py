"""KV swap: host block allocator properties and bit-exact round trips on CPU."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model_swapper.kv_swap import HostBlockAllocator, HostKVFull, HostKVPool, KVSwapper, paired_runs, runs

BLOCK = (3, 2, 4, 2, 8)  # [num_layers, 2, block_size, kv_heads, head_dim]


@settings(max_examples=150, deadline=None)
@given(n_blocks=st.integers(0, 200), seq=st.lists(st.tuples(st.booleans(), st.integers(1, 60)), max_size=50))
def test_host_block_allocator(n_blocks, seq):
    a = HostBlockAllocator(n_blocks)
    live: list[list[int]] = []
    for is_alloc, n in seq:
        if is_alloc:
            if n > a.num_free:
                with pytest.raises(HostKVFull):
                    a.allocate(n)
                continue
            contiguous_possible = a._free.largest >= n
            ids = a.allocate(n)
            assert len(ids) == n and len(set(ids)) == n
            if contiguous_possible:
                assert ids == list(range(ids[0], ids[0] + n))  # one memcpy on the host side
            live.append(ids)
        elif live:
            a.free(live.pop(n % len(live)))
        used = [i for ids in live for i in ids]
        assert len(used) == len(set(used)) and all(0 <= i < n_blocks for i in used)
        assert a.num_free + len(used) == n_blocks
    for ids in live:
        a.free(ids)
    assert a._free.runs() == ([(0, n_blocks)] if n_blocks else [])


def test_double_free_rejected():
    a = HostBlockAllocator(8)
    ids = a.allocate(3)
    a.free(ids)
    with pytest.raises(ValueError):
        a.free(ids)


def test_runs():
    assert runs([3, 4, 5, 9, 10, 2]) == [(3, 3), (9, 2), (2, 1)]
    assert paired_runs([1, 2, 3, 7], [10, 11, 5, 6]) == [(1, 10, 2), (3, 5, 1), (7, 6, 1)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("direct_min_bytes,staging", [(1 << 40, 16), (1 << 40, 7), (0, 16), (1 << 40, 0)])
def test_round_trip_bit_exact(dtype, direct_min_bytes, staging):
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(128, *BLOCK, generator=g).to(dtype)
    kv.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)[0, 0, 0, 0, 0, :2] = -1  # NaN bit patterns
    pool = HostKVPool.like(kv, 96, pin=False)
    sw = KVSwapper(kv, pool, staging_blocks=staging, direct_min_bytes=direct_min_bytes)
    rng = random.Random(1)
    for n in (1, 40, 64):
        src = rng.sample(range(128), n)
        want = kv[src].clone()
        host_ids, h = sw.swap_out(src)
        h.wait()
        h.synchronize()
        assert h.done() and len(host_ids) == n and pool.allocator.num_free == 96 - n
        kv[src] = 0
        dst = rng.sample(range(128), n)
        sw.swap_in(host_ids, dst).synchronize()
        assert pool.allocator.num_free == 96
        got = kv[dst]
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))  # bit-exact, NaNs included


def test_contiguous_blocks_take_the_direct_path():
    kv = torch.arange(16 * 4, dtype=torch.float32).view(16, 4, 1, 1, 1, 1)
    pool = HostKVPool.like(kv, 16, pin=False)
    sw = KVSwapper(kv, pool, staging_blocks=4, direct_min_bytes=0)
    sw.staging.fill_(-7)
    ids, _ = sw.swap_out(list(range(4, 12)))
    assert ids == list(range(8))
    assert torch.equal(pool.blocks[:8], kv[4:12]) and bool((sw.staging == -7).all())  # staging untouched


def test_shortage_and_mismatch_raise():
    kv = torch.zeros(8, *BLOCK)
    pool = HostKVPool.like(kv, 4, pin=False)
    sw = KVSwapper(kv, pool)
    with pytest.raises(HostKVFull, match="need 5 blocks, 4 free"):
        sw.swap_out(list(range(5)))
    assert pool.allocator.num_free == 4  # nothing half-allocated
    with pytest.raises(ValueError, match="do not match"):
        KVSwapper(torch.zeros(8, 1, 2, 3), pool)
    with pytest.raises(ValueError):
        sw.swap_in([0], [1, 2])
    pool.close()
