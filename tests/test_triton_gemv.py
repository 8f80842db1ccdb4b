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
print("ok")
"""


def test_gemv_modes_match_eager_ops_in_the_interpreter():
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    r = subprocess.run([sys.executable, "-c", CODE], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
