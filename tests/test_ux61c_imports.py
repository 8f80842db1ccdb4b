"""Every first import of torch in a process goes through `controller.hosting.import_torch`, one thread at a time
(ux61c): torch imported by two threads at once is not safe (a live server's load failed with "operator
_native::_foreach_mm_native_0 does not exist"). The worker's threads went through it already; the controller's
`pool.local_devices` (asked on a thread of its start-up), `real_model.convert_gguf` and the model factory (the
default's models, made on a thread of `tokenpool serve`'s start-up) imported torch themselves, the factory at its
module's import. Each is run here in a fresh process on a thread while the test holds hosting's import lock: it
must wait for the lock, torch not imported meanwhile, then finish once the lock is let go."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RACE = """
import json, sys, threading, time
from controller import hosting
{imports}

hosting._IMPORTS.acquire()  # (as a thread in the middle of importing torch holds it)
failed = []

def call():
    try:
        {call}
    except Exception as e:  # (what comes after the import may fail: only the import's order is asked here)
        failed.append(repr(e))

t = threading.Thread(target=call, daemon=True)
t.start()
time.sleep(1.0)  # (ample for `import torch` to have begun: it is in sys.modules from its first line)
while_held = "torch" in sys.modules
hosting._IMPORTS.release()
t.join(120)
print(json.dumps({{"while_held": while_held, "finished": not t.is_alive(), "torch": "torch" in sys.modules,
                  "failed": failed}}))
"""


def _race(imports: str, call: str) -> dict:
    code = textwrap.dedent(RACE).format(imports=imports, call=call)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_modules_import_no_torch():
    """The controller's modules import no torch with themselves, the model factory included (`tokenpool bench`'s
    check of --models reads its ARCHS and SIZES)."""
    code = ("import sys\nimport controller.pool, controller.real_model, controller.model_factory, controller.cli\n"
            "from controller.model_factory import ARCHS, SIZES, model_shape\nmodel_shape('qwen2', 'small')\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["False"], (out.stdout, out.stderr[-2000:])


@pytest.mark.timeout(200)
def test_local_devices_imports_torch_through_hosting():
    # (a GPU driver's node taken to be here, and NVML to fail: without one, local_devices answers "cpu" without asking
    # torch; with NVML, it counts NVIDIA's GPUs without torch (ux62h))
    got = _race("from controller import pool\nfrom controller.pool import local_devices\npool.GPU_DRIVER_NODES = ('/',)\n"
                "pool._nvml_gpu_count = lambda: None", "print(local_devices('auto'), file=sys.stderr)")
    assert got == {"while_held": False, "finished": True, "torch": True, "failed": []}, got


@pytest.mark.timeout(200)
def test_the_model_factory_imports_torch_through_hosting(tmp_path):
    out = tmp_path / "m"
    got = _race("from controller.model_factory import make_model",
                f"make_model('qwen2', 'tiny', {str(out)!r}, dtype='fp32', device='cpu', progress=False)")
    assert got == {"while_held": False, "finished": True, "torch": True, "failed": []}, got
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()


@pytest.mark.timeout(200)
def test_the_gguf_conversion_imports_torch_through_hosting(tmp_path):
    got = _race("from pathlib import Path\nfrom controller.real_model import convert_gguf",
                f"convert_gguf(Path({str(tmp_path / 'no.gguf')!r}), Path({str(tmp_path / 'out')!r}))")
    # (no such GGUF: the conversion fails after its import of torch, which is what is asked)
    assert got["while_held"] is False and got["finished"] and got["torch"] and len(got["failed"]) == 1, got
