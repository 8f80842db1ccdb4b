"""`tokenpool bench engine` on CPU with a tiny model: the parity figures are a real check of the engine
against HF (fp32: identical), the bf16 near-tie diagnostic is well-formed, nothing is NaN."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.torch_threads import one_torch_thread  # noqa: F401 (autouse: one torch thread)
from tests.triton_interp import interpret, interpret_each


def _finite(x) -> bool:
    if isinstance(x, float):
        return math.isfinite(x)
    if isinstance(x, dict):
        return all(_finite(v) for v in x.values())
    if isinstance(x, list):
        return all(_finite(v) for v in x)
    return True


def _check_parity(p: dict, dtype: str, prompts: int) -> None:
    assert p["dtype"] == dtype and p["prompts"] == prompts and p["new_tokens"] == 32
    assert 0 <= p["first_token_top1_match"] <= 1 and 0 <= p["greedy_32_identical"] <= 1
    assert len(p["divergences"]) == round(prompts * (1 - p["greedy_32_identical"]))
    for d in p["divergences"]:
        assert 0 <= d["at"] < 32 and d["hf_top1_minus_top2"] >= 0 and d["hf_logit_std"] > 0
        assert isinstance(d["near_tie"], bool) and math.isfinite(d["hf_gap_ulps"])
    diag = p["near_tie_diagnostic"]
    assert diag["tolerance_ulps"] == 2.0 and dtype in diag["rule"]
    assert diag["greedy_identical_up_to_near_ties"] >= p["greedy_32_identical"]
    if p["divergences"]:
        assert 0 <= diag["divergences_at_near_tie"] <= 1
    for d in diag["later_divergences"]:
        assert 0 <= d["prompt"] < prompts and d["at"] < 32


def test_bench_engine_cpu_parity_fp32_exact_and_bf16_diagnostic(make_varied, tmp_path):
    from load_tests.bench_engine import run_bench_engine

    out = tmp_path / "engine.json"
    r = run_bench_engine(make_varied("qwen2"), [1, 2], out, context=24, parity_dtypes=["fp32", "bf16"],
                         parity_prompts=4, hf_exact=True)
    text = out.read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the bench JSON"))
    assert data == json.loads(json.dumps(r)) and _finite(data)
    assert [d["batch"] for d in data["decode"]] == [1, 2]
    assert all(d["graph_replay_ms"] is None for d in data["decode"])  # no CUDA graphs on CPU
    # the kernel options the figures were taken under, the paged decode's where Triton is installed
    opts = data["kernel_options"]
    assert {"one_token_gemv", "pdl", "small_batch_gemv_max_rows"} <= set(opts)
    from token_scheduler import runner
    assert opts["step_io"] == runner.STEP_IO
    try:
        from token_scheduler.model import triton_decode
    except ImportError:
        assert "attn_blocks_per_iter" not in opts
    else:
        from token_scheduler.model import triton_gemv
        assert opts["attn_blocks_per_iter"] == triton_decode.BLOCKS_PER_ITER and "attn_rope" in opts
        assert opts["gemv_norm_one_pass"] == triton_gemv.NORM_ONE_PASS
        from token_scheduler.model import llama
        assert opts["gemv_glu"] == llama.GEMV_GLU
        from token_scheduler.model import triton_tma
        assert opts["tma_max_rows"] == triton_tma.MAX_ROWS

    # fp32 is the bench engine's own dtype on CPU: `parity`. A real check: identical to HF.
    p = data["parity"]
    _check_parity(p, "fp32", 4)
    assert p["first_token_top1_match"] == 1.0 and p["greedy_32_identical"] == 1.0
    assert p["divergences"] == [] and p["near_tie_diagnostic"]["greedy_identical_up_to_near_ties"] == 1.0
    assert p["decode_attention"] == "torch"
    # the engine with every step run as HF runs it: identical too
    e = data["parity_hf_exact"]
    assert e["first_token_top1_match"] == 1.0 and e["greedy_32_identical"] == 1.0
    # the HF-vs-HF peer: eager and SDPA attention in fp32 agree on this tiny model
    peer = data["parity_peer_hf_eager_vs_hf_sdpa"]
    assert peer["first_token_top1_match"] == 1.0 and len(peer["first_divergence_at"]) == 4

    # bf16 (a fresh engine and HF in bf16): figures and diagnostic well-formed; first tokens still agree
    b = data["parity_bf16"]
    _check_parity(b, "bf16", 4)
    assert b["first_token_top1_match"] >= 0.75


def test_ulp_and_divergence():
    from load_tests.bench_engine import _divergence, _Ref, _ulp

    assert _ulp(3.0, torch.bfloat16) == 2**-6 and _ulp(-5.0, torch.bfloat16) == 2**-5
    assert _ulp(1.0, torch.float32) == 2**-23
    logits = torch.zeros(1, 8)
    logits[0, 2], logits[0, 5] = 3.0, 3.0 - 2**-6  # HF prefers 2 over 5 by one bf16 ulp
    ref = _Ref([1], [2], logits, [2**-6], [0.5])
    d = _divergence(ref, 0, 5, torch.bfloat16, {7}, 2.0)
    assert d["near_tie"] and d["hf_gap_ulps"] == 1.0 and d["hf_top1_minus_top2"] == 2**-6
    assert not _divergence(ref, 0, 0, torch.bfloat16, {7}, 2.0)["near_tie"]  # 3.0 apart: 192 ulps
    logits[0, 7] = 4.0  # EOS, which HF's min_new_tokens forbade: not a near-tie whatever the gap
    assert not _divergence(ref, 0, 7, torch.bfloat16, {7}, 2.0)["near_tie"]


def test_triton_paged_decode_fp32_is_exact_in_the_interpreter():
    """The fp32 engine on CUDA runs the Triton paged-decode kernel with IEEE fp32 dots (Triton's fp32 default
    is TF32). Triton's CPU interpreter runs the same kernel source: the fp32 result must match fp64 -- walking the
    cache after the PDL wait, and loading its first tile before it (`prefetch`: the new token read after the wait
    and counted apart by split 0), over splits that end mid-iteration or hold no block at all (8 splits of 7
    blocks), with a sliding window, and for a row whose context is its new token alone."""
    pytest.importorskip("triton")
    code = """
import sys
import torch
from token_scheduler.model.attention import AttentionMetadata, _decode_torch
from token_scheduler.model import triton_decode
from token_scheduler.model.triton_decode import paged_decode
torch.manual_seed(0)
B, KVH, D, BS, NB, L, G = 3, 2, 128, 16, 32, 2, 4
kv = torch.randn(NB, L, 2, BS, KVH, D)
q = torch.randn(B, KVH * G, D)
ctx = torch.tensor([1, 17, 100], dtype=torch.int32)
bt = torch.stack([torch.randperm(NB)[:8] for _ in range(B)]).int()
meta = AttentionMetadata(None, None, BS, decode=True, block_tables=bt, context_lens=ctx)
# several cache blocks an iteration, over splits whose block ranges end mid-iteration (100 tokens: 7 blocks)
# with each tile's block ids loaded in the same iteration as its K/V (argument 0), and an iteration ahead
# (PIPELINE_IDS, argument 1)
pipe = sys.argv[1] == "1"
# (the default split count for these rows, num_splits_for(3, 2), is 32: 16 or 32 splits hold the cases 8 does -- one
# block a split, then empty ones (8 of 7 blocks: 1 empty; of the window's 4: 4; of 1 or 2 blocks: 7 or 6) -- only
# more empty ones, at 2.5 times the interpreter's time. One block an iteration at 2 splits, not 8: 4 and 3 iterations a
# split, the pipelined ids and the prefetched first tile followed by more; (4, 8) holds what (1, 8) did -- one block a
# split, empty ones -- at twice (1, 2)'s interpreter time)
for nbi, splits in ((4, 1), (4, 2), (2, 3), (1, 2), (4, 8)):
    triton_decode.BLOCKS_PER_ITER, triton_decode.PIPELINE_IDS = nbi, pipe
    for window in (None, 40):
        ref = _decode_torch(q.double(), kv.double(), 1, meta, D**-0.5, window)
        for prefetch in (False, True):
            out = paged_decode(q, kv, 1, bt, ctx, D**-0.5, window, num_splits=splits, prefetch=prefetch)
            err = ((out.double() - ref).norm() / ref.norm()).item()
            assert out.dtype == torch.float32 and err < 1e-6, (pipe, nbi, splits, window, prefetch, err)
print("ok")
"""
    interpret_each(code, [["0"], ["1"]])  # PIPELINE_IDS off and on, side by side


def test_paged_decode_with_rope_folded_in_equals_rope_then_decode_in_the_interpreter():
    """paged_decode(rope=...) on the fused qkv of one new token a row: the same K/V written into the cache, bit for
    bit, and the same attention output as rope_and_write_kv followed by paged_decode (fp32, to summation order), at
    every split count, with a sliding window, and for a row whose context is its new token alone."""
    pytest.importorskip("triton")
    code = """
import sys
import torch
from token_scheduler.model.triton_decode import paged_decode
from token_scheduler.model.triton_ops import rope_and_write_kv
torch.manual_seed(0)
B, H, KVH, D, BS, NB, L = 3, 6, 2, 32, 16, 32, 2  # a group of 3 q heads a kv head
kv = torch.randn(NB, L, 2, BS, KVH, D)
qkv = torch.randn(B, (H + 2 * KVH) * D)
cos, sin = torch.randn(128, D), torch.randn(128, D)
ctx = torch.tensor([1, 17, 100], dtype=torch.int32)
bt = torch.stack([torch.randperm(NB)[:8] for _ in range(B)]).int()
pos = (ctx - 1).long()
sb, so = bt.long().gather(1, (pos // BS)[:, None])[:, 0], pos % BS
# None: the count num_splits_for gives -- 32 for these rows, one block a split and the rest empty, as 8 has them (of
# 7 blocks: one empty; of 1 block, for 17 tokens: 7), which it gives here at a quarter of the interpreter's time
from token_scheduler.model import triton_decode
triton_decode.num_splits_for = lambda batch, kv_heads, sms=132: 8
for splits in [None if a == "None" else int(a) for a in sys.argv[1:]]:
    for window in (None, 40):
        kv_ref, kv_new = kv.clone(), kv.clone()
        q = rope_and_write_kv(qkv, cos, sin, pos, kv_ref, 1, sb, so, H, KVH, D)
        ref = paged_decode(q, kv_ref, 1, bt, ctx, D**-0.5, window, num_splits=splits)
        out = paged_decode(qkv, kv_new, 1, bt, ctx, D**-0.5, window, num_splits=splits, rope=(cos, sin, pos, sb, so))
        assert torch.equal(kv_new, kv_ref) and not torch.equal(kv_new, kv), (splits, window)
        err = ((out - ref).norm() / ref.norm()).item()
        assert out.shape == (B, H, D) and err < 1e-6, (splits, window, err)
        v0 = kv_ref[sb[0], 1, 1, so[0]]  # row 0: its own token only, every head's output is its v
        assert torch.allclose(out[0], v0.repeat_interleave(H // KVH, 0), atol=1e-6)
print("ok")
"""
    interpret_each(code, [["None"], ["1", "2", "4"]])  # the split counts, over two processes side by side


def test_fused_decode_step_with_rope_in_the_attention_in_the_interpreter(make_varied):
    """forward_fused on a decode step of 3 sequences (the cuBLAS-projection path, run by Triton's interpreter on
    CPU, fp32): with TOKENPOOL_ATTN_ROPE's fold the same hidden states and the same K/V in the cache as with the
    separate RoPE kernel -- and for a prefill taken row by row (rows that read each other's K/V) the fold stays off."""
    pytest.importorskip("triton")
    d = make_varied("qwen2")
    code = f"""
import torch
from model_swapper.model_config import ModelConfig
from model_swapper.weights import load_weights
from token_scheduler.model import llama
from token_scheduler.model.attention import AttentionMetadata
from token_scheduler.runner import allocate_kv_cache
torch.manual_seed(0)
cfg = ModelConfig.from_pretrained({str(d)!r})
w = load_weights({str(d)!r}, cfg, "cpu", torch.float32)
rope = llama.RopeCache.build(cfg, 64, "cpu")
kv0 = allocate_kv_cache(cfg, 12, 16, torch.float32, "cpu")
kv0.normal_()
ctx = torch.tensor([5, 20, 33], dtype=torch.int32)
bt = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]], dtype=torch.int32)
pos = (ctx - 1).long()
ids = torch.tensor([3, 7, 11])
from token_scheduler.model import triton_decode, triton_ops
# (num_splits_for gives 32 splits for 3 rows, 29 or more of them empty here: 4 hold the same cases -- split 0 with the
# new token, a split of cache blocks, empty ones -- at an eighth of the interpreter's time)
triton_decode.num_splits_for = lambda batch, kv_heads, sms=132: 4
calls, rope_kernel = [], triton_ops.rope_and_write_kv
triton_ops.rope_and_write_kv = lambda *a: (calls.append(1), rope_kernel(*a))[1]
def run(fold, own_rows):
    llama.ATTN_ROPE = fold
    calls.clear()
    kv = kv0.clone()
    meta = AttentionMetadata(bt.long().gather(1, (pos // 16)[:, None])[:, 0], pos % 16, 16, decode=True,
                             block_tables=bt, context_lens=ctx, use_triton=True, own_rows=own_rows)
    return llama.forward_fused(cfg, w, kv, rope, ids, pos, meta), kv
h0, kv_0 = run(False, True)
assert len(calls) == cfg.num_layers
h1, kv_1 = run(True, True)
assert not calls  # the attention did its job
err = ((h1 - h0).norm() / h0.norm()).item()
assert err < 1e-5 and not torch.equal(kv_0, kv0), err
assert (kv_1 - kv_0).abs().max().item() < 1e-4 * kv_0.abs().max().item()
h2, kv_2 = run(True, False)  # not a decode step's own rows: the separate kernel, bit for bit the same as off
assert len(calls) == cfg.num_layers and torch.equal(h2, h0) and torch.equal(kv_2, kv_0)
print("ok")
"""
    interpret(code)


def test_paged_decode_variants_compile_for_the_h200_without_spills():
    """Every paged-decode variant the bench models run, RoPE folded in or not, compiles for sm_90 (Triton's bundled
    ptxas, no GPU) into registers alone: what the interpreter cannot say about the GPU code."""
    pytest.importorskip("triton")
    from load_tests.triton_offline import decode_variants

    res = decode_variants()
    assert len(res) == 12
    for label, r in res.items():
        assert r["stack_bytes"] == 0 and r["local_bytes"] == 0 and 0 < r["registers"] <= 255, (label, r)
        assert r["mma"] == "mma_v2", label  # the score and value dots on tensor cores
        # only the prefetching variant reads memory (the context length, block ids, K and V) before the PDL wait
        assert (r["loads_before_wait"] > 0) == label.endswith("prefetch"), (label, r)


def test_warm_up_compiles_the_folded_attention_only_where_it_can_run(monkeypatch):
    """On a GPU where one row launches with PDL (its own compiled variants), warm-up compiles every split count for
    one row and for several, and the RoPE-folded variants for several; for one row too only if one-token steps
    may fold (not when they take the GEMV path). Where one row has no variants of its own, one set serves all."""
    pytest.importorskip("triton")
    from types import SimpleNamespace

    from token_scheduler.model import triton_decode

    calls = []
    monkeypatch.setattr(triton_decode, "paged_decode", lambda q, *a, rope=None, num_splits=None, **k:
                        calls.append((q.shape[0], rope is not None, num_splits)))
    q, kv = torch.zeros(1, 4, 8), torch.zeros(2, 1, 2, 16, 2, 8)
    bt, ctx = torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    rope = SimpleNamespace(cos=torch.ones(4, 8), sin=torch.zeros(4, 8))
    n = len(triton_decode.SPLITS)

    def warm(pdl_one_row: bool, **kw) -> set:
        calls.clear()
        monkeypatch.setattr(triton_decode, "pdl", lambda t: pdl_one_row and t.shape[0] == 1)
        triton_decode.warm_up(q, kv, bt, ctx, 0.1, None, rope, **kw)
        assert len(calls) == len(set(calls))
        return {(rows, folded) for rows, folded, _ in calls}

    assert warm(True, rope_one_row=False) == {(1, False), (2, False), (2, True)} and len(calls) == 3 * n
    assert warm(True) == {(1, False), (1, True), (2, False), (2, True)} and len(calls) == 4 * n
    assert warm(False, rope_one_row=False) == {(1, False), (1, True)} and len(calls) == 2 * n


def test_the_attention_loads_its_cache_early_only_where_no_row_reads_another_rows_new_kv(monkeypatch):
    """TOKENPOOL_ATTN_PREFETCH's rule: launched with PDL, over one row (whatever the step), a decode step's own rows,
    or rows with RoPE folded in (own rows too); never over rows that may be one sequence's (a prefill taken row by
    row), never without PDL, never with the knob off."""
    pytest.importorskip("triton")
    from token_scheduler.model import triton_decode

    one, four = torch.zeros(1, 4, 8), torch.zeros(4, 4, 8)
    monkeypatch.setattr(triton_decode, "PREFETCH_KV", True)
    monkeypatch.setattr(triton_decode, "PREFETCH_ROWS", 4)
    monkeypatch.setattr(triton_decode, "pdl", lambda t: True)
    assert triton_decode._prefetches(one, False, False) and triton_decode._prefetches(four, True, False)
    assert triton_decode._prefetches(four, False, True) and not triton_decode._prefetches(four, False, False)
    monkeypatch.setattr(triton_decode, "pdl", lambda t: False)
    assert not triton_decode._prefetches(one, True, True)
    monkeypatch.setattr(triton_decode, "pdl", lambda t: True)
    monkeypatch.setattr(triton_decode, "PREFETCH_KV", False)
    assert not triton_decode._prefetches(one, True, True)
    # PREFETCH_ROWS: several rows launched with PDL (a small-batch GEMV step) load early only up to it; one row always
    monkeypatch.setattr(triton_decode, "PREFETCH_KV", True)
    monkeypatch.setattr(triton_decode, "PREFETCH_ROWS", 1)
    assert not triton_decode._prefetches(four, True, True) and triton_decode._prefetches(one, False, False)
