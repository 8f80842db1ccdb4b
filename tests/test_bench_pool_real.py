"""bench pool --real: the rate sweep on tiny CPU models, merging runs, and what measured points prove."""

from __future__ import annotations

import json

import pytest

from load_tests.bench_pool import bracket
from load_tests.bench_pool_real import bound_ratios, merge_real, parse_rates, run_real, summarize_sweep


def test_bracket_reads_points_conservatively():
    b = bracket([(0.4, 0.5), (0.1, 1.0), (0.2, 0.95)], 0.9)
    assert (b["sustained_at_least"], b["fails_at"], b["bounded"], b["monotone"]) == (0.2, 0.4, True, True)
    assert b["points"] == [(0.1, 1.0), (0.2, 0.95), (0.4, 0.5)]
    # not monotone (a pass above a miss): the lower end stays below every miss, the upper above every pass
    b = bracket([(0.1, 1.0), (0.2, 0.8), (0.3, 0.92), (0.4, 0.5)], 0.9)
    assert (b["sustained_at_least"], b["fails_at"], b["monotone"]) == (0.1, 0.4, False)
    assert bracket([(0.1, 0.78), (0.2, 0.7)])["sustained_at_least"] == 0.0  # never reaches the target
    b = bracket([(0.1, 1.0), (0.2, 0.99)])
    assert (b["rate"], b["fails_at"], b["bounded"]) == (0.2, None, False)  # never misses: not bounded above


def test_ratios_are_lower_bounds_and_say_why_when_there_is_none():
    sus = {"token": bracket([(0.1, 1.0), (0.3, 0.95), (0.6, 0.7)]),
           "request": bracket([(0.1, 0.94), (0.12, 0.85), (0.3, 0.5)]),
           "static": bracket([(0.1, 0.78), (0.3, 0.75)])}
    r = bound_ratios(sus, 0.9)
    assert r["token/request"]["ratio_lower_bound"] == pytest.approx(0.3 / 0.12)  # token's pass / request's miss
    assert r["token/request"]["ratio_upper_bound"] == pytest.approx(0.6 / 0.1)
    assert r["token/request"]["unbounded"] is False
    s = r["token/static"]  # static never reaches 90%: sustained 0, ratio unbounded, no finite lower bound given
    assert s["ratio_lower_bound"] is None and s["unbounded"] is True and "no measured rate" in s["reason"]
    assert s["bracket_lower_bound"] == pytest.approx(0.3 / 0.1) and s["ratio_upper_bound"] is None
    r = bound_ratios({"token": bracket([(0.1, 1.0)]), "request": bracket([(0.1, 0.95)])})
    assert r["token/request"]["ratio_lower_bound"] is None and "higher rates" in r["token/request"]["reason"]
    r = bound_ratios({"token": bracket([(0.1, 0.5)]), "request": bracket([(0.1, 0.4)])})
    assert r["token/request"]["ratio_lower_bound"] is None and "token met" in r["token/request"]["reason"]


def _point(rate: float, att: float, sim: float | None = None) -> dict:
    return {"rate": rate, "slo": {"attainment": att}, "simulated": {"attainment": att if sim is None else sim}}


def _run(policy: str, points: list[dict], rate0: float, **hdr) -> dict:
    cfg = {"models": "4x7b,6x1.5b", "rate_per_model": rate0, "duration_s": 120.0, "seed": 0, "requests": 7}
    return summarize_sweep({"mode": "real", "device": "H100", "date": "d", "commit": "c", "command": "x",
                            **hdr, "config": cfg, "sweep": {policy: points}})


def test_merge_combines_runs_and_refuses_other_configs(tmp_path):
    a = tmp_path / "token.json"
    a.write_text(json.dumps(_run("token", [_point(0.1, 1.0), _point(0.3, 0.95), _point(0.6, 0.6)], 0.1)))
    legacy = {"mode": "real", "device": "H100", "date": "e", "commit": "c", "command": "y",  # single-rate shape
              "config": {"models": "4x7b,6x1.5b", "rate_per_model": 0.1, "duration_s": 120.0, "seed": 0},
              "policies": {"static": {"slo": {"attainment": 0.78}, "simulated": {"attainment": 0.78}}}}
    b = tmp_path / "kept.json"  # the bench/results layout: single-rate runs kept under "runs"
    b.write_text(json.dumps({"summary": {}, "runs": {"static": legacy,
                                                     "request": _run("request", [_point(0.1, 0.5)], 0.1)}}))
    c = tmp_path / "request.json"
    c.write_text(json.dumps(_run("request", [_point(0.1, 0.94, 0.98), _point(0.2, 0.8)], 0.1, commit="c2")))
    out = merge_real([a, b, c], tmp_path / "merged.json")
    assert json.loads((tmp_path / "merged.json").read_text())["ratios"] == out["ratios"]
    assert {p: [x["rate"] for x in xs] for p, xs in out["sweep"].items()} == {
        "token": [0.1, 0.3, 0.6], "static": [0.1], "request": [0.1, 0.2]}
    assert out["replaced"] == [["request", 0.1]]  # the later file's point wins
    assert out["policies"]["request"]["slo"]["attainment"] == 0.94  # the point at the first rate
    assert out["config"]["rates_per_model"] == [0.1, 0.2, 0.3, 0.6] and out["commit"] == ["c", "c2"]
    assert out["sustained"]["request"]["simulated"]["sustained_at_least"] == 0.1
    assert out["ratios"]["token/request"]["ratio_lower_bound"] == pytest.approx(0.3 / 0.2)
    assert out["ratios"]["token/static"]["unbounded"] is True
    d = tmp_path / "other.json"
    other = _run("static", [_point(0.1, 0.7)], 0.1)
    other["config"]["duration_s"] = 60.0
    d.write_text(json.dumps(other))
    with pytest.raises(ValueError, match="duration_s"):
        merge_real([a, d])


def test_parse_rates():
    assert parse_rates("0.15,0.2") == [0.15, 0.2] and parse_rates(0.1) == [0.1] and parse_rates("0.3") == [0.3]
    with pytest.raises(ValueError):
        parse_rates("0.1,-1")


def test_real_sweep_two_rates_on_cpu(make_tiny, tmp_path, monkeypatch):
    """Two rates, one fresh pooled engine each; the JSON on disk holds both points and their summary."""
    monkeypatch.setenv("TOKENPOOL_PLAN_AHEAD", "0")  # a switch of the run: recorded with its command
    d = make_tiny("qwen2")
    path = tmp_path / "sweep.json"
    out = run_real(models="1x7b,1x1.5b", rate="1.0,2.0", duration=1.0, drain_s=10.0, gpu_budget_gb=0.0075,
                   kv_cache_gb=0.004, policies=("token",), json_out=path, device="cpu", dtype="fp32",
                   model_dirs={"7b": d, "1.5b": d}, host_budget_gb=0.1, say=lambda *a: None)
    disk = json.loads(path.read_text())
    assert disk["env"]["TOKENPOOL_PLAN_AHEAD"] == "0" and "TOKENPOOL_COMMIT" not in disk["env"]
    pts = disk["sweep"]["token"]
    assert [x["rate"] for x in pts] == [1.0, 2.0] and disk["config"]["rates_per_model"] == [1.0, 2.0]
    assert disk["policies"]["token"]["rate"] == 1.0 == disk["config"]["rate_per_model"]  # single-rate shape
    for x in pts:
        assert x["requests"] == x["slo"]["requests"] > 0 and x["steps"] > 0
        assert 0.0 <= x["simulated"]["attainment"] <= 1.0 and 0.0 <= x["slo"]["attainment"] <= 1.0
        assert x["timing"]["steps"] == x["steps"]
        assert {"prefetch_skipped", "forced_evictions", "loads", "bytes_only_attainment"} <= set(x["simulated"])
        # the simulator replayed with the costs this run measured, beside the roofline one
        assert 0.0 <= x["simulated_measured_costs"]["attainment"] <= 1.0
        assert x["sim_measured_minus_real_points"] == pytest.approx(
            100 * (x["simulated_measured_costs"]["attainment"] - x["slo"]["attainment"]))
        # where misses come from: per-model detail adds up; the token policy's turns per model are counted
        assert sum(v["requests"] for v in x["slo"]["per_model_detail"].values()) == x["requests"]
        turns = x["policy_info"]["turns"]
        assert set(turns) <= set(x["slo"]["per_model"]) and sum(turns.values()) > 0  # warm-up turns not counted
        # the point as a time series: every request arrived in one window, the windows' steps are the point's
        ws = x["windows"]
        assert ws and sum(w["arrivals"] for w in ws) == x["requests"]
        assert sum(w["steps_per_s"] * (w["t1_s"] - w["t0_s"]) for w in ws) == pytest.approx(x["steps"], rel=0.05)
        assert 0 < x["turns"]["turns"] <= sum(turns.values()) + 1 and x["turns"]["steps_max"] >= 1
    assert disk["config"]["placement"] == "lru"
    assert disk["sustained"]["token"]["points"] == [[x["rate"], x["slo"]["attainment"]] for x in pts]
    assert json.loads(json.dumps(out["sustained"])) == disk["sustained"]


def test_resimulate_puts_the_simulator_beside_real_points(tmp_path):
    from load_tests.bench_pool_real import resimulate

    cfg = {"models": "1x7b,2x1.5b", "duration_s": 10.0, "drain_s": 10.0, "slo_ttft_s": 10.0, "slo_tpot_s": 0.1,
           "gpu_budget_gb": 20.0, "kv_region_gb": 1.0, "seed": 0}
    point = {"rate": 0.5, "slo": {"attainment": 0.75}, "loads": 3, "prefetches": 4, "prefetch_skipped": 5,
             "forced_evictions": 1, "evictions": 6, "swap_stall_s": 2.0}
    # the token point carries the cost model its run measured (here: every step 3x the roofline)
    from load_tests.workload import parse_models, spec_for
    from token_scheduler.cost_model import H100_PCIE53, CostModel, StepShape

    specs = [spec_for(e.arch, e.size, e.name) for e in parse_models(cfg["models"])]
    cm = CostModel(H100_PCIE53, specs)
    for sp in specs:
        for b in (1, 4, 16, 64):
            for shape in (StepShape(b, b, b * 300), StepShape(1, 50 * b, 50 * b, (50 * b) ** 2)):
                cm.observe_step(sp.name, shape, 3 * H100_PCIE53.step_time(sp, shape))
    src = tmp_path / "real.json"
    # and the host time per step its engine spent outside the fitted steps: (0.99 x 100 s - 80 s) / 10,000 = 1.9 ms
    host = {"wall_s": 100.0, "gpu_busy_frac": 0.99, "timing": {"steps": 10000.0, "engine_s": 80.0}}
    src.write_text(json.dumps({"mode": "real", "commit": "abc", "config": cfg,
                               "sweep": {"token": [point | host | {"cost_model": cm.to_dict()}], "request": [point]}}))
    out = resimulate(src, tmp_path / "re.json")
    assert json.loads((tmp_path / "re.json").read_text())["points"] == out["points"]
    assert out["placement_of_real_run"] == "lru"  # a run from before TokenConfig.placement
    tok, req = out["points"]
    assert tok["real"] == {"attainment": 0.75, **{k: point[k] for k in tok["real"] if k != "attainment"}}
    assert set(tok) >= {"simulated_lru", "simulated_window"} and "simulated_window" not in req
    for row in (tok, req):
        s = row["simulated_lru"]
        assert 0.0 <= s["attainment"] <= 1.0 and 0.0 <= s["bytes_only_attainment"] <= 1.0
        assert row["sim_minus_real_points"] == pytest.approx(100 * (s["attainment"] - 0.75))
        assert s["loads"] + s["prefetches"] > 0 and s["kv_peak_gb"] > 0
    m = tok["simulated_measured_costs"]
    assert 0.0 <= m["attainment"] <= 1.0 and "simulated_measured_costs" not in req
    assert tok["sim_measured_minus_real_points"] == pytest.approx(100 * (m["attainment"] - 0.75))
    assert m["tpot_p50"] > 2 * tok["simulated_lru"]["tpot_p50"]  # 3x slower steps, as measured, show
    assert m["step_host_s"] == pytest.approx(0.0019) and tok["simulated_lru"]["step_host_s"] == 0.0  # charged
    with pytest.raises(ValueError):
        src.write_text(json.dumps({"mode": "simulated"}))
        resimulate(src)


def test_host_per_step_is_the_step_calls_time_outside_the_engine_step():
    from load_tests.bench_pool_real import host_per_step_s

    # the H200's 1.6 req/s/model point (e755649): 178.8 s in step calls, 154.1 s of them the engine's, 24,232 steps
    real = {"wall_s": 179.967124162, "gpu_busy_frac": 0.9935684693446757,
            "timing": {"steps": 24232.0, "engine_s": 154.10610408700347}}
    assert host_per_step_s(real) == pytest.approx(1.0195e-3, rel=1e-3)
    assert host_per_step_s({"wall_s": 10.0}) == 0.0 and host_per_step_s({}) == 0.0  # an older point: none
