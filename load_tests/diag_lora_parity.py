"""Do the GPU's LoRA paths give the same tokens? One adapter (random, `--rank`, every projection) over a model, greedy
generation of `--batch` prompts by: the decode and row graphs over the adapter slots with the Triton expand
(`slots`), the same with the expand on cuBLAS (`slots_cublas`), the slots without graphs (`slots_eager`), the
by-index deltas on the eager forward (`by_index`), and an engine on the merged weights (`merged`). Prefix caching off
(no path reuses another's KV). Prints, per pair, the share of identical sequences and the mean step of the first
divergence; in fp32 every path should agree with every other.

    python -m load_tests.diag_lora_parity --model DIR [--dtype bf16|fp32] [--batch 8] [--tokens 32] [--json FILE]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile

from load_tests.bench_common import header, write_json


def _first_diff(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m load_tests.diag_lora_parity")
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    from controller.model_factory import make_lora, merge_lora
    from token_scheduler import LLM, SamplingParams
    from token_scheduler import runner as R
    from token_scheduler.model import lora as L

    root = tempfile.mkdtemp()
    adapter = make_lora(a.model, root + "/lora", rank=a.rank, alpha=2.0 * a.rank, seed=3)
    merged = merge_lora(a.model, adapter, root + "/merged")
    kw = dict(device=a.device, dtype=a.dtype, kv_cache_memory_gb=4, enable_prefix_caching=False)
    prompts = [[5 + 7 * i + j for j in range(9 + 3 * i)] for i in range(a.batch)]
    sp = SamplingParams(temperature=0, max_tokens=a.tokens, ignore_eos=True, lora="a")
    toks = {}
    slots = R.GPU_LORAS  # (the default max_loras)
    for name, graphs, n_slots, triton in (("slots", True, slots, True), ("slots_cublas", True, slots, False),
                                          ("slots_eager", False, slots, True), ("by_index", True, 0, True)):
        L.EXPAND_TRITON = triton
        try:
            llm = LLM(a.model, lora_modules={"a": str(adapter)}, cuda_graphs=graphs, max_loras=n_slots, **kw)
            toks[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
            del llm
        finally:
            L.EXPAND_TRITON = True
    llm = LLM(merged, **kw)
    toks["merged"] = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(
        temperature=0, max_tokens=a.tokens, ignore_eos=True))]
    pairs = {}
    for x, y in itertools.combinations(toks, 2):
        same = sum(p == q for p, q in zip(toks[x], toks[y])) / a.batch
        first = sum(_first_diff(p, q) for p, q in zip(toks[x], toks[y])) / a.batch
        pairs[f"{x}~{y}"] = {"identical": same, "mean_first_divergence": first}
        print(f"{x:>13} ~ {y:<13} identical {same:.2f}, first divergence at step {first:.1f} (mean)")
    res = {**header(), "model": a.model, "dtype": a.dtype, "rank": a.rank, "batch": a.batch, "tokens": a.tokens,
           "pairs": pairs, "tokens_by_path": toks}
    if a.json:
        write_json(a.json, res)
    return res


if __name__ == "__main__":
    main()
