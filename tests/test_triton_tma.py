"""triton_tma: the batched decode projections fed by TMA (Hopper). Their arithmetic in Triton's CPU interpreter
against torch's ops (fp32); on the GPU the engine's step through them against the cuBLAS step (test_gpu_engine)."""

import pytest

from tests.triton_interp import interpret

pytest.importorskip("triton")  # (the CPU wheel of torch comes without it; the interpreter tests need it too)

CODE = """
import torch
import torch.nn.functional as F
from token_scheduler.model import triton_ops, triton_tma as tma
torch.manual_seed(0)
close = lambda a, b: (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()
for m, n, k, cfg in ((3, 128, 96, (64, 32, 2, 2)), (5, 192, 320, (64, 64, 3, 4)), (17, 64, 128, (64, 64, 2, 1)),
                      (4, 96, 64, (16, 32, 2, 2)), (6, 64, 96, (32, 32, 3, 1))):
    x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
    assert close(tma.linear(x, w, config=cfg), F.linear(x, w))
    assert close(tma.linear(x, w, b, config=cfg), F.linear(x, w, b))
    # glu: w is [gate; up]
    g, u = F.linear(x, w[: n // 2]), F.linear(x, w[n // 2:])
    assert close(tma.linear(x, w, glu=True, config=cfg), F.silu(g) * u), (m, n, k)
    # split K: fp32 partial sums, the K tiles shared evenly (5 tiles in 4 splits: 2, 2, 1 -- three parts)
    parts = tma.linear(x, w, parts=True, config=cfg)
    tiles = -(-k // cfg[1])
    assert parts.shape == (-(-tiles // -(-tiles // cfg[3])), m, n) and parts.dtype == torch.float32
    assert close(parts.sum(0), F.linear(x, w))
    # the next add+RMSNorm takes them in place of the projection
    r = F.linear(x, w)
    res, res2, nw = torch.randn(m, n), None, torch.randn(n)
    res2 = res.clone()
    y1 = triton_ops.add_rms_norm(res, parts, nw, 1e-6)
    y2 = triton_ops.add_rms_norm(res2, r, nw, 1e-6)
    assert close(res, res2) and close(y1, y2)
# a split of more parts than the config's K tiles: one tile a part
assert tma.linear(torch.randn(2, 64), torch.randn(64, 64), parts=True, config=(64, 16, 2, 8)).shape[0] == 4
try:
    tma.linear(torch.randn(2, 64), torch.randn(100, 64), glu=True)
    raise SystemExit("glu over 50 gate rows (not whole blocks of 16) was taken")
except ValueError:
    pass
print("ok")
"""


def test_tma_projection_modes_match_torch_in_the_interpreter():
    interpret(CODE)


def test_the_step_takes_tma_only_for_batched_decode_steps_on_a_capable_gpu(monkeypatch):
    """Where the TMA path applies: decode steps of 2 to MAX_ROWS rows, bf16/fp16, on a PDL-capable (Hopper) GPU."""
    import torch

    from token_scheduler.model import triton_tma as tma

    monkeypatch.setattr(tma, "MAX_ROWS", 32)
    monkeypatch.setattr(tma, "pdl_capable", lambda t: True)
    x = torch.zeros(8, 64, dtype=torch.bfloat16)
    assert tma.takes(x, decode=True)
    assert not tma.takes(x, decode=False)  # prefill chunks stay on cuBLAS
    assert not tma.takes(torch.zeros(1, 64, dtype=torch.bfloat16), decode=True)  # batch 1: the GEMVs
    assert not tma.takes(torch.zeros(33, 64, dtype=torch.bfloat16), decode=True)
    assert not tma.takes(x.float(), decode=True)
    monkeypatch.setattr(tma, "pdl_capable", lambda t: False)  # no Hopper
    assert not tma.takes(x, decode=True)
    monkeypatch.setattr(tma, "pdl_capable", lambda t: True)
    monkeypatch.setattr(tma, "MAX_ROWS", 0)  # TOKENPOOL_TMA_ROWS=0
    assert not tma.takes(x, decode=True)


@pytest.mark.parametrize("n,k,m_pad", [(2048, 1536, 16), (1536, 8960, 16), (3584, 18944, 32), (37888, 3584, 16)])
def test_default_configs_fill_the_gpu_without_tiny_splits(n, k, m_pad):
    """A narrow projection over a long K (down) is split so its output tiles fill the SMs, each split four K tiles
    at least; the wide ones are not split."""
    import triton

    from token_scheduler.model import triton_tma as tma

    bn, bk, st, split = tma.config_for(n, k, m_pad, sms=132)
    tiles_n, tiles_k = triton.cdiv(n, bn), triton.cdiv(k, bk)
    assert triton.cdiv(tiles_k, split) >= 4 or split == 1
    assert split == 1 or tiles_n * split <= 132 * 1.5
    if tiles_n >= 132:
        assert split == 1
    if (n, k) == (1536, 8960):
        assert split >= 4  # 24 output tiles alone would leave 108 SMs idle


def test_rows_tma_cannot_address_take_torchs_ops():
    """A weight whose rows are not a multiple of 16 bytes (K of 7 in fp32: 28 bytes): the same results through
    torch's ops, in each mode (glu: SiLU*mul of the projection; parts: the projection itself, which add_rms_norm
    takes as well)."""
    import torch
    import torch.nn.functional as F

    from token_scheduler.model import triton_tma as tma

    x, w, b = torch.randn(3, 7), torch.randn(32, 7), torch.randn(32)
    assert not tma._fits(x, w)
    assert torch.equal(tma.linear(x, w, b), F.linear(x, w, b))
    g, u = F.linear(x, w[:16]), F.linear(x, w[16:])
    assert torch.allclose(tma.linear(x, w, glu=True), F.silu(g) * u, atol=1e-6)
    assert torch.equal(tma.linear(x, w, parts=True), F.linear(x, w))


FOLD_CODE = """
import torch
import torch.nn.functional as F
from token_scheduler.model import triton_ops, triton_tma as tma
torch.manual_seed(0)
close = lambda a, b: (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()
eps = 1e-6
# (rows, hidden, attention width, intermediate, config): the residual's tiles, K tiles and splits uneven somewhere
for m, hd, ha, inter, cfg in ((3, 128, 96, 160, (64, 32, 2, 2)), (5, 192, 64, 96, (64, 64, 3, 4)),
                              (17, 64, 128, 64, (16, 32, 2, 2)), (2, 96, 96, 128, (32, 32, 3, 1)), (4, 7, 7, 5, None)):
    x, o, ln = torch.randn(m, hd), torch.randn(m, ha), torch.randn(hd)
    wo, wgu, wd = torch.randn(hd, ha), torch.randn(2 * inter, hd), torch.randn(hd, inter)
    # the kernels the fold replaces: o's projection, add+RMSNorm, gate_up, SiLU*mul, down
    xr = x.clone()
    h = triton_ops.add_rms_norm(xr, F.linear(o, wo), ln, eps)
    gu_ref = F.linear(h, wgu)
    down_ref = F.linear(triton_ops.silu_mul(gu_ref), wd)
    xf = x.clone()
    ss = tma.linear(o, wo, resid=xf, config=cfg)  # (K of 7 in fp32, 28-byte rows: torch's ops)
    assert ss.dtype == torch.float32 and ss.shape[1] == m and close(xf, xr), (m, hd)
    assert close(ss.sum(0), xr.pow(2).sum(1))
    gu = tma.linear(xf, wgu, norm=(ss, ln, eps), config=cfg)
    assert close(gu, gu_ref), (m, hd)
    parts = tma.linear(gu, wd, parts=True, silu=True, config=cfg)  # (torch's ops: the projection itself)
    assert close(parts.sum(0) if parts.dim() == 3 else parts, down_ref), (m, hd)
    assert close(tma.linear(gu, wd, silu=True, config=cfg), down_ref)
    # FOLD 2: down's parts added into the residual by each tile's last split; the next qkv normalises from its sums
    wq, bq, ln1 = torch.randn(ha + 32, hd), torch.randn(ha + 32), torch.randn(hd)
    h2 = triton_ops.add_rms_norm(xr, parts if parts.dim() == 2 else parts.contiguous(), ln1, eps)
    cnt = torch.zeros(hd, dtype=torch.int32)
    ss2 = tma.linear(gu, wd, parts=True, silu=True, resid=xf, counters=cnt, config=cfg)
    assert close(xf, xr) and close(ss2.sum(0), xr.pow(2).sum(1)), (m, hd)
    assert close(tma.linear(xf, wq, bq, norm=(ss2, ln1, eps), config=cfg), F.linear(h2, wq, bq)), (m, hd)
    # qkv and o split along K (SPLIT_QKV, SPLIT_O), each tile's last split writing the projection or adding it
    for sp in (2, 3):
        cq, co = torch.zeros(64, dtype=torch.int32), torch.zeros(64, dtype=torch.int32)
        got = tma.linear(xf, wq, bq, norm=(ss2, ln1, eps), parts=True, split=sp, counters=cq, config=cfg)
        assert got.shape == (m, ha + 32) and close(got, F.linear(h2, wq, bq)), (m, hd, sp)
        x3, x4 = x.clone(), x.clone()
        ss3 = tma.linear(o, wo, resid=x3, parts=True, split=sp, counters=co, config=cfg)
        triton_ops.add_rms_norm(x4, F.linear(o, wo), ln, eps)
        assert close(x3, x4) and close(ss3.sum(0), x4.pow(2).sum(1)), (m, hd, sp)
for bad in (dict(norm=(torch.zeros(1, 2), torch.ones(64), eps), silu=True), dict(silu=True, glu=True),
            dict(resid=torch.zeros(2, 64), parts=True), dict(resid=torch.zeros(2, 64), glu=True),
            dict(resid=torch.zeros(2, 64), parts=True, counters=torch.zeros(1, dtype=torch.int32), config=(16, 16, 2, 2))):
    try:
        tma.linear(torch.randn(2, 128 if bad.get("silu") else 64), torch.randn(64, 64), **bad)
        raise SystemExit(f"{sorted(bad)} taken")
    except ValueError:
        pass
print("ok")
"""


def test_the_folds_match_the_kernels_they_replace_in_the_interpreter():
    """FOLD's modes (o's projection into the residual with each tile's sums of squares, gate_up normalising the
    residual from them, down making SiLU*mul of gate_up's output) against o, add+RMSNorm, gate_up, SiLU*mul and down
    as separate kernels; through torch's ops too where TMA cannot address the weights."""
    interpret(FOLD_CODE)


def _tma_forward_code() -> str:
    """test_triton_gemv's padded decode step of three sequences (its setup, up to the reference forward), then the
    step through forward_fused with the TMA path taken (the interpreter has no Hopper) at FOLD argv[2]."""
    from tests.test_triton_gemv import BATCH_FORWARD

    return BATCH_FORWARD[: BATCH_FORWARD.index("llama.GEMV_MAX_ROWS")] + """
from token_scheduler.model import triton_tma as tma
tma.takes = lambda x, decode: decode and 2 <= x.shape[0] <= 32
tma.FOLD = int(sys.argv[2])
tma.SPLIT_QKV = tma.SPLIT_O = 2 if tma.FOLD >= 2 else 1
calls = []
lin = tma.linear
tma.linear = lambda *a, **k: (calls.append(k), lin(*a, **k))[1]
h = llama.forward_fused(cfg, w, kv, rope, ids1, p1, meta)
assert len(calls) == 4 * cfg.num_layers  # every projection through the TMA kernel
folded = [c for c in calls if c.get("norm") or c.get("silu") or c.get("resid") is not None]
# 1: o, gate_up and down a layer; 2: qkv too, but layer 0's (normed by the add+RMSNorm after the embedding)
assert len(folded) == {1: 3 * cfg.num_layers, 2: 4 * cfg.num_layers - 1}[tma.FOLD], len(folded)
for a, b in ((h, ref), (kv, kv_ref)):
    assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item(), (a - b).abs().max().item()
print("ok")
"""


@pytest.mark.parametrize("arch,fold", [("qwen2", 1), ("qwen2", 2), ("qwen3", 2)])
def test_a_folded_tma_step_matches_the_reference_in_the_interpreter(make_varied, arch, fold):
    """forward_fused's batched TMA step with the kernels between projections folded in (FOLD 1: o into the
    residual, the norm and SiLU*mul in gate_up's and down's prologues; 2: down into the residual, qkv normalising it,
    qkv and o split along K): every row's hidden state and the whole cache against the reference forward."""
    interpret(_tma_forward_code(), str(make_varied(arch)), str(fold))
