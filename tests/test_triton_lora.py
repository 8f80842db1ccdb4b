"""The LoRA expand kernel (token_scheduler/model/triton_lora.py): each row gets its own slot's delta, rows of no slot
exactly nothing. In Triton's CPU interpreter (fp32) and, on CUDA, in bf16 and fp32 against the cuBLAS form the
kernel replaces (`((x A^T) * M) B^T` added by a GEMM with beta 1)."""

import pytest
import torch

from tests.triton_interp import interpret

CODE = """
import torch
from token_scheduler.model.triton_lora import expand_
torch.manual_seed(0)
S, R, N = 3, 8, 70  # N not a multiple of the block: masked edge
for M in (5, 20):  # one row block, and rows past 16
    slots = torch.tensor([(i % (S + 1)) - 1 for i in range(M)])  # -1 (none), 0, 1, 2, ...
    t, b, y = torch.randn(M, S * R), torch.randn(N, S * R), torch.randn(M, N)
    mask = (slots[:, None] == torch.arange(S * R)[None, :] // R).float()
    ref = y + (t * mask) @ b.t()
    got = y.clone()
    expand_(got, t, b, slots, R)
    base = slots < 0
    assert torch.equal(got[base], y[base])  # rows of no adapter: untouched, bit for bit
    assert (got - ref).abs().max().item() <= 1e-4 * ref.abs().max().item(), M
    assert (got[~base] - y[~base]).abs().max() > 1e-2  # (the others did change)
try:
    expand_(y, t[:, :-1], b, slots, R)
    raise SystemExit("mismatched shapes must raise")
except ValueError as e:
    assert "lora expand" in str(e)
print("ok")
"""


def test_expand_in_the_interpreter():
    interpret(CODE)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 8, 32, 100])
def test_expand_on_cuda_matches_cublas(dtype, m):
    from token_scheduler.model.triton_lora import expand_

    g = torch.Generator(device="cuda").manual_seed(m)
    S, R, N = 8, 16, 2048 + 48
    slots = torch.randint(-1, S, (m,), device="cuda", generator=g)
    t = torch.randn(m, S * R, device="cuda", generator=g).to(dtype)
    b = (torch.randn(N, S * R, device="cuda", generator=g) * 0.1).to(dtype)
    y = torch.randn(m, N, device="cuda", generator=g).to(dtype)
    mask = (slots[:, None] == torch.arange(S * R, device="cuda")[None, :] // R).to(dtype)
    ref = y.clone().addmm_(t * mask, b.t())
    got = y.clone()
    expand_(got, t, b, slots, R)
    base = slots < 0
    assert torch.equal(got[base], y[base])
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7  # (bf16: the last bit of the sum's rounding may differ)
    assert ((got.float() - ref.float()).abs() <= tol * (1 + ref.float().abs())).all()
