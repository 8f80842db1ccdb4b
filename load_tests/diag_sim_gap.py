"""The simulator against a `bench pool --real` point's own measured costs, with one missing effect at a time.

Written for the H200 gap at 1.6 req/s/model (seed 0, e755649): the engine met 74.2% where the simulator driven by
that run's fits said 100%. Each variant is `simulate()` keyword arguments (plus `sim_seed`: the noise seed, and
`fit_scale`: every step fit times this); each runs at each rate on the seeded workload, and a row reports what can be
put beside the real run's figures: steps, device and host ms per step, sequences per step, switches, rounds.

    python -m load_tests.diag_sim_gap bench/results/pool_real_h200_token_1.6_seed0_e755649.json \\
        '{"baseline": {}, "host": {"step_host_s": 0.00102, "host_observed": false}}' 1.3,1.44,1.6 out.json
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

from load_tests import simulator
from load_tests.workload import generate, parse_models, spec_for
from token_scheduler.cost_model import MeasuredProfile, roofline_for
from token_scheduler.policies.slo import ModelSLO


def scaled(hw: MeasuredProfile, k: float) -> MeasuredProfile:
    return hw if k == 1.0 else dataclasses.replace(
        hw, step_coef={m: tuple(k * x for x in c) for m, c in hw.step_coef.items()})


def run(src: str, variants: dict, rates: list[float]) -> list[dict]:
    d = json.load(open(src))
    t, cfg = d["policies"]["token"], d["config"]
    specs = {e.name: spec_for(e.arch, e.size, e.name) for e in parse_models(cfg["models"])}
    hw = MeasuredProfile.from_cost_dict(t["cost_model"], roofline_for(d.get("device")))
    rows = []
    for name, kw in variants.items():
        for rate in rates:
            kw2 = dict(kw)
            sseed, fs = kw2.pop("sim_seed", 0), kw2.pop("fit_scale", 1.0)
            items = generate(list(specs), rate, cfg["duration_s"], seed=cfg["seed"])
            t0 = time.time()
            r = simulator.simulate(items, specs, ModelSLO(cfg["slo_ttft_s"], cfg["slo_tpot_s"]), "token",
                                   capacity_bytes=int(cfg["gpu_budget_gb"] * 1e9), drain_s=cfg["drain_s"],
                                   seed=sseed, policy_kw={"placement": cfg.get("placement", "lru")},
                                   hw=scaled(hw, fs), kv_cache_bytes=int(cfg["kv_region_gb"] * 1e9), **kw2)
            ri = r.extra.get("rounds_gpu0", {})
            busy, host = r.gpu_busy_frac * r.end_s, r.extra["host_s"]
            row = dict(variant=name, kwargs={**kw2, "sim_seed": sseed, "fit_scale": fs}, rate=rate,
                       attainment=r.slo["attainment"], mean_rule=r.slo["attainment_mean_rule"], steps=r.steps,
                       end_s=r.end_s, device_ms_per_step=1e3 * (busy - host) / r.steps,
                       host_ms_per_step=1e3 * host / r.steps, seqs_per_step=r.extra["seqs_stepped"] / r.steps,
                       switches_per_s=r.switches_per_s, rounds=ri.get("rounds"),
                       need_rounds=ri.get("need_rounds"), last_round_s=ri.get("last_round_s"),
                       ttft_p99=r.slo["ttft_p99"], tpot_p50=r.slo["tpot_p50"], unfinished=r.unfinished,
                       swap_gb=r.swap_gb, wall_s=time.time() - t0)
            rows.append(row)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    return rows


if __name__ == "__main__":
    src, variants, rates, out = sys.argv[1], json.loads(sys.argv[2]), [float(x) for x in sys.argv[3].split(",")], \
        sys.argv[4]
    json.dump(run(src, variants, rates), open(out, "w"), indent=1)
