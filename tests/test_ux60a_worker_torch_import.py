"""A worker's first import of torch is made by one thread, the others waiting for it whole.

Seen live, under heavy load: "operator _native::_foreach_mm_native_0 does not exist". A standby's warm-up thread
was importing torch when it was told "go", and the worker's own threads imported torch beside it: the event loop
measuring the GPU's memory for its registration (`device_memory`), the step and load threads binding the device
(`bind_device`). Importing torch on two threads at once is not safe. Here a fresh interpreter (torch not imported
yet) runs that takeover on a "cuda:0" device with `import` watched: the first import of torch is slowed by a second,
and any other thread that starts an import of torch while it is under way is recorded. (There is no GPU here: the
CUDA calls after the imports fail, which the script ignores; the imports are what is checked.)"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import builtins, io, json, sys, threading, time
    from concurrent.futures import ThreadPoolExecutor

    from controller import worker

    assert "torch" not in sys.modules, "controller.worker imported torch at module level"
    real = builtins.__import__
    guard = threading.Lock()
    state = {"owner": None, "done": False, "overlaps": [], "first": None}

    def watched(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and name.split(".")[0] == "torch" and not state["done"]:
            me = threading.current_thread().name
            with guard:
                first = state["owner"] is None
                if first:
                    state["owner"] = state["first"] = me
                elif state["owner"] != me:
                    state["overlaps"].append(me)
            if first:
                time.sleep(1.0)  # a slow import (a loaded host): the window the others' first uses fall in
                try:
                    return real(name, globals, locals, fromlist, level)
                finally:
                    state["done"] = True
        return real(name, globals, locals, fromlist, level)

    builtins.__import__ = watched
    sys.stdin = io.StringIO("go\\n")
    assert worker.standby("cuda:0")  # the warm-up thread starts importing; "go" comes at once
    step = ThreadPoolExecutor(1, thread_name_prefix="step", initializer=worker.bind_device, initargs=("cuda:0",))
    fut = step.submit(lambda: None)  # (the worker's first snapshot: the step thread's initializer binds the device)
    try:
        worker.device_memory("cuda:0")  # the registration's measure, on the event loop's thread
    except Exception:  # noqa: BLE001 - no GPU here: torch is imported, the CUDA call fails
        pass
    try:
        fut.result(120)
    except Exception:  # noqa: BLE001 - (the same)
        pass
    worker._warming.join(120)
    print("RESULT " + json.dumps({**state, "torch": "torch" in sys.modules,
                                  "whole": hasattr(sys.modules.get("torch"), "cuda")}))
''')


def test_torch_is_imported_by_one_thread_while_the_others_wait():
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert r.returncode == 0 and line is not None, (r.returncode, r.stdout[-3000:], r.stderr[-3000:])
    got = json.loads(line[len("RESULT "):])
    assert got["torch"] and got["whole"] and got["first"] is not None, got
    # without the one lock: the event loop's thread and the step thread each began an import of torch while the
    # first was under way
    assert got["overlaps"] == [], got
