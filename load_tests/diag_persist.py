"""Issue 20: is a grid barrier inside a persistent kernel cheaper than a kernel boundary? The question a decode
megakernel (one launch a layer, its projections separated by grid barriers) turns on. Two measurements:

- `barrier`: the bare cost of one synchronisation point. A chain of empty kernels in a CUDA graph (launched
  plainly and with programmatic dependent launch, as the batch-1 step's kernels are) against one persistent kernel
  whose programs meet at as many software grid barriers (an atomic counter in global memory, every program
  resident at once).
- `mlp`: the batch-1 MLP half of a layer (o, then gate_up with the add+RMSNorm, then down with SiLU*mul) over 28
  layers' distinct weights: the engine's three one-token GEMVs a layer (triton_gemv.gemv, its tuned blocks, PDL)
  against one persistent kernel a layer doing the same three projections with two grid barriers between them, each
  program loading its first weight tile of the next projection before it waits. The same arithmetic per row (the
  GEMV's prologues, fp32 sums), so outputs agree to the sum order; both printed against the weights' floor at the
  device-to-device copy rate measured in the same run.

    python -m load_tests.diag_persist barrier
    python -m load_tests.diag_persist mlp --models 1.5b,7b
    python -m load_tests.diag_persist ramp    # each batch-1 GEMV's time beyond its weight stream

A research tool: nothing in the engine uses it. On CPU (the Triton interpreter, TRITON_INTERPRET=1) `check` runs one
program, whose barriers pass at once, to check the persistent kernel's arithmetic against the GEMVs (bit-equal).

Measured on the H200 at a088d3a (bench/results/persist_barrier_h200_a088d3a.json): a PDL kernel boundary 0.51-0.87 us,
a grid barrier 0.96-1.60 us; the persistent MLP half 1.08x the three GEMVs at best (1.5B), 1.26x (7B). No cheaper.
"""

from __future__ import annotations

import argparse
import functools

import torch
import triton
import triton.language as tl

from controller.model_factory import model_shape
from load_tests.bench_common import graph_replay_us as replay_us
from load_tests.bench_common import hbm_bandwidth
from token_scheduler.model import triton_gemv as g
from token_scheduler.model.triton_gemv import _x_tile, rms_inv
from token_scheduler.model.triton_ops import pdl_enter

# the bench models' shapes (the model factory's qwen2 1.5b and 7b)
SHAPES = {m: model_shape("qwen2", m) for m in ("1.5b", "7b")}
ERR_SLOT = 63  # BAR slot counting barriers given up on (a program waited SPIN polls): results then are void
ERR = tl.constexpr(ERR_SLOT)


@triton.jit
def _grid_sync(BAR, target, SPIN):
    """Every program of the grid (all resident) arrives at BAR; returns when `target` arrivals have. Gives up after
    SPIN polls (counted in BAR + ERR) rather than hang where the grid is not resident at once."""
    tl.debug_barrier()  # this program's stores issued by every thread before it arrives
    tl.atomic_add(BAR, 1, sem="release", scope="gpu")
    n = tl.atomic_add(BAR, 0, sem="acquire", scope="gpu")
    i = 0
    while (n < target) & (i < SPIN):
        n = tl.atomic_add(BAR, 0, sem="acquire", scope="gpu")
        i += 1
    if n < target:
        tl.atomic_add(BAR + ERR, 1)
    tl.debug_barrier()


@triton.jit
def _tick_kernel(X, PDL: tl.constexpr):
    pdl_enter(PDL)
    if tl.program_id(0) == 0:
        tl.store(X, tl.load(X) + 1)


@triton.jit
def _barriers_kernel(BAR, X, ROUNDS, SPIN):
    p = tl.num_programs(0)
    for r in range(ROUNDS):
        _grid_sync(BAR, (r + 1) * p, SPIN)
    if tl.program_id(0) == 0:
        tl.store(X, tl.load(X) + 1)


@triton.jit
def _first_tile(W, pid, N, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr):
    rows = pid * CHUNK + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    return tl.load(W + rows[:, None].to(tl.int64) * K + kk[None, :], mask=(rows < N)[:, None] & (kk < K)[None, :],
                   other=0.0)


@triton.jit
def _chunk(X, R, NW, XOUT, W, Y, N, eps, pid, w0, K: tl.constexpr, MODE: tl.constexpr, HAS_R: tl.constexpr,
           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr, dt):
    """Rows [pid * CHUNK, + CHUNK) of y = W x' (x' the mode's prologue of x, as triton_gemv's kernel), BLOCK_N rows at
    a time; `w0` the first tile, loaded already."""
    kk = tl.arange(0, BLOCK_K)
    inv = 0.0
    if MODE == 1:
        inv = rms_inv(X, R, XOUT, pid, eps, K, BLOCK_K, HAS_R, dt)
    for s in tl.static_range(CHUNK // BLOCK_N):
        rows = pid * CHUNK + s * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        wp = W + rows[:, None].to(tl.int64) * K + kk[None, :]
        if s == 0:
            w = w0
        else:
            w = tl.load(wp, mask=rmask[:, None] & (kk < K)[None, :], other=0.0)
        acc = w.to(tl.float32) * _x_tile(X, R, NW, kk, kk < K, inv, K, MODE, HAS_R, dt)[None, :]
        for k0 in range(BLOCK_K, K, BLOCK_K):
            cols = k0 + kk
            km = cols < K
            w = tl.load(wp + k0, mask=rmask[:, None] & km[None, :], other=0.0)
            acc += w.to(tl.float32) * _x_tile(X, R, NW, cols, km, inv, K, MODE, HAS_R, dt)[None, :]
        tl.store(Y + rows, tl.sum(acc, 1).to(dt), mask=rmask)


@triton.jit
def _mlp_kernel(ATT, H, NW, WO, WGU, WD, OUT_O, HNEW, GU, Y, BAR, eps, SPIN,
                HID: tl.constexpr, INTER: tl.constexpr,
                BN_O: tl.constexpr, BK_O: tl.constexpr, CH_O: tl.constexpr,
                BN_G: tl.constexpr, BK_G: tl.constexpr, CH_G: tl.constexpr,
                BN_D: tl.constexpr, BK_D: tl.constexpr, CH_D: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    p = tl.num_programs(0)
    dt = Y.dtype.element_ty
    w0 = _first_tile(WO, pid, HID, HID, BN_O, BK_O, CH_O)
    pdl_enter(PDL)
    _chunk(ATT, ATT, ATT, ATT, WO, OUT_O, HID, eps, pid, w0, HID, 0, False, BN_O, BK_O, CH_O, dt)
    w1 = _first_tile(WGU, pid, 2 * INTER, HID, BN_G, BK_G, CH_G)
    _grid_sync(BAR, p, SPIN)
    _chunk(H, OUT_O, NW, HNEW, WGU, GU, 2 * INTER, eps, pid, w1, HID, 1, True, BN_G, BK_G, CH_G, dt)
    w2 = _first_tile(WD, pid, HID, INTER, BN_D, BK_D, CH_D)
    _grid_sync(BAR, 2 * p, SPIN)
    _chunk(GU, GU, GU, GU, WD, Y, HID, eps, pid, w2, INTER, 2, False, BN_D, BK_D, CH_D, dt)


def _chunk_rows(n: int, programs: int, bn: int) -> int:
    """Rows a program owns: an equal share of n, rounded up to whole BLOCK_N blocks."""
    return triton.cdiv(triton.cdiv(n, programs), bn) * bn


class Layers:
    """`layers` layers' MLP weights (random, the model's shapes) and a chain through them both ways."""

    def __init__(self, model: str, layers: int, device: str, dtype=torch.bfloat16, seed: int = 0):
        self.hid, self.inter = SHAPES[model].hidden, SHAPES[model].intermediate
        gen = torch.Generator(device=device).manual_seed(seed)

        def rnd(*shape, scale=0.02):
            return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)
        hid, inter = self.hid, self.inter
        self.w = [(rnd(hid, hid), rnd(2 * inter, hid), rnd(hid, inter), 1 + rnd(hid, scale=0.1))
                  for _ in range(layers)]
        self.att0, self.h0 = rnd(1, hid, scale=1.0), rnd(1, hid, scale=1.0)
        self.eps = 1e-6
        self.device, self.dtype = device, dtype
        self.bar = torch.zeros(len(self.w) * 2, 64, dtype=torch.int32, device=device)
        self.weight_bytes = sum(t.numel() * t.element_size() for lw in self.w for t in lw[:3])

    def separate(self):
        att, h = self.att0, self.h0
        for wo, wgu, wd, nw in self.w:
            o, _ = g.gemv(att, wo)
            gu, h = g.gemv(h, wgu, mode=g.MODE_NORM, r=o, norm_w=nw, eps=self.eps)
            att, _ = g.gemv(gu, wd, mode=g.MODE_SILU)
        return att, h

    def persistent(self, programs: int, num_warps: int, blocks: dict, pdl: bool, spin: int = 200_000,
                   warm_only: bool = False):
        """blocks: {"o"|"gate_up"|"down": (BLOCK_N, BLOCK_K)}."""
        hid, inter = self.hid, self.inter
        cfg = {}
        for name, key, n in (("o", "O", hid), ("gate_up", "G", 2 * inter), ("down", "D", hid)):
            bn, bk = blocks[name]
            cfg.update({f"BN_{key}": bn, f"BK_{key}": bk, f"CH_{key}": _chunk_rows(n, programs, bn)})
        self.bar.zero_()
        att, h = self.att0, self.h0
        for i, (wo, wgu, wd, nw) in enumerate(self.w):
            o = torch.empty_like(att)
            hn = torch.empty_like(h)
            gu = torch.empty(1, 2 * inter, device=self.device, dtype=self.dtype)
            y = torch.empty_like(att)
            args = (att, h, nw, wo, wgu, wd, o, hn, gu, y, self.bar[i], self.eps, spin)
            kw = dict(HID=hid, INTER=inter, PDL=pdl, num_warps=num_warps, launch_pdl=pdl, **cfg)
            if warm_only:
                return _mlp_kernel.warmup(*args, grid=(programs,), **kw)
            _mlp_kernel[(programs,)](*args, **kw)
            att, h = y, hn
        return att, h

    def given_up(self) -> int:
        return int(self.bar[:, ERR_SLOT].sum())


def resident(kernel, programs: int, num_warps: int) -> bool:
    """Whether `programs` programs of the compiled `kernel` fit on the GPU at once (else its barriers would wait on
    programs not yet scheduled)."""
    props = torch.cuda.get_device_properties(0)
    kernel._init_handles()  # (n_regs is read from the loaded module)
    threads = 32 * num_warps
    regs = max(1, kernel.n_regs)
    per_warp = triton.cdiv(regs * 32, 256) * 256  # registers are allocated per warp in units of 256
    by_regs = 65536 // (per_warp * num_warps)
    by_threads = props.max_threads_per_multi_processor // threads
    shared = max(1, kernel.metadata.shared)
    by_smem = (props.shared_memory_per_multiprocessor - 1024) // (shared + 1024)
    per_sm = min(by_regs, by_threads, by_smem, 32)
    return programs <= per_sm * props.multi_processor_count


def barrier(rounds: int = 1000) -> None:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    x = torch.zeros(1, dtype=torch.int32, device="cuda")
    for programs in (sms, 2 * sms, 4 * sms):
        def ticks(pdl: bool, programs=programs):
            for _ in range(rounds):
                _tick_kernel[(programs,)](x, PDL=pdl, launch_pdl=pdl)
        plain = replay_us(lambda: ticks(False)) / rounds
        pdl = replay_us(lambda: ticks(True)) / rounds
        bar = torch.zeros(64, dtype=torch.int32, device="cuda")
        ck = _barriers_kernel.warmup(bar, x, rounds, 200_000, grid=(programs,), num_warps=4)
        if not resident(ck, programs, 4):
            print(f"{programs} programs: not resident at once, skipped")
            continue

        def run(bar=bar, programs=programs):
            bar.zero_()
            _barriers_kernel[(programs,)](bar, x, rounds, 200_000, num_warps=4)
        us = replay_us(run) / rounds
        print(f"{programs:4d} programs: kernel boundary {plain:.2f} us plain, {pdl:.2f} us with PDL | grid barrier "
              f"{us:.2f} us (given up: {int(bar[ERR_SLOT])})", flush=True)


# (programs a SM, warps, {projection: (BLOCK_N, BLOCK_K)}) tried by `mlp`
CONFIGS = {
    "1.5b": [(2, 8, {"o": (8, 512), "gate_up": (16, 512), "down": (8, 1024)}),
             (2, 8, {"o": (8, 512), "gate_up": (8, 512), "down": (8, 512)}),
             (3, 8, {"o": (4, 512), "gate_up": (16, 512), "down": (4, 1024)}),
             (4, 4, {"o": (4, 512), "gate_up": (8, 512), "down": (4, 1024)}),
             (4, 8, {"o": (4, 512), "gate_up": (8, 512), "down": (4, 1024)}),
             (8, 4, {"o": (2, 1024), "gate_up": (4, 1024), "down": (2, 1024)})],
    "7b": [(2, 8, {"o": (16, 512), "gate_up": (16, 512), "down": (8, 512)}),
           (3, 8, {"o": (16, 512), "gate_up": (16, 512), "down": (8, 512)}),
           (4, 8, {"o": (8, 512), "gate_up": (16, 512), "down": (4, 512)}),
           (8, 4, {"o": (4, 1024), "gate_up": (8, 512), "down": (4, 512)})],
}


def mlp(models: list[str], layers: int = 28) -> None:
    rate = hbm_bandwidth()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"copy rate {rate / 1e12:.3f} TB/s", flush=True)
    for model in models:
        lay = Layers(model, layers, "cuda")
        floor = lay.weight_bytes / rate * 1e6
        ref = lay.separate()
        sep = replay_us(lay.separate)
        print(f"{model}: {layers} layers' MLP half, floor {floor:.1f} us | three GEMVs a layer (PDL): {sep:.1f} us "
              f"({sep / floor:.3f}x)", flush=True)
        for per_sm, nw, blocks in CONFIGS[model]:
            programs = per_sm * sms
            ck = lay.persistent(programs, nw, blocks, pdl=True, warm_only=True)
            label = f"  {per_sm}/SM x {nw} warps {blocks}"
            if not resident(ck, programs, nw):
                print(f"{label}: {ck.n_regs} registers, not resident at once; skipped", flush=True)
                continue
            out = lay.persistent(programs, nw, blocks, pdl=True)
            diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(out, ref))
            us = replay_us(functools.partial(lay.persistent, programs, nw, blocks, pdl=True))
            print(f"{label}: {us:.1f} us ({us / floor:.3f}x floor, {us / sep:.3f} of the GEMVs), {ck.n_regs} regs, "
                  f"max |diff| {diff:.2e}, barriers given up {lay.given_up()}", flush=True)


def check(model: str = "1.5b", layers: int = 2) -> None:
    """CPU (TRITON_INTERPRET=1): one program's persistent chain against the GEMVs'."""
    lay = Layers(model, layers, "cpu")
    ref = lay.separate()
    out = lay.persistent(1, 4, {"o": (8, 512), "gate_up": (16, 512), "down": (8, 1024)}, pdl=False)
    for a, b in zip(out, ref):
        print(f"max |diff| {float((a.float() - b.float()).abs().max()):.3e} of max {float(b.float().abs().max()):.3e}")
    print(f"barriers given up: {lay.given_up()}")


def ramp(layers: int = 28) -> None:
    """Each batch-1 projection of the bench models as the engine runs it (triton_gemv.gemv, its blocks and mode, PDL;
    RoPE left out), `layers` distinct weights back to back in one graph: time a kernel against its weight bytes at the
    copy rate, and the least-squares fit t = a + bytes / r over the eight shapes (a: what each kernel costs beyond its
    stream)."""
    rate = hbm_bandwidth()
    print(f"copy rate {rate / 1e12:.3f} TB/s", flush=True)
    pts = []
    for model, s in SHAPES.items():
        hid, inter = s.hidden, s.intermediate
        qkv = (s.heads + 2 * s.kv_heads) * (s.head_dim or hid // s.heads)
        for name, n, k, mode in (("qkv", qkv, hid, g.MODE_NORM), ("o", hid, hid, g.MODE_PLAIN),
                                 ("gate_up", 2 * inter, hid, g.MODE_NORM), ("down", hid, inter, g.MODE_SILU)):
            gen = torch.Generator(device="cuda").manual_seed(0)
            ws = [(torch.randn(n, k, generator=gen, device="cuda") * 0.02).to(torch.bfloat16) for _ in range(layers)]
            x = torch.randn(1, 2 * k if mode == g.MODE_SILU else k, generator=gen, device="cuda").to(torch.bfloat16)
            r, nw = torch.randn_like(x[:, :k]), torch.ones(k, device="cuda", dtype=torch.bfloat16)
            kw = dict(mode=mode) if mode != g.MODE_NORM else dict(mode=mode, r=r, norm_w=nw, eps=1e-6)
            us = replay_us(lambda ws=ws, x=x, kw=kw: [g.gemv(x, w, **kw) for w in ws]) / layers
            b = n * k * 2
            pts.append((b, us))
            print(f"{model} {name:8s} [{n}, {k}] {g.config_for(n, k)}: {us:6.2f} us a kernel, stream floor "
                  f"{b / rate * 1e6:6.2f} us, above it {us - b / rate * 1e6:5.2f} us ({us / (b / rate * 1e6):.2f}x)",
                  flush=True)
            del ws
    for model, s in SHAPES.items():  # down: its blocks, K up to 4096 (bytes in flight grow with BLOCK_K)
        hid, inter = s.hidden, s.intermediate
        gen = torch.Generator(device="cuda").manual_seed(0)
        ws = [(torch.randn(hid, inter, generator=gen, device="cuda") * 0.02).to(torch.bfloat16) for _ in range(layers)]
        x = torch.randn(1, 2 * inter, generator=gen, device="cuda").to(torch.bfloat16)
        floor = hid * inter * 2 / rate * 1e6
        for c in [(bn, bk, nw) for bn in (1, 2, 4, 8) for bk in (512, 1024, 2048, 4096) for nw in (4, 8)
                  if bn * bk <= 16384]:
            us = replay_us(lambda ws=ws, x=x, c=c: [g.gemv(x, w, mode=g.MODE_SILU, config=c) for w in ws]) / layers
            print(f"{model} down {c}: {us:6.2f} us ({us / floor:.2f}x)", flush=True)
        del ws
    nb = len(pts)
    mb, mt = sum(p[0] for p in pts) / nb, sum(p[1] for p in pts) / nb
    slope = sum((b - mb) * (t - mt) for b, t in pts) / sum((b - mb) ** 2 for b, _ in pts)
    print(f"fit: t = {mt - slope * mb:.2f} us + bytes / {1e6 / slope / 1e12:.3f} TB/s (copy rate "
          f"{rate / 1e12:.3f})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["barrier", "mlp", "check", "ramp"])
    ap.add_argument("--models", default="1.5b,7b")
    ap.add_argument("--layers", type=int, default=28)
    a = ap.parse_args()
    if a.what == "barrier":
        barrier()
    elif a.what == "mlp":
        mlp(a.models.split(","), a.layers)
    elif a.what == "ramp":
        ramp(a.layers)
    else:
        check(a.models.split(",")[0], min(a.layers, 2))


if __name__ == "__main__":
    main()
