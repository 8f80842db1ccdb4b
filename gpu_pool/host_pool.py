"""Page-locked host memory regions that several processes can map: the substrate of the host model cache.

A `PinnedRegion` is either a named file in a tmpfs directory (/dev/shm: POSIX shared memory, attachable by
path from any process on the node) or anonymous private memory (a per-engine host KV pool). Either way it is
mapped with `mmap`, seen by torch as a uint8 tensor (`torch.frombuffer`, no copy) and, when CUDA is present,
page-locked with `cudaHostRegister` so `copy_(non_blocking=True)` runs as a true async DMA at link speed.

Why not `torch.empty(pin_memory=True)`: torch's caching host allocator rounds large requests up to a power of
two (a 15 GiB model would pin 16 GiB) and its memory cannot be shared between processes.

Registration is per process: each process that maps a shared region registers its own mapping; the physical
pages are the same, so the node holds one copy however many engines attach.
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import torch

# cudaHostRegisterPortable: pinned for every CUDA context of the process, not only the current device's;
# costs nothing and keeps a region usable by an engine that drives more than one GPU (the bench does).
CUDA_HOST_REGISTER_PORTABLE = 1


def default_shm_dir() -> Path:
    """Where shared regions live. TOKENPOOL_SHM_DIR overrides /dev/shm (e.g. a bigger hugetlbfs/tmpfs)."""
    return Path(os.environ.get("TOKENPOOL_SHM_DIR", "/dev/shm"))


def cuda_pinning_available() -> bool:
    return torch.cuda.is_available()


def _check(rc, what: str) -> None:
    code = int(getattr(rc, "value", rc))
    if code != 0:
        raise RuntimeError(f"{what} failed: cuda error {code} ({torch.cuda.cudart().cudaGetErrorString(rc)})")


class PinnedRegion:
    """A mapped host region of `nbytes`, exposed as `tensor` (uint8). Close before dropping the last view."""

    def __init__(self, mm: mmap.mmap, nbytes: int, path: Path | None, pin: bool | None):
        self._mm: mmap.mmap | None = mm
        self.nbytes = nbytes
        self.path = path
        self.tensor = torch.frombuffer(mm, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
        self.pinned = False
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

    def unpin(self) -> None:
        if self.pinned:
            self.pinned = False
            _check(torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr()), "cudaHostUnregister")

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, nbytes: int, pin: bool | None = None) -> PinnedRegion:
        """A new shared region at `path` (fails if it exists). Space is reserved up front with fallocate:
        a full tmpfs then fails here with ENOSPC instead of killing a writer with SIGBUS mid-load."""
        path = Path(path)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            if nbytes:
                try:
                    os.posix_fallocate(fd, 0, nbytes)
                except OSError as e:
                    if e.errno in (errno.ENOSPC, errno.EFBIG):
                        st = os.statvfs(path.parent)
                        raise OSError(e.errno, f"no room for {nbytes / 2**30:.2f} GiB in {path.parent} "
                                      f"({st.f_bavail * st.f_frsize / 2**30:.2f} GiB free); enlarge it "
                                      "(docker --shm-size) or set TOKENPOOL_SHM_DIR") from None
                    raise
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
    def attach(cls, path: str | Path, pin: bool | None = None) -> PinnedRegion:
        """Map an existing shared region (no new memory: the same pages as every other mapping)."""
        path = Path(path)
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
        self.unpin()
        self.tensor = None
        self._mm = None

    def unlink(self) -> None:
        """Remove the name; the pages go when the last mapping (in any process) closes."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> PinnedRegion:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
