"""Preemption when the host KV pages are short: the victim is the cheapest outcome (a request whose KV fits the host
pages left is swapped out before one whose KV would be dropped; among those dropped, the one with the fewest tokens to
recompute), counted by the engine's counters -- and every request's tokens are those it makes served alone."""

from __future__ import annotations

import random

import pytest

from tests.torch_threads import one_torch_thread  # noqa: F401 (autouse: one torch thread)
from token_scheduler import LLMEngine, SamplingParams
from token_scheduler.cost_model import CostModel, HardwareProfile, ModelSize
from token_scheduler.engine import EngineConfig
from token_scheduler.policies.memory import make_room
from token_scheduler.policies.slo import ModelSLO
from token_scheduler.policies.state import ModelState, PoolState, Residency
from token_scheduler.request import Request, RequestStatus


def _engine(d, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(d), device="cpu", dtype="fp32", **kw))


def _jobs() -> list[tuple[str, list[int], SamplingParams]]:
    """A, B, C start together and fill 8 blocks of 16 exactly (1 + 2 + 5); A's 17th token needs a block. The newest,
    C, holds 5 blocks (71 tokens computed then), B 2 (18): B fits 2 host pages, C does not."""
    rng = random.Random(3)

    def toks(n):
        return [rng.randrange(0, 3900) for _ in range(n)]

    def greedy(n):
        return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)

    return [("A", toks(15), greedy(30)), ("B", toks(17), greedy(30)), ("C", toks(70), greedy(8))]


def _serve(eng: LLMEngine, jobs) -> dict[str, list[int]]:
    for rid, prompt, sp in jobs:
        eng.add_request(rid, prompt, sp)
    done = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
    return done


@pytest.fixture(scope="module")
def alone(make_varied):
    d = make_varied("qwen2")
    return d, {rid: _serve(_engine(d), [(rid, p, sp)])[rid] for rid, p, sp in _jobs()}


@pytest.mark.parametrize("host_blocks,dropped", [(2, 0), (0, 18)])
def test_victim_is_the_cheapest_outcome(alone, host_blocks, dropped):
    """2 host pages: B is swapped out (C's KV, the newest's, would have been dropped: 71 tokens to recompute); none:
    B's 18 computed tokens are dropped, not C's 71. Tokens as served alone either way; no page left held."""
    d, want = alone
    eng = _engine(d, num_kv_blocks=8, num_host_kv_blocks=host_blocks)
    swapped = []
    execute = eng.runner.execute

    def spy(out, *a, **k):
        swapped.extend(r for r in out.preempted if eng.scheduler.requests[r].status is RequestStatus.SWAPPED)
        return execute(out, *a, **k)

    eng.runner.execute = spy
    assert _serve(eng, _jobs()) == want
    st = eng.stats()
    assert st["num_preemptions"] == 1
    assert st["kv_tokens_dropped"] == dropped and st["num_kv_dropped"] == (1 if dropped else 0)
    assert swapped == (["B"] if host_blocks else [])
    assert eng.scheduler.kv.num_used == 0 and (not host_blocks or eng.scheduler.host_kv.num_used == 0)


def _req(rid: str, computed: int) -> Request:
    r = Request(rid, list(range(1, computed + 2)), SamplingParams(max_tokens=4), model="b")
    r.num_computed_tokens, r.status = computed, RequestStatus.RUNNING
    return r


@pytest.mark.parametrize("host,need,want,used", [(None, 16, ["b3"], 0), (4, 16, ["b2"], 4), (1, 16, ["b1"], 1),
                                                 (0, 16, ["b1"], 0), (2, 80, ["b1", "b2"], 1)])
def test_make_room_counts_the_host_pages_left(host, need, want, used):
    """Another model's KV swapped out to make room (a pooled KV region): its request whose KV fits the host pages left
    goes first (the newest such), else the least to recompute; the pages taken are counted for the swap-outs after
    (2 pages: b1 takes one, and b2's 4 blocks no longer fit the one left, but it has less to recompute than b3). Not
    counted (None): the newest, as before."""
    def spec(name):
        return ModelSize(name, weight_bytes=100, kv_bytes_per_token=1, flops_per_token=1.0, attn_flops_per_pair=1.0)

    a = ModelState(spec("a"), ModelSLO(), residency=Residency.RESIDENT)
    b = ModelState(spec("b"), ModelSLO(), residency=Residency.RESIDENT, kv_block_tokens=16, host_kv_free=host)
    b.running = [_req("b1", 10), _req("b2", 60), _req("b3", 100)]  # 1, 4 and 7 blocks; b3 the newest
    b.kv_gpu_tokens = 12 * 16
    flat = HardwareProfile("flat", 1e30, 1e30, 1e30, 1e30, 0.01, 0.0, 0.1, 0.0)
    st = PoolState({"a": a, "b": b}, capacity_bytes=10_000, kv_capacity_bytes=12 * 16,
                   cost=CostModel(flat, [a.spec, b.spec]))
    room = make_room(st, need, ["b"], weights_too=False)
    assert [r.request_id for r in room.swap_out] == want and room.host_used == used


def test_pooled_engine_reports_the_host_pages_and_overflows_them_unchanged(make_tiny, host_cache):
    """Two models on one pooled KV region of 14 pages and 3 host pages: plans preempt more KV than the host holds
    (some swapped out, some dropped). Before every plan each model's state has the shared host pool's free pages
    (what the policy chooses victims by), and every request's tokens are those it makes alone."""
    from gpu_pool.arena import MiB
    from token_scheduler.multi_engine import MultiModelEngine

    paths = {a: make_tiny(a) for a in ("qwen2", "qwen3")}
    prompts = ["the quick brown fox", "hello", "a b c d e f g h i j k l m n o p", "tokens, one by one"]

    def sp(i):
        return SamplingParams(temperature=0, max_tokens=10 + i, ignore_eos=True)

    alone = {}
    for a, p in paths.items():
        eng = _engine(p)
        alone.update({f"{a}/{k}": v for k, v in _serve(eng, [(f"r{i}", q, sp(i)) for i, q in enumerate(prompts)]).items()})
    page = 16 * 512
    multi = MultiModelEngine(dict(paths.items()), policy="token", device="cpu", gpu_budget=6 * MiB,
                             kv_cache_gb=14 * page / 1e9, host_kv_gb=3 * page / 1e9, host_cache=host_cache,
                             policy_kw={"max_round_s": 0.0})
    host = next(iter(multi.engines.values())).scheduler.host_kv
    seen = []
    schedule = multi.policy.schedule

    def spy(st):
        seen.append({n: m.host_kv_free for n, m in st.models.items()} == dict.fromkeys(st.models, host.num_free))
        return schedule(st)

    multi.policy.schedule = spy
    for k in range(3):
        for i, q in enumerate(prompts):
            for a in paths:
                multi.add_request(f"{a}/r{i}.{k}", q, sp(i), model=a)
    done = {}
    while multi.has_unfinished_requests():
        for o in multi.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
    assert done == {f"{a}/r{i}.{k}": alone[f"{a}/r{i}"] for a in paths for i in range(4) for k in range(3)}
    st = {n: e.stats() for n, e in multi.engines.items()}
    assert seen and all(seen)
    assert multi.kv_swapped_out > 0 and sum(s["num_kv_dropped"] for s in st.values()) > 0, st
    assert host.num_used == 0
    multi.close()
