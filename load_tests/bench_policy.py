"""CPU cost of the token policy's `schedule()` with many models on one GPU, and a digest of its decisions.

Replays a seeded workload through the simulator (load_tests/simulator.py: the real policy, the measured H200
costs, a pooled arena as `bench serve` runs it) and times every `schedule()` call. The digest (sha256 over every
plan's decisions, in order: model, batch, evictions, swaps, prefetch, victim orders, idle) must not change when
the policy is only made faster: the simulation runs in virtual time, so the same inputs give the same plans.

    python -m load_tests.bench_policy --models 14x7b,21x1.5b --rate 0.1 --seed 7
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time

import load_tests.simulator as simulator
from load_tests.bench_pool import hardware_profile
from load_tests.workload import generate, parse_models, spec_for
from token_scheduler.policies.slo import ModelSLO


class Recorder:
    """Wraps a policy: times each `schedule()` and folds its plan's decisions into a digest."""

    def __init__(self, inner):
        self.inner, self.busy_ns, self.idle_ns = inner, [], []
        self.digest = hashlib.sha256()

    def schedule(self, st):
        t0 = time.perf_counter_ns()
        plan = self.inner.schedule(st)
        dt = time.perf_counter_ns() - t0
        (self.idle_ns if plan.idle else self.busy_ns).append(dt)
        ids = lambda rs: [r.request_id for r in rs]  # noqa: E731
        self.digest.update(repr((
            plan.model, [(r.request_id, n) for r, n in plan.batch], plan.evict, ids(plan.swap_out),
            ids(plan.swap_in), plan.prefetch, plan.load_order, plan.prefetch_order, plan.wait_swap_out,
            plan.idle, plan.expected_s)).encode())
        return plan

    def __getattr__(self, name):  # forget, round_info, ...: the policy's own
        return getattr(self.inner, name)


def run(models: str, rate: float, seed: int, duration: float = 120.0, drain: float = 60.0,
        gpu_budget_gb: float = 120.0, kv_cache_gb: float = 4.0, policy: str = "token") -> dict:
    specs = {e.name: spec_for(e.arch, e.size, e.name) for e in parse_models(models)}
    items = generate(list(specs), rate, duration, seed=seed)
    with simulator.policies_wrapped(Recorder) as recs:
        t0 = time.perf_counter()
        res = simulator.simulate(items, specs, ModelSLO(10.0, 0.1), policy, capacity_bytes=int(gpu_budget_gb * 1e9),
                                 hw=hardware_profile("measured", specs), drain_s=drain, seed=seed,
                                 kv_cache_bytes=int(kv_cache_gb * 1e9) if kv_cache_gb else None)
        wall = time.perf_counter() - t0
    (rec,) = recs
    busy = [x / 1e3 for x in rec.busy_ns]
    idle = [x / 1e3 for x in rec.idle_ns]
    return {"models": models, "rate": rate, "seed": seed, "duration_s": duration, "gpu_budget_gb": gpu_budget_gb,
            "kv_cache_gb": kv_cache_gb, "requests": len(items),
            "attainment": res.slo["attainment"], "steps": len(busy), "idle_calls": len(idle),
            "us_per_call_median": statistics.median(busy), "us_per_call_mean": statistics.fmean(busy),
            "idle_us_mean": statistics.fmean(idle) if idle else 0.0, "sim_wall_s": wall,
            "plan_digest": rec.digest.hexdigest()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="14x7b,21x1.5b")
    ap.add_argument("--rate", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--duration", type=float, default=120.0)
    ap.add_argument("--gpu-budget-gb", type=float, default=120.0)
    ap.add_argument("--kv-cache-gb", type=float, default=4.0, help="the pooled arena's KV region (0: no arena)")
    ap.add_argument("--policy", default="token")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    out = run(a.models, a.rate, a.seed, a.duration, gpu_budget_gb=a.gpu_budget_gb, kv_cache_gb=a.kv_cache_gb,
              policy=a.policy)
    print(f"{out['models']} rate={out['rate']} seed={out['seed']}: {out['steps']} steps, schedule() "
          f"median {out['us_per_call_median']:.1f} us, mean {out['us_per_call_mean']:.1f} us "
          f"(idle calls {out['idle_calls']}, {out['idle_us_mean']:.1f} us), attainment {out['attainment']:.3f}, "
          f"digest {out['plan_digest'][:16]} [{out['sim_wall_s']:.1f}s]")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
