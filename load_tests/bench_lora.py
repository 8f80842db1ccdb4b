"""Multi-LoRA serving through the product: one `tokenpool serve` serving a model and two LoRA adapters over it
(`lora_modules`), `--concurrency` streamed chat requests at once from the official `openai` client, greedy with
`ignore_eos` so every request decodes `--max-tokens` tokens. Three rounds of the same prompts:

- base: every request to the model;
- one adapter: every request to adapter a;
- mixed: requests spread over the model, adapter a and adapter b (another rank), decoding in the same steps.

Per round: time per output token (a request's time after its first token over its tokens after the first; p50 over
the requests), time to first token p50, and the round's output tokens a second. Each round runs once to warm up
(compiles, graph captures, the adapters' first copies to the device), then `--repeats` times timed; the run of median
throughput is reported.

    python -m load_tests.bench_lora [--model DIR] [--rank 16] [--concurrency 8] [--max-tokens 256]
                                    [--device cpu|auto] [--json F]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from load_tests.bench_common import QUESTIONS, cpu_model, header, model_or_smollm2, write_json


def _one(client, model: str, question: str, max_tokens: int) -> tuple[float, float, int]:
    """(time to first token, time per output token after it, tokens) of one streamed greedy request."""
    t0 = time.perf_counter()
    first, n = None, 0
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    for ch in stream:
        if ch.choices and ch.choices[0].delta.content and first is None:
            first = time.perf_counter()
        if ch.usage is not None:
            n = ch.usage.completion_tokens
    end = time.perf_counter()
    first = first or end
    return first - t0, (end - first) / max(1, n - 1), n


def _round(client, models: list[str], concurrency: int, max_tokens: int) -> dict:
    jobs = [(models[i % len(models)], QUESTIONS[i % len(QUESTIONS)]) for i in range(concurrency)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        res = list(ex.map(lambda j: _one(client, j[0], j[1], max_tokens), jobs))
    wall = time.perf_counter() - t0
    return {"models": models, "ttft_p50_s": statistics.median(r[0] for r in res),
            "tpot_p50_ms": statistics.median(r[1] for r in res) * 1e3,
            "tpot_max_ms": max(r[1] for r in res) * 1e3, "output_tokens": sum(r[2] for r in res),
            "output_tokens_per_s": sum(r[2] for r in res) / wall, "wall_s": wall}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m load_tests.bench_lora")
    ap.add_argument("--model", default=None, help="HF model directory (default: the embedded SmolLM2)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each round (the median run is reported)")
    ap.add_argument("--device", default="cpu", help="the workers: cpu, or auto (one a GPU)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    import openai

    from controller.model_factory import make_lora
    from load_tests.live_server import LiveServer

    model = model_or_smollm2(a.model)
    rounds = {"base": ["m"], "one_adapter": ["a"], "mixed": ["m", "a", "b"]}
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as work:
        ad_a = make_lora(model, Path(work) / "a", rank=a.rank, alpha=2.0 * a.rank, seed=1)
        ad_b = make_lora(model, Path(work) / "b", rank=max(1, a.rank // 2), alpha=float(a.rank), seed=2)
        cfg = {"workers": {"local": a.device}, "models": [
            {"name": "m", "path": model, "engine": {"max_num_seqs": max(8, a.concurrency)},
             "slo": {"ttft_s": 120.0, "tpot_s": 10.0},
             "lora_modules": [{"name": "a", "path": str(ad_a)}, {"name": "b", "path": str(ad_b)}]}]}
        with LiveServer(cfg, Path(work) / "srv", ready_timeout=600) as srv:
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=600)
            for name, models in rounds.items():
                _round(c, models, a.concurrency, a.max_tokens)  # (warm-up)
                runs = sorted((_round(c, models, a.concurrency, a.max_tokens) for _ in range(a.repeats)),
                              key=lambda r: r["output_tokens_per_s"])
                out[name] = {**runs[len(runs) // 2], "output_tokens_per_s_runs": [r["output_tokens_per_s"] for r in runs]}
                r = out[name]
                print(f"{name}: TPOT p50 {r['tpot_p50_ms']:.2f} ms (max {r['tpot_max_ms']:.2f}), TTFT p50 "
                      f"{r['ttft_p50_s'] * 1e3:.0f} ms, {r['output_tokens_per_s']:.0f} tokens/s")
    res = {**header(), "cpu": cpu_model(), "model": model, "worker_device": a.device, "rank": a.rank,
           "concurrency": a.concurrency, "max_tokens": a.max_tokens, "rounds": out,
           "tpot_ratio_one_adapter_over_base": out["one_adapter"]["tpot_p50_ms"] / out["base"]["tpot_p50_ms"],
           "tpot_ratio_mixed_over_base": out["mixed"]["tpot_p50_ms"] / out["base"]["tpot_p50_ms"],
           "throughput_ratio_base_over_one_adapter": out["base"]["output_tokens_per_s"]
           / out["one_adapter"]["output_tokens_per_s"],
           "throughput_ratio_base_over_mixed": out["base"]["output_tokens_per_s"] / out["mixed"]["output_tokens_per_s"]}
    print(f"TPOT over the model's own: one adapter {res['tpot_ratio_one_adapter_over_base']:.2f}x, mixed "
          f"{res['tpot_ratio_mixed_over_base']:.2f}x")
    if a.json:
        write_json(a.json, res)
    return res


if __name__ == "__main__":
    main()
