"""KV block allocator and the batch scheduler driven without a model (pure Python)."""

from __future__ import annotations

import random

import pytest

from token_scheduler.block_manager import BlockAllocator, NoFreeBlocks
from token_scheduler.policies.batching import BatchLimits
from token_scheduler.request import Request, SamplingParams
from token_scheduler.scheduler import BatchScheduler


def test_allocator_shortage_raises_and_double_free_is_caught():
    a = BlockAllocator(4, 16)
    got = a.allocate(3)
    with pytest.raises(NoFreeBlocks):
        a.allocate(2)
    assert a.num_free == 1  # a failed allocate changes nothing
    a.free(got)
    with pytest.raises(ValueError):
        a.free(got[:1])
    assert a.num_free == 4


def test_views_of_a_shared_pool_count_their_own_blocks():
    """Views draw from one free list; each counts what was drawn through it (a model's share of a shared KV
    region, read every step by the multi-model engine instead of summing its requests' blocks)."""
    pool = BlockAllocator(12, 1)
    a, b = pool.share(16), pool.share(32)
    got_a, got_b = a.allocate(3), b.allocate(4)
    a.grow(got_a, 16 * 5)  # two more blocks
    assert (a.num_held, b.num_held, pool.num_held) == (5, 4, 0) and pool.num_used == 9
    with pytest.raises(NoFreeBlocks):
        b.allocate(1 + pool.num_free)
    assert b.num_held == 4  # a failed allocate changes nothing
    a.free(got_a[:2])
    b.free(got_b)
    assert (a.num_held, b.num_held, pool.num_free) == (3, 0, 9)


def test_no_leaks_after_1000_random_requests_with_aborts():
    rng = random.Random(0)
    kv, host = BlockAllocator(64, 16), BlockAllocator(32, 16)
    s = BatchScheduler(BatchLimits(max_seqs=16, max_tokens=256), kv, host)
    made = 0
    finished = 0
    while made < 1000 or s.has_unfinished():
        for _ in range(rng.randrange(0, 4)):
            if made < 1000:
                p = [1] * rng.randrange(1, 200)
                s.add(Request(f"q{made}", p, SamplingParams(max_tokens=rng.randrange(1, 60), ignore_eos=True)))
                made += 1
        if s.requests and rng.random() < 0.15:
            s.abort(rng.choice(list(s.requests)))
        out = s.schedule()
        # Every scheduled chunk has its KV blocks; no block is owned twice.
        owned = [b for r in s.running for b in r.block_ids]
        assert len(owned) == len(set(owned)) == kv.num_used == kv.num_held
        for c in out.chunks:
            assert len(c.request.block_ids) * 16 >= c.start + c.num_tokens
        sampled = {c.request.request_id: 7 for c in out.chunks if c.sample}
        for r in s.update(out, sampled):
            finished += r.finished
    assert kv.num_used == 0 and host.num_used == 0 and kv.num_free == 64
    assert finished > 0


def test_request_too_large_for_pool_is_rejected():
    s = BatchScheduler(BatchLimits(), BlockAllocator(2, 16))
    with pytest.raises(ValueError, match="pool holds 32"):
        s.add(Request("big", [1] * 20, SamplingParams(max_tokens=20)))


def test_a_schedulers_stats_count_its_own_blocks_of_a_shared_pool():
    """`tokenpool_kv_blocks_used{model}` comes from each model's scheduler stats: on a pooled engine the models'
    allocators are views of one KV region, and each model showed the whole region's blocks in use (3 models with 3,
    6 and 6 pages each said 15)."""
    pool = BlockAllocator(64, 1)
    scheds = [BatchScheduler(BatchLimits(max_seqs=4, max_tokens=256), pool.share(16), model=m) for m in "abc"]
    for s, n in zip(scheds, (1, 2, 3)):
        for i in range(n):
            s.add(Request(f"{s.model}{i}", [1] * 20, SamplingParams(max_tokens=4, ignore_eos=True)))  # 2 blocks each
        s.schedule()
    used = [s.stats()["kv_blocks_used"] for s in scheds]
    assert used == [2, 4, 6] and sum(used) == pool.num_used, used
    assert all(s.stats()["kv_blocks_total"] == 64 for s in scheds)
