"""`tokenpool run MODEL PROMPT | head -1`: the reader closing the pipe early ends the command quietly, exit 0, and
the request's connection is dropped (the server cancels it), as a Unix tool's output cut by `head` does."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time

from load_tests.live_server import REPO_ROOT
from tests.http_stub import stub_server


def test_run_piped_into_a_reader_that_stops_early_exits_0_quietly():
    dropped = threading.Event()  # (the stub's write failed: the CLI closed the request's connection)

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
            try:  # a reply that goes on until its reader goes (lines, as a long answer's)
                for i in range(10**6):
                    if time.monotonic() > deadline:
                        return
                    chunk = {"choices": [{"delta": {"content": f"line {i}\n"}}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                    time.sleep(0.002)
            except OSError:
                dropped.set()

    with stub_server(Handler) as url:
        p = subprocess.Popen([sys.executable, "-m", "controller.cli", "run", "m", "hi", "--url", url], cwd=REPO_ROOT,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        try:
            assert p.stdout.readline() == b"line 0\n"
            p.stdout.close()  # (as `head -1` exits after its line)
            _, err = p.communicate(timeout=30)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert (p.returncode, err.decode()) == (0, ""), (p.returncode, err.decode())
        assert dropped.wait(10), "the request's connection stayed open after the command ended"
