"""Running Triton kernels in Triton's CPU interpreter, in a subprocess (TRITON_INTERPRET is read at import)."""

import atexit
import json
import os
import subprocess
import sys
import tempfile
import threading
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

# One process a test session imports torch and Triton under the interpreter (PATCH applied; ~2 s a process, most
# of a small test's time) and forks a child for each run: the child is a fresh `python -c code args` in all that a
# test sees -- sys.argv, __main__, its own module state (a run's changes to module globals die with it), stdout and
# stderr of its own. Each request: a line of JSON {"code", "runs": [[args, out path, err path], ...]}; it answers
# the children's pids on one line, then, once all have ended, their exit codes on the next.
ZYGOTE = PATCH + r"""
import json, os, sys, traceback
import torch, torch.nn.functional, triton, triton.language
requests, answers = sys.stdin, os.fdopen(os.dup(1), "w")
for line in requests:
    req = json.loads(line)
    code = compile(req["code"], "<string>", "exec")
    pids = []
    for args, out, err in req["runs"]:
        sys.stdout.flush(), sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            rc = 1
            try:
                for fd, path in ((1, out), (2, err)):
                    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
                sys.stdin = open(os.devnull)
                sys.argv = ["-c", *args]
                exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
                rc = 0
            except SystemExit as e:  # as the interpreter exits on one
                rc = e.code if isinstance(e.code, int) else 0 if e.code is None else (print(e.code, file=sys.stderr), 1)[1]
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush(), sys.stderr.flush()
                os._exit(rc)
        pids.append(pid)
    answers.write(json.dumps(pids) + "\n")
    answers.flush()
    answers.write(json.dumps([os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]) + "\n")
    answers.flush()
"""

_zygote: tuple[dict, subprocess.Popen] | None = None


def _env() -> dict:
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    return {**env, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}


def _stop() -> None:
    global _zygote
    if _zygote is not None:
        p = _zygote[1]
        _zygote = None
        if p.poll() is None:
            p.kill()
            p.wait()


atexit.register(_stop)


def _zygote_for(env: dict) -> subprocess.Popen:
    """The session's zygote, started again where the environment changed (a module reads it at import)."""
    global _zygote
    if _zygote is None or _zygote[0] != env or _zygote[1].poll() is not None:
        _stop()
        root = Path(__file__).resolve().parents[1]
        _zygote = env, subprocess.Popen([sys.executable, "-c", ZYGOTE], env=env, cwd=root, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    return _zygote[1]


def interpret(code: str, *args: str) -> None:
    """Run `code` (after PATCH) under the interpreter; it must print "ok" last."""
    interpret_each(code, [list(args)])


def interpret_each(code: str, arg_sets: list[list[str]], timeout: float = 300) -> None:
    """Run `code` (after PATCH) under the interpreter once per argument list in `arg_sets`, side by side: each
    must print "ok" last. The interpreter runs a kernel's programs one after another in one Python thread, so a
    test that splits its cases over the argument lists (sys.argv[1:] in `code`) takes the machine's cores, not one.
    Each run is a child forked from the session's zygote (see ZYGOTE), as fresh as its own `python -c`."""
    pytest.importorskip("triton")
    with tempfile.TemporaryDirectory() as tmp:
        files = [(os.path.join(tmp, f"{i}.out"), os.path.join(tmp, f"{i}.err")) for i in range(len(arg_sets))]
        z = _zygote_for(_env())
        pids: list[int] = []
        done = False
        try:
            z.stdin.write(json.dumps({"code": code, "runs": [[list(a), o, e] for a, (o, e) in
                                                              zip(arg_sets, files)]}) + "\n")
            z.stdin.flush()
            pids = json.loads(z.stdout.readline())
            answer: list = []
            reader = threading.Thread(target=lambda: answer.append(z.stdout.readline()), daemon=True)
            reader.start()
            reader.join(timeout)
            assert answer and answer[0], f"interpreter runs {arg_sets} past {timeout} s, or the zygote died"
            rcs = json.loads(answer[0])
            done = True
        finally:
            if not done:  # (a timeout or an interrupt: no child is left running, and a fresh zygote next time)
                for pid in pids:
                    try:
                        os.kill(pid, 9)
                    except ProcessLookupError:
                        pass
                _stop()
        for args, rc, (o, e) in zip(arg_sets, rcs, files):
            out, err = Path(o).read_text(), Path(e).read_text()
            assert rc == 0 and out.strip().endswith("ok"), (args, err[-2000:])
