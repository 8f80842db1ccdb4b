"""/metrics' GPU gauges: only real GPUs, utilization as a 0-1 ratio (parsed with prometheus_client)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

import gpu_pool.inventory as inventory
from controller.metrics import Metrics
from gpu_pool.inventory import DeviceInfo

GPU_FAMILIES = ("tokenpool_gpu_memory_used_bytes", "tokenpool_gpu_memory_total_bytes",
                "tokenpool_gpu_utilization_ratio")


def _gpu_samples() -> dict[str, dict[str, float]]:
    fams = {f.name: f for f in text_string_to_metric_families(Metrics().render().decode())}
    return {n: {s.labels["gpu"]: s.value for s in fams[n].samples} for n in GPU_FAMILIES if n in fams}


def test_host_without_gpu_exports_no_gpu_series():
    """list_devices() falls back to the host CPU as device 0; that is RAM, not GPU memory."""
    gpus = [d for d in inventory.list_devices(cpu_fallback=False) if d.kind == "cuda"]
    samples = _gpu_samples()
    for n in GPU_FAMILIES[:2]:
        assert sorted(samples.get(n, {})) == sorted(str(d.index) for d in gpus), (n, samples)


def test_gpu_utilization_is_percent_over_100(monkeypatch):
    devs = [DeviceInfo(kind="cuda", index=i, name="gpu", memory_total=80 << 30, memory_used=used << 30,
                       memory_free=(80 - used) << 30, utilization=u)
            for i, (used, u) in enumerate([(10, 1), (20, 0), (30, 100), (40, None)])]
    monkeypatch.setattr(inventory, "list_devices", lambda cpu_fallback=True: devs)
    s = _gpu_samples()
    assert s["tokenpool_gpu_utilization_ratio"] == {"0": 0.01, "1": 0.0, "2": 1.0}  # 1% busy is not 100%
    assert s["tokenpool_gpu_memory_used_bytes"] == {str(i): float(g << 30) for i, g in enumerate((10, 20, 30, 40))}
    assert s["tokenpool_gpu_memory_total_bytes"]["3"] == float(80 << 30)
