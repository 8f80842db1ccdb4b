"""Three tiny real models interleaved token by token produce exactly what each produces alone."""

from __future__ import annotations

import dataclasses
import time
from collections import deque

import pytest

from token_scheduler.engine import EngineConfig, LLMEngine
from token_scheduler.multi_engine import MultiModelEngine
from token_scheduler.policies.slo import ModelSLO
from token_scheduler.request import SamplingParams

ARCHS = ("qwen2", "llama", "qwen3")
PROMPTS = ["the quick brown fox", "hello", "a b c d e f g h i j k l m n o p", "tokens, one by one"]


def _params(kind: str, i: int) -> SamplingParams:
    if kind == "greedy":
        return SamplingParams(temperature=0.0, max_tokens=10 + i, ignore_eos=True)
    return SamplingParams(temperature=1.0, top_k=20, seed=1000 + i, max_tokens=10 + i, ignore_eos=True)


_ALONE: dict = {}


def _alone(path, kind: str) -> dict[str, list[int]]:
    if (str(path), kind) in _ALONE:
        return _ALONE[str(path), kind]
    eng = LLMEngine(EngineConfig(model=str(path), device="cpu"))
    for i, p in enumerate(PROMPTS):
        eng.add_request(f"r{i}", p, _params(kind, i))
    out = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                out[o.request_id] = o.outputs[0].token_ids
    _ALONE[str(path), kind] = out
    return out


def _interleaved_equals_alone(multi, alone: dict, kind: str) -> None:
    """Every model's prompts submitted interleaved across models, run to the end; each request's tokens must
    be exactly those of the model serving it alone."""
    for i, p in enumerate(PROMPTS):
        for a in alone:
            multi.add_request(f"{a}/r{i}", p, _params(kind, i), model=a)
    done = multi.run()
    for a in alone:
        for rid, toks in alone[a].items():
            assert done[f"{a}/{rid}"].outputs[0].token_ids == toks, (a, rid)
            assert done[f"{a}/{rid}"].model == a


@pytest.mark.parametrize("kind,max_round_s", [("greedy", 0.0), ("seeded", 0.0), ("greedy", 4.0)])
def test_interleaved_equals_alone(make_tiny, kind, max_round_s):
    paths = {a: make_tiny(a) for a in ARCHS}
    alone = {a: _alone(p, kind) for a, p in paths.items()}
    # max_round_s=0: every turn is one step (strict token-by-token round robin); 4 s: the policy's own quotas
    multi = MultiModelEngine(dict(paths.items()), policy="token", device="cpu",
                             policy_kw={"max_round_s": max_round_s})
    _interleaved_equals_alone(multi, alone, kind)
    # token by token: the GPU changed hands between models on most steps, and every model ran
    switches = multi.switches
    if max_round_s == 0.0:
        assert switches >= len(multi.trace) // 2
    assert all(n > 0 for n in multi.steps_per_model.values())
    assert multi.cost.to_dict()["step"]["qwen2"]["samples"] > 0


def test_add_request_validates_model(make_tiny):
    multi = MultiModelEngine({"a": make_tiny("qwen2")}, device="cpu")
    multi.add_request("x", "hi", SamplingParams(max_tokens=2))  # one model: name optional
    with pytest.raises(ValueError):
        multi.add_request("x", "hi", SamplingParams(max_tokens=2), model="a")
    with pytest.raises(ValueError):
        multi.add_request("y", "hi", SamplingParams(max_tokens=2), model="nope")
    multi.abort_request("x")
    outs = multi.step()
    assert any(o.request_id == "x" and o.finished for o in outs)
    assert not multi.has_unfinished_requests()


def test_an_abort_is_answered_by_the_next_step_whichever_model_runs(make_tiny):
    """A request of a model that does not step is aborted: the next step -- another model's -- carries its final
    output (the engine looks for owed aborts after abort_request, not in every model at every step), once."""
    d = make_tiny("qwen2")
    multi = MultiModelEngine({"a": d, "b": d}, policy="token", device="cpu")
    sp = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    multi.add_request("a0", [1, 2, 3], sp, model="a")
    multi.step_tokens()
    multi.add_request("b0", [4, 5, 6], sp, model="b")
    multi.abort_request("b0")  # before b ever ran: b has nothing left, so a runs next
    outs = multi.step_tokens()
    assert multi.trace[-1] == "a"
    assert [(o.request.request_id, o.status.finish_reason) for o in outs if o.request.model == "b"] == [("b0", "abort")]
    assert not any(o.request.request_id == "b0" for o in multi.step_tokens())
    assert not multi.engines["b"].has_unfinished_requests()


@pytest.mark.parametrize("kind,policy", [("greedy", "token"), ("seeded", "token"), ("greedy", "request")])
def test_pooled_swaps_weights_and_kv_and_equals_alone(make_tiny, host_cache, kind, policy):
    """Weights that do not all fit the budget move in and out of arena slots, KV pages shared by the models
    run short so idle models' KV goes to host pages and back -- and every request's tokens are unchanged."""
    from gpu_pool.arena import MiB

    paths = {a: make_tiny(a) for a in ARCHS}
    alone = {a: _alone(p, kind) for a, p in paths.items()}
    page = 16 * 512  # the first model's (qwen2) 16 tokens of fp32 KV
    # KV region: 12 pages (the 12 requests need ~40 at once); weights: 4 MiB = two of the three models
    kw = {"max_round_s": 0.0} if policy == "token" else {}  # token: strict round robin, every model active
    multi = MultiModelEngine(dict(paths.items()), policy=policy, device="cpu", gpu_budget=6 * MiB,
                             kv_cache_gb=12 * page / 1e9, host_kv_gb=256 * page / 1e9, host_cache=host_cache,
                             policy_kw=kw)
    mem = multi.memory
    assert mem.page_bytes == page and mem.weight_capacity == 4 * MiB
    assert {e.block_size for e in multi.engines.values()} == {16, 8}  # qwen3: 1 KiB of KV per token
    mem.stats.load_s = deque(maxlen=2)  # the record of loads is bounded; the cost model still sees every one
    _interleaved_equals_alone(multi, alone, kind)
    # all three cannot be resident at once: weights were evicted, as the policy planned (no forced evictions)
    assert mem.stats.evictions > 0 and mem.stats.forced_evictions == 0
    if policy == "token":  # round-robin turns: weights came back more than once; idle models' KV made room
        assert mem.stats.loads + mem.stats.prefetches > len(ARCHS)
        assert multi.kv_swapped_out > 0
    else:  # request-level: each model holds the GPU until its requests finish, so it is loaded once
        assert mem.stats.loads == len(ARCHS)
    # every completed load was measured and taught the cost model the link's speed
    cm = multi.cost.to_dict()["load"]
    assert cm["samples"] == mem.stats.loads_done >= mem.stats.loads and len(mem.stats.load_s) <= 2
    assert all(0.0 <= hidden <= secs for _, secs, hidden in mem.stats.load_s)
    # nothing leaked: every GPU page and host page is free again
    assert mem.pages.num_used == 0 and mem.host_kv.allocator.num_used == 0
    multi.close()


def test_idle_plans_are_not_counted_as_step_policy_time(make_tiny, host_cache):
    """static places one of two models; polling with only the other's request waiting plans nothing, and
    those polls go to idle_* -- not to the policy CPU of the steps that ran (it read 64% on the H100)."""
    from gpu_pool.arena import MiB

    d = make_tiny("qwen2")
    multi = MultiModelEngine({"a": d, "b": d}, policy="static", device="cpu", gpu_budget=6 * MiB,
                             kv_cache_gb=64 * 16 * 512 / 1e9, host_cache=host_cache)
    multi.add_request("b1", "hello", SamplingParams(max_tokens=2, ignore_eos=True), model="b")
    for _ in range(50):
        multi.step()
    assert multi.policy.resident == ["a"]
    tm = multi.timing_summary()
    assert tm["idle_polls"] == 50 and tm["idle_policy_s"] > 0
    assert tm["steps"] == 0 and tm["policy_s"] == 0 and tm["policy_frac"] == 0
    multi.add_request("a1", "hello", SamplingParams(max_tokens=2, ignore_eos=True), model="a")
    while multi.engines["a"].has_unfinished_requests():
        multi.step()
    tm = multi.timing_summary()
    assert tm["steps"] == 2 and tm["policy_s"] > 0
    multi.close()


@pytest.mark.parametrize("placement", ["window", "lru"])
def test_pooled_fragmented_arena_equals_alone(make_tiny, host_cache, placement):
    """Slots of one and two 2 MiB units in five units of weight space: free bytes are often not contiguous, so
    a plan blind to free ranges (`see_ranges=False`) has the pool evict beyond it (the policy's window, or LRU)
    or skip prefetches; the engines and the policy's view follow those evictions and every request's tokens
    are unchanged. A plan that counts free bytes only where a range holds the slot (the default) leaves the
    pool nothing to force, with the same tokens."""
    from gpu_pool.arena import MiB

    archs = ("qwen2", "qwen3", "llama", "mistral")  # slots: 1, 1, 2, 2 units
    paths = {a: make_tiny(a) for a in archs}
    alone = {a: _alone(p, "greedy") for a, p in paths.items()}
    multi = MultiModelEngine(dict(paths.items()), policy="token", device="cpu", gpu_budget=12 * MiB,
                             kv_cache_gb=64 * 16 * 512 / 1e9, host_kv_gb=256 * 16 * 512 / 1e9, host_cache=host_cache,
                             policy_kw={"max_round_s": 0.0, "placement": placement, "see_ranges": False,
                                        "sized_victims": "off"})
    mem = multi.memory
    assert mem.weight_capacity == 10 * MiB
    _interleaved_equals_alone(multi, alone, "greedy")
    assert mem.stats.forced_evictions + mem.stats.prefetch_skipped > 0
    if placement == "window":  # prefetches evicted (on CPU a load in flight is always landed: none blocks)
        assert mem.stats.forced_evictions > 0
    for name, eng in multi.engines.items():  # nothing the pool dropped is still believed resident
        if not mem.holds(name):
            assert eng.weights is None and multi.state.models[name].residency == 0
    multi.close()
    multi = MultiModelEngine(dict(paths.items()), policy="token", device="cpu", gpu_budget=12 * MiB,
                             kv_cache_gb=64 * 16 * 512 / 1e9, host_kv_gb=256 * 16 * 512 / 1e9, host_cache=host_cache,
                             policy_kw={"max_round_s": 0.0, "placement": placement})
    _interleaved_equals_alone(multi, alone, "greedy")
    st = multi.memory.stats
    assert st.forced_evictions == st.prefetch_skipped == 0 and st.prefetches > 0 and multi.switches > 0
    assert multi.state.weight_free_run == multi.memory.arena.alloc.largest_free
    multi.close()


def test_pinned_model_keeps_its_slot_while_others_rotate(make_tiny, host_cache):
    """Two weight slots, three models, one pinned: the pinned model's weights are never evicted (not by the
    policy's plans, not by the pool's fallback); the other two rotate through the other slot; every request's
    tokens are unchanged. Unpinned, it is evicted like the others."""
    from gpu_pool.arena import MiB

    paths = {"qwen2": make_tiny("qwen2"), "qwen3": make_tiny("qwen3"), "other": make_tiny("qwen2", seed=1)}
    alone = {a: _alone(p, "greedy") for a, p in paths.items()}
    multi = MultiModelEngine(dict(paths.items()), policy="token", device="cpu", gpu_budget=6 * MiB,
                             kv_cache_gb=64 * 16 * 512 / 1e9, host_kv_gb=256 * 16 * 512 / 1e9, host_cache=host_cache,
                             policy_kw={"max_round_s": 0.0})
    assert multi.memory.weight_capacity == 4 * MiB
    multi.set_pinned("qwen2", True)
    _interleaved_equals_alone(multi, alone, "greedy")
    evicted = {e["model"] for e in multi.events if e["kind"] == "evict"}
    assert "qwen2" not in evicted and {"qwen3", "other"} & evicted
    assert multi.memory.holds("qwen2")
    multi.set_pinned("qwen2", False)
    multi.events.clear()
    _interleaved_equals_alone(multi, {a: alone[a] for a in ("qwen3", "other")}, "greedy")
    _interleaved_equals_alone(multi, alone, "greedy")
    assert "qwen2" in {e["model"] for e in multi.events if e["kind"] == "evict"}
    with pytest.raises(ValueError):
        multi.set_pinned("nope", True)
    multi.close()


def test_one_set_of_batch_limits_and_the_cost_model_learns_what_ran(make_tiny):
    """The policy plans with the engines' own limits (EngineConfig), so no planned batch is cut by the engine;
    the cost model is fed the shape of the batch that ran."""
    d = make_tiny("qwen2")
    cfg = EngineConfig(model=str(d), device="cpu", max_num_seqs=3, max_num_batched_tokens=40)
    multi = MultiModelEngine({"a": cfg, "b": dataclasses.replace(cfg, max_num_seqs=5)}, policy="token", device="cpu")
    lim = multi.policy.cfg.limits
    assert (lim.max_seqs, lim.max_tokens) == (3, 40)
    seen = []
    real_observe = multi.cost.observe_step
    multi.cost.observe_step = lambda m, shape, s: (seen.append((m, shape)), real_observe(m, shape, s))
    for i in range(5):
        multi.add_request(f"r{i}", list(range(5, 35)), SamplingParams(max_tokens=3, ignore_eos=True), model="a")
    while multi.has_unfinished_requests():
        multi.step()
        out = multi.engines["a"].last_out
        if out is not None and out.chunks:
            assert len(out.chunks) <= 3 and out.num_tokens <= 40
            assert seen and seen[-1][1].num_seqs == len(out.chunks) and seen[-1][1].new_tokens == out.num_tokens
    multi.remove_model("b")
    assert multi.policy.cfg.limits.max_seqs == 3


def test_keep_alive_evicts_idle_weights_and_preload_brings_them_in(make_tiny, host_cache):
    """keep_alive (Ollama's, llama-swap's ttl): an idle model's weights leave VRAM once idle that long, the host
    copy stays and the next request brings them back; preload: weights come in before any request."""
    import time

    from gpu_pool.arena import MiB

    paths = {"a": make_tiny("qwen2"), "b": make_tiny("qwen3")}
    multi = MultiModelEngine(dict(paths.items()), policy="token", device="cpu", gpu_budget=8 * MiB,
                             kv_cache_gb=64 * 16 * 512 / 1e9, host_cache=host_cache)
    assert not multi.memory.holds("a")
    assert multi.preload("a") and multi.memory.holds("a")  # room for both: no eviction needed
    multi.memory.poll()
    multi.set_keep_alive("a", 0.2)
    multi.add_request("r1", "hello", SamplingParams(max_tokens=2, ignore_eos=True), model="a")
    multi.run()
    assert multi.memory.holds("a")
    multi.expire()
    assert multi.memory.holds("a")  # not idle long enough yet
    time.sleep(0.3)
    multi.expire()
    assert not multi.memory.holds("a") and multi.engines["a"].weights is None
    assert any(e["kind"] == "evict" and e.get("keep_alive") == 0.2 for e in multi.events)
    multi.add_request("r2", "hello", SamplingParams(max_tokens=2, ignore_eos=True), model="a")
    assert multi.run()["r2"].outputs[0].token_ids  # back on demand
    multi.close()


def ran_as_planned(out, batch: list) -> bool:
    """Whether a step's chunks are a plan's [(request id, tokens)] exactly: the same requests in the same order, each
    with the planned tokens -- but for one that started on cached KV (prefix caching), whose chunk begins after the
    cached tokens and so ends at its sequence's end sooner (and samples) where the plan ran to it."""
    return len(out.chunks) == len(batch) and all(
        c.request.request_id == rid and (c.num_tokens == n or (c.cached and c.sample and c.num_tokens < n))
        for c, (rid, n) in zip(out.chunks, batch))


def _record_plans(multi) -> list:
    """Every plan the policy returns, with the batch the stepping model's scheduler then ran (filled in by
    the caller after each step). Plan-ahead off: one plan a step, the step's own (with it, the latest plan is the
    next step's early one; tests/test_plan_ahead.py checks the plans that run there)."""
    multi.plan_ahead = False
    plans = []
    real = multi.policy.schedule

    def schedule(st):
        plan = real(st)
        plans.append([plan, [(r.request_id, n) for r, n in plan.batch], [r.request_id for r in plan.swap_out]])
        return plan

    multi.policy.schedule = schedule
    return plans


def _two_models_short_of_kv(make_tiny, host_cache, pooled: bool):
    """qwen2 and qwen3 with 14 KV pages (shared, pooled) or 14 blocks each: less KV than twelve requests need, so
    plans preempt. (multi, paths)"""
    from gpu_pool.arena import MiB

    paths = {a: make_tiny(a) for a in ("qwen2", "qwen3")}
    page = 16 * 512
    if pooled:
        multi = MultiModelEngine(dict(paths.items()), policy="token", device="cpu", gpu_budget=6 * MiB,
                                 kv_cache_gb=14 * page / 1e9, host_kv_gb=256 * page / 1e9, host_cache=host_cache,
                                 policy_kw={"max_round_s": 0.0})
    else:  # every model its own pool of 14 blocks
        multi = MultiModelEngine(dict(paths.items()), policy="token", device="cpu", num_kv_blocks=14,
                                 num_host_kv_blocks=256, policy_kw={"max_round_s": 0.0})
    return multi, paths


def _submit_rounds(multi, paths, rounds: int = 3) -> None:
    """Every prompt `rounds` times to each model, interleaved (request ids "{model}/r{i}.{k}"), greedy."""
    for k in range(rounds):
        for i, p in enumerate(PROMPTS):
            for a in paths:
                multi.add_request(f"{a}/r{i}.{k}", p, _params("greedy", i), model=a)


@pytest.mark.parametrize("pooled", [True, False])
def test_the_plans_batch_is_what_runs(make_tiny, host_cache, pooled):
    """The policy's batch runs exactly (same requests, same token counts, same order): no second builder.
    Twelve requests for one model: more than one FCFS group, and more KV than the pages hold, so the plan
    preempts -- a scheduler building its own batch under the plan's token budget admitted them differently."""
    multi, paths = _two_models_short_of_kv(make_tiny, host_cache, pooled)
    alone = {a: _alone(p, "greedy") for a, p in paths.items()}
    plans = _record_plans(multi)
    _submit_rounds(multi, paths)
    done = {}
    ran_any_swap = False
    while multi.has_unfinished_requests():
        for o in multi.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
        for e in multi.engines.values():  # the blocks the policy's view counts (_sync): its running requests' own
            # (distinct: requests that started on one cached prefix share its blocks)
            assert e.scheduler.kv.num_held == len({b for r in e.scheduler.running for b in r.block_ids})
        plan, batch, _ = plans[-1]
        if plan.idle:
            continue
        out = multi.engines[plan.model].last_out
        assert ran_as_planned(out, batch)
        ran_any_swap |= bool(out.swap_out or out.swap_in)
    assert ran_any_swap  # the KV was short: the plan preempted and resumed, and that is what ran
    assert max(sum(1 for _, n in b if n > 1) for _, b, _ in plans) >= 2  # prefills batched
    for a in paths:
        for i in range(len(PROMPTS)):
            for k in range(3):
                assert done[f"{a}/r{i}.{k}"] == alone[a][f"r{i}"]
    multi.close()


def test_kv_shortage_in_the_shared_region_is_resolved_by_the_plan(make_tiny, host_cache):
    """Model a holds most of the shared KV pages; b's turn needs pages: b's plan swaps out a's newest running
    requests to host pages (recorded in the plan, KV kept: the requests are SWAPPED, their tokens computed
    stay) -- the mechanism swaps out nothing on its own -- and every request still equals its run alone."""
    from gpu_pool.arena import MiB

    paths = {"a": make_tiny("qwen2"), "b": make_tiny("qwen2", seed=1)}
    page = 16 * 512
    multi = MultiModelEngine(dict(paths.items()), policy="token", device="cpu", gpu_budget=6 * MiB,
                             kv_cache_gb=12 * page / 1e9, host_kv_gb=256 * page / 1e9, host_cache=host_cache,
                             policy_kw={"max_round_s": 0.0})
    mem = multi.memory
    assert mem.pages.num_blocks == 11  # 12 pages, the last one scratch
    assert multi.state.kv_capacity_bytes == mem.pages.num_blocks * page
    assert multi.state.models["a"].kv_block_bytes == page
    sp = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    prompt = list(range(3, 43))  # 40 tokens: 3 pages each, 4 once decoding passes 48
    for i in range(3):
        multi.add_request(f"a{i}", prompt, sp, model="a")
    while len(multi.engines["a"].scheduler.running) < 3:
        multi.step()
    assert mem.pages.num_used == 9
    plans = _record_plans(multi)
    multi.add_request("b0", prompt, sp, model="b")
    preempted = None
    swaps_before = multi.kv_swapped_out
    while preempted is None:
        multi._sync()
        computed = {r.request_id: r.num_computed_tokens for r in multi.engines["a"].scheduler.running}
        used_before = mem.pages.num_used
        multi.step()
        plan, batch, swap_out = plans[-1]
        if plan.model == "b" and swap_out:
            preempted = swap_out
        else:  # nothing swapped out but by a plan
            assert multi.kv_swapped_out == swaps_before and not multi.engines["a"].scheduler.swapped
        assert mem.pages.num_used <= mem.pages.num_blocks
    a = multi.engines["a"].scheduler
    assert preempted == ["a2"]  # 2 pages free, b0 needs 3: a's newest request goes (3 pages), no more
    for rid in preempted:
        r = a.requests[rid]
        assert r.status.name == "SWAPPED" and r.host_block_ids and r.num_computed_tokens == computed[rid]
    assert multi.kv_swapped_out == swaps_before + len(preempted)
    assert batch == [("b0", 40)] and mem.pages.num_used == used_before - 3 * len(preempted) + 3
    done = multi.run()
    alone_a = _alone_one(paths["a"], prompt, sp)
    assert all(done[f"a{i}"].outputs[0].token_ids == alone_a for i in range(3))
    assert done["b0"].outputs[0].token_ids == _alone_one(paths["b"], prompt, sp)
    assert mem.pages.num_used == 0 and mem.host_kv.allocator.num_used == 0
    multi.close()


def _alone_one(path, prompt, sp) -> list[int]:
    eng = LLMEngine(EngineConfig(model=str(path), device="cpu"))
    eng.add_request("x", prompt, sp)
    out = None
    while eng.has_unfinished_requests():
        for o in eng.step():
            out = o
    return out.outputs[0].token_ids


def test_limits_come_from_the_engine_config(make_tiny):
    """One source of batch limits: EngineConfig. Its defaults are BatchLimits'; the single-model scheduler
    and a multi-model policy both take them from the config."""
    from token_scheduler.policies.batching import BatchLimits

    d = make_tiny("qwen2")
    default = EngineConfig(model=str(d))
    assert (BatchLimits().max_seqs, BatchLimits().max_tokens) == (default.max_num_seqs, default.max_num_batched_tokens)
    cfg = dataclasses.replace(default, max_num_seqs=3, max_num_batched_tokens=24)
    eng = LLMEngine(cfg)
    assert (eng.scheduler.limits.max_seqs, eng.scheduler.limits.max_tokens) == (3, 24)
    for i in range(5):
        eng.add_request(f"r{i}", list(range(5, 25)), SamplingParams(max_tokens=4, ignore_eos=True))
    while eng.has_unfinished_requests():
        eng.step()
        out = eng.last_out
        assert len(eng.scheduler.running) <= 3 and out.num_tokens <= 24
    multi = MultiModelEngine({"a": cfg}, policy="request", device="cpu")
    assert (multi.policy.limits.max_seqs, multi.policy.limits.max_tokens) == (3, 24)


def test_aliases_share_one_tokenizer_while_hosted(make_tiny, host_cache):
    """A restarted worker registers every alias of a checkpoint again: the directory's tokenizer loads once,
    and goes when no hosted model uses the directory."""
    from gpu_pool.arena import MiB

    d, other = make_tiny("qwen2"), make_tiny("qwen3")
    multi = MultiModelEngine({"a": d, "b": d, "c": other}, policy="token", device="cpu", gpu_budget=8 * MiB,
                             kv_cache_gb=64 * 16 * 512 / 1e9, host_cache=host_cache)
    assert multi.engines["a"].tokenizer is multi.engines["b"].tokenizer
    assert multi.engines["c"].tokenizer is not multi.engines["a"].tokenizer
    assert set(multi.add_s["a"]) == {"tokenizer_s", "pool_s", "engine_s"}
    multi.remove_model("a")
    assert str(d) in multi._tokenizers
    multi.remove_model("b")
    assert list(multi._tokenizers) == [str(other)] and "b" not in multi.add_s
    multi.close()


def test_a_model_falling_behind_its_deadlines_is_reported_once_until_it_steps(make_tiny):
    d = make_tiny("qwen2")
    # "a" has an SLO no step can meet (every token due 1 ms after arrival); "b" an easy one
    multi = MultiModelEngine({"a": d, "b": d}, policy="token", device="cpu",
                             slos={"a": ModelSLO(0.001, 0.001), "b": ModelSLO(60.0, 1.0)})
    for m in ("a", "b"):
        multi.add_request(f"r-{m}", [1, 2, 3, 4], SamplingParams(max_tokens=4, temperature=0.0), model=m)
    time.sleep(0.01)
    multi.step_tokens()
    late = [e for e in multi.events if e["kind"] == "late"]
    assert [e["model"] for e in late] == ["a"] and late[0]["late_s"] > 0
    assert late[0]["waiting"] + late[0]["running"] == 1 and late[0]["residency"] == "resident"
    assert late[0]["predicted_ms_per_step"] > 0  # what the cost model prices its next decode at
    if late[0]["turn_steps"]:  # its last turn, when it had one: steps and engine time per step
        assert late[0]["turn_ms_per_step"] > 0
    multi._late_check = 0.0  # the next check is due now; "a" has not stepped since its event unless it ran
    before = len(multi.events)
    ran = multi.step_tokens() and multi.trace[-1]
    again = [e for e in list(multi.events)[before:] if e["kind"] == "late"]
    assert [e["model"] for e in again] == (["a"] if ran == "a" else [])  # once per episode: a new one only after a step
    assert multi.timing["late_episodes"] == 1 + len(again)
    multi.run()
    assert all(e["model"] == "a" for e in multi.events if e["kind"] == "late")


def test_a_slot_as_large_as_the_arena_evicts_an_idle_model(make_tiny, host_cache):
    """Weight space of 4 MiB (a 6 MiB arena less its KV region), a 2 MiB and a 4 MiB model (2 MiB alignment).
    Once the small one is idle and resident, the big one needs a whole slot's worth that no victim alone frees:
    the plan used to find "no room" forever and its requests waited behind the idle model (a busy loop of idle
    plans). Evicting every victim leaves the arena one free range, so the free bytes count: both finish, with
    each model's tokens alone."""
    from gpu_pool.arena import MiB

    paths = {a: make_tiny(a) for a in ("qwen2", "llama")}
    alone = {a: _alone(p, "greedy") for a, p in paths.items()}
    page = 16 * 512
    multi = MultiModelEngine(dict(paths.items()), policy="token", device="cpu", gpu_budget=6 * MiB,
                             kv_cache_gb=12 * page / 1e9, host_kv_gb=256 * page / 1e9, host_cache=host_cache)
    assert multi.memory.weight_capacity == 4 * MiB
    assert {a: multi.memory.slot_bytes(a) for a in paths} == {"qwen2": 2 * MiB, "llama": 4 * MiB}
    for i, p in enumerate(PROMPTS):
        for a in paths:
            multi.add_request(f"{a}/r{i}", p, _params("greedy", i), model=a)
    done, steps = {}, 0
    while multi.has_unfinished_requests() and steps < 2000:  # (a hang shows as a failure, not a stuck test)
        steps += 1
        for o in multi.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
    assert not multi.has_unfinished_requests(), {a: len(e.scheduler.waiting) for a, e in multi.engines.items()}
    for a in paths:
        for rid, toks in alone[a].items():
            assert done[f"{a}/{rid}"] == toks, (a, rid)
    assert multi.memory.stats.forced_evictions == 0
    multi.close()


def test_a_step_that_captured_a_cuda_graph_is_not_learned(make_tiny, monkeypatch):
    """A step during which the runner captured a CUDA graph (tens of ms of capture and warm-up forwards on the
    GPU) does not teach the cost model: only steps without a capture are observed (each step read at once: a
    pipelined step is learned when read, test_pipeline)."""
    from token_scheduler import multi_engine
    from token_scheduler.graph_cap import counters

    monkeypatch.setattr(multi_engine, "PIPELINE", False)

    d = make_tiny("qwen2")
    multi = MultiModelEngine({"a": d}, policy="token", device="cpu")
    eng = multi.engines["a"]
    seen = []
    real_observe = multi.cost.observe_step
    multi.cost.observe_step = lambda m, shape, s: (seen.append(m), real_observe(m, shape, s))
    real_step = eng.step_tokens
    calls = [0]

    def step_tokens(*a, **k):  # every other step "captures" (CPU runners capture nothing: count one by hand)
        calls[0] += 1
        if calls[0] % 2 == 0:
            counters(eng.runner.graphs)[0] += 1
        return real_step(*a, **k)

    eng.step_tokens = step_tokens
    multi.add_request("r", list(range(5, 15)), SamplingParams(max_tokens=6, ignore_eos=True), model="a")
    while multi.has_unfinished_requests():
        multi.step()
    assert calls[0] >= 6 and len(seen) == calls[0] - calls[0] // 2


def test_where_each_kind_of_step_spent_its_time(make_tiny, host_cache, monkeypatch):
    """The books of where a step's time went (`ph_*`), by kind: three prompts of one model are prefilled, decoded
    three at a time, then two and one as they finish (lengths 3, 5, 7). Every step that ran is in the kind of its
    shape, its sequences counted, and its three phases add up to the engine time of those steps (each step read at
    once; pipelined steps' books: test_pipeline)."""
    from gpu_pool.arena import MiB
    from token_scheduler import multi_engine

    monkeypatch.setattr(multi_engine, "PIPELINE", False)
    d = make_tiny("qwen2")
    multi = MultiModelEngine({"a": d}, policy="token", device="cpu", gpu_budget=6 * MiB,
                             kv_cache_gb=64 * 16 * 512 / 1e9, host_cache=host_cache)
    for i, n in enumerate((3, 5, 7)):
        multi.add_request(f"r{i}", "hello there", SamplingParams(max_tokens=n, ignore_eos=True), model="a")
    while multi.has_unfinished_requests():
        multi.step()
    tm = multi.timing
    kinds = {k: int(tm[f"ph_{k}_steps"]) for k in ("prefill", "d1", "d2", "d3")}
    # one prefill of the three (their first tokens), then decodes: 2 of three, 2 of two, 2 of one
    assert kinds == {"prefill": 1, "d3": 2, "d2": 2, "d1": 2}
    assert sum(tm[f"ph_{k}_steps"] for k in ("d4", "d5_8", "d9_16", "d17")) == 0
    assert tm["ph_d3_seqs"] == 6 and tm["ph_d2_seqs"] == 4 and tm["ph_d1_seqs"] == 2 and tm["ph_prefill_seqs"] == 3
    spent = sum(tm[f"ph_{k}_{ph}_s"] for k in kinds for ph in ("pre", "wait", "post"))
    assert tm["steps"] == 7 and abs(spent - tm["engine_s"]) < 1e-6 * tm["steps"] + 1e-3 * tm["engine_s"]
    for k in kinds:
        for ph in ("pre", "wait", "post"):
            assert tm[f"ph_{k}_{ph}_s"] > 0 and 0 <= tm[f"ph_{k}_{ph}_cpu_s"] <= tm[f"ph_{k}_{ph}_s"] + 0.01
    multi.close()


def test_evict_when_idle_waits_for_requests_and_keeps_pins(make_tiny, host_cache):
    """An operator's evict (Ollama's stop): a model with a request in flight keeps its weights until it finishes,
    then they go, once (a later request brings them back and they stay); asked while a request waits for weights in
    the host cache, they come in for it and go after; a pinned model's stay; an unknown name is refused."""
    from gpu_pool.arena import MiB

    paths = {"a": make_tiny("qwen2"), "b": make_tiny("qwen3")}
    multi = MultiModelEngine(dict(paths.items()), policy="token", device="cpu", gpu_budget=8 * MiB,
                             kv_cache_gb=64 * 16 * 512 / 1e9, host_cache=host_cache)
    assert multi.preload("a") and multi.preload("b")
    multi.memory.poll()
    multi.add_request("r1", "hello", SamplingParams(max_tokens=4, ignore_eos=True), model="a")
    multi.step()
    multi.evict_when_idle("a")
    multi.expire()
    assert multi.memory.holds("a")  # busy: not yet
    multi.run()
    multi.expire()
    assert not multi.memory.holds("a") and multi.engines["a"].weights is None
    assert any(e["kind"] == "evict" and e.get("keep_alive") == 0.0 for e in multi.events)
    multi.add_request("r2", "hello", SamplingParams(max_tokens=2, ignore_eos=True), model="a")
    assert multi.run()["r2"].outputs[0].token_ids
    multi.expire()
    assert multi.memory.holds("a")  # once: back for good
    multi.evict_when_idle("a")
    multi.expire()
    assert not multi.memory.holds("a")
    # asked while a request waits for weights still in the host cache: they come in for it, and go after it
    multi.add_request("r3", "hello", SamplingParams(max_tokens=2, ignore_eos=True), model="a")
    multi.evict_when_idle("a")
    multi.expire()
    assert multi.run()["r3"].outputs[0].token_ids
    multi.expire()
    assert not multi.memory.holds("a")
    multi.set_pinned("b", True)
    multi.evict_when_idle("b")
    multi.expire()
    assert multi.memory.holds("b")
    with pytest.raises(ValueError, match="unknown model"):
        multi.evict_when_idle("nope")
    multi.close()


def test_a_preload_that_landed_reads_resident_and_can_expire_idle(make_tiny, host_cache):
    """Weights brought in with no request (a preload or a pin) read "resident" once they land, though no step has
    taken them yet; keep_alive then evicts them when idle long enough (it waited for a step before: "loading" for
    good on an idle server)."""
    import time

    from gpu_pool.arena import MiB

    paths = {"a": make_tiny("qwen2"), "b": make_tiny("qwen3")}
    multi = MultiModelEngine(dict(paths.items()), policy="token", device="cpu", gpu_budget=8 * MiB,
                             kv_cache_gb=64 * 16 * 512 / 1e9, host_cache=host_cache)
    assert multi.preload("a") and multi.memory.landed("a") and not multi.memory.landed("b")
    assert multi.snapshot()["models"]["a"]["state"] == "resident"
    assert multi.snapshot()["models"]["b"]["state"] == "host"
    multi.set_keep_alive("a", 0.1)
    time.sleep(0.2)
    multi.expire()
    assert not multi.memory.holds("a") and multi.snapshot()["models"]["a"]["state"] == "host"
    multi.close()


def test_a_models_kv_pages_count_a_shared_prefix_once(make_tiny, host_cache):
    """The snapshot's kv_pages_used per model (the dashboard's Models view): requests sharing a cached prefix hold
    its pages once, as the pool's page count does (it counted each request's pages, a shared page once per request)."""
    from gpu_pool.arena import MiB

    multi = MultiModelEngine({"a": make_tiny("qwen2")}, policy="token", device="cpu", gpu_budget=8 * MiB,
                             kv_cache_gb=64 * 16 * 512 / 1e9, host_cache=host_cache)
    prompt = list(range(5, 5 + 40))  # two and a half 16-token pages
    multi.add_request("r0", prompt, SamplingParams(max_tokens=30, ignore_eos=True), model="a")
    multi.step()  # its prefill: the prompt's whole pages go into the prefix cache
    for i in (1, 2, 3):
        multi.add_request(f"r{i}", prompt, SamplingParams(max_tokens=30, ignore_eos=True), model="a")
    for _ in range(4):
        multi.step()
    running = multi.engines["a"].scheduler.running
    assert len(running) == 4
    per_request = sum(len(r.block_ids) for r in running)
    distinct = {b for r in running for b in r.block_ids}
    assert len(distinct) < per_request  # (the prefix pages are shared: the test means something)
    snap = multi.snapshot()
    assert snap["models"]["a"]["kv_pages_used"] == len(distinct) == snap["vram"]["kv_pages_used"]
    multi.close()


def test_a_slot_split_by_a_pinned_model_is_made_whole_by_evicting_its_neighbour(make_tiny, host_cache):
    """Weight space of four 2 MiB units: a pinned model in the first, the third held by an idle model, the second
    and fourth free. A 4 MiB model's slot fits no free run, and evicting every victim frees 2 MiB by bytes, less than
    its slot; beside a pinned model the plan took that as "no room" forever (its requests waited, a busy loop of idle
    plans), though evicting the idle neighbour leaves units 2-4 one range. The mechanism's layout answers it
    (`ModelPool.can_load`): the big model loads and its tokens are those it makes alone."""
    from gpu_pool.arena import MiB

    paths = {"pin": make_tiny("qwen2"), "gone": make_tiny("qwen2", seed=1), "idle": make_tiny("qwen3"),
             "big": make_tiny("llama")}
    alone = _alone(paths["big"], "greedy")
    multi = MultiModelEngine(dict(paths.items()), policy="token", device="cpu", gpu_budget=10 * MiB,
                             kv_cache_gb=64 * 16 * 512 / 1e9, host_kv_gb=256 * 16 * 512 / 1e9, host_cache=host_cache,
                             policy_kw={"max_round_s": 0.0})
    mem = multi.memory
    assert mem.weight_capacity == 8 * MiB and mem.slot_bytes("big") == 4 * MiB
    multi.set_pinned("pin", True)

    def run(name: str, reqs: dict[str, int]) -> dict[str, list[int]]:
        for rid, i in reqs.items():
            multi.add_request(f"{name}/{rid}", PROMPTS[i], _params("greedy", i), model=name)
        done, steps = {}, 0
        while multi.has_unfinished_requests() and steps < 400:  # (a hang shows as a failure, not a stuck test)
            steps += 1
            for o in multi.step():
                if o.finished:
                    done[o.request_id.split("/", 1)[1]] = o.outputs[0].token_ids
        assert not multi.has_unfinished_requests(), f"{name}: no plan in {steps} steps"
        return done

    for name in ("pin", "gone", "idle"):  # each into the next unit
        run(name, {"r0": 0})
    multi.evict_when_idle("gone")
    multi.step()
    slots = {n: s.offset for n, s in mem.slot_table.slots.items()}
    assert sorted(slots) == ["idle", "pin"] and mem.arena.alloc.largest_free == 2 * MiB
    assert slots["idle"] - slots["pin"] == 4 * MiB  # a free unit between them, and one after
    got = run("big", {rid: i for i, rid in enumerate(alone)})
    assert got == alone
    assert mem.holds("pin") and not mem.holds("idle")
    multi.close()
