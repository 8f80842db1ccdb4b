"""How much GPU time a many-model workload needs at the least: a lower bound on the decode steps the SLOs force.

Under the deadline rule token k of a request arriving at `a` is due at a + TTFT + k * TPOT, and a token made early
costs nothing. One step of a model makes one token for every request of it that has arrived (batch unbounded).
So the fewest steps a model can take is the lazy schedule's: step only when the earliest token still owed is
due, and then serve every request that has arrived. (Serving more requests at a forced step never forces a later
step: their deadlines do not move.) Each step is priced with the simulator's ground-truth step costs (the
`measured` H200 fits, `bench engine`'s graph replays, or a profile file) at the shape it has -- its batch, its context, its prefills -- so the
bound is the GPU-seconds per second of arrivals any policy must spend, before it pays anything for weight loads,
switches or host time. Above 1.0 no policy can meet every SLO on one GPU, whatever it does with memory.

    python -m load_tests.models_bound --counts 30,35,40 --seeds 7,0 [--json out.json]
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
from pathlib import Path

from load_tests.bench_pool import hardware_profile
from load_tests.models_per_gpu import mix
from load_tests.workload import generate, parse_models, spec_for
from token_scheduler.cost_model import StepShape

HBM_BYTES_PER_S = 4.25e12  # the H200's device-to-device copy rate (README): the weights floor's rate


def lazy_steps(reqs: list, ttft: float, tpot: float) -> list[tuple[float, tuple[int, int, int, int]]]:
    """The lazy schedule of one model's requests [(arrival, prompt, output)], sorted by arrival: each step's
    time and (sequences, new tokens, context tokens read, attention pairs)."""
    steps = []
    active: dict[int, list] = {}  # index -> [tokens made, prompt, output]
    due: list[tuple[float, int]] = []  # (due time of the next token owed, index)
    i, n = 0, len(reqs)
    while i < n or due:
        t = due[0][0] if due else reqs[i][0] + ttft
        while i < n and reqs[i][0] <= t:  # every request arrived by the step is served by it
            a, p, o = reqs[i]
            active[i] = [0, p, o]
            heapq.heappush(due, (a + ttft, i))
            i += 1
        if not due:
            continue
        seqs = new = ctx = pairs = 0
        for k, (made, p, _o) in active.items():
            if made == 0:  # its prefill rides on this step
                seqs, new, ctx, pairs = seqs + 1, new + p, ctx + p, pairs + p * p
            else:
                seqs, new, ctx = seqs + 1, new + 1, ctx + p + made
            active[k][0] = made + 1
        steps.append((t, (seqs, new, ctx, pairs)))
        due = []
        for k in [k for k, v in active.items() if v[0] >= v[2]]:
            del active[k]
        for k, (made, _p, _o) in active.items():
            due.append((reqs[k][0] + ttft + made * tpot, k))
        heapq.heapify(due)
    return steps


ENGINE_RESULTS = {"7b": "bench/results/engine_qwen2_7b_h200_ce7a9f3.json",
                  "1.5b": "bench/results/engine_qwen2_1.5b_h200_ce7a9f3.json"}


class EngineCosts:
    """Step costs from `bench engine` on the H200 (ce7a9f3): a decode step is its captured graph's replay at the
    measured batches (1, 8, 32; linear between them, flat past the last), a prefill token costs 1 / the
    prefill rate measured at batch 8 (batch 1's carried the engine's first-use compiles then), and each context
    token's KV is read at the run's HBM rate. No host work: the engine alone, what a served step could cost."""

    def __init__(self, root: Path | None = None):
        root = root or Path(__file__).resolve().parent.parent
        self.size: dict[str, dict] = {}
        for size, f in ENGINE_RESULTS.items():
            d = json.loads((root / f).read_text())
            pts = sorted((r["batch"], r["graph_replay_ms"] / 1e3) for r in d["decode"])
            pf = next(r["prefill_tokens_per_s"] for r in d["decode"] if r["batch"] == 8)
            self.size[size] = {"pts": pts, "prefill_s": 1.0 / pf, "hbm": d["hbm_bytes_per_s"]}

    def step_time(self, spec, shape: StepShape) -> float:
        c = self.size["7b" if spec.weight_bytes > 8e9 else "1.5b"]
        pts, b = c["pts"], shape.num_seqs
        lo = max((p for p in pts if p[0] <= b), default=pts[0])
        hi = min((p for p in pts if p[0] >= b), default=pts[-1])
        dec = lo[1] if hi[0] == lo[0] else lo[1] + (hi[1] - lo[1]) * (b - lo[0]) / (hi[0] - lo[0])
        prefill = max(0, shape.new_tokens - shape.num_seqs)
        return dec + prefill * c["prefill_s"] + shape.ctx_tokens * spec.kv_bytes_per_token / c["hbm"]


def bound(models: str, seed: int, *, rate: float = 0.1, duration: float = 300.0, slo_ttft: float = 10.0,
          slo_tpot: float = 0.1, profile: str = "measured", warm_s: float | None = None) -> dict:
    """The lazy schedule's cost, counted over the steady window [warm_s, duration) of the arrivals (default:
    from a third of the way in): before it the load is still building, after it arrivals have stopped."""
    lo = duration / 3 if warm_s is None else warm_s
    entries = parse_models(models)
    specs = {e.name: spec_for(e.arch, e.size, e.name) for e in entries}
    hw = EngineCosts() if profile == "engine" else hardware_profile(profile, specs)
    items = generate(list(specs), rate, duration, seed=seed)
    per_model, busy, n_steps, floor_s = {}, 0.0, 0, 0.0
    for name, spec in specs.items():
        reqs = [(w.time, w.prompt_len, w.output_len) for w in items if w.model == name]
        steps = [s for t, s in lazy_steps(reqs, slo_ttft, slo_tpot) if lo <= t < duration]
        secs = sum(hw.step_time(spec, StepShape(*s)) for s in steps)
        weights_s = len(steps) * spec.weight_bytes / HBM_BYTES_PER_S  # the weights read once a step
        per_model[name] = {"steps": len(steps), "gpu_s": secs, "mean_batch": sum(s[0] for s in steps) / max(1, len(steps))}
        busy += secs
        n_steps += len(steps)
        floor_s += weights_s
    span = duration - lo
    return {"models": models, "n_models": len(specs), "seed": seed, "rate": rate, "duration_s": duration,
            "window_s": [lo, duration], "requests": len(items), "steps": n_steps, "steps_per_s": n_steps / span,
            "gpu_s_per_s": busy / span, "weights_floor_s_per_s": floor_s / span,
            "mean_batch": sum(m["mean_batch"] * m["steps"] for m in per_model.values()) / max(1, n_steps),
            "per_size": _per_size(per_model, span)}


def _per_size(per_model: dict, span: float) -> dict:
    out: dict = {}
    for name, m in per_model.items():
        size = name.rsplit("-", 1)[0]
        d = out.setdefault(size, {"models": 0, "steps_per_s": 0.0, "gpu_s_per_s": 0.0})
        d["models"] += 1
        d["steps_per_s"] += m["steps"] / span
        d["gpu_s_per_s"] += m["gpu_s"] / span
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="30,35,40", help="model counts, each mixed as 2 x 7B per 3 x 1.5B")
    ap.add_argument("--models", default=None, help="';'-separated mixes instead of --counts")
    ap.add_argument("--seeds", default="7,0")
    ap.add_argument("--rate", type=float, default=0.1)
    ap.add_argument("--duration", type=float, default=300.0)
    ap.add_argument("--slo-ttft", type=float, default=10.0)
    ap.add_argument("--slo-tpot", type=float, default=0.1)
    ap.add_argument("--profile", default="measured", help="step costs: measured (the simulator's, fitted on a "
                    "served H200 run) | engine (bench engine's graph replay and prefill rate, no host work) | a file")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    mixes = a.models.split(";") if a.models else [mix(int(n)) for n in a.counts.split(",")]
    out = {"command": " ".join(["python -m load_tests.models_bound", *(argv or sys.argv[1:])]), "points": []}
    for seed in (int(s) for s in a.seeds.split(",")):
        for m in mixes:
            p = bound(m, seed, rate=a.rate, duration=a.duration, slo_ttft=a.slo_ttft, slo_tpot=a.slo_tpot,
                      profile=a.profile)
            out["points"].append(p)
            print(f"{p['n_models']:3d} {m:15s} seed={seed} steps/s={p['steps_per_s']:.0f} mean batch="
                  f"{p['mean_batch']:.2f} GPU-s/s={p['gpu_s_per_s']:.3f} (weights at HBM rate alone "
                  f"{p['weights_floor_s_per_s']:.3f})", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
