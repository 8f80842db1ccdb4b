"""The benchmarks' LiveServer stops its server when its own process is told to stop (a `timeout` around a
benchmark sends SIGTERM): the server runs in its own session, so nothing else would stop it, and a server left
running beside the next benchmark on the GPU skews it. And a server just started answers requests that come
before its workers have joined."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from load_tests.live_server import REPO_ROOT, LiveServer

SCRIPT = """
import sys, time
from load_tests.live_server import LiveServer
cfg = {"workers": {"local": "cpu"}, "models": [{"name": "pace", "engine": {"kind": "pace"}}]}
try:
    with LiveServer(cfg, sys.argv[1]) as srv:
        print(srv.proc.pid, flush=True)
        time.sleep(300)
finally:
    print("unwound", flush=True)
"""


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_sigterm_to_the_benchmark_stops_its_server(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                         text=True, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    server = int(p.stdout.readline())
    try:
        assert _alive(server)
        p.send_signal(signal.SIGTERM)
        rc = p.wait(30)
        assert p.stdout.read().strip() == "unwound" and rc == 128 + signal.SIGTERM
        deadline = time.monotonic() + 20
        while _alive(server):  # the server, and the workers of its session
            assert time.monotonic() < deadline, "the server outlived the benchmark that started it"
            time.sleep(0.1)
    finally:
        p.kill()
        if _alive(server):
            os.killpg(server, signal.SIGKILL)


def test_a_request_sent_while_the_server_starts_waits_for_its_workers(tmp_path):
    """A request that comes while the server's local worker has not joined yet (a moment after "listening", seconds
    on a GPU) waits for it and is answered; it heard 503 "no engine can serve model" with Retry-After 5."""
    cfg = {"workers": {"local": "cpu", "standby": False}, "models": [{"name": "pace", "engine": {"kind": "pace"}}]}
    with LiveServer(cfg, tmp_path, wait_ready=False) as srv:
        deadline = time.monotonic() + 120
        while True:  # the first answer of the HTTP server
            try:
                health = httpx.get(srv.url + "/health", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, srv.log()
                time.sleep(0.005)
        r = httpx.post(srv.url + "/v1/completions", json={"model": "pace", "prompt": "hi", "max_tokens": 3}, timeout=60)
        assert r.status_code == 200, (health.json(), r.text)
        assert health.status_code == 503 and health.json()["status"] == "starting", health.text  # (it came early)
