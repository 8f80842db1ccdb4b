"""GPU diagnostics behind the open figures (prints, writes nothing to bench/results):

- `kv`: KV swap of 64/256 scattered 7B-shaped blocks for several pipelining chunk sizes, stream time vs wall
  time, against one contiguous copy of the same bytes (what the link gives a single memcpy of that size).
- `gemv`: batch-1 `F.linear` time per weight shape of a model (cuBLAS), as achieved HBM bandwidth.
- `gemv-triton`: the Triton GEMV (token_scheduler/model/triton_gemv.py) over block configs, per projection,
  against cuBLAS plus the elementwise kernels it folds in; prints the best config per shape.
- `step`: the engine's decode step per batch size under each kernel launch variant (programmatic dependent
  launch, the one-token GEMVs, the small-batch GEMVs, RoPE in the qkv GEMV, GEMV block configs, the attention's
  split count).
- `copy-contention`: which small stream operations of a decode step (copies by kind and size, a kernel) wait behind
  a weight prefetch's large host -> device copy on another stream.
- `co-step`: two models' decode graphs replayed on one stream and on two (does one fill the other's gaps?).
- `step-sweep`: the GEMV block configs tuned by the decode graph's replay time, one projection at a time: the
  one-token kernel's at batch 1, the small-batch kernel's (for that batch's padded row count) above.

    python -m load_tests.diag_gpu kv
    python -m load_tests.diag_gpu gemv --model DIR
    python -m load_tests.diag_gpu gemv-triton --model DIR
    python -m load_tests.diag_gpu step --model DIR --batch 1,2,4,8,16,32
    python -m load_tests.diag_gpu step-sweep --model DIR [--batch 8]
    python -m load_tests.diag_gpu copy-contention
    python -m load_tests.diag_gpu co-step --model DIR_A --model15 DIR_B --batch 1,2,4
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

GB = 1e9


def _stream_time(fn, stream, reps=20) -> float:
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(stream)
        fn()
        b.record(stream)
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return statistics.median(ts)


def _wall(fn, reps=20) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def kv() -> None:
    from model_swapper.kv_swap import HostKVPool, KVSwapper

    block = (28, 2, 16, 4, 128)  # qwen2-7b
    kvt = torch.randn(512, *block, device="cuda").to(torch.bfloat16)
    host = HostKVPool.like(kvt, 512)
    g = torch.Generator().manual_seed(0)
    for n in (64, 256):
        nbytes = n * host.block_bytes
        src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            d2h = _stream_time(lambda a=dst, b=src: a.copy_(b, non_blocking=True), s)
            h2d = _stream_time(lambda a=src, b=dst: a.copy_(b, non_blocking=True), s)
        print(f"n={n} ({nbytes / 1e6:.1f} MB): one contiguous memcpy d2h {nbytes / d2h / GB:.1f} GB/s, "
              f"h2d {nbytes / h2d / GB:.1f} GB/s")
        ids = torch.randperm(512, generator=g)[:n].tolist()
        for chunk in (n, 32, 16, 8):
            sw = KVSwapper(kvt, host, staging_blocks=256, chunk_blocks=chunk)
            h_ids = host.allocator.allocate(n)

            def move(to_host, sw=sw, ids=ids, h_ids=h_ids):
                return sw.copy(ids, h_ids, to_host=to_host)

            def out():
                move(True).synchronize()

            def inn():
                move(False).synchronize()
            out(), inn()
            so = _stream_time(lambda: move(True), sw.stream)
            si = _stream_time(lambda: move(False), sw.stream)
            wo, wi = _wall(out), _wall(inn)
            print(f"  chunk {chunk:3d}: out stream {nbytes / so / GB:5.1f} wall {nbytes / wo / GB:5.1f} GB/s | "
                  f"in stream {nbytes / si / GB:5.1f} wall {nbytes / wi / GB:5.1f} GB/s")
            host.allocator.free(h_ids)


def _graph_us(fn, reps: int) -> float:
    """Microseconds per call of `fn(i)` for i in range(reps), captured in one CUDA graph and replayed."""
    from load_tests.bench_common import graph_replay_us

    return graph_replay_us(lambda: [fn(i) for i in range(reps)], 5) / reps


def gemv(model: str) -> None:
    from model_swapper.model_config import ModelConfig

    cfg = ModelConfig.from_pretrained(model)
    h, i, q, k = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    shapes = {"qkv": (q + 2 * k, h), "o": (h, q), "gate_up": (2 * i, h), "down": (h, i), "lm_head": (cfg.vocab_size, h)}
    for name, (n_out, n_in) in shapes.items():
        w = torch.randn(n_out, n_in, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(1, n_in, device="cuda", dtype=torch.bfloat16)
        us = _graph_us(lambda _, x=x, w=w: F.linear(x, w), 200)
        print(f"{name:8s} {n_out}x{n_in}: {us:7.2f} us  {w.numel() * 2 / us / 1e3:7.0f} GB/s "
              f"(bytes {w.numel() * 2 / 1e6:.1f} MB)")


def gemv_triton(model: str) -> None:
    """Batch-1 projections: cuBLAS F.linear (plus the elementwise kernels the GEMV folds in) vs the Triton GEMV
    over a sweep of block configs. Weights rotate over copies totalling >= 400 MB so L2 (50 MB) holds none."""
    from model_swapper.model_config import ModelConfig
    from token_scheduler.model import triton_ops as k
    from token_scheduler.model.triton_gemv import MODE_NORM, MODE_PLAIN, MODE_SILU, gemv

    cfg = ModelConfig.from_pretrained(model)
    h, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    shapes = {"qkv": (q + 2 * kv, h, MODE_NORM), "o": (h, q, MODE_PLAIN), "gate_up": (2 * i, h, MODE_NORM),
              "down": (h, i, MODE_SILU)}
    dt = torch.bfloat16
    best = {}
    for name, (n, kk, mode) in shapes.items():
        nbytes = n * kk * 2
        copies = max(2, min(64, -(-400_000_000 // nbytes)))
        ws = [torch.randn(n, kk, device="cuda", dtype=dt) * 0.02 for _ in range(copies)]
        x = torch.randn(1, 2 * kk if mode == MODE_SILU else kk, device="cuda", dtype=dt)
        r = torch.randn(1, kk, device="cuda", dtype=dt)
        nw = torch.ones(kk, device="cuda", dtype=dt)
        reps = copies * max(1, 64 // copies)

        def ref(j, ws=ws, x=x, r=r, nw=nw, mode=mode):
            if mode == MODE_NORM:
                xx = x.clone()
                return F.linear(k.add_rms_norm(xx, r, nw, 1e-6), ws[j % len(ws)])
            if mode == MODE_SILU:
                return F.linear(k.silu_mul(x), ws[j % len(ws)])
            return F.linear(x, ws[j % len(ws)])
        base = _graph_us(ref, reps)
        lin = _graph_us(lambda j, ws=ws, x=x, kk=kk: F.linear(x[:, :kk], ws[j % len(ws)]), reps)
        line = f"{name:8s} {n}x{kk} ({nbytes / 1e6:.1f} MB, floor {nbytes / 3.0e6:.2f} us): cuBLAS {lin:.2f} us, " \
               f"cuBLAS+elementwise {base:.2f} us"
        results = []
        for bn in (2, 4, 8, 16, 32):
            for bk in (256, 512, 1024):
                for nwarps in (4, 8):
                    if bn * bk > 16384 or (bk == 256 and bn < 8):
                        continue
                    cfgt = (bn, bk, nwarps)
                    try:
                        us = _graph_us(lambda j, ws=ws, x=x, r=r, nw=nw, mode=mode, c=cfgt: gemv(
                            x, ws[j % len(ws)], mode=mode, r=r if mode == MODE_NORM else None,
                            norm_w=nw, eps=1e-6, config=c), reps)
                    except Exception as e:  # noqa: BLE001 -- a config the compiler rejects
                        print("  skip", cfgt, str(e).splitlines()[0][:80])
                        continue
                    results.append((us, cfgt))
        results.sort()
        best[(n, kk)] = results[0][1]
        print(line)
        for us, c in results[:5]:
            print(f"    triton {c}: {us:.2f} us  {nbytes / us / 1e3:.0f} GB/s")
        del ws
        torch.cuda.empty_cache()
    print("BEST", best)


def rows_triton(model: str, batches: list[int]) -> None:
    """Small-batch projections, one kernel at a time: cuBLAS F.linear (alone, and with the elementwise kernels
    the small-batch GEMV folds in) against `gemv_rows` at its default blocks and over a grid, and the normed
    projections also without their norm prologue (MODE_PLAIN on the same shape): which projection, and which
    part of it, keeps the small-batch path behind cuBLAS in the decode graph. Weights rotate over copies totalling
    >= 400 MB so L2 holds none. cuBLAS as the decode graph runs it; the Triton kernels with programmatic dependent
    launch, as there."""
    from model_swapper.model_config import ModelConfig
    from token_scheduler.model import triton_ops as k
    from token_scheduler.model.triton_gemv import MODE_NORM, MODE_PLAIN, gemv_rows, rows_config_for, rows_pad

    cfg = ModelConfig.from_pretrained(model)
    h, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    shapes = {"qkv": (q + 2 * kv, h, MODE_NORM, False), "o": (h, q, MODE_PLAIN, False),
              "gate_up": (2 * i, h, MODE_NORM, True), "down": (h, i, MODE_PLAIN, False)}
    grid = [(bn, bk, 4, ns) for bn in (16, 32, 64, 128) for bk in (64, 128, 256) for ns in (3, 4) if bn * bk <= 16384]
    for m in batches:
        _precompile(_compile_rows, model, m, grid)
    dt, dev = torch.bfloat16, os.environ.get("DIAG_DEVICE", "cuda")
    for name, (n, kk, mode, glu) in shapes.items():
        nbytes = n * kk * 2
        copies = max(2, min(64, -(-400_000_000 // nbytes)))
        ws = [torch.randn(n, kk, device=dev, dtype=dt) * 0.02 for _ in range(copies)]
        reps = copies * max(1, 64 // copies)
        for m in batches:
            x = torch.randn(m, kk, device=dev, dtype=dt)
            r = torch.randn(m, kk, device=dev, dtype=dt)
            nw = torch.ones(kk, device=dev, dtype=dt)
            norm = mode == MODE_NORM

            def ref(j, ws=ws, x=x, r=r, nw=nw, norm=norm, glu=glu):
                xx = k.add_rms_norm(x.clone(), r, nw, 1e-6) if norm else x
                y = F.linear(xx, ws[j % len(ws)])
                return k.silu_mul(y) if glu else y

            def rows(j, c=None, plain=False, ws=ws, x=x, r=r, nw=nw, norm=norm, glu=glu):
                md = MODE_PLAIN if plain or not norm else MODE_NORM
                return gemv_rows(x, ws[j % len(ws)], mode=md, r=r if md == MODE_NORM else None, norm_w=nw,
                                 eps=1e-6, glu=glu, config=c)
            lin = _graph_us(lambda j, ws=ws, x=x: F.linear(x, ws[j % len(ws)]), reps)
            base = _graph_us(ref, reps)
            default = rows_config_for(n, kk, rows_pad(m))
            res = []
            # the Triton kernels launch as in the decode graph: programmatic dependent launch, each overlapping the
            # one before (and the kernels _precompile compiled are these)
            with k.pdl_rows(m):
                out = [f"{name:8s} {n}x{kk} M={m} ({nbytes / 1e6:.1f} MB, floor {nbytes / 4.25e6:.2f} us): cuBLAS "
                       f"{lin:.2f} us, +elementwise {base:.2f} us, rows default {default} "
                       f"{_graph_us(rows, reps):.2f} us"]
                if norm:
                    out.append(f"rows without the norm prologue {_graph_us(lambda j: rows(j, plain=True), reps):.2f} us")
                for c in grid:
                    try:
                        res.append((_graph_us(lambda j, c=c: rows(j, c), reps), c))
                    except Exception as e:  # noqa: BLE001 -- shared memory: skipped
                        print("  skip", c, str(e).splitlines()[0][:80], flush=True)
            res.sort()
            out += [f"rows {c} {us:.2f} us {nbytes / us / 1e3:.0f} GB/s" for us, c in res[:4]]
            print("\n    ".join(out), flush=True)
        del ws
        if dev == "cuda":
            torch.cuda.empty_cache()


class _StepTimer:
    """One engine whose decode graph for a batch size is re-captured before each timing, so that kernel options
    changed in between (module globals read at capture) take effect."""

    def __init__(self, model: str, max_batch: int, context: int = 512):
        from token_scheduler import LLMEngine
        from token_scheduler.engine import EngineConfig

        self.eng = LLMEngine(EngineConfig(model=model, device="cuda", max_num_seqs=max_batch,
                                          max_num_batched_tokens=8192, kv_cache_memory_gb=8.0, max_model_len=4096,
                                          num_host_kv_blocks=0))
        self.context = context
        self.replaced = []  # kept: the last graph of a pool keeps the pool alive

    def __call__(self, batch: int, steps: int) -> dict:
        from load_tests.bench_engine import _decode_step_times

        r = self.eng.runner
        bucket = r.bucket_of[batch]
        self.replaced.append(r.graphs.pop(r._graph_id(bucket), None))
        r.graphs.get(("warm", r.graph_key), set()).discard(bucket)  # warm-up runs (and compiles) before capture
        try:
            return _decode_step_times(self.eng, batch, self.context, steps, self.eng.model_config.vocab_size)
        finally:  # a config that fails mid-step (shared memory) leaves its requests behind: the next would clash
            for rid in list(self.eng.scheduler.requests):
                self.eng.abort_request(rid)


def step(model: str, batches: list[int], context: int = 512, only: list[str] | None = None) -> None:
    """The engine's decode step (median call time and graph replay) at each batch size, under each variant of
    the decode kernel options (the defaults, then one change at a time). One engine; each variant re-captures
    the graphs it times."""
    from token_scheduler import runner
    from token_scheduler.model import llama, megakernel, triton_decode, triton_gemv, triton_ops, triton_tma

    timed = _StepTimer(model, max(batches), context)
    # each variant key: the (module, attribute) it sets; "splits" pins triton_decode.num_splits_for to a constant
    knobs = {"pdl": (triton_ops, "USE_PDL"), "gemv": (llama, "USE_GEMV"), "max_hidden": (llama, "GEMV_MAX_HIDDEN"),
             "rope": (llama, "GEMV_ROPE"), "cfgs": (triton_gemv, "_CONFIGS"),
             "splits": (triton_decode, "num_splits_for"), "max_rows": (llama, "GEMV_MAX_ROWS"),
             "nbi": (triton_decode, "BLOCKS_PER_ITER"), "swap": (triton_gemv, "ROWS_SWAP"),
             "mlp": (llama, "GEMV_ROWS_MLP"), "attn_rope": (llama, "ATTN_ROPE"),
             "persist": (triton_gemv, "ROWS_PERSIST"), "attn_warps": (triton_decode, "DECODE_WARPS"),
             "fill": (triton_decode, "FILL"),
             "attn_stages": (triton_decode, "DECODE_STAGES"), "prefetch": (triton_decode, "PREFETCH_KV"),
             "norm_pass": (triton_gemv, "NORM_ONE_PASS"), "step_io": (runner, "STEP_IO"),
             "attn_pipe": (triton_decode, "PIPELINE_IDS"), "pipe_stages": (triton_decode, "PIPE_STAGES"),
             "tma_rows": (triton_tma, "MAX_ROWS"), "tma_glu": (triton_tma, "GLU"), "tma_smem": (triton_tma, "SMEM_WIDE"),
             "glu": (llama, "GEMV_GLU"), "pdl_early": (triton_ops, "PDL_EARLY"),
             "early_rows": (triton_ops, "PDL_EARLY_ROWS"), "mega": (megakernel, "USE")}
    defaults = {k: getattr(mod, attr) for k, (mod, attr) in knobs.items()}
    # torch's switches read when a matmul is launched (so at capture): which BLAS library, and whether cuBLAS may
    # reduce split-K partial sums in bf16
    mm = torch.backends.cuda.matmul
    switches = {"blas": (torch.backends.cuda.preferred_blas_library, torch.backends.cuda.preferred_blas_library),
                "bf16_red": (lambda: mm.allow_bf16_reduced_precision_reduction,
                             lambda v: setattr(mm, "allow_bf16_reduced_precision_reduction", v))}
    defaults.update({k: get() for k, (get, _set) in switches.items()})
    # the qwen2-1.5b GEMV block configs tuned without PDL, one projection at a time (before step-sweep)
    old_cfgs = {(2048, 1536): (8, 512, 8), (1536, 1536): (2, 512, 4), (17920, 1536): (16, 512, 8),
                (1536, 8960): (4, 1024, 8)}
    # name, then what it changes from the defaults
    variants = [("default", {}), ("no pdl", {"pdl": False}), ("no gemv", {"gemv": False}),
                # the batch-1 step as one persistent kernel (megakernel.py)
                ("megakernel", {"mega": True}), ("megakernel again", {"mega": True}),
                # kernels let the next one in before their wait on the one before (triton_ops.PDL_EARLY)
                ("pdl early", {"pdl_early": True}), ("pdl early again", {"pdl_early": True}),
                ("pdl late", {"pdl_early": False}),
                *((f"early rows {m}", {"early_rows": m}) for m in ("all", "light", "tma")),
                # with it: the attention's splits, and the projections' blocks (their pre-wait tiles now load under
                # the streams of the kernels still running)
                *((f"early splits {s}", {"pdl_early": True, "splits": s}) for s in (4, 8, 16)),
                *((f"early {name} {c[0]}x{c[1]}x{c[2]}", {"pdl_early": True, "cfgs": {**triton_gemv._CONFIGS, shape: c}})
                  for name, shape, cs in (("qkv", (2048, 1536), ((4, 2048, 8), (16, 1024, 8), (8, 1024, 8), (8, 2048, 8))),
                                          ("o", (1536, 1536), ((8, 2048, 8), (2, 2048, 8), (4, 2048, 4))),
                                          ("gate_up", (17920, 1536), ((8, 1024, 8), (32, 512, 8), (16, 1024, 8),
                                                                      (16, 512, 4), (8, 2048, 8))),
                                          ("down", (1536, 8960), ((4, 2048, 4), (8, 1024, 8), (8, 2048, 8),
                                                                  (2, 2048, 8))))
                  for c in cs),
                # batched steps' projections as TMA-fed Triton GEMMs, every kernel under PDL (triton_tma), or cuBLAS
                ("tma", {"tma_rows": 32}), ("tma again", {"tma_rows": 32}), ("cublas", {"tma_rows": 0}),
                ("tma no glu", {"tma_rows": 32, "tma_glu": False}),
                *((f"tma smem {n}k", {"tma_rows": 32, "tma_smem": n * 1024}) for n in (75, 220)),
                ("small-batch gemv", {"max_rows": 32}), ("small-batch gemv swapped", {"max_rows": 32, "swap": True}),
                ("small-batch gemv attn", {"max_rows": 32, "mlp": False}),
                ("step io", {"step_io": True}), ("rope in attention", {"attn_rope": True}), ("no attn prefetch", {"prefetch": False}),
                ("attn 8 blocks 4 warps", {"nbi": 8, "attn_warps": 4}), ("norm tiled pass", {"norm_pass": False}),
                ("rope in attention 8 warps", {"attn_rope": True, "attn_warps": 8}),
                ("small-batch gemv persistent 1", {"max_rows": 32, "persist": 1}),
                ("small-batch gemv persistent 2", {"max_rows": 32, "persist": 2}),
                ("attn unpiped", {"attn_pipe": False}),
                *((f"attn pipe {n} stages", {"attn_pipe": True, "pipe_stages": n}) for n in (2, 3, 4)),
                *((f"attn pipe {n} blocks", {"attn_pipe": True, "nbi": n}) for n in (2, 8)),
                ("attn pipe 4 warps", {"attn_pipe": True, "attn_warps": 4}),
                ("attn pipe fill 4", {"attn_pipe": True, "fill": 4}),
                ("attn pipe", {"attn_pipe": True}), ("attn fill 1", {"fill": 1}),
                ("attn pipe fill 1", {"attn_pipe": True, "fill": 1}),
                ("attn 2 blocks", {"nbi": 2}), ("attn 4 blocks", {"nbi": 4}),
                ("attn 8 blocks", {"nbi": 8}),
                *((f"attn 4 blocks {w} warps", {"nbi": 4, "attn_warps": w}) for w in (2, 8)),
                *((f"attn 4 blocks {n} stages", {"nbi": 4, "attn_stages": n}) for n in (1, 2, 4)),
                *((f"attn {n} blocks fill {f}", {"nbi": n, "fill": f}) for n in (2, 4) for f in (4, 8)),
                ("no gemv rope", {"rope": False}), ("old configs", {"cfgs": old_cfgs}),
                # the down projection with longer K tiles (more bytes in flight: down streams at 1.2-1.8x its floor
                # alone, diag_persist ramp at 457a2c1)
                *((f"down {bn}x{bk}", {"cfgs": {**triton_gemv._CONFIGS, (1536, 8960): (bn, bk, 8),
                                                 (3584, 18944): (bn, bk, 8)}})
                  for bn, bk in ((4, 1024), (4, 2048), (2, 2048), (2, 4096), (1, 4096))),
                # SiLU*mul in the one-token gate_up's epilogue, down a plain GEMV (llama.GEMV_GLU), and down's blocks then
                ("gemv glu", {"glu": True}), ("gemv glu again", {"glu": True}),
                *((f"gemv glu down {bn}x{bk}x{nw}", {"glu": True, "cfgs": {**triton_gemv._CONFIGS, (1536, 8960): (bn, bk, nw),
                                                                         (3584, 18944): (bn, bk, nw)}})
                  for bn, bk, nw in ((4, 1024, 4), (4, 2048, 8), (8, 1024, 8), (8, 512, 4), (2, 2048, 4), (4, 512, 4))),
                *((f"splits {s}", {"splits": s}) for s in triton_decode.SPLITS),
                # fewer splits with more cache blocks an iteration each: one split writes the result itself (no
                # combine launch) but walks the whole context alone
                *((f"splits {s} nbi {n}", {"splits": s, "nbi": n}) for s in (1, 2, 4, 8, 16) for n in (2, 4, 8)),
                ("no pdl, gemv any size", {"pdl": False, "max_hidden": 1 << 30}),
                # cuBLAS's batched projections (batches above the GEMV's): through cublasLt's heuristic instead of
                # cublas's, and without bf16 split-K reductions
                ("blas lt", {"blas": "cublaslt"}), ("no bf16 reduction", {"bf16_red": False}),
                ("blas lt no bf16 reduction", {"blas": "cublaslt", "bf16_red": False}), ("default again", {})]
    try:
        for name, v in variants:
            if only and name not in only:
                continue
            for k, (mod, attr) in knobs.items():
                val = v.get(k, defaults[k])
                if k == "splits" and k in v:
                    val = lambda *_a, s=val, **_k: s  # noqa: E731
                setattr(mod, attr, val)
            for k, (_get, put) in switches.items():
                put(v.get(k, defaults[k]))
            line = f"{name:22s}"
            for b in batches:
                d = timed(b, 40)
                line += f" | b{b}: step {d['step_ms_median']:.3f} ms, replay {d['graph_replay_ms']:.3f} ms"
            print(line, flush=True)
    finally:
        for k, (mod, attr) in knobs.items():
            setattr(mod, attr, defaults[k])
        for k, (_get, put) in switches.items():
            put(defaults[k])


def step_sweep(model: str, batch: int = 1, context: int = 512, swap: bool = False, mlp: bool = True,
               tma: bool = False, out: str | None = None) -> None:
    """GEMV block configs tuned where they run: the decode graph's replay time at `batch` as each projection's
    config varies in turn (coordinate descent from the current table); the one-token table at batch 1, the
    small-batch table's entries for the batch's padded row count above. Back-to-back timings of one projection
    (`gemv-triton`) mislead under programmatic dependent launch: the next kernel may only start once every
    program of this one has, so how many programs a projection has matters beside its own speed. `swap`, `mlp`
    (above batch 1): triton_gemv.ROWS_SWAP and llama.GEMV_ROWS_MLP (False: qkv and o alone are swept). `tma`: the
    batched step's TMA GEMMs (triton_tma.CONFIGS) instead, at `batch`."""
    from token_scheduler.model import llama, triton_gemv

    if tma:
        return _tma_step_sweep(model, batch, context, out)

    llama.GEMV_ROWS_MLP = mlp  # (set before the engine captures anything)
    timed = _StepTimer(model, batch, context)
    cfg = timed.eng.model_config
    h, i, q, k = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    shapes = {"gate_up": (2 * i, h), "down": (h, i), "qkv": (q + 2 * k, h), "o": (h, q)}
    if batch > 1 and not mlp:
        shapes = {n: shapes[n] for n in ("qkv", "o")}
    if batch == 1:
        attr, key = "_CONFIGS", (lambda s: s)
        current = triton_gemv.config_for
        # (K tiles of 2048 too: the 1.5B's down took (4, 2048, 8) on the H200, 7a0178e)
        grid = [(bn, bk, nw) for bn in (2, 4, 8, 16, 32) for bk in (512, 1024, 2048) for nw in (4, 8)
                if bn * bk <= 16384]
    else:
        llama.GEMV_MAX_ROWS = 32  # the small-batch path is off by default
        triton_gemv.ROWS_SWAP = swap
        m_pad = triton_gemv.rows_pad(timed.eng.runner.bucket_of[batch])
        attr, key = "_ROWS_CONFIGS", (lambda s: (*s, m_pad))
        current = lambda n, kk: triton_gemv.rows_config_for(n, kk, m_pad)  # noqa: E731
        # (qkv and o alone: narrower, longer tiles too -- 128 and 96 programs of 16 rows at the default blocks)
        wide = (16, 32, 64) if not mlp else (16, 32, 64, 128)
        grid = [(bn, bk, nw, ns) for bn in wide for bk in ((256, 512, 1024) if not mlp else (256, 512))
                for nw in (4, 8) for ns in (3, 4)
                if bn * bk <= 32768]  # some need more shared memory than a block may have: skipped below
    table = {key(s): current(*s) for s in shapes.values()}
    if batch > 1:
        _precompile(functools.partial(_compile_rows, swap=swap), model, timed.eng.runner.bucket_of[batch], grid)

    def replay_ms() -> float:
        setattr(triton_gemv, attr, dict(table))
        return timed(batch, 20)["graph_replay_ms"]

    base = replay_ms()
    print(f"start {table}: {base:.4f} ms", flush=True)
    for name, shape in shapes.items():
        _descend(name, shape, key(shape), table, grid, replay_ms)
    print("BEST", table, f"{replay_ms():.4f} ms (start {base:.4f})")


def _descend(name: str, shape, key, table: dict, grid, replay_ms, then=None) -> tuple:
    """One projection's turn of a step sweep's coordinate descent: each config of `grid` in `table[key]` (after
    it, `then(best)` where given), the step's replay timed, the least kept in the table. (best, its ms)."""
    best, best_ms = table[key], replay_ms()
    for c in [*grid, None] if then else grid:
        c = c or then(best)
        if c == best:
            continue
        table[key] = c
        try:
            ms = replay_ms()
        except Exception as e:  # noqa: BLE001 -- a config the compiler or the launch rejects
            print("  skip", c, str(e).splitlines()[0][:80], flush=True)
            continue
        print(f"  {name} {c}: {ms:.4f} ms", flush=True)
        if ms < best_ms:
            best, best_ms = c, ms
    table[key] = best
    print(f"{name} {shape}: {best} {best_ms:.4f} ms", flush=True)
    return best, best_ms


def _tma_grid(n: int, k: int, m_pad: int, parts: bool) -> list[tuple[int, ...]]:
    """The TMA configs a step sweep tries for weights [n, k] at m_pad rows, 4 warps (8 tried on the best after):
    64- and 128-row tiles, K tiles of 64-256 over 2-5 stages, split along K (down's `parts`) in 2, 4 or 8."""
    import triton

    out = []
    for bn in (64, 128):
        for bk, st in ((64, 4), (128, 2), (128, 3), (128, 4), (128, 5), (256, 2), (256, 3)):
            for split in ((2, 4, 8) if parts and bn == 64 else (1,)):
                tiles_k = triton.cdiv(k, bk)
                if st * (bn + m_pad) * bk * 2 > 200 * 1024 or tiles_k < 2 * split:
                    continue
                out.append((bn, bk, st, split, 4))
    return out


def _compile_tma(model: str, m: int, grid: list) -> int:
    """In a worker process: each (name, config) of `grid` run once as the batched step launches that projection
    (qkv with its bias, down as split-K parts, under PDL over m rows), so Triton's on-disk cache holds it."""
    from token_scheduler.model import triton_tma

    a = _projection_inputs(model, m)
    ops = {"qkv": lambda c: triton_tma.linear(a.x, a.wq, a.bq, config=c),
           "o": lambda c: triton_tma.linear(a.xo, a.wo, config=c),
           "gate_up": lambda c: triton_tma.linear(a.x, a.wgu, config=c),
           "down": lambda c: triton_tma.linear(a.xd, a.wd, parts=True, config=c)}
    return _run_all([lambda name=name, c=c: ops[name](c) for name, c in grid], m, a.dev)


def _tma_step_sweep(model: str, batch: int, context: int, out: str | None = None) -> None:
    """`step_sweep` over the batched step's TMA GEMM configs (triton_tma.CONFIGS, keyed by shape and padded rows):
    coordinate descent from config_for's, gate_up, down, qkv, o in turn, then 8 warps on each best. `out`: a
    tma_configs file (triton_tma.tuned_path's form) the best are merged into, after each projection."""
    from token_scheduler.model import triton_tma

    def save(shape, c, ms):
        if not out:
            return
        doc = json.load(open(out)) if os.path.exists(out) else {
            "device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"), "commit":
            os.environ.get("TOKENPOOL_COMMIT", "?"), "command": " ".join(sys.argv), "configs": []}
        doc["configs"] = [e for e in doc["configs"] if tuple(e["shape"]) != shape]
        doc["configs"].append({"shape": list(shape), "config": list(c), "replay_ms": round(ms, 4), "batch": batch})
        with open(out, "w") as f:
            json.dump(doc, f, indent=1)

    timed = _StepTimer(model, batch, context)
    cfg = timed.eng.model_config
    h, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    shapes = {"gate_up": (2 * i, h), "down": (h, i), "qkv": (q + 2 * kv, h), "o": (h, q)}
    m = timed.eng.runner.bucket_of[batch]
    m_pad = triton_tma.rows_pad(m)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    table = {(*s, m_pad): (*triton_tma.config_for(*s, m_pad, sms), 4) for s in shapes.values()}
    grids = {name: _tma_grid(*s, m_pad, name == "down") for name, s in shapes.items()}
    _precompile(_compile_tma, model, m, [(name, c) for name, g in grids.items() for c in g], procs=14)

    def replay_ms() -> float:
        triton_tma.CONFIGS = dict(table)
        return timed(batch, 20)["graph_replay_ms"]

    try:
        base = replay_ms()
        print(f"start {table}: {base:.4f} ms", flush=True)
        for name, shape in shapes.items():
            key = (*shape, m_pad)  # (last: 8 warps on the best of 4)
            save(key, *_descend(name, shape, key, table, grids[name], replay_ms, lambda b: (*b[:4], 8)))
        final = replay_ms()
        triton_tma.CONFIGS = {}
        again = replay_ms()
        print("BEST", table, f"{final:.4f} ms (start {base:.4f}, config_for again {again:.4f})", flush=True)
    finally:
        triton_tma.CONFIGS = {}


def _projection_inputs(model: str, m: int) -> SimpleNamespace:
    """Random operands of `model`'s four projections for a step of `m` tokens, laid out as the decode graph's
    (the RoPE positions and cache slots: rows of one [5, m] tensor), on DIAG_DEVICE (default cuda)."""
    from model_swapper.model_config import ModelConfig
    from token_scheduler.model import llama
    from token_scheduler.model.triton_gemv import RopeKV

    cfg = ModelConfig.from_pretrained(model)
    h, i, H, KVH, D = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dev, dt = os.environ.get("DIAG_DEVICE", "cuda"), torch.bfloat16

    def rnd(*shape):
        return torch.randn(*shape, device=dev, dtype=dt)
    rope = llama.RopeCache.build(cfg, 64, dev)
    z = torch.zeros(5, m, dtype=torch.long, device=dev)
    kv = torch.zeros(4, cfg.num_layers, 2, 16, KVH, D, device=dev, dtype=dt)
    nqkv = cfg.q_size + 2 * cfg.kv_size
    return SimpleNamespace(
        dev=dev, x=rnd(m, h), r=rnd(m, h), nw=torch.ones(h, device=dev, dtype=dt),
        rk=RopeKV(rope.cos, rope.sin, z[1], kv, 1, z[2], z[3], H, KVH, D), wq=rnd(nqkv, h),
        bq=rnd(nqkv) if cfg.qkv_bias else None, wo=rnd(h, cfg.q_size), wgu=rnd(2 * i, h), wd=rnd(h, i),
        xo=rnd(m, cfg.q_size), xd=rnd(m, i))


def _run_all(calls, m: int, dev: str) -> int:
    """Run each call (a compile where Triton's cache lacks it) with programmatic dependent launch over `m` rows,
    as the decode graph launches these kernels; a config the compiler rejects is skipped (the sweeps skip it too).
    How many ran."""
    from token_scheduler.model import triton_ops

    done = 0
    with triton_ops.pdl_rows(m):
        for call in calls:
            try:
                call()
                done += 1
            except Exception:  # noqa: BLE001 -- e.g. more shared memory than a block may have
                pass
    if dev == "cuda":
        torch.cuda.synchronize()
    return done


def _compile_rows(model: str, m: int, configs: list, swap: bool = False) -> int:
    """In a worker process: run each of `configs` once for each projection of `model`'s batched decode step, as
    `_forward_gemv` calls them (mode, epilogue), and as `rows_triton` does (without RoPE, without the norm), so
    that Triton's on-disk cache holds the compiled kernels (`swap`: triton_gemv.ROWS_SWAP's)."""
    from token_scheduler.model import triton_gemv
    from token_scheduler.model.triton_gemv import MODE_NORM, gemv_rows

    triton_gemv.ROWS_SWAP = swap

    a = _projection_inputs(model, m)
    norm = dict(mode=MODE_NORM, r=a.r, norm_w=a.nw, eps=1e-6)
    calls = [call for c in configs for call in (
        lambda c=c: gemv_rows(a.x, a.wq, a.bq, **norm, rope=a.rk, config=c),
        lambda c=c: gemv_rows(a.x, a.wq, a.bq, mode=MODE_NORM, norm_w=a.nw, eps=1e-6, rope=a.rk, config=c),
        lambda c=c: gemv_rows(a.x, a.wq, **norm, config=c),
        lambda c=c: gemv_rows(a.x, a.wq, config=c),
        lambda c=c: gemv_rows(a.x, a.wgu, glu=True, config=c),
        lambda c=c: gemv_rows(a.xo, a.wo, config=c),
        lambda c=c: gemv_rows(a.x, a.wgu, **norm, glu=True, config=c),
        lambda c=c: gemv_rows(a.xd, a.wd, config=c))]
    return _run_all(calls, m, a.dev)


def _precompile(worker, model: str, m: int, grid: list, procs: int = 8) -> None:
    """Compile a sweep's configs in `procs` processes first (`worker`: `_compile_rows`): one
    compile is about a second, and the sweep then only captures and times."""
    import concurrent.futures
    import multiprocessing

    t = time.perf_counter()
    procs = max(1, min(procs, len(grid)))
    chunks = [grid[j::procs] for j in range(procs)]
    with concurrent.futures.ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) as ex:
        n = sum(ex.map(worker, [model] * procs, [m] * procs, chunks))
    print(f"precompiled {n} kernels in {time.perf_counter() - t:.1f} s", flush=True)


def prefill(model: str, reps: int = 12) -> None:
    """Where a prefill step's host time goes (issue 14: served prefills took ~28 ms of the step thread at 35 models,
    nearly all before the device work was queued). (1) cuBLAS launch time of a projection at a token count seen
    before vs a new one each call (a heuristics lookup per new shape?), with and without bias; (2) the engine's
    prefill step of 3 prompts: ms until its forward is queued (host) and in all, at fixed and at varied lengths."""
    import random

    from token_scheduler import LLMEngine
    from token_scheduler.engine import EngineConfig
    from token_scheduler.request import SamplingParams

    dev = "cuda"
    for n, k in ((17920, 1536), (2048, 1536), (37888, 3584)):
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.01
        b = torch.zeros(n, device=dev, dtype=torch.bfloat16)
        for bias in (None, b):
            for label, ms in (("same M", [768] * 28), ("new M", random.Random(n).sample(range(300, 1300), 28))):
                x = {m: torch.randn(m, k, device=dev, dtype=torch.bfloat16) for m in ms}
                F.linear(x[ms[0]], w, bias)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for m in ms:
                    F.linear(x[m], w, bias)
                t1 = time.perf_counter()
                torch.cuda.synchronize()
                print(f"linear {n}x{k} bias={bias is not None} {label}: launch {1e6 * (t1 - t0) / len(ms):.1f} us a "
                      f"call, {1e3 * (time.perf_counter() - t0):.2f} ms with the device", flush=True)
    eng = LLMEngine(EngineConfig(model=model, device="cuda", max_num_seqs=8, max_num_batched_tokens=8192,
                                 kv_cache_memory_gb=4.0, max_model_len=4096, num_host_kv_blocks=0))
    vocab = eng.model_config.vocab_size
    rng = random.Random(0)

    def finish() -> None:  # the rest of the requests' steps, untimed
        while eng.has_unfinished_requests():
            eng.step_tokens()

    shapes = (("fixed 3x256", lambda: [256, 256, 256]), ("varied 3x~256", lambda: [rng.randint(150, 400) for _ in "abc"]),
              ("fixed 1x768", lambda: [768]), ("varied 3x~600", lambda: [rng.randint(450, 800) for _ in "abc"]))
    for label, lens in shapes:
        host, total = [], []
        for i in range(reps):
            for j, n in enumerate(lens()):
                eng.add_request(f"{label}-{i}-{j}", [rng.randrange(vocab) for _ in range(n)],
                                SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
            torch.cuda.synchronize()
            marks = []
            t0 = time.perf_counter()
            eng.step_tokens(on_launch=lambda marks=marks: marks.append(time.perf_counter()))
            t1 = time.perf_counter()
            host.append(1e3 * (marks[0] - t0))
            total.append(1e3 * (t1 - t0))
            finish()
        host, total = sorted(host[2:]), sorted(total[2:])
        print(f"prefill {label}: host until queued {host[len(host) // 2]:.2f} ms, step {total[len(total) // 2]:.2f} ms "
              f"(medians of {len(host)})", flush=True)
    _profile_prefills(eng.step_tokens, _three_prompts(eng.add_request, vocab, rng, SamplingParams(
        max_tokens=1, temperature=0, ignore_eos=True)), finish)


def _profile_prefills(step_tokens, submit, finish, reps: int = 8, sync: bool = True):
    """cProfile of the host side of `reps` prefill steps, each of the prompts `submit(tag)` adds: from the step call
    until its forward is queued (on_launch); `finish()` runs the rest untimed. Prints the host ms until queued (median)
    and the top functions by own time and by cumulative time."""
    import cProfile
    import pstats

    prof, host = cProfile.Profile(), []
    for i in range(reps):
        submit(f"prof{i}")
        if sync:
            torch.cuda.synchronize()
        marks: list[float] = []
        t0 = time.perf_counter()
        prof.enable()
        step_tokens(on_launch=lambda marks=marks: (prof.disable(), marks.append(time.perf_counter())))
        prof.disable()
        if marks:
            host.append(1e3 * (marks[0] - t0))
        finish()
    print(f"profiled prefill: host until queued {sorted(host)[len(host) // 2]:.2f} ms (median of {len(host)}: "
          f"{[round(h, 1) for h in host]})", flush=True)
    st = pstats.Stats(prof)
    st.sort_stats("tottime").print_stats(28)
    st.sort_stats("cumulative").print_stats(40)


def _three_prompts(add, vocab: int, rng, sp):
    """`submit(tag)` for `_profile_prefills`: 3 prompts of 150-400 random tokens through `add(id, prompt, params)`."""
    def submit(tag: str) -> None:
        for j in range(3):
            add(f"{tag}-{j}", [rng.randrange(vocab) for _ in range(rng.randint(150, 400))], sp)
    return submit


def prefill_pooled(model: str, reps: int = 8, device: str = "cuda") -> None:
    """Where a *pooled* prefill step's host time goes (served at 36 models on the H200 its steps spent ~23 ms before
    their forward was queued, where `prefill` measures the single engine's at ~9-18 ms): a MultiModelEngine over two
    aliases of `model` in a 20 GB arena, warm (weights resident, graphs captured), then `_profile_prefills`."""
    import random

    from token_scheduler.engine import EngineConfig
    from token_scheduler.multi_engine import MultiModelEngine
    from token_scheduler.request import SamplingParams

    multi = MultiModelEngine({n: EngineConfig(model=model, device=device, served_model_name=n, max_num_seqs=8)
                              for n in ("a", "b")}, policy="token", device=device, gpu_budget="20GB", kv_cache_gb=2.0)
    submit = _three_prompts(lambda rid, p, sp: multi.add_request(rid, p, sp, model="a"),
                            multi.engines["a"].model_config.vocab_size, random.Random(0),
                            SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    try:
        for i in range(3):  # warm: weights in, graphs captured
            submit(f"warm{i}")
            multi.run()
        _profile_prefills(multi.step_tokens, submit, multi.run, reps, sync=device == "cuda")
    finally:  # (a reader that stops early, e.g. `| head`, must not leave the host copies in /dev/shm)
        multi.close()


def _endless_streams(multi, names, batch: int, rng, tag: str, prompt_len: int) -> list[str]:
    """`batch` greedy requests that never end (random prompts of `prompt_len` tokens) to each model of `names` in
    pooled engine `multi`; their ids."""
    from token_scheduler.request import SamplingParams

    rids = []
    for name in names:
        vocab = multi.engines[name].model_config.vocab_size
        for i in range(batch):
            rids.append(f"{tag}/{name}/{i}")
            multi.add_request(rids[-1], [rng.randrange(10, vocab - 10) for _ in range(prompt_len)],
                              SamplingParams(max_tokens=100000, temperature=0, ignore_eos=True), model=name)
    return rids


def _timed_steps(multi, steps: int, sync) -> float:
    """Seconds of `steps` steps of `multi`, to nothing in flight and the device drained (also the warm-up, its time
    ignored: weights in, graphs captured, prefills done)."""
    t = time.perf_counter()
    for _ in range(steps):
        multi.step_tokens()
    multi._settle()
    sync()
    return time.perf_counter() - t


def pipe_dev(model7: str, model15: str, steps: int = 600, batch: int = 3, device: str = "cuda",
             budget: str = "40GB", kv_gb: float = 2.0) -> None:
    """Does a decode step take the device longer when the pooled engine queues it before the step in flight is read
    (TOKENPOOL_PIPELINE=1) than when the device waits for the host between steps? Served at 36 models (H200, seed 1,
    f1cd6aa) a pipelined step measured 3.53 ms of device time against 2.5-3.3 unpipelined, but over another mix of
    steps. Here one pooled engine hosts a 7B and a 1.5B, both resident (no weight traffic), each with `batch`
    greedy streams, and steps `steps` times with the pipeline off, then on; every step read is timed by CUDA events
    (TOKENPOOL_TIME_STEPS) and booked by model and batch: device ms a step, and the device's share of the wall."""
    import random

    from token_scheduler import multi_engine as me
    from token_scheduler.engine import EngineConfig

    for pipe in (False, True):
        me.PIPELINE, me.TIME_STEPS = pipe, True
        multi = me.MultiModelEngine({n: EngineConfig(model=m, device=device, served_model_name=n, max_num_seqs=8)
                                     for n, m in (("7b", model7), ("1.5b", model15))},
                                    policy="token", device=device, gpu_budget=budget, kv_cache_gb=kv_gb)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        books: dict = {}
        for name, eng in multi.engines.items():
            for fn in ("execute", "read"):
                orig = getattr(eng.runner, fn)

                def timed(*a, orig=orig, name=name, fn=fn, books=books, **kw):
                    res = orig(*a, **kw)
                    if res.device_s is not None:
                        out = a[0].out if fn == "read" else a[0]
                        if out.is_decode:
                            books.setdefault((name, len(out.chunks), fn), []).append(res.device_s)
                    return res
                setattr(eng.runner, fn, timed)
        rng = random.Random(0)
        try:
            # one model stepping alone (turns of many steps: the pipeline keeps the device busy), then both
            for phase, active in enumerate((("7b",), ("1.5b",), ("7b", "1.5b"))):
                rids = _endless_streams(multi, active, batch, rng, str(phase), 100)
                _timed_steps(multi, 60, sync)  # (warm)
                books.clear()
                p0, sw0 = multi.timing["pipelined_steps"], multi.switches
                wall = _timed_steps(multi, steps, sync)
                dev = sum(sum(v) for v in books.values()) or float("nan")
                print(f"pipeline={int(pipe)} {'+'.join(active)}: {steps} steps in {wall * 1e3:.1f} ms "
                      f"({wall / steps * 1e3:.3f} ms a step), device {dev * 1e3:.1f} ms timed ({dev / wall:.3f} of the "
                      f"wall), pipelined {multi.timing['pipelined_steps'] - p0:.0f}, switches {multi.switches - sw0}")
                for (name, b, fn), v in sorted(books.items()):
                    v = sorted(v)
                    print(f"  {name:5s} batch {b} via {fn:7s}: {len(v):4d} steps, device ms mean "
                          f"{sum(v) / len(v) * 1e3:.3f} p50 {v[len(v) // 2] * 1e3:.3f} p90 {v[int(len(v) * 0.9)] * 1e3:.3f}")
                for rid in rids:
                    multi.abort_request(rid)
                multi.run()
        finally:
            multi.close()


def co_step(model_a: str, model_b: str, batches: list[int], context: int = 512, reps: int = 60) -> None:
    """Two models' decode steps at once: does a second model's captured decode graph, replayed on its own stream,
    fill the first one's kernel boundaries? Served at 40 models the device is busy 95-97% with decode steps at a
    mean batch of ~2 (session 35), 1.5B steps at 1.7x their weights' stream: ~3 us of fill and drain at each of
    ~170 kernels. Two engines (model_a and model_b, each its own weights and KV), `batch` greedy streams each, their
    graphs captured by the engine; then per batch: A alone, B alone, A then B on one stream, A and B on two
    streams, each `reps` pairs, ms a pair by the wall with the device drained at both ends."""
    from load_tests.bench_engine import decode_graph
    from token_scheduler.request import SamplingParams

    engines = [_StepTimer(m, max(batches), context).eng for m in (model_a, model_b)]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]

    def timed(fn) -> float:
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / reps * 1e3

    for b in batches:
        graphs = []
        for n, eng in enumerate(engines):
            g = torch.Generator().manual_seed(b + n)
            vocab = eng.model_config.vocab_size
            for i in range(b):
                eng.add_request(f"co{b}-{i}", torch.randint(0, vocab, (context,), generator=g).tolist(),
                                SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
            while any(r.is_prefilling or not r.output_token_ids for r in eng.scheduler.requests.values()):
                eng.step()
            for _ in range(3):
                eng.step()
            dg = decode_graph(eng, b)
            if dg is None:
                raise SystemExit(f"co-step: no decode graph at batch {b}")
            graphs.append(dg.graph)
        ga, gb = graphs

        def both_one_stream(ga=ga, gb=gb):
            ga.replay()
            gb.replay()

        def both_two_streams(ga=ga, gb=gb):  # a step of both models: both start together, the next waits for both
            cur = torch.cuda.current_stream()
            for s in streams:
                s.wait_stream(cur)
            with torch.cuda.stream(streams[0]):
                ga.replay()
            with torch.cuda.stream(streams[1]):
                gb.replay()
            for s in streams:
                cur.wait_stream(s)

        def both_free(ga=ga, gb=gb):  # no joins: each stream runs its replays back to back
            with torch.cuda.stream(streams[0]):
                ga.replay()
            with torch.cuda.stream(streams[1]):
                gb.replay()

        a, bb = timed(ga.replay), timed(gb.replay)
        one, two, free = timed(both_one_stream), timed(both_two_streams), timed(both_free)
        print(f"co-step b{b}: A {a:.3f} ms, B {bb:.3f} ms, A+B one stream {one:.3f} ms, two streams joined "
              f"{two:.3f} ms ({two / one:.3f} of one stream), two streams free {free:.3f} ms ({free / one:.3f})",
              flush=True)
        for eng in engines:
            for rid in list(eng.scheduler.requests):
                eng.abort_request(rid)
            eng.step()


def co_loop(model_a: str, model_b: str, batches: list[int], steps: int = 800, device: str = "cuda",
            modes: tuple[str, ...] = ("off", "co", "deep")) -> None:
    """How much of two streams' overlap (`co-step`: two 1.5B batch-2 steps 0.66 of one stream's time) the pooled
    engine's step loop realises. One pooled engine hosts model A and model B (the same checkpoint may be both: aliases
    share it), both resident; each has `batch` greedy streams that never end; the token policy runs them for `steps`
    steps with co-stepping off (turns, one model a step on the device), on (TOKENPOOL_CO_STEP: paired turns, the
    mate's step launched beside the step in flight, one step in flight past a call) and deep
    (TOKENPOOL_CO_STEP_DEEP: both models' steps kept in flight, each model's next queued behind its own). Prints ms a
    step by the wall against each model's step alone (turns of one model, the pipeline within them)."""
    import dataclasses
    import random

    from token_scheduler import multi_engine as me
    from token_scheduler.engine import EngineConfig

    me.PIPELINE = me.PLAN_AHEAD = True
    multi = me.MultiModelEngine({n: EngineConfig(model=m, device=device, served_model_name=n, max_num_seqs=8)
                                 for n, m in (("a", model_a), ("b", model_b))},
                                policy="token", device=device, gpu_budget="60GB" if device == "cuda" else "64MB",
                                kv_cache_gb=2.0 if device == "cuda" else 0.01)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rng = random.Random(0)
    tm = multi.timing
    try:
        for b in batches:
            solo = {}
            for mode in ("a", "b", *modes):
                co = mode in ("co", "deep")
                multi._co_step_on, multi._co_deep = co, mode == "deep"
                multi.policy.cfg = dataclasses.replace(multi.policy.cfg, pair_turns=co)
                rids = _endless_streams(multi, ("a", "b") if mode not in ("a", "b") else (mode,), b, rng,
                                        f"{mode}/{b}", 200)
                _timed_steps(multi, 80, sync)  # (warm: both lanes' graphs captured)
                k0 = {k: tm[k] for k in ("steps", "co_steps", "co_deep_kept", "pipelined_steps")}
                sw0 = multi.switches
                wall = _timed_steps(multi, steps, sync)
                d = {k: tm[k] - v for k, v in k0.items()}
                ms = wall / d["steps"] * 1e3
                if mode in ("a", "b"):
                    solo[mode] = ms
                    ref = ""
                else:
                    alone = (solo["a"] + solo["b"]) / 2
                    ref = f", {ms / alone:.3f} of alone ({alone:.3f} ms)"
                print(f"co-loop b{b} {mode:4s}: {ms:.3f} ms a step{ref}; steps {d['steps']:.0f}, co-steps "
                      f"{d['co_steps']:.0f}, deep kept {d['co_deep_kept']:.0f}, pipelined {d['pipelined_steps']:.0f}, "
                      f"switches {multi.switches - sw0}", flush=True)
                for rid in rids:
                    multi.abort_request(rid)
                multi.run()
    finally:
        multi.close()


def copy_contention(gb: float = 3.0, pieces: int = 4, reps: int = 12) -> None:
    """Which of a decode step's small stream operations wait behind a weight prefetch? Served pipelined at 36 models
    (session 30), a step queued while another model's weights were being copied in on the swapper's stream started
    ~17 ms late, its own device time clean. Here: a `gb` GB pinned host -> device copy in `pieces` on a side stream
    (as `WeightSwapper.swap_in`), and on the default stream, one at a time, each small operation a pipelined step
    queues before its graph: a kernel, host -> device copies from pinned memory of several sizes, device -> device
    memcpys, a device -> host copy into pinned memory, and a device -> device copy made by a kernel; for each, the
    host's time from queueing it to its completion (median and max of `reps`), idle and under the copy."""
    from gpu_pool.pinned import device_view, kernel_copy

    dev = torch.device("cuda")
    n = int(gb * GB) // 4 * 4
    src = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(n, dtype=torch.uint8, device=dev)
    side = torch.cuda.Stream(dev)
    x = torch.zeros(1024, device=dev)
    small = {k: (torch.arange(k // 8, dtype=torch.long).pin_memory(), torch.zeros(k // 8, dtype=torch.long, device=dev))
             for k in (40, 2 << 10, 8 << 10, 16 << 10, 64 << 10, 1 << 20)}
    d_src = torch.arange(4, dtype=torch.long, device=dev)
    d_dst = torch.zeros(5, 4, dtype=torch.long, device=dev)
    h_out = torch.empty(4, dtype=torch.long, pin_memory=True)
    ops = {"kernel add": lambda: x.add_(1),
           **{f"h2d pinned {k} B": (lambda k=k: small[k][1].copy_(small[k][0], non_blocking=True)) for k in small},
           "d2d memcpy 32 B": lambda: d_dst[0].copy_(d_src),
           "d2d by kernel 32 B": lambda: kernel_copy(d_dst[0], d_src),
           "d2h pinned 32 B": lambda: h_out.copy_(d_src, non_blocking=True),
           # what the eager paths (prefill) do: a list to the device from pageable memory (torch then waits)
           **{f"pageable list {k} B": (lambda k=k: torch.tensor(list(range(k // 8)), device=dev))
              for k in (2 << 10, 16 << 10, 128 << 10)}}
    try:  # pinned host memory as a CUDA tensor (UVA: the same address), read by a kernel: no copy engine
        zc = {k: device_view(h) for k, (h, _) in small.items() if k <= 16 << 10}
        ops.update({f"zero-copy read {k} B": (lambda k=k: kernel_copy(small[k][1], zc[k])) for k in zc})
        zo = device_view(h_out)
        ops["zero-copy write 32 B"] = lambda: kernel_copy(zo, d_src)
    except Exception as e:  # noqa: BLE001 - a diagnostic: say so and go on
        print(f"zero-copy views not made: {e}")

    def latency(op, behind: bool) -> float:
        """From queueing `op` to its completion; `behind`: queued behind a ~2 ms kernel still running, as a
        pipelined step's inputs are queued behind the step in flight."""
        if behind:
            torch.cuda._sleep(2_000_000)
        t = time.perf_counter()
        op()
        ev = torch.cuda.Event()
        ev.record()
        ev.synchronize()
        return time.perf_counter() - t

    piece = n // pieces

    def prefetch() -> None:
        with torch.cuda.stream(side):
            for i in range(pieces):
                dst[i * piece:(i + 1) * piece].copy_(src[i * piece:(i + 1) * piece], non_blocking=True)

    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record(side)
    prefetch()
    b.record(side)
    b.synchronize()
    print(f"{gb:.1f} GB in {pieces} pieces alone: {a.elapsed_time(b):.1f} ms")
    print("ms from queueing to done, p50 / max of", reps, "(behind: queued behind a running ~2 ms kernel)")
    for name, op in ops.items():
        row = []
        for behind in (False, True):
            for busy in (False, True):
                ts = []
                for _ in range(reps + 2):
                    if busy:
                        prefetch()
                        time.sleep(0.002)  # the first piece under way
                    ts.append(latency(op, behind))
                    side.synchronize()
                ts = sorted(ts[2:])
                row.append(f"{'behind' if behind else 'idle'}{'+copy' if busy else ''} "
                           f"{ts[len(ts) // 2] * 1e3:.3f}/{ts[-1] * 1e3:.3f}")
        print(f"{name:22s} " + " | ".join(row))
    if "zero-copy write 32 B" in ops:
        d_src.add_(7)
        ops["zero-copy write 32 B"]()
        torch.cuda.synchronize()
        print("zero-copy write lands:", h_out.tolist() == d_src.tolist())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["kv", "gemv", "gemv-triton", "rows-triton", "step", "step-sweep", "prefill",
                                     "prefill-pooled", "pipe-dev", "copy-contention", "co-step", "co-loop"])
    ap.add_argument("--model15", help="pipe-dev: the 1.5B beside --model (the 7B); co-step, co-loop: model B")
    ap.add_argument("--model")
    ap.add_argument("--variants", help="step: only these variants, comma-separated (e.g. 'default,no pdl')")
    ap.add_argument("--batch", help="step: batch sizes (default 1,8); step-sweep: one batch size (default 1)")
    ap.add_argument("--context", type=int, default=512, help="step, step-sweep: each sequence's context")
    ap.add_argument("--swap", action="store_true", help="step-sweep above batch 1: the small-batch kernel's dot "
                    "the other way round (triton_gemv.ROWS_SWAP)")
    ap.add_argument("--tma", action="store_true", help="step-sweep above batch 1: the batched step's TMA GEMM "
                    "configs (triton_tma.CONFIGS)")
    ap.add_argument("--tma-out", help="step-sweep --tma: merge the best configs into this tma_configs file")
    ap.add_argument("--mlp-cublas", action="store_true", help="step-sweep above batch 1: the MLP on cuBLAS, qkv and o "
                    "alone swept (llama.GEMV_ROWS_MLP off)")
    a = ap.parse_args()
    {"kv": kv, "gemv": lambda: gemv(a.model), "gemv-triton": lambda: gemv_triton(a.model),
     "step": lambda: step(a.model, [int(b) for b in (a.batch or "1,8").split(",")], a.context,
                         only=a.variants.split(",") if a.variants else None),
     "step-sweep": lambda: step_sweep(a.model, int(a.batch or 1), a.context, a.swap, not a.mlp_cublas, a.tma,
                                           a.tma_out),
     "prefill": lambda: prefill(a.model),
     "prefill-pooled": lambda: prefill_pooled(a.model),
     "pipe-dev": lambda: pipe_dev(a.model, a.model15),
     "copy-contention": copy_contention,
     "co-step": lambda: co_step(a.model, a.model15, [int(b) for b in (a.batch or "1,2,4").split(",")], a.context),
     "co-loop": lambda: co_loop(a.model, a.model15, [int(b) for b in (a.batch or "1,2,4").split(",")],
                                device="cuda" if torch.cuda.is_available() else "cpu"),
     "rows-triton": lambda: rows_triton(a.model, [int(b) for b in (a.batch or "8,32").split(",")])}[a.what]()


if __name__ == "__main__":
    main()
