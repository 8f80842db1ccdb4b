"""GPU-only checks (skipped without CUDA): the Triton paged-decode kernel, CUDA-graph decode, bf16 parity."""

from __future__ import annotations

import pytest
import torch

from token_scheduler import LLMEngine, SamplingParams
from token_scheduler.engine import EngineConfig
from token_scheduler.model.attention import AttentionMetadata, _decode_torch

pytestmark = pytest.mark.gpu


class _Cfg:
    head_dim = 128


@pytest.mark.parametrize("nbi", [1, 4])
@pytest.mark.parametrize("group,window", [(1, None), (7, None), (4, 40)])
def test_triton_decode_matches_torch(group, window, nbi, monkeypatch):
    from token_scheduler.model import triton_decode
    from token_scheduler.model.triton_decode import paged_decode

    monkeypatch.setattr(triton_decode, "BLOCKS_PER_ITER", nbi)  # cache blocks an iteration

    torch.manual_seed(0)
    B, KVH, D, BS, NB, L = 5, 2, 128, 16, 64, 3
    kv = torch.randn(NB, L, 2, BS, KVH, D, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(B, KVH * group, D, device="cuda", dtype=torch.bfloat16)
    ctx = torch.tensor([1, 17, 100, 255, 64], device="cuda", dtype=torch.int32)
    bt = torch.stack([torch.randperm(NB, device="cuda")[:16] for _ in range(B)]).int()
    meta = AttentionMetadata(None, None, BS, decode=True, block_tables=bt, context_lens=ctx)
    for layer in range(L):
        ref = _decode_torch(q.float(), kv.float(), layer, meta, D**-0.5, window)
        for splits in (None, 1, 3):  # 3: block ranges that end mid-iteration
            out = paged_decode(q, kv, layer, bt, ctx, D**-0.5, window, num_splits=splits)
            err = (out.float() - ref).norm() / ref.norm()
            assert err < 1e-2, (splits, err)


@pytest.mark.parametrize("rope", [False, True])
def test_triton_decode_with_block_ids_an_iteration_ahead_is_bit_identical(rope, monkeypatch):
    """PIPELINE_IDS (each tile's block ids loaded an iteration ahead, K/V double-buffered) walks the same tiles in the
    same order as the walk loading them in the iteration: the same bf16 output bit for bit, with RoPE and the new
    token's K/V write folded in too, over contexts of several iterations a split."""
    from token_scheduler.model import triton_decode
    from token_scheduler.model.triton_decode import paged_decode

    torch.manual_seed(0)
    B, KVH, D, BS, NB, L, group = 6, 4, 128, 16, 512, 2, 7
    kv0 = torch.randn(NB, L, 2, BS, KVH, D, device="cuda", dtype=torch.bfloat16)
    ctx = torch.tensor([1, 17, 100, 255, 1000, 2048], device="cuda", dtype=torch.int32)
    bt = torch.stack([torch.randperm(NB, device="cuda")[:128] for _ in range(B)]).int()
    if rope:
        from token_scheduler.model.llama import RopeCache

        class Cfg:
            head_dim, rope_theta, rope_scaling = D, 10000.0, None

        rc = RopeCache.build(Cfg, 4096, "cuda")
        q = torch.randn(B, (KVH * group + 2 * KVH) * D, device="cuda", dtype=torch.bfloat16)
        pos = (ctx - 1).long()
        folded = (rc.cos, rc.sin, pos, bt.long().gather(1, (pos // BS)[:, None])[:, 0], pos % BS)
    else:
        q = torch.randn(B, KVH * group, D, device="cuda", dtype=torch.bfloat16)
        folded = None
    outs = {}
    for pipe in (False, True):
        monkeypatch.setattr(triton_decode, "PIPELINE_IDS", pipe)
        kv = kv0.clone()
        outs[pipe] = [(paged_decode(q, kv, 1, bt, ctx, D**-0.5, window, num_splits=splits, rope=folded), kv)
                      for splits in (None, 1, 3) for window in (None, 300)]
    for (a, kva), (b, kvb) in zip(outs[False], outs[True]):
        assert torch.equal(a, b) and torch.equal(kva, kvb)


@pytest.mark.parametrize("window", [None, 40])
def test_triton_decode_fp32_uses_ieee_dots(window):
    """fp32 models (the fp32 parity bench) get full-precision dots: TF32 would be off by ~1e-3."""
    from token_scheduler.model.triton_decode import paged_decode

    torch.manual_seed(0)
    B, KVH, D, BS, NB, L, group = 5, 2, 128, 16, 64, 3, 7
    kv = torch.randn(NB, L, 2, BS, KVH, D, device="cuda")
    q = torch.randn(B, KVH * group, D, device="cuda")
    ctx = torch.tensor([1, 17, 100, 255, 64], device="cuda", dtype=torch.int32)
    bt = torch.stack([torch.randperm(NB, device="cuda")[:16] for _ in range(B)]).int()
    meta = AttentionMetadata(None, None, BS, decode=True, block_tables=bt, context_lens=ctx)
    ref = _decode_torch(q.double(), kv.double(), 1, meta, D**-0.5, window)
    out = paged_decode(q, kv, 1, bt, ctx, D**-0.5, window)
    assert out.dtype == torch.float32
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_one_row_decode_loading_its_cache_early_reads_the_new_token_written_just_before():
    """A batch-1 decode's attention launched with PDL right behind the kernel writing its new token's K/V (RoPE + KV
    write, PDL too), loading its older cache before the wait (TOKENPOOL_ATTN_PREFETCH): 200 steps queued back to
    back, each a new position of one sequence whose cache the step before just grew, match the eager reference."""
    from token_scheduler.model import triton_ops
    from token_scheduler.model.triton_decode import paged_decode

    torch.manual_seed(0)
    H, KVH, D, BS, NB, L = 12, 2, 128, 16, 32, 2
    kv = torch.randn(NB, L, 2, BS, KVH, D, device="cuda", dtype=torch.bfloat16)
    cos, sin = torch.randn(512, D, device="cuda"), torch.randn(512, D, device="cuda")
    bt = torch.randperm(NB, device="cuda")[:NB][None].int()
    qkvs = torch.randn(200, 1, (H + 2 * KVH) * D, device="cuda", dtype=torch.bfloat16)
    outs, qs, ctxs = [], [], []
    for i in range(200):  # queued without a sync: each step's attention may start while its writer drains
        c = 40 + i
        ctx = torch.full((1,), c, device="cuda", dtype=torch.int32)
        pos = torch.full((1,), c - 1, device="cuda", dtype=torch.long)
        sb, so = bt[0, (c - 1) // BS].long().view(1), pos % BS
        q = triton_ops.rope_and_write_kv(qkvs[i], cos, sin, pos, kv, 1, sb, so, H, KVH, D)
        outs.append(paged_decode(q.view(1, H, D), kv, 1, bt, ctx, D**-0.5))  # one row: loads early
        qs.append(q.view(1, H, D).clone())
        ctxs.append(ctx)
    torch.cuda.synchronize()
    for q, ctx, out in zip(qs, ctxs, outs):
        meta = AttentionMetadata(None, None, BS, decode=True, block_tables=bt, context_lens=ctx)
        ref = _decode_torch(q.float(), kv.float(), 1, meta, D**-0.5, None)  # the final cache: older slots unchanged
        assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2


def _staggered(eng) -> dict[str, list[int]]:
    """Six requests arriving one a step (greedy and seeded sampling in turn, prompts and outputs of six lengths),
    stepped until all finish: request id -> its tokens."""
    res, step = {}, 0
    while step < 8 or eng.has_unfinished_requests():
        if step < 6:
            sp = (SamplingParams(temperature=0.8, seed=step, max_tokens=12 + 3 * step, ignore_eos=True) if step % 2
                  else SamplingParams(temperature=0, max_tokens=12 + 3 * step, ignore_eos=True))
            eng.add_request(f"r{step}", [5 + step] * (3 + 7 * step), sp)
        for o in eng.step():
            if o.finished:
                res[o.request_id] = o.outputs[0].token_ids
        step += 1
    return res


def test_cuda_graph_decode_equals_eager(make_varied):
    """Graph decode, and overlapped graph decode (step N+1 fed N's sampled ids on the GPU), give the tokens
    of eager decode, while requests join at different steps and finish at different lengths."""
    d = make_varied("qwen2")
    outs, fed = {}, []
    for graphs, overlap in ((False, False), (True, False), (True, True)):
        eng = LLMEngine(EngineConfig(model=str(d), device="cuda", dtype="fp32", cuda_graphs=graphs, overlap=overlap,
                                     kv_cache_memory_gb=0.1, max_num_seqs=8))
        orig = eng.runner.launch_decode
        eng.runner.launch_decode = lambda out, ids=None, orig=orig, **kw: (fed.append(ids is not None),
                                                                             orig(out, ids, **kw))[1]
        outs[(graphs, overlap)] = _staggered(eng)
        assert eng.stats()["kv_blocks_used"] == 0
    assert outs[(True, False)] == outs[(False, False)]
    assert outs[(True, True)] == outs[(False, False)]
    assert sum(fed) > 10  # the overlapped engine did feed steps GPU to GPU


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_decode_with_rope_in_the_attention_gives_the_same_tokens(make_varied, arch, monkeypatch):
    """TOKENPOOL_ATTN_ROPE: batched decode steps (graphs and eager) with RoPE and the KV write inside the paged-decode
    kernel give the tokens of the separate RoPE kernel (fp32), requests joining and finishing at different steps."""
    from token_scheduler.model import llama

    d = make_varied(arch)
    outs = {}
    for fold, graphs in ((False, True), (True, True), (True, False)):
        monkeypatch.setattr(llama, "ATTN_ROPE", fold)
        eng = LLMEngine(EngineConfig(model=str(d), device="cuda", dtype="fp32", cuda_graphs=graphs,
                                     kv_cache_memory_gb=0.1, max_num_seqs=8))
        outs[(fold, graphs)] = res = _staggered(eng)
        assert eng.stats()["kv_blocks_used"] == 0 and len(res) == 6
    assert outs[(True, True)] == outs[(False, True)] and outs[(True, False)] == outs[(False, True)]


def _one_at_a_time(d, graphs: bool, dtype: str = "fp32") -> list[list[int]]:
    """Three greedy requests of model `d`, each run alone to its end (batch-1 decode steps: the GEMV path, PDL), with
    or without CUDA graphs: their tokens; every KV block is free after."""
    eng = LLMEngine(EngineConfig(model=str(d), device="cuda", dtype=dtype, cuda_graphs=graphs, kv_cache_memory_gb=0.1,
                                 max_num_seqs=8))
    res = []
    for i in range(3):
        eng.add_request(f"r{i}", [5 + i] * (3 + 11 * i), SamplingParams(temperature=0, max_tokens=20 + 9 * i,
                                                                         ignore_eos=True))
        while eng.has_unfinished_requests():
            res += [o.outputs[0].token_ids for o in eng.step() if o.finished]
    assert eng.stats()["kv_blocks_used"] == 0 and len(res) == 3
    return res


def test_batch_one_decode_loading_its_cache_early_gives_the_same_tokens(make_varied, monkeypatch):
    """TOKENPOOL_ATTN_PREFETCH: batch-1 decode steps (one request at a time; graphs and eager; the GEMV path, PDL)
    give the tokens of the attention that loads everything after the wait (fp32)."""
    from token_scheduler.model import triton_decode

    d = make_varied("qwen2")
    outs = {}
    for prefetch, graphs in ((False, True), (True, True), (True, False)):
        monkeypatch.setattr(triton_decode, "PREFETCH_KV", prefetch)
        outs[(prefetch, graphs)] = _one_at_a_time(d, graphs)
    assert outs[(True, True)] == outs[(False, True)] and outs[(True, False)] == outs[(False, True)]


def test_batch_one_silu_in_gate_up_gives_the_same_bits(make_varied, monkeypatch):
    """TOKENPOOL_GEMV_GLU: the one-token gate_up with SiLU*mul in its epilogue, then down as a plain GEMV, gives the
    bits of gate_up then down's SiLU*mul prologue (bf16, the 1.5B's and 7B's shapes under PDL); and an engine's batch-1
    tokens with it equal those without (graphs and eager)."""
    from token_scheduler.model import llama
    from token_scheduler.model.triton_gemv import MODE_NORM, MODE_SILU, gemv

    torch.manual_seed(0)
    for h, i in ((1536, 8960), (3584, 18944), (200, 70)):
        bf = dict(device="cuda", dtype=torch.bfloat16)
        x, r, nw = torch.randn(1, h, **bf), torch.randn(1, h, **bf), torch.randn(h, **bf)
        wgu, wd = torch.randn(2 * i, h, **bf) / h**0.5, torch.randn(h, i, **bf) / i**0.5
        gu, xo_ref = gemv(x, wgu, mode=MODE_NORM, r=r, norm_w=nw, eps=1e-6)
        act, xo = gemv(x, wgu, mode=MODE_NORM, r=r, norm_w=nw, eps=1e-6, glu=True)
        a = torch.nn.functional.silu(gu[:, :i].float()) * gu[:, i:].float()
        assert torch.equal(xo, xo_ref) and torch.allclose(act.float(), a, rtol=2e-2, atol=1e-2), (h, i)
        assert torch.equal(gemv(act, wd)[0], gemv(gu, wd, mode=MODE_SILU)[0]), (h, i)
    d = make_varied("qwen2")
    outs = {}
    for glu, graphs in ((False, True), (True, True), (True, False)):
        monkeypatch.setattr(llama, "GEMV_GLU", glu)
        outs[(glu, graphs)] = _one_at_a_time(d, graphs)
    assert outs[(True, True)] == outs[(False, True)] and outs[(True, False)] == outs[(False, True)]


@pytest.mark.parametrize("step_io", [False, True])
def test_an_overlapped_launch_never_makes_the_host_wait(make_varied, step_io, monkeypatch):
    """A decode launched behind the step in flight (overlap, TOKENPOOL_PIPELINE) queues its inputs, graph and
    sampling without one synchronizing CUDA call (torch's sync debug mode raises on any), whatever the sampling:
    greedy, temperature, top-k, top-p, min-p, seeded; a row set that changes (a request finished) included. A
    pageable `torch.tensor(..., device=cuda)` for the sampling settings used to wait for both steps. With
    runner.STEP_IO too (the fill kernel, the ids written through a device view of pinned memory)."""
    from token_scheduler import runner

    monkeypatch.setattr(runner, "STEP_IO", step_io)
    d = make_varied("qwen2")
    eng = LLMEngine(EngineConfig(model=str(d), device="cuda", dtype="bf16", overlap=True, kv_cache_memory_gb=0.1,
                                 max_num_seqs=8))
    orig, launched = eng.runner.launch_decode, []

    def strict(*a, **kw):
        torch.cuda.set_sync_debug_mode("error")
        try:
            step = orig(*a, **kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        launched.append(kw.get("rows"))
        return step
    eng.runner.launch_decode = strict
    kinds = [dict(temperature=0), dict(temperature=0.8), dict(temperature=0.7, top_k=5), dict(temperature=1.0, top_p=0.8),
             dict(temperature=0.9, min_p=0.1), dict(temperature=0.8, seed=3)]
    for i, kw in enumerate(kinds):
        eng.add_request(f"r{i}", [7 + i] * (3 + i), SamplingParams(max_tokens=6 + 2 * i, ignore_eos=True, **kw))
    done = set()
    while eng.has_unfinished_requests():
        done |= {o.request_id for o in eng.step() if o.finished}
    assert done == {f"r{i}" for i in range(len(kinds))}
    assert len(launched) > 10 and any(r is not None for r in launched)  # some launches gathered changed rows


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_step_io_gives_the_same_tokens_and_logprobs(make_varied, dtype, monkeypatch):
    """runner.STEP_IO -- a decode graph's inputs written by one kernel, its logits kept in the model dtype, the sampled
    ids written to pinned memory by a kernel -- gives the tokens of the default, stepped with and without overlap
    (requests joining and finishing at different steps, greedy and seeded sampling), and the same logprobs (steps that
    ask for them run `execute`, whose graph logits are bf16 too)."""
    from token_scheduler import runner

    d = make_varied("qwen2")
    outs = {}
    for io in (False, True):
        monkeypatch.setattr(runner, "STEP_IO", io)
        for overlap in (False, True):
            eng = LLMEngine(EngineConfig(model=str(d), device="cuda", dtype=dtype, overlap=overlap,
                                         kv_cache_memory_gb=0.1, max_num_seqs=8))
            res = _staggered(eng)
            eng.add_request("lp", [9] * 11, SamplingParams(temperature=0, max_tokens=7, logprobs=3, ignore_eos=True))
            eng.add_request("lq", [4] * 5, SamplingParams(temperature=0.7, seed=1, max_tokens=9, logprobs=0,
                                                          ignore_eos=True))
            while eng.has_unfinished_requests():
                for o in eng.step():
                    if o.finished:
                        res[o.request_id] = (o.outputs[0].token_ids, o.outputs[0].logprobs)
            outs[(io, overlap)] = res
            graphs = [g for k, g in eng.runner.graphs.items() if len(k) == 3]
            assert graphs and all(g.fused == io for g in graphs)
            assert all(g.logits.dtype == (eng.runner.kv.dtype if io else torch.float32) for g in graphs)
            assert eng.stats()["kv_blocks_used"] == 0 and len(res) == 8
            if io and overlap:  # every launched step gave its ids' buffer back once read
                assert eng.runner.readback.free
    assert outs[(True, False)] == outs[(False, False)] and outs[(True, True)] == outs[(False, True)]


def test_timed_steps_report_device_time_and_the_same_tokens(make_varied):
    """runner.time_steps (TOKENPOOL_TIME_STEPS in a pooled engine): each step that samples reports its device time
    by CUDA events, more than nothing and less than the step's wall, graph decodes and the eager prefill alike; and
    the tokens are those of an untimed engine."""
    import time

    d = make_varied("qwen2")
    outs = {}
    for timed in (False, True):
        eng = LLMEngine(EngineConfig(model=str(d), device="cuda", dtype="fp32", kv_cache_memory_gb=0.1,
                                     max_num_seqs=8, overlap=False))
        eng.runner.time_steps = timed
        for i in range(3):
            eng.add_request(f"r{i}", [5 + i] * (4 + 5 * i), SamplingParams(temperature=0, max_tokens=9,
                                                                         ignore_eos=True))
        res, devs = {}, []
        while eng.has_unfinished_requests():
            t = time.perf_counter()
            for o in eng.step():
                if o.finished:
                    res[o.request_id] = o.outputs[0].token_ids
            wall = time.perf_counter() - t
            if timed:
                assert eng.device_s is not None and 0 < eng.device_s < wall
                devs.append(eng.device_s)
            else:
                assert eng.device_s is None
        outs[timed] = res
        assert not timed or len(devs) == 9  # one prefill step, then 8 decodes of all three
    assert outs[True] == outs[False]


def _graph_waves(d, cap: int, overlap: bool, monkeypatch) -> dict:
    """Waves of decode batches of 1 to 8 requests (buckets 1, 2, 4, 8) on one engine under TOKENPOOL_GRAPH_CAP=`cap`:
    the tokens, and what the graphs held (most graphs kept at once, the counters, device memory the engine holds)."""
    import gc

    from token_scheduler import graph_cap, runner

    monkeypatch.setattr(runner, "GRAPH_CAP", cap)
    gc.collect()
    torch.cuda.synchronize()
    # cuBLAS keeps a workspace (32 MiB on Hopper) per stream it ran on, for the process: a run whose capture stream
    # (from torch's round-robin pool) had none before would count one more. Not the engine's: left out of both ends.
    torch._C._cuda_clearCublasWorkspaces()
    base = torch.cuda.memory_allocated()
    eng = LLMEngine(EngineConfig(model=str(d), device="cuda", dtype="fp32", overlap=overlap, kv_cache_memory_gb=0.1,
                                 max_num_seqs=8))
    eng.runner.row_graphs = False  # decode graphs alone (the prefills' row graphs: test_rowwise_prefill_on_cuda_...)
    graphs, key = eng.runner.graphs, eng.runner.graph_key
    res, most = {}, 0
    for w, n in enumerate([1, 3, 8, 2, 5, 1, 8, 4] * 2):
        for i in range(n):  # lengths differ: the batch shrinks through smaller buckets, with overlap while in flight
            eng.add_request(f"w{w}r{i}", [5 + i + w] * (3 + i),
                            SamplingParams(temperature=0.8, seed=100 * w + i, max_tokens=6 + 2 * i, ignore_eos=True))
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    res[o.request_id] = o.outputs[0].token_ids
            most = max(most, len(graph_cap.graph_ids(graphs, key)))
    kept = [graphs[k].nbytes for k in graph_cap.graph_ids(graphs, key)]
    out = {"res": res, "most": most, "kept": len(kept), "kept_bytes": sum(kept), "counters": list(graphs[graph_cap.CAPTURES]),
           "bucket8_bytes": 8 * eng.model_config.vocab_size * 4}
    torch.cuda.synchronize()
    torch._C._cuda_clearCublasWorkspaces()  # (no replay follows)
    out["allocated"] = torch.cuda.memory_allocated() - base
    del eng, graphs
    gc.collect()
    return out


@pytest.mark.parametrize("overlap", [False, True])
def test_graph_cap_evicts_and_decodes_as_uncapped(make_varied, monkeypatch, overlap):
    """TOKENPOOL_GRAPH_CAP=2 over decode batches in 4 buckets: captures evict the least recently replayed graph (with
    overlap, never the one the step in flight replayed), the tokens are those of the uncapped run, at most 2 graphs are
    kept at any step, the held-bytes counter is what the kept graphs' logits take, and the device memory the engine
    holds is less than uncapped by at least what the counter says was given back (eviction really frees it)."""
    d = make_varied("qwen2")
    free = _graph_waves(d, 96, overlap, monkeypatch)
    capped = _graph_waves(d, 2, overlap, monkeypatch)
    assert capped["res"] == free["res"] and len(free["res"]) == 64
    assert free["counters"][5] == 0 and free["most"] == 4
    captures, _, _, _, held, evictions = capped["counters"]
    assert evictions > 0 and captures == evictions + capped["kept"] and capped["most"] <= 2
    assert held == capped["kept_bytes"] <= 2 * capped["bucket8_bytes"]
    assert free["counters"][4] == free["kept_bytes"] > held
    assert free["allocated"] - capped["allocated"] >= free["counters"][4] - held


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_fused_forward_equals_torch_forward(make_varied, arch):
    """The fused CUDA path must compute the same function as the reference ops (bf16, same device)."""
    from model_swapper.model_config import ModelConfig
    from model_swapper.weights import load_weights
    from token_scheduler.model import llama
    from token_scheduler.runner import allocate_kv_cache

    d = make_varied(arch)
    cfg = ModelConfig.from_pretrained(d)
    w = load_weights(d, cfg, "cuda", torch.bfloat16)
    rope = llama.RopeCache.build(cfg, 256, "cuda")
    T = 40
    ids = torch.randint(0, cfg.vocab_size, (T,), device="cuda")
    pos = torch.arange(T, device="cuda")
    outs = []
    for fused in (False, True):
        kv = allocate_kv_cache(cfg, 4, 16, torch.bfloat16, "cuda")
        meta = AttentionMetadata(pos // 16, pos % 16, 16, seqs=[(0, T, T)],
                                 seq_block_tables=[torch.arange(3, device="cuda")])
        f = llama.forward_fused if fused else llama.forward
        h = f(cfg, w, kv, rope, ids, pos, meta)
        written = kv[:3].transpose(0, 2).transpose(0, 1).flatten(2, 3)[:, :, :T]  # [L, 2, T, KVH, D]: slots 0..T-1
        outs.append((h, written.clone()))
    (h0, kv0), (h1, kv1) = outs
    # Not bit-identical: the fused RMSNorm sums squares in another order (fp32), so a value can land one
    # bf16 ulp away; the function must be the same within that.
    for a, b in ((h0, h1), (kv0, kv1)):
        assert (a.float() - b.float()).abs().max().item() < 0.05 * a.float().abs().max().item()


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_one_token_gemv_forward_equals_torch_forward(make_varied, arch, monkeypatch):
    """A one-token step (batch-1 decode) runs the Triton GEMVs with add+RMSNorm and SiLU*mul folded in: same
    hidden state and KV as the reference ops within bf16 rounding, after a 40-token context."""
    from model_swapper.model_config import ModelConfig
    from model_swapper.weights import load_weights
    from token_scheduler.model import llama
    from token_scheduler.runner import allocate_kv_cache

    d = make_varied(arch)
    cfg = ModelConfig.from_pretrained(d)
    w = load_weights(d, cfg, "cuda", torch.bfloat16)
    rope = llama.RopeCache.build(cfg, 256, "cuda")
    T = 40
    ids = torch.randint(0, cfg.vocab_size, (T + 1,), device="cuda")
    pos = torch.arange(T + 1, device="cuda")
    kv = allocate_kv_cache(cfg, 4, 16, torch.bfloat16, "cuda")
    bt = [torch.arange(3, device="cuda")]
    llama.forward(cfg, w, kv, rope, ids[:T], pos[:T], AttentionMetadata(pos[:T] // 16, pos[:T] % 16, 16,
                                                                        seqs=[(0, T, T)], seq_block_tables=bt))
    outs = []
    for gemv_on in (False, True):
        monkeypatch.setattr(llama, "USE_GEMV", gemv_on)
        kv1 = kv.clone()
        p1 = pos[T:]
        meta = AttentionMetadata(p1 // 16, p1 % 16, 16, decode=True, block_tables=bt[0][None].int(),
                                 context_lens=torch.tensor([T + 1], device="cuda", dtype=torch.int32))
        h = llama.forward_fused(cfg, w, kv1, rope, ids[T:], p1, meta)
        outs.append((h, kv1[2, :, :, T % 16].clone()))  # the new token's K and V, every layer
    (h0, kv0), (h1, kv1) = outs
    for a, b in ((h0, h1), (kv0, kv1)):
        assert (a.float() - b.float()).abs().max().item() < 0.05 * a.float().abs().max().item()
    assert not torch.equal(kv0, torch.zeros_like(kv0))


def _decode_batch(rows: int, real: int):
    """A decode step's inputs: `real` sequences of different context lengths over 8 blocks each, padded to
    `rows` as the decode graph pads a bucket (token 0 at position 0, its K/V into the scratch block, the last);
    the Triton attention, as the engine runs it. Returns (ids, positions, metadata, blocks the cache needs)."""
    ctx = [100 - 13 * j for j in range(real)] + [1] * (rows - real)
    scratch = 8 * real
    bt = torch.full((rows, 8), scratch, dtype=torch.int32)
    for j in range(real):
        bt[j] = torch.arange(8 * j, 8 * j + 8)
    pos = torch.tensor(ctx) - 1
    meta = AttentionMetadata(bt[torch.arange(rows), pos // 16].long().cuda(), (pos % 16).cuda(), 16, decode=True,
                             block_tables=bt.cuda(), context_lens=torch.tensor(ctx, device="cuda", dtype=torch.int32),
                             use_triton=True)
    ids = torch.tensor([5 + j for j in range(real)] + [0] * (rows - real), device="cuda")
    return ids, pos.cuda(), meta, scratch + 1


def _decode_step_model(make_varied, arch: str, rows: int, real: int):
    """A varied model of `arch` in bf16 on the GPU and a padded decode step's inputs (`_decode_batch`) over a cache of
    random K/V: (config, weights, rope, ids, positions, metadata, cache)."""
    from model_swapper.model_config import ModelConfig
    from model_swapper.weights import load_weights
    from token_scheduler.model import llama
    from token_scheduler.runner import allocate_kv_cache

    d = make_varied(arch)
    cfg = ModelConfig.from_pretrained(d)
    w = load_weights(d, cfg, "cuda", torch.bfloat16)
    rope = llama.RopeCache.build(cfg, 256, "cuda")
    ids, pos, meta, blocks = _decode_batch(rows, real)
    kv = allocate_kv_cache(cfg, blocks, 16, torch.bfloat16, "cuda")
    kv.normal_()
    return cfg, w, rope, ids, pos, meta, kv


def _assert_steps_close(outs, kv, meta) -> None:
    """Two paths' (hidden state, new K/V of every row) of one decode step agree within bf16 rounding, and the step
    wrote K/V."""
    (h0, kv0), (h1, kv1) = outs
    for a, b in ((h0, h1), (kv0, kv1)):
        assert (a.float() - b.float()).abs().max().item() < 0.05 * a.float().abs().max().item()
    assert not torch.equal(kv1, kv[meta.slot_blocks, :, :, meta.slot_offsets])


def _assert_replays_equal(step, kv, ref, ref_kv) -> None:
    """`step(kv)` (a decode step writing into kv) run once outside a capture (compiling), captured in a CUDA graph and
    replayed three times: its hidden state and cache equal `ref` and `ref_kv` bit for bit after each replay."""
    step(kv.clone())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h = step(kv)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(h, ref) and torch.equal(kv, ref_kv)


@pytest.mark.parametrize("arch,swap,mlp,persist", [
    ("qwen2", False, True, 0), ("qwen3", False, True, 0), ("llama", False, True, 0), ("qwen2", True, True, 0),
    ("qwen2", False, False, 0), ("qwen2", False, True, 2), ("qwen3", False, True, 2)])
def test_small_batch_gemv_forward_equals_cublas_forward(make_varied, arch, swap, mlp, persist, monkeypatch):
    """A decode step of 8 rows (6 sequences, 2 padded) through the small-batch GEMVs (their dot either way round:
    ROWS_SWAP; the MLP's too, or qkv and o alone: GEMV_ROWS_MLP; on a persistent grid: ROWS_PERSIST, here 2 programs
    in all, fewer than a tiny model's tiles): the hidden state and the K/V written of the cuBLAS path, within bf16
    rounding."""
    from token_scheduler.model import llama, triton_gemv

    monkeypatch.setattr(triton_gemv, "ROWS_SWAP", swap)
    monkeypatch.setattr(llama, "GEMV_ROWS_MLP", mlp)
    monkeypatch.setattr(triton_gemv, "ROWS_PERSIST", persist)
    monkeypatch.setattr(triton_gemv, "_sms", lambda index: 1)
    cfg, w, rope, ids, pos, meta, kv = _decode_step_model(make_varied, arch, 8, 6)
    outs = []
    for max_rows in (0, 32):
        monkeypatch.setattr(llama, "GEMV_MAX_ROWS", max_rows)
        kv1 = kv.clone()
        h = llama.forward_fused(cfg, w, kv1, rope, ids, pos, meta)
        outs.append((h, kv1[meta.slot_blocks, :, :, meta.slot_offsets]))  # every row's new K and V
    _assert_steps_close(outs, kv, meta)


@pytest.mark.parametrize("rows,real,early", [(1, 1, False), (8, 6, False), (1, 1, True)])
def test_pdl_graph_replay_is_bit_exact(make_varied, monkeypatch, rows, real, early):
    """Programmatic dependent launch changes no arithmetic: a decode step (one token, or a padded small batch
    through the small-batch GEMVs) captured with it in a CUDA graph and replayed gives the hidden state and KV
    of plain eager launches bit for bit, replay after replay (a kernel reading before its wait would show as a
    race), one row's kernels letting the next in after their wait or before it (`early`: triton_ops.PDL_EARLY). Under PDL
    one row's attention loads its cache early and counts the new token apart (PREFETCH_KV), a different fp32 sum
    order: the plain launches take that path too (it needs no PDL to be right)."""
    from token_scheduler.model import llama, triton_decode, triton_ops

    prefetches = triton_decode._prefetches

    def as_under_pdl(q, own_rows, rope):  # the early-load decision the PDL launch of this step makes
        with monkeypatch.context() as m:
            m.setattr(triton_decode, "pdl", lambda t: t.shape[0] <= rows)
            return prefetches(q, own_rows, rope)

    torch.manual_seed(0)
    cfg, w, rope, ids, pos, meta, kv = _decode_step_model(make_varied, "qwen2", rows, real)
    monkeypatch.setattr(llama, "GEMV_MAX_ROWS", 32)  # the small-batch path (off by default)
    monkeypatch.setattr(triton_ops, "USE_PDL", False)
    monkeypatch.setattr(triton_decode, "_prefetches", as_under_pdl)
    ref_kv = kv.clone()
    ref = llama.forward_fused(cfg, w, ref_kv, rope, ids, pos, meta)
    monkeypatch.setattr(triton_decode, "_prefetches", prefetches)
    monkeypatch.setattr(triton_ops, "USE_PDL", True)
    monkeypatch.setattr(triton_ops, "PDL_EARLY", early)
    _assert_replays_equal(lambda c: llama.forward_fused(cfg, w, c, rope, ids, pos, meta), kv, ref, ref_kv)


def test_rowwise_prefill_on_cuda_matches_hf(make_varied, monkeypatch):
    """Short prefill chunks through the Triton attention, row by row (the CUDA default), in fp32: the greedy
    tokens of chunked prompts equal HF's on the GPU, and equal the per-sequence SDPA path's -- replaying row graphs
    (the default; here pieces of at most 16 rows and 2 sampled rows) and eagerly."""
    from transformers import AutoModelForCausalLM

    from token_scheduler import runner as R

    monkeypatch.setattr(R, "ROW_BUCKETS", (8, 16))  # (the default buckets: TOKENPOOL_PREFILL_GRAPHS > 0 here)
    monkeypatch.setattr(R, "ROW_SELECT", 2)
    d = make_varied("qwen2")
    hf = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).cuda().eval()
    g = torch.Generator().manual_seed(3)
    outs = {}
    for row_max, row_graphs in ((1 << 22, True), (1 << 22, False), (0, False)):
        eng = LLMEngine(EngineConfig(model=str(d), device="cuda", dtype="fp32", kv_cache_memory_gb=0.1,
                                     max_num_seqs=8, max_num_batched_tokens=32))
        assert eng.runner.rowwise_prefill_max == 1 << 22 and eng.runner.row_graphs  # the CUDA defaults
        eng.runner.rowwise_prefill_max, eng.runner.row_graphs = row_max, row_graphs
        eng.runner.row_graph_rows = 1 << 20  # pieces of up to 16 rows whatever the step's
        prompts = [torch.randint(0, eng.model_config.vocab_size, (n,), generator=g).tolist() for n in (45, 7, 20)]
        for i, p in enumerate(prompts):
            eng.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
        res = {}
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    res[o.request_id] = o.outputs[0].token_ids
        outs[row_max, row_graphs] = res
        row_ids = [k for k in eng.runner.graphs if len(k) == 3 and isinstance(k[2], tuple)]
        assert bool(row_ids) == row_graphs and all(k[2] in (("rows", 8), ("rows", 16)) for k in row_ids)
        for i, p in enumerate(prompts):
            with torch.no_grad():
                ref = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=12, min_new_tokens=12,
                                  do_sample=False)
            assert res[f"r{i}"] == ref[0, len(p):].tolist()
        g = torch.Generator().manual_seed(3)
    assert outs[1 << 22, True] == outs[1 << 22, False] == outs[0, False]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_an_engine_on_the_second_gpu_runs_from_a_worker_thread(make_varied):
    """A worker on cuda:1 steps from its own threads (controller/worker.py bind_device): CUDA-graph capture and
    the Triton kernels must run on that GPU, and give the tokens the first GPU gives."""
    from concurrent.futures import ThreadPoolExecutor

    from controller.worker import bind_device

    d = make_varied("qwen2")

    def run(device: str) -> dict:
        eng = LLMEngine(EngineConfig(model=str(d), device=device, dtype="fp32", cuda_graphs=True, overlap=True,
                                     kv_cache_memory_gb=0.1, max_num_seqs=8))
        for i in range(4):
            eng.add_request(f"r{i}", [5 + i] * (3 + 5 * i), SamplingParams(temperature=0, max_tokens=16))
        out = {}
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    out[o.request_id] = o.outputs[0].token_ids
        assert eng.runner.kv.device == torch.device(device)
        return out

    with ThreadPoolExecutor(1, initializer=bind_device, initargs=("cuda:1",)) as ex:
        second = ex.submit(run, "cuda:1").result()
    assert second == run("cuda:0")


def test_prompt_logprobs_and_logit_bias_on_cuda(make_varied):
    """On CUDA (graphs on): a request asking for its prompt's logprobs takes the eager prefill (no row graphs), whose
    values equal the CPU engine's on the same fp32 weights; asking changes no generated token; logit_bias, min_tokens
    and grammar rows (the latter two never overlapped) give the CPU engine's tokens, the grammar's a valid instance."""
    import json

    from tests.test_pipeline import SMALL_JSON
    from token_scheduler import LLM

    d = make_varied("qwen2")
    ids = list(range(5, 45))
    eos = LLMEngine(EngineConfig(model=str(d), device="cpu")).eos_token_ids[0]
    params = [SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=1, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logit_bias={7: 50.0, 9: -100.0}),
              SamplingParams(temperature=0, max_tokens=9, min_tokens=5, logit_bias={eos: 100.0}),
              SamplingParams(temperature=0, max_tokens=40, grammar=SMALL_JSON)]
    outs = {}
    for dev in ("cpu", "cuda"):
        llm = LLM(d, device=dev, dtype="fp32", **({"kv_cache_memory_gb": 0.1} if dev == "cuda" else {}))
        outs[dev] = llm.generate([ids, ids[:9], ids[:12], ids[:7]], params)
    cpu, gpu = outs["cpu"], outs["cuda"]
    assert [o.outputs[0].token_ids for o in gpu] == [o.outputs[0].token_ids for o in cpu]
    assert len(gpu[2].outputs[0].token_ids) == 6 and gpu[2].outputs[0].token_ids[-1] == eos
    obj = json.loads(gpu[3].outputs[0].text)  # (SMALL_SCHEMA's instances; jsonschema is not on the GPU machine)
    assert set(obj) == {"ok", "n"} and isinstance(obj["ok"], bool) and obj["n"] in range(10)
    assert gpu[0].prompt_logprobs[0] is None and len(gpu[0].prompt_logprobs) == len(ids)
    for a, b in zip(gpu[0].prompt_logprobs[1:], cpu[0].prompt_logprobs[1:]):
        t = list(b)[0]  # the prompt token's own (the top one's id may differ in a near-tie)
        assert list(a)[0] == t and abs(a[t] - b[t]) <= 2e-3


def test_embeddings_on_cuda(make_varied):
    """On CUDA (graphs on): embedding requests take the eager forward whatever their shape (a one-token prompt's
    prefill is decode-shaped; short prompts would go through the row graphs), beside a generation that replays its
    graphs; each vector equals the CPU engine's on the same fp32 weights, and the generation's tokens are unchanged."""
    from token_scheduler import LLM

    d = make_varied("qwen2")
    prompts = [list(range(5, 45)), [11], list(range(3, 12))]
    plain = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    params = [SamplingParams(embed=True)] * 3 + [plain]
    outs = {}
    for dev in ("cpu", "cuda"):
        llm = LLM(d, device=dev, dtype="fp32", **({"kv_cache_memory_gb": 0.1} if dev == "cuda" else {}))
        outs[dev] = llm.generate([*prompts, prompts[2]], params)
    cpu, gpu = outs["cpu"], outs["cuda"]
    assert gpu[3].outputs[0].token_ids == cpu[3].outputs[0].token_ids and gpu[3].embedding is None
    for a, b in zip(gpu[:3], cpu[:3]):
        assert max(abs(x - y) for x, y in zip(a.embedding, b.embedding)) <= 2e-3


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_lora_on_cuda(make_varied, tmp_path, dtype):
    """On CUDA (graphs on): requests of two adapters and of the model in one engine, decoding together (through the
    decode graphs over the adapter slots), then the model's alone (its own graphs), which are an adapter-less
    engine's; fp32 tokens equal the CPU engine's; bf16 adapter tokens equal a bf16 engine's on the merged weights for
    most prompts (rounding differs: merged vs unmerged)."""
    from controller.model_factory import make_lora, merge_lora
    from token_scheduler import LLM

    d = make_varied("qwen2")
    ads = {"a": make_lora(d, tmp_path / "a", rank=4, alpha=48, seed=1),
           "b": make_lora(d, tmp_path / "b", rank=8, alpha=16, seed=2, targets=("q_proj", "v_proj", "down_proj"))}
    prompts = [list(range(5, 45)), list(range(7, 16)), [11, 12, 13]]
    kinds = [None, "a", "b"]
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, lora=k) for k in kinds for _ in prompts]
    extra = {"kv_cache_memory_gb": 0.1}
    gpu = LLM(d, device="cuda", dtype=dtype, lora_modules={k: str(v) for k, v in ads.items()}, **extra)
    got = [o.outputs[0].token_ids for o in gpu.generate(prompts * 3, params)]
    buckets = [b for _, b in gpu.engine.runner._lora_graphs]  # (adapter rows ran in graphs, not eagerly: their
    assert any(isinstance(b, int) for b in buckets) and any(isinstance(b, tuple) for b in buckets)  # decodes, prefills)
    alone = [o.outputs[0].token_ids for o in gpu.generate(prompts, params[:3])]  # (graphs, after adapter steps)
    plain = LLM(d, device="cuda", dtype=dtype, **extra)
    assert alone == [o.outputs[0].token_ids for o in plain.generate(prompts, params[:3])]
    if dtype == "fp32":  # (bf16: a model row beside adapter rows takes other kernels and shapes, so other rounding)
        assert got[:3] == alone
        cpu = LLM(d, device="cpu", dtype="fp32", lora_modules={k: str(v) for k, v in ads.items()})
        assert got == [o.outputs[0].token_ids for o in cpu.generate(prompts * 3, params)]
    else:
        same = 0
        for i, k in enumerate(("a", "b")):
            merged = LLM(merge_lora(d, ads[k], tmp_path / f"m{k}"), device="cuda", dtype=dtype, **extra)
            want = [o.outputs[0].token_ids for o in merged.generate(prompts, params[:3])]
            same += sum(g == w for g, w in zip(got[3 * (i + 1): 3 * (i + 2)], want))
        assert same >= 4
    assert got[3:6] != got[:3]


@pytest.mark.parametrize("arch,glu", [("qwen2", False), ("qwen3", False), ("llama", False), ("qwen2", True)])
def test_tma_forward_equals_cublas_forward(make_varied, arch, glu, monkeypatch):
    """A decode step of 8 rows (6 sequences, 2 padded) with its projections through triton_tma (SiLU*mul in
    gate_up's epilogue or after it: GLU, down split along K and summed by the next add+RMSNorm): the hidden state and
    the K/V written of the cuBLAS path, within bf16 rounding; every projection went through the TMA kernel."""
    from token_scheduler.model import llama, triton_tma

    if not triton_tma.pdl_capable(torch.zeros(1, device="cuda")):
        pytest.skip("TMA and programmatic dependent launch need Hopper or later")
    monkeypatch.setattr(triton_tma, "GLU", glu)
    cfg, w, rope, ids, pos, meta, kv = _decode_step_model(make_varied, arch, 8, 6)
    calls, linear = [], triton_tma.linear
    monkeypatch.setattr(triton_tma, "linear", lambda *a, **k: (calls.append(1), linear(*a, **k))[1])
    outs = []
    for rows in (0, 32):
        monkeypatch.setattr(triton_tma, "MAX_ROWS", rows)
        kv1 = kv.clone()
        h = llama.forward_fused(cfg, w, kv1, rope, ids, pos, meta)
        outs.append((h, kv1[meta.slot_blocks, :, :, meta.slot_offsets]))
    assert len(calls) == 4 * cfg.num_layers
    _assert_steps_close(outs, kv, meta)


@pytest.mark.parametrize("early", ["none", "all"])
def test_tma_graph_replay_is_bit_exact(make_varied, monkeypatch, early):
    """The TMA step captured in a CUDA graph with every kernel under programmatic dependent launch gives the hidden
    state and KV of the same kernels launched plainly, eagerly, bit for bit, replay after replay (a kernel reading
    before its wait would show as a race), its kernels letting the next in after their wait or before it
    (`early`: triton_ops.PDL_EARLY_ROWS)."""
    from token_scheduler.model import llama, triton_ops, triton_tma

    if not triton_tma.pdl_capable(torch.zeros(1, device="cuda")):
        pytest.skip("TMA and programmatic dependent launch need Hopper or later")
    torch.manual_seed(0)
    cfg, w, rope, ids, pos, meta, kv = _decode_step_model(make_varied, "qwen2", 8, 6)
    monkeypatch.setattr(triton_tma, "MAX_ROWS", 32)
    monkeypatch.setattr(triton_tma, "pdl_capable", lambda t: True)  # the TMA path, its kernels launched plainly:
    monkeypatch.setattr(triton_ops, "USE_PDL", False)
    ref_kv = kv.clone()
    ref = llama.forward_fused(cfg, w, ref_kv, rope, ids, pos, meta)
    monkeypatch.setattr(triton_ops, "USE_PDL", True)
    monkeypatch.setattr(triton_ops, "PDL_EARLY_ROWS", early)
    _assert_replays_equal(lambda c: llama.forward_fused(cfg, w, c, rope, ids, pos, meta), kv, ref, ref_kv)
