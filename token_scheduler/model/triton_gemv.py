"""Batch-1 decode matmuls as Triton GEMVs with the layer's elementwise work folded in.

At one token per step a projection is a pure weight stream (y = W x, W [N, K] row-major), and on a 1.5B model
the small kernels between the four projections of a layer (add+RMSNorm twice, SiLU*mul, cuBLAS's split-K
reduce) cost about as much as the smallest projections themselves. Here each projection is one kernel:

- MODE_PLAIN: y = W x (+ bias)
- MODE_NORM:  y = W rmsnorm(x + r) (+ bias); program 0 also writes the new residual x + r to `x_out`
  (out of place: every program reads x and r, so none may overwrite them)
- MODE_SILU:  y = W (silu(gu[:K]) * gu[K:])

Rounding follows the eager ops (`forward`): the residual sum, the normalised vector, its product with the
norm weight, silu and the product with `up` are each rounded to the model dtype; the dot product itself is
summed in fp32 in another order than cuBLAS, so results match the eager path to rounding, not bit for bit
(the engine's `hf_exact` mode is the bit-exact path).

With `rope` (the qkv projection) the epilogue also does `rope_and_write_kv`'s job: each program owns the same
offsets of both halves of one head, rotates q and k, returns q and writes k and v into the paged cache.

On Hopper the kernel is launched with programmatic dependent launch (triton_ops.pdl) and loads its first weight
tile before waiting for the kernel before it.

Each program owns BLOCK_N output rows and streams them along K. Block sizes come from `config_for`
(tuned on an H100 in the decode graph: `python -m load_tests.diag_gpu step-sweep --model DIR`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from token_scheduler.model.triton_ops import pdl, pdl_enter, rope_pair

MODE_PLAIN, MODE_NORM, MODE_SILU = 0, 1, 2


@dataclass
class RopeKV:
    """What the qkv projection needs to finish the job of `rope_and_write_kv` in its epilogue (one token)."""
    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor  # [1]
    kv: torch.Tensor  # the paged cache [NB, L, 2, BS, KVH, D]
    layer: int
    slot_blocks: torch.Tensor  # [1]
    slot_offsets: torch.Tensor  # [1]
    heads: int
    kv_heads: int
    head_dim: int


@triton.jit
def _x_tile(X, R, NW, cols, km, inv, K: tl.constexpr, MODE: tl.constexpr, HAS_R: tl.constexpr, dt):
    """The projection's input over columns `cols`, in fp32, after the mode's prologue."""
    if MODE == 0:
        xv = tl.load(X + cols, mask=km, other=0.0).to(tl.float32)
    elif MODE == 1:
        x = tl.load(X + cols, mask=km, other=0.0)
        if HAS_R:
            x = (x.to(tl.float32) + tl.load(R + cols, mask=km, other=0.0).to(tl.float32)).to(dt)
        y = (x.to(tl.float32) * inv).to(dt)
        nw = tl.load(NW + cols, mask=km, other=0.0)
        xv = (nw.to(tl.float32) * y.to(tl.float32)).to(dt).to(tl.float32)
    else:
        g = tl.load(X + cols, mask=km, other=0.0).to(tl.float32)
        u = tl.load(X + K + cols, mask=km, other=0.0).to(tl.float32)
        a = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        xv = (a * u).to(dt).to(tl.float32)
    return xv


@triton.jit
def _gemv_kernel(X, R, NW, XOUT, W, B, Y, eps, N, K: tl.constexpr, MODE: tl.constexpr, HAS_R: tl.constexpr,
                 HAS_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
                 ROPE: tl.constexpr, COS, SIN, POS, KV, SB, SO, s_kvb, s_kvt, s_kvh, off_k, off_v,
                 H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr):
    pid = tl.program_id(0)
    dt = Y.dtype.element_ty
    kk = tl.arange(0, BLOCK_K)
    if ROPE:  # rows [BLOCK_N // 2, 2]: the same offsets j of both halves of one head, so RoPE pairs meet here
        HALF: tl.constexpr = D // 2
        PAIRS: tl.constexpr = BLOCK_N // 2
        head = pid // (HALF // PAIRS)
        i = (pid % (HALF // PAIRS)) * PAIRS + tl.arange(0, PAIRS)
        rows = head * D + tl.arange(0, 2)[None, :] * HALF + i[:, None]
        rmask = rows < N
        wp = W + rows[:, :, None].to(tl.int64) * K + kk[None, None, :]
        wmask = rmask[:, :, None]
    else:
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        wp = W + rows[:, None].to(tl.int64) * K + kk[None, :]
        wmask = rmask[:, None]
    # The first weight tile is loaded before waiting on the previous kernel: no kernel writes weights.
    w = tl.load(wp, mask=wmask & (kk < K)[None, :], other=0.0)
    pdl_enter(PDL)
    inv = 0.0
    if MODE == 1:  # rms of (x + r), rounded to the model dtype as the residual stream is
        ss = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + kk
            km = cols < K
            x = tl.load(X + cols, mask=km, other=0.0)
            if HAS_R:
                x = (x.to(tl.float32) + tl.load(R + cols, mask=km, other=0.0).to(tl.float32)).to(dt)
                if pid == 0:
                    tl.store(XOUT + cols, x, mask=km)
            xf = x.to(tl.float32)
            ss += xf * xf
        inv = tl.math.rsqrt(tl.sum(ss, 0) / K + eps)
    acc = w.to(tl.float32) * _x_tile(X, R, NW, kk, kk < K, inv, K, MODE, HAS_R, dt)[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        cols = k0 + kk
        km = cols < K
        w = tl.load(wp + k0, mask=wmask & km[None, :], other=0.0)
        acc += w.to(tl.float32) * _x_tile(X, R, NW, cols, km, inv, K, MODE, HAS_R, dt)[None, :]
    if ROPE:
        out = tl.sum(acc, 2)
    else:
        out = tl.sum(acc, 1)
    if HAS_B:
        out += tl.load(B + rows, mask=rmask, other=0.0).to(tl.float32)
    if ROPE:  # as rope_and_write_kv on the stored projection: q out, k rotated and v into the cache
        x1, x2 = tl.split(out.to(dt).to(tl.float32))
        if head < H + KVH:
            y1, y2 = rope_pair(x1, x2, COS, SIN, tl.load(POS), i, D, HALF, dt)
        else:
            y1, y2 = x1.to(dt), x2.to(dt)
        if head < H:
            tl.store(Y + head * D + i, y1)
            tl.store(Y + head * D + HALF + i, y2)
        else:
            kb = KV + tl.load(SB).to(tl.int64) * s_kvb + tl.load(SO).to(tl.int64) * s_kvt
            if head < H + KVH:
                kb += (head - H) * s_kvh + off_k
            else:
                kb += (head - H - KVH) * s_kvh + off_v
            tl.store(kb + i, y1)
            tl.store(kb + HALF + i, y2)
    else:
        tl.store(Y + rows, out.to(dt), mask=rmask)


# (BLOCK_N, BLOCK_K, num_warps) by weight shape [N, K], tuned on an H100 in the batch-1 decode graphs of
# qwen2-1.5b and qwen2-7b (diag_gpu step-sweep: 1.487 -> 1.464 and 5.563 -> 5.198 ms a replay). Timing one
# projection back to back (diag_gpu gemv-triton) picks differently: under programmatic dependent launch the next
# kernel may start only once every program of this one has, so few fat programs (o: 48 of them) can beat many
# quick ones. Other shapes get (4, 1024, 8), within 6% of the best on every shape timed alone.
_CONFIGS: dict[tuple[int, int], tuple[int, int, int]] = {
    (2048, 1536): (8, 1024, 4), (1536, 1536): (32, 512, 8), (17920, 1536): (16, 512, 8), (1536, 8960): (4, 1024, 8),
    (4608, 3584): (8, 512, 8), (3584, 3584): (2, 1024, 4), (37888, 3584): (16, 512, 8), (3584, 18944): (4, 512, 8),
}


_ROPE_ARGS = ("COS", "SIN", "POS", "KV", "SB", "SO", "s_kvb", "s_kvt", "s_kvh", "off_k", "off_v")


def config_for(n: int, k: int) -> tuple[int, int, int]:
    c = _CONFIGS.get((n, k))
    if c is not None:
        return c
    return (4, 1024, 8) if k >= 1024 else (4, 256, 4)


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *, mode: int = MODE_PLAIN,
         r: torch.Tensor | None = None, norm_w: torch.Tensor | None = None, eps: float = 0.0,
         config: tuple[int, int, int] | None = None, rope: RopeKV | None = None
         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x: [1, K] ([1, 2K] for MODE_SILU); w: [N, K]. Returns (y [1, N], new residual x + r or None).
    With `rope` (w is a fused qkv): y is q after RoPE, [1, H, D], and k (after RoPE) and v go into the cache."""
    n, k = w.shape
    want = 2 * k if mode == MODE_SILU else k
    if x.shape != (1, want) or not x.is_contiguous() or not w.is_contiguous():
        raise ValueError(f"gemv: x {tuple(x.shape)} for w {tuple(w.shape)} (mode {mode}); needs [1, {want}], "
                         "contiguous")
    x_out = torch.empty_like(x) if (mode == MODE_NORM and r is not None) else None
    bn, bk, nw = config or config_for(n, k)
    if rope is None:
        y = torch.empty(1, n, device=x.device, dtype=x.dtype)
        ropeargs = (x,) * 6 + (0,) * 5  # unused
        H = KVH = D = 1
    else:
        H, KVH, D = rope.heads, rope.kv_heads, rope.head_dim
        if n != (H + 2 * KVH) * D:
            raise ValueError(f"gemv: rope needs a fused qkv weight of {(H + 2 * KVH) * D} rows, got {n}")
        bn = min(max(bn, 2), D)  # RoPE pairs: an even number of rows per program, within one head
        if D % bn:
            raise ValueError(f"gemv: rope needs a head_dim divisible by the row block, got {D} and {bn}")
        y = torch.empty(1, H, D, device=x.device, dtype=x.dtype)
        kv = rope.kv
        s_kvb, s_kvl, s_kv2, s_kvt, s_kvh, _ = kv.stride()
        ropeargs = (rope.cos, rope.sin, rope.positions, kv, rope.slot_blocks, rope.slot_offsets,
                    s_kvb, s_kvt, s_kvh, rope.layer * s_kvl, rope.layer * s_kvl + s_kv2)
    _gemv_kernel[(triton.cdiv(n, bn),)](
        x, r if r is not None else x, norm_w if norm_w is not None else x, x_out if x_out is not None else x,
        w, bias if bias is not None else w, y, eps, n, K=k, MODE=mode, HAS_R=r is not None,
        HAS_B=bias is not None, BLOCK_N=bn, BLOCK_K=bk, PDL=pdl(x), ROPE=rope is not None,
        **dict(zip(_ROPE_ARGS, ropeargs)), H=H, KVH=KVH, D=D, num_warps=nw, launch_pdl=pdl(x))
    return y, x_out
