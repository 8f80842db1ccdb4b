"""Shared host regions: create / attach by name / close / unlink, with no /dev/shm leftovers."""

from __future__ import annotations

import os
import uuid

import pytest
import torch

from gpu_pool.pinned import PinnedRegion, default_shm_dir


@pytest.fixture
def shm_path():
    p = default_shm_dir() / f"tokenpool-test-{uuid.uuid4().hex[:8]}.seg"
    yield p
    assert not p.exists(), f"leaked {p}"


def mapped(path) -> bool:
    return str(path) in open("/proc/self/maps").read()


def test_create_attach_share_pages(shm_path):
    a = PinnedRegion.create(shm_path, 1 << 20, pin=False)
    a.tensor[:16] = torch.arange(16, dtype=torch.uint8)
    b = PinnedRegion.attach(shm_path, pin=False)
    assert b.nbytes == 1 << 20 and torch.equal(b.tensor[:16], torch.arange(16, dtype=torch.uint8))
    b.tensor[100] = 7  # same pages: a sees b's write
    assert int(a.tensor[100]) == 7
    with pytest.raises(FileExistsError):
        PinnedRegion.create(shm_path, 4096, pin=False)
    b.close()
    a.close()
    assert not mapped(shm_path) and a.closed
    a.unlink()


def test_close_with_live_view_keeps_mapping_until_view_dies(shm_path):
    r = PinnedRegion.create(shm_path, 1 << 16, pin=False)
    v = r.tensor[8:16]
    v.fill_(3)
    r.close()
    r.unlink()
    assert int(v.sum()) == 24  # still valid memory, not a dangling pointer
    assert mapped(shm_path)
    del v
    assert not mapped(shm_path)


def test_anonymous_region():
    r = PinnedRegion.anonymous(4096, pin=False)
    r.tensor.fill_(1)
    assert int(r.tensor.sum()) == 4096 and r.path is None
    r.close()
    r.close()  # idempotent


def test_full_tmpfs_is_a_clean_error(tmp_path, shm_path):
    st = os.statvfs(default_shm_dir())
    too_big = st.f_bavail * st.f_frsize + (1 << 30)
    with pytest.raises(OSError, match="no room|TOKENPOOL_SHM_DIR"):
        PinnedRegion.create(shm_path, too_big, pin=False)
    assert not shm_path.exists()


def test_unreserved_region_is_populated_in_parallel(shm_path):
    n = (3 << 20) + 4096  # not a multiple of the populate chunk
    r = PinnedRegion.create(shm_path, n, pin=False, reserve=False)
    assert os.stat(shm_path).st_blocks == 0  # sized, not yet allocated
    r.populate(threads=3)
    assert os.stat(shm_path).st_blocks * 512 >= n  # every page exists: writes can no longer hit a full tmpfs
    r.tensor[-1] = 5
    b = PinnedRegion.attach(shm_path, pin=False)
    assert int(b.tensor[-1]) == 5 and int(b.tensor[:-1].sum()) == 0
    b.close()
    r.close()
    r.unlink()


def test_unreserved_region_too_big_is_a_clean_error(shm_path):
    st = os.statvfs(default_shm_dir())
    with pytest.raises(OSError, match="no room|TOKENPOOL_SHM_DIR"):
        PinnedRegion.create(shm_path, st.f_bavail * st.f_frsize + (1 << 30), pin=False, reserve=False)
    assert not shm_path.exists()


def test_populate_falls_back_to_fallocate_without_madv_populate(shm_path, monkeypatch):
    import gpu_pool.pinned as hp

    monkeypatch.setattr(hp, "MADV_POPULATE_WRITE", 12345)  # an advice the kernel rejects (EINVAL), as before 5.14
    r = PinnedRegion.create(shm_path, 1 << 20, pin=False, reserve=False)
    r.populate()
    assert os.stat(shm_path).st_blocks * 512 >= 1 << 20
    r.close()
    r.unlink()
    a = PinnedRegion.anonymous(1 << 20, pin=False)
    a.populate()  # nothing to reserve: pages come as they are written
    a.close()


def test_close_waits_for_a_registration_in_flight(monkeypatch):
    """pin_async's plumbing without CUDA: close() must not drop the mapping under cudaHostRegister."""
    import threading
    import time

    events = []
    gate = threading.Event()

    def fake_pin(self):
        gate.wait(5)
        time.sleep(0.05)
        events.append(("pinned", self.tensor is not None))
        self.pinned = True

    def fake_unpin(self):
        events.append(("unpinned", self.pinned))
        self.pinned = False

    monkeypatch.setattr(torch.cuda, "cudart", lambda: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(PinnedRegion, "pin", fake_pin)
    monkeypatch.setattr(PinnedRegion, "unpin", fake_unpin)
    r = PinnedRegion.anonymous(1 << 16, pin=False)
    fut = r.pin_async()
    assert r.pin_async() is fut  # one registration, however often asked
    gate.set()
    r.close()
    assert events == [("pinned", True), ("unpinned", True)] and fut.result() > 0


@pytest.mark.gpu
def test_pin_async_while_writing_then_copy(shm_path):
    """Bytes written while the region is being registered are the bytes the DMA reads."""
    n = 64 << 20
    r = PinnedRegion.create(shm_path, n, pin=False, reserve=False)
    r.populate()
    fut = r.pin_async()
    src = torch.arange(n // 4, dtype=torch.int32)
    r.tensor.view(torch.int32).copy_(src)
    assert fut.result() > 0 and r.pinned and r.tensor.is_pinned()
    d = torch.empty(n, dtype=torch.uint8, device="cuda")
    d.copy_(r.tensor, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(d.view(torch.int32).cpu(), src)
    r.close()
    assert not r.pinned
    r.unlink()


def _blocks(path) -> int:
    return sum(os.stat(p).st_blocks * 512 for p in (path.iterdir() if path.is_dir() else [path]))


def test_region_of_parts_is_one_contiguous_shared_region(shm_path):
    """A region made of several files (a directory of them) is one tensor to its users: bytes written across a
    part boundary land in order, another mapping sees them, views outlive close(), and unlink leaves nothing."""
    from gpu_pool.pinned import PART_ALIGN

    n = 3 * PART_ALIGN + 4096  # the last part is short
    r = PinnedRegion.create(shm_path, n, pin=False, reserve=False, parts=4)
    assert r.parts == 4 and r.nbytes == n and shm_path.is_dir() and len(list(shm_path.iterdir())) == 4
    assert _blocks(shm_path) == 0  # sized, not yet allocated
    r.populate(threads=3)
    assert _blocks(shm_path) >= n
    edge = PART_ALIGN  # the first boundary
    r.tensor[edge - 8:edge + 8] = torch.arange(16, dtype=torch.uint8)
    r.tensor[-1] = 9
    b = PinnedRegion.attach(shm_path, pin=False)
    assert b.parts == 4 and b.nbytes == n
    assert torch.equal(b.tensor[edge - 8:edge + 8], torch.arange(16, dtype=torch.uint8)) and int(b.tensor[-1]) == 9
    with pytest.raises(FileExistsError):
        PinnedRegion.create(shm_path, n, pin=False, parts=4)
    v = b.tensor[edge:edge + 4]
    b.close()
    r.close()
    r.unlink()
    assert not shm_path.exists() and int(v.sum()) == 8 + 9 + 10 + 11  # still mapped under the view
    assert mapped(shm_path)
    del v
    assert not mapped(shm_path)


def test_region_of_parts_reserved_and_too_big(shm_path):
    from gpu_pool.pinned import PART_ALIGN

    r = PinnedRegion.create(shm_path, 2 * PART_ALIGN, pin=False, parts=2)  # reserve=True: fallocated
    assert r.parts == 2 and _blocks(shm_path) >= 2 * PART_ALIGN
    r.close()
    r.unlink()
    st = os.statvfs(default_shm_dir())
    with pytest.raises(OSError, match="no room|TOKENPOOL_SHM_DIR"):
        PinnedRegion.create(shm_path, st.f_bavail * st.f_frsize + (1 << 30), pin=False, reserve=False, parts=8)
    assert not shm_path.exists()
    small = PinnedRegion.create(shm_path, PART_ALIGN, pin=False, parts=8)  # one unit: one file, not a directory
    assert small.parts == 1 and shm_path.is_file()
    small.close()
    small.unlink()
