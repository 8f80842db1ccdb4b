"""The preemption victim where every candidate's KV must be dropped (no host room): the one with the fewest tokens to
recompute -- its computed tokens less those in full blocks it offered the prefix cache, which its restart finds there
(`Request.kv_tokens_recomputed`). It was the fewest computed tokens, counting cached blocks the restart does not
recompute (load_tests.bench_preempt 24 GPU blocks, no host pages: 70 tokens recomputed, now 32)."""

from __future__ import annotations

from token_scheduler.block_manager import BlockAllocator
from token_scheduler.policies.batching import BatchLimits
from token_scheduler.request import Request, SamplingParams
from token_scheduler.scheduler import BatchScheduler


def _step(s: BatchScheduler):
    out = s.schedule()
    s.update(out, {c.request.request_id: 7 for c in out.chunks if c.sample})
    return out


def test_the_victim_is_the_one_with_least_to_recompute():
    """x (32 tokens), a (48: three full blocks, all cached) and b (20: 4 tokens past its cached block) fill 7 blocks of
    16; x's next token needs an eighth. Dropped, a would recompute 1 token (its restart takes its 3 cached blocks) and b
    4: a goes, where b (fewer computed tokens) went; the run computes 125 tokens in all, 129 before."""
    s = BatchScheduler(BatchLimits(max_seqs=8, max_tokens=256), BlockAllocator(7, 16), prefix_caching=True)
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for rid, n, first in (("x", 32, 100), ("a", 48, 200), ("b", 20, 300)):
        s.add(Request(rid, list(range(first, first + n)), sp))
    _step(s)  # the three prefills
    a, b = s.requests["a"], s.requests["b"]
    assert (a.num_computed_tokens, a.kv_tokens_recomputed, b.num_computed_tokens, b.kv_tokens_recomputed) == (48, 0, 20, 4)
    out = _step(s)
    assert out.preempted == ["a"] and s.kv_tokens_dropped == 48
    computed = {"x": 0, "a": 0, "b": 0}
    while s.has_unfinished():
        for c in _step(s).chunks:
            computed[c.request.request_id] += c.num_tokens
    # a's restart found two of its blocks (x's growth took the third's): 17 tokens computed again, and its outputs;
    # b dropped (the old rule) computed all its 20 again, its cached block taken the same way
    assert computed == {"x": 2, "a": 17 + 2, "b": 2}
