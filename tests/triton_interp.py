"""Running Triton kernels in Triton's CPU interpreter, in a subprocess (TRITON_INTERPRET is read at import)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Triton 3.6's interpreter turns a loaded scalar (a 1-element array) into a loop bound with int(array), which
# NumPy 2.4 refuses for arrays of one dimension: read it as its one element instead (the kernel is unchanged)
PATCH = """
import triton.runtime.interpreter as ti
patch_tensor = ti._patch_lang_tensor
def patched(tensor, scope):
    patch_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
ti._patch_lang_tensor = patched
"""


def interpret(code: str, *args: str) -> None:
    """Run `code` (after PATCH) under the interpreter; it must print "ok" last."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    r = subprocess.run([sys.executable, "-c", PATCH + code, *args], env=env, cwd=root, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
