"""The expand half of a step's LoRA deltas over the adapter slots (`lora.LoraSlots`) as one Triton kernel.

`SlotRows.add_` adds `((x A^T) * M) B^T` to a projection's output, M the step's row-to-slot mask. On cuBLAS that is
three launches a projection (the shrink GEMM, the mask product, the expand GEMM with beta 1), 112 more a 28-layer
decode step. Here the mask product and the expand are one kernel: each program loads its rows of t = x A^T keeping
only the columns of each row's own slot (the mask, from the rows' slot ids; the other columns load as zeros), takes the
dot with its block of B's rows, and adds it to its block of the output in fp32, rounded once -- as the GEMM with beta 1
does. Rows of no slot (-1) add exactly zero. The shrink stays on cuBLAS: K runs to the intermediate size there, where
cuBLAS splits it across the GPU; here K is slots x rank (at most a few hundred) and the grid runs over the output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["M", "R"])
def _expand_kernel(T, B, Y, SLOT, M, N, SR, R, s_t, s_b, s_y, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = rows < M
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cm = cols < N
    slot = tl.load(SLOT + rows, mask=rm, other=-1)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, SR, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        km = kk < SR
        own = rm[:, None] & km[None, :] & ((kk // R)[None, :] == slot[:, None])
        t = tl.load(T + rows[:, None] * s_t + kk[None, :], mask=own, other=0.0)
        b = tl.load(B + cols[:, None] * s_b + kk[None, :], mask=cm[:, None] & km[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(t, tl.trans(b), acc, input_precision="ieee")
        else:
            acc = tl.dot(t, tl.trans(b), acc)
    yp = Y + rows[:, None] * s_y + cols[None, :]
    ym = rm[:, None] & cm[None, :]
    y = tl.load(yp, mask=ym, other=0.0)
    tl.store(yp, (y.to(tl.float32) + acc).to(Y.dtype.element_ty), mask=ym)


def expand_(y: torch.Tensor, t: torch.Tensor, b: torch.Tensor, slot_ids: torch.Tensor, rank: int) -> None:
    """y[i] += t[i, own] @ b[:, own]^T in place, `own` row i's slot's columns [s x rank, (s + 1) x rank) (none for
    slot -1). y [M, N] (rows contiguous), t [M, slots x rank], b [N, slots x rank], slot_ids [M] int64."""
    m, n = y.shape
    sr = t.shape[1]
    if (t.shape[0] != m or b.shape != (n, sr) or y.stride(1) != 1 or t.stride(1) != 1 or not b.is_contiguous()
            or slot_ids.shape != (m,)):
        raise ValueError(f"lora expand: y {tuple(y.shape)}, t {tuple(t.shape)}, b {tuple(b.shape)}, slots "
                         f"{tuple(slot_ids.shape)}")
    bm = min(64, max(16, triton.next_power_of_2(m)))
    bk = min(64, max(16, triton.next_power_of_2(sr)))
    bn = 64
    _expand_kernel[(triton.cdiv(n, bn), triton.cdiv(m, bm))](
        t, b, y, slot_ids, m, n, sr, rank, t.stride(0), b.stride(0), y.stride(0), BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_K=bk, IEEE=y.dtype == torch.float32, num_warps=4)
