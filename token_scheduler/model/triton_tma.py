"""Batched decode projections (2 to MAX_ROWS rows) as Triton GEMMs whose tiles arrive by TMA.

A decode step of a few sequences streams each projection's weights once; cuBLAS does that at 1.1-1.6x the weights'
copy time on the big projections and ~3x on the small ones, and its kernels cannot be launched with programmatic
dependent launch, so every kernel of a batched step started after the one before had drained. Here each projection
is one Triton kernel: the dot swapped (acc [BLOCK_N, M_PAD] = W_tile x_tile^T, the weight tile wgmma's wide operand),
both tiles copied by the tensor memory accelerator (host-side tensor descriptors) and pipelined over STAGES buffers,
launched with programmatic dependent launch like the rest of the step (triton_ops.pdl_rows). Measured alone, 28
distinct weight copies in a CUDA graph on the H100 (load_tests/diag_tma.py, bench/results/tma_gemm_h100_3873605.json):
faster than cuBLAS at every projection of qwen2-1.5b and 7B at batches 8 and 32 (1.5B batch 8: qkv 5.04 against
5.75 us, o 4.70 against 5.82, gate_up 21.3 against 23.8, down 12.8 against 14.5; 7B gate_up 92 against 98).

Folds: the bias (qkv); for down, whose few output tiles would leave SMs idle, a split along K into fp32 partial sums
[SPLIT, M, N] that the next add+RMSNorm adds in a fixed order (triton_ops.add_rms_norm with `r` of one more
dimension): deterministic, no zeroed buffer, no atomics. SiLU*mul can be folded into gate_up (GLU, off: see there).
Results match the cuBLAS path to rounding (fp32 sums in another order), not bit for bit.

In the step (H100, graph replay at context 512, interleaved with cuBLAS in one engine; 63ec818): qwen2-1.5b batch 8
1.737 against 1.877 ms, batch 32 2.036 against 2.148; 7B 5.634 against 5.830 and 6.050 against 6.150
(bench/results/tma_step_variants_h100_63ec818.json).

TOKENPOOL_TMA_ROWS (default 32) sets the largest batch; 0: cuBLAS.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from token_scheduler.model.triton_ops import pdl, pdl_arg, pdl_capable, pdl_enter
from tokenpool import env

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - Triton without host tensor descriptors: cuBLAS
    TensorDescriptor = None

MAX_ROWS = env.TMA_ROWS.integer()


def rows_pad(m: int) -> int:
    """The rows a kernel computes for m tokens (wgmma's N: 16 at least; powers of two keep the variants few)."""
    return max(16, triton.next_power_of_2(m))


# SiLU*mul in gate_up's epilogue (True), or gate_up's output written whole, then triton_ops.silu_mul (False). The
# GLU kernel holds two weight tiles a stage: fewer programs an SM, or fewer stages. H100 step replay at c7819c9
# (context 512; bench/results/tma_step_variants_h100_c7819c9.json): without it 1.5B batch 8 1.738 against 1.725 ms,
# batch 32 2.055 against 2.055-2.072; 7B batch 8 5.624 against 5.680, batch 32 6.024 against 6.345 (cuBLAS 6.168).
GLU = False
# The kernels between the projections of a layer folded into them (linear's norm, silu, resid). FOLD 1: o's epilogue
# adds its output to the residual stream and sums each row's squares over its tile; gate_up's prologue normalises the
# residual with those sums (the add+RMSNorm kernel gone); down's prologue makes silu(gate) * up from gate_up's output
# (the SiLU*mul kernel gone). FOLD 2, also: down's split-K parts are added into the residual by the last split of each
# tile, and qkv's prologue normalises it (the add+RMSNorm after down gone, but the last layer's). Each input is rounded
# as the kernel it replaces rounds it; the sums of squares are added in another order (per tile, then across tiles).
# TOKENPOOL_TMA_FOLD.
FOLD = env.TMA_FOLD.integer()
# Under FOLD 2, qkv's and o's K splits (1: none), their sums added by each output tile's last split: their 32 and 24
# output tiles (qwen2-1.5b) leave most SMs idle. For A/B runs (diag_gpu step).
SPLIT_QKV = 1
SPLIT_O = 1
# Shared memory a program of a projection wider than the GPU may take: two programs an SM (Hopper: 228 KB an SM).
# At one program an SM the GLU gate_up of the 1.5B at 32 rows (140 programs, 120 KB each at K tiles of 128 over 3
# stages) ran in two waves.
SMEM_WIDE = 110 * 1024


def smem_bytes(bn: int, bk: int, st: int, m_pad: int, glu: bool) -> int:
    """A program's pipelined tiles: STAGES x (weight rows, twice with GLU, + input rows) x BLOCK_K, 2-byte."""
    return st * ((2 if glu else 1) * bn + m_pad) * bk * 2


# Measured out (H100 step replay at 63ec818, bench/results/tma_step_variants_h100_63ec818.json): 32- or 16-row tiles
# for qkv and o, whose 64-row tiles leave most SMs idle (1.5B batch 8 1.802 and 1.913 ms against 1.737; the 7B 6.13
# and 6.06 against 5.63), and o's output as split-K parts like down's (1.732 against 1.737: noise).


def config_for(n: int, k: int, m_pad: int, sms: int = 132, glu: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, STAGES, SPLIT) for weights [n, k] (glu: n counts gate and up) at m_pad rows. From the H100
    sweep (diag_tma at 3873605): 64-row tiles everywhere; K tiles of 256 over 4 stages for qkv and o, 128 over 3 for
    gate_up and down; down split so that its 24-56 output tiles fill the SMs."""
    bn = 64
    bk, st = (256, 4) if k <= 4096 and n < 8192 else (128, 3)
    tiles_n, tiles_k = triton.cdiv(n // 2 if glu else n, bn), triton.cdiv(k, bk)
    while tiles_n > sms and smem_bytes(bn, bk, st, m_pad, glu) > SMEM_WIDE and bk > 32:
        st, bk = (st - 1, bk) if st > 2 else (st, bk // 2)
    split = 1
    while tiles_n * split * 2 <= sms * 1.5 and tiles_k >= 4 * split * 2:  # fill the SMs, 4 K tiles a split at least
        split *= 2
    return bn, bk, st, split


@functools.cache
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# Models whose hidden size is at most this take these kernels; larger ones stay on cuBLAS. On the H200 (bench engine,
# d6428cd, TOKENPOOL_TMA_ROWS 0 against 32 on one warm machine; bench/results/tma_ab_h200_d6428cd.json) cuBLAS won the
# 7B (hidden 3584) at batches 8 and 32, 4.305/4.592 ms against 4.501/4.902 (1.18x/1.20x its floor with the KV bytes
# against 1.24x/1.28x), where TMA won the 1.5B (hidden 1536), 1.445/1.745 ms against 1.706/1.832. (On the H100 the 7B
# had gained 3% from TMA: 63ec818.)
MAX_HIDDEN = 2048


def takes(x: torch.Tensor, decode: bool) -> bool:
    """Whether a step of hidden states `x` ([rows, hidden]) runs its projections here: a decode step of 2 to
    MAX_ROWS rows of a model of hidden size up to MAX_HIDDEN on a GPU with TMA and programmatic dependent launch
    (Hopper or later)."""
    return (TensorDescriptor is not None and decode and 2 <= x.shape[0] <= MAX_ROWS and x.shape[1] <= MAX_HIDDEN
            and pdl_capable(x) and x.dtype in (torch.bfloat16, torch.float16))


def _fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether TMA can copy tiles of x and w: 16-byte aligned bases and row strides."""
    return all(t.data_ptr() % 16 == 0 and (t.shape[1] * t.element_size()) % 16 == 0 for t in (x, w))


@triton.jit
def _epilogue(Y, SO, B, y, off, mask, pid_n, m, n, M, N, RESID: tl.constexpr, HAS_B: tl.constexpr):
    """The projection's fp32 sums y of this tile out: into Y (+ bias, one rounding, as cuBLAS's bias epilogue); or
    (RESID) added into the residual stream Y, rounded first as add_rms_norm adds it, and SO[pid_n] each row's sum of
    squares over the new tile, for the next projection's norm."""
    dt = Y.dtype.element_ty
    if RESID:
        xn = (tl.load(Y + off, mask=mask, other=0.0).to(tl.float32) + y.to(dt).to(tl.float32)).to(dt)
        tl.store(Y + off, xn, mask=mask)
        xf = tl.where(mask, xn.to(tl.float32), 0.0)
        tl.store(SO + pid_n * M + m, tl.sum(xf * xf, 1), mask=m < M)
    else:
        if HAS_B:
            y = y + tl.load(B + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + off, y.to(dt), mask=mask)


@triton.jit
def _tma_kernel(w_desc, x_desc, X, S, LN, eps, B, Y, SO, P, C, M, N, K, tiles_k, per_split, splits, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, M_PAD: tl.constexpr, STAGES: tl.constexpr, HAS_B: tl.constexpr, GLU: tl.constexpr,
                PARTS: tl.constexpr, PDL: tl.constexpr, IN: tl.constexpr, T_S: tl.constexpr, T_PAD: tl.constexpr,
                RESID: tl.constexpr, LAST: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n0 = pid_n * BLOCK_N
    t0 = pid_k * per_split
    t1 = tl.minimum(t0 + per_split, tiles_k)  # (every program has one K tile at least)
    # Weights are loaded after the wait, in the pipeline's prologue. Peeling the first weight tile off the loop to
    # load it before the wait (as the GEMVs do) cost it a stage and made the 1.5B's step slower on the H100 at
    # 30ce819 (diag_gpu step: batch 8 1.837 against 1.744 ms, batch 32 2.153 against 2.050). Not kept.
    pdl_enter(PDL)
    m = tl.arange(0, M_PAD)
    if IN == 1:  # rms_norm(X) * LN: each row's sum of squares from the producer's per-tile sums, in a fixed order
        ts = tl.arange(0, T_PAD)
        ss = tl.load(S + ts[:, None] * M + m[None, :], mask=(ts < T_S)[:, None] & (m < M)[None, :], other=0.0)
        rstd = tl.math.rsqrt(tl.sum(ss, 0) / K + eps)
    acc = tl.zeros([BLOCK_N, M_PAD], tl.float32)
    acc_u = tl.zeros([BLOCK_N, M_PAD], tl.float32)
    for t in tl.range(t0, t1, num_stages=STAGES):
        if IN == 0:
            xt = tl.trans(x_desc.load([0, t * BLOCK_K]))
        else:  # the input made here from X, rounded as the kernel it replaces rounds (add_rms_norm, silu_mul)
            dx = X.dtype.element_ty
            kk = t * BLOCK_K + tl.arange(0, BLOCK_K)
            mk = (m < M)[:, None] & (kk < K)[None, :]
            if IN == 1:
                xv = tl.load(X + m[:, None] * K + kk[None, :], mask=mk, other=0.0).to(tl.float32)
                h = (xv * rstd[:, None]).to(dx).to(tl.float32)
                xin = (tl.load(LN + kk, mask=kk < K, other=0.0).to(tl.float32)[None, :] * h).to(dx)
            else:  # IN == 2: X is gate_up's [M, 2K] output, the input silu(gate) * up
                g = tl.load(X + m[:, None] * (2 * K) + kk[None, :], mask=mk, other=0.0).to(tl.float32)
                u = tl.load(X + m[:, None] * (2 * K) + K + kk[None, :], mask=mk, other=0.0).to(tl.float32)
                xin = ((g / (1.0 + tl.exp(-g))).to(dx).to(tl.float32) * u).to(dx)
            xt = tl.trans(xin)
        acc = tl.dot(w_desc.load([n0, t * BLOCK_K]), xt, acc)
        if GLU:  # the up rows of the same outputs, N rows further
            acc_u = tl.dot(w_desc.load([N + n0, t * BLOCK_K]), xt, acc_u)
    n = n0 + tl.arange(0, BLOCK_N)
    mask = (m < M)[:, None] & (n < N)[None, :]
    off = m[:, None] * N + n[None, :]
    y = tl.trans(acc)
    if PARTS:  # this split's fp32 partial sums; the reader adds the splits in order
        tl.store(P + pid_k * M * N + off, y, mask=mask)
    if LAST:  # the reader is the last split of this tile to finish (C: zeroed counters, one a tile): the sums in order
        tl.debug_barrier()  # (every thread's part stored before the release)
        if tl.atomic_add(C + pid_n, 1, sem="acq_rel", scope="gpu") == splits - 1:
            r = tl.load(P + off, mask=mask, other=0.0, cache_modifier=".cg")
            for i in range(1, splits):
                r += tl.load(P + i * M * N + off, mask=mask, other=0.0, cache_modifier=".cg")
            _epilogue(Y, SO, B, r, off, mask, pid_n, m, n, M, N, RESID, HAS_B)
    elif not PARTS:
        if GLU:  # as silu_mul on the stored projection: g and u rounded, silu(g) rounded, the product rounded
            dt = Y.dtype.element_ty
            g = y.to(dt).to(tl.float32)
            u = tl.trans(acc_u).to(dt).to(tl.float32)
            y = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32) * u
        _epilogue(Y, SO, B, y, off, mask, pid_n, m, n, M, N, RESID, HAS_B)


def _input(x: torch.Tensor, norm, silu: bool) -> torch.Tensor:
    """The projection's input as the kernels make it from `x` (norm, silu: see linear), in torch's ops."""
    if silu:
        g, u = x.float().chunk(2, dim=-1)
        return ((g / (1.0 + torch.exp(-g))).to(x.dtype).float() * u).to(x.dtype)
    if norm is not None:
        ss, ln, eps = norm
        h = (x.float() * torch.rsqrt(ss.sum(0) / x.shape[1] + eps)[:, None]).to(x.dtype)
        return (ln.float() * h.float()).to(x.dtype)
    return x


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *, glu: bool = False,
           parts: bool = False, config: tuple[int, int, int, int] | None = None,
           norm: tuple[torch.Tensor, torch.Tensor, float] | None = None, silu: bool = False,
           resid: torch.Tensor | None = None, counters: torch.Tensor | None = None,
           split: int | None = None) -> torch.Tensor:
    """x [M, K] (a few rows), w [N, K] -> x w^T (+ bias), [M, N]. `glu` (w a fused [gate; up]): silu(x gate^T) *
    (x up^T), [M, N/2]. `parts`: the config's K splits' fp32 partial sums [SPLIT, M, N] (for add_rms_norm's r; a
    config of one split gives one). Where TMA cannot address x or w, torch's ops (`parts`: the projection itself,
    which add_rms_norm takes as well).

    Folds of the kernels between projections (FOLD): `norm` (ss [T, M] fp32, ln [K], eps): x is the residual stream
    and the input rms_norm(x) * ln, each row's sum of squares the sum of ss's T rows (a `resid` projection's);
    `silu`: x is gate_up's [M, 2K] output and the input silu(gate) * up; `resid` [M, N], the residual stream:
    resid += x w^T, rounded as add_rms_norm adds it, and the result is each row's sum of squares over each output
    tile, [T, M] fp32, for the next projection's `norm`. `counters` with `parts` (int32 zeros, one for each output
    tile at least, used once): the last split of each output tile to finish adds the splits' sums in order (as
    add_rms_norm adds parts) and writes the projection [M, N] (or adds it into `resid`). `split`: the K splits of
    `parts` in place of the config's."""
    m = x.shape[0]
    k = x.shape[1] // 2 if silu else x.shape[1]
    n = w.shape[0] // 2 if glu else w.shape[0]
    mode = 2 if silu else 1 if norm is not None else 0
    last = parts and counters is not None
    if (norm is not None and silu) or (glu and (mode or resid is not None or last)) or (resid is not None and parts
                                                                                         and not last):
        raise ValueError("tma.linear: norm and silu exclude each other and glu; resid excludes glu, and needs "
                         "counters with parts")
    if not (_fits(w, w) if mode else _fits(x, w)):  # rows TMA cannot address (not 16-byte aligned): torch's ops
        y = F.linear(_input(x, norm, silu), w, bias)
        if glu:
            g, u = y.chunk(2, dim=-1)
            return F.silu(g) * u
        if resid is not None:
            resid.copy_((resid.float() + y.float()).to(resid.dtype))
            return resid.float().pow(2).sum(-1)[None]
        return y
    if (w.shape[1] != k or not x.is_contiguous() or not w.is_contiguous() or (glu and (w.shape[0] % 2 or bias is
                                                                                       not None or parts))):
        raise ValueError(f"tma.linear: x {tuple(x.shape)}, w {tuple(w.shape)} (glu {glu}, parts {parts}, bias "
                         f"{bias is not None}): needs [M, K] and [N, K], contiguous; glu on an even row count alone")
    m_pad = rows_pad(m)
    bn, bk, st, split_ = config or config_for(w.shape[0], k, m_pad, _sms(x.device.index or 0) if x.is_cuda else 132,
                                               glu)
    bk = min(bk, max(16, triton.next_power_of_2(k)))
    while glu and n % bn and bn > 16:  # a program's gate rows must not run into the up rows
        bn //= 2
    if glu and n % bn:
        raise ValueError(f"tma.linear: glu needs its {n} gate rows in whole blocks of 16")
    split = (split or split_) if parts else 1
    tiles_k = triton.cdiv(k, bk)
    per = triton.cdiv(tiles_k, split)
    splits = triton.cdiv(tiles_k, per)
    tiles_n = triton.cdiv(n, bn)
    if last and (counters.dtype != torch.int32 or counters.numel() < tiles_n):
        raise ValueError(f"tma.linear: the last split's reading needs {tiles_n} int32 counters")
    if resid is not None and (resid.shape != (m, n) or not resid.is_contiguous()):
        raise ValueError(f"tma.linear: resid {tuple(resid.shape)} for [{m}, {n}]")
    p = torch.empty(splits, m, n, device=x.device, dtype=torch.float32) if parts else None
    y = resid if resid is not None else p if parts and not last else torch.empty(m, n, device=x.device,
                                                                                  dtype=x.dtype)
    so = torch.empty(tiles_n, m, device=x.device, dtype=torch.float32) if resid is not None else y
    ss, ln, eps = norm if norm is not None else (y, y, 0.0)
    w_desc = TensorDescriptor.from_tensor(w, [bn, bk])
    _tma_kernel[(tiles_n, splits)](
        w_desc, w_desc if mode else TensorDescriptor.from_tensor(x, [m_pad, bk]), x, ss, ln, eps,
        bias if bias is not None else y, y, so, p if parts else y, counters if last else y, m, n, k, tiles_k, per,
        splits, BLOCK_N=bn, BLOCK_K=bk, M_PAD=m_pad, STAGES=st, HAS_B=bias is not None, GLU=glu, PARTS=parts,
        PDL=pdl_arg(x, tma=True), IN=mode, T_S=ss.shape[0] if mode == 1 else 1,
        T_PAD=triton.next_power_of_2(ss.shape[0]) if mode == 1 else 1, RESID=resid is not None, LAST=last,
        num_warps=4, launch_pdl=pdl(x))
    return so if resid is not None else y
