"""Which engine cost buys more models per GPU: the simulator at a models-per-GPU point on the served-calibrated H200
profile (load_tests/data/h200_served40.json) and on copies of it with one cost lowered.

    python -m load_tests.sim_levers --models 16x7b,24x1.5b --seeds 1,0 --json bench/results/sim_levers_models40_served_profile.json

Past ~35 models the device is the limit, so a few percent of one kind of step is tens of points of attainment: this
says where engine work (issue 20: decode near its floor, prefill launches) pays for issue 14's figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

from load_tests.bench_common import git_commit
from load_tests.bench_pool import SERVED
from load_tests.models_per_gpu import point


def _prefill_3ms(step: dict) -> None:
    for fit in step.values():
        fit["coef"]["per_prefill_step_s"] = 0.003


def _small_decode(base_s: float):
    def change(step: dict) -> None:
        step["qwen2-1.5b"]["coef"]["base_s"] = base_s
    return change


def _rope_fold(share: float):
    """TOKENPOOL_ATTN_ROPE's launch saved, as the H200 batch-8 profile prices the rope kernel (ab4be3b), on `share`
    of the decode steps: the fits have one base for every batch size, and batch-1 steps (the one-token GEMVs)
    already fold RoPE in, so 1.0 overstates; at 40 models ~55% of decode steps are batches of 2 or more."""
    def change(step: dict) -> None:
        step["qwen2-1.5b"]["coef"]["base_s"] -= 61.5e-6 * share
        step["qwen2-7b"]["coef"]["base_s"] -= 65.7e-6 * share
    return change


def _big_decode_5pct(step: dict) -> None:
    step["qwen2-7b"]["coef"]["base_s"] *= 0.95


LEVERS = {
    "as served": None,
    "prefill steps' fixed cost 3 ms (served: 7B 7.3, 1.5B 15 ms of host-bound eager launches)": _prefill_3ms,
    "1.5B decode base 1.2 ms (served 1.4)": _small_decode(0.0012),
    "1.5B decode base 1.1 ms": _small_decode(0.0011),
    "1.5B decode base 1.0 ms (served 1.4; issue 20's 1.3x floor at batch 1 is 0.95)": _small_decode(0.001),
    "7B decode base 5% lower": _big_decode_5pct,
    "RoPE in the attention (1.5B -61.5 us, 7B -65.7 us a decode step)": _rope_fold(1.0),
    "RoPE in the attention on 55% of decode steps": _rope_fold(0.55),
}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="16x7b,24x1.5b")
    ap.add_argument("--seeds", default="1,0")
    ap.add_argument("--duration", type=float, default=120.0)
    ap.add_argument("--drain", type=float, default=60.0)
    ap.add_argument("--graph-capture-ms", type=float, default=19.0, help="as models_per_gpu's default")
    ap.add_argument("--prefill-step-s", default=None, metavar="MODEL=S,...",
                    help="each model's fixed cost a prefilling step instead of the profile's, e.g. the row-graph "
                         "prefill's 'qwen2-7b=0.003,qwen2-1.5b=0.008' (session 34)")
    ap.add_argument("--only", default=None, help="levers whose name starts with one of these, '|'-separated")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    base = json.loads(SERVED.read_text())
    for item in filter(None, (a.prefill_step_s or "").split(",")):
        model, _, secs = item.partition("=")
        base["step"][model]["coef"]["per_prefill_step_s"] = float(secs)
    levers = {n: c for n, c in LEVERS.items() if not a.only or n.startswith(tuple(a.only.split("|")))}
    out = {"what": f"{a.models} at 0.1 req/s/model, 120 GB, 4 GB KV, {a.duration:g} s + {a.drain:g} s drain, "
           "pipelined, simulated on the served-calibrated H200 profile and on copies with one cost lowered",
           "device": "none (the simulator, on CPU)", "commit": git_commit(),
           "command": "python -m load_tests.sim_levers " + " ".join(argv or []), "levers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, change in levers.items():
            prof = SERVED
            if change is not None or a.prefill_step_s:
                q = copy.deepcopy(base)
                if change is not None:
                    change(q["step"])
                prof = Path(tmp) / f"{len(out['levers'])}.json"
                prof.write_text(json.dumps(q))
            row = out["levers"][name] = {}
            for seed in (int(s) for s in a.seeds.split(",")):
                r = point(a.models, seed, duration=a.duration, drain=a.drain, profile=str(prof), pipelined=True,
                          graph_capture_ms=a.graph_capture_ms)
                row[f"seed{seed}"] = {k: r[k] for k in ("attainment", "min_model_attainment", "mean_rule", "missed",
                                                        "requests")}
                print(f"{name[:60]:60s} seed {seed}: {r['attainment']:.1%} (worst model {r['min_model_attainment']:.0%})",
                      flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
