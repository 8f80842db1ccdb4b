"""GPU diagnostics behind two open figures (prints, writes nothing to bench/results):

- `kv`: KV swap of 64/256 scattered 7B-shaped blocks for several pipelining chunk sizes, stream time vs wall
  time, against one contiguous copy of the same bytes (what the link gives a single memcpy of that size).
- `gemv`: batch-1 `F.linear` time per weight shape of a model (cuBLAS), as achieved HBM bandwidth.

    python -m load_tests.diag_gpu kv
    python -m load_tests.diag_gpu gemv --model DIR
"""

from __future__ import annotations

import argparse
import statistics
import time

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


def gemv(model: str) -> None:
    from token_scheduler.model.config import ModelConfig

    cfg = ModelConfig.from_pretrained(model)
    h, i, q, k = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    shapes = {"qkv": (q + 2 * k, h), "o": (h, q), "gate_up": (2 * i, h), "down": (h, i), "lm_head": (cfg.vocab_size, h)}
    for name, (n_out, n_in) in shapes.items():
        w = torch.randn(n_out, n_in, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(1, n_in, device="cuda", dtype=torch.bfloat16)
        reps = 200
        graph = torch.cuda.CUDAGraph()
        F.linear(x, w)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                F.linear(x, w)
        graph.replay()
        torch.cuda.synchronize()
        t = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        us = 1e6 * (time.perf_counter() - t) / reps
        print(f"{name:8s} {n_out}x{n_in}: {us:7.2f} us  {w.numel() * 2 / us / 1e3:7.0f} GB/s "
              f"(bytes {w.numel() * 2 / 1e6:.1f} MB)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["kv", "gemv"])
    ap.add_argument("--model")
    a = ap.parse_args()
    kv() if a.what == "kv" else gemv(a.model)


if __name__ == "__main__":
    main()
