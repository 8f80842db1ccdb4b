"""Paged decode attention never reads what was never written: NaN garbage past the context changes nothing."""

from __future__ import annotations

import torch

from token_scheduler.model.attention import AttentionMetadata, _decode_torch


def test_garbage_past_the_context_is_ignored():
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(4, 1, 2, 16, 2, 8, generator=g)  # [blocks, layers, K/V, block_size, kv_heads, head_dim]
    q = torch.randn(1, 4, 8, generator=g)
    m = AttentionMetadata(None, None, 16, decode=True, block_tables=torch.tensor([[1, 2]]),
                          context_lens=torch.tensor([20]))
    clean = _decode_torch(q, kv, 0, m, 0.3, None)
    kv[2, :, :, 4:] = float("nan")  # block 2 holds tokens 16..31; only 16..19 are in the context
    assert torch.equal(_decode_torch(q, kv, 0, m, 0.3, None), clean)
