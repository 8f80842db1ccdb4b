"""`tokenpool bench engine`: decode step time per batch size against the HBM floor and HF generate.

Floor: every decode step reads all weights once, so floor = weight bytes / HBM bandwidth (measured in this
run with a device-to-device copy). Each batch also gets `floor_with_kv_ms`: the weights plus the KV bytes its
step reads (every sequence's context, at the timed steps' mean length), the floor issue 20 sets batches 8 and 32
against. Peer: HF transformers `generate` on the same weights, same run.
Also checks parity with HF (first-step top-1 and greedy continuations over random prompts), per dtype: the
bench engine's own (bf16 on CUDA) under `parity`, others (fp32) under `parity_<dtype>`, each with a near-tie
diagnostic beside the strict figures.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from load_tests.bench_common import hbm_bandwidth, header, write_json
from model_swapper.model_config import parse_dtype
from token_scheduler import LLMEngine, SamplingParams
from token_scheduler.engine import EngineConfig

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free() -> None:
    gc.collect()  # engines and their CUDA graphs hold reference cycles
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def decode_graph(eng: LLMEngine, batch: int):
    """The engine's captured decode graph for `batch` (its `_DecodeGraph`), or None."""
    r = eng.runner
    bucket = getattr(r, "bucket_of", {}).get(batch, batch)
    return getattr(r, "graphs", {}).get(r._graph_id(bucket) if hasattr(r, "_graph_id") else bucket)


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
    dg = decode_graph(eng, batch)
    if dg is not None:  # the captured forward alone, without scheduling, input copies and sampling
        g = dg.graph
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
    return {"batch": batch, "steps": steps, "step_ms_median": 1e3 * statistics.median(times), "step_ms_mean": 1e3 * loop_s / steps,
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


def _prompts(vocab: int, n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, vocab, (int(torch.randint(8, 128, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@dataclass
class _Ref:
    """HF's greedy continuation of one prompt, with its logits at every generated position."""

    prompt: list[int]
    ids: list[int]
    logits: torch.Tensor  # [new, vocab] float32, CPU: raw (before logits processors)
    top1_minus_top2: list[float]  # of the processed scores HF chose from (EOS is -inf under min_new_tokens)
    std: list[float]  # of the processed scores' finite values, float32


def _hf_reference(hf, prompts: list[list[int]], new: int) -> list[_Ref]:
    refs = []
    for p in prompts:
        with torch.no_grad():
            out = hf.generate(torch.tensor([p], device=hf.device), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, output_scores=True, output_logits=True, return_dict_in_generate=True)
        scores = torch.stack([s[0] for s in out.scores]).float()  # [new, vocab]
        top2 = scores.topk(2, dim=-1).values
        # min_new_tokens sets the EOS scores to -inf, which made a plain std NaN: only finite values count
        std = [float(row[torch.isfinite(row)].std()) for row in scores]
        refs.append(_Ref(p, out.sequences[0, len(p):].tolist(), torch.stack([x[0] for x in out.logits]).float().cpu(),
                         (top2[:, 0] - top2[:, 1]).tolist(), std))
    return refs


def _generate(eng: LLMEngine, rid: str, prompt: list[int], n: int) -> list[int]:
    """Greedy `n` tokens the way the engine serves them (no logprobs: they would force synchronous steps)."""
    eng.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    out = None
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                out = o.outputs[0].token_ids
    return out


def _ulp(x: float, dtype: torch.dtype) -> float:
    """Spacing of `dtype` values at magnitude |x|."""
    return torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(max(abs(x), torch.finfo(dtype).tiny)))


def _divergence(ref: _Ref, j: int, ours: int, dtype, eos: set[int], tol_ulps: float) -> dict:
    """Where the engine's greedy token first differs from HF's: how close HF itself was to choosing ours."""
    hf_tok, lg = ref.ids[j], ref.logits[j]
    a, b = float(lg[hf_tok]), float(lg[ours])
    ulp = _ulp(max(abs(a), abs(b)), dtype)
    gap = a - b  # HF's raw preference for its token over the engine's
    return {"at": j, "hf_top1_minus_top2": ref.top1_minus_top2[j], "hf_logit_std": ref.std[j],
            "hf_gap_to_engine_token": gap, "hf_gap_ulps": gap / ulp, "engine_token_is_eos": ours in eos,
            "near_tie": ours not in eos and 0 <= gap <= tol_ulps * ulp}


def _first_diff(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def _parity(eng: LLMEngine, refs: list[_Ref], tol_ulps: float = 2.0) -> dict:
    """Strict figures (unchanged): first-token top-1 match, greedy continuations identical token for token.

    Diagnostic (not a replacement): a divergence is at a near-tie when HF's raw logit for its own token exceeds
    its logit for the engine's token by at most `tol_ulps` ulps of the model dtype at that magnitude -- a gap
    the rounding of the last ops alone can flip. A continuation is identical up to near-ties when, following
    HF's tokens (the engine is re-fed HF's prefix after each divergence), every divergence is a near-tie."""
    new = len(refs[0].ids)
    eos = set(eng.eos_token_ids)
    top1 = cont = upto = resyncs = 0
    divergences, later = [], []
    for i, ref in enumerate(refs):
        ours = _generate(eng, f"par{i}", ref.prompt, new)
        top1 += ours[0] == ref.ids[0]
        cont += ours == ref.ids
        j = _first_diff(ours, ref.ids)
        if j is None:
            upto += 1
            continue
        d = _divergence(ref, j, ours[j], eng.dtype, eos, tol_ulps)
        divergences.append(d)
        ok = d["near_tie"]
        while ok and j + 1 < new:  # re-feed HF's prefix through the divergence; find the next one
            resyncs += 1
            k = j + 1
            ours = _generate(eng, f"par{i}-{k}", ref.prompt + ref.ids[:k], new - k)
            jj = _first_diff(ours, ref.ids[k:])
            if jj is None:
                break
            j = k + jj
            later.append({"prompt": i} | _divergence(ref, j, ours[jj], eng.dtype, eos, tol_ulps))
            ok = later[-1]["near_tie"]
        upto += ok
    n = len(refs)
    return {"dtype": DTYPE_NAMES.get(eng.dtype, str(eng.dtype)), "prompts": n, "new_tokens": new,
            "decode_attention": "triton" if getattr(eng.runner, "use_triton", False) else "torch",
            "first_token_top1_match": top1 / n, "greedy_32_identical": cont / n, "divergences": divergences,
            "near_tie_diagnostic": {
                "rule": f"HF logit(HF token) - HF logit(engine token) <= {tol_ulps:g} ulp of "
                        f"{DTYPE_NAMES.get(eng.dtype, eng.dtype)} at that magnitude",
                "tolerance_ulps": tol_ulps,
                "divergences_at_near_tie": (sum(d["near_tie"] for d in divergences) / len(divergences)
                                            if divergences else None),
                "greedy_identical_up_to_near_ties": upto / n,
                "resyncs": resyncs,
                "later_divergences": later,
            }}


def _hf_self_parity(model: Path, dtype: torch.dtype, dev: str, refs: list[_Ref]) -> dict:
    """The same strict figures for HF against itself: HF with eager attention vs the SDPA reference, same
    weights and dtype. Where HF cannot reproduce its own greedy continuations, a correct engine cannot either:
    this is the ceiling the engine's figures are read against."""
    from transformers import AutoModelForCausalLM

    kw = {"device_map": dev} if dev == "cuda" else {}
    hfe = AutoModelForCausalLM.from_pretrained(str(model), dtype=dtype, attn_implementation="eager", **kw).eval()
    other = _hf_reference(hfe, [r.prompt for r in refs], len(refs[0].ids))
    del hfe
    _free()
    n = len(refs)
    return {"what": "HF attn_implementation=eager vs HF sdpa (the reference), greedy, same weights and dtype",
            "first_token_top1_match": sum(o.ids[0] == r.ids[0] for o, r in zip(other, refs)) / n,
            "greedy_32_identical": sum(o.ids == r.ids for o, r in zip(other, refs)) / n,
            "first_divergence_at": [_first_diff(o.ids, r.ids) for o, r in zip(other, refs)]}


def _parity_engine(model: Path, dtype: str, dev: str, hf_exact_prefill: bool = False,
                   hf_exact: bool = False) -> LLMEngine:
    """A one-sequence engine for parity runs in another dtype or mode (small KV; CUDA graph for batch 1)."""
    return LLMEngine(EngineConfig(model=str(model), device=dev, dtype=dtype, max_num_seqs=1,
                                  max_num_batched_tokens=2048, max_model_len=1024, num_host_kv_blocks=0,
                                  kv_cache_memory_gb=1.0 if dev == "cuda" else None,
                                  hf_exact_prefill=hf_exact_prefill, hf_exact=hf_exact))


def _load_hf(model: Path, dtype: torch.dtype, dev: str):
    from transformers import AutoModelForCausalLM

    kw = {"device_map": dev} if dev == "cuda" else {}  # accelerate is there on the GPU box
    return AutoModelForCausalLM.from_pretrained(str(model), dtype=dtype, **kw).eval()


def _pdl() -> bool | None:
    """Whether the Triton kernels launch with programmatic dependent launch; None without Triton (the CPU
    torch wheel has none, and the CPU path runs no Triton kernel)."""
    try:
        from token_scheduler.model import triton_ops
    except ImportError:
        return None
    return triton_ops.USE_PDL


def run_bench_engine(model: Path, batches: list[int], json_out: Path | None, context: int = 512,
                     hf: bool = True, steps: int = 50, parity_dtypes: list[str] | None = None,
                     parity_prompts: int | None = None, near_tie_ulps: float = 2.0,
                     hf_exact_prefill: bool = False, hf_exact: bool = False) -> dict:
    """`parity_dtypes` (default: bf16 and fp32 on CUDA, the engine's fp32 on CPU): the bench engine's dtype
    is checked with the bench engine under `parity`; any other is checked after the bench engine and HF are
    freed, HF first (its reference kept on the host, then freed), then a fresh engine, under `parity_<dtype>`
    -- so a 7B in fp32 needs 30 GB at a time, not 60."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    from token_scheduler import runner
    from token_scheduler.model import llama

    options = {"one_token_gemv": llama.USE_GEMV, "pdl": _pdl(),
               "small_batch_gemv_max_rows": llama.GEMV_MAX_ROWS if llama.USE_GEMV else 0, "step_io": runner.STEP_IO}
    try:  # the Triton kernels' options (paged decode, one-token GEMV), where Triton is installed
        from token_scheduler.model import triton_decode as td
        from token_scheduler.model import triton_gemv as tg
        from token_scheduler.model import triton_ops, triton_tma
        options |= {"tma_max_rows": triton_tma.MAX_ROWS, "attn_rope": llama.ATTN_ROPE, "attn_blocks_per_iter": td.BLOCKS_PER_ITER,
                    "attn_warps": td.DECODE_WARPS, "attn_stages": td.DECODE_STAGES, "attn_prefetch": td.PREFETCH_KV,
                    "gemv_norm_one_pass": tg.NORM_ONE_PASS, "gemv_glu": llama.GEMV_GLU,
                    "pdl_early": triton_ops.PDL_EARLY}
    except ImportError:
        pass
    res = header() | {"bench": "engine", "model": str(model), "context": context, "kernel_options": options}
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
    # A throwaway round first: the first prefill and decode of an engine pay first-use Triton compiles, cuBLAS
    # heuristics and the first graph captures, which made batch 1's prefill_tokens_per_s read 10.7k on the H200's
    # 7B where batch 8 right after it read 36k (ce7a9f3).
    _decode_step_times(eng, 1, context, 2, vocab)
    res["decode"] = [_decode_step_times(eng, b, context, steps if dev == "cuda" else 5, vocab) for b in batches]
    if "floor_ms" in res:
        kv_tok = eng.model_config.kv_bytes_per_token(eng.dtype)
        for d in res["decode"]:
            d["ratio_to_floor"] = d["step_ms_median"] / res["floor_ms"]
            # the timed steps run from context + 1 to context + steps tokens a sequence (after the first token)
            d["kv_bytes_read"] = kv_bytes = int(d["batch"] * (context + 1 + d["steps"] / 2) * kv_tok)
            d["floor_with_kv_ms"] = 1e3 * (wbytes + kv_bytes) / bw
            d["ratio_to_floor_with_kv"] = d["step_ms_median"] / d["floor_with_kv_ms"]
    b1 = next((d for d in res["decode"] if d["batch"] == 1), None)
    b32 = next((d for d in res["decode"] if d["batch"] == 32), None)
    if b1 and b32:
        res["batch32_over_batch1"] = b32["step_ms_median"] / b1["step_ms_median"]
    if hf:
        t = time.perf_counter()
        hfm = _load_hf(model, eng.dtype, dev)
        res["hf_from_pretrained_s"] = time.perf_counter() - t
        res["hf_generate_step_ms_batch1"] = _hf_step_ms(hfm, vocab, n=64 if dev == "cuda" else 4)
        if b1:
            res["speedup_vs_hf_batch1"] = res["hf_generate_step_ms_batch1"] / b1["step_ms_median"]
        own = DTYPE_NAMES.get(eng.dtype)
        dtypes = list(parity_dtypes) if parity_dtypes is not None else (["bf16", "fp32"] if dev == "cuda" else [own])
        prompts = _prompts(vocab, parity_prompts or (32 if dev == "cuda" else 2))
        refs = _hf_reference(hfm, prompts, 32) if own in dtypes else None  # the bench engine's dtype first
        del hfm
        _free()
        if refs is not None:
            res["parity"] = _parity(eng, refs, near_tie_ulps)
            res["parity_peer_hf_eager_vs_hf_sdpa"] = _hf_self_parity(model, eng.dtype, dev, refs)
        del eng
        _free()
        if refs is not None and hf_exact_prefill:  # the same references, engine in its HF-exact prefill mode
            peng = _parity_engine(model, own, dev, hf_exact_prefill=True)
            res["parity_hf_exact_prefill"] = _parity(peng, refs, near_tie_ulps)
            del peng
            _free()
        if refs is not None and hf_exact:  # every step (decode too) the way HF runs it
            peng = _parity_engine(model, own, dev, hf_exact=True)
            res["parity_hf_exact"] = _parity(peng, refs, near_tie_ulps)
            del peng
            _free()
        del refs
        for d in dtypes:
            if d == own:
                continue
            dt = parse_dtype(d)
            hfm = _load_hf(model, dt, dev)
            refs = _hf_reference(hfm, prompts, 32)
            del hfm
            _free()
            peng = _parity_engine(model, d, dev)
            res[f"parity_{DTYPE_NAMES.get(dt, d)}"] = _parity(peng, refs, near_tie_ulps)
            del peng, refs
            _free()
    write_json(json_out, res)
    return res
