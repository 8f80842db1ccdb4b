"""Plan-ahead (TOKENPOOL_PLAN_AHEAD): the next step's plan is made while a step's forward runs, and used only while
it is still valid; the tokens are what each model makes alone, and an early plan not used leaves the policy as if
it had never been made."""

from __future__ import annotations

import pytest

from tests.test_multi_engine import (
    ARCHS,
    PROMPTS,
    _alone,
    _alone_one,
    _interleaved_equals_alone,
    _params,
    _submit_rounds,
    _two_models_short_of_kv,
    ran_as_planned,
)
from tests.torch_threads import one_torch_thread  # noqa: F401 (autouse: one torch thread)
from token_scheduler import multi_engine
from token_scheduler.engine import EngineConfig
from token_scheduler.multi_engine import MultiModelEngine
from token_scheduler.policies.state import PoolState
from token_scheduler.request import SamplingParams


@pytest.fixture
def ahead(monkeypatch):
    monkeypatch.setattr(multi_engine, "PLAN_AHEAD", True)


def _ran(multi) -> list[tuple[str, int, int]]:
    """(request id, start, tokens) of the batch the latest step ran."""
    out = multi.engines[multi.trace[-1]].last_out
    return [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks]


@pytest.mark.parametrize("kind,max_round_s", [("greedy", 0.0), ("seeded", 4.0)])
def test_plan_ahead_equals_alone(make_tiny, ahead, kind, max_round_s):
    paths = {a: make_tiny(a) for a in ARCHS}
    alone = {a: _alone(p, kind) for a, p in paths.items()}
    multi = MultiModelEngine(dict(paths.items()), policy="token", device="cpu",
                             policy_kw={"max_round_s": max_round_s})
    _interleaved_equals_alone(multi, alone, kind)
    c = multi.snapshot()["counters"]
    # token by token the early plan is the next model's, which the step did not change: used (a turn of several
    # steps of one model, where a request finishes, is the next tests')
    assert c["ahead_used"] > 0
    assert c["ahead_used"] + c["ahead_discarded"] >= c["steps"] - 1
    assert c["ahead_s"] > 0 and c["ahead_cpu_s"] > 0
    assert multi._ahead is None or multi._ahead[0].model in multi.engines
    if max_round_s == 0.0:
        assert multi.switches >= len(multi.trace) // 2


def pooled_rotating_equals_alone(make_tiny, host_cache) -> MultiModelEngine:
    """Every arch's tiny model pooled on the CPU, token by token, weights rotating through two slots and the shared
    KV pages short (plans evict, swap KV out and in, prefetch), run to the end: every request's tokens are its model's
    alone. The engine, for the caller's checks."""
    from gpu_pool.arena import MiB

    paths = {a: make_tiny(a) for a in ARCHS}
    alone = {a: _alone(p, "greedy") for a, p in paths.items()}
    page = 16 * 512
    multi = MultiModelEngine(dict(paths.items()), policy="token", device="cpu", gpu_budget=6 * MiB,
                             kv_cache_gb=12 * page / 1e9, host_kv_gb=256 * page / 1e9, host_cache=host_cache,
                             policy_kw={"max_round_s": 0.0})
    _interleaved_equals_alone(multi, alone, "greedy")
    return multi


def test_plan_ahead_pooled_swaps_and_equals_alone(make_tiny, host_cache, ahead):
    """Weights rotate through two slots and the shared KV pages run short (the plans evict, swap KV out and in,
    prefetch): those plans are made again at their step; every request's tokens are unchanged, nothing leaks."""
    multi = pooled_rotating_equals_alone(make_tiny, host_cache)
    mem = multi.memory
    assert mem.stats.evictions > 0 and multi.kv_swapped_out > 0 and mem.stats.forced_evictions == 0
    c = multi.snapshot()["counters"]
    assert c["ahead_used"] > 0 and c["ahead_discarded"] > 0
    assert mem.pages.num_used == 0 and mem.host_kv.allocator.num_used == 0
    multi.close()


def test_flag_off_plans_nothing_ahead(make_tiny):
    paths = {a: make_tiny(a) for a in ARCHS[:2]}
    alone = {a: _alone(p, "greedy") for a, p in paths.items()}
    multi = MultiModelEngine(dict(paths.items()), policy="token", device="cpu", policy_kw={"max_round_s": 0.0},
                             plan_ahead=False)
    assert multi_engine.PLAN_AHEAD is True  # the default (TOKENPOOL_PLAN_AHEAD unset in tests): on
    _interleaved_equals_alone(multi, alone, "greedy")
    c = multi.snapshot()["counters"]
    assert c["ahead_used"] == c["ahead_discarded"] == c["ahead_s"] == 0 and multi._ahead is None


def test_checkpoint_restore_undoes_schedule(make_tiny):
    """`schedule` advances the policy (turn steps, the round's queue, counters): a second call is not harmless,
    and restore puts the policy back so that the same call plans the same step again."""
    d = make_tiny("qwen2")
    multi = MultiModelEngine({"a": d, "b": d}, policy="token", device="cpu", policy_kw={"max_round_s": 0.0})
    sp = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    multi.add_request("a0", [1, 2, 3], sp, model="a")
    multi.add_request("b0", [4, 5, 6], sp, model="b")
    for _ in range(3):
        multi.step()
    pol = multi.policy
    multi._sync()
    cp = pol.checkpoint()
    first = pol.schedule(multi.state)
    after_first = pol.checkpoint()
    assert after_first != cp  # schedule changed the policy's state
    second = pol.schedule(multi.state)
    assert pol.checkpoint() != after_first  # and again: calling it twice double-advances
    pol.restore(cp)
    assert pol.checkpoint() == cp
    again = pol.schedule(multi.state)
    assert (again.model, again.batch) == (first.model, first.batch) and pol.checkpoint() == after_first
    assert second.model != first.model  # strict round robin: the second call already took the next turn


def test_a_request_finishing_at_a_step_is_not_run_by_the_early_plan(make_tiny, ahead):
    """The early plan of step N+1 is made before N's tokens are read: a request that finishes at N (its length;
    a stop string found between the steps) is in it, so that plan is not used, and the request does not run."""
    d = make_tiny("qwen2")
    multi = MultiModelEngine({"a": d}, policy="token", device="cpu")
    multi.add_request("short", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    multi.add_request("stop", [4, 5, 6], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    multi.add_request("long", [7, 8, 9], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    finished: set[str] = set()
    stopped = False
    while multi.has_unfinished_requests():
        n = multi.timing["ahead_discarded"]
        outs = multi.step_tokens()
        ran = {rid for rid, _, _ in _ran(multi)}
        assert not ran & finished, ran & finished
        for o in outs:
            if o.status.finished:
                finished.add(o.request.request_id)
                assert multi._ahead is not None and any(r is o.request for r, _ in multi._ahead[0].batch)
        if not stopped and "short" in finished and multi.engines["a"].scheduler.requests.get("stop"):
            # a stop string found between two steps (as detokenize reports them): the early plan holds it
            req = multi.engines["a"].scheduler.requests["stop"]
            multi.stop_requests([(req, "x")])
            finished.add("stop")
            stopped = True
            outs = multi.step_tokens()
            assert "stop" not in {rid for rid, _, _ in _ran(multi)}
            assert multi.timing["ahead_discarded"] > n
    assert finished == {"short", "stop", "long"}
    c = multi.timing
    assert c["ahead_used"] > 0 and c["ahead_discarded"] >= 2


def test_a_prefill_chunk_planned_before_the_step_is_not_reused(make_tiny, ahead):
    """A prompt in chunks of 16 tokens: the plan made beside chunk k still saw chunk k's tokens uncomputed (it
    planned chunk k again); at the next step it is not used, and the chunks run in order, each once."""
    d = make_tiny("qwen2")
    cfg = EngineConfig(model=str(d), device="cpu", max_num_batched_tokens=16)
    multi = MultiModelEngine({"a": cfg}, policy="token", device="cpu")
    prompt = list(range(3, 43))  # 40 tokens: chunks of 16, 16, 8
    sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    multi.add_request("p", prompt, sp)
    steps = []
    done = {}
    while multi.has_unfinished_requests():
        for o in multi.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
        steps.append(_ran(multi))
    assert steps[:3] == [[("p", 0, 16)], [("p", 16, 16)], [("p", 32, 8)]]
    assert all(n == 1 for s in steps[3:] for _, _, n in s)
    assert done["p"] == _alone_one(d, prompt, sp)
    # the plans made beside the first two chunks were stale; the one beside the last chunk (a decode of 1) was not
    assert multi.timing["ahead_discarded"] >= 2 and multi.timing["ahead_used"] >= len(steps) - 4


def test_an_early_plan_short_of_a_kv_block_is_made_again(make_tiny, ahead):
    """Four KV blocks of 16 tokens, two requests of 31-token prompts: full after the prefill. The plan made beside
    the decode of position 31 counted no new block; at its step each request crosses into a third block, which
    the pool does not have -- so that plan is not used, and the fresh one swaps a request out (as without the
    flag). Tokens as alone."""
    d = make_tiny("qwen2")
    multi = MultiModelEngine({"a": d}, policy="token", device="cpu", num_kv_blocks=4, num_host_kv_blocks=16)
    prompt = list(range(5, 36))  # 31 tokens
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for i in range(2):
        multi.add_request(f"r{i}", prompt, sp)
    done = {}
    while multi.has_unfinished_requests():
        for o in multi.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
    alone = _alone_one(d, prompt, sp)
    assert done == {"r0": alone, "r1": alone}
    assert multi.kv_swapped_out > 0 and multi.timing["ahead_discarded"] > 0 and multi.timing["ahead_used"] > 0


def test_removing_the_early_plans_model_drops_the_plan(make_tiny, ahead):
    """remove_model while an early plan for that model is pending: the plan is undone before the policy forgets the
    model (the policy's checkpoint predates it), and the rest runs as alone."""
    paths = {a: make_tiny(a) for a in ARCHS}
    alone = {a: _alone(p, "greedy") for a, p in paths.items()}
    multi = MultiModelEngine(dict(paths.items()), policy="token", device="cpu", policy_kw={"max_round_s": 0.0})
    for i, p in enumerate(PROMPTS):
        for a in paths:
            multi.add_request(f"{a}/r{i}", p, _params("greedy", i), model=a)
    for _ in range(6):
        multi.step()
    assert multi._ahead is not None
    victim = multi._ahead[0].model
    n = multi.timing["ahead_discarded"]
    multi.remove_model(victim)
    assert multi._ahead is None and multi.timing["ahead_discarded"] == n + 1
    pol = multi.policy
    assert victim not in pol._queue and (pol._turn is None or pol._turn.model != victim) and victim not in pol.turns
    done = multi.run()
    assert all(done[f"{victim}/r{i}"].finished for i in range(len(PROMPTS)))  # aborted: final outputs owed
    for a in paths:
        if a != victim:
            for rid, toks in alone[a].items():
                assert done[f"{a}/{rid}"].outputs[0].token_ids == toks
    assert multi.timing["ahead_used"] > 0


def test_an_abort_drops_the_early_plan(make_tiny, ahead):
    """abort_request while an early plan is pending: the plan is undone; the aborted request does not run again and
    its final output comes with the next step."""
    d = make_tiny("qwen2")
    multi = MultiModelEngine({"a": d}, policy="token", device="cpu")
    sp = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    multi.add_request("x", [1, 2, 3], sp)
    multi.add_request("y", [4, 5, 6], sp)
    for _ in range(3):
        multi.step_tokens()
    assert multi._ahead is not None and {r.request_id for r, _ in multi._ahead[0].batch} == {"x", "y"}
    n = multi.timing["ahead_discarded"]
    multi.abort_request("x")
    assert multi._ahead is None and multi.timing["ahead_discarded"] == n + 1
    outs = multi.step_tokens()
    # (a token of x's made before the abort, by a step in flight then (the pipeline), comes first)
    x_ends = [o.status.finish_reason for o in outs if o.request.request_id == "x"]
    assert x_ends[-1:] == ["abort"] and not any(x_ends[:-1])
    assert {rid for rid, _, _ in _ran(multi)} == {"y"}
    done = multi.run()
    assert "y" in done and "x" not in multi.engines["a"].scheduler.requests


def test_a_pooled_state_snapshot_is_the_policys_view(make_tiny, ahead):
    """The early plan's _sync leaves the policy's view pointing at the live queues (nothing copied stays behind)."""
    d = make_tiny("qwen2")
    multi = MultiModelEngine({"a": d}, policy="token", device="cpu")
    multi.add_request("x", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    multi.step_tokens()
    assert isinstance(multi.state, PoolState)
    assert multi.state.models["a"].running is multi.engines["a"].scheduler.running


@pytest.mark.parametrize("pooled", [True, False])
def test_the_plan_that_runs_is_run_exactly(make_tiny, host_cache, ahead, pooled):
    """test_the_plans_batch_is_what_runs with plan-ahead: whichever plan a step takes (early or made again), its batch
    is exactly what the model's scheduler runs -- twelve requests, more KV than the pages hold (plans preempt)."""
    multi, paths = _two_models_short_of_kv(make_tiny, host_cache, pooled)
    alone = {a: _alone(p, "greedy") for a, p in paths.items()}
    used = []  # the plan each step carried out: the one its memory moves were run for
    real = multi._execute_memory
    multi._execute_memory = lambda plan, **kw: (used.append((plan, [(r.request_id, n) for r, n in plan.batch])),
                                                real(plan, **kw))[1]
    _submit_rounds(multi, paths)
    done = {}
    while multi.has_unfinished_requests():
        for o in multi.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
        plan, batch = used[-1]
        if not plan.idle:
            out = multi.engines[plan.model].last_out
            assert ran_as_planned(out, batch)
    for a in paths:
        for i in range(len(PROMPTS)):
            for k in range(3):
                assert done[f"{a}/r{i}.{k}"] == alone[a][f"r{i}"]
    assert multi.kv_swapped_out > 0
    c = multi.timing
    assert c["ahead_used"] > 0 and c["ahead_discarded"] > 0
    multi.close()
