"""Small-batch decode matmuls as Triton GEMVs with the layer's elementwise work folded in.

At a few tokens per step a projection is a pure weight stream (y = W x, W [N, K] row-major), and on a 1.5B model
the small kernels between the four projections of a layer (add+RMSNorm twice, SiLU*mul, cuBLAS's split-K
reduce) cost about as much as the smallest projections themselves. Here each projection is one kernel:

- MODE_PLAIN: y = W x (+ bias)
- MODE_NORM:  y = W rmsnorm(x + r) (+ bias); program 0 also writes the new residual x + r to `x_out`
  (out of place: every program reads x and r, so none may overwrite them)
- MODE_SILU:  y = W (silu(gu[:K]) * gu[K:])  (one token, llama.GEMV_GLU off; by default `gemv`'s `glu` and
  `gemv_rows` do SiLU*mul in gate_up's epilogue)

MODE_NORM's scale is computed first, in a pass over x + r before the main loop. Applying it after the dot
instead (W (nw x) / rms: x + r read once, its squares summed in the main loop) measured slower everywhere on the
H200 at 0ca23f1 (`diag_gpu step`): qwen2-7b batch 1 3.96 -> 4.29 ms, qwen2-1.5b 1.273 -> 1.282 ms, and the
small-batch path 2.18 -> 4.01 ms (1.5B batch 8): the first pass leaves x and r in L1, where the main loop's
input loads, which are not pipelined like the weight tiles, then hit.

The same broadcast multiply with a token axis for 2-8 tokens (the one-token kernel's folds per row, partial
products [M, BLOCK_N, BLOCK_K]) measured slower than cuBLAS in the decode graph on the H200 at d8ac9e9 at every
batch, tuned per shape (`bench/results/small_batch_few_gemv_h200_d8ac9e9.json`): qwen2-1.5b batch 2/4/8 1.83/2.47/
4.08 ms against 1.62/1.65/1.66, qwen2-7b 6.28/8.19/15.9 against 4.30/4.35/4.48. The per-tile input prologue (x + r,
the norm weight, rounding) is redone for each token and amortised over only BLOCK_N weight rows, which with M FMAs
a weight element makes it instruction-bound (1.5B gate_up at 2 tokens 28.8 us against cuBLAS+norm 20.8); it won
only the small 1.5B projections alone (o 2.9 against 6.1 us). Removed; not to be tried again in that form.

Rounding follows the eager ops (`forward`): the residual sum, the normalised vector, its product with the
norm weight, silu and the product with `up` are each rounded to the model dtype; the dot product itself is
summed in fp32 in another order than cuBLAS, so results match the eager path to rounding, not bit for bit
(the engine's `hf_exact` mode is the bit-exact path).

With `rope` (the qkv projection) the epilogue also does `rope_and_write_kv`'s job: each program owns the same
offsets of both halves of one head, rotates q and k, returns q and writes k and v into the paged cache.

On Hopper the kernels are launched with programmatic dependent launch (triton_ops.pdl) and load their first
weight tile before waiting for the kernel before them. Asking L2 for more of a program's rows there (one
cp.async.bulk.prefetch.L2 of its first 16 KB, 64 KB or all of them) made every batch-1 step slower on the H200 at
e321261 (1.5B 1.242 -> 1.295/1.370/1.364 ms, 7B 3.893 -> 4.006/4.498/4.779;
bench/results/gemv_l2_prefetch_h200_e321261.json): the ~3 us a kernel above the weight stream is not idle HBM an
early fill could use. Not kept. Nor is a second tile in flight a program: the loop is not software-pipelined (no
tl.dot; no async copies at any num_stages), and keeping the next tile's load in flight while multiplying the current
one (bit-identical) made the batch-1 step 10% (1.5B, 1.233 -> 1.355 ms) and 14% (7B, 3.909 -> 4.463) slower on the
H200 at d2f2a91, its registers costing programs an SM (gemv_next_tile_h200_d2f2a91.json). Removed.

`gemv` takes one token: each program owns BLOCK_N output rows and streams them along K, a broadcast multiply.
Block sizes come from `config_for` (tuned in the decode graph, on an H100 then the H200:
`python -m load_tests.diag_gpu step-sweep --model DIR`). `gemv_rows` takes 2..GEMV_MAX_ROWS tokens (see there).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from token_scheduler.model.triton_ops import pdl, pdl_arg, pdl_enter, rope_pair
from tokenpool import env

MODE_PLAIN, MODE_NORM, MODE_SILU = 0, 1, 2


@dataclass
class RopeKV:
    """What the qkv projection needs to finish the job of `rope_and_write_kv` in its epilogue."""
    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor  # [T]
    kv: torch.Tensor  # the paged cache [NB, L, 2, BS, KVH, D]
    layer: int
    slot_blocks: torch.Tensor  # [T]
    slot_offsets: torch.Tensor  # [T]
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
def rms_inv(X, R, XOUT, pid, eps, K: tl.constexpr, BLOCK_K: tl.constexpr, HAS_R: tl.constexpr, dt):
    """MODE_NORM's scale: 1 / rms of (x + r), that sum rounded to the model dtype as the residual stream is; program 0
    writes it to XOUT (the new residual)."""
    kk = tl.arange(0, BLOCK_K)
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
    return tl.math.rsqrt(tl.sum(ss, 0) / K + eps)


@triton.jit
def _gemv_kernel(X, R, NW, XOUT, W, B, Y, eps, N, K: tl.constexpr, MODE: tl.constexpr, HAS_R: tl.constexpr,
                 HAS_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
                 ROPE: tl.constexpr, COS, SIN, POS, KV, SB, SO, s_kvb, s_kvt, s_kvh, off_k, off_v,
                 H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, NORM_BLOCK: tl.constexpr,
                 GLU: tl.constexpr = False):
    pid = tl.program_id(0)
    dt = Y.dtype.element_ty
    kk = tl.arange(0, BLOCK_K)
    if GLU:  # rows [BLOCK_N // 2, 2]: gate row i beside up row N/2 + i, so SiLU*mul pairs meet here
        PAIRS_G: tl.constexpr = BLOCK_N // 2
        i = pid * PAIRS_G + tl.arange(0, PAIRS_G)
        rows = tl.arange(0, 2)[None, :] * (N // 2) + i[:, None]
        rmask = (i[:, None] < N // 2) & (tl.arange(0, 2)[None, :] < 2)
        wp = W + rows[:, :, None].to(tl.int64) * K + kk[None, None, :]
        wmask = rmask[:, :, None]
    elif ROPE:  # rows [BLOCK_N // 2, 2]: the same offsets j of both halves of one head, so RoPE pairs meet here
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
    if MODE == 1:
        inv = rms_inv(X, R, XOUT, pid, eps, K, NORM_BLOCK, HAS_R, dt)
    acc = w.to(tl.float32) * _x_tile(X, R, NW, kk, kk < K, inv, K, MODE, HAS_R, dt)[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        cols = k0 + kk
        km = cols < K
        w = tl.load(wp + k0, mask=wmask & km[None, :], other=0.0)
        acc += w.to(tl.float32) * _x_tile(X, R, NW, cols, km, inv, K, MODE, HAS_R, dt)[None, :]
    if ROPE or GLU:
        out = tl.sum(acc, 2)
    else:
        out = tl.sum(acc, 1)
    if HAS_B:
        out += tl.load(B + rows, mask=rmask, other=0.0).to(tl.float32)
    if GLU:  # as MODE_SILU's prologue on the stored projection: silu(gate) * up, each rounded to the model dtype
        g, u = tl.split(out.to(dt).to(tl.float32))
        a = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        tl.store(Y + i, (a * u).to(dt), mask=i < N // 2)
    elif ROPE:  # as rope_and_write_kv on the stored projection: q out, k rotated and v into the cache
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


# (BLOCK_N, BLOCK_K, num_warps) by weight shape [N, K], tuned in the batch-1 decode graphs of qwen2-1.5b and qwen2-7b
# (diag_gpu step-sweep: each projection's config varied in turn, the graph's replay timed). Timing one projection back
# to back (diag_gpu gemv-triton) picks differently: under programmatic dependent launch the next kernel may start only
# once every program of this one has, so how many programs fit in one wave matters beside a program's own speed (the
# 7B's qkv at (8, 512, 8): 576 programs of 63 registers, 4 an SM, a second wave of 48; at 4 warps one wave). Other
# shapes get (4, 1024, 8), within 6% of the best on every shape timed alone (H100). First tuned on an H100; re-tuned on
# the H200 at d70701b/bf69dbe with K tiles up to 2048 and NORM_ONE_PASS on (gemv_sweep_h200_cfa166b.json): 1.5B o and
# down, replay 1.1794 -> 1.1478 ms; 7B qkv, o and gate_up, 3.8644 -> 3.7662 ms; a second pass from there moved nothing
# beyond noise.
_CONFIGS: dict[tuple[int, int], tuple[int, int, int]] = {
    (2048, 1536): (8, 1024, 4), (1536, 1536): (4, 2048, 8), (17920, 1536): (16, 512, 8), (1536, 8960): (4, 2048, 4),
    (4608, 3584): (8, 512, 4), (3584, 3584): (8, 512, 8), (37888, 3584): (8, 512, 4), (3584, 18944): (4, 512, 8),
}


_ROPE_ARGS = ("COS", "SIN", "POS", "KV", "SB", "SO", "s_kvb", "s_kvt", "s_kvh", "off_k", "off_v")


# MODE_NORM's scale pass walks x + r after the PDL wait, one dependent round trip a tile, before any weight tile past
# the first is multiplied. NORM_ONE_PASS: the pass loads all of x + r at once (K up to 8192), one round trip, instead
# of BLOCK_K tiles (the 7B's K = 3584 at BLOCK_K 512: 7); the sum of squares is added in another order (results agree
# to rounding, not bit for bit). Alone, the 7B's qkv (then 576 programs, a wave and 48 more at 4 an SM) ran 4.7 us
# above its weight stream and its gate_up (six waves) 0.5 (diag_persist ramp, 457a2c1). In the batch-1 step
# (diag_gpu step, graph replay, context 512, H200, 0dbf991, norm_one_pass_h200_0dbf991.json): 1.5B 1.186/1.191 ->
# 1.174 ms (0.987), 7B 3.844/3.844 -> 3.820 (0.994), against the default measured before and after in the same run.
# On; False: the tiled pass.
NORM_ONE_PASS = True


def _norm_block(k: int, bk: int) -> int:
    """The MODE_NORM scale pass's tile along K: all of it at once with NORM_ONE_PASS (up to 8192), else BLOCK_K."""
    kp = triton.next_power_of_2(k)
    return kp if NORM_ONE_PASS and kp <= 8192 else bk


def config_for(n: int, k: int) -> tuple[int, int, int]:
    c = _CONFIGS.get((n, k))
    if c is not None:
        return c
    return (4, 1024, 8) if k >= 1024 else (4, 256, 4)


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *, mode: int = MODE_PLAIN,
         r: torch.Tensor | None = None, norm_w: torch.Tensor | None = None, eps: float = 0.0,
         config: tuple[int, int, int] | None = None, rope: RopeKV | None = None, glu: bool = False
         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x: [1, K] ([1, 2K] for MODE_SILU); w: [N, K]. Returns (y [1, N], new residual x + r or None).
    With `rope` (w is a fused qkv): y is q after RoPE, [1, H, D], and k (after RoPE) and v go into the cache.
    With `glu` (w is a fused gate|up, N even): y is silu(gate) * up, [1, N / 2] -- what MODE_SILU's prologue computes
    from the stored projection, to the bit (GEMV_GLU)."""
    n, k = w.shape
    want = 2 * k if mode == MODE_SILU else k
    if x.shape != (1, want) or not x.is_contiguous() or not w.is_contiguous():
        raise ValueError(f"gemv: x {tuple(x.shape)} for w {tuple(w.shape)} (mode {mode}); needs [1, {want}], "
                         "contiguous")
    if glu and (rope is not None or n % 2):
        raise ValueError(f"gemv: glu needs a fused gate|up weight of an even number of rows and no rope, got {n}")
    x_out = torch.empty_like(x) if (mode == MODE_NORM and r is not None) else None
    bn, bk, nw = config or config_for(n, k)
    if glu:
        bn = max(bn, 2)  # SiLU*mul pairs: an even number of rows per program (block sizes are powers of 2)
        y = torch.empty(1, n // 2, device=x.device, dtype=x.dtype)
    elif rope is None:
        y = torch.empty(1, n, device=x.device, dtype=x.dtype)
    else:
        bn = min(max(bn, 2), rope.head_dim)  # RoPE pairs: an even number of rows per program, within one head
        y = torch.empty(1, rope.heads, rope.head_dim, device=x.device, dtype=x.dtype)
    _gemv_kernel[(triton.cdiv(n, bn),)](
        x, r if r is not None else x, norm_w if norm_w is not None else x, x_out if x_out is not None else x,
        w, bias if bias is not None else w, y, eps, n, K=k, MODE=mode, HAS_R=r is not None,
        HAS_B=bias is not None, BLOCK_N=bn, BLOCK_K=bk, PDL=pdl_arg(x), ROPE=rope is not None,
        **_rope_args(rope, n, bn, x), NORM_BLOCK=_norm_block(k, bk) if mode == MODE_NORM else bk, GLU=glu,
        num_warps=nw, launch_pdl=pdl(x))
    return y, x_out


def _rope_args(rope: RopeKV | None, n: int, bn: int, x: torch.Tensor) -> dict:
    """The RoPE epilogue's kernel arguments (placeholders without `rope`), checked against the weight's rows."""
    if rope is None:
        return dict(zip(_ROPE_ARGS, (x,) * 6 + (0,) * 5), H=1, KVH=1, D=1)
    H, KVH, D = rope.heads, rope.kv_heads, rope.head_dim
    if n != (H + 2 * KVH) * D:
        raise ValueError(f"gemv: rope needs a fused qkv weight of {(H + 2 * KVH) * D} rows, got {n}")
    if D % bn:
        raise ValueError(f"gemv: rope needs a head_dim divisible by the row block, got {D} and {bn}")
    kv = rope.kv
    s_kvb, s_kvl, s_kv2, s_kvt, s_kvh, _ = kv.stride()
    args = (rope.cos, rope.sin, rope.positions, kv, rope.slot_blocks, rope.slot_offsets,
            s_kvb, s_kvt, s_kvh, rope.layer * s_kvl, rope.layer * s_kvl + s_kv2)
    return dict(zip(_ROPE_ARGS, args), H=H, KVH=KVH, D=D)


# -- several tokens ---------------------------------------------------------------------------------------------
# `gemv_rows`: each program owns BLOCK_N weight rows, streams them along K and multiplies each weight tile by the
# same columns of all M rows of x: tl.dot(x [M_PAD, BLOCK_K], w [BLOCK_N, BLOCK_K]^T), fp32 accumulation. A
# broadcast multiply as in `gemv` would hold M_PAD x BLOCK_N x BLOCK_K products in registers; the dot holds
# M_PAD x BLOCK_N sums, and with tl.dot Triton pipelines the tile loads (num_stages: cp.async in the sm_90 code;
# bf16 dots on mma.sync, fp32 ones on FMAs). tl.dot needs 16 rows at least: M is padded to M_PAD (masked rows
# load nothing and store nothing).
#
# Every program re-reads its input rows (x, r and the norm weight; twice in MODE_NORM: the rms pass, then the
# tiles), from L2: M x K per program against BLOCK_N x K of weights, so BLOCK_N bounds that traffic at
# M / BLOCK_N of the weights' and grows with M. For the same reason SiLU*mul is not down's prologue here, as it
# is in `gemv`, but gate_up's epilogue (`glu`): down then re-reads [M, I], not [M, 2I].


@triton.jit
def rows_rms(X, R, XOUT, m, mm, kk, pid, eps, K: tl.constexpr, BLOCK_K: tl.constexpr, HAS_R: tl.constexpr, dt):
    """Per row m: 1 / rms of (x + r), the sum rounded to the model dtype as the residual stream is (program 0
    writes it out as the new residual). A pass over x + r before the projection's main loop, which also leaves
    them in L1 for it (see the module docstring)."""
    ss = tl.zeros(m.shape, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + kk
        xm = mm[:, None] & (cols < K)[None, :]
        off = m[:, None] * K + cols[None, :]
        x = tl.load(X + off, mask=xm, other=0.0)
        if HAS_R:
            x = (x.to(tl.float32) + tl.load(R + off, mask=xm, other=0.0).to(tl.float32)).to(dt)
            if pid == 0:
                tl.store(XOUT + off, x, mask=xm)
        xf = x.to(tl.float32)
        ss += tl.sum(xf * xf, 1)
    return tl.math.rsqrt(ss / K + eps)


@triton.jit
def rows_tile(X, R, NW, m, mm, cols, km, inv, K: tl.constexpr, MODE: tl.constexpr, HAS_R: tl.constexpr, dt):
    """Rows `m` (mask `mm`) of the projection's input over columns `cols`, after the mode's prologue, in the
    model dtype (tl.dot's operand: the eager ops round each step to it)."""
    xm = mm[:, None] & km[None, :]
    off = m[:, None] * K + cols[None, :]
    x = tl.load(X + off, mask=xm, other=0.0)
    if MODE == 1:
        if HAS_R:
            x = (x.to(tl.float32) + tl.load(R + off, mask=xm, other=0.0).to(tl.float32)).to(dt)
        y = (x.to(tl.float32) * inv[:, None]).to(dt)
        nw = tl.load(NW + cols, mask=km, other=0.0)
        x = (nw.to(tl.float32)[None, :] * y.to(tl.float32)).to(dt)
    return x


@triton.jit
def _dot(x, w, acc, IEEE: tl.constexpr, SWAP: tl.constexpr):
    """acc + x w^T in fp32 (SWAP: acc + w x^T, acc [BLOCK_N, M_PAD]). IEEE (fp32 models): full-precision dots;
    Triton's fp32 default is TF32."""
    # (if/else, not early returns: Triton compiles what follows a constexpr branch's return too)
    if SWAP:
        if IEEE:
            acc = tl.dot(w, tl.trans(x), acc, input_precision="ieee")
        else:
            acc = tl.dot(w, tl.trans(x), acc)
    else:
        if IEEE:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    return acc


@triton.jit
def _tile_rows(tile, N, EPI: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    """Weight rows of output tile `tile` (and their mask; with EPI 1 the head, with EPI 1 and 2 the first pair
    offset i0). EPI 1 (RoPE) and 2 (GLU) work on pairs of weight rows: tile column 2j + h holds member h of pair j,
    so a reshape to [M_PAD, PAIRS, 2] and a split hand the epilogue both members of each pair."""
    c = tl.arange(0, BLOCK_N)
    PAIRS: tl.constexpr = BLOCK_N // 2
    head = 0
    i0 = 0
    if EPI == 1:  # pair j: offset i0 + j of both halves of one head
        HALF: tl.constexpr = D // 2
        head = tile // (HALF // PAIRS)
        i0 = (tile % (HALF // PAIRS)) * PAIRS
        rows = head * D + (c % 2) * HALF + i0 + c // 2
        rmask = rows < N
    elif EPI == 2:  # pair j: gate row i0 + j and up row N/2 + i0 + j
        i0 = tile * PAIRS
        rows = (c % 2) * (N // 2) + i0 + c // 2
        rmask = i0 + c // 2 < N // 2
    else:
        rows = tile * BLOCK_N + c
        rmask = rows < N
    return rows, rmask, head, i0


@triton.jit
def _tile_store(acc, rows, rmask, head, i0, m, mm, Y, B, N, HAS_B: tl.constexpr, EPI: tl.constexpr,
                M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, COS, SIN, POS, KV, SB, SO, s_kvb, s_kvt, s_kvh, off_k,
                off_v, H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, dt):
    """A tile's epilogue: bias, then the plain store, SiLU*mul (EPI 2) or RoPE and the KV write (EPI 1)."""
    if HAS_B:
        acc += tl.load(B + rows, mask=rmask, other=0.0).to(tl.float32)[None, :]
    if EPI == 0:
        tl.store(Y + m[:, None] * N + rows[None, :], acc.to(dt), mask=mm[:, None] & rmask[None, :])
    else:
        PAIRS: tl.constexpr = BLOCK_N // 2
        a1, a2 = tl.split(tl.reshape(acc.to(dt).to(tl.float32), [M_PAD, PAIRS, 2]))
        i = i0 + tl.arange(0, PAIRS)
        if EPI == 2:  # as silu_mul on the stored projection
            g = (a1 / (1.0 + tl.exp(-a1))).to(dt).to(tl.float32)
            tl.store(Y + m[:, None] * (N // 2) + i[None, :], (g * a2).to(dt),
                     mask=mm[:, None] & (i < N // 2)[None, :])
        else:  # as rope_and_write_kv on the stored projection, each row at its own position and cache slot
            HALF: tl.constexpr = D // 2
            if head < H + KVH:
                pos = tl.load(POS + m, mask=mm, other=0)
                y1, y2 = rope_pair(a1, a2, COS, SIN, pos[:, None], i[None, :], D, HALF, dt)
            else:
                y1, y2 = a1.to(dt), a2.to(dt)
            if head < H:
                yp = Y + m[:, None] * (H * D) + head * D + i[None, :]
            else:
                kb = (KV + tl.load(SB + m, mask=mm, other=0).to(tl.int64) * s_kvb
                      + tl.load(SO + m, mask=mm, other=0).to(tl.int64) * s_kvt)
                if head < H + KVH:
                    kb += (head - H) * s_kvh + off_k
                else:
                    kb += (head - H - KVH) * s_kvh + off_v
                yp = kb[:, None] + i[None, :]
            tl.store(yp, y1, mask=mm[:, None])
            tl.store(yp + HALF, y2, mask=mm[:, None])


@triton.jit
def _acc_zeros(M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, SWAP: tl.constexpr):
    if SWAP:
        return tl.zeros([BLOCK_N, M_PAD], tl.float32)
    return tl.zeros([M_PAD, BLOCK_N], tl.float32)


@triton.jit
def _tile_dots(acc, k_start, X, R, NW, wp, rmask, m, mm, kk, inv, K: tl.constexpr, MODE: tl.constexpr,
               HAS_R: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr, SWAP: tl.constexpr, dt):
    """A tile's weight rows `wp` against every input row from column k_start on, added to acc; [M_PAD, BLOCK_N]."""
    for k0 in range(k_start, K, BLOCK_K):
        cols = k0 + kk
        km = cols < K
        w = tl.load(wp + k0, mask=rmask[:, None] & km[None, :], other=0.0)
        acc = _dot(rows_tile(X, R, NW, m, mm, cols, km, inv, K, MODE, HAS_R, dt), w, acc, IEEE, SWAP)
    if SWAP:
        acc = tl.trans(acc)
    return acc


# M varies with the batch (and eager steps' token counts): specialising on it would compile per value.
@triton.jit(do_not_specialize=["M"])
def _gemv_rows_kernel(X, R, NW, XOUT, W, B, Y, eps, M, N, K: tl.constexpr, MODE: tl.constexpr, HAS_R: tl.constexpr,
                      HAS_B: tl.constexpr, EPI: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, IEEE: tl.constexpr, SWAP: tl.constexpr, PDL: tl.constexpr,
                      COS, SIN, POS, KV, SB, SO, s_kvb, s_kvt, s_kvh, off_k, off_v,
                      H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, PERSIST: tl.constexpr = False,
                      TILES=1):
    pid = tl.program_id(0)
    dt = Y.dtype.element_ty
    m = tl.arange(0, M_PAD)
    mm = m < M
    kk = tl.arange(0, BLOCK_K)
    if PERSIST:  # a grid of a few programs an SM, each taking every G-th tile; tile and K loops one pipelined loop
        pdl_enter(PDL)
        inv = tl.zeros([M_PAD], tl.float32)
        if MODE == 1:  # once a program, not once a tile
            inv = rows_rms(X, R, XOUT, m, mm, kk, pid, eps, K, BLOCK_K, HAS_R, dt)
        for tile in tl.range(pid, TILES, tl.num_programs(0), flatten=True):
            rows, rmask, head, i0 = _tile_rows(tile, N, EPI, BLOCK_N, D)
            wp = W + rows[:, None].to(tl.int64) * K + kk[None, :]
            acc = _tile_dots(_acc_zeros(M_PAD, BLOCK_N, SWAP), 0, X, R, NW, wp, rmask, m, mm, kk, inv, K, MODE,
                             HAS_R, BLOCK_K, IEEE, SWAP, dt)
            _tile_store(acc, rows, rmask, head, i0, m, mm, Y, B, N, HAS_B, EPI, M_PAD, BLOCK_N, COS, SIN, POS, KV,
                        SB, SO, s_kvb, s_kvt, s_kvh, off_k, off_v, H, KVH, D, dt)
    else:
        rows, rmask, head, i0 = _tile_rows(pid, N, EPI, BLOCK_N, D)
        wp = W + rows[:, None].to(tl.int64) * K + kk[None, :]
        # The first weight tile is loaded before waiting on the previous kernel: no kernel writes weights.
        w = tl.load(wp, mask=rmask[:, None] & (kk < K)[None, :], other=0.0)
        pdl_enter(PDL)
        inv = tl.zeros([M_PAD], tl.float32)
        if MODE == 1:
            inv = rows_rms(X, R, XOUT, m, mm, kk, pid, eps, K, BLOCK_K, HAS_R, dt)
        acc = _dot(rows_tile(X, R, NW, m, mm, kk, kk < K, inv, K, MODE, HAS_R, dt), w,
                   _acc_zeros(M_PAD, BLOCK_N, SWAP), IEEE, SWAP)
        acc = _tile_dots(acc, BLOCK_K, X, R, NW, wp, rmask, m, mm, kk, inv, K, MODE, HAS_R, BLOCK_K, IEEE, SWAP, dt)
        _tile_store(acc, rows, rmask, head, i0, m, mm, Y, B, N, HAS_B, EPI, M_PAD, BLOCK_N, COS, SIN, POS, KV, SB,
                    SO, s_kvb, s_kvt, s_kvh, off_k, off_v, H, KVH, D, dt)


# (BLOCK_N, BLOCK_K for 2-byte dtypes, num_warps, num_stages) by weight shape [N, K] and padded rows M_PAD
# (`rows_pad`), tuned in the decode graph (diag_gpu step-sweep); other shapes: `rows_config_for`. qwen2-1.5b's qkv and
# o at up to 16 rows: swept with the MLP on cuBLAS (--mlp-cublas) on the H200 at f4155ff, batch 4: the step's replay
# 1.647 -> 1.581 ms (cuBLAS for all four: 1.607); batch 8 picked (64, 512, 8, 3) for qkv, 1.703 -> 1.644 (cuBLAS
# 1.614) (bench/results/small_batch_qkv_o_sweep_h200_f4155ff.json).
_ROWS_CONFIGS: dict[tuple[int, int, int], tuple[int, int, int, int]] = {
    (2048, 1536, 16): (16, 512, 4, 4), (1536, 1536, 16): (16, 512, 4, 4),
}


# The dot the other way round (acc [BLOCK_N, M_PAD] = w x^T): the weight tile is the MMA's wide operand, which at
# BLOCK_N >= 64 lets Triton use Hopper's wgmma (an M of 64 and more) with its pipelined shared-memory operands,
# where x w^T (M_PAD rows, 16 for a few tokens) takes mma.sync from registers. No faster on the H200 at 9116b98
# with the default blocks (1.5B step replay at batches 2/4/8: 2.05/2.11/2.17 ms, the other way round 2.09/1.90/2.13,
# cuBLAS 1.64/1.66/1.66; bench/results/small_batch_gemv_swap_h200_9116b98.json): off, an A/B variant (diag_gpu step
# "small-batch gemv swapped", step-sweep --swap; not swept yet).
ROWS_SWAP = False

# A persistent grid: ROWS_PERSIST programs an SM, each looping over every G-th output tile, its tile and K loops
# flattened into one software-pipelined loop (tl.range(flatten=True)), instead of one program a tile. Why: the
# H200's batch-8 profile of the small-batch path (f4155ff) had its 112 kernels at 1,637 us a step against cuBLAS's
# ~1,100 us for the same projections, and the sm_90 build of gate_up at (64, 256, 4, 3) holds 107 KB of shared
# memory a program -- two programs an SM, 264 at once for its 280 tiles: a second wave of 16 programs, each as long as
# the first (`python -m load_tests.triton_offline rows`). down's 96 tiles of 16 rows leave 36 SMs idle. The norm
# pass (MODE_NORM) runs once a program instead of once a tile too. 0: off (TOKENPOOL_GEMV_ROWS_PERSIST). Measured at
# 957aac0 (diag_gpu step variants "small-batch gemv persistent ...", rows_rope_persist_h200_957aac0.json): 1.5B
# batches 2/4/8 at 1 program an SM 1.06-1.09x cuBLAS's step time (batch 8 1.814 ms against one program a tile's
# 1.984 and cuBLAS's 1.665), at 2 1.53x -- slower than cuBLAS, so off.
ROWS_PERSIST = env.GEMV_ROWS_PERSIST.integer()


@functools.cache
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def rows_pad(m: int) -> int:
    """The rows the kernel computes for m tokens: tl.dot takes 16 at least, and powers of two keep the compiled
    variants to a few (every batch bucket and eager token count up to 32 shares two)."""
    return max(16, triton.next_power_of_2(m))


def rows_config_for(n: int, k: int, m_pad: int) -> tuple[int, int, int, int]:
    """Untuned shapes: rows a program so the grid is about two waves of 132 SMs (16 to 128). Every program
    reads all M input rows (twice in the norm mode), so narrow blocks over many rows multiply that traffic: the
    H200 batch-8 sweep's gate_up went 3.36 -> 1.99 ms a step from 16 rows to 64, its 17920 rows' two waves."""
    c = _ROWS_CONFIGS.get((n, k, m_pad))
    if c is not None:
        return c
    bn = min(128, max(16, 1 << max(0, (n // 264).bit_length() - 1)))
    bk = min(256 if m_pad <= 16 else max(32, 8192 // m_pad), 16384 // bn)  # <= 32 KB of weights a stage
    return bn, bk, 4 if m_pad <= 16 else 8, 3 if bn >= 64 else 4


def gemv_rows(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *, mode: int = MODE_PLAIN,
              r: torch.Tensor | None = None, norm_w: torch.Tensor | None = None, eps: float = 0.0,
              glu: bool = False, rope: RopeKV | None = None, config: tuple[int, int, int, int] | None = None,
              programs: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x: [M, K], a few tokens; w: [N, K]; mode MODE_PLAIN or MODE_NORM. Returns (y [M, N], new residual x + r
    or None). With `glu` (w is a fused [gate; up]): y = silu(x gate^T) * (x up^T), [M, N/2]. With `rope` (w is a
    fused qkv): y is q after RoPE, [M, H, D], and each row's k (after RoPE) and v go into the cache at its slot.
    `programs`: a persistent grid of that many programs when there are more tiles (default: ROWS_PERSIST an SM on
    CUDA, else one program a tile)."""
    n, k = w.shape
    m = x.shape[0]
    if (mode == MODE_SILU or x.shape != (m, k) or not x.is_contiguous() or not w.is_contiguous()
            or (r is not None and (r.shape != x.shape or not r.is_contiguous()))
            or (glu and (n % 2 or rope is not None))):
        raise ValueError(f"gemv_rows: x {tuple(x.shape)}, r {None if r is None else tuple(r.shape)} for w "
                         f"{tuple(w.shape)} (mode {mode}, glu {glu}, rope {rope is not None}); needs [M, {k}], "
                         "contiguous, mode PLAIN or NORM, glu on an even row count without rope")
    x_out = torch.empty_like(x) if (mode == MODE_NORM and r is not None) else None
    m_pad = rows_pad(m)
    bn, bk, nw, ns = config or rows_config_for(n, k, m_pad)
    # BLOCK_K counts 2-byte elements: fp32 takes half as many (the same shared memory for the pipelined tiles,
    # which at fp32 would not fit), and none past K
    bk = min(bk * 2 // x.element_size(), max(16, triton.next_power_of_2(k)))
    if rope is not None:
        bn = min(bn, rope.head_dim)  # pairs within one head
        y = torch.empty(m, rope.heads, rope.head_dim, device=x.device, dtype=x.dtype)
    else:
        y = torch.empty(m, n // 2 if glu else n, device=x.device, dtype=x.dtype)
    if bn < 16 or bk < 16:
        raise ValueError(f"gemv_rows: tl.dot needs blocks of 16 at least, got BLOCK_N {bn}, BLOCK_K {bk}")
    tiles = triton.cdiv(n, bn)
    if programs is None and ROWS_PERSIST and x.is_cuda:
        programs = ROWS_PERSIST * _sms(x.device.index if x.device.index is not None else 0)
    persist = programs is not None and programs < tiles
    _gemv_rows_kernel[(programs if persist else tiles,)](
        x, r if r is not None else x, norm_w if norm_w is not None else x, x_out if x_out is not None else x,
        w, bias if bias is not None else w, y, eps, m, n, K=k, MODE=mode, HAS_R=r is not None,
        HAS_B=bias is not None, EPI=1 if rope is not None else 2 if glu else 0, M_PAD=m_pad, BLOCK_N=bn,
        BLOCK_K=bk, IEEE=x.dtype == torch.float32, SWAP=ROWS_SWAP, PDL=pdl_arg(x), **_rope_args(rope, n, bn, x),
        PERSIST=persist, TILES=tiles, num_warps=nw, num_stages=ns, launch_pdl=pdl(x))
    return y, x_out
