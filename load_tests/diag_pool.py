"""Where the pooled engine's step time goes under load: per executed step (decode/prefill, tokens, graph
or eager, wall time including the sampling sync) and every CUDA-graph capture, during a short real replay.

    python -m load_tests.diag_pool --rate 0.5 --duration 40 --json OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict

from token_scheduler import runner as R


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", default="0.5")
    ap.add_argument("--duration", type=float, default=40.0)
    ap.add_argument("--drain", type=float, default=20.0)
    ap.add_argument("--policy", default="token")
    ap.add_argument("--json", default=None)
    ap.add_argument("--cpu-tiny", default=None, help="smoke test: this tiny model dir stands in for every size, on CPU")
    a = ap.parse_args()
    steps, captures = [], []
    orig_exec, orig_cap = R.ModelRunner.execute, R.ModelRunner._capture

    def execute(self, out):
        t = time.perf_counter()
        res = orig_exec(self, out)
        dt = time.perf_counter() - t
        graph = out.is_decode and len(out.chunks) in self.bucket_of
        steps.append((self.name, "decode" if out.is_decode else "prefill", len(out.chunks), out.num_tokens,
                      graph, dt, len(out.swap_out) + len(out.swap_in)))
        return res

    def capture(self, bucket):
        t = time.perf_counter()
        g = orig_cap(self, bucket)
        captures.append((self.name, bucket, str(self.slot_key), time.perf_counter() - t))
        return g

    R.ModelRunner.execute, R.ModelRunner._capture = execute, capture
    from load_tests.bench_pool_real import run_real

    t0 = time.perf_counter()
    kw = ({"device": "cpu", "dtype": "fp32", "model_dirs": {"7b": a.cpu_tiny, "1.5b": a.cpu_tiny},
           "gpu_budget_gb": 0.05, "kv_cache_gb": 0.01, "host_budget_gb": 1.0} if a.cpu_tiny else {})
    res = run_real(rate=a.rate, duration=a.duration, drain_s=a.drain, policies=(a.policy,), **kw)
    wall = time.perf_counter() - t0
    agg = defaultdict(list)
    for name, kind, n, tok, graph, dt, _sw in steps:
        size = "7b" if "7b" in name else "1.5b"
        agg[(size, kind, graph)].append((n, tok, dt))
    summary = {}
    for k, v in sorted(agg.items(), key=lambda kv: str(kv[0])):
        dts = [x[2] for x in v]
        summary["/".join(map(str, k))] = {
            "count": len(v), "total_s": sum(dts), "median_ms": 1e3 * statistics.median(dts),
            "p90_ms": 1e3 * sorted(dts)[int(0.9 * len(dts))], "mean_seqs": statistics.mean(x[0] for x in v),
            "mean_tokens": statistics.mean(x[1] for x in v),
            "ms_per_token": 1e3 * sum(dts) / max(1, sum(x[1] for x in v))}
    cap = {"count": len(captures), "total_s": sum(c[3] for c in captures),
           "distinct_slots": len({c[2] for c in captures}), "first": captures[:20]}
    p = res["sweep"][a.policy][0] if "sweep" in res else res["policies"][a.policy]
    out = {"wall_s": wall, "executed": summary, "captures": cap, "slo": p["slo"], "timing": p["timing"],
           "loads": p["loads"], "prefetches": p["prefetches"], "evictions": p["evictions"], "load_gb": p["load_gb"],
           "swap_stall_s": p["swap_stall_s"], "cuda_memory": p.get("cuda_memory")}
    print(json.dumps(out, indent=1, default=str))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()
