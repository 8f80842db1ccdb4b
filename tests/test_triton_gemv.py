"""The batch-1 Triton GEMV (token_scheduler/model/triton_gemv.py) in Triton's CPU interpreter, fp32: each mode
computes what the eager ops compute (bf16 is checked on the GPU: the interpreter truncates fp32 -> bf16
instead of rounding to nearest, so only fp32 is meaningful here)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

CODE = """
import torch, torch.nn.functional as F
from token_scheduler.model.triton_gemv import MODE_NORM, MODE_SILU, gemv
torch.manual_seed(0)
N, K = 70, 200  # neither a multiple of the blocks: masked edges on both axes
w, b = torch.randn(N, K), torch.randn(N)
x, r, nw = torch.randn(1, K), torch.randn(1, K), torch.randn(K)
def close(a, ref):
    return (a - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
y, none = gemv(x, w, b, config=(8, 64, 4))
assert none is None and close(y, F.linear(x, w, b))
y, xo = gemv(x, w, None, mode=MODE_NORM, r=r, norm_w=nw, eps=1e-6, config=(16, 64, 4))
xs = x + r
ref = F.linear(nw * (xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + 1e-6)), w)
assert torch.equal(xo, xs) and close(y, ref)
y, none = gemv(x, w, b, mode=MODE_NORM, norm_w=nw, eps=1e-6, config=(4, 128, 4))  # no residual add
assert none is None and close(y, F.linear(nw * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)), w, b))
gu = torch.randn(1, 2 * K)
y, _ = gemv(gu, w, mode=MODE_SILU, config=(4, 128, 4))
assert close(y, F.linear(F.silu(gu[:, :K]) * gu[:, K:], w))
try:
    gemv(torch.randn(1, K), w, mode=MODE_SILU)
    raise SystemExit("a wrong input width must raise")
except ValueError as e:
    assert "needs [1, 400]" in str(e)

# RoPE in the qkv projection's epilogue: q out, rotated k and v written into the paged cache, exactly as the
# projection followed by rope_and_write_kv
from token_scheduler.model.triton_gemv import RopeKV
from token_scheduler.model.triton_ops import rope_and_write_kv
H, KVH, D, L, BS = 4, 2, 16, 3, 4
wq, bq = torch.randn((H + 2 * KVH) * D, K), torch.randn((H + 2 * KVH) * D)
cos, sin = torch.randn(64, D), torch.randn(64, D)
pos, sb, so = torch.tensor([37]), torch.tensor([5]), torch.tensor([1])
for bias, cfg in ((bq, (8, 64, 4)), (None, (2, 128, 4)), (None, (64, 64, 4))):  # 64 rows: capped at D
    kv_ref, kv = torch.zeros(7, L, 2, BS, KVH, D), torch.zeros(7, L, 2, BS, KVH, D)
    qkv, xo_ref = gemv(x, wq, bias, mode=MODE_NORM, r=r, norm_w=nw, eps=1e-6, config=cfg)
    q_ref = rope_and_write_kv(qkv, cos, sin, pos, kv_ref, 1, sb, so, H, KVH, D)
    q, xo = gemv(x, wq, bias, mode=MODE_NORM, r=r, norm_w=nw, eps=1e-6, config=cfg,
                 rope=RopeKV(cos, sin, pos, kv, 1, sb, so, H, KVH, D))
    assert q.shape == (1, H, D) and torch.equal(xo, xo_ref)
    assert torch.equal(q.view(H, D), q_ref.view(H, D)) and torch.equal(kv, kv_ref), cfg
    assert kv[5, 1, :, 1].abs().sum() > 0 and kv[5, 1, :, 0].abs().sum() == 0  # that slot only
try:
    gemv(x, w, rope=RopeKV(cos, sin, pos, kv, 1, sb, so, H, KVH, D))
    raise SystemExit("rope on a weight that is not a fused qkv must raise")
except ValueError as e:
    assert "fused qkv" in str(e)
print("ok")
"""


def test_gemv_modes_match_eager_ops_in_the_interpreter():
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    r = subprocess.run([sys.executable, "-c", CODE], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


FORWARD = """
import sys
import torch
from token_scheduler.model import llama
from token_scheduler.model.attention import AttentionMetadata
from model_swapper.model_config import ModelConfig
from model_swapper.weights import load_weights
from token_scheduler.runner import allocate_kv_cache
d = sys.argv[1]
cfg = ModelConfig.from_pretrained(d)
w = load_weights(d, cfg, "cpu", torch.float32)
rope = llama.RopeCache.build(cfg, 256, "cpu")
T = 40
torch.manual_seed(0)
ids, pos = torch.randint(0, cfg.vocab_size, (T + 1,)), torch.arange(T + 1)
kv = allocate_kv_cache(cfg, 4, 16, torch.float32, "cpu")
bt = torch.arange(3)
llama.forward(cfg, w, kv, rope, ids[:T], pos[:T], AttentionMetadata(pos[:T] // 16, pos[:T] % 16, 16,
                                                                    seqs=[(0, T, T)], seq_block_tables=[bt]))
p1 = pos[T:]
meta = AttentionMetadata(p1 // 16, p1 % 16, 16, decode=True, block_tables=bt[None].int(),
                         context_lens=torch.tensor([T + 1], dtype=torch.int32))
kv_ref = kv.clone()
ref = llama.forward(cfg, w, kv_ref, rope, ids[T:], p1, meta)
h = llama.forward_fused(cfg, w, kv, rope, ids[T:], p1, meta)
for a, b in ((h, ref), (kv, kv_ref)):
    assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item(), (a - b).abs().max().item()
assert kv[2, :, :, T % 16].abs().sum() > 0  # the new token's K and V landed
print("ok")
"""


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_one_token_forward_matches_reference_in_the_interpreter(make_varied, arch):
    """The whole one-token path (GEMVs with the norms, SiLU*mul and, for qwen2, RoPE+KV write folded in; qwen3
    keeps its q/k norm and the separate RoPE kernel) against the reference forward: hidden state and cache."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    r = subprocess.run([sys.executable, "-c", FORWARD, str(make_varied(arch))], env=env, cwd=root,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
