"""Policy arithmetic and invariants: quotas by hand, preemption/resume order, SLO accounting."""

from __future__ import annotations

import dataclasses

import pytest

from load_tests.simulator import SimRequest
from token_scheduler.cost_model import CostModel, HardwareProfile, ModelSize
from token_scheduler.policies import make_policy
from token_scheduler.policies.batching import BatchLimits, build_batch
from token_scheduler.policies.quota import TurnDemand, aegaeon_round, token_round
from token_scheduler.policies.slo import ModelSLO, RequestRecord, summarize
from token_scheduler.policies.state import ModelState
from token_scheduler.request import RequestStatus

FLAT = HardwareProfile("flat", 1e30, 1e30, 1e30, 1e30, 0.01, 0.0, 0.1, 0.0)  # every step 10 ms, load 100 ms


def test_token_round_by_hand():
    # d = 10 and 20 ms, TPOT 100 ms, 100 ms of exposed switching, no headroom:
    # S = 0.1 + 0.2 = 0.3, R = C / (1 - S) = 0.1 / 0.7, q_i = R * d_i / T_i.
    p = token_round([TurnDemand("a", 0.01, 0.1, switch_s=0.05), TurnDemand("b", 0.02, 0.1, switch_s=0.05)],
                    headroom=1.0)
    R = 0.1 / 0.7
    assert p.length_s == pytest.approx(R)
    assert p.quota_s["a"] == pytest.approx(R * 0.1) and p.quota_s["b"] == pytest.approx(R * 0.2)
    # Over the round each model emits q_i / d_i tokens: mean TPOT = R / (q_i / d_i) = T exactly.
    assert p.length_s / (p.quota_s["a"] / 0.01) == pytest.approx(0.1)
    assert not p.overloaded


def test_token_round_prefill_floor_and_cap():
    d = [TurnDemand("a", 0.01, 0.1, prefill_s=0.2), TurnDemand("b", 0.01, 0.1, load_s=0.5)]
    p = token_round(d, headroom=1.0, max_round_s=4.0)
    # P = 0.2, S = 0.2 -> R = 0.25, then raised to the PCIe time 0.5: the spare 0.25 - (0.5 * 0.2)... goes to prefill
    assert p.length_s == pytest.approx(0.5)
    assert p.quota_s["a"] == pytest.approx(0.05)
    assert p.prefill_s["a"] == pytest.approx(0.5 - 0.1)
    # A cap shrinks prefill first: R = 0.3 -> P' = 0.3 * 0.8 = 0.24
    p2 = token_round([TurnDemand("a", 0.01, 0.1, prefill_s=1.0), TurnDemand("b", 0.01, 0.1)], 1.0, 0.0, 0.3)
    assert p2.length_s == pytest.approx(0.3) and p2.prefill_s["a"] == pytest.approx(0.24)


def test_token_round_overloaded_splits_by_priority():
    d = [TurnDemand("a", 0.08, 0.1, weight=3.0), TurnDemand("b", 0.08, 0.1, weight=1.0)]
    p = token_round(d, headroom=1.0, max_round_s=2.0)
    assert p.overloaded and p.length_s == 2.0
    assert p.quota_s["a"] == pytest.approx(3 * p.quota_s["b"]) and sum(p.quota_s.values()) == pytest.approx(2.0)


def test_aegaeon_round_by_hand():
    # n = T/d = 10, 5; c0 = 0.2; alpha = max(0.2 * 0.2 / 4 + 0.3, 0.5) = 0.5; q_i = c0 (1/n_i) / (alpha - 0.3)
    p = aegaeon_round([TurnDemand("a", 0.01, 0.1, switch_s=0.1), TurnDemand("b", 0.02, 0.1, switch_s=0.1)])
    assert p.quota_s["a"] == pytest.approx(0.1) and p.quota_s["b"] == pytest.approx(0.2)
    assert p.length_s == pytest.approx(0.5)
    # mean TPOT = alpha * T = 50 ms for both
    assert p.length_s / (p.quota_s["a"] / 0.01) == pytest.approx(0.05)
    # heavy switching: alpha > 0.5, the largest quota hits Qmax = 4 s
    p = aegaeon_round([TurnDemand("a", 0.01, 0.1, switch_s=3.0), TurnDemand("b", 0.02, 0.1, switch_s=3.0)])
    assert max(p.quota_s.values()) == pytest.approx(4.0)


def _model(n_running: int, n_swapped: int = 0, n_waiting: int = 0, bpt: int = 1):
    spec = ModelSize("m", weight_bytes=1000, kv_bytes_per_token=bpt, flops_per_token=1.0, attn_flops_per_pair=1.0)
    m = ModelState(spec, ModelSLO())
    k = 0
    for status, n in ((RequestStatus.RUNNING, n_running), (RequestStatus.SWAPPED, n_swapped)):
        for _ in range(n):
            r = SimRequest(f"r{k}", "m", float(k), 10, 100, None)  # type: ignore[arg-type]
            r.num_output, r.num_computed_tokens, r.status = 1, 10, status
            m.running.append(r)
            m.kv_gpu_tokens += 10 if status == RequestStatus.RUNNING else 0
            k += 1
    for _ in range(n_waiting):
        m.waiting.append(SimRequest(f"r{k}", "m", float(k), 10, 100, None))  # type: ignore[arg-type]
        k += 1
    return m, CostModel(FLAT, [spec])


def test_preempt_newest_first_resume_oldest_first():
    m, cost = _model(n_running=4)
    # 2 bytes free: the two oldest decodes grow by 1 each only after the newest is swapped out (10 bytes back)
    b = build_batch(cost, m, BatchLimits(), free_bytes=1)
    assert [r.request_id for r in b.swap_out] == ["r3"]
    assert [r.request_id for r, _ in b.entries] == ["r0", "r1", "r2"]
    m, cost = _model(n_running=4)
    b = build_batch(cost, m, BatchLimits(), free_bytes=0)
    assert [r.request_id for r in b.swap_out] == ["r3"]  # one victim frees 10 bytes: enough for all three
    # resume: three swapped, room for two (11 bytes each) -> the two oldest, in order; no new admissions
    m, cost = _model(n_running=0, n_swapped=3, n_waiting=2)
    b = build_batch(cost, m, BatchLimits(), free_bytes=25)
    assert [r.request_id for r in b.swap_in] == ["r0", "r1"]
    assert [r.request_id for r, _ in b.entries] == ["r0", "r1"]
    # with room for all, they resume and then new ones are admitted as one FCFS group
    m, cost = _model(n_running=0, n_swapped=3, n_waiting=2)
    b = build_batch(cost, m, BatchLimits(group_size=1), free_bytes=10**6)
    assert [r.request_id for r, _ in b.entries] == ["r0", "r1", "r2", "r3"]
    assert b.entries[-1][1] == 10  # the whole prompt in one chunk


def test_prefill_is_chunked():
    m, cost = _model(n_running=0, n_waiting=1)
    m.waiting[0].num_prompt_tokens = 5000
    b = build_batch(cost, m, BatchLimits(max_tokens=1024), free_bytes=10**9)
    assert b.entries[0][1] == 1024


def test_slo_attainment_by_hand():
    slo = ModelSLO(ttft_s=1.0, tpot_s=0.1)
    # deadlines for arrival 0: 1.0, 1.1, 1.2, 1.3
    ok = RequestRecord("ok", "m", 0.0, 5, 4, slo)
    for t in (0.2, 0.25, 1.2, 1.3):  # a 0.95 s gap, paid for by banked slack: on time
        ok.on_token(t)
    late = RequestRecord("late", "m", 0.0, 5, 4, slo)
    for t in (0.9, 1.0, 1.25, 1.3):  # token 2 due at 1.2, came at 1.25
        late.on_token(t)
    slow_first = RequestRecord("ttft", "m", 0.0, 5, 2, slo)
    for t in (1.05, 1.08):
        slow_first.on_token(t)
    unfinished = RequestRecord("cut", "m", 0.0, 5, 3, slo)
    unfinished.on_token(0.1)
    s = summarize([ok, late, slow_first, unfinished])
    assert ok.attained() and not late.attained() and not slow_first.attained() and not unfinished.attained()
    assert s.attainment == 0.25
    # mean rule: ok has mean TPOT 1.1 / 3 > 0.1 -> miss; late: TTFT 0.9, mean 0.4 / 3 > 0.1 -> miss
    assert not ok.attained("mean") and s.attainment_mean_rule == 0.0
    assert s.token_attainment == pytest.approx((4 + 3 + 1 + 1) / (4 + 4 + 2 + 3))
    assert ok.max_gap == pytest.approx(0.95)
    d = s.per_model_detail["m"]
    assert d["requests"] == 4 and d["missed"] == 3 and d["ttft_late"] == 1  # only slow_first's first token


def test_policy_registry():
    for name in ("token", "aegaeon", "request", "static"):
        assert make_policy(name).name == name
    with pytest.raises(ValueError):
        make_policy("nope")


@pytest.mark.parametrize("placement", ["window", "lru"])
def test_token_policy_hands_its_victim_order_to_the_mechanism(placement):
    """For a fragmented arena the plan says which models may go: for the load every landed model but the one
    stepping, for the prefetch none of the models the round needs up to the prefetch target."""
    from token_scheduler.policies.state import PoolState, Residency

    specs = {n: ModelSize(n, 1000, 0, 1.0, 1.0) for n in "xyzw"}
    models = {n: ModelState(s, ModelSLO()) for n, s in specs.items()}
    for n, t in (("z", 0.0), ("y", 1.0), ("w", 2.0)):  # least slack first: the round is z, y, w
        models[n].waiting.append(SimRequest(f"{n}0", n, t, 10, 5, None))  # type: ignore[arg-type]
    models["x"].residency = models["y"].residency = Residency.RESIDENT  # x idle, z and w in host memory
    st = PoolState(models, capacity_bytes=10_000, cost=CostModel(FLAT, list(specs.values())), now=2.0)
    plan = make_policy("token", placement=placement, hop=False).schedule(st)  # hop: y would go first (below)
    assert plan.model == "z" and plan.prefetch == "w"
    if placement == "window":
        assert plan.load_order == ["x", "y"]  # idle first, then the queue back to front (landed models only)
        assert plan.prefetch_order == ["x"]  # y runs before w: protected
    else:
        assert plan.load_order is None and plan.prefetch_order is None


def test_skip_on_slack_judges_by_the_measured_round_too():
    """A non-resident model with slack for two *planned* rounds is not skipped when the last round actually
    took longer (slow steps, stalls): its wait is judged by the longer of the two."""
    from types import SimpleNamespace

    from token_scheduler.policies.state import Residency

    spec = ModelSize("m", weight_bytes=10**9, kv_bytes_per_token=0, flops_per_token=1e9, attn_flops_per_pair=1e3)
    st = SimpleNamespace(models={"m": ModelState(spec, ModelSLO(10.0, 0.1), residency=Residency.HOST)})
    demand = [TurnDemand("m", 0.01, 0.1, load_s=0.1)]
    pol = make_policy("token")
    pol.last_round_s, pol.last_round_wall_s = 0.5, 0.5
    pol._apply_skips(st, demand, {"m": 2.0})  # slack 2.0 > 2 x 0.5 + load + step: may sit this round out
    assert pol.skips == 1
    pol2 = make_policy("token")
    pol2.last_round_s, pol2.last_round_wall_s = 0.5, 1.5  # same plan, but the last round took 1.5 s
    assert pol2._apply_skips(st, demand, {"m": 2.0}) == demand and pol2.skips == 0  # 2.0 < 2 x 1.5: runs


def test_token_policy_books_rounds_against_their_plan():
    """A round that ran a step is booked with its planned length and the wall time it took (state clock); a round
    that planned nothing is not; checkpoint/restore and reset_counters cover the books."""
    from token_scheduler.policies.state import PoolState, Residency

    specs = {n: ModelSize(n, 1000, 0, 1.0, 1.0) for n in "xy"}
    models = {n: ModelState(s, ModelSLO(), residency=Residency.RESIDENT) for n, s in specs.items()}
    for n in "xy":
        models[n].waiting.append(SimRequest(f"{n}0", n, 0.0, 10, 5, None))  # type: ignore[arg-type]
    st = PoolState(models, capacity_bytes=10_000, cost=CostModel(FLAT, list(specs.values())), now=2.0)
    pol = make_policy("token")
    first = pol.schedule(st)
    assert not first.idle and pol.round_books == (0, 0.0, 0.0, 0)  # the first round is in progress
    # (these toy sizes price the round at ~0 s: give it a length, as a real profile would)
    pol._plan = dataclasses.replace(pol._plan, length_s=0.5)
    cp = pol.checkpoint()
    for m in models.values():  # every request gone: the next call ends the round and finds nothing to plan
        m.waiting.clear()
    st.now = 3.0  # the round took 1 s, twice its plan
    assert pol.schedule(st).idle
    n, p, w, over = pol.round_books
    assert (n, over) == (1, 1) and p == pytest.approx(0.5) and w == pytest.approx(1.0)
    assert pol.round_info()["round_books"]["rounds"] == 1
    st.now += 1.0
    assert pol.schedule(st).idle and pol.round_books[0] == 1  # the empty round in between is not booked
    pol.restore(cp)
    assert pol.round_books == (0, 0.0, 0.0, 0)
    pol.round_books = (3, 1.0, 2.0, 1)
    pol.reset_counters()
    assert pol.round_books == (0, 0.0, 0.0, 0)
