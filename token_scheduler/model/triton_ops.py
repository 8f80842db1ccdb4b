"""Fused elementwise kernels for the CUDA path. A decode step at batch 1 is ~300 tiny launches per token
without them; each kernel here replaces 3-12 torch ops. Each rounds to the model dtype exactly where the
torch reference does, so results stay bit-identical to the eager ops they replace.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import torch
import triton
import triton.language as tl

from tokenpool import env

try:  # Triton with grid dependency control (3.6 and 3.9 have it)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    _HAS_GDC = True
except ImportError:  # pragma: no cover - older Triton: kernels launch plainly
    gdc_launch_dependents = gdc_wait = None
    _HAS_GDC = False

# Programmatic dependent launch (Hopper and later): a kernel launched with it may be scheduled while the kernel
# before it drains, instead of after. Each such kernel calls `gdc_wait` before it touches anything an earlier
# kernel wrote (the GEMVs prefetch their first weight tile before it, since weights are read-only), then
# `gdc_launch_dependents` so the next one may be scheduled in turn. Every kernel of a one-token decode step is
# launched this way, which hides most of the gap between back-to-back microsecond kernels (H100: qwen2-1.5b
# batch-1 step 1.65 -> 1.53 ms, 7B 5.88 -> 5.77 ms before the GEMVs were retuned for it). Steps of more rows only
# inside `pdl_rows` (llama's small-batch GEMV steps, whose projections are Triton kernels too): in batched steps
# whose projections are cuBLAS GEMMs, ours launched early beside them made the 7B batch-32 step slower
# (6.63 -> 6.98 ms). TOKENPOOL_PDL=0: off.
USE_PDL = _HAS_GDC and env.PDL.on()
_PDL_ROWS: contextvars.ContextVar[int] = contextvars.ContextVar("pdl_rows", default=1)


@functools.cache
def _sm90_or_later(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_capable(t: torch.Tensor) -> bool:
    """Whether kernels on `t`'s device can be launched with programmatic dependent launch (Hopper or later)."""
    return USE_PDL and t.is_cuda and _sm90_or_later(t.device.index if t.device.index is not None else 0)


def pdl(t: torch.Tensor) -> bool:
    """Whether a kernel over `t` (leading dim: tokens or sequences) is launched with programmatic dependent
    launch: where capable, over one row, or over up to `pdl_rows`'s rows inside it."""
    return t.shape[0] <= _PDL_ROWS.get() and pdl_capable(t)


@contextlib.contextmanager
def pdl_rows(rows: int):
    """Kernels launched inside it over up to `rows` rows use programmatic dependent launch (where capable): for a
    step of `rows` tokens whose every projection is a Triton kernel launched this way."""
    token = _PDL_ROWS.set(rows)
    try:
        yield
    finally:
        _PDL_ROWS.reset(token)


# PDL_EARLY: a one-row step's kernels let the next one in (griddepcontrol.launch_dependents) first, then wait on the
# one before, instead of after their wait. The next kernel's programs may then be scheduled once every program of
# this one has started, not once the kernel before this one has finished: its pre-wait loads (a GEMV's first weight
# tile -- all of o's at batch 1 --, the attention's first cache tile) run under the streams of the kernels still
# running. Still correct: the wait returns once the kernel before has completed, and that one completed only after its
# own wait, so every earlier write is visible by then. But the launches may now run ahead by as many kernels as fit
# on the GPU at once (each waiting), not one: what a kernel reads before its wait must be written by no kernel of the
# step -- weights, cache positions before the new token, the step's inputs (uploaded before the graph's first kernel,
# the embedding's lookup, which is launched plainly); a prefill's rows run in one launch of several rows (row graphs),
# never on this path. No program waits on one that cannot start: the next kernel is scheduled only once all of this
# one's programs have. H100 (diag_gpu step, graph
# replay at context 512, e98bee8, bench/results/pdl_early_h100_e98bee8.json): batch-1 steps 1.5B 1.339/1.332/1.334
# -> 1.312/1.305 ms (0.979), 7B 4.889/4.890 -> 4.861/4.859 (0.994); the 1.5B's batched TMA steps slower (batch 8
# 1.70 -> 1.76, batch 32 2.01 -> 2.13: the next GEMM's programs, 110-160 KB of shared memory each, sit waiting),
# so several rows keep the wait first. TOKENPOOL_PDL_EARLY=0: off.
PDL_EARLY = env.PDL_EARLY.on()


# Steps of several rows under PDL (the TMA-fed batched steps): which of their kernels let the next in first, for A/B
# runs (diag_gpu step): "none", "all", "light" (all but the TMA GEMMs), "tma" (those alone). H100, 1.5B step replay
# at 304537d (pdl_early_rows_h100_304537d.json), batch 8 / 32: none 1.711/1.707 and 2.034/2.016 ms (twice), all
# 1.765 / 2.140, light 1.785 / 1.994, tma 1.723 / 2.020: none kept.
PDL_EARLY_ROWS = "none"


def pdl_arg(t: torch.Tensor, tma: bool = False) -> int:
    """The kernels' PDL constexpr for a launch over `t` (leading dim: rows; `tma`: a TMA-fed GEMM): 0 plain, 1 under
    PDL (wait, then let the next in), 2 under PDL letting the next in first (PDL_EARLY: one row; several as
    PDL_EARLY_ROWS says)."""
    if not pdl(t):
        return 0
    if t.shape[0] == 1:
        return 2 if PDL_EARLY else 1
    mode = PDL_EARLY_ROWS
    early = mode == "all" or (mode == "light" and not tma) or (mode == "tma" and tma)
    return 2 if PDL_EARLY and early else 1


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """Called by a kernel launched with `launch_pdl`: wait for the kernels before it, then let the next one in (PDL
    2: the other way round, see PDL_EARLY)."""
    if PDL == 2:
        gdc_launch_dependents()
        gdc_wait()
    elif PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def _add_rms_norm_kernel(X, R, W, Y, eps, part_stride, N: tl.constexpr, BLOCK: tl.constexpr, HAS_R: tl.constexpr,
                         PARTS: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    m = cols < N
    x = tl.load(X + row * N + cols, mask=m, other=0.0)
    if HAS_R:  # x <- x + r, rounded to the model dtype, and written back as the new residual
        if PARTS:  # r is a projection's PARTS fp32 partial sums (triton_tma's split K): summed in order, rounded
            rs = tl.load(R + row * N + cols, mask=m, other=0.0)
            for i in tl.static_range(1, PARTS):
                rs += tl.load(R + i * part_stride + row * N + cols, mask=m, other=0.0)
            r = rs.to(X.dtype.element_ty)
        else:
            r = tl.load(R + row * N + cols, mask=m, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(X + row * N + cols, x, mask=m)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, 0) / N
    y = (xf * tl.math.rsqrt(var + eps)).to(X.dtype.element_ty)
    w = tl.load(W + cols, mask=m, other=0.0)
    tl.store(Y + row * N + cols, (w.to(tl.float32) * y.to(tl.float32)).to(Y.dtype.element_ty), mask=m)


def add_rms_norm(x: torch.Tensor, r: torch.Tensor | None, w: torch.Tensor, eps: float) -> torch.Tensor:
    """If r is given: x += r in place (the residual stream). Returns rms_norm(x) * w. `r` of one more dimension
    than x ([parts, *x.shape], fp32): partial sums of the projection r, added in order and rounded first."""
    n = x.shape[-1]
    y = torch.empty_like(x)
    rows = x.numel() // n
    parts = r.shape[0] if r is not None and r.dim() == x.dim() + 1 else 0
    if parts and (r.shape[1:] != x.shape or r.dtype != torch.float32 or not r.is_contiguous()):
        raise ValueError(f"add_rms_norm: partial sums {tuple(r.shape)} {r.dtype} for x {tuple(x.shape)}")
    _add_rms_norm_kernel[(rows,)](x, r if r is not None else x, w, y, eps, rows * n, N=n,
                                  BLOCK=triton.next_power_of_2(n), HAS_R=r is not None, PARTS=parts,
                                  num_warps=8 if n >= 2048 else 4, PDL=pdl_arg(x), launch_pdl=pdl(x))
    return y


@triton.jit
def rope_pair(x1, x2, COS, SIN, pos, i, D: tl.constexpr, HALF: tl.constexpr, dt):
    """RoPE of one head's halves x1 = x[i], x2 = x[HALF + i] (fp32 holding model-dtype values) at position
    `pos`: x*cos + rotate_half(x)*sin, rounding after each op as the torch reference does."""
    c1 = tl.load(COS + pos * D + i).to(dt).to(tl.float32)
    c2 = tl.load(COS + pos * D + HALF + i).to(dt).to(tl.float32)
    s1 = tl.load(SIN + pos * D + i).to(dt).to(tl.float32)
    s2 = tl.load(SIN + pos * D + HALF + i).to(dt).to(tl.float32)
    y1 = ((x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)).to(dt)
    y2 = ((x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)).to(dt)
    return y1, y2


@triton.jit
def _rope_kv_kernel(QKV, COS, SIN, POS, KV, SB, SO, QOUT, s_qkv, s_kvb, s_kvt, s_kvh, off_k, off_v,
                    H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    t = tl.program_id(0)
    hh = tl.program_id(1)  # one program per head: q heads first, then kv heads
    pos = tl.load(POS + t)
    i = tl.arange(0, HALF)
    base = QKV + t * s_qkv + hh * D
    x1 = tl.load(base + i).to(tl.float32)
    x2 = tl.load(base + HALF + i).to(tl.float32)
    y1, y2 = rope_pair(x1, x2, COS, SIN, pos, i, D, HALF, QOUT.dtype.element_ty)
    if hh < H:
        qo = QOUT + (t * H + hh) * D
        tl.store(qo + i, y1)
        tl.store(qo + HALF + i, y2)
    else:
        kh = hh - H
        blk = tl.load(SB + t).to(tl.int64)
        off = tl.load(SO + t).to(tl.int64)
        kb = KV + blk * s_kvb + off * s_kvt + kh * s_kvh
        tl.store(kb + off_k + i, y1)
        tl.store(kb + off_k + HALF + i, y2)
        vb = QKV + t * s_qkv + (H + KVH + kh) * D
        tl.store(kb + off_v + i, tl.load(vb + i))
        tl.store(kb + off_v + HALF + i, tl.load(vb + HALF + i))


def rope_and_write_kv(qkv, cos, sin, positions, kv, layer, slot_blocks, slot_offsets, H, KVH, D) -> torch.Tensor:
    """qkv: [T, (H+2KVH)*D] (no q/k norm). Returns rotated q [T, H, D]; rotated k and v go into the cache."""
    T = qkv.shape[0]
    q = torch.empty(T, H, D, device=qkv.device, dtype=qkv.dtype)
    s_kvb, s_kvl, s_kv2, s_kvt, s_kvh, _ = kv.stride()
    _rope_kv_kernel[(T, H + KVH)](qkv, cos, sin, positions, kv, slot_blocks, slot_offsets, q, qkv.stride(0),
                                  s_kvb, s_kvt, s_kvh, layer * s_kvl, layer * s_kvl + s_kv2,
                                  H=H, KVH=KVH, D=D, HALF=D // 2, num_warps=1, PDL=pdl_arg(qkv), launch_pdl=pdl(qkv))
    return q


@triton.jit
def _silu_mul_kernel(GU, Y, N: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < N
    g = tl.load(GU + row * 2 * N + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(GU + row * 2 * N + N + cols, mask=m, other=0.0).to(tl.float32)
    a = (g / (1.0 + tl.exp(-g))).to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * N + cols, (a * u).to(Y.dtype.element_ty), mask=m)


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    rows, n2 = gu.shape
    n = n2 // 2
    y = torch.empty(rows, n, device=gu.device, dtype=gu.dtype)
    _silu_mul_kernel[(rows, triton.cdiv(n, 1024))](gu, y, N=n, BLOCK=1024, num_warps=4, PDL=pdl_arg(gu),
                                                           launch_pdl=pdl(gu))
    return y


# -- a decode graph's inputs ----------------------------------------------------------------------------------------
# Counters and the block-table row length change every step: specialising on them (1, multiples of 16) would compile
# a variant mid-serving.
# BLOCK_C is fixed for the same reason (a table of 4096 positions in 16-token blocks is 4 tiles).
@triton.jit(do_not_specialize=["n", "batch", "cols", "mb"])
def _fill_kernel(HOST, HBT, IDS, DEV, BT, CTX, n, batch, cols, mb, R: tl.constexpr, R_PAD: tl.constexpr,
                 GATHER: tl.constexpr, BLOCK_C: tl.constexpr):
    i = tl.program_id(0)  # one row of the batch: its column of the inputs, its context length, its table
    r = tl.arange(0, R_PAD)
    rm = r < R
    v = tl.load(HOST + r * batch + i, mask=rm, other=0)
    if GATHER:
        if i < n:  # input row 0 names the row of IDS (the step before's sampled ids) this row's token is
            v = tl.where(r == 0, tl.load(IDS + tl.load(HOST + i)), v)
    tl.store(DEV + r * batch + i, v, mask=rm)
    tl.store(CTX + i, tl.load(HOST + 4 * batch + i).to(tl.int32))
    if i < n:
        for c0 in range(0, cols, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cm = c < cols
            tl.store(BT + i * mb + c, tl.load(HBT + i * mb + c, mask=cm), mask=cm)


def fill_inputs(dev: torch.Tensor, bt: torch.Tensor, ctx: torch.Tensor, host: torch.Tensor, host_bt: torch.Tensor,
                n: int, cols: int, ids: torch.Tensor | None = None) -> None:
    """A decode graph's inputs in one launch, read where the host wrote them (`host`, `host_bt`: pinned memory as
    device tensors): dev <- host ([R, batch] int64: token or row of `ids`, position, slot block, slot offset, context
    length, ...), ctx <- its context-length row as int32, the first `cols` columns of bt's first `n` rows <- host_bt's.
    With `ids` (device): row i < n's token is ids[host[0, i]]. The same bytes as `kernel_copy` of each buffer, the
    gather and the int32 copy, which were five launches."""
    R, batch = host.shape
    if dev.shape != host.shape or bt.shape != host_bt.shape or ctx.shape != (batch,) or bt.shape[0] != batch:
        raise ValueError(f"fill_inputs: dev {tuple(dev.shape)}, host {tuple(host.shape)}, bt {tuple(bt.shape)}, "
                         f"host_bt {tuple(host_bt.shape)}, ctx {tuple(ctx.shape)}")
    if R < 5 or not (0 <= n <= batch) or not (0 <= cols <= bt.shape[1]):
        raise ValueError(f"fill_inputs: {R} input rows (5 at least), n {n} of {batch}, cols {cols} of {bt.shape[1]}")
    _fill_kernel[(batch,)](host, host_bt, ids if ids is not None else host, dev, bt, ctx, n, batch, cols,
                           bt.shape[1], R=R, R_PAD=triton.next_power_of_2(R), GATHER=ids is not None,
                           BLOCK_C=64, num_warps=1)
