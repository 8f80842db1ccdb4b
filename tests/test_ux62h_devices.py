"""The controller counts a GPU host's GPUs through NVML, not torch (ux62h).

`local_devices("auto")` (workers.local auto, `tokenpool serve`'s default) asked torch.cuda.device_count() wherever a
GPU driver's node was: ~3 s of `import torch` in the controller, which otherwise needs none (ux62a), for a count.
NVML (pynvml, the driver's library through ctypes) now counts NVIDIA's GPUs, with CUDA_VISIBLE_DEVICES read as torch
reads it (indices, GPU- UUIDs, empty: none); torch is still asked where NVML is missing or fails, for MIG instances,
and on a ROCm host (/dev/kfd: NVML does not see AMD's GPUs). No GPU here: NVML's functions are faked (four GPUs, their
UUIDs) and a driver's node is a file of the test's; torch must not be in the process that counted (a fresh one).

And tests/kmock_util.operator_world, the operator tests' kmock world, took `Cluster` and `_declare_crds` from
tests/test_operator_e2e, whose import skips without the openai client: the operator files that need no openai
(test_operator_rounds) were skipped where it is not installed. They live in kmock_util now."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from controller import hosting, pool

ROOT = Path(__file__).resolve().parents[1]
PORTS = range(27900, 28000)
UUIDS = ["GPU-aa11", "GPU-aa22", "GPU-bb33", "GPU-cc44"]

# A fresh interpreter: the driver's node and NVML faked, the count asked, then whether torch was imported for it
COUNT = """
import json, sys
import pynvml
from controller import pool

uuids = {uuids!r}
pynvml.nvmlInit = lambda: None
pynvml.nvmlShutdown = lambda: None
pynvml.nvmlDeviceGetCount = lambda: len(uuids)
pynvml.nvmlDeviceGetHandleByIndex = lambda i: i
pynvml.nvmlDeviceGetUUID = lambda h: uuids[h]
pool.GPU_DRIVER_NODES = ({node!r},)
pool.ROCM_NODE = {node!r} + ".absent"
print(json.dumps({{"devices": pool.local_devices("auto"), "torch": "torch" in sys.modules}}))
"""


def _count_in_a_fresh_process(tmp_path: Path, visible: str | None) -> dict:
    node = tmp_path / "nvidiactl"
    node.touch()
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    code = textwrap.dedent(COUNT).format(uuids=UUIDS, node=str(node))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("visible", "want"), [(None, 4), ("1,3", 2), ("", 0), ("GPU-bb", 1)])
def test_a_gpu_host_counts_its_gpus_without_importing_torch(tmp_path, visible, want):
    got = _count_in_a_fresh_process(tmp_path, visible)
    assert got == {"devices": [f"cuda:{i}" for i in range(want)] or ["cpu"], "torch": False}, got


@pytest.fixture()
def gpus(monkeypatch, tmp_path):
    """NVML faked in this process with four GPUs, a driver's node here, and torch's count (asked through hosting's
    import_torch) recorded: (set CUDA_VISIBLE_DEVICES, the calls torch's count had)."""
    pynvml = pytest.importorskip("pynvml")
    (tmp_path / "nvidiactl").touch()
    monkeypatch.setattr(pool, "GPU_DRIVER_NODES", (str(tmp_path / "nvidiactl"),))
    monkeypatch.setattr(pool, "ROCM_NODE", str(tmp_path / "kfd"))
    for name, fn in {"nvmlInit": lambda: None, "nvmlShutdown": lambda: None, "nvmlDeviceGetCount": lambda: 4,
                     "nvmlDeviceGetHandleByIndex": lambda i: i,
                     "nvmlDeviceGetUUID": lambda h: UUIDS[h].encode()}.items():  # (bytes: an older binding's)
        monkeypatch.setattr(pynvml, name, fn)
    asked: list[int] = []

    class Cuda:
        @staticmethod
        def device_count() -> int:
            asked.append(1)
            return 3

    monkeypatch.setattr(hosting, "import_torch", lambda: type("Torch", (), {"cuda": Cuda}))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def visible(value: str | None) -> None:
        if value is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)

    return visible, asked


@pytest.mark.parametrize(("visible", "want"), [
    (None, 4), ("", 0), ("0", 1), ("3,1", 2), (" 2 , 0", 2),
    ("1gpu,2ampere", 2),  # (strtoul's reading, as CUDA's)
    ("0,5,1", 1), ("7", 0),  # (up to the first index past the last GPU)
    ("1,x,2", 1), ("-1,0", 0),  # (up to the first that is no index)
    ("0,1,0", 0), ("0,9,0", 0),  # (a repeat: none)
    ("GPU-cc44,GPU-aa1", 2), ("GPU-bb", 1),  # (UUIDs or unique prefixes of them)
    ("GPU-aa,GPU-bb", 0),  # (a prefix of two is ambiguous: the list ends there)
    ("GPU-bb,GPU-zz,GPU-cc", 1), ("GPU-bb,0,GPU-cc", 1),  # (up to the first naming none, or not a UUID)
    ("GPU-bb33,GPU-bb3", 0),  # (two names of one GPU: none)
])
def test_cuda_visible_devices_is_read_as_torch_reads_it(gpus, visible, want):
    set_visible, asked = gpus
    set_visible(visible)
    assert pool.local_devices("auto") == ([f"cuda:{i}" for i in range(want)] or ["cpu"])
    assert asked == []  # (NVML answered)


def test_torch_counts_where_nvml_cannot(gpus, monkeypatch):
    import pynvml

    set_visible, asked = gpus
    set_visible("MIG-0f3a")  # (MIG instances: NVML's count is of whole GPUs)
    assert pool.local_devices("auto") == ["cuda:0", "cuda:1", "cuda:2"] and len(asked) == 1
    set_visible(None)

    def no_library():
        raise pynvml.NVMLError_LibraryNotFound()

    monkeypatch.setattr(pynvml, "nvmlInit", no_library)  # (a driver NVML fails on, or none: WSL's, say)
    assert pool.local_devices("auto") == ["cuda:0", "cuda:1", "cuda:2"] and len(asked) == 2


def test_a_rocm_host_asks_torch(gpus, tmp_path):
    _, asked = gpus
    (tmp_path / "kfd").touch()  # (AMD's GPUs, which torch.cuda counts and NVML does not see)
    assert pool.local_devices("auto") == ["cuda:0", "cuda:1", "cuda:2"] and asked == [1]


def test_torch_counts_the_same_under_each_cuda_visible_devices(monkeypatch):
    """The same lists through torch's own reading of them (torch.cuda._device_count_nvml, its NVML-based count, with
    NVML's answers faked as here): the two agree."""
    torch_cuda = pytest.importorskip("torch.cuda")
    if not all(hasattr(torch_cuda, f) for f in ("_device_count_nvml", "_raw_device_count_nvml",
                                                 "_raw_device_uuid_nvml")):
        pytest.skip("this torch has no NVML-based count to compare with")
    monkeypatch.setattr(torch_cuda, "_raw_device_count_nvml", lambda: len(UUIDS))
    monkeypatch.setattr(torch_cuda, "_raw_device_uuid_nvml", lambda: list(UUIDS))
    for visible in (None, "", "0", "3,1", " 2 , 0", "1gpu,2ampere", "0,5,1", "7", "1,x,2", "-1,0", "0,1,0", "0,9,0",
                    "GPU-cc44,GPU-aa1", "GPU-bb", "GPU-aa,GPU-bb", "GPU-bb,GPU-zz,GPU-cc", "GPU-bb,0,GPU-cc",
                    "GPU-bb33,GPU-bb3"):
        if visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert pool._visible_count(visible, len(UUIDS), lambda: list(UUIDS)) == torch_cuda._device_count_nvml(), visible


# A fresh interpreter without the openai client: the world made, a Secret created and read back through its Cluster
WORLD = """
import asyncio, json, sys
from pathlib import Path
sys.modules["openai"] = None  # (an import of it fails, as where it is not installed)
from tests.kmock_util import operator_world

async def main():
    async with operator_world(Path({tmp!r}), port_range=range({lo}, {hi}), kinds=("secrets",), engine=False,
                              secrets={{"keys": ("k", b"v")}}) as w:
        got = await w.kube.get("secrets", "keys")
        crds = sorted(r.plural for r in w.k8s.resources if r.group == "tokenpool.dev")
    print(json.dumps({{"secret": got["data"], "crds": crds, "e2e": "tests.test_operator_e2e" in sys.modules}}))

asyncio.run(main())
"""


def test_the_operator_world_needs_no_openai(tmp_path):
    pytest.importorskip("kmock")
    code = textwrap.dedent(WORLD).format(tmp=str(tmp_path), lo=PORTS.start, hi=PORTS.stop)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"secret": {"k": "dg=="}, "e2e": False,
                   "crds": ["gpupools", "pooledmodels", "tenants"]}, got
