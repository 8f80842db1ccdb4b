"""Triton paged-decode attention (flash-decoding): each program reads one KV head's blocks of one sequence
in place from the paged cache, over a slice of the context (split-K), so batch 1 still fills the GPU.
Partial results are merged with a log-sum-exp reduction. Shapes are fixed per batch bucket, so the call can
be captured in a CUDA graph (context length only changes loop bounds inside the kernel).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from token_scheduler.model.triton_ops import pdl, pdl_arg, pdl_enter
from tokenpool import env


@triton.jit
def _kv_tile(KV, BT, b, kvh, j, j1, t, d, ctx, last, window, s_btb, s_kvb, s_kvt, s_kvh, off_k, off_v,
             BLOCK: tl.constexpr):
    """K and V of cache blocks j.. (NBI of them, each token's block id gathered) of row b, kv head kvh, masked to
    the split's blocks (< j1), the positions read (< last) and the window."""
    jb = j + t // BLOCK
    blk = tl.load(BT + b * s_btb + jb, mask=jb < j1, other=0).to(tl.int64)
    return _kv_at(KV, blk, j, j1, t, d, ctx, last, window, s_kvb, s_kvt, s_kvh, off_k, off_v, kvh, BLOCK)


@triton.jit
def _kv_at(KV, blk, j, j1, t, d, ctx, last, window, s_kvb, s_kvt, s_kvh, off_k, off_v, kvh, BLOCK: tl.constexpr):
    """`_kv_tile` with each token's cache block id `blk` given."""
    jb = j + t // BLOCK
    pos = jb * BLOCK + t % BLOCK
    valid = (jb < j1) & (pos < last)
    if window > 0:
        valid = valid & (pos >= ctx - window)
    base = KV + blk[:, None] * s_kvb + (t % BLOCK)[:, None] * s_kvt + kvh * s_kvh + d[None, :]
    k = tl.load(base + off_k, mask=valid[:, None], other=0.0)
    v = tl.load(base + off_v, mask=valid[:, None], other=0.0)
    return k, v, valid


@triton.jit
def _attend_tile(q, k, v, valid, m_i, l_i, acc, scale, IEEE: tl.constexpr):
    """The online softmax's update by one tile of K and V."""
    if IEEE:  # fp32 model: full-precision dots (Triton's fp32 default is TF32, ~1e-3 relative error)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    else:
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
    return m_new, l_i, acc


@triton.jit
def _own_token(q, kn, vn, scale, GROUP_PAD: tl.constexpr, D: tl.constexpr):
    """The online softmax's state after the row's own new token alone (its K and V given): counted apart from the
    cache walk by split 0 where the walk stops before it (ROPE, PREFETCH)."""
    m_i = tl.sum(q.to(tl.float32) * kn.to(tl.float32)[None, :], 1) * scale
    l_i = tl.full([GROUP_PAD], 1.0, tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32) + vn.to(tl.float32)[None, :]
    return m_i, l_i, acc


# s_btb (the block-table row stride) follows the longest context in the batch: specialising on it (Triton
# compiles separate variants for 1 and multiples of 16) would recompile mid-serving.
@triton.jit(do_not_specialize=["s_btb"])
def _paged_decode_kernel(
    Q, KV, BT, CTX, Out, M, L,
    scale, window,
    s_qb, s_qh, s_kvb, s_kvt, s_kvh, s_btb, s_ob, s_oh, s_os, s_mb, s_mh,
    off_k, off_v,
    NUM_SPLITS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    BLOCK: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr, NBI: tl.constexpr,
    DIRECT: tl.constexpr,
    ROPE: tl.constexpr = False, COS=None, SIN=None, POS=None, SB=None, SO=None, H: tl.constexpr = 0,
    KVH: tl.constexpr = 0, PREFETCH: tl.constexpr = False, PIPE: tl.constexpr = False,
):
    # PREFETCH (see PREFETCH_KV): the first tile of the cached context is loaded before the wait on the kernel
    # before (which writes this step's new K/V and q, never an older position); the new token's K/V are read after
    # it, apart, as ROPE's are
    if not PREFETCH:
        pdl_enter(PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    ctx = tl.load(CTX + b)
    last = ctx  # cache positions read: < last (ROPE, PREFETCH: the row's own new token is taken apart)
    if ROPE or PREFETCH:
        last = ctx - 1
    nblk = tl.cdiv(last, BLOCK)  # (so every block of a split's range has a position to read: no all -inf tile)
    jlo = 0
    if window > 0:
        jlo = tl.maximum(ctx - window, 0) // BLOCK
    per = tl.cdiv(nblk - jlo, NUM_SPLITS)
    j0 = jlo + sp * per
    j1 = tl.minimum(j0 + per, nblk)

    g = tl.arange(0, GROUP_PAD)
    gmask = g < GROUP
    heads = kvh * GROUP + g
    d = tl.arange(0, D)
    # NBI cache blocks an iteration: each token's block id is gathered, so all NBI blocks' K and V loads are in
    # flight at once (one block an iteration waits out a block-table load, then a K/V load, per 16 tokens)
    t = tl.arange(0, BLOCK * NBI)
    if PREFETCH:
        k_first, v_first, valid_first = _kv_tile(KV, BT, b, kvh, j0, j1, t, d, ctx, last, window, s_btb, s_kvb,
                                                 s_kvt, s_kvh, off_k, off_v, BLOCK)
        pdl_enter(PDL)
    q = tl.load(Q + b * s_qb + heads[:, None] * s_qh + d[None, :], mask=gmask[:, None], other=0.0)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    if ROPE:  # Q is the fused qkv projection [B, (H + 2 KVH) D]: RoPE here, and this row's own K/V from registers
        dt = q.dtype
        pos_b = tl.load(POS + b)
        c = tl.load(COS + pos_b * D + d).to(dt).to(tl.float32)
        sn = tl.load(SIN + pos_b * D + d).to(dt).to(tl.float32)
        rot = (d + D // 2) % D  # rotate_half's partner of each offset, negated in the first half
        sign = tl.where(d < D // 2, -1.0, 1.0)
        qr = tl.load(Q + b * s_qb + heads[:, None] * s_qh + rot[None, :], mask=gmask[:, None], other=0.0)
        q = ((q.to(tl.float32) * c[None, :]).to(dt).to(tl.float32)
             + (sign[None, :] * qr.to(tl.float32) * sn[None, :]).to(dt).to(tl.float32)).to(dt)
        kq = Q + b * s_qb + (H + kvh) * s_qh
        kn = ((tl.load(kq + d).to(tl.float32) * c).to(dt).to(tl.float32)
              + (sign * tl.load(kq + rot).to(tl.float32) * sn).to(dt).to(tl.float32)).to(dt)
        vn = tl.load(Q + b * s_qb + (H + KVH + kvh) * s_qh + d)
        if sp == 0:  # one program a (row, kv head) writes them and counts the new token; the others never read it
            slot = KV + tl.load(SB + b).to(tl.int64) * s_kvb + tl.load(SO + b).to(tl.int64) * s_kvt + kvh * s_kvh
            tl.store(slot + off_k + d, kn)
            tl.store(slot + off_v + d, vn)
            m_i, l_i, acc = _own_token(q, kn, vn, scale, GROUP_PAD, D)
    elif PREFETCH:  # the new token's K/V, just written to the cache by the kernel before: counted apart by split 0
        if sp == 0:
            pn = ctx - 1
            slot = (KV + tl.load(BT + b * s_btb + pn // BLOCK).to(tl.int64) * s_kvb + (pn % BLOCK) * s_kvt
                    + kvh * s_kvh)
            m_i, l_i, acc = _own_token(q, tl.load(slot + off_k + d), tl.load(slot + off_v + d), scale, GROUP_PAD, D)
    j_start = j0
    if PREFETCH:
        if j0 < j1:
            m_i, l_i, acc = _attend_tile(q, k_first, v_first, valid_first, m_i, l_i, acc, scale, IEEE)
        j_start = j0 + NBI
    if PIPE:  # each tile's block ids loaded an iteration ahead (see PIPELINE_IDS)
        jn = j_start + t // BLOCK
        blk = tl.load(BT + b * s_btb + jn, mask=jn < j1, other=0)
        for j in range(j_start, j1, NBI):
            jn = j + NBI + t // BLOCK
            blk_next = tl.load(BT + b * s_btb + jn, mask=jn < j1, other=0)
            k, v, valid = _kv_at(KV, blk.to(tl.int64), j, j1, t, d, ctx, last, window, s_kvb, s_kvt, s_kvh, off_k,
                                 off_v, kvh, BLOCK)
            m_i, l_i, acc = _attend_tile(q, k, v, valid, m_i, l_i, acc, scale, IEEE)
            blk = blk_next
    else:
        for j in range(j_start, j1, NBI):
            k, v, valid = _kv_tile(KV, BT, b, kvh, j, j1, t, d, ctx, last, window, s_btb, s_kvb, s_kvt, s_kvh, off_k,
                                   off_v, BLOCK)
            m_i, l_i, acc = _attend_tile(q, k, v, valid, m_i, l_i, acc, scale, IEEE)
    if DIRECT:  # one split: the result itself (what the combine computes of one part, bit for bit)
        o_ptr = Out + b * s_ob + heads[:, None] * s_oh + d[None, :]
        tl.store(o_ptr, (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=gmask[:, None])
        return
    o_ptr = Out + b * s_ob + heads[:, None] * s_oh + sp * s_os + d[None, :]
    tl.store(o_ptr, acc, mask=gmask[:, None])
    ml = b * s_mb + heads * s_mh + sp
    tl.store(M + ml, m_i, mask=gmask)
    tl.store(L + ml, l_i, mask=gmask)


@triton.jit
def _combine_kernel(Part, M, L, Y, S: tl.constexpr, S_PAD: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr):
    # A separate kernel: merging in the attention kernel (the last split program of a kv head merges its group,
    # found with an atomic counter) measured 3 us a layer slower on the H100 at batch 1 than this launch.
    pdl_enter(PDL)
    bh = tl.program_id(0)  # flattened (batch, head)
    sp = tl.arange(0, S_PAD)
    sm = sp < S
    m = tl.load(M + bh * S + sp, mask=sm, other=float("-inf"))
    l_ = tl.load(L + bh * S + sp, mask=sm, other=0.0)
    mmax = tl.max(m, 0)
    w = tl.where(sm, tl.exp(m - mmax), 0.0)  # empty splits have m = -inf: weight 0
    d = tl.arange(0, D)
    o = tl.load(Part + (bh * S + sp[:, None]) * D + d[None, :], mask=sm[:, None], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.sum(l_ * w, 0)
    tl.store(Y + bh * D + d, out.to(Y.dtype.element_ty))


SPLITS = (1, 2, 4, 8, 16, 32)  # each value is one compiled variant of both kernels

# Cache blocks a program reads an iteration (NBI; TOKENPOOL_ATTN_BLOCKS_PER_ITER) and the kernel's software-pipeline
# stages. A program's walk over its blocks is a chain of dependent loads (block id, then K and V), so one 16-token
# block an iteration left the walk latency-bound once a split holds several blocks: on the H200 (`diag_gpu step`,
# 756bfdb, attn_blocks_h200_756bfdb.json) 4 blocks an iteration in 2 stages took a 7B batch-32 step at context 512
# from 5.05 to 4.74 ms (at 2048: 6.74 -> 5.40) and was as fast or faster at every batch and context measured
# (batch 1 included). 8 warps or splits filling the GPU 4 times: within 1% either way at context 512.
BLOCKS_PER_ITER = env.ATTN_BLOCKS_PER_ITER.integer()
# The paged-decode kernel's launch options (None: Triton's default; knobs for `diag_gpu step`). 8 warps: the same
# time as 4 without RoPE folded in, ~0.5% faster with it (5a1fec0, attn_rope_h200_5a1fec0.json).
DECODE_WARPS: int | None = 8
DECODE_STAGES: int | None = 2

# A program's cache walk loads each tile's block ids, then the tile's K and V at them: Triton's software pipeliner
# (num_stages) then puts the ids a stage ahead and keeps a single K/V buffer, so no K/V load is in flight while a tile
# is multiplied -- every iteration waits out a whole HBM round trip (the sm_90 build at any num_stages: one 64x128
# buffer each, `python -m load_tests.triton_offline decode`). PIPELINE_IDS: the block ids are loaded an iteration
# ahead, in registers, so a tile's K/V addresses need no load of the same iteration; at PIPE_STAGES 3 the pipeliner
# then double-buffers K and V (2x64x128 each, 72 KB of shared memory) and the next tile's copies are in flight while
# this one is multiplied. The same tiles in the same order: bit-identical results. Measured on the H200 at 21057d2
# (diag_attn, diag_gpu step; bench/results/attn_pipe_h200_21057d2.json): alone, 5-15% faster where a split walks
# several tiles (2 splits: 7B batch 32 500 -> 476 us, 1.5B batch 8 325 -> 275), within 3% either way at the splits the
# engine picks; in the decode step at context 512, 0.3-1.2% slower at batches 1, 8 and 32 on both models (its larger
# shared memory and, at batch 1, registers). Off (TOKENPOOL_ATTN_PIPE=1: on).
PIPELINE_IDS = env.ATTN_PIPE.on()
PIPE_STAGES: int | None = 3


# A decode step's attention launched with programmatic dependent launch (one row: the batch-1 step) waits on the qkv
# projection before it, which writes q and the new token's K/V; every older cache position was written by steps
# before. PREFETCH_KV: the kernel loads its first tile of those (with NBI blocks an iteration, at batch 1 and context
# 512 a split's whole range) before the wait, so the cache reads overlap the projection's tail; the new token is
# read after it and counted apart (as with RoPE folded in). H200, graph replay (4bd0bf8, attn_prefetch_h200_4bd0bf8.json):
# batch-1 steps 0.98 (1.5B) and 0.988 (7B) of the same kernel loading after the wait at context 512, 0.97 and 0.986
# at 2048. Not for several rows of one sequence (a prefill taken row by row reads its rows' new K/V: `_prefetches`).
# TOKENPOOL_ATTN_PREFETCH=0: off.
PREFETCH_KV = env.ATTN_PREFETCH.on()

# Batched decode steps (their projections on cuBLAS) launch the attention and its combine plainly. The pair alone
# launched with PDL up to 64 rows measured within 0.4% either way of that at batches 8 and 32 on the H200, and 0.4-2.7%
# slower with its early cache tile too (diag_gpu step, fda154f, attn_batched_h200_fda154f.json): not kept.


# Programs a paged-decode launch aims at, per SM (`num_splits_for`).
FILL = 2
# Tried: a fewest-blocks-a-split rule (2 or 3: a short context in fewer splits, the splits past it exiting at once and
# the combine leaving them out, counted from the context; 466a670). H100 step replay, context 512: 1.5B batch 1
# 1.309/1.310 -> 1.316 (2) / 1.309 (3) ms, context 2048 1.379/1.380 -> 1.383/1.380, 7B 4.900/4.896 -> 4.901/4.890
# (bench/results/min_blocks_per_split_h100_466a670.json): nothing; the batched steps looked up to 3% slower with the
# combine's extra dependent load of the context, so it was removed. (16 splits' 2% at context 512 came with half the
# programs and half the combine's loads, not with the block ranges.)


def num_splits_for(batch: int, kv_heads: int, sms: int = 132) -> int:
    """Splits so that batch x kv_heads x splits fills the GPU about FILL times, rounded down to a power of two:
    prefill rows make the batch vary widely, and every distinct value would be a JIT compile mid-serving."""
    want = max(1, min(32, (FILL * sms) // max(1, batch * kv_heads)))
    return max(s for s in SPLITS if s <= want)


def warm_up(q: torch.Tensor, kv: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
            scale: float, window=None, rope=None, rope_one_row: bool = True) -> None:
    """Compile every split variant now (at engine start) rather than at first use while serving: for one
    sequence and for several, which differ in launch mode (`pdl`). q, block_tables, context_lens: one row (its
    first block a scratch block). `rope` (a RopeCache): the variants with RoPE and the KV write folded in too,
    writing into that scratch block -- for one row only if `rope_one_row` (False where one-token steps run the
    GEMV path, whose qkv epilogue does RoPE: their folded variant would never run)."""
    rows = [(q, block_tables, context_lens)]
    if pdl(q):  # one row launches apart from several: its own variants
        rows.append((q.repeat(2, 1, 1), block_tables.repeat(2, 1), context_lens.repeat(2)))
    for i, (qq, bt, ctx) in enumerate(rows):
        fold = rope is not None and (rope_one_row or len(rows) == 1 or i > 0)
        if fold:  # the fused qkv of these rows, all at position 0 of the scratch block
            n = qq.shape[0]
            qkv = torch.zeros(n, (qq.shape[1] + 2 * kv.shape[4]) * qq.shape[2], device=q.device, dtype=q.dtype)
            zero = torch.zeros(n, dtype=torch.long, device=q.device)
            folded = (rope.cos, rope.sin, zero, bt[:, 0].long(), zero)
        for s in SPLITS:
            paged_decode(qq, kv, 0, bt, ctx, scale, window, num_splits=s)
            if fold:
                paged_decode(qkv, kv, 0, bt, ctx, scale, window, num_splits=s, rope=folded)


# Rows up to which a decode step's attention launched with PDL loads its first cache tile early (PREFETCH_KV): one.
# Several rows launch with PDL only inside llama's small-batch GEMV steps (off by default). On the H200 the early tile
# made batched steps' attention launched with PDL 0.4-2.7% slower at batches 8 and 32 (fda154f), and without PDL
# (loaded before q, outside the pipelined cache walk) the attention alone 5-15% slower (diag_attn, a088d3a).
PREFETCH_ROWS = 1


def _prefetches(q: torch.Tensor, own_rows: bool, rope: bool) -> bool:
    """Whether the paged decode over `q` loads its first cache tile before the PDL wait: launched with PDL, and no row
    reads another row's new K/V -- one row alone (any decode-shaped row's new token is the last of its context,
    written before the attention), or up to PREFETCH_ROWS of a decode step's own rows (`own_rows`, or RoPE folded in,
    which implies them)."""
    return PREFETCH_KV and pdl(q) and (q.shape[0] == 1 or ((own_rows or rope) and q.shape[0] <= PREFETCH_ROWS))


def paged_decode(q, kv, layer, block_tables, context_lens, scale, window=None, num_splits=None, rope=None,
                 own_rows: bool = False, prefetch: bool | None = None):
    """q: [B, H, D]; kv: [NB, L, 2, BS, KVH, D]; block_tables: [B, MB] int32; context_lens: [B] int32.

    `rope` (cos, sin, positions, slot_blocks, slot_offsets): q is the fused qkv projection [B, (H + 2 KVH) D] of one
    new token a row, each row a different sequence, before RoPE (no q/k norm): the kernel does `rope_and_write_kv`'s
    job too -- q and the new k rotated in registers, the new k and v written to their cache slot and counted from
    registers (the cache walk stops before them, so no program reads a slot another writes) -- one launch a layer
    fewer. The same arithmetic to fp32 summation order (the new token's score is summed apart from the tile dots).

    `own_rows`: every row is a different sequence's one new token, the last of its context, its K/V already in the
    cache (a decode step's rows): launched with PDL, the kernel then loads its first cache tile before waiting on the
    kernel before (PREFETCH_KV, `_prefetches`; `prefetch` forces it either way, for tests)."""
    _, _, _, BS, KVH, D = kv.shape
    B = q.shape[0]
    if rope is not None:
        q = q.view(B, -1, D)  # [B, H + 2 KVH, D]: q heads, then k, then v
    H = q.shape[1] - (0 if rope is None else 2 * KVH)
    group = H // KVH
    S = num_splits or num_splits_for(B, KVH)
    launch_pdl = pdl(q)
    if prefetch is None:
        prefetch = _prefetches(q, own_rows, rope is not None)
    out = torch.empty(B, H, D, device=q.device, dtype=q.dtype)
    stages = PIPE_STAGES if PIPELINE_IDS else DECODE_STAGES
    if S == 1:  # the kernel writes the result: no partials, no combine launch
        o, m, lsum = out.unsqueeze(2), out[:, :, 0], out[:, :, 0]
    else:
        o = torch.empty(B, H, S, D, device=q.device, dtype=torch.float32)
        m = torch.empty(B, H, S, device=q.device, dtype=torch.float32)
        lsum = torch.empty_like(m)
    s_kvb, s_kvl, s_kv2, s_kvt, s_kvh, _ = kv.stride()
    _paged_decode_kernel[(B, KVH, S)](
        q, kv, block_tables, context_lens, o, m, lsum,
        scale, window or 0,
        q.stride(0), q.stride(1), s_kvb, s_kvt, s_kvh, block_tables.stride(0),
        o.stride(0), o.stride(1), o.stride(2), m.stride(0), m.stride(1),
        layer * s_kvl, layer * s_kvl + s_kv2,
        NUM_SPLITS=S, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), BLOCK=BS, D=D,
        IEEE=q.dtype == torch.float32, PDL=pdl_arg(q), NBI=BLOCKS_PER_ITER, DIRECT=S == 1, launch_pdl=launch_pdl,
        PREFETCH=prefetch, PIPE=PIPELINE_IDS,
        **({} if DECODE_WARPS is None else {"num_warps": DECODE_WARPS}),
        **({} if stages is None else {"num_stages": stages}),
        **({} if rope is None else dict(zip(("COS", "SIN", "POS", "SB", "SO"), rope), ROPE=True, H=H, KVH=KVH)),
    )
    if S == 1:
        return out
    _combine_kernel[(B * H,)](o, m, lsum, out, S=S, S_PAD=triton.next_power_of_2(S), D=D, num_warps=4,
                              PDL=pdl_arg(q), launch_pdl=launch_pdl)
    return out
