"""A `.gguf` conversion still running when the server's process ends (`tokenpool serve FILE.gguf` stopped by SIGTERM
during its start-up, which no longer waits for the conversion it runs after the bind) ends with it: the converter
ran on orphaned, and the next start converted into the same folder beside it."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from load_tests.live_server import REPO_ROOT
from load_tests.user_check import alive as _alive  # (running still: a zombie is not)

# The server's start-up, reduced: a conversion on a daemon thread (the converter here sleeps), and the process ending
# while it runs, as the served start-up ends on a signal.
CHILD = """
import sys, threading, time
from pathlib import Path
from controller import children, real_model

real_model.CONVERTER = [sys.executable, "-c", "import time; time.sleep(60)"]
f = Path(sys.argv[1]) / "m.gguf"
f.write_bytes(b"GGUF" + bytes(60))
threading.Thread(target=real_model.ensure_gguf, args=(f, Path(sys.argv[1]) / "cache"), daemon=True).start()
while not children.running():
    time.sleep(0.01)
print(children.running()[0].pid, flush=True)
"""


def test_the_converter_ends_with_the_server(tmp_path):
    r = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert r.returncode == 0, r.stderr
    converter = int(r.stdout.split()[0])
    deadline = time.monotonic() + 10
    while _alive(converter) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = _alive(converter)
    if alive:
        os.kill(converter, 9)
    assert not alive, "the converter outlived the process that started it"
