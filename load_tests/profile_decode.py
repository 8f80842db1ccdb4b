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
    from token_scheduler.model.attention import AttentionMetadata

    meta = AttentionMetadata(g.dev[2], g.dev[3], runner.block_size, decode=True, block_tables=g.bt,
                             context_lens=g.ctx32, use_triton=runner.use_triton)

    def eager():
        h = runner.fwd_decode(runner.cfg, runner.weights, runner.kv, runner.rope, g.dev[0], g.dev[1], meta)
        return llama.compute_logits(runner.weights, h)

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
    for e in ev[:25]:
        print(f"{e.device_time_total / a.steps:9.1f} us/step  {e.count // a.steps:4d}x  {e.key[:110]}")
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
