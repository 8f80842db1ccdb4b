"""Models per GPU (issue 14's figure): the most models one GPU serves at a per-model rate with >= 95% attainment.

Simulated (load_tests/simulator.py, the real policy code in virtual time, the served H200's costs by default),
for mixes of 2 x 7B per 3 x 1.5B (`mix(n)`), per seed. Each point prints where its misses come from: first
tokens late (TTFT) vs later tokens late (TPOT, banked slack run out), weight loads per second and the blocking
ones, seconds stalled on loads, how busy the GPU was, and the policy's CPU time per step.

    python -m load_tests.models_per_gpu --counts 20,25,30,35,40 --seeds 7,0 --kv-cache-gb 4

Past ~35 models the device is the limit and a few percent of step cost swing attainment by tens of points, so the
costs must be the served engine's: `--profile served --pipelined`, the defaults (load_tests/data/h200_served40.json). With them,
40 models for 120 s: seed 7 99.8% (served 99.8%), seed 1 90.1% (91.5-94.1%), seed 0 81.4% (81.0%, a run it was
not calibrated on); the packaged fit (pre-pipeline) gives 45-67% there.

Models of one size share one checkpoint and host copy (as Aegaeon's evaluation does with aliases); each has its
own weight slot, KV and requests on the GPU, so the GPU-side work is that of distinct models.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from load_tests.bench_common import git_commit
from load_tests.bench_pool import hardware_profile
from load_tests.simulator import simulate
from load_tests.workload import generate, parse_models, spec_for
from token_scheduler.policies.slo import ModelSLO


def mix(n: int) -> str:
    """n models as 2 x 7B per 3 x 1.5B: "16x7b,24x1.5b" for 40."""
    big = round(2 * n / 5)
    return f"{big}x7b,{n - big}x1.5b"


def point(models: str, seed: int, *, rate: float = 0.1, duration: float = 300.0, drain: float = 60.0,
          gpu_budget_gb: float = 120.0, kv_cache_gb: float | None = 4.0, slo_ttft: float = 10.0,
          slo_tpot: float = 0.1, policy: str = "token", profile: str = "measured", policy_kw: dict | None = None,
          noise: float = 0.0, copy_slowdown: float = 0.0, step_host_ms: float = 0.0,
          graph_capture_ms: float = 0.0, step_host_per_seq_ms: float = 0.0, host_observed: bool = True,
          pipelined: bool = False, co_step: float | None = -1.0) -> dict:
    entries = parse_models(models)
    specs = {e.name: spec_for(e.arch, e.size, e.name) for e in entries}
    items = generate(list(specs), rate, duration, seed=seed)
    t0 = time.perf_counter()
    res = simulate(items, specs, ModelSLO(slo_ttft, slo_tpot), policy, capacity_bytes=int(gpu_budget_gb * 1e9),
                   hw=hardware_profile(profile, specs), drain_s=drain, seed=seed, policy_kw=policy_kw, noise=noise,
                   copy_slowdown=copy_slowdown, step_host_s=step_host_ms / 1e3, graph_capture_s=graph_capture_ms / 1e3,
                   kv_cache_bytes=int(kv_cache_gb * 1e9) if kv_cache_gb else None,
                   step_host_per_seq_s=step_host_per_seq_ms / 1e3, host_observed=host_observed, pipelined=pipelined,
                   co_step=co_step)
    s, e = res.slo, res.extra
    det = s["per_model_detail"].values()
    return {
        "models": models, "n_models": len(specs), "seed": seed, "requests": s["requests"],
        "attainment": s["attainment"], "min_model_attainment": min(s["per_model"].values(), default=1.0),
        "mean_rule": s["attainment_mean_rule"], "missed": sum(d["missed"] for d in det),
        "ttft_late": sum(d["ttft_late"] for d in det), "unfinished": res.unfinished,
        "loads_per_s": e["loads_per_s"], "blocking_loads": e["blocking_loads"], "load_stall_s": res.load_stall_s,
        "prefetch_skipped": e["prefetch_skipped"], "forced_evictions": e["forced_evictions"],
        "switches_per_s": res.switches_per_s, "gpu_busy_frac": res.gpu_busy_frac,
        "policy_cpu_us_per_step": res.policy_cpu_us_per_step, "policy_cpu_frac_mean": res.policy_cpu_frac_mean,
        "kv_peak_gb": e.get("kv_peak_gb"), "swap_gb": res.swap_gb, "graph_captures": e.get("graph_captures", 0),
        "pipelined_frac": e.get("pipelined_steps", 0) / max(1, res.steps),
        "co_step_frac": e.get("co_steps", 0) / max(1, res.steps),
        "steps_per_s": res.steps / max(1e-9, res.end_s), "mean_batch": e.get("seqs_stepped", 0) / max(1, res.steps),
        "rounds": e.get("rounds_gpu0", {}), "sim_s": time.perf_counter() - t0,
    }


def row(p: dict) -> str:
    return (f"{p['n_models']:3d} {p['models']:14s} seed={p['seed']:<3d} att={p['attainment']:.3f} "
            f"min={p['min_model_attainment']:.3f} mean={p['mean_rule']:.3f} missed={p['missed']}/{p['requests']} "
            f"(ttft {p['ttft_late']}) unfinished={p['unfinished']} loads/s={p['loads_per_s']:.2f} "
            f"blocking={p['blocking_loads']} skipped={p['prefetch_skipped']} forced={p['forced_evictions']} "
            f"stall={p['load_stall_s']:.1f}s busy={p['gpu_busy_frac']:.2f} kv_peak={p['kv_peak_gb'] or 0:.1f}GB "
            f"cpu={p['policy_cpu_us_per_step']:.0f}us ({100 * p['policy_cpu_frac_mean']:.1f}% of step) "
            f"captures={p['graph_captures']} steps/s={p['steps_per_s']:.0f} batch={p['mean_batch']:.2f}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--counts", default="20,25,30,35,40", help="models per GPU, each as 2 x 7B per 3 x 1.5B")
    ap.add_argument("--models", default=None, help="explicit mixes instead, ';'-separated (4x7b,6x1.5b;...)")
    ap.add_argument("--seeds", default="7,0")
    ap.add_argument("--rate", type=float, default=0.1, help="requests/s per model")
    ap.add_argument("--duration", type=float, default=300.0)
    ap.add_argument("--drain", type=float, default=60.0)
    ap.add_argument("--gpu-budget-gb", type=float, default=120.0)
    ap.add_argument("--kv-cache-gb", type=float, default=4.0, help="the pooled arena's KV region (0: VRAM as one "
                    "byte count, no arena)")
    ap.add_argument("--slo-ttft", type=float, default=10.0)
    ap.add_argument("--slo-tpot", type=float, default=0.1)
    ap.add_argument("--policy", default="token")
    ap.add_argument("--policy-kw", default=None, help="JSON TokenConfig overrides, e.g. '{\"need_rule\": \"off\"}'")
    ap.add_argument("--profile", default="served", help="step costs: served (the H200 calibrated to served step "
                    "rates with the pipeline on, the default) | measured (the packaged fit, before the pipeline) | "
                    "roofline | a JSON file")
    ap.add_argument("--noise", type=float, default=0.0, help="lognormal sigma of every simulated step's time")
    ap.add_argument("--copy-slowdown", type=float, default=0.0, help="a step beside a weight copy takes 1 + this "
                    "times as long")
    ap.add_argument("--step-host-ms", type=float, default=0.0, help="host time each step adds outside the device "
                    "step (the served worker measured 0.17 ms on the H200: bench serve's timing)")
    ap.add_argument("--step-host-per-seq-ms", type=float, default=0.0, help="more host time a step adds per "
                    "sequence in its batch (bench pool --real on the H200 at e755649: 0.243 ms + 0.0353 ms a sequence, "
                    "bench/results/sim_gap_1.6_e755649.json)")
    ap.add_argument("--host-unobserved", action="store_true", help="the policy's cost model does not learn the host "
                    "time (as in the engine, whose step fits time the device step alone)")
    ap.add_argument("--pipelined", action=argparse.BooleanOptionalAction, default=True, help="TOKENPOOL_PIPELINE's "
                    "engine (the default): a decode continuing the step before's model and requests pays max(device, "
                    "host) instead of their sum")
    ap.add_argument("--co-step", type=float, default=-1.0, help="TOKENPOOL_CO_STEP's engine (with --pipelined): a "
                    "decode of another model than the step before's runs beside it, its device time this factor of "
                    "its own (the H200's two-stream pairs: 0.66-0.83, bench/results/co_step_h200_3c76624.json); "
                    "default: simulator.CO_STEP_FACTOR (0.8; off with TOKENPOOL_CO_STEP=0, which also stops the token "
                    "policy pairing turns, as in the engine)")
    ap.add_argument("--graph-capture-ms", type=float, default=19.0, help="host time of a CUDA-graph capture, paid "
                    "at each new (size, slot offset, batch bucket); default: the H200's, bench serve's timing at "
                    "9ff79c5 (1.78 s for 95, first captures of a bucket included; 32 ms before the capture stopped "
                    "synchronizing the device); 0: none")
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    mixes = a.models.split(";") if a.models else [mix(int(n)) for n in a.counts.split(",")]
    kw = dict(rate=a.rate, duration=a.duration, drain=a.drain, gpu_budget_gb=a.gpu_budget_gb,
              kv_cache_gb=a.kv_cache_gb or None, slo_ttft=a.slo_ttft, slo_tpot=a.slo_tpot, policy=a.policy,
              profile=a.profile, policy_kw=json.loads(a.policy_kw) if a.policy_kw else None, noise=a.noise,
              copy_slowdown=a.copy_slowdown, step_host_ms=a.step_host_ms, graph_capture_ms=a.graph_capture_ms,
              step_host_per_seq_ms=a.step_host_per_seq_ms, host_observed=not a.host_unobserved,
              pipelined=a.pipelined, co_step=a.co_step)
    out = {"command": " ".join(["python -m load_tests.models_per_gpu", *(argv or sys.argv[1:])]),
           "commit": git_commit(), "config": {**kw, "target": a.target}, "points": [], "most_models": {}}
    for seed in (int(s) for s in a.seeds.split(",")):
        best = 0
        for m in mixes:
            p = point(m, seed, **kw)
            out["points"].append(p)
            print(row(p), flush=True)
            if p["attainment"] >= a.target:
                best = max(best, p["n_models"])
        out["most_models"][seed] = best
        print(f"seed {seed}: most models at >= {a.target:.0%}: {best or 'none of those tried'}", flush=True)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=1, default=float))
    return out


if __name__ == "__main__":
    main()
