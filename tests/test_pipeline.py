"""Pipelined decode (TOKENPOOL_PIPELINE): within a model's turn, step N+1 is queued before step N is read when the early
plan is exactly N's continuation; anything else reads N first. Tokens, stops and text are what each model makes alone,
pipelined steps happen, models still interleave, and nothing leaks."""

from __future__ import annotations

import json

import pytest

from controller.api.structured import response_grammar
from tests.test_multi_engine import (
    ARCHS,
    PROMPTS,
    _alone,
    _alone_one,
    _interleaved_equals_alone,
    _submit_rounds,
)
from token_scheduler import multi_engine
from token_scheduler.engine import EngineConfig, LLMEngine
from token_scheduler.multi_engine import MultiModelEngine
from token_scheduler.request import SamplingParams, bad_word_ids

# a JSON schema whose every instance is a few tokens: a random-weight model completes it well within max_tokens
SMALL_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                                   "maximum": 9}},
                "required": ["ok", "n"], "additionalProperties": False}
SMALL_JSON = response_grammar({"type": "json_schema", "json_schema": {"schema": SMALL_SCHEMA}})

# rounds of at least 1 s: on CPU (no switch cost) a turn is then several steps of a model, which pipeline
TURNS = {"max_round_s": 4.0, "min_round_s": 1.0}


@pytest.fixture
def pipe(monkeypatch):
    monkeypatch.setattr(multi_engine, "PIPELINE", True)  # on the early plans (PLAN_AHEAD: on by default)
    monkeypatch.setattr(multi_engine, "PLAN_AHEAD", True)


def _no_leak(multi) -> None:
    assert multi._pipe is None and multi._back is None and not multi.has_unfinished_requests()
    for e in multi.engines.values():
        s = e.scheduler
        assert e._inflight is None and not s.requests and not s.running and not s.waiting and not s.swapped
        if multi.memory is None:
            assert s.kv.num_used == 0
    if multi.memory is not None:
        assert multi.memory.pages.num_used == 0
        if multi.memory.host_kv is not None:
            assert multi.memory.host_kv.allocator.num_used == 0


def _run_all(multi, whole: bool = True) -> dict:
    """step() to the end (detokenize inline, stop strings applied): {request id: final RequestOutput}; no output
    after a request's finish, and (`whole`: every request streamed from its start here) the streamed deltas are
    the final tokens."""
    done, streamed = {}, {}
    while multi.has_unfinished_requests():
        for o in multi.step():
            assert o.request_id not in done, f"{o.request_id} emitted after it finished"
            streamed.setdefault(o.request_id, []).extend(o.delta_token_ids)
            if o.finished:
                done[o.request_id] = o
    for rid, o in done.items():
        assert not whole or streamed[rid] == o.outputs[0].token_ids, rid
    return done


@pytest.mark.parametrize("kind,max_round_s", [("greedy", 4.0), ("seeded", 4.0), ("greedy", 0.0)])
def test_pipeline_equals_alone(make_tiny, pipe, kind, max_round_s):
    paths = {a: make_tiny(a) for a in ARCHS}
    alone = {a: _alone(p, kind) for a, p in paths.items()}
    multi = MultiModelEngine(dict(paths.items()), policy="token", device="cpu",
                             policy_kw={**TURNS, "max_round_s": max_round_s} if max_round_s else {"max_round_s": 0.0})
    _interleaved_equals_alone(multi, alone, kind)
    snap = multi.snapshot()
    c = snap["counters"]
    assert multi.switches > 0 and all(n > 0 for n in multi.steps_per_model.values())
    # each model's steps' engine time, and what their plans priced them at (pipelined steps too): the engine time
    # of every step is in exactly one model's books
    assert all(m["engine_s"] > 0 and m["priced_s"] > 0 for m in snap["models"].values())
    assert sum(m["engine_s"] for m in snap["models"].values()) == pytest.approx(c["engine_s"])
    if max_round_s:  # turns of several steps: pipelined within them
        assert c["pipelined_steps"] > 0 and c["pipeline_kept"] > 0
        # where their time went, booked apart from the steps that ran unpipelined (`timing_summary`'s step_phases):
        # the steps queued behind another and the first of each run kept in flight; every step in one kind's books
        phases = multi.timing_summary()["step_phases"]
        ph = phases["pipelined"]
        # (co-stepping, on by default: steps launched beside another model's, and those kept for it, too)
        assert c["pipelined_steps"] < ph["steps"] <= (c["pipelined_steps"] + c["pipeline_kept"] + c["co_steps"]
                                                      + c["co_kept"])
        assert ph["pre_ms"] > 0 and ph["wait_ms"] > 0 and ph["post_ms"] > 0
        assert sum(k["steps"] for k in phases.values()) == sum(multi.steps_per_model.values())
        # interleaved: a model's turn does not run to its requests' end before another model runs
        first = {a: multi.trace.index(a) for a in paths}
        last = {a: len(multi.trace) - 1 - list(reversed(multi.trace)).index(a) for a in paths}
        assert any(first[b] < last[a] and first[a] < last[b] for a in paths for b in paths if a != b)
    else:  # token by token: every early plan is another model's -- no model's step queued behind its own but
        # (deep co-stepping, TOKENPOOL_CO_STEP_DEEP) while another model's step is in flight beside it
        assert c["pipelined_steps"] <= c["co_deep_kept"] and multi.switches >= len(multi.trace) // 2
    _no_leak(multi)


def test_pipeline_pooled_equals_alone(make_tiny, host_cache, pipe):
    """Pooled: weights rotate through two slots and KV pages run short (plans evict, swap KV, prefetch); pipelined
    turns still happen, tokens are alone's, every page comes back."""
    from gpu_pool.arena import MiB

    paths = {a: make_tiny(a) for a in ARCHS}
    alone = {a: _alone(p, "greedy") for a, p in paths.items()}
    page = 16 * 512
    multi = MultiModelEngine(dict(paths.items()), policy="token", device="cpu", gpu_budget=6 * MiB,
                             kv_cache_gb=12 * page / 1e9, host_kv_gb=256 * page / 1e9, host_cache=host_cache,
                             policy_kw=TURNS)
    _interleaved_equals_alone(multi, alone, "greedy")
    mem = multi.memory
    c = multi.snapshot()["counters"]
    assert c["pipelined_steps"] > 0 and multi.switches > 0 and mem.stats.evictions > 0
    assert mem.stats.forced_evictions == 0
    _no_leak(multi)
    multi.close()


@pytest.mark.parametrize("pooled", [False, True])
def test_pipeline_stops_and_lengths_equal_alone(make_tiny, host_cache, pipe, pooled):
    """Stop tokens (a request ends on a token it sampled while its next step was already queued: that row is
    dropped), stop strings (found between steps, by detokenize), max_tokens of every length, seeded sampling,
    logit_bias and min_tokens: each
    request's final output and streamed tokens equal the model alone's."""
    from gpu_pool.arena import MiB

    paths = {a: make_tiny(a) for a in ("qwen2", "qwen3")}
    full = {a: _alone_one(p, [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
            for a, p in paths.items()}
    eos = {a: LLMEngine(EngineConfig(model=str(p), device="cpu")).eos_token_ids[0] for a, p in paths.items()}
    reqs = {}
    for a in paths:
        toks = full[a]
        reqs[a] = [("greedy", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)),
                   ("stoptok", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                                         stop_token_ids=[toks[7]])),
                   ("seeded", [9, 8, 7, 6], SamplingParams(temperature=1.0, top_k=20, seed=11, max_tokens=17,
                                                           ignore_eos=True)),
                   ("short", [3, 4], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)),
                   # logit_bias (steps with it pipeline), and min_tokens with EOS made the likeliest token: the
                   # stop-token mask counts the tokens made, so those rows read the step before them first
                   ("bias", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                                      logit_bias={toks[0]: -100.0, toks[0] + 1: 0.5})),
                   ("min", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=12, min_tokens=6,
                                                     logit_bias={eos[a]: 100.0})),
                   # a grammar (response_format's JSON schema): fed each token, so never overlapped
                   ("json", [5, 6, 7], SamplingParams(temperature=1.0, seed=3, max_tokens=40, grammar=SMALL_JSON))]
    # a stop string: the text of a few of the greedy request's tokens
    texts, words = {}, {}
    for a, p in paths.items():
        eng = LLMEngine(EngineConfig(model=str(p), device="cpu"))
        eng.add_request("t", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
        while eng.has_unfinished_requests():
            for o in eng.step():
                texts[a] = o.outputs[0].text
        stop = texts[a][len(texts[a]) // 2: len(texts[a]) // 2 + 3]
        if stop.strip():
            reqs[a].append(("stopstr", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                                                 stop=[stop])))
            reqs[a].append(("stopkept", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                                                  stop=[stop], include_stop_str_in_output=True)))
        # vLLM's bad_words (matched against the tokens made, so those rows are never overlapped) and allowed_token_ids
        words[a] = next(w for t in full[a][3:] if (w := eng.tokenizer.decode([t]).strip()))  # (a token's text)
        reqs[a].append(("badword", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True,
                                                             bad_words=[words[a]])))
        reqs[a].append(("allowed", [5, 6, 7], SamplingParams(temperature=1.0, seed=5, max_tokens=10, ignore_eos=True,
                                                             allowed_token_ids=[toks[2], toks[3], 11])))
    expect = {}
    for a, p in paths.items():
        eng = LLMEngine(EngineConfig(model=str(p), device="cpu"))
        for rid, prompt, sp in reqs[a]:
            eng.add_request(rid, prompt, sp)
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    c = o.outputs[0]
                    expect[f"{a}/{o.request_id}"] = (c.token_ids, c.text, c.finish_reason, c.stop_reason)
    if pooled:
        page = 16 * 512
        multi = MultiModelEngine(dict(paths.items()), policy="token", device="cpu", gpu_budget=6 * MiB,
                                 kv_cache_gb=12 * page / 1e9, host_kv_gb=256 * page / 1e9, host_cache=host_cache,
                                 policy_kw=TURNS)
    else:
        multi = MultiModelEngine(dict(paths.items()), policy="token", device="cpu", policy_kw=TURNS)
    for a in paths:
        for rid, prompt, sp in reqs[a]:
            multi.add_request(f"{a}/{rid}", prompt, sp, model=a)
    done = _run_all(multi)
    got = {rid: (o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason, o.outputs[0].stop_reason)
           for rid, o in done.items()}
    assert got == expect
    assert any(v[2] == "stop" for v in got.values())
    import jsonschema

    for a in paths:  # what the sampling options mean
        bias, mintok = expect[f"{a}/bias"][0], expect[f"{a}/min"][0]
        assert full[a][0] not in bias
        assert len(mintok) == 7 and mintok[-1] == eos[a] and eos[a] not in mintok[:6]
        assert expect[f"{a}/min"][2] == "stop"
        assert set(expect[f"{a}/allowed"][0]) <= {full[a][2], full[a][3], 11}
        tok = LLMEngine(EngineConfig(model=str(paths[a]), device="cpu")).tokenizer
        made = expect[f"{a}/badword"][0]
        seqs = bad_word_ids(tok, [words[a]])
        for seq in seqs:
            assert not any(made[i: i + len(seq)] == seq for i in range(len(made))), (words[a], seq)
        assert any(full[a][i: i + len(seq)] == seq for seq in seqs for i in range(8))  # (unbanned, it was made)
        if f"{a}/stopkept" in expect:
            kept, cut = expect[f"{a}/stopkept"][1], expect[f"{a}/stopstr"][1]
            assert kept == cut + expect[f"{a}/stopstr"][3]
        text, reason = expect[f"{a}/json"][1], expect[f"{a}/json"][2]
        jsonschema.validate(json.loads(text), SMALL_SCHEMA)
        assert reason == "stop"
    assert multi.timing["pipelined_steps"] > 0
    _no_leak(multi)
    multi.close()


def test_the_plan_that_runs_is_run_exactly(make_tiny, pipe):
    """Whichever way a step runs (pipelined, kept in flight or read at once), the batch the model's scheduler ran
    (`last_out`) is the plan's: for a pipelined step the early plan's, equal to the continuation."""
    paths = {a: make_tiny(a) for a in ("qwen2", "qwen3")}
    multi = MultiModelEngine(dict(paths.items()), policy="token", device="cpu", num_kv_blocks=14,
                             num_host_kv_blocks=256, policy_kw=TURNS)
    alone = {a: _alone(p, "greedy") for a, p in paths.items()}
    plans = []  # the plan each step carried out
    real_mem, real_pipe = multi._execute_memory, multi._step_pipelined

    def pipelined(on_launch):
        ahead = multi._ahead
        out = real_pipe(on_launch)
        if out is not None:
            plans.append((ahead[0], [(r.request_id, n) for r, n in ahead[0].batch]))
        return out

    multi._execute_memory = lambda plan, **kw: (plans.append((plan, [(r.request_id, n) for r, n in plan.batch])),
                                                real_mem(plan, **kw))[1]
    multi._step_pipelined = pipelined
    _submit_rounds(multi, paths)
    done = {}
    while multi.has_unfinished_requests():
        n = len(plans)
        for o in multi.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
        plan, batch = plans[-1]
        if len(plans) > n and not plan.idle:
            out = multi.engines[plan.model].last_out
            assert sorted((c.request.request_id, c.num_tokens) for c in out.chunks) == sorted(batch)
    for a in paths:
        for i in range(len(PROMPTS)):
            for k in range(3):
                assert done[f"{a}/r{i}.{k}"] == alone[a][f"r{i}"]
    assert multi.kv_swapped_out > 0 and multi.timing["pipelined_steps"] > 0
    _no_leak(multi)


def _in_flight(multi, model: str | None = None, limit: int = 200, done: dict | None = None) -> str:
    """Step until a step is left in flight (of `model`, if given); its model. `done`: gets the finished outputs."""
    for _ in range(limit):
        for o in multi.step():
            if o.finished and done is not None:
                done[o.request_id] = o
        if multi._pipe is not None and (model is None or multi._pipe[0] == model):
            return multi._pipe[0]
    raise AssertionError("no step was left in flight")


def _setup(make_tiny, n_models: int = 2, max_tokens: int = 20, **kw):
    if n_models == 3:  # three 2-MiB slots (pooled in 6 MiB: two fit, weights rotate)
        paths = {"qwen2": make_tiny("qwen2"), "qwen3": make_tiny("qwen3"), "qwen2b": make_tiny("qwen2")}
    else:
        paths = {a: make_tiny(a) for a in ARCHS[:n_models]}
    multi = MultiModelEngine(dict(paths.items()), policy="token", device="cpu", policy_kw=TURNS, **kw)
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for a in paths:
        for i in range(2):
            multi.add_request(f"{a}/{i}", [3 + i, 4, 5], sp, model=a)
    return multi, paths, sp


def test_abort_flushes_the_step_in_flight(make_tiny, pipe):
    multi, paths, sp = _setup(make_tiny)
    a = _in_flight(multi)
    flushes = multi.timing["pipeline_flushes"]
    multi.abort_request(f"{a}/0")
    assert multi._pipe is None and multi.engines[a]._inflight is None
    assert multi.timing["pipeline_flushes"] == flushes + 1
    outs = multi.step()
    mine = [o for o in outs if o.request_id == f"{a}/0"]
    assert mine and mine[-1].finished and mine[-1].outputs[0].finish_reason == "abort"
    done = _run_all(multi, whole=False)
    ref = _alone_one(paths[a], [4, 4, 5], sp)
    assert done[f"{a}/1"].outputs[0].token_ids == ref
    _no_leak(multi)


def test_remove_model_flushes_the_step_in_flight(make_tiny, host_cache, pipe):
    from gpu_pool.arena import MiB

    page = 16 * 512
    multi, paths, sp = _setup(make_tiny, 3, gpu_budget=6 * MiB, kv_cache_gb=12 * page / 1e9,
                              host_kv_gb=256 * page / 1e9, host_cache=host_cache)
    early = {}
    a = _in_flight(multi, done=early)
    multi.remove_model(a)
    assert multi._pipe is None and a not in multi.engines
    done = {**early, **_run_all(multi, whole=False)}
    assert all(done[f"{a}/{i}"].finished for i in range(2))  # owed: tokens so far, then aborted
    for b in paths:
        if b != a:
            for i in range(2):
                assert done[f"{b}/{i}"].outputs[0].token_ids == _alone_one(paths[b], [3 + i, 4, 5], sp)
    _no_leak(multi)
    multi.close()


def test_a_switch_and_an_eviction_flush(make_tiny, host_cache, pipe):
    """A step in flight, then the turn goes to a model whose weights need another's slot: the step is read before
    the other model's plan runs its memory moves (no step of a model whose weights are moved is in flight); and a
    keep-alive eviction, set_pinned, preload, reset_stats flush too."""
    from gpu_pool.arena import MiB

    page = 16 * 512
    multi, paths, sp = _setup(make_tiny, 3, max_tokens=40, gpu_budget=6 * MiB, kv_cache_gb=12 * page / 1e9,
                              host_kv_gb=256 * page / 1e9, host_cache=host_cache)
    moves = []
    real = multi._execute_memory

    def execute_memory(plan, keep=()):
        if keep:  # co-stepping (on by default): another model's decode launched beside the step in flight, the one
            # switch that does not read it first -- and it moves no memory but a prefetch, never into `keep`'s slot
            # (deep co-stepping: both models with a step in flight are kept)
            assert not (plan.evict or plan.swap_out or plan.swap_in) and plan.prefetch not in keep
            assert {n for n, e in multi.engines.items() if e._inflight is not None} == set(keep)
        elif plan.evict or plan.swap_out or plan.model != (multi.trace[-1] if multi.trace else None):
            moves.append(plan.model)
            assert multi._pipe is None and all(e._inflight is None for e in multi.engines.values())
        return real(plan, keep=keep)

    multi._execute_memory = execute_memory
    multi.run()
    assert moves and multi.memory.stats.evictions > 0 and multi.switches > 0
    assert multi.timing["pipelined_steps"] > 0 and multi.timing["pipeline_flushes"] > 0
    _no_leak(multi)
    # the calls from outside a step
    for name, call in [("set_pinned", lambda m, a: m.set_pinned(a, True)),
                       ("reset_stats", lambda m, a: m.reset_stats()),
                       # (a model not held: preloading one held moves nothing, and reads nothing)
                       ("preload", lambda m, a: m.preload(next(b for b in m.engines if not m.memory.holds(b)))),
                       ("add_model", lambda m, a: m.add_model("extra", paths["qwen3"]))]:
        for b in paths:
            multi.add_request(f"{name}/{b}", [7, 8, 9], sp, model=b)
        a = _in_flight(multi)
        call(multi, a)
        assert multi._pipe is None and all(e._inflight is None for e in multi.engines.values()), name
        multi.run()
    for n in multi.engines:
        multi.set_pinned(n, False)
    multi.add_request("ka", [7, 8, 9], sp, model="qwen2")
    _in_flight(multi, "qwen2")
    idle = [n for n in multi.engines if n != "qwen2" and multi.memory.holds(n)]
    assert idle
    multi.set_keep_alive(idle[0], 0.0)
    multi.expire()  # idle past its keep-alive: evicted, so the step in flight is read first
    assert not multi.memory.holds(idle[0])
    assert multi._pipe is None
    multi.run()
    _no_leak(multi)
    multi.close()


def test_idle_drains_and_close(make_tiny, pipe):
    multi, paths, sp = _setup(make_tiny, 1, max_tokens=6)
    _in_flight(multi)
    done = multi.run()
    assert set(done) == {f"{ARCHS[0]}/0", f"{ARCHS[0]}/1"}
    _no_leak(multi)
    multi.add_request("x", [1, 2, 3], sp)
    _in_flight(multi)
    multi.close()
    assert multi._pipe is None


def test_the_pipeline_is_on_by_default(monkeypatch):
    from tokenpool import env

    monkeypatch.delenv("TOKENPOOL_PIPELINE", raising=False)
    assert env.PIPELINE.on()
    monkeypatch.setenv("TOKENPOOL_PIPELINE", "0")
    assert not env.PIPELINE.on()


def test_flag_off_pipelines_nothing(make_tiny, monkeypatch):
    monkeypatch.setattr(multi_engine, "PIPELINE", False)  # TOKENPOOL_PIPELINE=0
    paths = {a: make_tiny(a) for a in ARCHS[:2]}
    alone = {a: _alone(p, "greedy") for a, p in paths.items()}
    multi = MultiModelEngine(dict(paths.items()), policy="token", device="cpu", policy_kw=TURNS)
    _interleaved_equals_alone(multi, alone, "greedy")
    c = multi.snapshot()["counters"]
    assert c["pipelined_steps"] == c["pipeline_kept"] == c["pipeline_flushes"] == 0 and multi._pipe is None


def _two_models_learning(make_tiny, monkeypatch):
    """Two tiny models, three greedy requests each submitted, and every step the cost model learns noted as
    (model, seconds): (the engine, {model: path}, that list)."""
    paths = {a: make_tiny(a) for a in ARCHS[:2]}
    multi = MultiModelEngine(dict(paths.items()), policy="token", device="cpu", policy_kw=TURNS)
    learned = []
    obs = multi.cost.observe_step
    monkeypatch.setattr(multi.cost, "observe_step", lambda n, shape, dt: (learned.append((n, dt)), obs(n, shape, dt)))
    for i, p in enumerate(PROMPTS[:3]):
        for a in paths:
            multi.add_request(f"{a}/{i}", p, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), model=a)
    return multi, paths, learned


def test_a_callers_pause_between_steps_is_not_priced_into_pipelined_steps(make_tiny, pipe, monkeypatch):
    """A step kept in flight is learned from the interval between reads less the caller's own time between the two
    step calls: a caller that works 40 ms between calls (`bench pool --real` replays arrivals and makes text on the
    step's thread) does not teach the cost model 40 ms steps, whose time quotas would then buy turns of seconds."""
    import time

    multi, _, noted = _two_models_learning(make_tiny, monkeypatch)
    calls = []
    while multi.has_unfinished_requests():
        t = time.perf_counter()
        multi.step()
        calls.append(time.perf_counter() - t)
        time.sleep(0.04)  # the caller's own work
    c = multi.snapshot()["counters"]
    learned = [dt for _, dt in noted]
    assert c["pipelined_steps"] > 0 and learned
    # the steps learned are priced at their own time, not the pause: a priced pause would put each at a step call's
    # time plus 40 ms, so their median stays near a call's (the calls themselves, not a fixed bound: on 2 cores
    # loaded by an install beside the test a tiny model's step call took ~40 ms); and their sum is within the time
    # spent inside step calls
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    assert median(learned) <= 1.5 * median(calls) + 0.005, (learned, calls)
    assert sum(learned) <= sum(calls) * 1.05
    _no_leak(multi)


@pytest.mark.parametrize("learn", ["interval", "none"])
def test_step_trace_and_what_pipelined_steps_teach(make_tiny, pipe, monkeypatch, tmp_path, learn):
    """TOKENPOOL_STEP_TRACE: every step the cost model learns (or, pipelined with TOKENPOOL_PIPELINE_LEARN=none, would
    have learned) is a CSV line naming its model, kind and shape, each pipelined call's host time by part a "cycle"
    line, and each collector pause a "gc" line; the file and the collector hook go with `close`. With `none` no
    pipelined step reaches the cost model."""
    import gc

    trace = tmp_path / "steps.csv"
    monkeypatch.setenv("TOKENPOOL_STEP_TRACE", str(trace))
    monkeypatch.setattr(multi_engine, "PIPELINE_LEARN", learn)
    multi, paths, learned = _two_models_learning(make_tiny, monkeypatch)
    _run_all(multi)
    gc.collect()
    multi.close()
    assert multi._trace_gc not in gc.callbacks
    rows = [line.split(",") for line in trace.read_text().splitlines()]
    steps = [r for r in rows if r[2] in ("read", "pipelined")]
    cycles = [r for r in rows if r[2] == "cycle"]
    assert cycles and all(float(v) >= 0 for r in cycles for v in r[4:])  # a pipelined call's host time, by part
    assert {r[1] for r in steps} == set(paths) and all(len(r) == (13 if r[2] == "cycle" else 10) for r in rows)
    assert any(r[1] == "gc" for r in rows)  # the collect above, at least
    piped = [r for r in steps if r[2] == "pipelined"]
    assert piped and all(int(r[3]) >= 1 and float(r[6]) > 0 for r in piped)
    read = [r for r in steps if r[2] == "read"]
    assert all(r[9] == "1" for r in read)
    # the cost model saw exactly the steps the trace marks learned
    assert len(learned) == sum(r[9] == "1" for r in steps)
    if learn == "none":
        assert all(r[9] == "0" for r in piped)
    else:
        assert any(r[9] == "1" for r in piped)


def test_rows_matched_against_their_tokens_are_not_launched_overlapped(make_tiny):
    """A decode is queued a step ahead only when no row's sampling reads the tokens the host has not read yet:
    bad_words (matched against the output's end) keeps its rows out, as penalties and min_tokens do;
    allowed_token_ids and include_stop_str_in_output do not."""
    from token_scheduler.request import Request

    eng = LLMEngine(EngineConfig(model=str(make_tiny("qwen2")), device="cpu"))

    def req(**sp):
        return Request("r", [5, 6, 7], SamplingParams(temperature=0.0, **sp))

    assert eng.runner.launchable(1, [req()])
    assert eng.runner.launchable(1, [req(allowed_token_ids=[3, 4]), req(stop=["x"], include_stop_str_in_output=True)])
    for sp in (dict(bad_words=["hello"]), dict(repetition_penalty=1.2), dict(min_tokens=3)):
        assert not eng.runner.launchable(2, [req(), req(**sp)]), sp


def test_allowed_token_ids_past_the_vocabulary_are_refused(make_tiny):
    """An allowed id outside the model's vocabulary is refused when the request is added (every id allowed could be
    one: the row would have nothing left to draw)."""
    eng = LLMEngine(EngineConfig(model=str(make_tiny("qwen2")), device="cpu"))
    v = eng.model_config.vocab_size
    with pytest.raises(ValueError, match=f"token id {v} is outside the vocabulary"):
        eng.add_request("r", [5, 6], SamplingParams(allowed_token_ids=[3, v]))
    assert not eng.has_unfinished_requests()
