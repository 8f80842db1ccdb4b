"""Start and stop polish (ux63g), where a user meets it (`tokenpool serve --config` of a paced model, run as a
subprocess: one server for the module, stopped by the last test's Ctrl-C):

- the slot's standby worker (controller/pool.py) was started when the server became ready, its start-up (imports)
  beside the first request: on 2 cores the first token 0.23 -> 0.35 s, the reply 0.58 -> 0.93 s
  (bench/results/standby_start_cpu2_*.json). Now once the slot has served no request for a moment after its first
  loads (SPARE_IDLE_S; SPARE_BUSY_S at most): no standby while the first request streams, one soon after it;
- Ctrl-C of `tokenpool serve`: the log said `tokenpool WARNING signal 2: draining; 0 requests in flight get 30 s to
  finish (signal again to stop now)`, a stop the user asked for read as a fault at the end of every run (uvicorn's
  and vLLM's "Shutting down" are INFO). Now INFO; exit 0. So is a signal that stops the start-up ("signal 15 during
  start-up: stopping": StartupSignals under a real SIGTERM to this process). What a stop cuts ("grace period over:
  ended ...") stays a WARNING.
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
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from controller.pool import SPARE_IDLE_S
from controller.shutdown import StartupSignals
from load_tests.live_server import REPO_ROOT, terminal_signals
from tests.ports import free_port

SERVE_PORTS = range(28500, 28525)  # the module's `tokenpool serve`
PACE_S = 0.05  # a paced token: 40 of them stream for 2 s


class Serve:
    def __init__(self, proc: subprocess.Popen, log: Path, url: str):
        self.proc, self.log, self.url = proc, log, url

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def standbys(self) -> list[int]:
        """The live standby processes the server started (its children with --standby)."""
        out = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    stat = d.joinpath("stat").read_text().rsplit(")", 1)[1].split()
                    if int(stat[1]) == self.proc.pid and stat[0] != "Z" and \
                            b"--standby" in d.joinpath("cmdline").read_bytes().split(b"\0"):
                        out.append(int(d.name))
        return out


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    """`tokenpool serve --config CFG` (a standby per slot: the default), ready: /health 200 polled each 20 ms, as a
    script that sends its first request at once would."""
    work = tmp_path_factory.mktemp("ux63g")
    port = free_port(SERVE_PORTS)
    cfg = work / "config.yaml"
    cfg.write_text(yaml.safe_dump({"auth": False, "workers": {"local": "cpu", "heartbeat_s": 0.25},
                                   "models": [{"name": "pace", "engine": {"kind": "pace",
                                                                          "pace_s_per_token": PACE_S}}]}))
    log = work / "serve.log"
    # (CPU workers wherever the test runs, a GPU machine's too)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "controller.cli", "serve", "--config", str(cfg), "--host",
                                 "127.0.0.1", "--port", str(port)], cwd=REPO_ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=terminal_signals())
    srv = Serve(proc, log, f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 120
        with httpx.Client(timeout=5, trust_env=False) as client:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(srv.url + "/health").status_code == 200:
                        break
                assert time.monotonic() < deadline and proc.poll() is None, srv.text()[-5000:]
                time.sleep(0.02)
        yield srv
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_no_standby_beside_the_first_request(serve):
    """The first request, sent as the server is ready, streams (2 s) with no standby started beside it; once it is
    done and the slot idle, the standby starts (SPARE_IDLE_S later; SPARE_BUSY_S after ready at most)."""
    client = openai.OpenAI(base_url=serve.url + "/v1", api_key="none", max_retries=0)
    seen: set[int] = set()
    chunks = 0
    for chunk in client.chat.completions.create(model="pace", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=40, stream=True):
        chunks += bool(chunk.choices and chunk.choices[0].delta.content)
        seen.update(serve.standbys())
    done = time.monotonic()
    assert chunks >= 20, chunks  # (it streamed for a while: a standby started at ready would have been seen)
    assert seen == set(), f"a standby started beside the first request: {seen}\n{serve.text()[-5000:]}"
    while not serve.standbys():  # (and one comes soon after: a worker's death is still a takeover)
        assert time.monotonic() - done < SPARE_IDLE_S + 10 and serve.proc.poll() is None, serve.text()[-5000:]
        time.sleep(0.05)


def test_ctrl_c_of_serve_drains_at_info(serve):
    """Then Ctrl-C (SIGINT to the server alone, as a terminal's: its workers run in their own session): the drain's
    line at INFO, its wording kept; exit 0."""
    serve.proc.send_signal(signal.SIGINT)
    rc = serve.proc.wait(60)
    text = serve.text()
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
