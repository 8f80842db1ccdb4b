"""The CPU path against HF `generate` on SmolLM2-135M-Instruct (the embedded default's real model).

    python -m load_tests.bench_cpu [--tokens 64] [--rounds 5] [--batch 1,4] [--threads N] [--json FILE]

Same process, same weights (fp32, the CPU default), same chat prompts, greedy, EOS ignored so both make exactly
`--tokens` tokens. The engine (`token_scheduler.LLM`) and HF alternate round by round, so load from other
processes falls on both alike; the median round is reported, and `ratio` = HF time / engine time (> 1: the
engine is faster). Engine and HF each get a warm-up round first. Before that, batch-1 decode steps are timed one
by one (HF's model with its KV cache against the engine's `step()`), whose median and minimum resist bursts of
load from other processes better than whole-generation times do.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from load_tests.bench_common import header, write_json

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Name three primary colours.",
             "Explain what a CPU does in one sentence.", "Who wrote Romeo and Juliet?", "What is 12 times 7?",
             "Give me a short tip for learning to cook.", "Translate 'good morning' into Spanish."]


def _prompts(tok, batch: int) -> list[list[int]]:
    return [tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                    add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
            for i in range(batch)]


def _hf_round(hf, tok, prompts: list[list[int]], tokens: int) -> float:
    n = max(len(p) for p in prompts)  # left padding, as HF batches generation
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.tensor([[pad] * (n - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts])
    t = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                          pad_token_id=pad)
    dt = time.perf_counter() - t
    assert out.shape[1] - n == tokens
    return dt


def _engine_round(llm, prompts: list[list[int]], tokens: int) -> float:
    from token_scheduler import SamplingParams

    t = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))
    dt = time.perf_counter() - t
    assert all(len(o.outputs[0].token_ids) == tokens for o in outs)
    return dt


def _hf_steps(hf, prompt: list[int], tokens: int) -> list[float]:
    """HF's own decode step (the model with its KV cache, greedy), timed one by one after the prefill."""
    from transformers import DynamicCache

    ts = []
    with torch.inference_mode():
        out = hf(torch.tensor([prompt]), past_key_values=DynamicCache(config=hf.config), use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(tokens):
            t = time.perf_counter()
            out = hf(nxt, past_key_values=out.past_key_values, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            ts.append(time.perf_counter() - t)
    return ts


def _engine_steps(llm, prompt: list[int], tokens: int, rid: str) -> list[float]:
    """The engine's step (schedule, forward, sample, detokenise), timed one by one after the prefill step."""
    from token_scheduler import SamplingParams

    e = llm.engine
    e.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=tokens + 1, ignore_eos=True))
    e.step()
    ts = []
    while e.has_unfinished_requests():
        t = time.perf_counter()
        e.step()
        ts.append(time.perf_counter() - t)
    return ts


def run(model: Path, tokens: int, rounds: int, batches: list[int], json_out: Path | None) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from token_scheduler import LLM

    res = header() | {"bench": "cpu_vs_hf_generate", "model": str(model), "dtype": "fp32", "tokens": tokens,
                      "rounds": rounds, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                      "loadavg_before": Path("/proc/loadavg").read_text().split()[:3], "points": []}
    tok = AutoTokenizer.from_pretrained(str(model))
    hf = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    llm = LLM(model, device="cpu", dtype="fp32", max_num_seqs=max(batches))
    # Batch 1, step by step: the median is robust to other processes' bursts, the minimum is the quiet cost.
    prompt = _prompts(tok, 1)[0]
    hf_s, eng_s = [], []
    for r in range(rounds + 1):
        h, e = _hf_steps(hf, prompt, tokens), _engine_steps(llm, prompt, tokens, f"steps-{r}")
        if r:  # the first round warms up
            hf_s += h
            eng_s += e
    ms = lambda x: round(1e3 * x, 3)  # noqa: E731
    res["decode_step_batch1"] = {
        "hf_median_ms": ms(statistics.median(hf_s)), "engine_median_ms": ms(statistics.median(eng_s)),
        "hf_min_ms": ms(min(hf_s)), "engine_min_ms": ms(min(eng_s)),
        "ratio_hf_over_engine_median": round(statistics.median(hf_s) / statistics.median(eng_s), 3),
        "ratio_hf_over_engine_min": round(min(hf_s) / min(eng_s), 3), "steps": len(hf_s)}
    print(res["decode_step_batch1"])
    for b in batches:
        prompts = _prompts(tok, b)
        _hf_round(hf, tok, prompts, tokens), _engine_round(llm, prompts, tokens)  # warm-up
        hf_t, eng_t = [], []
        for _ in range(rounds):
            hf_t.append(_hf_round(hf, tok, prompts, tokens))
            eng_t.append(_engine_round(llm, prompts, tokens))
        h, e = statistics.median(hf_t), statistics.median(eng_t)
        res["points"].append({"batch": b, "prompt_tokens": [len(p) for p in prompts],
                              "hf_generate_s": round(h, 4), "engine_s": round(e, 4),
                              "hf_tokens_per_s": round(b * tokens / h, 1), "engine_tokens_per_s": round(b * tokens / e, 1),
                              "ratio_hf_over_engine": round(h / e, 3),
                              "hf_rounds_s": [round(x, 4) for x in hf_t], "engine_rounds_s": [round(x, 4) for x in eng_t]})
        print(res["points"][-1])
    res["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    write_json(json_out, res)
    return res


def main(argv: list[str] | None = None) -> None:
    from controller.config import REAL_MODEL, cache_dir
    from controller.real_model import ensure_smollm2

    ap = argparse.ArgumentParser(prog="python -m load_tests.bench_cpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="default: SmolLM2-135M-Instruct (converted if need be)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", default="1,4")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model = a.model or ensure_smollm2(cache_dir() / REAL_MODEL)
    run(model, a.tokens, a.rounds, [int(x) for x in a.batch.split(",")], a.json)


if __name__ == "__main__":
    main()
