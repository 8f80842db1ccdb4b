"""Issue 20: can a Triton GEMM whose weight tiles arrive by TMA (tensor-memory-accelerator copies, pipelined by
Triton's software pipeliner with mbarriers) stream a small-batch decode projection faster than cuBLAS?

The batched decode steps (2-32 rows) run their four projections a layer on cuBLAS, which on the H200 streamed the
1.5B's gate_up and down at 73% and 58% of the HBM rate and its qkv and o at 27% and 23% (batch 8,
decode_profile_h200_ab4be3b.json). Every Triton form tried so far loaded weight tiles with pointer loads
(`triton_gemv.gemv_rows`: plain, swapped, persistent) and lost to cuBLAS in the step. Not tried: TMA. Here each
projection is one kernel, the dot swapped (acc [BLOCK_N, M_PAD] = W_tile x_tile^T, so the weight tile is wgmma's
wide operand in shared memory), optionally split along K with fp32 atomics into a zeroed buffer (for the narrow
projections, whose output tiles alone leave most SMs idle).

For each model's four projection shapes and each batch, over 28 distinct weight copies (a step's worth: no L2 reuse)
captured in one CUDA graph: cuBLAS (F.linear), the engine's gemv_rows (its blocks, PDL on Hopper), and the TMA kernel
over a sweep of blocks, stages and splits, its best then launched with PDL too. Times per call and the ratio to the
weights' stream at the device-to-device copy rate measured in the same run.

    python -m load_tests.diag_tma --models 1.5b,7b --batches 8,32 --json out.json
    python -m load_tests.diag_tma check      # CPU: the kernel against F.linear in the Triton interpreter (fp32)

A research tool: nothing in the engine uses it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from token_scheduler.model.triton_ops import pdl_enter

LAYERS = 28


@triton.jit
def _tma_rows(w_desc, x_desc, y, M, N, tiles_k, per_split, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              M_PAD: tl.constexpr, STAGES: tl.constexpr, ATOMIC: tl.constexpr, PDL: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n0 = pid_n * BLOCK_N
    t0 = pid_k * per_split
    t1 = tl.minimum(t0 + per_split, tiles_k)
    pdl_enter(PDL)
    acc = tl.zeros([BLOCK_N, M_PAD], tl.float32)
    for t in tl.range(t0, t1, num_stages=STAGES):
        w = w_desc.load([n0, t * BLOCK_K])
        x = x_desc.load([0, t * BLOCK_K])
        acc = tl.dot(w, tl.trans(x), acc)
    out = tl.trans(acc)  # [M_PAD, BLOCK_N]
    m = tl.arange(0, M_PAD)
    n = n0 + tl.arange(0, BLOCK_N)
    ptr = y + m[:, None] * N + n[None, :]
    mask = (m < M)[:, None] & (n < N)[None, :]
    if ATOMIC:
        tl.atomic_add(ptr, out, mask=mask, sem="relaxed")
    else:
        tl.store(ptr, out.to(y.dtype.element_ty), mask=mask)


def tma_linear(x: torch.Tensor, w: torch.Tensor, cfg: tuple[int, int, int, int], pdl: bool = False,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x w^T through the TMA kernel; cfg (BLOCK_N, BLOCK_K, STAGES, SPLIT). SPLIT > 1 sums into an fp32 `out`
    (zeroed here)."""
    bn, bk, st, split = cfg
    m, k = x.shape
    n = w.shape[0]
    m_pad = max(16, triton.next_power_of_2(m))
    tiles_k = triton.cdiv(k, bk)
    per = triton.cdiv(tiles_k, split)
    if out is None:
        out = torch.empty(m, n, device=x.device, dtype=torch.float32 if split > 1 else x.dtype)
    if split > 1:
        out.zero_()
    wd = TensorDescriptor.from_tensor(w, [bn, bk])
    xd = TensorDescriptor.from_tensor(x, [m_pad, bk])
    _tma_rows[(triton.cdiv(n, bn), triton.cdiv(tiles_k, per))](
        wd, xd, out, m, n, tiles_k, per, BLOCK_N=bn, BLOCK_K=bk, M_PAD=m_pad, STAGES=st, ATOMIC=split > 1, PDL=pdl,
        num_warps=4, launch_pdl=pdl)
    return out


def shapes(model: str) -> dict[str, tuple[int, int]]:
    from controller.model_factory import model_shape

    s = model_shape("qwen2", model)
    hd = s.hidden // s.heads
    return {"qkv": ((s.heads + 2 * s.kv_heads) * hd, s.hidden), "o": (s.hidden, s.hidden),
            "gate_up": (2 * s.intermediate, s.hidden), "down": (s.hidden, s.intermediate)}


def configs(n: int, k: int, m_pad: int, sms: int):
    for bn, bk, st, split in itertools.product((64, 128), (64, 128, 256), (3, 4, 6), (1, 2, 4, 8, 16)):
        smem = st * (bn + m_pad) * bk * 2
        tiles_k = triton.cdiv(k, bk)
        programs = triton.cdiv(n, bn) * triton.cdiv(tiles_k, triton.cdiv(tiles_k, split))
        if smem > 200 * 1024 or tiles_k < 2 * split or (split > 1 and programs > 4 * sms):
            continue
        yield bn, bk, st, split


def replay_us(fn, reps: int = 20) -> float:
    from load_tests.bench_common import graph_replay_us

    return graph_replay_us(fn, reps)


def measure(x: torch.Tensor, ws: list[torch.Tensor], sms: int, top: int) -> dict:
    """One projection shape at one batch: cuBLAS, gemv_rows and the TMA sweep over the LAYERS weight copies `ws`."""
    from token_scheduler.model.triton_gemv import gemv_rows

    b, (n, k) = x.shape[0], ws[0].shape
    ref = F.linear(x, ws[0]).float()
    outs = [torch.empty(b, n, device=x.device, dtype=torch.bfloat16) for _ in ws]
    outs32 = [torch.empty(b, n, device=x.device, dtype=torch.float32) for _ in ws]

    def per_call(fn) -> float:
        return replay_us(lambda: [fn(w, i) for i, w in enumerate(ws)]) / LAYERS

    def tma(cfg, pdl=False):
        return lambda w, i: tma_linear(x, w, cfg, pdl=pdl, out=outs32[i] if cfg[3] > 1 else outs[i])

    row = {"cublas_us": per_call(lambda w, i: torch.mm(x, w.t(), out=outs[i])),
           "gemv_rows_us": per_call(lambda w, i: gemv_rows(x, w)[0])}
    tried = []
    for cfg in configs(n, k, max(16, triton.next_power_of_2(b)), sms):
        try:
            y = tma_linear(x, ws[0], cfg)
            err = (y.float() - ref).abs().max().item() / ref.abs().max().item()
            tried.append({"cfg": cfg, "error": f"relative error {err:.3g}"} if err > 2e-2
                         else {"cfg": cfg, "us": per_call(tma(cfg))})
        except Exception as e:  # a config the compiler refuses (shared memory, TMA box)
            tried.append({"cfg": cfg, "error": f"{type(e).__name__}: {str(e)[:120]}"})
    ok = sorted((t for t in tried if "us" in t), key=lambda t: t["us"])
    row["tma_best"] = ok[:top]
    row["tma_errors"] = [t for t in tried if "error" in t][:4]
    row["tma_failed"] = sum("error" in t for t in tried)
    if ok:
        row["tma_best_pdl_us"] = per_call(tma(tuple(ok[0]["cfg"]), pdl=True))
    return row


def run(models: list[str], batches: list[int], top: int) -> dict:
    from load_tests.bench_common import hbm_bandwidth

    dev = torch.device("cuda")
    rate = hbm_bandwidth()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"copy rate {rate / 1e12:.2f} TB/s, {sms} SMs", flush=True)
    res = {"copy_rate_tb_s": rate / 1e12, "rows": []}
    for model in models:
        for proj, (n, k) in shapes(model).items():
            ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(LAYERS)]
            floor_us = n * k * 2 / rate * 1e6
            for b in batches:
                row = {"model": model, "proj": proj, "n": n, "k": k, "batch": b, "floor_us": floor_us,
                       **measure(torch.randn(b, k, device=dev, dtype=torch.bfloat16), ws, sms, top)}
                best = row["tma_best"][0] if row["tma_best"] else {"us": float("nan"), "cfg": "-"}
                print(f"{model:4} {proj:7} b{b:<3} floor {floor_us:6.2f}  cublas {row['cublas_us']:6.2f} "
                      f"({row['cublas_us'] / floor_us:.2f}x)  gemv_rows {row['gemv_rows_us']:6.2f}  "
                      f"tma {best['us']:6.2f} ({best['us'] / floor_us:.2f}x) {best['cfg']} "
                      f"pdl {row.get('tma_best_pdl_us', float('nan')):6.2f}  failed {row['tma_failed']}", flush=True)
                res["rows"].append(row)
            del ws
            torch.cuda.empty_cache()
    return res


def check() -> None:
    """CPU, Triton interpreter: the kernel (plain and split) against F.linear in fp32."""
    torch.manual_seed(0)
    for m, n, k, cfg in ((3, 128, 256, (64, 64, 2, 1)), (5, 192, 320, (64, 64, 2, 2)), (17, 64, 128, (64, 64, 2, 1))):
        x, w = torch.randn(m, k), torch.randn(n, k)
        y = tma_linear(x, w, cfg)
        assert torch.allclose(y, F.linear(x, w), atol=1e-3, rtol=1e-3), (m, n, k, cfg)
    print("ok")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", nargs="?", default="sweep", choices=["sweep", "check"])
    ap.add_argument("--models", default="1.5b,7b")
    ap.add_argument("--batches", default="8,32")
    ap.add_argument("--top", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    if a.what == "check":
        return check()
    from load_tests.bench_common import header

    t = time.time()
    res = run(a.models.split(","), [int(b) for b in a.batches.split(",")], a.top)
    res["seconds"] = time.time() - t
    if a.json:
        with open(a.json, "w") as f:
            json.dump({**header(), **res}, f, indent=1)


if __name__ == "__main__":
    main()
