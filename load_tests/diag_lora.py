"""What a LoRA adapter costs a decode step on the GPU: the same greedy generation with and without an adapter (a
random PEFT one of `--rank` over every projection), per batch size, through the engine (`token_scheduler.LLM`).

Columns, each a ms per decode step:
- base: the model's own rows (its decode graphs);
- lora: every row on the adapter (the decode graphs over the adapter slots, `LoraSlots`);
- mixed: half the rows on the adapter, half on a second adapter of another rank, in the same steps;
- lora_cublas: as lora, the mask product and expand on cuBLAS (lora.EXPAND_TRITON off: three launches a projection
  instead of two);
- lora_by_index: every row on the adapter, the deltas added adapter by adapter on the eager forward (the path a
  step takes when it asks for more adapters than it has slots (max_loras); before the slots, every adapter step's);
- base_eager: the model's own rows without graphs (`cuda_graphs=False`): the eager forward's own cost.

    python -m load_tests.diag_lora --model DIR [--rank 16] [--batch 1,8,32] [--tokens 64] [--json FILE]

Each point is timed after a warm-up run of the same batch; its ms per step is the generation's wall time over its
decode steps (its one prefill, of prompts cached by the warm-up, included). `tokens_equal_by_index`: whether the
graph path's greedy tokens equal the by-index path's (bf16: rounding may differ where two tokens are near a tie).
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
    from token_scheduler import runner as R
    from token_scheduler.model import lora as L

    root = tempfile.mkdtemp()
    adapter = make_lora(a.model, root + "/lora", rank=a.rank, alpha=2.0 * a.rank)
    other = make_lora(a.model, root + "/lora2", rank=max(1, a.rank // 2), alpha=float(a.rank), seed=2)
    llm = LLM(a.model, device="cuda", dtype="bf16", lora_modules={"a": str(adapter), "b": str(other)},
              kv_cache_memory_gb=8)
    # the model's own steps without CUDA graphs: how much of a by-index step is the eager forward itself
    eager = LLM(a.model, device="cuda", dtype="bf16", kv_cache_memory_gb=8, cuda_graphs=False)
    slots = R.GPU_LORAS  # (the engines' max_loras)
    rows = []
    for b in (int(x) for x in a.batch.split(",")):
        prompts = [[5 + i] * 32 for i in range(b)]
        point = {"batch": b}
        toks = {}
        for name, engine, loras, n_slots in (("base", llm, [None], slots), ("lora", llm, ["a"], slots),
                                             ("mixed", llm, ["a", "b"], slots), ("lora_cublas", llm, ["a"], slots),
                                             ("lora_by_index", llm, ["a"], 0), ("base_eager", eager, [None], slots)):
            engine.engine.runner.max_loras = n_slots  # (0: no slots, so adapter rows take the by-index path)
            L.EXPAND_TRITON = name != "lora_cublas"  # (read as each step's deltas are set up: graphs captured again)
            engine.engine.runner.drop_lora_graphs()
            sps = [SamplingParams(temperature=0, max_tokens=a.tokens, ignore_eos=True, lora=loras[i % len(loras)])
                   for i in range(b)]
            try:
                engine.generate(prompts, sps)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                outs = engine.generate(prompts, sps)
                torch.cuda.synchronize()
            finally:
                engine.engine.runner.max_loras, L.EXPAND_TRITON = slots, True
            point[f"{name}_ms_per_step"] = (time.perf_counter() - t0) / a.tokens * 1e3
            toks[name] = [o.outputs[0].token_ids for o in outs]
        point["lora_over_base"] = point["lora_ms_per_step"] / point["base_ms_per_step"]
        point["mixed_over_base"] = point["mixed_ms_per_step"] / point["base_ms_per_step"]
        point["by_index_over_lora"] = point["lora_by_index_ms_per_step"] / point["lora_ms_per_step"]
        point["cublas_expand_over_lora"] = point["lora_cublas_ms_per_step"] / point["lora_ms_per_step"]
        point["tokens_equal_by_index"] = sum(x == y for x, y in zip(toks["lora"], toks["lora_by_index"])) / b
        print(f"batch {b}: base {point['base_ms_per_step']:.2f} ms/step; adapter {point['lora_ms_per_step']:.2f} "
              f"({point['lora_over_base']:.2f}x), two adapters {point['mixed_ms_per_step']:.2f} "
              f"({point['mixed_over_base']:.2f}x), expand on cuBLAS {point['lora_cublas_ms_per_step']:.2f}; by index {point['lora_by_index_ms_per_step']:.2f}; base without "
              f"graphs {point['base_eager_ms_per_step']:.2f}; tokens equal by index {point['tokens_equal_by_index']:.2f}")
        rows.append(point)
    res = {**header(), "model": a.model, "rank": a.rank, "tokens": a.tokens, "slots": slots, "points": rows}
    if a.json:
        write_json(a.json, res)
    return res


if __name__ == "__main__":
    main()
