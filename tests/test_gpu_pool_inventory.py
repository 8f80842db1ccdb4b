"""Device inventory: CPU fallback without a driver, and the NVML path against a fake pynvml."""

from __future__ import annotations

import sys
import types

from gpu_pool.inventory import cpu_device, host_memory_bytes, list_devices


def test_cpu_fallback_without_driver():
    devs = list_devices()
    # this CI has no NVIDIA driver: one CPU device with real memory figures
    if devs[0].kind == "cpu":
        assert len(devs) == 1
        d = devs[0]
        assert d.name and d.memory_total > 0 and 0 <= d.memory_free <= d.memory_total
        assert d.memory_used == d.memory_total - d.memory_free
    assert host_memory_bytes() == cpu_device().memory_total  # MemTotal, or a container's limit where lower


def _fake_nvml(fail_init=False, numa_unsupported=False):
    nv = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def init():
        if fail_init:
            raise NVMLError("Driver Not Loaded")

    def unsupported(*_):
        raise NVMLError("Not Supported")

    nv.NVMLError = NVMLError
    nv.nvmlInit = init
    nv.nvmlShutdown = lambda: None
    nv.nvmlDeviceGetCount = lambda: 2
    nv.nvmlDeviceGetHandleByIndex = lambda i: i
    nv.nvmlDeviceGetName = lambda h: b"NVIDIA H100 80GB HBM3" if h == 0 else "NVIDIA H100 80GB HBM3"
    nv.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=80 << 30, used=1 << 30, free=79 << 30)
    nv.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=37, memory=5)
    nv.nvmlDeviceGetPciInfo = lambda h: types.SimpleNamespace(busId=b"00000000:1B:00.0")
    nv.nvmlDeviceGetUUID = lambda h: f"GPU-{h}"
    nv.nvmlDeviceGetCurrPcieLinkGeneration = lambda h: 5
    nv.nvmlDeviceGetCurrPcieLinkWidth = lambda h: 16
    nv.nvmlDeviceGetMaxPcieLinkGeneration = lambda h: 5
    nv.nvmlDeviceGetMaxPcieLinkWidth = lambda h: 16
    nv.nvmlDeviceGetNumaNodeId = unsupported if numa_unsupported else (lambda h: h)
    return nv


def test_nvml_path(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml())
    devs = list_devices()
    assert [d.kind for d in devs] == ["cuda", "cuda"]
    d = devs[1]
    assert d.name == "NVIDIA H100 80GB HBM3" and d.memory_total == 80 << 30 and d.memory_free == 79 << 30
    assert (d.pcie_gen, d.pcie_width, d.numa_node, d.utilization) == (5, 16, 1, 37)
    assert d.pci_bus_id == "00000000:1B:00.0" and d.uuid == "GPU-1"
    assert 60 < d.pcie_bandwidth_gbs < 64  # Gen5 x16, one direction


def test_unsupported_fields_are_none(monkeypatch):
    nv = _fake_nvml(numa_unsupported=True)
    nv.nvmlDeviceGetUtilizationRates = nv.nvmlDeviceGetNumaNodeId  # MIG: not supported
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    d = list_devices()[0]
    assert d.utilization is None and d.kind == "cuda"  # numa from sysfs or None, never an exception


def test_nvml_init_failure_or_missing_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(fail_init=True))
    assert [d.kind for d in list_devices()] == ["cpu"]
    assert list_devices(cpu_fallback=False) == []
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    assert [d.kind for d in list_devices()] == ["cpu"]
