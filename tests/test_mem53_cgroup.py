"""Memory sized from "the machine" follows a container's cgroup limit: the host cache's default share, a CPU arena's
fractional budget and the CPU device's total read `gpu_pool.inventory.host_memory_bytes` (MemTotal, or the limit of
this process's cgroup or a parent's where lower), against fake cgroup trees in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpu_pool import inventory

MEMTOTAL = 64 << 30


def _tree(tmp_path: Path, own: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A cgroup mount at tmp_path/cg with `files` (path under it -> text), and a /proc/self/cgroup naming `own`."""
    root = tmp_path / "cg"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(own)
    return root, proc


@pytest.fixture(autouse=True)
def _memtotal(monkeypatch):
    monkeypatch.setattr(inventory, "meminfo", lambda *a: {"MemTotal": MEMTOTAL, "MemAvailable": MEMTOTAL // 2})


@pytest.mark.parametrize("own, files, want", ids=["v2-parent", "v2-ns", "v1-parent", "v1-mount-root", "above-memtotal",
                                                  "v2-max", "v1-huge", "no-memory-file", "no-cgroup"], argvalues=[
    # v2, a pod's limit on the parent of the container's cgroup ("max" there)
    ("0::/kubepods/pod1/c1\n", {"kubepods/pod1/c1/memory.max": "max\n", "kubepods/pod1/memory.max": "4000000000\n",
                                "kubepods/memory.max": "max\n"}, 4_000_000_000),
    # v2 with a cgroup namespace (docker run --memory): the container's cgroup is the mount's root
    ("0::/\n", {"memory.max": "3000000000\n"}, 3_000_000_000),
    # v1 (memory controller), the lower of the cgroup's and its parent's
    ("4:memory:/docker/abc\n1:cpu:/docker/abc\n", {"memory/docker/abc/memory.limit_in_bytes": "2000000000\n",
                                                   "memory/docker/memory.limit_in_bytes": "5000000000\n"}, 2_000_000_000),
    # v1 without a cgroup namespace: /proc/self/cgroup names the host's path, the container's cgroup is the mount
    ("4:memory:/docker/abc\n", {"memory/memory.limit_in_bytes": "2500000000\n"}, 2_500_000_000),
    # a limit above MemTotal changes nothing; "max", v1's huge "no limit", no memory file, no cgroup: MemTotal
    ("0::/\n", {"memory.max": str(MEMTOTAL * 2)}, MEMTOTAL),
    ("0::/a\n", {"a/memory.max": "max\n", "memory.max": "max\n"}, MEMTOTAL),
    ("4:memory:/x\n", {"memory/x/memory.limit_in_bytes": "9223372036854771712\n"}, MEMTOTAL),
    ("0::/a\n", {"a/cpu.max": "max 100000\n"}, MEMTOTAL),
    ("", {}, MEMTOTAL),
])
def test_host_memory_is_the_cgroups_limit_where_lower(tmp_path, own, files, want):
    root, proc = _tree(tmp_path, own, files)
    assert inventory.host_memory_bytes(root, proc) == want
    assert inventory.host_memory_bytes(tmp_path / "absent", tmp_path / "absent_cgroup") == MEMTOTAL


def test_host_cache_default_arena_and_cpu_device_follow_the_limit(tmp_path, monkeypatch):
    """A container of 4 GB on a 64 GiB host: the host cache's default (60%) was 60% of 64 GiB, a CPU arena's
    fraction a fraction of 64 GiB, the CPU device 64 GiB with 32 free -- the OOM killer's, not an eviction."""
    import torch

    from controller import hosting
    from gpu_pool.arena import Arena, device_total_memory
    from model_swapper.host_cache import HostModelCache

    limit = 4_000_000_000
    root, proc = _tree(tmp_path, "0::/c\n", {"c/memory.max": f"{limit}\n", "c/memory.current": "1500000000\n",
                                              "c/memory.stat": "anon 1000000000\ninactive_file 500000000\n"})
    monkeypatch.setattr(inventory, "CGROUP_ROOT", str(root))
    monkeypatch.setattr(inventory, "PROC_CGROUP", str(proc))
    assert hosting.host_memory_bytes() == limit  # the controller's name for it is this one
    cache = HostModelCache(0.6, root=tmp_path / "cache")
    try:
        assert cache.budget == int(0.6 * limit)
    finally:
        cache.close()
    assert device_total_memory(torch.device("cpu")) == limit
    assert Arena.reserve(0.001, "cpu").capacity == int(0.001 * limit)
    assert hosting.default_budget("cpu", 0) == int(hosting.CPU_ARENA_FRAC * limit)
    d = inventory.cpu_device()
    # free: the room under the limit, the reclaimable page cache (inactive_file) not counted as used
    assert (d.memory_total, d.memory_free, d.memory_used) == (limit, limit - 1_000_000_000, 1_000_000_000)
    from controller.worker import device_memory

    # what a CPU worker tells the controller (its budget is checked against it): the container's, not the host's
    assert device_memory("cpu") == (limit, limit - 1_000_000_000)
