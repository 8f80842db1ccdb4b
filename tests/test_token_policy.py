"""The token policy's rules for many models per GPU, as pure functions of a PoolState (or the round's numbers):
the deadline rule (quota.need_round) under pressure, turns that end once their streams are covered, plans that
count arena bytes only where one free range holds the slot, victims of the slot's own size, and hops."""

from __future__ import annotations

import pytest

from load_tests.simulator import SimRequest
from token_scheduler.cost_model import CostModel, HardwareProfile, ModelSize
from token_scheduler.policies import TokenConfig, make_policy
from token_scheduler.policies.demand import covered
from token_scheduler.policies.memory import fit_step
from token_scheduler.policies.quota import TurnDemand, need_round
from token_scheduler.policies.slo import ModelSLO
from token_scheduler.policies.state import ModelState, PoolState, Residency
from token_scheduler.request import RequestStatus

FLAT = HardwareProfile("flat", 1e30, 1e30, 1e30, 1e30, 0.01, 0.0, 0.1, 0.0)  # every step 10 ms, load 100 ms
INF = float("inf")


def test_need_round_by_hand():
    # T = 100 ms. a: a stream 0.3 s from its next deadline; b: all streams 10 s ahead; c: only a waiting
    # request whose first token is due in 0.5 s (after its 50 ms prefill). Floor 1 s, no margin.
    d = [TurnDemand("a", 0.01, 0.1, run_slack_s=0.3), TurnDemand("b", 0.02, 0.1, run_slack_s=10.0),
         TurnDemand("c", 0.01, 0.1, prefill_s=0.05, wait_slack_s=0.5)]
    p = need_round(d, floor_s=1.0, cap_s=4.0, margin_s=0.0)
    # a starts at 0 and runs next ~1 s later: (1 - 0.3) / 0.1 = 7 steps = 70 ms. b needs nothing: sits out.
    # c starts at 0.07: covered until 1.07, its request admitted: (1.07 - 0.5) / 0.1 = 5.7 steps + prefill.
    assert set(p.quota_s) == {"a", "c"} and not p.overloaded
    assert p.target_s == pytest.approx({"a": 1.0, "c": 1.07})
    assert p.prefill_s["c"] == pytest.approx(0.05)
    need = 0.07 + 0.05 + 0.057
    # the floor's time left over banks slack, split by d / T (equal here)
    assert p.length_s == pytest.approx(1.0)
    assert p.quota_s["a"] == pytest.approx(0.07 + (1.0 - need) / 2)
    assert p.quota_s["c"] == pytest.approx(0.057 + (1.0 - need) / 2)


def test_need_round_margin_shrinks_to_what_fits():
    """The margin is banked only while the round fits under its cap: a full one with time to spare, a smaller
    one (down to none) when the GPU is short -- never a round that asks every model for more than there is."""
    d = [TurnDemand(m, 0.05, 0.1, run_slack_s=0.2) for m in "abcd"]  # each d / T = 0.5: 4 models, S = 2
    roomy = need_round(d[:1], floor_s=0.0, cap_s=4.0, margin_s=1.0)
    assert roomy.target_s["a"] == pytest.approx(roomy.length_s + 1.0, rel=1e-2) and not roomy.overloaded
    # two models of d / T = 0.25: with the full 1 s margin the round would be 1.03 s > its 1 s cap; with half
    # of it, 0.45 s of turns under the 0.5 s floor
    two = [TurnDemand(m, 0.025, 0.1, run_slack_s=0.2) for m in "ab"]
    tight = need_round(two, floor_s=0.5, cap_s=1.0, margin_s=1.0)
    assert tight.length_s == pytest.approx(0.5) and not tight.overloaded
    assert tight.target_s == pytest.approx({"a": 1.0, "b": 0.5 + 0.5 + 0.25 * 0.8})
    over = need_round(d, floor_s=0.5, cap_s=1.0, margin_s=1.0)
    assert over.overloaded and over.target_s["a"] == pytest.approx(1.0)  # no margin at all, R = cap


def test_need_round_keeps_turns_when_a_smaller_margin_has_none():
    """Two models whose streams are 1.8 s from their next deadlines, 50 ms steps (d / T = 0.5 each), floor 0.5 s,
    cap 1 s. With the full 2 s margin each must cover 0.5 + 1 + 2 s: 1.5 s of turns, over the cap. With half of
    it nobody's stream is due before 0.5 + 1 = 1.5 s, so no model needs a turn: an empty round that "fits", and
    the policy used to plan pace quotas instead (uncapped: TokenPolicy._need_plan). keep_turns keeps the round
    of the last margin that had turns, overloaded."""
    d = [TurnDemand(m, 0.05, 0.1, run_slack_s=1.8) for m in "ab"]
    empty = need_round(d, floor_s=0.5, cap_s=1.0, margin_s=2.0)
    assert empty.quota_s == {} and not empty.overloaded
    kept = need_round(d, floor_s=0.5, cap_s=1.0, margin_s=2.0, keep_turns=True)
    assert kept.overloaded and kept.length_s == pytest.approx(1.5)
    assert kept.quota_s == pytest.approx({"a": 0.6, "b": 0.9})  # (3.0 - 1.8) / 0.1 and (3.6 - 1.8) / 0.1 steps
    assert kept.target_s == pytest.approx({"a": 3.0, "b": 3.6})  # each turn's start + R (at its cap) + 2 s
    # a margin that fits with turns in it is taken as before: nothing kept from a larger one
    assert need_round(d[:1], floor_s=0.5, cap_s=1.0, margin_s=2.0, keep_turns=True) == \
        need_round(d[:1], floor_s=0.5, cap_s=1.0, margin_s=2.0)


def _req(rid: str, model: str, arrival: float, outputs: int, status=RequestStatus.RUNNING, prompt: int = 10):
    r = SimRequest(rid, model, arrival, prompt, 1000, None)  # type: ignore[arg-type]
    r.num_output, r.status = outputs, status
    r.num_computed_tokens = prompt + outputs - 1 if status != RequestStatus.WAITING else 0
    return r


def _pool(names, weight=1000, capacity=10**9, residency=Residency.RESIDENT, sizes=None):
    """A pooled arena's view: `capacity` bytes of weight space, a KV region apart (KV is not the point here)."""
    specs = {n: ModelSize(n, (sizes or {}).get(n, weight), 0, 1.0, 1.0) for n in names}
    models = {n: ModelState(s, ModelSLO(10.0, 0.1), residency=residency) for n, s in specs.items()}
    return PoolState(models, capacity_bytes=capacity, cost=CostModel(FLAT, list(specs.values())),
                     kv_capacity_bytes=10**9)


def test_a_fit_with_a_negative_token_term_prices_no_prefill_under_zero():
    """As served fits came out (98caf51, a 1.5B): -0.068 ms a token, 74 ns a pair, 37 ms a prefilling step. Three
    waiting 256-token prompts priced -0.5 ms, which widened their wait slack; now 0, and one prompt as fitted."""
    from token_scheduler.cost_model import _FEATURE_SCALES
    from token_scheduler.policies.batching import BatchLimits
    from token_scheduler.policies.demand import prefill_s

    st = _pool(["m"])
    fit = st.cost._step["m"]
    coef = (1e-3, 5.6e-4, -6.8e-5, 0.0, 7.4e-8, 0.0371)
    fit.theta = [c * s for c, s in zip(coef, _FEATURE_SCALES, strict=True)]
    st.cost._coef.clear()
    m = st.models["m"]
    m.waiting.extend(_req(f"w{i}", "m", 0.0, 0, RequestStatus.WAITING, prompt=256) for i in range(3))
    assert prefill_s(st, m, BatchLimits()) == 0.0
    while len(m.waiting) > 1:
        m.waiting.pop()
    assert prefill_s(st, m, BatchLimits()) == pytest.approx(256 * -6.8e-5 + 256 * 256 * 7.4e-8 + 0.0371)


def test_turn_is_covered_once_every_stream_is_past_the_target():
    st = _pool(["m"])
    m = st.models["m"]
    m.running = [_req("r0", "m", 0.0, 5), _req("r1", "m", 1.0, 3)]  # next deadlines 10.5 and 11.3
    assert covered(m, 10.5) and not covered(m, 10.6)
    m.waiting.append(_req("w", "m", 0.2, 0, RequestStatus.WAITING))  # first token due at 10.2
    assert not covered(m, 10.3) and covered(m, 10.2)


def test_under_pressure_the_tight_model_runs_and_the_ones_with_slack_sit_out():
    """Ten models with a decode share of 0.11 each (10 ms steps, TPOT 100 ms, headroom 1.1): pace quotas do not
    fit. The deadline rule gives a turn only to the model whose stream is 0.2 s from its next deadline; the
    others are 10 s ahead and sit the round out. The turn runs past its planned time until its stream is
    covered to the target."""
    names = [f"m{i}" for i in range(10)]
    st = _pool(names)
    for i, n in enumerate(names):
        arrival = -9.8 if n == "m7" else 0.0
        st.models[n].running.append(_req(f"r{i}", n, arrival, 0 if n == "m7" else 1))
        st.models[n].kv_gpu_tokens = 16
    pol = make_policy("token")
    plan = pol.schedule(st)
    assert plan.model == "m7" and pol.need_rounds == 1
    assert list(pol._queue) == []  # nobody else needs a turn this round
    t = pol._turn
    assert t.target is not None and t.target > st.now + 0.2
    # planned time used up, stream not yet covered: the turn goes on
    t.steps, t.start = 5, st.now - 10 * t.quota_s / 9  # just past its quota, within the 2x + 0.1 s bound
    assert not covered(st.models["m7"], t.target) and pol._continue(st, t)


def test_need_keep_turns_plans_a_deadline_round_where_pace_quotas_had_no_cap(monkeypatch):
    """Eight models in host memory, 10 ms steps, 100 ms loads, each stream 2 s from its next deadline: the
    switches alone (C = 0.8 s) do not fit under a 4 s round at S = 0.88, so the deadline rule is asked -- and
    finds, once its margin has shrunk, that no model needs a turn. Pace quotas then planned a round of
    C / (1 - S) = 6.7 s, past both max_round_s and the 2 s of slack that capped it. With need_keep_turns
    (TOKENPOOL_NEED_KEEP_TURNS=1) the deadline rule plans the round: its turns run to their streams' targets."""
    names = [f"m{i}" for i in range(8)]

    def first_plan(**kw):
        st = _pool(names, residency=Residency.HOST, capacity=10**6)
        for i, n in enumerate(names):
            st.models[n].running.append(_req(f"r{i}", n, -8.0, 0))
        pol = make_policy("token", **kw)
        return pol, pol.schedule(st)

    pace, plan = first_plan(need_keep_turns=False)
    assert plan.model == "m0" and pace.need_rounds == 0 and pace.last_round_s == pytest.approx(0.8 / 0.12)
    assert pace._turn.target is None
    need, plan = first_plan(need_keep_turns=True)
    assert plan.model == "m0" and need.need_rounds == 1 and need._plan.overloaded
    assert need._turn.target is not None and set(need._queue) == set(names[1:])
    monkeypatch.setenv("TOKENPOOL_NEED_KEEP_TURNS", "1")
    assert TokenConfig().need_keep_turns
    monkeypatch.delenv("TOKENPOOL_NEED_KEEP_TURNS")
    assert not TokenConfig().need_keep_turns  # off by default: the plans as before


def test_plans_count_free_bytes_only_where_one_range_holds_the_slot():
    """A 1000-byte model to load; 500 bytes free but in ranges of 250. Counting bytes, evicting 500 more looks
    enough (two small idle models -- whose freed ranges need not join up); counting ranges, a whole slot's
    worth goes, and a victim of the slot's own size first: its range is exactly the one needed."""
    st = _pool(["c", "d", "b", "a"], capacity=2000, sizes={"c": 250, "d": 250})
    a = st.models["a"]
    a.residency = Residency.HOST
    a.waiting.append(_req("w", "a", 0.0, 0, RequestStatus.WAITING))
    assert st.free_bytes() == 500
    st.weight_free_run = 250
    assert st.slot_room(1000) == 0 and st.slot_room(200) == 500
    victims = ["c", "d", "b"]
    blind = fit_step(st, a, 0, lambda: victims)
    assert blind.room.evict == ["c", "d"]
    aware = fit_step(st, a, 0, lambda: victims, ranges=True)
    assert aware.room.evict == ["c", "d", "b"]  # in the order given: the caller puts same-size victims first
    plan = make_policy("token").schedule(st)
    assert plan.model == "a" and plan.evict == ["b"]
    plan = make_policy("token", see_ranges=False, sized_victims="off").schedule(st)
    assert plan.model == "a" and plan.evict == ["c", "d"]
    st.weight_free_run = None  # no arena: bytes are all that count
    assert st.slot_room(1000) == 500


def test_prefetch_into_a_fragmented_arena_evicts_a_slot_of_its_size():
    """The next model of the round is in host memory and no free range holds it: the prefetch plans a victim
    of its size (an idle one) instead of counting scattered free bytes (a skipped prefetch, then a stall)."""
    st = _pool(["x", "s1", "s2", "big", "run", "nxt"], capacity=4000,
               sizes={"s1": 250, "s2": 250, "run": 500})
    for n in ("run", "nxt"):
        st.models[n].waiting.append(_req(f"w{n}", n, 0.0 if n == "run" else 1.0, 0, RequestStatus.WAITING))
    st.models["nxt"].residency = Residency.HOST
    st.now = 1.0
    # resident: x 1000, s1 250, s2 250, big 1000, run 500 = 3000 of 4000; the free 1000 lie in ranges of 500
    st.weight_free_run = 500
    plan = make_policy("token", hop=False).schedule(st)
    assert plan.model == "run" and plan.prefetch == "nxt"
    assert plan.evict in (["x"], ["big"])  # one idle 1000-byte slot, not the two small ones
    blind = make_policy("token", hop=False, see_ranges=False).schedule(st)
    assert blind.model == "run" and blind.prefetch == "nxt" and blind.evict == []


def test_a_resident_model_hops_ahead_of_one_whose_weights_are_not_in():
    """The round is z (in host memory), then y (resident): y's short turn fits in z's load time, so y goes
    first while z is prefetched -- useful work instead of a blocking load."""
    st = _pool(["x", "y", "z"], capacity=10_000)
    for n, t in (("z", 0.0), ("y", 1.0)):
        st.models[n].waiting.append(_req(f"{n}0", n, t, 0, RequestStatus.WAITING))
    st.models["z"].residency = Residency.HOST
    st.now = 2.0
    pol = make_policy("token")
    plan = pol.schedule(st)
    assert plan.model == "y" and plan.prefetch == "z" and pol.hops == 1
    plan = make_policy("token", hop=False).schedule(st)
    assert plan.model == "z"


def test_a_pace_turn_runs_the_steps_its_quota_was_planned_to_buy():
    """Pace quotas are time: q = R h d / T buys R h / T steps at the predicted d. A model whose steps the cost model
    underprices got fewer tokens than its pace, turn after turn (served on the H200: a 1.5B priced at ~0 ms got one
    step a turn while its lateness grew ~1 s a second). A pace turn now runs the steps its quota bought, within
    twice its quota + 0.1 s; `pace_steps=False` keeps the time quota alone."""
    def first_turn(**kw):
        st = _pool(["a", "b"])
        for n in "ab":
            st.models[n].running.append(_req(f"r{n}", n, 0.0, 1))
            st.models[n].kv_gpu_tokens = 16
        pol = make_policy("token", min_round_s=1.0, **kw)
        assert pol.schedule(st).model == "a" and pol.need_rounds == 0  # 10 ms steps, d / T = 0.1: pace quotas
        return st, pol, pol._turn

    st, pol, t = first_turn()
    # a 1 s round: 1.1 x 10 ms / 100 ms of it, 0.11 s, buys 11 steps at FLAT's 10 ms each
    assert t.quota_s == pytest.approx(0.11) and t.steps_min == pytest.approx(11)
    t.steps, t.start = 1, st.now - 1.5 * t.quota_s  # its steps took longer than predicted: quota spent, 1 step run
    assert pol._continue(st, t)
    t.steps = int(t.steps_min) + 1  # the steps it bought: the turn ends
    assert not pol._continue(st, t) and pol.turn_ends == (0, 1, 0)  # (booked: its quota spent, its need met)
    t.steps, t.start = 1, st.now - (2.0 * t.quota_s + 0.11)  # and never past twice its quota + 0.1 s
    assert not pol._continue(st, t) and pol.turn_ends == (0, 1, 1)  # (booked: cut at the limit, still short)
    st.models["a"].running.clear()  # out of work: the turn ends whatever its quota
    t.steps, t.start = 1, st.now
    assert not pol._continue(st, t) and pol.turn_ends == (1, 1, 1)
    pol.reset_counters()
    assert pol.turn_ends == (0, 0, 0)
    st, pol, t = first_turn(pace_steps=False)
    assert t.steps_min == 0.0
    t.steps, t.start = 1, st.now - 1.5 * t.quota_s
    assert not pol._continue(st, t)


def test_round_terms_book_what_set_each_rounds_length():
    """TokenPolicy.round_terms, per round formed: its models, their loads' PCIe seconds, its cap, and what set its
    length -- pace quotas' (C + P) / (1 - S), the PCIe rotation floor, or the deadline rule; a checkpoint and
    reset_counters cover them."""
    from token_scheduler.policies.token import ROUND_TERMS

    names = [f"m{i}" for i in range(8)]

    def first_round(residency, capacity, **kw):
        st = _pool(names, residency=residency, capacity=capacity)
        for i, n in enumerate(names):
            st.models[n].running.append(_req(f"r{i}", n, -8.0, 0))  # each stream ~2 s from its next deadline
        pol = make_policy("token", **kw)
        cp = pol.checkpoint()
        assert not pol.schedule(st).idle
        t = dict(zip(ROUND_TERMS, pol.round_terms))
        return pol, cp, t, {k: t[k] for k in ROUND_TERMS[3:] if t[k]}

    # 8 loads of 100 ms, 10 ms steps: pace quotas, C / (1 - S) = 6.7 s (over the slack's cap: nothing caps C)
    pace, cp, t, bound = first_round(Residency.HOST, 10**6, need_keep_turns=False)
    assert bound == {"formula": 1} and t["models"] == 8 and t["link_s"] == pytest.approx(0.8)
    assert t["cap_s"] == pytest.approx(2.0, abs=0.2)  # the least banked slack, under max_round_s (4 s)
    pace.restore(cp)
    assert pace.round_terms == (0,) * len(ROUND_TERMS)
    # the same under the deadline rule
    _, _, t, bound = first_round(Residency.HOST, 10**6, need_keep_turns=True)
    assert bound == {"need": 1} and t["models"] == 8 and t["link_s"] == pytest.approx(0.8)
    # every model resident but the arena holds half of them: nothing to load this round, the PCIe rotation floors it
    pol, _, t, bound = first_round(Residency.RESIDENT, 4000)
    # (the rotation's 4000 bytes load in the profile's 0.1 s, PCIe at most half busy: 0.2 s)
    assert bound == {"floor": 1} and t["link_s"] == 0.0 and pol.last_round_s == pytest.approx(0.2)
    pol.reset_counters()
    assert pol.round_terms == (0,) * len(ROUND_TERMS)


def test_late_rule_pace_plans_a_late_stream_from_now_not_from_its_lost_deadlines():
    """Ten models under pressure (as above); m7's first token was due 5 s ago, so its request has missed under the
    deadline rule whatever happens now. Catching up (the default) asks its turn for the 5 s behind as well as
    the round and the 4 s margin ahead: R = n d with n = (R + 4 + 5) / T, d = 10 ms -> a 1.0 s turn. Re-anchored
    ("pace"), it is due now: n = (R + 4) / T -> 0.44 s, and the other models' turns come that much sooner."""
    names = [f"m{i}" for i in range(10)]

    def first(**kw):
        st = _pool(names)
        for i, n in enumerate(names):
            st.models[n].running.append(_req(f"r{i}", n, -15.0 if n == "m7" else 0.0, 0 if n == "m7" else 1))
            st.models[n].kv_gpu_tokens = 16
        pol = make_policy("token", **kw)
        return st, pol, pol.schedule(st)

    _, catch, plan = first()
    assert plan.model == "m7" and catch._turn.quota_s == pytest.approx(1.0, rel=0.02) and catch._shift == {}
    st, pace, plan = first(late_rule="pace")
    assert plan.model == "m7" and pace._turn.quota_s == pytest.approx(0.4 / 0.9, rel=0.02)
    assert pace._shift == {"r7": pytest.approx(5.0)}
    m7 = st.models["m7"]
    # its turn ends once the stream is covered on the moved deadlines (4.44 s of tokens from now), not the old ones
    assert not covered(m7, pace._turn.target) and not covered(m7, pace._turn.target, pace._shift)
    m7.running[0].num_output = 45
    assert covered(m7, pace._turn.target, pace._shift) and not covered(m7, pace._turn.target)
    cp = pace.checkpoint()  # a plan made ahead and dropped puts the moved deadlines back as they were
    pace._reanchor([], {})
    assert pace._shift == {}  # (no stream running: nothing kept)
    pace.restore(cp)
    assert pace._shift == {"r7": pytest.approx(5.0)}
    with pytest.raises(ValueError, match="late_rule"):
        from token_scheduler.policies import policy_options

        policy_options("token", {"late_rule": "drop"})
