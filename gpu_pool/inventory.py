"""What devices this node has: NVIDIA GPUs through NVML, or one CPU device when there is no driver.

`list_devices()` never raises for a missing or broken driver: without pynvml, or when `nvmlInit` fails
(containers without /dev/nvidia*, this CI), it reports the host CPU so the rest of the stack runs in tests.
Each NVML field is queried on its own; a field the driver does not support (utilization under MIG, NUMA on
old drivers) is None rather than an error. NVML indices are physical; CUDA_VISIBLE_DEVICES may renumber them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

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
    try:
        mi = meminfo()
        total, free = mi.get("MemTotal", 0), mi.get("MemAvailable", mi.get("MemFree", 0))
    except OSError:
        total = free = 0
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


def list_devices(cpu_fallback: bool = True) -> list[DeviceInfo]:
    """NVIDIA GPUs seen by NVML; with none (no pynvml, no driver, no device), the host CPU as device 0."""
    devs: list[DeviceInfo] = []
    try:
        import pynvml as nv
    except ImportError:
        nv = None
    if nv is not None:
        try:
            nv.nvmlInit()
        except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            log.debug("NVML unavailable: %s", e)
        else:
            try:
                devs = _nvml_devices(nv)
            except Exception as e:
                log.warning("NVML device query failed: %s", e)
                devs = []
            finally:
                _q(nv.nvmlShutdown)
    if not devs and cpu_fallback:
        devs = [cpu_device()]
    return devs
