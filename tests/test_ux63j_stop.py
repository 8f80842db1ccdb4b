"""How fast and how clearly `tokenpool serve` stops (ux63j), where a user meets it (`tokenpool serve --config` of a
paced model, run as a subprocess, Ctrl-C as SIGINT to it alone):

- an idle server took 1.5-2.5 s from "draining" to "stopped" (0.3 s at best) on 2 cores; now ~0.2 s
  (bench/results/stop_cpu2_*.json). Two causes, each its test:
  - the stop's clean-up of the node's host copies (`pool.drop_unheld_host_copies`) imported torch (~0.9 s) whenever
    the namespace's /dev/shm folder was there, which another server's workers holding their copies keep (the
    namespace, "tokenpool", is every server's by default): now the index is read without torch first, and the
    import is paid only where there is something to remove;
  - each local worker, once it had given everything back, spent ~0.6 s in the interpreter's teardown (torch
    imported), which the controller's stop waits for (it reaps its workers): now it exits at once after its
    threads, the atexit functions and its logs (`worker._exit_now`);
- a second Ctrl-C during a drain said nothing of its own, and the drain then said "grace period over: ended N
  requests with an error" although its grace had not run out: now one WARNING line names the signal and how many
  requests it ends, and the "grace period over" line is not said.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import yaml

from controller.pool import _unheld_copies
from load_tests.live_server import REPO_ROOT, terminal_signals
from tests.ports import free_port
from tokenpool.holders import new_holder_id

PORTS = range(28700, 28750)
NAMESPACE = "ux63j"


def _host_cache(root: Path, holder: str, segments: tuple[str, ...] = ("m",)) -> Path:
    """A namespace's host cache folder as model_swapper.host_cache leaves it: an index whose copies `holder` holds."""
    folder = root / f"tokenpool-{NAMESPACE}"
    folder.mkdir(parents=True)
    (folder / "index.lock").touch()
    entries = {k: {"model_dir": "/x", "dtype": "torch.float32", "nbytes": 4, "state": "ready", "owner": holder,
                   "holders": [holder], "tick": 1} for k in segments}
    (folder / "index.json").write_text(json.dumps({"tick": 1, "entries": entries}))
    for k in segments:
        (folder / f"{k}.seg").write_bytes(b"\0" * 4)
    return folder


def test_unheld_copies_read_without_torch(tmp_path):
    """What the stop's clean-up would remove, found from the index alone: nothing while a live process holds every
    copy (another server's workers); something once a holder is dead, a segment has no entry, or the index cannot be
    read (then the clean-up itself looks)."""
    assert _unheld_copies(tmp_path / "none") is False
    held = _host_cache(tmp_path / "held", new_holder_id())
    assert _unheld_copies(held) is False
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert _unheld_copies(_host_cache(tmp_path / "dead", f"{int(dead.stdout)}:1:0")) is True
    stray = _host_cache(tmp_path / "stray", new_holder_id())
    (stray / "other.seg").write_bytes(b"")
    assert _unheld_copies(stray) is True
    (held / "index.json").write_text("{")
    assert _unheld_copies(held) is True


def test_stop_cleanup_does_not_import_torch_for_others_copies(tmp_path):
    """`drop_unheld_host_copies` (the end of every stop) where only another live process's copies are: torch is not
    imported (it was: ~0.9 s of a 2-core host), and the copies are left to their holder."""
    folder = _host_cache(tmp_path, new_holder_id())  # (this test's process: alive, another server's worker)
    code = ("import sys; from controller.pool import drop_unheld_host_copies; "
            f"drop_unheld_host_copies({NAMESPACE!r}); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, TOKENPOOL_SHM_DIR=str(tmp_path)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", out.stderr
    assert (folder / "m.seg").exists() and json.loads((folder / "index.json").read_text())["entries"]


def test_worker_exits_without_the_interpreters_teardown(tmp_path):
    """A local worker whose run is over (its controller gone, as at a stop) exits 0 at once: its atexit functions
    run and its last log line is written, but the interpreter's teardown (~0.6 s with torch imported, which the
    controller's stop waited for) is skipped: an object freed only by that teardown says nothing."""
    port = free_port(PORTS)  # (nothing listens there: the worker's connection is refused, and its run ends)
    setup = ("import atexit, os, runpy, sys\n"
             "class Teardown:\n"
             "    def __del__(self): os.write(2, b'TEARDOWN\\n')\n"
             "kept = Teardown()\n"  # (a global of __main__: freed by the interpreter's teardown only)
             "atexit.register(os.write, 2, b'ATEXIT\\n')\n"
             f"sys.argv = ['worker', '--controller', '127.0.0.1:{port}', '--device', 'cpu', '--slot', '0']\n"
             "runpy.run_module('controller.worker', run_name='__main__', alter_sys=True)\n")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TOKENPOOL_SHM_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", setup], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                         env=env)
    assert out.returncode == 0, out.stderr
    assert "controller connection:" in out.stderr and "ATEXIT" in out.stderr, out.stderr
    assert "TEARDOWN" not in out.stderr, out.stderr


class Serve:
    def __init__(self, tmp: Path, shm: Path):
        port = free_port(PORTS)
        cfg = tmp / "config.yaml"
        cfg.write_text(yaml.safe_dump({"auth": False, "workers": {"local": "cpu"},
                                       "gpus": {"host_cache_namespace": NAMESPACE},
                                       "models": [{"name": "pace", "engine": {"kind": "pace",
                                                                              "pace_s_per_token": 0.05}}]}))
        self.log, self.url = tmp / "serve.log", f"http://127.0.0.1:{port}"
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
                   TOKENPOOL_SHM_DIR=str(shm))
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "controller.cli", "serve", "--config", str(cfg),
                                          "--host", "127.0.0.1", "--port", str(port)], cwd=REPO_ROOT, env=env,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=terminal_signals())

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def ready(self) -> Serve:
        deadline = time.monotonic() + 120
        with httpx.Client(timeout=5, trust_env=False) as client:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(self.url + "/health").status_code == 200:
                        return self
                assert time.monotonic() < deadline and self.proc.poll() is None, self.text()[-5000:]
                time.sleep(0.05)

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match:
        deadline = time.monotonic() + timeout
        while (found := re.search(pattern, self.text(), re.M)) is None:
            assert time.monotonic() < deadline, self.text()[-5000:]
            time.sleep(0.02)
        return found

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def _at(line: str) -> float:
    return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def test_idle_stop_is_quick_beside_another_servers_host_copies(tmp_path):
    """Ctrl-C of an idle server while another server's workers hold host copies in the same namespace (its /dev/shm
    folder there): "draining" to "stopped" under 1 s (~0.2 s; it was ~1.5 s and more: torch imported to find
    nothing to remove, each worker's teardown waited for), exit 0, and the other server's copies left alone."""
    shm = tmp_path / "shm"
    folder = _host_cache(shm, new_holder_id())
    srv = Serve(tmp_path, shm)
    try:
        srv.ready()
        srv.wait_for(r"worker\[\d+\] INFO cold start: warm")  # (idle as a server is: its worker warm)
        srv.proc.send_signal(signal.SIGINT)
        assert srv.proc.wait(60) == 0, srv.text()[-5000:]
        text = srv.text()
        draining = srv.wait_for(r"^.* tokenpool INFO signal 2: draining; 0 requests in flight.*$").group(0)
        stopped = srv.wait_for(r"^.* tokenpool INFO stopped$").group(0)
        assert _at(stopped) - _at(draining) < 1.0, text[-3000:]
        assert "Traceback" not in text, text[-5000:]
        assert (folder / "m.seg").exists()
    finally:
        srv.kill()


def test_second_ctrl_c_during_a_drain_says_itself(tmp_path):
    """A stream in flight (20 s of paced tokens), Ctrl-C: the drain; Ctrl-C again: one WARNING line of the server's
    own naming the signal and the one request it ends, no "grace period over" (its grace had not run out); the
    stream ends with an error event and [DONE]; exit 0."""
    srv = Serve(tmp_path, tmp_path / "shm").ready()
    lines: list[str] = []

    def stream() -> None:
        body = {"model": "pace", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 400, "stream": True}
        with contextlib.suppress(httpx.HTTPError), httpx.Client(timeout=60, trust_env=False) as client, \
                client.stream("POST", srv.url + "/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                lines.append(line)

    reader = threading.Thread(target=stream, daemon=True)
    try:
        reader.start()
        deadline = time.monotonic() + 60
        while not any('"content"' in line for line in lines):  # (streaming)
            assert time.monotonic() < deadline and srv.proc.poll() is None, srv.text()[-5000:]
            time.sleep(0.02)
        srv.proc.send_signal(signal.SIGINT)
        srv.wait_for(r"signal 2: draining; 1 request in flight get 30 s")
        srv.proc.send_signal(signal.SIGINT)
        assert srv.proc.wait(60) == 0, srv.text()[-5000:]
        reader.join(10)
        text = srv.text()
        said = re.findall(r"^.* tokenpool (\w+) (signal 2 again.*)$", text, re.M)
        assert said == [("WARNING", "signal 2 again: stopping now; 1 request in flight ended with an error")], \
            text[-5000:]
        assert "grace period over" not in text, text[-5000:]
        data = [line for line in lines if line.startswith("data:")]
        assert data[-1] == "data: [DONE]" and '"error"' in data[-2], data[-3:]
        assert "Traceback" not in text and "INFO stopped" in text, text[-5000:]
    finally:
        srv.kill()
