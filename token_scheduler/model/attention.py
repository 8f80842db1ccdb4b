"""Paged attention over the KV cache `[num_blocks, num_layers, 2, block_size, kv_heads, head_dim]`.

Two shapes of batch:
- varlen (prefill, chunked prefill, mixed): each sequence attends its new tokens to its whole context;
  done per sequence with SDPA over the sequence's gathered blocks.
- decode (every sequence has one new token): one batched call over padded block tables, fixed shapes, so
  it can be captured in a CUDA graph. On CUDA a Triton paged-decode kernel reads the blocks in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    # Where each new token's K/V goes: block id and offset in block, [T] each.
    slot_blocks: torch.Tensor
    slot_offsets: torch.Tensor
    block_size: int
    # decode: block_tables [B, max_blocks] (int32/int64), context_lens [B] (after this step)
    decode: bool = False
    block_tables: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None
    # varlen: per sequence (q_start, q_len, ctx_len) and its block table (long tensor on device)
    seqs: list[tuple[int, int, int]] = field(default_factory=list)
    seq_block_tables: list[torch.Tensor] = field(default_factory=list)
    use_triton: bool = False
    # decode: every row a different sequence's one new token, the last of its context (a decode step's rows; not a
    # prefill taken row by row, whose rows read each other's K/V): the attention may write a row's K/V itself
    own_rows: bool = False
    # varlen batch with decode rows (one new token each) among prefill chunks: those rows go through the
    # batched decode attention in one call (row index in q [n], padded block tables [n, mb], context lens [n])
    # instead of one SDPA per sequence -- per-sequence calls are launch-bound with dozens of decodes.
    mixed_rows: torch.Tensor | None = None
    mixed: AttentionMetadata | None = None
    hf_exact: bool = False  # SDPA called exactly as HF calls it (slower; see attend)
    # What every layer of one step derives alike (the eager decode's block table, mask): made by the first layer.
    derived: dict = field(default_factory=dict, repr=False, compare=False)


def write_kv(kv: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor, m: AttentionMetadata) -> None:
    kv[m.slot_blocks, layer, 0, m.slot_offsets] = k
    kv[m.slot_blocks, layer, 1, m.slot_offsets] = v


def _mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    m = k_pos[None, :] <= q_pos[:, None]
    if window:
        m &= k_pos[None, :] > q_pos[:, None] - window
    return m


def attend(q: torch.Tensor, kv: torch.Tensor, layer: int, m: AttentionMetadata, cfg) -> torch.Tensor:
    """q: [T, H, D] (RoPE applied) -> [T, H, D]."""
    scale = cfg.head_dim**-0.5
    window = cfg.sliding_window
    if m.decode:
        if m.use_triton:
            from token_scheduler.model.triton_decode import paged_decode

            return paged_decode(q, kv, layer, m.block_tables, m.context_lens, scale, window, own_rows=m.own_rows)
        return _decode_torch(q, kv, layer, m, scale, window)
    out = torch.empty_like(q)
    if m.mixed_rows is not None:
        out[m.mixed_rows] = attend(q[m.mixed_rows], kv, layer, m.mixed, cfg)
    bs = m.block_size
    for (q0, qn, ctx), bt in zip(m.seqs, m.seq_block_tables):
        nb = -(-ctx // bs)
        k = kv[bt[:nb], layer, 0].flatten(0, 1)[:ctx]  # [ctx, KVH, D]
        v = kv[bt[:nb], layer, 1].flatten(0, 1)[:ctx]
        # hf_exact: 4-D [1, heads, len, D] as HF passes them. SDPA picks its backend by the inputs' rank and
        # layout too, and each backend rounds differently: this call matches HF's bf16 logits bit for bit on
        # the H100 (first-token top-1 32/32), but with GQA it lands on the slow math backend (a loaded pool's
        # steps went from 6 to 77 ms). Default: the 3-D call, a fused backend.
        qs = q[q0 : q0 + qn].transpose(0, 1)
        kt, vt = k.transpose(0, 1), v.transpose(0, 1)
        if m.hf_exact:
            qs, kt, vt = qs[None], kt[None], vt[None]
        if ctx == qn and not (window and ctx > window):
            o = F.scaled_dot_product_attention(qs, kt, vt, is_causal=True, scale=scale, enable_gqa=True)
        elif m.hf_exact and qn == 1 and not (window and ctx > window):
            # HF's decode: one query over its whole cache, no mask, the cache contiguous [1, heads, len, D]
            o = F.scaled_dot_product_attention(qs, kt.contiguous(), vt.contiguous(), scale=scale, enable_gqa=True)
        else:
            kp = torch.arange(ctx, device=q.device)
            mask = _mask(kp[ctx - qn :], kp, window)
            o = F.scaled_dot_product_attention(qs, kt, vt, attn_mask=mask, scale=scale, enable_gqa=True)
        out[q0 : q0 + qn] = (o[0] if m.hf_exact else o).transpose(0, 1)
    return out


def _decode_torch(q, kv, layer, m: AttentionMetadata, scale, window) -> torch.Tensor:
    d = m.derived.get(("decode", window))
    if d is None:  # once per step, not per layer (the eager CPU path is launch-bound: ~6 ops x layers)
        bt, ctx = m.block_tables.long(), m.context_lens.long()
        kp = torch.arange(bt.shape[1] * m.block_size, device=q.device)
        mask = kp[None, :] < ctx[:, None]
        if window:
            mask &= kp[None, :] >= (ctx[:, None] - window)
        B, nb = bt.shape
        outside = ~mask.view(B, nb, 1, m.block_size, 1, 1)  # the [B, nb, 2, bs, KVH, D] gather's positions
        d = m.derived[("decode", window)] = (bt, outside, mask[:, None, None, :])
    bt, outside, attn_mask = d
    # One gather of K and V together ([B, nb, 2, bs, KVH, D]), one fill. Slots past the context are never
    # written (fresh or swapped-in blocks hold garbage, possibly NaN). A masked position still enters the
    # arithmetic: SDPA adds -inf to its score (NaN + -inf = NaN) and multiplies its V by a zero weight
    # (0 * NaN = NaN); either would poison the row. Zero K and V there.
    kvl = kv[bt, layer].masked_fill(outside, 0.0)
    k = kvl[:, :, 0].flatten(1, 2)  # [B, nb*bs, KVH, D]
    v = kvl[:, :, 1].flatten(1, 2)
    o = F.scaled_dot_product_attention(
        q[:, :, None, :],  # [B, H, 1, D]
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=attn_mask,
        scale=scale,
        enable_gqa=True,
    )
    return o[:, :, 0, :]
