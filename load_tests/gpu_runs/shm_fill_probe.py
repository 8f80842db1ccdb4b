"""Why a cold load into the node-shared host cache is slow (issue 20): making shared-memory pages from many threads.

    python3 load_tests/gpu_runs/shm_fill_probe.py --gb 15.2 [--threads N] [--json F]

Makes the pages of one region of `gb` GB in /dev/shm (madvise MADV_POPULATE_WRITE, 64 MiB spans, `threads`
threads) in two layouts: one file (what the host cache does today), and `files` files mapped back to back into
one reserved address range (the same contiguous region to its users). Making a tmpfs page takes locks of its
file (its page-cache tree, its block accounting), so page-making threads on one file queue behind each other;
on separate files they should not. `--pin concurrent` registers the range with CUDA on a thread meanwhile, as
the host cache does (registration makes the pages it finds missing, single-threaded); `after` once they are
made; `parallel` one registration per file, from many threads, once they are made. The figure is each layout's seconds and GB/s.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor

MADV_POPULATE_WRITE = 23
SPAN = 64 << 20
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MAP_FAILED = ctypes.c_void_p(-1).value


def _check(p: int | None) -> int:
    if p is None or p == MAP_FAILED:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return p


def populate(base: int, size: int, threads: int) -> None:
    def one(off: int) -> None:
        if libc.madvise(base + off, min(SPAN, size - off), MADV_POPULATE_WRITE) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))

    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(one, range(0, size, SPAN)))


def register(base: int, size: int) -> float:
    """cudaHostRegister the range (what the host cache does with its region); seconds taken."""
    import torch
    t = time.perf_counter()
    rc = torch.cuda.cudart().cudaHostRegister(base, size, 1)
    if int(getattr(rc, "value", rc)) != 0:
        raise RuntimeError(f"cudaHostRegister: {rc}")
    return time.perf_counter() - t


def unregister(base: int) -> None:
    import torch
    torch.cuda.cudart().cudaHostUnregister(base)


def layout(size: int, files: int, threads: int, shm: str, pin: str = "none") -> dict:
    per = -(-size // files // SPAN) * SPAN  # each file a whole number of spans
    size = per * files
    paths = [f"{shm}/tp-probe-{os.getpid()}-{i}" for i in range(files)]
    t0 = time.perf_counter()
    base = _check(libc.mmap(None, size, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0))  # reserve the range
    try:
        for i, p in enumerate(paths):
            fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, per)
                _check(libc.mmap(base + i * per, per, mmap.PROT_READ | mmap.PROT_WRITE,
                                 mmap.MAP_SHARED | 0x10, fd, 0))  # MAP_FIXED over the reservation
            finally:
                os.close(fd)
        t1 = time.perf_counter()
        pin_s = None
        if pin == "concurrent":  # as the host cache does: registration on a thread while the pages are made
            with ThreadPoolExecutor(1) as ex:
                fut = ex.submit(register, base, size)
                populate(base, size, threads)
                pin_s = fut.result()
        else:
            populate(base, size, threads)
            if pin == "after":
                pin_s = register(base, size)
            elif pin == "parallel":  # one registration per file, on `threads` threads at once
                tp = time.perf_counter()
                with ThreadPoolExecutor(min(threads, files)) as ex:
                    list(ex.map(lambda i: register(base + i * per, per), range(files)))
                pin_s = time.perf_counter() - tp
        t2 = time.perf_counter()
        return {"files": files, "pin": pin, "bytes": size, "map_s": round(t1 - t0, 4),
                "pin_s": None if pin_s is None else round(pin_s, 3), "total_s": round(t2 - t1, 3),
                "gbs": round(size / (t2 - t1) / 1e9, 2)}
    finally:
        if pin == "parallel":
            for i in range(files):
                unregister(base + i * per)
        elif pin != "none":
            unregister(base)
        libc.munmap(base, size)
        for p in paths:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=15.2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--files", default="1,4,16,64")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--pin", default="none", help="comma list of none, concurrent, after, parallel")
    ap.add_argument("--shm", default="/dev/shm")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    size = int(a.gb * 1e9)
    runs = []
    for _ in range(a.reps):
        for pin in a.pin.split(","):
            for n in (int(x) for x in a.files.split(",")):
                r = layout(size, n, a.threads, a.shm, pin)
                runs.append(r)
                print(json.dumps(r), flush=True)
    out = {"what": "tmpfs page making from many threads: one file vs many files mapped back to back",
           "gb": a.gb, "threads": a.threads, "shm": a.shm, "runs": runs,
           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "commit": os.environ.get("TOKENPOOL_COMMIT", "unknown")}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
