"""Preemption when the host KV pages are full: tokens recomputed and time, on one engine over a factory model.

    python -m load_tests.bench_preempt [--size small] [--requests 24] [--gpu-blocks 24] [--host-blocks 6] [--json F]

Requests of varied prompt and output lengths arrive a few steps apart into a GPU KV pool too small for them, with
host pages (swap space) too few for every request preempted: some preempted KV is swapped out, the rest dropped and
recomputed. Reported: preemptions, KV swapped out and dropped, the tokens the engine computed beyond each request's
prompt and outputs (recomputed; counted from the steps' chunks, so any version of the engine is measured alike), and
the wall and CPU time of the run (greedy; the round of median wall time, and each measure's median over `--rounds`:
CPU time is the steadier where other processes share the cores). Every request's tokens must equal those of a run whose
pool holds all of them (no preemption), else it exits 1.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from load_tests.bench_common import header, write_json
from token_scheduler import LLMEngine, SamplingParams
from token_scheduler.engine import EngineConfig


def _jobs(n: int, seed: int) -> list[tuple[int, list[int], SamplingParams]]:
    """(arrival step, prompt, params): prompts of 8-40 or 100-240 tokens (half each), 8-48 tokens out, up to 3 steps
    apart."""
    rng = random.Random(seed)
    out, step = [], 0
    for _ in range(n):
        prompt = [rng.randrange(10, 1000) for _ in range(rng.randrange(*rng.choice(((8, 40), (100, 240)))))]
        out.append((step, prompt, SamplingParams(temperature=0, max_tokens=rng.randrange(8, 48), ignore_eos=True)))
        step += rng.randrange(0, 4)
    return out


def _run(model: Path, jobs, **kw) -> tuple[dict, dict]:
    eng = LLMEngine(EngineConfig(model=str(model), device="cpu", dtype="fp32", **kw))
    computed = {"tokens": 0, "swap_out": 0}
    execute = eng.runner.execute

    def count(out, *a, **k):
        computed["tokens"] += out.num_tokens
        computed["swap_out"] += len(out.swap_out)
        return execute(out, *a, **k)

    eng.runner.execute = count
    done, pending, step = {}, list(enumerate(jobs)), 0
    t0, c0 = time.perf_counter(), time.process_time()
    while pending or eng.has_unfinished_requests():
        while pending and pending[0][1][0] <= step:
            i, (_, prompt, sp) = pending.pop(0)
            eng.add_request(f"r{i}", prompt, sp)
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
        step += 1
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    st = eng.stats()
    # each request computes its prompt and every output token but the last (never fed back); less first-start hits
    least = sum(len(p) + len(done[f"r{i}"]) - 1 for i, (_, p, _) in enumerate(jobs)) - st.get("prefix_cache_hits", 0)
    return done, {"wall_s": wall, "cpu_s": cpu, "steps": step, "num_preemptions": st["num_preemptions"],
                  "swapped_out": computed["swap_out"], "num_kv_dropped": st.get("num_kv_dropped"),
                  "kv_tokens_dropped": st.get("kv_tokens_dropped"), "tokens_computed": computed["tokens"],
                  "tokens_recomputed": computed["tokens"] - least}


def main(argv: list[str] | None = None) -> None:
    from controller.model_factory import make_model

    ap = argparse.ArgumentParser(prog="python -m load_tests.bench_preempt", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="qwen2")
    ap.add_argument("--size", default="small", help="a factory size (controller/model_factory.py)")
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--gpu-blocks", type=int, default=24, help="GPU KV blocks of 16 tokens")
    ap.add_argument("--host-blocks", type=int, default=6, help="host KV pages (swap space)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    jobs = _jobs(a.requests, a.seed)
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(a.arch, a.size, Path(tmp) / "m", seed=0, dtype="fp32", device="cpu", progress=False)
        want, _ = _run(model, jobs, num_kv_blocks=1024, num_host_kv_blocks=0)
        runs = []
        for _ in range(a.rounds):
            got, res = _run(model, jobs, num_kv_blocks=a.gpu_blocks, num_host_kv_blocks=a.host_blocks)
            if got != want:
                print("tokens differ from the run without preemption", file=sys.stderr)
                sys.exit(1)
            runs.append(res)
    mid = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
    write_json(a.json, {**header(), "model": f"{a.arch}:{a.size} (factory, fp32)", "requests": a.requests,
                        "gpu_blocks": a.gpu_blocks, "host_blocks": a.host_blocks, "threads": torch.get_num_threads(),
                        "tokens_equal_unpreempted": True, **mid,
                        "wall_s_rounds": [round(r["wall_s"], 4) for r in runs],
                        "wall_s_median": statistics.median(r["wall_s"] for r in runs),
                        "cpu_s_rounds": [round(r["cpu_s"], 4) for r in runs],
                        "cpu_s_median": statistics.median(r["cpu_s"] for r in runs)})


if __name__ == "__main__":
    main()
