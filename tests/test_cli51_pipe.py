"""`tokenpool run MODEL PROMPT` cut short mid-reply: piped into a reader that stops early (`| head -1`) it ends
quietly, exit 0 (it was click's exit 1); stopped with Ctrl-C (SIGINT) it ends at once, exit 130, no traceback. Either
way the request's connection is dropped, so the server cancels the request."""

from __future__ import annotations

import http.server
import json
import os
import queue
import signal
import subprocess
import sys
import time

import pytest

from load_tests.live_server import REPO_ROOT, terminal_signals
from tests.http_stub import stub_server


@pytest.fixture(scope="module")
def endless():
    """A stand-in server whose replies go on, a line at a time, until their reader goes (or 30 s); yields its URL
    and a queue that gets one item each time a reply's connection was dropped by the client."""
    dropped: queue.Queue = queue.Queue()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *a):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["content-length"]))
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()
            deadline = time.monotonic() + 30
            try:
                for i in range(10**6):
                    if time.monotonic() > deadline:
                        return
                    chunk = {"choices": [{"delta": {"content": f"line {i}\n"}}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                    time.sleep(0.002)
            except OSError:
                dropped.put(True)

    with stub_server(Handler) as url:
        yield url, dropped


def _run(url: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-m", "controller.cli", "run", "m", "hi", "--url", url], cwd=REPO_ROOT,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, preexec_fn=terminal_signals())
    assert p.stdout.readline() == b"line 0\n"  # (the reply is streaming)
    return p


def _end(p: subprocess.Popen) -> tuple[int, str]:
    try:
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, err.decode()


def test_run_piped_into_a_reader_that_stops_early_exits_0_quietly(endless):
    url, dropped = endless
    p = _run(url)
    p.stdout.close()  # (as `head -1` exits after its line)
    assert _end(p) == (0, "")
    assert dropped.get(timeout=10), "the request's connection stayed open after the command ended"


def test_ctrl_c_mid_reply_exits_130_at_once_and_drops_the_request(endless):
    url, dropped = endless
    p = _run(url)
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    rc, err = _end(p)
    assert (rc, err) == (130, ""), (rc, err)
    assert time.monotonic() - t0 < 5
    assert dropped.get(timeout=10), "the request's connection stayed open after Ctrl-C"
