"""`tokenpool bench pool`: a seeded multi-model workload against each scheduling policy.

Today this runs the discrete-event simulator (load_tests/simulator.py) with the `H100_PCIE53` roofline
profile -- physical numbers, not measurements -- whether or not CUDA is present; the JSON says so
(`"mode": "simulated"`). When the multi-model engine can replay a workload on a GPU, its numbers belong
next to these, not instead of them.

Two results per policy: the SLO figures at the requested per-model rate, and the sustained rate -- the
largest per-model rate at which SLO attainment (token-deadline rule, slo.py) stays >= the target (90%),
found by doubling/halving then bisecting in log space (same seed at every rate: common random numbers;
low rates run longer so that every point has >= `min_requests` requests). A policy that misses the target
even at 1/1024 of the start rate gets 0 (static multiplexing: the models that do not fit are never served).
"""

from __future__ import annotations

import datetime
import json
import math
import sys
import time
from pathlib import Path

from load_tests.bench_common import checkpoint_size, git_commit
from load_tests.simulator import simulate
from load_tests.workload import generate, parse_models, spec_for
from token_scheduler.cost_model import H100_PCIE53, HardwareProfile, MeasuredProfile, roofline_for
from token_scheduler.policies.slo import ModelSLO


def _brief(res) -> dict:
    d = res.to_dict()
    d["extra"] = {k: v for k, v in d["extra"].items() if k != "records"}
    return d


def bracket(points, target: float = 0.9) -> dict:
    """What measured (rate, attainment) points say about the sustained rate, read conservatively both ways.

    `sustained_at_least`: the highest rate that met the target below every rate that missed it (0.0 if
    none met it); `fails_at`: the lowest rate that missed it above every rate that met it (None if none
    missed). With attainment falling as the rate rises (`monotone`), these are simply the highest pass and
    the lowest miss, and the sustained rate lies in [sustained_at_least, fails_at).
    """
    pts = sorted((float(r), float(a)) for r, a in points)
    passed = [r for r, a in pts if a >= target]
    missed = [r for r, a in pts if a < target]
    lo = max((r for r in passed if not missed or r < min(missed)), default=0.0)
    hi = min((r for r in missed if not passed or r > max(passed)), default=None)
    return {"rate": lo, "bounded": hi is not None, "sustained_at_least": lo, "fails_at": hi,
            "monotone": not passed or not missed or max(passed) < min(missed), "points": pts}


def sustained_rate(run, start: float, target: float = 0.9, steps: int = 5, max_doublings: int = 10) -> dict:
    """Largest rate with run(rate) >= target; `run` returns attainment. Returns the rate and the points
    (the bracket() of the points: the search keeps every pass below every miss, so `rate` is its last pass)."""
    points: dict[float, float] = {}

    def att(r: float) -> float:
        if r not in points:
            points[r] = run(r)
        return points[r]

    lo, hi = None, None
    r = start
    if att(r) >= target:
        lo = r
        for _ in range(max_doublings):
            r *= 2
            if att(r) < target:
                hi = r
                break
            lo = r
        if hi is None:
            return bracket(points.items(), target)
    else:
        hi = r
        for _ in range(max_doublings):
            r /= 2
            if att(r) >= target:
                lo = r
                break
            hi = r
        if lo is None:
            return bracket(points.items(), target)
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        if att(mid) >= target:
            lo = mid
        else:
            hi = mid
    return bracket(points.items(), target)


MEASURED = Path(__file__).resolve().parent / "data" / "measured_h200.json"
# Calibrated to the served step rate with the pipeline on (40 models; its "source" says how): the simulator at many
# models per GPU, where the device is the limit and a few percent of step cost swing attainment by tens of points
SERVED = Path(__file__).resolve().parent / "data" / "h200_served40.json"


class ProfileError(ValueError):
    """A --profile that names no profile, or a file that is not one."""


def hardware_profile(profile: str, specs: dict) -> HardwareProfile:
    """The simulator's ground truth: "measured" (the packaged H200 fit, floored at the H200's roofline: a fit is
    taken only down to the physics of the GPU it was measured on), "served" (the H200 calibrated to served step
    rates with the pipeline on, `SERVED`), "roofline" (the H100 physical floor),
    or a JSON file: a cost model (`CostModel.to_dict()`, or the packaged file's shape, fits per model size) or a
    `bench pool --real` result (the cost model of its first point). Fits are matched to the simulated models by
    size ({arch}-{size}-{i}: models of one size share a fit)."""
    if profile == "roofline":
        return H100_PCIE53
    path = {"measured": MEASURED, "served": SERVED}.get(profile) or Path(profile)
    if not path.is_file():
        raise ProfileError(f"no profile {profile!r}: measured, served, roofline or a JSON file")
    try:
        d = json.loads(path.read_text())
    except ValueError as e:
        raise ProfileError(f"profile {str(path)!r} is not JSON ({e})") from e
    device = d.get("device")  # the GPU it was measured on: its roofline is the floor under the fits
    if "sweep" in d:  # a bench pool --real result
        d = next(iter(d["sweep"].values()))[0]["cost_model"]
    fits = d.get("step", {})
    by_size = {checkpoint_size(k): v for k, v in fits.items()}
    step = {}
    for name in specs:
        fit = fits.get(name) or by_size.get(checkpoint_size(name))
        if fit is not None:
            step[name] = fit
    return MeasuredProfile.from_cost_dict({**d, "step": step}, roofline_for(device))


def run_bench_pool(models: str = "4x7b,6x1.5b", rate: float = 0.1, duration: float = 120.0, slo_ttft: float = 10.0,
                   slo_tpot: float = 0.1, gpu_budget_gb: float = 60.0, policies=("token", "request", "static"),
                   seed: int = 0, json_out: Path | str | None = None, n_gpus: int = 1, placement: str = "partition",
                   target: float = 0.9, sweep: bool = True, noise: float = 0.0, quiet: bool = False,
                   min_requests: int = 300, workers: int = 1, profile: str = "measured",
                   kv_cache_gb: float | None = None) -> dict:
    entries = parse_models(models)
    specs = {e.name: spec_for(e.arch, e.size, e.name) for e in entries}
    hw = hardware_profile(profile, specs)
    slo = ModelSLO(slo_ttft, slo_tpot)
    cap = int(gpu_budget_gb * 1e9)
    say = (lambda *a: None) if quiet else print
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False

    def run(policy: str, r: float, stretch: bool = False):
        # Sweep points at low rates run longer, so none is judged on a handful of requests.
        dur = max(duration, min_requests / (r * len(specs))) if stretch else duration
        items = generate(list(specs), r, dur, seed=seed)
        return simulate(items, specs, slo, policy, n_gpus=n_gpus, capacity_bytes=cap, placement=placement,
                        noise=noise, seed=seed, workers=workers, hw=hw,
                        kv_cache_bytes=int(kv_cache_gb * 1e9) if kv_cache_gb else None)

    out: dict = {
        "command": " ".join(sys.argv) if sys.argv and sys.argv[0] else "run_bench_pool",
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": "simulated",
        "cuda_available": cuda,
        "note": ("discrete-event simulation of the real policy code; step/switch/swap times from the hardware "
                 "profile named here (default: the costs a real H200 run measured, load_tests/data/measured_h200.json; "
                 "'roofline' is the physical floor, which overstates what a GPU sustains about tenfold). "
                 "`bench pool --real` replays the workload on the GPU, `bench serve` through the HTTP API."),
        "hardware_profile": hw.name,
        "config": {"models": models, "model_names": list(specs), "rate_per_model": rate, "duration_s": duration,
                   "slo_ttft_s": slo_ttft, "slo_tpot_s": slo_tpot, "gpu_budget_gb": gpu_budget_gb,
                   "n_gpus": n_gpus, "placement": placement, "seed": seed, "target_attainment": target,
                   "kv_region_gb": kv_cache_gb,
                   "noise": noise, "attainment_rule": "token deadlines: token k due at arrival + ttft + k*tpot"},
        "at_rate": {}, "sustained": {},
    }
    for p in policies:
        t0 = time.perf_counter()
        res = run(p, rate)
        out["at_rate"][p] = _brief(res)
        s = res.slo
        att = (f"attainment={s['attainment']:.3f} (mean-TPOT rule {s['attainment_mean_rule']:.3f}; "
               f"{s['requests']} requests)" if s["requests"] else
               f"attainment n/a: no request arrived in {duration:g} s (a longer --duration, or a higher rate)")
        say(f"{p:8s} rate={rate:g}/s/model  {att}  TTFT p50/p99={s['ttft_p50'] or 0:.2f}/{s['ttft_p99'] or 0:.2f}s  "
            f"TPOT p50/p99={1e3 * (s['tpot_p50'] or 0):.0f}/{1e3 * (s['tpot_p99'] or 0):.0f}ms  "
            f"switches/s={res.switches_per_s:.2f}  busy={res.gpu_busy_frac:.2f}  "
            f"policy CPU={res.policy_cpu_us_per_step:.0f}us/step ({100 * res.policy_cpu_frac_mean:.1f}% of step)  "
            f"[{time.perf_counter() - t0:.1f}s]")
        if sweep:
            sr = sustained_rate(lambda r, p=p: run(p, r, stretch=True).slo["attainment"], rate, target)
            out["sustained"][p] = sr
            say(f"{p:8s} sustained rate at >= {target:.0%}: {sr['rate']:.3g}/s/model"
                f"{'' if sr['bounded'] else ' (not bounded above)'}")
    if sweep and "token" in out["sustained"]:
        tok = out["sustained"]["token"]["rate"]
        out["ratios"] = {f"token/{p}": (tok / v["rate"] if v["rate"] > 0 else None)
                         for p, v in out["sustained"].items() if p != "token"}
        say("ratios:", {k: (f"{v:.2f}" if v else "inf (baseline never reaches the target)")
                        for k, v in out["ratios"].items()})
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(out, indent=1, default=float))
    return out
