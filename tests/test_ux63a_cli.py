"""CLI and log polish (ux63a), each where a user meets it, on a live server:

- `tokenpool stop nope`: said `model "nope" not found; served: ...` naming the models alone, where `tokenpool run
  nope` and `show nope` name every name a model answers to (its aliases too: `stop` takes them as well). Now `stop`
  names them as `run` does, the same line, exit 1 (the CLI through typer's CliRunner, as tests/test_ux62g_names.py);
- Ctrl-C of `tokenpool serve`: the log said "engine w0 connection lost: IncompleteReadError" at INFO for each
  worker, its pipe closing as the stop had told it to, which read as a fault at the end of every run. Now DEBUG
  while the server stops (`tokenpool serve` of a factory model run as a subprocess, then SIGINT); a worker that
  dies under a running server is still a WARNING (one SIGKILLed under the module's server).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
from typer.testing import CliRunner

from controller.cli import app
from controller.keys import hash_key
from load_tests.live_server import REPO_ROOT, terminal_signals
from tests.ports import free_port, live_server_on

ADMIN = "admin-ux63a-token"
PORTS = range(28300, 28325)  # the module's server
SERVE_PORTS = range(28325, 28350)  # the `tokenpool serve` stopped with Ctrl-C
PACE = {"kind": "pace", "pace_s_per_token": 0.01}
CFG = {"admin_token_hash": hash_key(ADMIN), "workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
       "models": [{"name": "tiny", "path": None, "aliases": ["Nick"], "engine": PACE},
                  {"name": "twin", "path": None, "engine": PACE}]}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with live_server_on(PORTS, CFG, tmp_path_factory.mktemp("ux63a")) as srv:
        yield srv


def cli(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


def test_stop_says_an_unknown_model_as_run_does(server):
    """`stop`, `run` and `show` of a name no model answers to: the same line, every served name and alias in it (in
    the server's order, as /v1/models lists them), exit 1; a name `stop` takes (an alias, as Ollama reads it) is
    still stopped."""
    for name in ("nope", "library/nope", "Twin:7b"):
        said = {}
        for cmd in (["run", name, "hi"], ["show", name], ["stop", name, "--admin-token", ADMIN]):
            r = cli(*cmd, "--url", server.url)
            assert r.exit_code == 1, (cmd, r.output)
            said[cmd[0]] = r.output.removeprefix(f"tokenpool {cmd[0]}: ")
        assert said["stop"] == said["run"] == said["show"] == \
            f'model "{name}" not found; served: tiny, Nick, twin\n', said
    r = cli("stop", "nick:latest", "--admin-token", ADMIN, "--url", server.url)
    assert r.exit_code == 0 and r.output.startswith("nick:latest: ") and "not found" not in r.output, r.output


def _wait_for(log, pattern: str, alive, after: int = 0, timeout: float = 120.0) -> re.Match:
    """The first match of `pattern` in the log from offset `after`, waited for (`alive()`: the server still runs)."""
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace")
        if got := re.compile(pattern, re.M).search(text, after):
            return got
        assert alive() and time.monotonic() < deadline, text[-5000:]
        time.sleep(0.05)


def _loud_losses(text: str) -> list[str]:
    return [line for line in text.splitlines()
            if "connection lost" in line and re.search(r" (INFO|WARNING|ERROR|CRITICAL) ", line)]


def test_a_worker_killed_under_a_running_server_is_a_warning(server):
    """A worker SIGKILLed while the server runs (not stopping, not signalled): "connection lost" is a WARNING; the
    slot's worker is started again (left serving for the module's other test)."""
    adm = {"Authorization": f"Bearer {ADMIN}"}
    (e0,) = httpx.get(server.url + "/admin/engines", headers=adm, timeout=10).json()
    start = len(server.log_path.read_bytes())
    os.kill(e0["pid"], signal.SIGKILL)
    alive = lambda: server.proc.poll() is None  # noqa: E731
    lost = _wait_for(server.log_path, rf"^.* (\w+) engine {e0['id']} connection lost: .*$", alive, start)
    assert lost.group(1) == "WARNING", lost.group(0)
    _wait_for(server.log_path, rf"engine {e0['id']} registered", alive, lost.end())
    deadline = time.monotonic() + 60
    while httpx.get(server.url + "/health", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)


def test_ctrl_c_of_serve_logs_no_connection_lost(tiny_model, tmp_path):
    """`tokenpool serve MODEL_DIR`, serving, then Ctrl-C (SIGINT to the server alone, as a terminal's: its workers
    run in their own session): exit 0, and no "connection lost" line at INFO or above (it said one per worker)."""
    port = free_port(SERVE_PORTS)
    log = tmp_path / "serve.log"
    # (CPU workers wherever the test runs, a GPU machine's too)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "controller.cli", "serve", str(tiny_model), "--host",
                                 "127.0.0.1", "--port", str(port)], cwd=REPO_ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=terminal_signals())
    try:
        _wait_for(log, r"engine \S+ registered", lambda: proc.poll() is None)
        deadline = time.monotonic() + 120  # (its model hosted: a server as a user stops it, serving)
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-5000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    text = log.read_text(errors="replace")
    assert rc == 0, text[-5000:]
    assert "signal 2: draining" in text and "INFO stopped" in text, text[-5000:]
    assert _loud_losses(text) == [] and "Traceback" not in text, text[-5000:]
