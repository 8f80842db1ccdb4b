"""Llama-family decoder (llama, qwen2, qwen3, mistral) as plain functions over a weight dict.

Nothing here is global per model: `forward` takes the config, the weights and the KV cache as
arguments, so one runner can execute any model whose weights are resident. Numerics follow HF
transformers (RMSNorm in fp32 then cast, RoPE tables in fp32) so fp32 logits match to ~1e-5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model_swapper.model_config import ModelConfig
from token_scheduler.model.attention import AttentionMetadata, attend, write_kv
from token_scheduler.model.lora import LoraRows
from tokenpool import env


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    dt = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return w * x.to(dt)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = cfg.rope_scaling
    if not rs:
        return inv
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "linear":
        return inv / rs["factor"]
    if kind == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        lo_wl, hi_wl = old / lo, old / hi
        wl = 2 * math.pi / inv
        out = torch.where(wl > lo_wl, inv / factor, inv)
        smooth = (old / wl - lo) / (hi - lo)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wl < hi_wl) & ~(wl > lo_wl)
        return torch.where(medium, smoothed, out)
    raise ValueError(f"rope scaling {kind!r} is not supported (supported: linear, llama3)")


@dataclass
class RopeCache:
    cos: torch.Tensor  # [max_pos, head_dim] fp32
    sin: torch.Tensor

    @staticmethod
    def build(cfg: ModelConfig, max_pos: int, device) -> RopeCache:
        inv = rope_inv_freq(cfg).to(device)
        freqs = torch.arange(max_pos, device=device, dtype=torch.float32)[:, None] * inv[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return RopeCache(emb.cos(), emb.sin())


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, d]; cos/sin: [T, 1, d] already in x's dtype
    return x * cos + _rotate_half(x) * sin


def _rows(t: torch.Tensor | None, sizes: list[int]):
    """Row slices of a fused weight (or bias): views, no copies. None -> Nones."""
    return t.split(sizes, dim=0) if t is not None else [None] * len(sizes)


def _fresh(meta: AttentionMetadata) -> None:
    """A forward derives its per-step tensors anew (a CUDA graph's capture must record them; its metadata is
    reused with new contents at every replay)."""
    meta.derived.clear()
    if meta.mixed is not None:
        meta.mixed.derived.clear()


def forward(
    cfg: ModelConfig,
    w: dict[str, torch.Tensor],
    kv_cache: torch.Tensor,  # [num_blocks, num_layers, 2, block_size, kv_heads, head_dim]
    rope: RopeCache,
    input_ids: torch.Tensor,  # [T]
    positions: torch.Tensor,  # [T]
    meta: AttentionMetadata,
    lora: LoraRows | None = None,
) -> torch.Tensor:
    """Hidden states after the final norm, [T, hidden]. `lora`: adapters' deltas added to their rows' projections
    (the rows of no adapter run as without it, op for op)."""
    _fresh(meta)
    x = F.embedding(input_ids, w["embed"])
    dt = x.dtype
    cos = rope.cos[positions].to(dt)[:, None, :]
    sin = rope.sin[positions].to(dt)[:, None, :]
    T = input_ids.shape[0]
    H, KVH, D, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
    qkv_split = [cfg.q_size, cfg.kv_size, cfg.kv_size]
    for n in range(cfg.num_layers):
        p = f"l{n}."
        h = rms_norm(x, w[p + "ln1"], eps)
        # q, k, v (and gate, up below) as separate GEMMs over row slices of the fused weights, as HF runs
        # them: a GEMM's rounding depends on its shape (cuBLAS picks the kernel), so bf16 prefill logits
        # follow HF's bit for bit only this way. The fused decode path keeps one GEMM each.
        q, k, v = (F.linear(h, wt, bt) for wt, bt in zip(_rows(w[p + "qkv"], qkv_split),
                                                         _rows(w.get(p + "qkv_b"), qkv_split)))
        if lora is not None:
            lora.add_(n, "qkv", h, [q, k, v])
        q, k, v = q.view(T, H, D), k.view(T, KVH, D), v.view(T, KVH, D)
        if cfg.qk_norm:
            q = rms_norm(q, w[p + "q_norm"], eps)
            k = rms_norm(k, w[p + "k_norm"], eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        write_kv(kv_cache, n, k, v, meta)
        o = attend(q, kv_cache, n, meta, cfg).reshape(T, H * D)
        y = F.linear(o, w[p + "o"])
        if lora is not None:
            lora.add_(n, "o", o, [y])
        x = x + y
        h = rms_norm(x, w[p + "ln2"], eps)
        wg, wu = w[p + "gate_up"].chunk(2, dim=0)
        g, u = F.linear(h, wg), F.linear(h, wu)
        if lora is not None:
            lora.add_(n, "gate_up", h, [g, u])
        a = F.silu(g) * u
        y = F.linear(a, w[p + "down"])
        if lora is not None:
            lora.add_(n, "down", a, [y])
        x = x + y
    return rms_norm(x, w["norm"], eps)


def _qk_norm_fused(cfg, w, p: str, qkv: torch.Tensor) -> torch.Tensor:
    """qwen3's per-head RMSNorm of q and k inside a fused [T, (H+2KVH)*D] qkv, with the fused kernel."""
    from token_scheduler.model import triton_ops as k

    T, D, eps = qkv.shape[0], cfg.head_dim, cfg.rms_norm_eps
    q, kk, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
    q = k.add_rms_norm(q.reshape(T * cfg.num_heads, D), None, w[p + "q_norm"], eps)
    kk = k.add_rms_norm(kk.reshape(T * cfg.num_kv_heads, D), None, w[p + "k_norm"], eps)
    return torch.cat([q.view(T, -1), kk.view(T, -1), v], dim=-1)


def forward_fused(cfg, w, kv_cache, rope, input_ids, positions, meta: AttentionMetadata,
                  lora: LoraRows | None = None) -> torch.Tensor:
    """CUDA path of `forward`: same arithmetic (bit-identical per op), with the elementwise work of a layer
    fused into three Triton kernels (add+RMSNorm, RoPE+KV write, SiLU*mul). One token: the GEMVs (`_forward_gemv`);
    a decode step of 2 to triton_tma.MAX_ROWS rows on Hopper: TMA-fed GEMMs, every kernel under PDL. `lora`: as
    `forward`'s (on cuBLAS: a step with adapter rows takes neither)."""
    from token_scheduler.model import triton_ops as k
    from token_scheduler.model import triton_tma as tma

    _fresh(meta)
    x = F.embedding(input_ids, w["embed"])
    T = input_ids.shape[0]
    if takes_gemv(cfg, x) and lora is None:
        with k.pdl_rows(T):
            return _forward_gemv(cfg, w, kv_cache, rope, x, positions, meta)
    if lora is None and tma.takes(x, meta.decode):  # every kernel of the step launched with PDL (triton_tma)
        with k.pdl_rows(T):
            return _fused_layers(cfg, w, kv_cache, rope, x, positions, meta, None, True)
    return _fused_layers(cfg, w, kv_cache, rope, x, positions, meta, lora, False)


def _fused_layers(cfg, w, kv_cache, rope, x, positions, meta: AttentionMetadata, lora: LoraRows | None,
                  use_tma: bool) -> torch.Tensor:
    """forward_fused's layers from the embeddings `x`: projections on cuBLAS, or (`use_tma`) triton_tma's GEMMs, down's
    split-K partial sums added by the next add+RMSNorm (SiLU*mul its own kernel, or gate_up's epilogue with
    triton_tma.GLU)."""
    from token_scheduler.model import triton_ops as k
    from token_scheduler.model import triton_tma as tma
    from token_scheduler.model.triton_decode import paged_decode

    linear = tma.linear if use_tma else F.linear
    T = x.shape[0]
    H, KVH, D, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
    # a decode step's rows (one new token each, of different sequences): RoPE and the KV write in the attention
    fold_rope = folds_rope(cfg) and meta.decode and meta.own_rows and meta.use_triton
    h = k.add_rms_norm(x, None, w["l0.ln1"], eps)
    for n in range(cfg.num_layers):
        p = f"l{n}."
        qkv = linear(h, w[p + "qkv"], w.get(p + "qkv_b"))
        if lora is not None:
            lora.add_(n, "qkv", h, [qkv])
        if fold_rope:
            o = paged_decode(qkv, kv_cache, n, meta.block_tables, meta.context_lens, D**-0.5, cfg.sliding_window,
                             rope=(rope.cos, rope.sin, positions, meta.slot_blocks, meta.slot_offsets))
        else:
            if cfg.qk_norm:
                qkv = _qk_norm_fused(cfg, w, p, qkv)
            q = k.rope_and_write_kv(qkv, rope.cos, rope.sin, positions, kv_cache, n, meta.slot_blocks,
                                    meta.slot_offsets, H, KVH, D)
            o = attend(q, kv_cache, n, meta, cfg)
        o = o.reshape(T, H * D)
        y = linear(o, w[p + "o"])
        if lora is not None:
            lora.add_(n, "o", o, [y])
        h = k.add_rms_norm(x, y, w[p + "ln2"], eps)
        if use_tma:  # down's partial sums: the add+RMSNorm below adds them
            a = tma.linear(h, w[p + "gate_up"], glu=True) if tma.GLU else k.silu_mul(tma.linear(h, w[p + "gate_up"]))
            m = tma.linear(a, w[p + "down"], parts=True)
        else:
            m = _mlp(w, p, h, lora, n)
        nxt = w[f"l{n + 1}.ln1"] if n + 1 < cfg.num_layers else w["norm"]
        h = k.add_rms_norm(x, m, nxt, eps)
    return h


# One token (a batch-1 decode step, or a one-row prefill): the projections run as Triton GEMVs with the
# add+RMSNorm, SiLU*mul and RoPE+KV write folded in (triton_gemv), 6 kernels per layer instead of 11.
# TOKENPOOL_GEMV=0: off. On the H100 it took qwen2-1.5b's batch-1 step from 2.01 to 1.68 ms. Without
# programmatic dependent launch, small models only: a 7B step went from 5.87 to 5.97 ms; with it, 5.76 to 5.56.
# Up to GEMV_MAX_ROWS tokens (small decode batches, short prefill chunks) a projection is still a weight stream,
# which cuBLAS is far from at these sizes (H200, qwen2-1.5b batch 8: o 134 us a step against a 31 us floor):
# `gemv_rows` loads each weight tile once for all rows, with the same folds, and these steps launch with
# programmatic dependent launch too. Correct on the H200 (tests/test_gpu_engine.py) but not yet faster, so off
# by default (TOKENPOOL_GEMV_ROWS=32: on). At a4cf912 with the untuned default blocks, graph replay against
# cuBLAS: 1.5B batch 8 3.35 vs 1.77 ms, batch 32 3.73 vs 2.09; 7B batch 8 11.5 vs 4.61. A batch-8 sweep cut
# the 1.5B's to 1.90 ms by tuning gate_up and down alone, the widest row block it tried winning
# (bench/results/small_batch_gemv_h200_a4cf912.json); the default blocks follow that now (rows_config_for): at
# 9116b98 batches 2/4/8 2.09/1.90/2.13 ms against cuBLAS's 1.64/1.66/1.66 (small_batch_gemv_swap_h200_9116b98.json).
USE_GEMV = env.GEMV.on()
GEMV_MAX_HIDDEN = 2048  # without programmatic dependent launch
GEMV_ROPE = True  # RoPE+KV write in the qkv GEMV's epilogue (False: the separate kernel; for A/B runs)
GEMV_MAX_ROWS = env.GEMV_ROWS.integer()
# Where the small-batch kernels lost at a4cf912 (H200, 1.5B batch 8): cuBLAS's gate_up and down ran at 73% and 58%
# of the HBM rate, its qkv and o at 27% and 23%, and the add+RMSNorm, RoPE and SiLU*mul kernels between them took
# 183 us of a 1.69 ms step (bench/results/decode_profile_h200_ab4be3b.json). GEMV_ROWS_MLP False: qkv (with the norm
# and RoPE folded in) and o through gemv_rows, gate_up and down on cuBLAS -- the small projections and two of the
# elementwise kernels without the large ones the Triton kernels lose (TOKENPOOL_GEMV_ROWS_MLP=0). Measured with qkv and
# o tuned (f4155ff, small_batch_qkv_o_sweep_h200_f4155ff.json): 1.5B batches 2/4/8 1.58/1.58/1.64 ms against cuBLAS's
# 1.60/1.61/1.61 -- too small a gain to turn on, and the 7B lost at batch 8 (5.44 vs 4.49).
GEMV_ROWS_MLP = env.GEMV_ROWS_MLP.on()
# One token: down's prologue recomputes SiLU*mul over all of gate|up for every weight tile of every program (the 7B's
# down: 896 programs, each reading 2 x 18944 values and taking as many exps), where its weight stream is furthest from
# the floor of the batch-1 projections (1.19x for the 7B, 1.80x for the 1.5B; diag_persist ramp, 457a2c1). GEMV_GLU:
# gate_up's programs own gate row i beside up row I + i and store silu(gate) * up once ([1, I]); down is then a plain
# GEMV. The same roundings in the same order: bit-identical to SiLU*mul in down's prologue. H100 (acee670, diag_gpu
# step, graph replay at context 512, against the prologue before and after in the same run): batch-1 steps 1.5B
# 1.385/1.373 -> 1.343 ms (0.97), 7B 4.920/4.921 -> 4.892 (0.994); down's blocks re-swept with it: the table's still
# best (bench/results/gemv_glu_h100_acee670.json). On by default (TOKENPOOL_GEMV_GLU=0: the prologue).
# Tried beside it and removed: asking L2 (cp.async.bulk.prefetch.L2, one launch of one-warp programs under PDL after
# each qkv projection) for the o weights and the first MB of gate_up's while the attention and its combine leave HBM
# idle. Every amount made batch-1 steps slower (1.5B 1.385 -> 1.430 ms for o alone, 1.459 with 32 MB of gate_up; 7B
# 4.920 -> 5.035 / 5.255) and the 1.5B's batch 8 on the TMA GEMMs too (1.709 -> 1.769 / 1.824): the launch between the
# qkv projection and the attention lengthens the chain, and the fill's traffic slows the demand loads it races.
GEMV_GLU = env.GEMV_GLU.on()
# Batched decode steps on cuBLAS (2 to 32 sequences) spend a launch a layer on RoPE and the KV write between the qkv
# GEMM and the attention: the H200 profile of a 1.5B batch-8 step has it at 61.5 us of 1.69 ms, the 7B's 66 us of
# 4.53 ms (bench/results/decode_profile_h200_ab4be3b.json). ATTN_ROPE: the paged-decode kernel does that job itself
# (triton_decode.paged_decode's `rope`), reading q, k and v from the qkv projection. The simulator puts 40 models
# (16x7B + 24x1.5B) at the knee: 87.4% on seed 0 as served, 98.8% with the 1.5B step 0.2 ms shorter or the 7B's 5%
# (bench/results/sim_levers_models40_rowgraph_120s_*.json). Measured on the H200 (diag_gpu step, context 512, with
# the paged decode's 4 blocks an iteration and 8 warps; 5a1fec0, attn_rope_h200_5a1fec0.json): 7B batches 8/32/64
# 0.99 of the unfolded step (batch 32: 4.741 -> 4.693 ms, 1.23x its floor with the KV bytes), 1.5B 0.97-0.98. On by
# default since session 38 (TOKENPOOL_ATTN_ROPE=0: off). Served with it (64348ae): 10 models on 60 GB at 1.44
# req/s/model 100% from a cold start; 40 models at 0.1 97.1% on seed 0 (bench/results/serve_h200_*_64348ae_*.json).
ATTN_ROPE = env.ATTN_ROPE.on()


def takes_gemv(cfg: ModelConfig, x: torch.Tensor) -> bool:
    """Whether `forward_fused` runs the step of hidden states `x` ([tokens, hidden]) through the Triton GEMVs (RoPE
    in the qkv epilogue) rather than cuBLAS."""
    from token_scheduler.model import triton_ops as k

    return (USE_GEMV and x.shape[0] <= max(1, GEMV_MAX_ROWS)
            and (cfg.hidden_size <= GEMV_MAX_HIDDEN or k.pdl_capable(x)))


def folds_rope(cfg: ModelConfig) -> bool:
    """Whether this model's batched decode steps run RoPE and the KV write in the attention (ATTN_ROPE; not with
    q/k norms, which come between the projection and RoPE)."""
    return ATTN_ROPE and not cfg.qk_norm


def _mlp(w, p: str, h: torch.Tensor, lora: LoraRows | None = None, n: int = 0) -> torch.Tensor:
    """Layer `p`'s MLP on cuBLAS, SiLU*mul in Triton: down(silu(gate) * up) of the normed `h` (with `lora`: layer
    `n`'s adapter deltas added to gate|up and down)."""
    from token_scheduler.model import triton_ops as k

    if lora is None:
        return F.linear(k.silu_mul(F.linear(h, w[p + "gate_up"])), w[p + "down"])
    gu = F.linear(h, w[p + "gate_up"])
    lora.add_(n, "gate_up", h, [gu])
    a = k.silu_mul(gu)
    y = F.linear(a, w[p + "down"])
    lora.add_(n, "down", a, [y])
    return y


def _forward_gemv(cfg, w, kv_cache, rope, x, positions, meta: AttentionMetadata) -> torch.Tensor:
    from token_scheduler.model import triton_ops as k
    from token_scheduler.model.triton_gemv import MODE_NORM, MODE_SILU, RopeKV, gemv, gemv_rows

    T = x.shape[0]
    proj = gemv if T == 1 else gemv_rows
    H, KVH, D, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
    r = None  # the residual stream is x + r: each add is folded into the next normed projection
    for n in range(cfg.num_layers):
        p = f"l{n}."
        # RoPE and the KV write in the qkv projection's epilogue, unless q/k are normed first (qwen3)
        rk = None
        if GEMV_ROPE and not cfg.qk_norm:
            rk = RopeKV(rope.cos, rope.sin, positions, kv_cache, n, meta.slot_blocks, meta.slot_offsets, H, KVH, D)
        qkv, x_new = proj(x, w[p + "qkv"], w.get(p + "qkv_b"), mode=MODE_NORM, r=r, norm_w=w[p + "ln1"], eps=eps,
                          rope=rk)
        x = x if x_new is None else x_new
        if rk is not None:
            q = qkv
        else:
            if cfg.qk_norm:
                qkv = _qk_norm_fused(cfg, w, p, qkv)
            q = k.rope_and_write_kv(qkv, rope.cos, rope.sin, positions, kv_cache, n, meta.slot_blocks,
                                    meta.slot_offsets, H, KVH, D)
        o, _ = proj(attend(q, kv_cache, n, meta, cfg).reshape(T, H * D), w[p + "o"])
        if T == 1 and GEMV_GLU:  # SiLU*mul in gate_up's epilogue: down reads [1, I], not [1, 2I], and no exp
            act, x = gemv(x, w[p + "gate_up"], mode=MODE_NORM, r=o, norm_w=w[p + "ln2"], eps=eps, glu=True)
            r, _ = gemv(act, w[p + "down"])
        elif T == 1:
            gu, x = gemv(x, w[p + "gate_up"], mode=MODE_NORM, r=o, norm_w=w[p + "ln2"], eps=eps)
            r, _ = gemv(gu, w[p + "down"], mode=MODE_SILU)
        elif GEMV_ROWS_MLP:  # SiLU*mul in gate_up's epilogue (see triton_gemv)
            act, x = gemv_rows(x, w[p + "gate_up"], mode=MODE_NORM, r=o, norm_w=w[p + "ln2"], eps=eps, glu=True)
            r, _ = gemv_rows(act, w[p + "down"])
        else:  # the MLP on cuBLAS, as forward_fused's (x += o in place: x is this step's own tensor)
            r = _mlp(w, p, k.add_rms_norm(x, o, w[p + "ln2"], eps))
    return k.add_rms_norm(x, r, w["norm"], eps)


def compute_logits(w: dict[str, torch.Tensor], hidden: torch.Tensor, fp32: bool = True) -> torch.Tensor:
    """The LM head's logits, in fp32 (`fp32` False: in the model dtype, upcast later by whoever needs fp32 -- the
    same values; the sampler's greedy argmax does not)."""
    y = F.linear(hidden, w.get("lm_head", w["embed"]))
    return y.float() if fp32 else y
