"""A model whose steps the cost model underprices, simulated with time-only pace turns and with `pace_steps`.

Served on the H200 (4b44f58, 4 x 7B + 6 x 1.5B at 1.3 req/s/model, seed 1) one 1.5B's step fit priced its decodes at
0-1.5 ms where they took 2.4-3.3 ms: its time quotas bought one step a turn, its lateness grew ~1 s every second, and
it met 62% of its SLOs while the same arrivals under `bench pool --real` met 100%. This replays that: the simulator's
ground truth is a measured profile, and the policy's cost model prices one model's steps at FACTOR x their fit
(a persistent error, as a fit stuck near zero was), with `pace_steps` off and on, per seed.

    python -m load_tests.diag_underpriced --rate 1.3 --factor 0.2 --seeds 0,1,2,3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from load_tests.bench_common import header, write_json
from load_tests.bench_pool import hardware_profile
from load_tests.simulator import simulate
from load_tests.workload import generate, parse_models, spec_for
from token_scheduler import cost_model
from token_scheduler.policies.slo import ModelSLO

PROFILE = "bench/results/pool_real_h200_token_1.3_seed1_4b44f58.json"


def run(rate: float, factor: float, seeds: list[int], model: str, models: str = "4x7b,6x1.5b",
        profile: str = PROFILE, duration: float = 120.0) -> list[dict]:
    specs = {e.name: spec_for(e.arch, e.size, e.name) for e in parse_models(models)}
    if model not in specs:
        raise SystemExit(f"--model {model!r} is not one of {sorted(specs)}")
    hw = hardware_profile(profile, specs)
    priced = cost_model.CostModel.step_time

    def underpriced(self, name, shape):
        t = priced(self, name, shape)
        return t * factor if name == model else t

    rows = []
    cost_model.CostModel.step_time = underpriced
    try:
        for seed in seeds:
            items = generate(list(specs), rate, duration, seed=seed)
            for on in (False, True):
                r = simulate(items, specs, ModelSLO(10.0, 0.1), "token", capacity_bytes=60 * 10**9, hw=hw,
                             drain_s=60.0, kv_cache_bytes=4 * 10**9, seed=seed, noise=0.05, step_host_s=0.17e-3,
                             graph_capture_s=0.019, policy_kw={"pace_steps": on})
                per = r.slo["per_model"]
                rows.append({"seed": seed, "pace_steps": on, "attainment": r.slo["attainment"],
                             "mean_rule": r.slo["attainment_mean_rule"], "worst_model": min(per.values()),
                             "underpriced_model": per[model]})
                print(f"seed {seed} pace_steps={'on ' if on else 'off'} attainment {r.slo['attainment']:.3f} "
                      f"mean rule {r.slo['attainment_mean_rule']:.3f} worst model {min(per.values()):.2f} "
                      f"{model} {per[model]:.2f}", flush=True)
    finally:
        cost_model.CostModel.step_time = priced
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=float, default=1.3)
    ap.add_argument("--factor", type=float, default=0.2, help="the model's steps are priced at this x their fit")
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--model", default="qwen2-1.5b-0")
    ap.add_argument("--profile", default=PROFILE, help="the simulator's ground truth (bench_pool.hardware_profile)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    rows = run(a.rate, a.factor, [int(s) for s in a.seeds.split(",")], a.model, profile=a.profile)
    if a.json:
        write_json(Path(a.json), {**header(), "rate": a.rate, "factor": a.factor, "model": a.model,
                                  "profile": a.profile, "rows": rows})
    else:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
