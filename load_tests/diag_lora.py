"""What a LoRA adapter costs a decode step on the GPU: the same greedy generation with and without an adapter (a
random PEFT one of `--rank` over every projection), per batch size, through the engine (`token_scheduler.LLM`).
Adapter rows run the eager forward (no CUDA graph), the model's own replay their graphs; the model's own without
graphs too (`cuda_graphs=False`), to tell the eager forward's cost from the adapter's.

    python -m load_tests.diag_lora --model DIR [--rank 16] [--batch 1,8,32] [--tokens 64] [--json FILE]

Each point is timed after a warm-up run of the same batch; its ms per step is the generation's wall time over its
decode steps (its one prefill, of prompts cached by the warm-up, included).
"""

from __future__ import annotations

import argparse
import tempfile
import time

from load_tests.bench_common import header, write_json


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m load_tests.diag_lora")
    ap.add_argument("--model", required=True)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    import torch

    from controller.model_factory import make_lora
    from token_scheduler import LLM, SamplingParams

    adapter = make_lora(a.model, tempfile.mkdtemp() + "/lora", rank=a.rank, alpha=2.0 * a.rank)
    llm = LLM(a.model, device="cuda", dtype="bf16", lora_modules={"a": str(adapter)}, kv_cache_memory_gb=8)
    # the model's own steps without CUDA graphs: how much of an adapter step is the eager forward itself
    eager = LLM(a.model, device="cuda", dtype="bf16", kv_cache_memory_gb=8, cuda_graphs=False)
    rows = []
    for b in (int(x) for x in a.batch.split(",")):
        prompts = [[5 + i] * 32 for i in range(b)]
        point = {"batch": b}
        for name, engine, lora in (("base", llm, None), ("lora", llm, "a"), ("base_eager", eager, None)):
            sp = SamplingParams(temperature=0, max_tokens=a.tokens, ignore_eos=True, lora=lora)
            engine.generate(prompts, sp)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            engine.generate(prompts, sp)
            torch.cuda.synchronize()
            point[f"{name}_ms_per_step"] = (time.perf_counter() - t0) / a.tokens * 1e3
        point["ratio"] = point["lora_ms_per_step"] / point["base_ms_per_step"]
        print(f"batch {b}: base {point['base_ms_per_step']:.2f} ms/step, with the adapter "
              f"{point['lora_ms_per_step']:.2f} ms/step ({point['ratio']:.2f}x), base without graphs "
              f"{point['base_eager_ms_per_step']:.2f} ms/step")
        rows.append(point)
    res = {**header(), "model": a.model, "rank": a.rank, "tokens": a.tokens, "points": rows}
    if a.json:
        write_json(a.json, res)
    return res


if __name__ == "__main__":
    main()
