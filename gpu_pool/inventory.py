"""What devices this node has: NVIDIA GPUs through NVML, or one CPU device when there is no driver.

`list_devices()` never raises for a missing or broken driver: without pynvml, or when `nvmlInit` fails
(containers without /dev/nvidia*, this CI), it reports the host CPU so the rest of the stack runs in tests.
Each NVML field is queried on its own; a field the driver does not support (utilization under MIG, NUMA on
old drivers) is None rather than an error. NVML indices are physical; CUDA_VISIBLE_DEVICES may renumber them.

`host_memory_bytes()` is the host's memory as this process may use it (MemTotal, or a container's cgroup limit where
lower): what every default sized from "the machine's memory" reads. No torch here: the controller imports it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # "cuda" | "cpu"
    index: int
    name: str
    memory_total: int  # bytes
    memory_used: int
    memory_free: int
    utilization: int | None = None  # percent of time a kernel ran, last sample period
    pcie_gen: int | None = None  # current link (may be downtrained when idle)
    pcie_width: int | None = None
    pcie_gen_max: int | None = None
    pcie_width_max: int | None = None
    numa_node: int | None = None
    uuid: str | None = None
    pci_bus_id: str | None = None

    @property
    def pcie_bandwidth_gbs(self) -> float | None:
        """Theoretical one-direction bandwidth of the max link, GB/s (after line encoding)."""
        gt = {1: 2.5, 2: 5.0, 3: 8.0, 4: 16.0, 5: 32.0, 6: 64.0}.get(self.pcie_gen_max or 0)
        if gt is None or not self.pcie_width_max:
            return None
        enc = 0.8 if self.pcie_gen_max <= 2 else 128 / 130
        return gt * enc * self.pcie_width_max / 8


def meminfo(path: str = "/proc/meminfo") -> dict[str, int]:
    """/proc/meminfo in bytes (the kernel writes kB)."""
    out: dict[str, int] = {}
    for line in Path(path).read_text().splitlines():
        k, _, v = line.partition(":")
        parts = v.split()
        if parts and parts[0].isdigit():
            out[k.strip()] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    return out


CGROUP_ROOT = "/sys/fs/cgroup"  # where the cgroup file systems are mounted (v2 here, or v1's "memory/" under it)
PROC_CGROUP = "/proc/self/cgroup"  # this process's cgroup in each hierarchy
CGROUP_NO_LIMIT = 1 << 60  # v1 writes "no limit" as a huge number (9223372036854771712), v2 as "max"


def _cgroup_memory_dirs(root: Path, proc_cgroup: Path) -> list[tuple[Path, str, str]]:
    """(directory, limit file, usage file) of this process's memory cgroup and each of its parents up to the mount.

    Both hierarchies are read: v2 (the "0::" line; mounted at `root`, or at `root`/unified on a hybrid host) and v1's
    memory controller (mounted at `root`/memory). A container's own cgroup is often the mount's root while
    /proc/self/cgroup names the host's path (v1 without a cgroup namespace): the walk up reaches it there."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []
    out: list[tuple[Path, str, str]] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            mounts = [(root, "memory.max", "memory.current"), (root / "unified", "memory.max", "memory.current")]
        elif "memory" in controllers.split(","):
            mounts = [(root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes")]
        else:
            continue
        rel = [p for p in path.split("/") if p and p not in (".", "..")]
        for base, limit, usage in mounts:
            for depth in range(len(rel), -1, -1):
                out.append((base.joinpath(*rel[:depth]), limit, usage))
    return out


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # v2's "max": no limit


def _inactive_file(stat: Path) -> int:
    """The cgroup's reclaimable page cache (what `docker stats` leaves out of a container's usage): memory.stat's
    total_inactive_file (v1, with the children's), else inactive_file (v2)."""
    try:
        fields = dict(line.split()[:2] for line in stat.read_text().splitlines() if len(line.split()) >= 2)
    except OSError:
        return 0
    v = fields.get("total_inactive_file", fields.get("inactive_file", "0"))
    return int(v) if v.isdigit() else 0


def cgroup_memory(cgroup_root: str | Path | None = None,
                  proc_cgroup: str | Path | None = None) -> tuple[int | None, int | None]:
    """(limit, room) of this process's memory cgroup: the lowest limit of its cgroup and its parents, and the least
    room left under any of them (the limit less what is charged, reclaimable page cache not counted); (None, None)
    where none is limited (no container, "max", v1's huge "no limit", no cgroup file system)."""
    limit = room = None
    for d, limit_file, usage_file in _cgroup_memory_dirs(Path(cgroup_root or CGROUP_ROOT),
                                                        Path(proc_cgroup or PROC_CGROUP)):
        lim = _read_int(d / limit_file)
        if lim is None or lim >= CGROUP_NO_LIMIT:
            continue
        limit = lim if limit is None else min(limit, lim)
        used = _read_int(d / usage_file)
        if used is not None:
            used -= _inactive_file(d / "memory.stat")
            r = max(0, lim - max(0, used))
            room = r if room is None else min(room, r)
    return limit, room


def host_memory_bytes(cgroup_root: str | Path | None = None, proc_cgroup: str | Path | None = None) -> int:
    """This machine's memory as this process may use it: /proc/meminfo's MemTotal, or its cgroup's memory limit where
    that is lower (a container's `--memory`, a pod's `resources.limits.memory`). What the defaults sized from "the
    machine's memory" read (the host cache's share of RAM, a CPU arena's budget), so that in a container they follow
    its limit rather than the host's memory, which would have the kernel's OOM killer end the process."""
    try:
        total = meminfo().get("MemTotal", 0)
    except OSError:
        total = 0
    if not total:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            total = 16 << 30
    limit, _ = cgroup_memory(cgroup_root, proc_cgroup)
    return total if limit is None else min(total, limit)


def cpu_name(path: str = "/proc/cpuinfo") -> str:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "cpu"


def cpu_device() -> DeviceInfo:
    """The host as a device: its memory as this process may use it (a container's cgroup limit where that is lower
    than MemTotal, and the room left under it where that is less than MemAvailable)."""
    try:
        mi = meminfo()
        total, free = mi.get("MemTotal", 0), mi.get("MemAvailable", mi.get("MemFree", 0))
    except OSError:
        total = free = 0
    limit, room = cgroup_memory()
    if limit is not None and total:
        total = min(total, limit)
        free = min(free, total if room is None else room)
    return DeviceInfo(kind="cpu", index=0, name=cpu_name(), memory_total=total, memory_used=total - free,
                      memory_free=free, numa_node=0)


def _q(fn, *args):
    try:
        return fn(*args)
    except Exception:  # NVMLError_NotSupported and friends: this field is unknown, the rest is fine
        return None


def _sysfs_numa(bus_id: str | None) -> int | None:
    if not bus_id:
        return None
    # NVML writes "00000000:17:00.0" (8-digit domain); sysfs uses "0000:17:00.0"
    p = Path("/sys/bus/pci/devices") / bus_id.lower()[-12:] / "numa_node"
    try:
        n = int(p.read_text().strip())
    except (OSError, ValueError):
        return None
    return n if n >= 0 else None


def _nvml_devices(nv) -> list[DeviceInfo]:
    devs = []
    for i in range(nv.nvmlDeviceGetCount()):
        h = nv.nvmlDeviceGetHandleByIndex(i)
        name = nv.nvmlDeviceGetName(h)
        name = name.decode() if isinstance(name, bytes) else str(name)
        mem = nv.nvmlDeviceGetMemoryInfo(h)
        util = _q(nv.nvmlDeviceGetUtilizationRates, h)
        pci = _q(nv.nvmlDeviceGetPciInfo, h)
        bus = getattr(pci, "busId", None) if pci is not None else None
        bus = bus.decode() if isinstance(bus, bytes) else bus
        uuid = _q(nv.nvmlDeviceGetUUID, h)
        uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
        numa = _q(nv.nvmlDeviceGetNumaNodeId, h) if hasattr(nv, "nvmlDeviceGetNumaNodeId") else None
        devs.append(DeviceInfo(
            kind="cuda", index=i, name=name,
            memory_total=int(mem.total), memory_used=int(mem.used), memory_free=int(mem.free),
            utilization=None if util is None else int(util.gpu),
            pcie_gen=_q(nv.nvmlDeviceGetCurrPcieLinkGeneration, h),
            pcie_width=_q(nv.nvmlDeviceGetCurrPcieLinkWidth, h),
            pcie_gen_max=_q(nv.nvmlDeviceGetMaxPcieLinkGeneration, h),
            pcie_width_max=_q(nv.nvmlDeviceGetMaxPcieLinkWidth, h),
            numa_node=numa if isinstance(numa, int) and numa >= 0 else _sysfs_numa(bus),
            uuid=uuid, pci_bus_id=bus,
        ))
    return devs


@contextlib.contextmanager
def nvml() -> Iterator[Any]:
    """pynvml, initialised for the block and shut down after it; None where NVML cannot be had (no pynvml, or no
    driver library: its init failed). (list_devices, and the controller's GPU count, controller.pool)"""
    try:
        import pynvml as nv
    except ImportError:
        yield None
        return
    try:
        nv.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        log.debug("NVML unavailable: %s", e)
        yield None
        return
    try:
        yield nv
    finally:
        _q(nv.nvmlShutdown)


def list_devices(cpu_fallback: bool = True) -> list[DeviceInfo]:
    """NVIDIA GPUs seen by NVML; with none (no pynvml, no driver, no device), the host CPU as device 0."""
    devs: list[DeviceInfo] = []
    with nvml() as nv:
        if nv is not None:
            try:
                devs = _nvml_devices(nv)
            except Exception as e:
                log.warning("NVML device query failed: %s", e)
                devs = []
    if not devs and cpu_fallback:
        devs = [cpu_device()]
    return devs
