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
import json
import re
from pathlib import Path

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
# Tried and removed (session 59, bench/results/tma_fold_h100_b73f129.json): the kernels between the projections
# folded into them -- o's epilogue adding into the residual with each tile's sums of squares, gate_up's and qkv's
# prologues normalising the residual from those sums, down's prologue making SiLU*mul, down's split-K parts added by
# each tile's last split (atomic counters), qkv and o split the same way. Correct (the reference forward in the
# interpreter, bit-exact graph replays on the H100) and slower at every level: H100 step replay, 1.5B batch 8/32,
# +1.5%/+3.7% with o's add+RMSNorm and SiLU*mul folded (two launches a layer fewer), +4.0%/+9.9% with down's too,
# +5.5%/+12% with qkv and o split. The eager kernel sums stay equal: every program of the consumer redoes the input's
# making in its main loop (registers, then shared memory for wgmma, where a TMA copy fed it), which costs the GEMMs
# what the small kernels took, while under PDL those kernels overlap the launches and cost less in the graph.
# Tried: gate_up's K split into 2-4 fp32 partial sums that silu_mul added in order (0079a48), for the 1.5B's 280
# gate_up tiles (2.12 an SM) to share out evenly. Slower at every split on the H100 at 135c6f0 (diag_gpu step,
# context 512, replay: split 2 +2.0%/+2.9% at batches 8/32, 4 +6.3%/+9.0%; tma_gu_split_h100_135c6f0.json): the
# uneven tiles are not what holds the batched GEMMs at ~71% of the copy rate. Removed.
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


# Configs set by shape in place of config_for's: {(n, k, m_pad): (BLOCK_N, BLOCK_K, STAGES, SPLIT[, num_warps])}, for
# `diag_gpu step-sweep --tma` (tuned where they run: in the step's graph, under PDL).
CONFIGS: dict[tuple[int, int, int], tuple[int, ...]] = {}
# Configs that sweep found on a device, shipped beside this module as tma_configs/<device name>.json (as vLLM ships
# its tuned kernel configs by device): config_for's rule came from the H100, whose slower memory weighs a kernel's
# ramp and tail differently.
TUNED_DIR = Path(__file__).with_name("tma_configs")


def tuned_path(device_name: str) -> Path:
    return TUNED_DIR / (re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json")


@functools.cache
def _tuned(index: int) -> dict[tuple[int, ...], tuple[int, ...]]:
    path = tuned_path(torch.cuda.get_device_name(index))
    if not path.exists():
        return {}
    return {tuple(e["shape"]): tuple(e["config"]) for e in json.loads(path.read_text())["configs"]}


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
def _tma_kernel(w_desc, x_desc, B, Y, M, N, tiles_k, per_split, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                M_PAD: tl.constexpr, STAGES: tl.constexpr, HAS_B: tl.constexpr, GLU: tl.constexpr,
                PARTS: tl.constexpr, PDL: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n0 = pid_n * BLOCK_N
    t0 = pid_k * per_split
    t1 = tl.minimum(t0 + per_split, tiles_k)  # (every program has one K tile at least)
    # Weights are loaded after the wait, in the pipeline's prologue. Peeling the first weight tile off the loop to
    # load it before the wait (as the GEMVs do) cost it a stage and made the 1.5B's step slower on the H100 at
    # 30ce819 (diag_gpu step: batch 8 1.837 against 1.744 ms, batch 32 2.153 against 2.050). Not kept.
    pdl_enter(PDL)
    acc = tl.zeros([BLOCK_N, M_PAD], tl.float32)
    acc_u = tl.zeros([BLOCK_N, M_PAD], tl.float32)
    for t in tl.range(t0, t1, num_stages=STAGES):
        xt = tl.trans(x_desc.load([0, t * BLOCK_K]))
        acc = tl.dot(w_desc.load([n0, t * BLOCK_K]), xt, acc)
        if GLU:  # the up rows of the same outputs, N rows further
            acc_u = tl.dot(w_desc.load([N + n0, t * BLOCK_K]), xt, acc_u)
    m = tl.arange(0, M_PAD)
    n = n0 + tl.arange(0, BLOCK_N)
    mask = (m < M)[:, None] & (n < N)[None, :]
    off = m[:, None] * N + n[None, :]
    y = tl.trans(acc)
    if PARTS:  # this split's fp32 partial sums; the reader adds the splits in order
        tl.store(Y + pid_k * M * N + off, y, mask=mask)
    else:
        dt = Y.dtype.element_ty
        if HAS_B:  # added to the fp32 sum, one rounding (as cuBLAS's bias epilogue)
            y = y + tl.load(B + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
        if GLU:  # as silu_mul on the stored projection: g and u rounded, silu(g) rounded, the product rounded
            g = y.to(dt).to(tl.float32)
            u = tl.trans(acc_u).to(dt).to(tl.float32)
            y = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32) * u
        tl.store(Y + off, y.to(dt), mask=mask)


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *, glu: bool = False,
           parts: bool = False, config: tuple[int, ...] | None = None) -> torch.Tensor:
    """x [M, K] (a few rows), w [N, K] -> x w^T (+ bias), [M, N]. `glu` (w a fused [gate; up]): silu(x gate^T) *
    (x up^T), [M, N/2]. `parts`: the config's K splits' fp32 partial sums [SPLIT, M, N] (for add_rms_norm's r; a
    config of one split gives one). Where TMA cannot address x or w, torch's ops (`parts`: the projection itself,
    which add_rms_norm takes as well)."""
    m, k = x.shape
    n = w.shape[0] // 2 if glu else w.shape[0]
    if not _fits(x, w):  # rows TMA cannot address (not 16-byte aligned): torch's ops, the same roundings
        y = F.linear(x, w, bias)
        if glu:
            g, u = y.chunk(2, dim=-1)
            return F.silu(g) * u
        return y
    if (w.shape[1] != k or not x.is_contiguous() or not w.is_contiguous() or (glu and (w.shape[0] % 2 or bias is
                                                                                       not None or parts))):
        raise ValueError(f"tma.linear: x {tuple(x.shape)}, w {tuple(w.shape)} (glu {glu}, parts {parts}, bias "
                         f"{bias is not None}): needs [M, K] and [N, K], contiguous; glu on an even row count alone")
    m_pad = rows_pad(m)
    key = (w.shape[0], k, m_pad)
    cfg = (config or CONFIGS.get(key) or (_tuned(x.device.index or 0).get(key) if x.is_cuda and not glu else None)
           or config_for(w.shape[0], k, m_pad, _sms(x.device.index or 0) if x.is_cuda else 132, glu))
    bn, bk, st, split = cfg[:4]
    warps = cfg[4] if len(cfg) > 4 else 4
    bk = min(bk, max(16, triton.next_power_of_2(k)))
    while glu and n % bn and bn > 16:  # a program's gate rows must not run into the up rows
        bn //= 2
    if glu and n % bn:
        raise ValueError(f"tma.linear: glu needs its {n} gate rows in whole blocks of 16")
    if not parts:
        split = 1
    tiles_k = triton.cdiv(k, bk)
    per = triton.cdiv(tiles_k, split)
    splits = triton.cdiv(tiles_k, per)
    y = (torch.empty(splits, m, n, device=x.device, dtype=torch.float32) if parts
         else torch.empty(m, n, device=x.device, dtype=x.dtype))
    _tma_kernel[(triton.cdiv(n, bn), splits)](
        TensorDescriptor.from_tensor(w, [bn, bk]), TensorDescriptor.from_tensor(x, [m_pad, bk]),
        bias if bias is not None else y, y, m, n, tiles_k, per, BLOCK_N=bn, BLOCK_K=bk, M_PAD=m_pad, STAGES=st,
        HAS_B=bias is not None, GLU=glu, PARTS=parts, PDL=pdl_arg(x, tma=True), num_warps=warps, launch_pdl=pdl(x))
    return y
