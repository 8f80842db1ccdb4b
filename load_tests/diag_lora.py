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
        [--only lora,lora_cublas] [--repeat 3]

`--only` times those columns alone (ratios and token checks whose columns ran); `--repeat` times each point that
many times in turn (columns interleaved: lora, lora_cublas, lora, ...), keeping every time and reporting the median.

Each point is timed after a warm-up run of the same batch; its ms per step is the generation's wall time over its
decode steps (its one prefill, of prompts cached by the warm-up, included). `tokens_equal_by_index`: whether the
graph path's greedy tokens equal the by-index path's (bf16: rounding may differ where two tokens are near a tie).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from load_tests.bench_common import header, write_json

COLUMNS = ("base", "lora", "mixed", "lora_cublas", "lora_by_index", "base_eager")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m load_tests.diag_lora")
    ap.add_argument("--model", required=True)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", default=None, help="comma-separated columns (default: all)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a check of the script itself")
    a = ap.parse_args(argv)
    only = set(a.only.split(",")) if a.only else None
    if only and only - set(COLUMNS):
        ap.error(f"--only: unknown columns {sorted(only - set(COLUMNS))}; known: {', '.join(COLUMNS)}")
    import torch

    from controller.model_factory import make_lora
    from token_scheduler import LLM, SamplingParams
    from token_scheduler import runner as R
    from token_scheduler.model import lora as L

    root = tempfile.mkdtemp()
    adapter = make_lora(a.model, root + "/lora", rank=a.rank, alpha=2.0 * a.rank)
    other = make_lora(a.model, root + "/lora2", rank=max(1, a.rank // 2), alpha=float(a.rank), seed=2)
    llm = LLM(a.model, device=a.device, dtype="bf16", lora_modules={"a": str(adapter), "b": str(other)},
              kv_cache_memory_gb=8)
    # the model's own steps without CUDA graphs: how much of a by-index step is the eager forward itself
    eager = (LLM(a.model, device=a.device, dtype="bf16", kv_cache_memory_gb=8, cuda_graphs=False)
             if only is None or "base_eager" in only else None)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    slots = R.GPU_LORAS  # (the engines' max_loras)
    rows = []
    for b in (int(x) for x in a.batch.split(",")):
        prompts = [[5 + i] * 32 for i in range(b)]
        point = {"batch": b}
        toks = {}
        runs = [(name, engine, loras, n_slots) for name, engine, loras, n_slots in (
            ("base", llm, [None], slots), ("lora", llm, ["a"], slots), ("mixed", llm, ["a", "b"], slots),
            ("lora_cublas", llm, ["a"], slots), ("lora_by_index", llm, ["a"], 0), ("base_eager", eager, [None], slots))
            if only is None or name in only]
        times: dict[str, list[float]] = {}
        for _ in range(a.repeat):
            for name, engine, loras, n_slots in runs:
                engine.engine.runner.max_loras = n_slots  # (0: no slots, so adapter rows take the by-index path)
                L.EXPAND_TRITON = name != "lora_cublas"  # (read as each step's deltas are set up: graphs captured again)
                engine.engine.runner.drop_lora_graphs()
                sps = [SamplingParams(temperature=0, max_tokens=a.tokens, ignore_eos=True, lora=loras[i % len(loras)])
                       for i in range(b)]
                try:
                    engine.generate(prompts, sps)
                    sync()
                    t0 = time.perf_counter()
                    outs = engine.generate(prompts, sps)
                    sync()
                finally:
                    engine.engine.runner.max_loras, L.EXPAND_TRITON = slots, True
                times.setdefault(name, []).append((time.perf_counter() - t0) / a.tokens * 1e3)
                toks[name] = [o.outputs[0].token_ids for o in outs]
        for name, ts in times.items():
            point[f"{name}_ms_per_step"] = statistics.median(ts)
            if a.repeat > 1:
                point[f"{name}_ms_per_step_runs"] = ts
        for key, num, den in (("lora_over_base", "lora", "base"), ("mixed_over_base", "mixed", "base"),
                              ("by_index_over_lora", "lora_by_index", "lora"),
                              ("cublas_expand_over_lora", "lora_cublas", "lora")):
            if num in times and den in times:
                point[key] = point[f"{num}_ms_per_step"] / point[f"{den}_ms_per_step"]
        if "lora" in toks and "lora_by_index" in toks:
            point["tokens_equal_by_index"] = sum(x == y for x, y in zip(toks["lora"], toks["lora_by_index"])) / b
        print(f"batch {b}: " + "; ".join(f"{n} {point[n + '_ms_per_step']:.2f} ms/step" for n in times)
              + "".join(f"; {k} {point[k]:.2f}" for k in ("lora_over_base", "mixed_over_base", "by_index_over_lora",
                                                           "cublas_expand_over_lora", "tokens_equal_by_index")
                        if k in point))
        rows.append(point)
    res = {**header(), "model": a.model, "rank": a.rank, "tokens": a.tokens, "slots": slots, "repeat": a.repeat,
           "only": sorted(only) if only else None, "points": rows}
    if a.json:
        write_json(a.json, res)
    return res


if __name__ == "__main__":
    main()
