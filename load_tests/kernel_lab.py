"""Kernel candidates measured by `diag_gpu rows-triton` before any joins the engine (none is used by it).

`gemv_few`: a few tokens (M <= 8) through one projection on the CUDA cores, the batch-1 GEMV's broadcast multiply
with a token axis: each program streams BLOCK_N weight rows along K and keeps [M_PAD, BLOCK_N, BLOCK_K] fp32
partial products, summed over K at the end. At up to 8 tokens each weight element costs 8 FMAs, under what the
H200's CUDA cores do per byte of HBM read, so the projection stays a weight stream without `tl.dot`, whose
smallest tile (16 rows) pads 8 tokens to 16 and whose operands go through shared memory. MODE_NORM normalises
each row first (a pass over x + r, then the tiles), rounding as the eager ops do; no epilogues (RoPE, GLU) yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from token_scheduler.model.triton_gemv import MODE_NORM, MODE_PLAIN, rows_rms, rows_tile
from token_scheduler.model.triton_ops import pdl, pdl_enter


@triton.jit(do_not_specialize=["M"])
def _gemv_few_kernel(X, R, NW, XOUT, W, Y, eps, M, N, K: tl.constexpr, MODE: tl.constexpr, HAS_R: tl.constexpr,
                     M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    dt = Y.dtype.element_ty
    m = tl.arange(0, M_PAD)
    mm = m < M
    kk = tl.arange(0, BLOCK_K)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    wp = W + rows[:, None].to(tl.int64) * K + kk[None, :]
    w = tl.load(wp, mask=rmask[:, None] & (kk < K)[None, :], other=0.0)  # before the wait: weights are read-only
    pdl_enter(PDL)
    inv = tl.zeros([M_PAD], tl.float32)
    if MODE == 1:
        inv = rows_rms(X, R, XOUT, m, mm, kk, pid, eps, K, BLOCK_K, HAS_R, dt)
    acc = tl.zeros([M_PAD, BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + kk
        km = cols < K
        # the next tile is requested before this one is used: two tiles in flight a program (masked off past K)
        w_next = tl.load(wp + k0 + BLOCK_K, mask=rmask[:, None] & (cols + BLOCK_K < K)[None, :], other=0.0)
        x = rows_tile(X, R, NW, m, mm, cols, km, inv, K, MODE, HAS_R, dt)
        acc += w.to(tl.float32)[None, :, :] * x.to(tl.float32)[:, None, :]
        w = w_next
    out = tl.sum(acc, 2)
    tl.store(Y + m[:, None] * N + rows[None, :], out.to(dt), mask=mm[:, None] & rmask[None, :])


FEW_MAX = 8


def gemv_few(x: torch.Tensor, w: torch.Tensor, *, mode: int = MODE_PLAIN, r: torch.Tensor | None = None,
             norm_w: torch.Tensor | None = None, eps: float = 0.0, config: tuple[int, int, int] = (8, 128, 4)
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x: [M, K] with M <= FEW_MAX; w: [N, K]; mode MODE_PLAIN or MODE_NORM. Returns (y [M, N], the new residual
    x + r or None). config: (BLOCK_N, BLOCK_K, num_warps)."""
    n, k = w.shape
    m = x.shape[0]
    if (m > FEW_MAX or mode not in (MODE_PLAIN, MODE_NORM) or x.shape != (m, k) or not x.is_contiguous()
            or not w.is_contiguous() or (r is not None and (r.shape != x.shape or not r.is_contiguous()))):
        raise ValueError(f"gemv_few: x {tuple(x.shape)} for w {tuple(w.shape)} (mode {mode}); needs [M <= "
                         f"{FEW_MAX}, {k}], contiguous, mode PLAIN or NORM")
    bn, bk, nw = config
    bk = min(bk, max(16, triton.next_power_of_2(k)))
    x_out = torch.empty_like(x) if (mode == MODE_NORM and r is not None) else None
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    _gemv_few_kernel[(triton.cdiv(n, bn),)](
        x, r if r is not None else x, norm_w if norm_w is not None else x, x_out if x_out is not None else x, w, y,
        eps, m, n, K=k, MODE=mode, HAS_R=r is not None, M_PAD=max(2, triton.next_power_of_2(m)), BLOCK_N=bn,
        BLOCK_K=bk, PDL=pdl(x), num_warps=nw, launch_pdl=pdl(x))
    return y, x_out
