"""Where an overloaded simulated point's misses come from: KV swaps inside a model, or the rounds between models.

Wraps the policy of one simulated point (load_tests/simulator.py, as models_per_gpu.point runs it) and reads every
plan it makes: when each request was swapped out and back in, whether its own model stepped meanwhile without it
(a swapped request starving behind its model's running ones), whose plan swapped it out (its own model's
preemption, or another model's turn making KV room), and every round's planned length against the tightest
running stream's slack when it was planned (listed: rounds more than 1 s longer than that slack, or than 1 s).
Of the missed requests: those whose first late token fell due while they were swapped out, and those whose first
token was late.

    python -m load_tests.diag_swaps --models 4x7b,6x1.5b --rate 1.3 --seed 1 --copy-slowdown 0.2

The simulator runs the policy in virtual time, so wrapping it changes nothing it decides (bench_policy's digest).
"""

from __future__ import annotations

import argparse
import bisect
import json
from collections import defaultdict

import load_tests.simulator as simulator
from load_tests.bench_pool import hardware_profile
from load_tests.workload import generate, parse_models, spec_for
from token_scheduler.policies.slo import ModelSLO, next_token_slack


class Watcher:
    """Wraps a policy: records steps, swaps and rounds from its plans (the state's clock is the plan's time)."""

    def __init__(self, inner):
        self.inner = inner
        self.steps: dict[str, list[float]] = defaultdict(list)  # model -> times of its steps
        self.swaps: dict[str, list[list]] = defaultdict(list)  # request id -> [[out, in or None, model, by]]
        self.rounds: list[tuple[float, float, float]] = []  # (time, planned length, tightest running slack)

    def schedule(self, st):
        rounds = getattr(self.inner, "rounds", 0)
        plan = self.inner.schedule(st)
        if getattr(self.inner, "rounds", 0) != rounds:
            slack = min((next_token_slack(r, m.slo, st.now) for m in st.models.values() for r in m.running),
                        default=float("inf"))
            self.rounds.append((st.now, self.inner.last_round_s, slack))
        for r in plan.swap_out:  # SimRequests: each knows its model
            self.swaps[r.request_id].append([st.now, None, r.model, plan.model])
        for r in plan.swap_in:
            self.swaps[r.request_id][-1][1] = st.now
        if not plan.idle:
            self.steps[plan.model].append(st.now)
        return plan

    def __getattr__(self, name):  # forget, round_info, ...: the policy's own
        return getattr(self.inner, name)


def run(models: str, seed: int, rate: float, duration: float = 120.0, drain: float = 60.0, gpu_budget_gb: float = 60.0,
        kv_cache_gb: float = 4.0, copy_slowdown: float = 0.0, step_host_ms: float = 1.0, graph_capture_ms: float = 19.0,
        policy_kw: dict | None = None) -> dict:
    specs = {e.name: spec_for(e.arch, e.size, e.name) for e in parse_models(models)}
    items = generate(list(specs), rate, duration, seed=seed)
    slo = ModelSLO(10.0, 0.1)
    with simulator.policies_wrapped(Watcher) as watchers:
        res = simulator.simulate(items, specs, slo, "token", capacity_bytes=int(gpu_budget_gb * 1e9),
                                 hw=hardware_profile("measured", specs), drain_s=drain, seed=seed,
                                 policy_kw=policy_kw, keep_tokens=True, kv_cache_bytes=int(kv_cache_gb * 1e9),
                                 copy_slowdown=copy_slowdown, step_host_s=step_host_ms / 1e3,
                                 graph_capture_s=graph_capture_ms / 1e3)
    (w,) = watchers
    end = res.end_s
    n = own = starved = 0
    starved_s = 0.0
    longest = []
    for ivs in w.swaps.values():
        for out, back, model, by in ivs:
            n += 1
            own += by == model
            stop = back if back is not None else end
            ts = w.steps[model]
            i = bisect.bisect_right(ts, out)
            if i < len(ts) and ts[i] < stop - 1e-9:  # its model stepped while it stayed out
                starved += 1
                starved_s += stop - ts[i]
            longest.append(stop - out)
    longest.sort()
    arrivals = {it.id: it.time for it in items}
    missed = late_swapped = ttft_late = 0
    for rec in res.extra["records"]:
        a, toks = arrivals[rec["id"]], rec["tokens"]
        first_late = next((k for k, t in enumerate(toks) if t > slo.deadline(a, k) + 1e-9), None)
        if first_late is None and len(toks) >= rec["output_len"]:
            continue
        missed += 1  # a late token, or unfinished
        if first_late is None:
            if slo.deadline(a, len(toks)) >= end:
                continue
            first_late = len(toks)  # its next token never came
        if first_late == 0:
            ttft_late += 1
            continue
        due = slo.deadline(a, first_late)
        if any(out <= due and (back is None or back >= due) for out, back, _, _ in w.swaps.get(rec["id"], ())):
            late_swapped += 1
    over = [(round(t, 1), round(r, 2), round(s, 2)) for t, r, s in w.rounds if r > max(s, 1.0) + 1.0]
    return {"models": models, "seed": seed, "rate": rate, "copy_slowdown": copy_slowdown,
            "attainment": res.slo["attainment"], "min_model_attainment": min(res.slo["per_model"].values()),
            "requests": res.slo["requests"], "missed": missed, "missed_first_token_late": ttft_late,
            "missed_late_while_swapped": late_swapped, "swap_outs": n, "own_model_preemptions": own,
            "swapped_left_out_while_model_stepped": starved, "swapped_left_out_s": starved_s,
            "swap_out_s_p50": longest[len(longest) // 2] if longest else 0.0,
            "swap_out_s_p99": longest[int(0.99 * (len(longest) - 1))] if longest else 0.0,
            "swap_out_s_max": longest[-1] if longest else 0.0,
            "rounds": len(w.rounds), "rounds_past_slack": over}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="4x7b,6x1.5b")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rate", type=float, default=1.3)
    ap.add_argument("--duration", type=float, default=120.0)
    ap.add_argument("--gpu-budget-gb", type=float, default=60.0)
    ap.add_argument("--kv-cache-gb", type=float, default=4.0)
    ap.add_argument("--copy-slowdown", type=float, default=0.0)
    ap.add_argument("--step-host-ms", type=float, default=1.0)
    ap.add_argument("--graph-capture-ms", type=float, default=19.0)
    ap.add_argument("--policy-kw", default=None, help="JSON TokenConfig overrides")
    a = ap.parse_args(argv)
    out = run(a.models, a.seed, a.rate, a.duration, gpu_budget_gb=a.gpu_budget_gb, kv_cache_gb=a.kv_cache_gb,
              copy_slowdown=a.copy_slowdown, step_host_ms=a.step_host_ms, graph_capture_ms=a.graph_capture_ms,
              policy_kw=json.loads(a.policy_kw) if a.policy_kw else None)
    print(json.dumps(out, indent=1, default=float))
    return out


if __name__ == "__main__":
    main()
