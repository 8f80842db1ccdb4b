"""Diagnostic: PCIe copy rates into/out of different kinds of page-locked host memory (not a benchmark).

    python -m load_tests.diag_pinned            # kinds of host memory, one GPU
    python -m load_tests.diag_pinned gpus       # every GPU of the machine: alone, then all at once


cudaHostAlloc (torch pin_memory) vs an mmap'd region registered with cudaHostRegister (PinnedRegion), with
and without transparent huge pages, for KV-swap-sized copies (64 and 256 blocks of a 7B model's KV).
"""

from __future__ import annotations

import mmap
import time

import torch

from gpu_pool.pinned import PinnedRegion

MADV_HUGEPAGE = 14


def rate(dst: torch.Tensor, src: torch.Tensor, reps: int = 20) -> float:
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        dst.copy_(src, non_blocking=True)
    s.synchronize()
    t = time.perf_counter()
    with torch.cuda.stream(s):
        for _ in range(reps):
            dst.copy_(src, non_blocking=True)
    s.synchronize()
    return src.numel() * reps / (time.perf_counter() - t) / 1e9


def main() -> None:
    block = 917504  # 7B KV block (28 layers x 2 x 16 tokens x 4 heads x 128 x bf16)
    for nblk in (64, 256):
        n = nblk * block
        dev = torch.empty(n, dtype=torch.uint8, device="cuda")
        kinds = {"torch_pin_memory": torch.empty(n, dtype=torch.uint8, pin_memory=True)}
        r = PinnedRegion.anonymous(n, pin=True)
        kinds["mmap_register"] = r.tensor
        mm = mmap.mmap(-1, n)
        try:
            mm.madvise(MADV_HUGEPAGE)
        except (AttributeError, OSError):
            pass
        t = torch.frombuffer(mm, dtype=torch.uint8)
        t.fill_(0)
        torch.cuda.cudart().cudaHostRegister(t.data_ptr(), n, 1)
        kinds["mmap_hugepage_register"] = t
        for name, h in kinds.items():
            print(f"{nblk:4d} blocks ({n / 1e6:.0f} MB) {name:24s} D2H {rate(h, dev):6.1f} GB/s  "
                  f"H2D {rate(dev, h):6.1f} GB/s")
        torch.cuda.cudart().cudaHostUnregister(t.data_ptr())
        del t
        r.close()


def gpus(gb: float = 4.0, reps: int = 5) -> None:
    """Host -> GPU rate from one registered region (as the node-shared host cache is) to each GPU alone, then
    to all of them at once (one thread and stream per GPU): whether the GPUs of one node share a link."""
    import threading
    n = int(gb * 1e9)
    src = PinnedRegion.anonymous(n, pin=True)
    src.tensor.fill_(1)
    devs = [torch.empty(n, dtype=torch.uint8, device=f"cuda:{i}") for i in range(torch.cuda.device_count())]
    for i, d in enumerate(devs):
        with torch.cuda.device(i):
            print(f"H2D cuda:{i} alone {rate(d, src.tensor, reps):6.1f} GB/s", flush=True)
    got: dict[int, float] = {}

    def one(i: int) -> None:
        with torch.cuda.device(i):
            got[i] = rate(devs[i], src.tensor, reps)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(devs))]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    print(f"H2D all {len(devs)} at once: " + ", ".join(f"cuda:{i} {g:.1f}" for i, g in sorted(got.items()))
          + f" GB/s; together {n * reps * len(devs) / wall / 1e9:.1f} GB/s (incl. warm-up)", flush=True)
    src.close()


if __name__ == "__main__":
    import sys
    gpus() if sys.argv[1:] == ["gpus"] else main()
