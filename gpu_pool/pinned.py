"""Page-locked host memory regions that several processes can map: the substrate of the host model cache.

A `PinnedRegion` is either a named file in a tmpfs directory (/dev/shm: POSIX shared memory, attachable by
path from any process on the node) or anonymous private memory (a per-engine host KV pool). Either way it is
mapped with `mmap`, seen by torch as a uint8 tensor (`torch.frombuffer`, no copy) and, when CUDA is present,
page-locked with `cudaHostRegister` so `copy_(non_blocking=True)` runs as a true async DMA at link speed.

Why not `torch.empty(pin_memory=True)`: torch's caching host allocator rounds large requests up to a power of
two (a 15 GiB model would pin 16 GiB) and its memory cannot be shared between processes.

Registration is per process: each process that maps a shared region registers its own mapping; the physical
pages are the same, so the node holds one copy however many engines attach.

Filling a big region fast (the host cache's cold load): most of the cost is not the copy but making the pages
(allocate, zero, map; in a VM also the first touch of fresh guest memory), and then registering them. So a
region made with `create(reserve=False)` is only sized; the caller's writes make its pages from every core at
once (or `populate()` does, on every core), and `pin_async()` registers it on a background thread meanwhile.
It stays one registration: a copy never spans two (whether the driver then still copies at link speed is not
something to find out mid-swap).

Making tmpfs pages takes locks of their file (its page tree, its block accounting), so threads making pages of
one file queue behind each other: on the H200 host 16 threads made 15.2 GB of one file's pages in 3.75 s, and
of 64 files' in 1.26 s (`load_tests/gpu_runs/shm_fill_probe.py`, bench/results/shm_fill_probe_h200.json). So
a big region can be made of `parts` files (a directory of them) mapped back to back into one reserved address
range: one contiguous tensor and one registration to its users, as many page locks as parts to its writers.

Page size is the other lever: on a tmpfs mounted with huge=within_size (or always) each fault makes a 2 MiB
page, and a cold load on the 2-vCPU dev VM went from 1.6 s to 0.32 s for 3.1 GB (`shm_huge_pages` tells which
kind a directory gives; TOKENPOOL_SHM_DIR points the cache there).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from tokenpool import env

# cudaHostRegisterPortable: pinned for every CUDA context of the process, not only the current device's;
# costs nothing and keeps a region usable by an engine that drives more than one GPU (the bench does).
CUDA_HOST_REGISTER_PORTABLE = 1

# madvise(MADV_POPULATE_WRITE) (Linux 5.14+): allocate and map a range for writing without touching it from
# user space; a full tmpfs is an error (EFAULT) instead of a SIGBUS. Python's mmap module lacks the constant,
# and its madvise() holds the GIL, so it is called through ctypes, which releases it.
MADV_POPULATE_WRITE = 23
POPULATE_CHUNK = 64 << 20
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munmap.restype = ctypes.c_int
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_FIXED = 0x10
_MAP_NORESERVE = 0x4000  # a PROT_NONE reservation: no memory is committed for it
PART_ALIGN = 2 << 20  # parts start on 2 MiB boundaries: a huge-page tmpfs can back each with whole huge pages


def default_shm_dir() -> Path:
    """Where shared regions live. TOKENPOOL_SHM_DIR overrides /dev/shm (e.g. a bigger hugetlbfs/tmpfs)."""
    return Path(env.SHM_DIR.get())


def shm_huge_pages(path: str | Path) -> str:
    """The `huge=` policy of the tmpfs holding `path` ("never" when unset, "" when not a tmpfs): whether its
    pages are made 4 KiB or 2 MiB at a time, which decides a cold load's speed more than anything we do."""
    best, policy = "", ""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return ""
    p = str(Path(path).resolve())
    for line in mounts:
        f = line.split()
        if len(f) < 4 or not (p == f[1] or p.startswith(f[1].rstrip("/") + "/")) or len(f[1]) < len(best):
            continue
        best = f[1]
        opts = dict(o.partition("=")[::2] for o in f[3].split(","))
        policy = opts.get("huge", "never") if f[2] == "tmpfs" else ""
    return policy


def cuda_pinning_available() -> bool:
    return torch.cuda.is_available()


def io_threads() -> int:
    """Threads for filling host memory: the CPUs this process may run on (capped; memory bandwidth saturates
    long before 32 cores)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(32, n))


def _no_room(path: Path, nbytes: int, err: int = errno.ENOSPC) -> OSError:
    st = os.statvfs(path.parent)
    return OSError(err, f"no room for {nbytes / 2**30:.2f} GiB in {path.parent} "
                   f"({st.f_bavail * st.f_frsize / 2**30:.2f} GiB free); enlarge it "
                   "(docker --shm-size) or set TOKENPOOL_SHM_DIR")


def _require_room(path: Path, nbytes: int) -> None:
    """Raise the clear no-room error now if the tmpfs holding `path` cannot take `nbytes` more."""
    st = os.statvfs(path.parent)
    if st.f_bavail * st.f_frsize < nbytes:
        raise _no_room(path, nbytes)


def _check(rc, what: str) -> None:
    code = int(getattr(rc, "value", rc))
    if code != 0:
        raise RuntimeError(f"{what} failed: cuda error {code} ({torch.cuda.cudart().cudaGetErrorString(rc)})")


def part_sizes(nbytes: int, parts: int) -> list[int]:
    """`nbytes` cut into at most `parts` files of whole PART_ALIGN units (the last takes the rest)."""
    per = max(PART_ALIGN, -(-nbytes // max(1, parts) // PART_ALIGN) * PART_ALIGN)
    return [min(per, nbytes - o) for o in range(0, nbytes, per)] or [0]


def _part_paths(path: Path) -> list[Path]:
    return sorted((p for p in path.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def remove_region(path: str | Path) -> None:
    """Remove a shared region's name, one file or a directory of parts (missing is fine). Its pages go when
    the last mapping (in any process) closes."""
    path = Path(path)
    try:
        path.unlink()
    except FileNotFoundError:
        return
    except IsADirectoryError:
        for p in path.iterdir():
            p.unlink(missing_ok=True)
        path.rmdir()


def _unmap_on_del(self) -> None:
    _libc.munmap(ctypes.addressof(self), ctypes.sizeof(self))


def _map_parts(paths: list[Path], sizes: list[int]) -> ctypes.Array:
    """Files mapped back to back into one reserved address range, as a writable ctypes array that unmaps the
    range when it is collected. torch.frombuffer keeps its buffer's object alive for as long as any tensor over
    it (views included) lives, as it does an `mmap`: so the range goes with the last view, never under one."""
    nbytes = sum(sizes)
    base = _libc.mmap(None, nbytes, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
    if base in (None, _MAP_FAILED):
        e = ctypes.get_errno()
        raise OSError(e, f"reserving {nbytes} B of address space: {os.strerror(e)}")
    try:
        off = 0
        for p, n in zip(paths, sizes):
            fd = os.open(p, os.O_RDWR)
            try:
                got = _libc.mmap(base + off, n, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | _MAP_FIXED, fd, 0)
            finally:
                os.close(fd)  # the mapping keeps the file's pages alive
            if got != base + off:
                e = ctypes.get_errno()
                raise OSError(e, f"mapping {p}: {os.strerror(e)}")
            off += n
    except BaseException:
        _libc.munmap(base, nbytes)
        raise
    return type("MappedParts", (ctypes.c_uint8 * nbytes,), {"__del__": _unmap_on_del}).from_address(base)


class PinnedRegion:
    """A mapped host region of `nbytes`, exposed as `tensor` (uint8). Close before dropping the last view."""

    def __init__(self, mm: mmap.mmap | ctypes.Array | None, nbytes: int, path: Path | None, pin: bool | None,
                 parts: int = 1):
        self._mm = mm
        self.nbytes = nbytes
        self.path = path
        self.parts = parts  # files behind it (a directory of them when > 1)
        self.tensor = torch.frombuffer(mm, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
        self.pinned = False
        self._pinning: Future | None = None  # a pin_async() registration in flight
        if pin is None:
            pin = cuda_pinning_available()
        if pin:
            self.pin()

    def pin(self) -> None:
        """Page-lock the mapping for DMA (cudaHostRegister). Idempotent; a no-op for an empty region."""
        if self.pinned or not self.nbytes or self.tensor is None:
            return
        _check(torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), self.nbytes, CUDA_HOST_REGISTER_PORTABLE),
               f"cudaHostRegister({self.nbytes} B)")
        self.pinned = True

    def pin_async(self) -> Future:
        """Start `pin()` on a background thread and return a future of the seconds it took. The caller may
        keep writing into the region meanwhile (registration takes references to the pages; it does not move
        or copy them). `close()` waits for it. The thread pins on the caller's current device: a new thread
        would otherwise start on device 0 and create a CUDA context there."""
        fut: Future = Future()
        fut.set_running_or_notify_cancel()
        if self.pinned or not self.nbytes or self.tensor is None:
            fut.set_result(0.0)
            return fut
        if self._pinning is not None:
            return self._pinning
        torch.cuda.cudart()  # lazy CUDA init here, not racing on the thread
        device = torch.cuda.current_device()

        def run() -> None:
            t = time.perf_counter()
            try:
                torch.cuda.set_device(device)
                self.pin()
            except BaseException as e:
                fut.set_exception(e)
            else:
                fut.set_result(time.perf_counter() - t)

        self._pinning = fut
        threading.Thread(target=run, name="host-pin", daemon=True).start()
        return fut

    def populate(self, threads: int | None = None, start: int = 0, nbytes: int | None = None) -> None:
        """Allocate and map every page of bytes [start, start + nbytes) (default: all) now, from `threads`
        threads (default: one per CPU) at once; a full tmpfs raises OSError (ENOSPC) here, cleanly. A region
        from `create(reserve=False)` must be populated (or written by the kernel: `os.preadv` into it fails
        with EFAULT on a full tmpfs) before user space writes it: a store to a page that cannot be made is a
        SIGBUS. On kernels before 5.14 this falls back to reserving the file with fallocate (one core; pages
        are then mapped as they are first written)."""
        if not self.nbytes or self.tensor is None:
            return
        end = self.nbytes if nbytes is None else min(self.nbytes, start + nbytes)
        base = self.tensor.data_ptr()
        spans = [(o, min(POPULATE_CHUNK, end - o)) for o in range(start, end, POPULATE_CHUNK)]
        if not spans:
            return

        def one(span: tuple[int, int]) -> None:
            if _libc.madvise(base + span[0], span[1], MADV_POPULATE_WRITE) != 0:
                e = ctypes.get_errno()
                raise OSError(e, os.strerror(e))

        try:
            with ThreadPoolExecutor(min(threads or io_threads(), len(spans)), thread_name_prefix="populate") as ex:
                futs = [ex.submit(one, sp) for sp in spans]
                try:
                    for f in futs:
                        f.result()
                finally:
                    for f in futs:
                        f.cancel()
        except OSError as e:
            if e.errno == errno.EINVAL:  # no MADV_POPULATE_WRITE
                if self.path is not None:
                    self._reserve()
                return
            if self.path is not None and e.errno in (errno.EFAULT, errno.ENOMEM, errno.ENOSPC):
                raise _no_room(self.path, self.nbytes) from None
            raise

    def _reserve(self) -> None:
        for p in _part_paths(self.path) if self.parts > 1 else [self.path]:
            fd = os.open(p, os.O_RDWR)
            try:
                _fallocate(fd, self.path, os.fstat(fd).st_size)
            finally:
                os.close(fd)

    def unpin(self) -> None:
        if self.pinned:
            self.pinned = False
            _check(torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr()), "cudaHostUnregister")

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, nbytes: int, pin: bool | None = None, reserve: bool = True,
               parts: int = 1) -> PinnedRegion:
        """A new shared region at `path` (fails if it exists). With `reserve`, space is reserved up front with
        fallocate: a full tmpfs then fails here with ENOSPC instead of killing a writer with SIGBUS mid-load.
        Without it the file is only sized (after a free-space check), and the pages are made by whatever
        writes first: reads into it from the kernel (a full tmpfs is then EFAULT, not a signal) or
        `populate()` before user-space stores, on every core instead of one. With `parts` > 1 (and room for
        more than one PART_ALIGN unit), `path` is a directory of that many files (see the module docstring)."""
        path = Path(path)
        sizes = part_sizes(nbytes, parts)
        if len(sizes) > 1:
            return cls._create_parts(path, sizes, pin, reserve)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            if nbytes:
                if reserve:
                    _fallocate(fd, path, nbytes)
                else:
                    _require_room(path, nbytes)
                    os.ftruncate(fd, nbytes)
                mm = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            else:
                mm = None
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)  # the mapping keeps the file's pages alive
        try:
            return cls(mm, nbytes, path, pin)
        except BaseException:
            path.unlink(missing_ok=True)
            raise

    @classmethod
    def _create_parts(cls, path: Path, sizes: list[int], pin: bool | None, reserve: bool) -> PinnedRegion:
        nbytes = sum(sizes)
        path.mkdir(mode=0o700)  # FileExistsError if it exists, as O_EXCL for one file
        try:
            if not reserve:
                _require_room(path, nbytes)
            paths = [path / str(i) for i in range(len(sizes))]
            for p, n in zip(paths, sizes):
                fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
                try:
                    if reserve:
                        _fallocate(fd, path, n)
                    else:
                        os.ftruncate(fd, n)
                finally:
                    os.close(fd)
            return cls(_map_parts(paths, sizes), nbytes, path, pin, parts=len(sizes))
        except BaseException:
            remove_region(path)
            raise

    @classmethod
    def attach(cls, path: str | Path, pin: bool | None = None) -> PinnedRegion:
        """Map an existing shared region (no new memory: the same pages as every other mapping)."""
        path = Path(path)
        if path.is_dir():
            paths = _part_paths(path)
            sizes = [p.stat().st_size for p in paths]
            return cls(_map_parts(paths, sizes), sum(sizes), path, pin, parts=len(paths))
        fd = os.open(path, os.O_RDWR)
        try:
            nbytes = os.fstat(fd).st_size
            mm = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) if nbytes else None
        finally:
            os.close(fd)
        return cls(mm, nbytes, path, pin)

    @classmethod
    def anonymous(cls, nbytes: int, pin: bool | None = None) -> PinnedRegion:
        """Private memory of this process (e.g. a host KV pool)."""
        mm = mmap.mmap(-1, nbytes) if nbytes else None
        return cls(mm, nbytes, None, pin)

    # -- lifetime -----------------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self.tensor is None

    def close(self) -> None:
        """Unregister and drop this object's references to the mapping.

        The tensor (and every view of it) holds a reference to the mmap object, and CPython unmaps when the
        last reference dies. So the mapping goes right here if no view survives, and otherwise when the last
        view is collected: never a dangling pointer. (Calling `mmap.close()` would unmap under live views:
        torch.frombuffer does not hold a buffer export that would make close() refuse.)"""
        if self.tensor is None:
            return
        if self._pinning is not None:  # never drop the mapping under a registration in flight
            self._pinning.exception()
            self._pinning = None
        self.unpin()
        self.tensor = None
        self._mm = None

    def unlink(self) -> None:
        """Remove the name; the pages go when the last mapping (in any process) closes."""
        if self.path is not None:
            remove_region(self.path)

    def __enter__(self) -> PinnedRegion:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def device_view(host: torch.Tensor, device: torch.device | str = "cuda") -> torch.Tensor:
    """A CUDA tensor over the page-locked host tensor `host` (the same address under unified addressing): a kernel
    reads or writes it across the link with no copy engine. Keep `host` alive while the view is used; its bytes are
    read when the kernel runs, not when it is queued.

    Why: a host-to-device `copy_` of 2 KB or more runs on a copy engine, and queued behind a running kernel while a
    weight prefetch's large copy is under way on another stream, it waited for the whole prefetch on the H200 (52 ms
    for 3 GB; `python -m load_tests.diag_gpu copy-contention`, session 30), where a kernel reading the same bytes
    through this view did not wait at all."""

    class _Interface:
        __cuda_array_interface__ = {"shape": tuple(host.shape), "typestr": host.numpy().dtype.str,
                                    "data": (host.data_ptr(), False), "version": 3, "strides": None}
    view = torch.as_tensor(_Interface(), device=device)
    # torch takes the device from the pointer (the one current when the pages were pinned) and copies to `device`
    # if that is another: a copy is no view
    if view.data_ptr() != host.data_ptr():
        raise RuntimeError(f"pinned memory at {host.data_ptr():#x} is not mapped as a tensor of {device}")
    return view


def kernel_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """`dst.copy_(src)` by an elementwise kernel, never a memcpy (which a copy engine runs): for a `device_view`
    source, read across the link by the kernel itself. Integer and exact for every dtype (adds zero)."""
    torch.add(src, 0, out=dst)


def upload(values: list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small host list as a tensor on `device`, without the host waiting for the device: `torch.tensor(values,
    device=cuda)` copies from pageable memory and then synchronizes the stream, so a step queued behind the one in
    flight (TOKENPOOL_PIPELINE) would hold its launch until both had run. From pinned memory the copy is queued like
    the kernels around it (torch's pinned allocator keeps the block until the copy has run)."""
    if device.type != "cuda":
        return torch.tensor(values, device=device, dtype=dtype)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def _fallocate(fd: int, path: Path, nbytes: int) -> None:
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EFBIG):
            raise _no_room(path, nbytes, e.errno) from None
        raise
