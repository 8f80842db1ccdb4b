"""A new user's pass over session 63's changes (helper-133), from a fresh venv and a cold cache: regressions found.

- Ctrl-C on a first run's start-up, while the child making the default's models (`python -m
  controller.model_factory`, 35209fe) was importing torch: after the server's "stopped", the child's exit printed
  torch's atexit "FakeTensor cache stats:" lines at INFO (torch's loggers not set up yet, the child's root logger at
  INFO took them). The child keeps torch's loggers at WARNING, torch's own default.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from controller.config import DEMO_MODELS

ROOT = Path(__file__).resolve().parent.parent

# The child as serve runs it, its SIGTERM (children.stop_all's, at the server's stop) landing while torch is imported:
# sent as torch's fake_tensor module (which registers the atexit dump) is done, before torch's logging is set up
STOPPED_IN_IMPORT = r"""
import importlib.abc, importlib.util, os, signal, sys

class StopThere(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "torch._subclasses.fake_tensor":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            os.kill(os.getpid(), signal.SIGTERM)

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, StopThere())
from controller.model_factory import main
raise SystemExit(main(sys.argv[1:]))
"""


def test_the_model_child_stopped_while_it_imports_torch_says_nothing_of_torchs(tmp_path):
    name = DEMO_MODELS[0][0]
    proc = subprocess.run([sys.executable, "-c", STOPPED_IN_IMPORT, f"{name}={tmp_path / name}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 128 + 15, proc.stderr  # (unwound by the SIGTERM, as serve stops it)
    assert "FakeTensor" not in proc.stderr and " INFO " not in proc.stderr, proc.stderr
    assert not (tmp_path / name / "config.json").exists()  # (stopped before the model was made)
