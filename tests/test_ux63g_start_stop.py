"""Start and stop polish (ux63g), where a user meets it:

- Ctrl-C of `tokenpool serve`: the log said `tokenpool WARNING signal 2: draining; 0 requests in flight get 30 s to
  finish (signal again to stop now)`, a stop the user asked for read as a fault at the end of every run (uvicorn's
  and vLLM's "Shutting down" are INFO). Now INFO (`tokenpool serve` of a factory model run as a subprocess, then
  SIGINT; exit 0); so is a signal that stops the start-up ("signal 15 during start-up: stopping": StartupSignals
  under a real SIGTERM to this process). What a stop cuts ("grace period over: ended ...") stays a WARNING.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import time

import httpx

from controller.shutdown import StartupSignals
from load_tests.live_server import REPO_ROOT, terminal_signals
from tests.ports import free_port

SERVE_PORTS = range(28500, 28525)  # the `tokenpool serve` stopped with Ctrl-C


def _wait_for(log, pattern: str, alive, timeout: float = 120.0) -> re.Match:
    """The first match of `pattern` in the log, waited for (`alive()`: the server still runs)."""
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace")
        if got := re.compile(pattern, re.M).search(text):
            return got
        assert alive() and time.monotonic() < deadline, text[-5000:]
        time.sleep(0.05)


def test_ctrl_c_of_serve_drains_at_info(tiny_model, tmp_path):
    """`tokenpool serve MODEL_DIR`, serving, then Ctrl-C (SIGINT to the server alone, as a terminal's: its workers
    run in their own session): the drain's line at INFO, its wording kept; exit 0."""
    port = free_port(SERVE_PORTS)
    log = tmp_path / "serve.log"
    # (CPU workers wherever the test runs, a GPU machine's too)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "controller.cli", "serve", str(tiny_model), "--host",
                                 "127.0.0.1", "--port", str(port)], cwd=REPO_ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=terminal_signals())
    try:
        alive = lambda: proc.poll() is None  # noqa: E731
        _wait_for(log, r"listening on", alive)
        deadline = time.monotonic() + 120  # (ready: a server as a user stops it, serving)
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            assert time.monotonic() < deadline and alive(), log.read_text()[-5000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    text = log.read_text(errors="replace")
    assert rc == 0, text[-5000:]
    drain = re.search(r"^.* tokenpool (\w+) signal 2: draining; (.*)$", text, re.M)
    assert drain is not None, text[-5000:]
    assert drain.group(1) == "INFO", drain.group(0)
    assert drain.group(2) == "0 requests in flight get 30 s to finish (signal again to stop now)", drain.group(0)
    assert "INFO stopped" in text and "Traceback" not in text, text[-5000:]


def test_a_signal_during_start_up_stops_it_at_info(caplog):
    """A SIGTERM while the server starts (StartupSignals' handler, the one `tokenpool serve` installs first): the
    start-up is stopped, and "signal 15 during start-up: stopping" is said at INFO."""
    async def main() -> bool:
        early = StartupSignals()
        try:
            asyncio.get_running_loop().call_soon(os.kill, os.getpid(), signal.SIGTERM)
            return await asyncio.wait_for(early.run(asyncio.sleep(30)), 10)
        finally:
            early.remove()

    before = signal.getsignal(signal.SIGTERM)
    with caplog.at_level(logging.INFO, logger="tokenpool"):
        assert asyncio.run(main()) is True  # (stopped by the signal, not finished)
    assert signal.getsignal(signal.SIGTERM) == before  # (its handler given back)
    said = [(r.levelname, r.getMessage()) for r in caplog.records if "during start-up" in r.getMessage()]
    assert said == [("INFO", "signal 15 during start-up: stopping")], said
