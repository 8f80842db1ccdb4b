"""Shared host regions: create / attach by name / close / unlink, with no /dev/shm leftovers."""

from __future__ import annotations

import os
import uuid

import pytest
import torch

from gpu_pool.host_pool import PinnedRegion, default_shm_dir


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
