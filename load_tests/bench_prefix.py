"""Prefix caching through the product: time to first token of chat requests that share a long system prompt, with
the cache on and off, on one `tokenpool serve` serving the same model under two names (one with
`engine.enable_prefix_caching: false`), measured with the official `openai` client (streamed).

    python -m load_tests.bench_prefix [--model DIR] [--system-tokens 1500] [--questions 8] [--device cpu|auto] [--json F]

The requests alternate cached / uncached, one at a time, so load from other processes falls on both alike; the
first cached request fills the cache and is reported apart. Greedy: the texts must be the same either way.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from load_tests.bench_common import QUESTIONS, cpu_model, header, model_or_smollm2, write_json

PARAGRAPH = ("The assistant answers questions about the handbook below. It is careful, brief and polite, and it "
             "says when the handbook does not cover a question. Section {i}: members of staff keep their desks "
             "tidy, report faults to the facilities team, and book meeting rooms a day ahead where they can. ")


def _ttft(client, model: str, messages: list[dict], max_tokens: int) -> tuple[float, float, str, int]:
    t0 = time.perf_counter()
    first, text, cached = None, "", 0
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    for ch in stream:
        if ch.choices and ch.choices[0].delta.content:
            first = first or time.perf_counter()
            text += ch.choices[0].delta.content
        if ch.usage is not None and ch.usage.prompt_tokens_details is not None:
            cached = ch.usage.prompt_tokens_details.cached_tokens
    end = time.perf_counter()
    return (first or end) - t0, end - t0, text, cached


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m load_tests.bench_prefix")
    ap.add_argument("--model", default=None, help="HF model directory (default: the embedded SmolLM2)")
    ap.add_argument("--system-tokens", type=int, default=1500, help="about this many tokens of system prompt")
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--device", default="cpu", help="the workers: cpu, or auto (one a GPU)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    import openai
    from transformers import AutoTokenizer

    from load_tests.live_server import LiveServer

    model = model_or_smollm2(a.model)
    tok = AutoTokenizer.from_pretrained(model)
    system, i = "", 0
    while len(tok.encode(system)) < a.system_tokens:
        system += PARAGRAPH.format(i=i)
        i += 1
    engine = {"max_num_seqs": 8}
    slo = {"ttft_s": 120.0}  # (admission estimates a prefill from the whole prompt: a CPU one of 1,500 tokens is long)
    cfg = {"workers": {"local": a.device}, "models": [
        {"name": "cached", "path": model, "engine": engine, "slo": slo},
        {"name": "uncached", "path": model, "engine": {**engine, "enable_prefix_caching": False}, "slo": slo}]}
    rows = {"cached": [], "uncached": []}
    with tempfile.TemporaryDirectory() as work, LiveServer(cfg, Path(work), ready_timeout=600) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=600)
        warm = {}
        for name in ("uncached", "cached"):  # (the first of each: compiles, allocations; the cached one fills it)
            msgs = [{"role": "system", "content": system}, {"role": "user", "content": "Hi."}]
            warm[name] = _ttft(c, name, msgs, a.max_tokens)
        for q in QUESTIONS[: a.questions]:
            msgs = [{"role": "system", "content": system}, {"role": "user", "content": q}]
            for name in ("cached", "uncached"):
                rows[name].append(_ttft(c, name, msgs, a.max_tokens))
    prompt_tokens = len(tok.apply_chat_template([{"role": "system", "content": system},
                                                 {"role": "user", "content": QUESTIONS[0]}], tokenize=True,
                                                add_generation_prompt=True, return_dict=True)["input_ids"])

    def summary(rs):
        ttft = [r[0] for r in rs]
        return {"ttft_p50_s": statistics.median(ttft), "ttft_mean_s": statistics.fmean(ttft),
                "total_p50_s": statistics.median(r[1] for r in rs), "cached_tokens": [r[3] for r in rs]}

    res = {**header(), "cpu": cpu_model(), "model": model, "worker_device": a.device, "prompt_tokens": prompt_tokens,
           "questions": a.questions, "max_tokens": a.max_tokens,
           "cached": summary(rows["cached"]), "uncached": summary(rows["uncached"]),
           "first_cached_request": {"ttft_s": warm["cached"][0], "cached_tokens": warm["cached"][3]},
           "same_text": sum(x[2] == y[2] for x, y in zip(rows["cached"], rows["uncached"])) / max(1, a.questions)}
    res["ttft_ratio_uncached_over_cached"] = res["uncached"]["ttft_p50_s"] / res["cached"]["ttft_p50_s"]
    print(f"prompt {prompt_tokens} tokens; TTFT p50 cached {res['cached']['ttft_p50_s'] * 1e3:.0f} ms, uncached "
          f"{res['uncached']['ttft_p50_s'] * 1e3:.0f} ms ({res['ttft_ratio_uncached_over_cached']:.1f}x); "
          f"cached tokens {res['cached']['cached_tokens']}; same text {res['same_text']:.0%}")
    if a.json:
        write_json(a.json, res)
    return res


if __name__ == "__main__":
    main()
