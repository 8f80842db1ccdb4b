"""`tokenpool bench engine`: decode step time per batch size against the HBM floor and HF generate.

Floor: every decode step reads all weights once, so floor = weight bytes / HBM bandwidth (measured in this
run with a device-to-device copy). Peer: HF transformers `generate` on the same weights, same run.
Also checks GPU parity with HF (first-step top-1 and greedy continuations over random prompts).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from load_tests.bench_common import hbm_bandwidth, header, write_json
from token_scheduler import LLMEngine, SamplingParams
from token_scheduler.engine import EngineConfig


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _decode_step_times(eng: LLMEngine, batch: int, context: int, steps: int, vocab: int) -> dict:
    g = torch.Generator().manual_seed(batch)
    for i in range(batch):
        p = torch.randint(0, vocab, (context,), generator=g).tolist()
        eng.add_request(f"b{batch}-{i}", p, SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True))
    # prefill everything (chunked), until every request has its first token
    _sync()
    t0 = time.perf_counter()
    while any(r.is_prefilling or not r.output_token_ids for r in eng.scheduler.requests.values()):
        eng.step()
    _sync()
    prefill_s = time.perf_counter() - t0
    # Steady state as a client sees it: one step() call per token, no extra sync between calls (an engine
    # with overlapped decode queues the next step before it reads this one). Per-call wall times, and the
    # mean over the whole loop with the GPU drained at both ends.
    for _ in range(3):
        eng.step()
    _sync()
    times = []
    t0 = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t)
    _sync()
    loop_s = time.perf_counter() - t0
    replay_ms = None
    graphs = getattr(eng.runner, "graphs", {})
    if batch in graphs:  # the captured forward alone, without scheduling, input copies and sampling
        g = graphs[batch].graph
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        g.replay()
        s.record()
        for _ in range(20):
            g.replay()
        e.record()
        torch.cuda.synchronize()
        replay_ms = s.elapsed_time(e) / 20
    for rid in list(eng.scheduler.requests):
        eng.abort_request(rid)
    eng.step()
    return {"batch": batch, "step_ms_median": 1e3 * statistics.median(times), "step_ms_mean": 1e3 * loop_s / steps,
            "overlap": eng.overlap, "step_ms_p90":
            1e3 * sorted(times)[int(0.9 * len(times))], "graph_replay_ms": replay_ms,
            "prefill_tokens_per_s": batch * context / prefill_s}


def _hf_step_ms(hf, vocab: int, batch: int = 1, n: int = 64) -> float:
    ids = torch.randint(0, vocab, (batch, 32), device=hf.device)

    def gen(k):
        _sync()
        t = time.perf_counter()
        hf.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False)
        _sync()
        return time.perf_counter() - t

    gen(4)
    return 1e3 * (gen(2 * n) - gen(n)) / n


def _parity(eng: LLMEngine, hf, vocab: int, prompts: int = 32, new: int = 32) -> dict:
    g = torch.Generator().manual_seed(1234)
    top1 = cont = 0
    margins = []
    for i in range(prompts):
        p = torch.randint(0, vocab, (int(torch.randint(8, 128, (1,), generator=g)),), generator=g).tolist()
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p], device=hf.device), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, output_scores=True, return_dict_in_generate=True)
        ref_ids = ref.sequences[0, len(p):].tolist()
        eng.add_request(f"par{i}", p, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
        ours = None
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    ours = o.outputs[0].token_ids
        top1 += ours[0] == ref_ids[0]
        cont += ours == ref_ids
        if ours != ref_ids:  # where they part, how close were HF's own top two? (bf16 near-ties flip)
            j = next(i for i, (a, b) in enumerate(zip(ours, ref_ids)) if a != b)
            top2 = ref.scores[j][0].float().topk(2).values
            margins.append((j, float(top2[0] - top2[1]), float(ref.scores[j][0].float().std())))
    return {"prompts": prompts, "first_token_top1_match": top1 / prompts, "greedy_32_identical": cont / prompts,
            "divergences": [{"at": j, "hf_top1_minus_top2": m, "hf_logit_std": s} for j, m, s in margins]}


def run_bench_engine(model: Path, batches: list[int], json_out: Path | None, context: int = 512,
                     hf: bool = True, steps: int = 50) -> dict:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    res = header() | {"bench": "engine", "model": str(model), "context": context}
    t = time.perf_counter()
    kv_gb = None if dev == "cpu" else 12.0
    eng = LLMEngine(EngineConfig(model=str(model), device=dev, max_num_seqs=max(batches),
                                 max_num_batched_tokens=8192, kv_cache_memory_gb=kv_gb,
                                 max_model_len=4096, num_host_kv_blocks=0))
    res["engine_load_s"] = time.perf_counter() - t
    vocab = eng.model_config.vocab_size
    wbytes = eng.weight_bytes
    res["weight_bytes"] = wbytes
    if dev == "cuda":
        bw = hbm_bandwidth()
        res["hbm_bytes_per_s"] = bw
        res["floor_ms"] = 1e3 * wbytes / bw
    res["decode"] = [_decode_step_times(eng, b, context, steps if dev == "cuda" else 5, vocab) for b in batches]
    if "floor_ms" in res:
        for d in res["decode"]:
            d["ratio_to_floor"] = d["step_ms_median"] / res["floor_ms"]
    b1 = next((d for d in res["decode"] if d["batch"] == 1), None)
    b32 = next((d for d in res["decode"] if d["batch"] == 32), None)
    if b1 and b32:
        res["batch32_over_batch1"] = b32["step_ms_median"] / b1["step_ms_median"]
    if hf:
        from transformers import AutoModelForCausalLM

        t = time.perf_counter()
        kw = {"device_map": dev} if dev == "cuda" else {}  # accelerate is there on the GPU box
        hfm = AutoModelForCausalLM.from_pretrained(str(model), dtype=eng.dtype, **kw).eval()
        res["hf_from_pretrained_s"] = time.perf_counter() - t
        res["hf_generate_step_ms_batch1"] = _hf_step_ms(hfm, vocab, n=64 if dev == "cuda" else 4)
        if b1:
            res["speedup_vs_hf_batch1"] = res["hf_generate_step_ms_batch1"] / b1["step_ms_median"]
        res["parity"] = _parity(eng, hfm, vocab, prompts=32 if dev == "cuda" else 2)
    write_json(json_out, res)
    return res
