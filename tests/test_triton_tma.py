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
# a config set by shape (triton_tma.CONFIGS, a 5th entry the warps) in place of config_for's one part of one K tile
tma.CONFIGS = {(64, 64, 16): (32, 32, 2, 2, 8)}
x, w = torch.randn(2, 64), torch.randn(64, 64)
p = tma.linear(x, w, parts=True)
assert p.shape[0] == 2 and close(p.sum(0), F.linear(x, w)), p.shape
tma.CONFIGS = {}
assert tma.linear(x, w, parts=True).shape[0] == 1
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


def test_configs_tuned_on_a_device_are_read_from_its_file(monkeypatch, tmp_path):
    """A tma_configs file (what `diag_gpu step-sweep --tma --tma-out` writes) is found by the device's name and read
    by shape and padded rows; a device without one has none."""
    import json

    import torch

    from token_scheduler.model import triton_tma as tma

    monkeypatch.setattr(tma, "TUNED_DIR", tmp_path)
    path = tma.tuned_path("NVIDIA H200")
    assert path == tmp_path / "NVIDIA_H200.json"
    path.write_text(json.dumps({"device": "NVIDIA H200", "configs": [
        {"shape": [17920, 1536, 16], "config": [64, 128, 4, 1, 4], "replay_ms": 1.4, "batch": 8}]}))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H200")
    assert tma._tuned.__wrapped__(0) == {(17920, 1536, 16): (64, 128, 4, 1, 4)}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H100 80GB HBM3")
    assert tma._tuned.__wrapped__(0) == {}
