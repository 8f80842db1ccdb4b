"""Running Triton kernels in Triton's CPU interpreter, in a subprocess (TRITON_INTERPRET is read at import)."""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
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
    interpret_each(code, [list(args)])


def interpret_each(code: str, arg_sets: list[list[str]], timeout: float = 300) -> None:
    """Run `code` (after PATCH) under the interpreter once per argument list in `arg_sets`, side by side: each
    must print "ok" last. The interpreter runs a kernel's programs one after another in one Python thread, so a
    test that splits its cases over the argument lists (sys.argv[1:] in `code`) takes the machine's cores, not one."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    procs = [subprocess.Popen([sys.executable, "-c", PATCH + code, *args], env=env, cwd=root, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for args in arg_sets]
    try:  # (each read on its own thread: a child that fills its pipe never waits on another's end)
        with ThreadPoolExecutor(len(procs)) as ex:
            outs = list(ex.map(lambda p: p.communicate(timeout=timeout), procs))
    finally:
        for p in procs:  # (a timeout or an interrupt: none is left running)
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, args, (out, err) in zip(procs, arg_sets, outs):
        assert p.returncode == 0 and out.strip().endswith("ok"), (args, err[-2000:])
