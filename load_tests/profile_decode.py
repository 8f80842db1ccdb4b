"""Where a batch-1 decode step's time goes on CUDA: kernels by total time, launches per step, graph replay.

    python -m load_tests.profile_decode --model DIR [--batch 1] [--steps 20] [--context 64]

Profiles the eager fused decode forward (the same kernels the CUDA graph replays) with torch.profiler and
prints the top kernels; then times graph replay alone and a full engine step, so host overhead shows up as
the difference. A diagnostic, not a benchmark: nothing is written to bench/results.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--context", type=int, default=64, help="prompt tokens a sequence (bench engine decodes at 512)")
    ap.add_argument("--top", type=int, default=25, help="kernels listed")
    ap.add_argument("--json", help="also write every kernel's time a step and count here")
    a = ap.parse_args()

    from token_scheduler import EngineConfig, LLMEngine, SamplingParams

    eng = LLMEngine(EngineConfig(model=a.model, device="cuda", max_num_seqs=max(8, a.batch), kv_cache_memory_gb=4))
    for i in range(a.batch):
        eng.add_request(f"r{i}", list(range(1, a.context + 1)), SamplingParams(max_tokens=100000, ignore_eos=True))
    for _ in range(5):
        eng.step()
    runner = eng.runner
    out = eng.scheduler.schedule()
    # one scheduled decode step, replayed without advancing (KV writes land in the same slots)
    g = runner.graphs[runner._graph_id(runner.bucket_of[len(out.chunks)])]
    g.fill(out, runner)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(a.steps):
        g.graph.replay()
    torch.cuda.synchronize()
    replay_ms = 1e3 * (time.perf_counter() - t) / a.steps

    from token_scheduler.model import llama
    meta = g.keep[1]  # the graph's own metadata (own_rows: the RoPE fold and early cache tile as replayed)

    def eager():
        h = runner.fwd_decode(runner.cfg, runner.weights, runner.kv, runner.rope, g.dev[0], g.dev[1], meta)
        return llama.compute_logits(runner.weights, h, fp32=False)

    for _ in range(3):
        eager()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(a.steps):
            eager()
        torch.cuda.synchronize()
    ev = [e for e in prof.key_averages()]
    ev.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in ev)
    launches = sum(e.count for e in ev)
    print(f"graph replay {replay_ms:.3f} ms/step; kernels {total / a.steps / 1e3:.3f} ms/step (sum of kernel "
          f"times), {launches / a.steps:.0f} launches/step")
    for e in ev[:a.top]:
        print(f"{e.device_time_total / a.steps:9.1f} us/step  {e.count // a.steps:4d}x  {e.key[:110]}")
    if a.json:
        import json

        rows = [{"us_per_step": e.device_time_total / a.steps, "per_step": e.count / a.steps, "kernel": e.key}
                for e in ev if e.device_time_total > 0]
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "batch": a.batch, "context": a.context, "graph_replay_ms": replay_ms,
                       "kernel_ms": total / a.steps / 1e3, "launches": launches / a.steps, "kernels": rows}, f, indent=1)
    # full engine steps (schedule + fill + replay + sample + read back)
    # the probe step was never applied (no update): the next schedule() plans the same decode again
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(a.steps):
        eng.step()
    torch.cuda.synchronize()
    print(f"engine step {1e3 * (time.perf_counter() - t) / a.steps:.3f} ms")


if __name__ == "__main__":
    main()
