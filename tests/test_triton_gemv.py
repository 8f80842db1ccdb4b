"""The Triton GEMVs (token_scheduler/model/triton_gemv.py: one token, and a few) in Triton's CPU interpreter,
fp32: each mode computes what the eager ops compute (bf16 is checked on the GPU: the interpreter truncates
fp32 -> bf16 instead of rounding to nearest, so only fp32 is meaningful here)."""

import pytest

from tests.triton_interp import interpret, interpret_each

CODE = """
import torch, torch.nn.functional as F
from token_scheduler.model.triton_gemv import MODE_NORM, MODE_SILU, gemv
torch.manual_seed(0)
N, K = 38, 136  # neither a multiple of the blocks: masked edges on both axes (K: the first tile, then the loop
# over the next and its masked tail at BLOCK_K 64 and 128)
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
    assert "needs [1, 272]" in str(e)
# SiLU*mul in gate_up's epilogue (glu): the same activation MODE_SILU's prologue computes from the stored gate|up,
# so down over it gives the same output to the bit; 19 pairs: a masked last program
I = 19
wgu, wd = torch.randn(2 * I, K), torch.randn(N, I)
for cfg in ((8, 64, 4), (2, 128, 4), (64, 64, 4)):  # 32 pairs a program: one program, masked
    gu, xo_ref = gemv(x, wgu, mode=MODE_NORM, r=r, norm_w=nw, eps=1e-6, config=cfg)
    act, xo = gemv(x, wgu, mode=MODE_NORM, r=r, norm_w=nw, eps=1e-6, config=cfg, glu=True)
    assert act.shape == (1, I) and torch.equal(xo, xo_ref)
    assert close(act, F.silu(gu[:, :I]) * gu[:, I:]), cfg
    assert torch.equal(gemv(act, wd, config=(4, 16, 4))[0], gemv(gu, wd, mode=MODE_SILU, config=(4, 16, 4))[0]), cfg
try:
    gemv(x, torch.randn(2 * I + 1, K), glu=True)
    raise SystemExit("glu on an odd number of rows must raise")
except ValueError as e:
    assert "even number of rows" in str(e)

# RoPE in the qkv projection's epilogue: q out, rotated k and v written into the paged cache, exactly as the
# projection followed by rope_and_write_kv
from token_scheduler.model.triton_gemv import RopeKV
from token_scheduler.model.triton_ops import rope_and_write_kv
H, KVH, D, L, BS = 2, 1, 16, 3, 4  # heads 0-1 q, 2 k, 3 v
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
    interpret(CODE)


ROWS = """
import sys, torch, torch.nn.functional as F
from token_scheduler.model import triton_gemv
from token_scheduler.model.triton_gemv import MODE_NORM, MODE_SILU, RopeKV, gemv_rows
from token_scheduler.model.triton_ops import rope_and_write_kv
triton_gemv.ROWS_SWAP = sys.argv[1] == "swap"
_one_a_tile = gemv_rows
def gemv_rows(*a, **kw):  # each call once a program a tile, then on a persistent grid of 3 (its cache writes last)
    ref = _one_a_tile(*a, **kw)
    out = _one_a_tile(*a, **kw, programs=3)
    assert all(torch.equal(p, q) for p, q in zip(ref, out) if p is not None), kw.get("config")
    return out
torch.manual_seed(0)
N, K = 70, 72  # neither a multiple of the blocks: masked edges on both axes (K: the first tile, the loop over the
# next and its masked tail at every BLOCK_K here, 32 and 64 in fp32, at a third of K 200's interpreter time)
w, b, nw = torch.randn(N, K), torch.randn(N), torch.randn(K)
def close(a, ref):
    return (a - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
def norm(x):
    return nw * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
H, KVH, D, L, BS = 2, 1, 32, 3, 4  # heads 0-1 q, 2 k, 3 v: 4 tiles of 32 rows, so a grid of 3 loops over them too
wq, bq = torch.randn((H + 2 * KVH) * D, K), torch.randn((H + 2 * KVH) * D)
cos, sin = torch.randn(64, D), torch.randn(64, D)
for M in map(int, sys.argv[2:]):  # 5 (16 padded rows) and 17 (32): the test runs them in two processes
    x, r = torch.randn(M, K), torch.randn(M, K)
    y, none = gemv_rows(x, w, b, config=(16, 64, 4, 2))
    assert y.shape == (M, N) and none is None and close(y, F.linear(x, w, b))
    y, xo = gemv_rows(x, w, None, mode=MODE_NORM, r=r, norm_w=nw, eps=1e-6, config=(32, 64, 4, 2))
    assert torch.equal(xo, x + r) and close(y, F.linear(norm(x + r), w))
    y, none = gemv_rows(x, w, b, mode=MODE_NORM, norm_w=nw, eps=1e-6, config=(16, 128, 4, 2))  # no residual add
    assert none is None and close(y, F.linear(norm(x), w, b))
    # gate_up with SiLU*mul in the epilogue: 35 pairs, not a multiple of the 8 or 16 a program owns
    for bias, cfg in ((b, (16, 64, 4, 2)), (None, (32, 128, 4, 2))):
        y, xo = gemv_rows(x, w, bias, mode=MODE_NORM, r=r, norm_w=nw, eps=1e-6, glu=True, config=cfg)
        g, u = F.linear(norm(x + r), w, bias).chunk(2, dim=-1)
        assert y.shape == (M, N // 2) and torch.equal(xo, x + r) and close(y, F.silu(g) * u)
    # RoPE in the qkv projection's epilogue, each row at its own position and cache slot: as the projection
    # followed by rope_and_write_kv (to rounding: the interpreter's dot sums tiles of other shapes differently)
    pos = torch.randint(0, 64, (M,))
    slots = torch.randperm(7 * BS)[:M]
    sb, so = slots // BS, slots % BS
    for bias, cfg in ((bq, (16, 64, 4, 2)), (None, (32, 128, 4, 2)), (None, (64, 64, 4, 2))):  # 64: capped at D
        kv_ref, kv = torch.zeros(7, L, 2, BS, KVH, D), torch.zeros(7, L, 2, BS, KVH, D)
        qkv, _ = gemv_rows(x, wq, bias, mode=MODE_NORM, r=r, norm_w=nw, eps=1e-6, config=cfg)
        q_ref = rope_and_write_kv(qkv, cos, sin, pos, kv_ref, 1, sb, so, H, KVH, D)
        q, xo = gemv_rows(x, wq, bias, mode=MODE_NORM, r=r, norm_w=nw, eps=1e-6, config=cfg,
                          rope=RopeKV(cos, sin, pos, kv, 1, sb, so, H, KVH, D))
        assert q.shape == (M, H, D) and torch.equal(xo, x + r) and close(q, q_ref) and close(kv, kv_ref), cfg
        written = torch.zeros(7, BS, dtype=torch.bool)
        written[sb, so] = True
        assert (kv[:, 1].abs().sum((1, 3, 4)) > 0).equal(written) and kv[:, [0, 2]].abs().sum() == 0  # those only
for bad in (dict(mode=MODE_SILU), dict(glu=True, rope=RopeKV(cos, sin, pos, kv, 1, sb, so, H, KVH, D)),
            dict(config=(8, 64, 4, 2))):
    try:
        gemv_rows(torch.randn(3, K), wq, **bad)
        raise SystemExit(f"{bad} must raise")
    except ValueError:
        pass
print("ok")
"""


@pytest.mark.parametrize("dot", ["x w^T", "swap"])
def test_gemv_rows_modes_match_eager_ops_in_the_interpreter(dot):
    """The small-batch GEMV: each weight tile against every row, with the one-token kernel's folds per row; its
    dot either way round (ROWS_SWAP); one program a tile and a persistent grid (ROWS_PERSIST) alike. (The batch
    sizes, 5 and 17 rows (padded to 16 and 32), in two interpreter processes side by side: one runs a kernel's
    programs on one thread.)"""
    interpret_each(ROWS, [[dot, "17"], [dot, "5"]])


def test_pdl_rows_widens_programmatic_dependent_launch_to_its_steps(monkeypatch):
    """Kernels over one row launch with PDL (where capable); over more rows only inside `pdl_rows`."""
    pytest.importorskip("triton")
    import torch

    from token_scheduler.model import triton_ops

    monkeypatch.setattr(triton_ops, "pdl_capable", lambda t: True)
    one, eight = torch.zeros(1, 4), torch.zeros(8, 4)
    assert triton_ops.pdl(one) and not triton_ops.pdl(eight)
    with triton_ops.pdl_rows(8):
        assert triton_ops.pdl(one) and triton_ops.pdl(eight) and not triton_ops.pdl(torch.zeros(9, 4))
    assert not triton_ops.pdl(eight)


def test_one_rows_kernels_let_the_next_in_before_their_wait(monkeypatch):
    """The kernels' PDL constexpr (pdl_arg): 2 (the next kernel let in before the wait: PDL_EARLY) for one row, 1 (after
    it) for several rows under `pdl_rows`, and for one row with PDL_EARLY off; 0 without PDL."""
    pytest.importorskip("triton")
    import torch

    from token_scheduler.model import triton_ops

    one, eight = torch.zeros(1, 4), torch.zeros(8, 4)
    monkeypatch.setattr(triton_ops, "pdl_capable", lambda t: False)
    assert triton_ops.pdl_arg(one) == 0
    monkeypatch.setattr(triton_ops, "pdl_capable", lambda t: True)
    monkeypatch.setattr(triton_ops, "PDL_EARLY", True)
    with triton_ops.pdl_rows(8):
        assert (triton_ops.pdl_arg(one), triton_ops.pdl_arg(eight)) == (2, 1)
        for mode, light, tma in (("all", 2, 2), ("light", 2, 1), ("tma", 1, 2), ("none", 1, 1)):
            monkeypatch.setattr(triton_ops, "PDL_EARLY_ROWS", mode)
            assert (triton_ops.pdl_arg(eight), triton_ops.pdl_arg(eight, tma=True)) == (light, tma), mode
    assert triton_ops.pdl_arg(eight) == 0
    monkeypatch.setattr(triton_ops, "PDL_EARLY", False)
    assert triton_ops.pdl_arg(one) == 1


FORWARD = """
import sys
import torch
from token_scheduler.model import llama
from token_scheduler.model.attention import AttentionMetadata
from model_swapper.model_config import ModelConfig
from model_swapper.weights import load_weights
from token_scheduler.runner import allocate_kv_cache
from token_scheduler.model import triton_gemv
# 16 rows a program: the untuned default for these tiny shapes (4) runs 4x the interpreter's programs; CODE tests
# the blocks themselves
triton_gemv.config_for = lambda n, k: (16, 64, 4)
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
    interpret(FORWARD, str(make_varied(arch)))


BATCH_FORWARD = """
import sys
import torch
from token_scheduler.model import llama, triton_gemv
from token_scheduler.model.attention import AttentionMetadata
from model_swapper.model_config import ModelConfig
from model_swapper.weights import load_weights
from token_scheduler.runner import allocate_kv_cache
d = sys.argv[1]
cfg = ModelConfig.from_pretrained(d)
w = load_weights(d, cfg, "cpu", torch.float32)
rope = llama.RopeCache.build(cfg, 256, "cpu")
torch.manual_seed(0)
# three sequences of different lengths prefilled in one varlen step, then one decode step over a bucket of 5
# rows: theirs, and 2 padded as the decode graph pads a bucket (token 0 at position 0, K/V into the scratch block)
lens, tables, scratch, pad = (40, 17, 5), (torch.tensor([0, 1, 2]), torch.tensor([3, 4]), torch.tensor([5])), 6, 2
ids = [torch.randint(0, cfg.vocab_size, (n + 1,)) for n in lens]
pos = [torch.arange(n + 1) for n in lens]
starts = torch.tensor((0,) + lens[:-1]).cumsum(0).tolist()
kv = allocate_kv_cache(cfg, scratch + 1, 16, torch.float32, "cpu").zero_()
llama.forward(cfg, w, kv, rope, torch.cat([i[:-1] for i in ids]), torch.cat([p[:-1] for p in pos]),
              AttentionMetadata(torch.cat([t[p[:-1] // 16] for t, p in zip(tables, pos)]),
                                torch.cat([p[:-1] % 16 for p in pos]), 16, seqs=[(q0, n, n) for q0, n in
                                                                                zip(starts, lens)],
                                seq_block_tables=list(tables)))
p1 = torch.tensor(list(lens) + [0] * pad)
ids1 = torch.tensor([i[-1].item() for i in ids] + [0] * pad)
bt = torch.full((len(lens) + pad, 3), scratch, dtype=torch.int32)
for j, t in enumerate(tables):
    bt[j, : len(t)] = t
meta = AttentionMetadata(torch.tensor([t[n // 16].item() for t, n in zip(tables, lens)] + [scratch] * pad),
                         p1 % 16, 16, decode=True, block_tables=bt,
                         context_lens=torch.tensor([n + 1 for n in lens] + [1] * pad, dtype=torch.int32))
kv_ref = kv.clone()
ref = llama.forward(cfg, w, kv_ref, rope, ids1, p1, meta)
llama.GEMV_MAX_ROWS = 32  # off by default (TOKENPOOL_GEMV_ROWS)
llama.GEMV_ROWS_MLP = sys.argv[2] == "all"  # or qkv and o alone, the MLP on torch's matmuls
calls = []
rows = triton_gemv.gemv_rows
triton_gemv.gemv_rows = lambda *a, **k: (calls.append(1), rows(*a, **k))[1]
h = llama.forward_fused(cfg, w, kv, rope, ids1, p1, meta)
assert len(calls) == (4 if llama.GEMV_ROWS_MLP else 2) * cfg.num_layers  # the projections through the kernel
for a, b in ((h, ref), (kv, kv_ref)):
    assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item(), (a - b).abs().max().item()
for t, n in zip(tables, lens):  # each sequence's new K and V landed in its own slot
    assert kv[t[n // 16], :, :, n % 16].abs().sum() > 0
print("ok")
"""


@pytest.mark.parametrize("arch,proj", [("qwen2", "all"), ("qwen3", "all"), ("qwen2", "attn")])
def test_small_batch_forward_matches_reference_in_the_interpreter(make_varied, arch, proj):
    """A decode step over sequences of different context lengths, padded to its graph bucket, through the
    small-batch GEMVs (qwen2: RoPE+KV write folded in; qwen3: q/k norm and the separate RoPE kernel; "attn": qkv
    and o alone, GEMV_ROWS_MLP off) against the reference forward: hidden state of every row, and the whole cache."""
    interpret(BATCH_FORWARD, str(make_varied(arch)), proj)


def test_gemv_variants_compile_for_the_h200_without_spills():
    """The one-token GEMV as the bench models' batch-1 projections run it (and with the norm's scale pass in one tile,
    NORM_ONE_PASS) compiles for sm_90 (Triton's bundled ptxas, no GPU) into registers alone, loading its first weight
    tile before the PDL wait: what the interpreter cannot say about the GPU."""
    pytest.importorskip("triton")
    from load_tests.triton_offline import gemv_variants

    res = gemv_variants()
    assert len(res) == 18  # 12 projections (gate_up and down with and without GLU), the 6 with a norm in one pass too
    for label, r in res.items():
        assert r["stack_bytes"] == 0 and r["local_bytes"] == 0 and 0 < r["registers"] <= 255, (label, r)
        assert r["loads_before_wait"] > 0, (label, r)


NORM_ONE_PASS = """
import torch, torch.nn.functional as F
from token_scheduler.model import triton_gemv
from token_scheduler.model.triton_gemv import MODE_NORM, gemv
torch.manual_seed(0)
N, K = 70, 200
w, x, r, nw = torch.randn(N, K), torch.randn(1, K), torch.randn(1, K), torch.randn(K)
xs = x + r
ref = F.linear(nw * (xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + 1e-6)), w)
for one in (False, True):
    triton_gemv.NORM_ONE_PASS = one
    assert triton_gemv._norm_block(K, 64) == (256 if one else 64)
    y, xo = gemv(x, w, None, mode=MODE_NORM, r=r, norm_w=nw, eps=1e-6, config=(16, 64, 4))
    assert torch.equal(xo, xs) and (y - ref).abs().max().item() <= 1e-5 * ref.abs().max().item(), one
assert triton_gemv._norm_block(16384, 512) == 512  # past 8192: tiles of BLOCK_K
print("ok")
"""


def test_the_norm_scale_pass_in_one_tile_computes_the_same_projection():
    """NORM_ONE_PASS: the MODE_NORM GEMV with its scale pass over x + r in one tile (all of K) gives the eager
    add+RMSNorm+linear to fp32 rounding, and the same new residual, as the tiled pass does (interpreter, fp32)."""
    interpret(NORM_ONE_PASS)
