"""`tokenpool run` when the server goes away mid-reply: an error and exit 1, not a cut reply that exits 0."""

from __future__ import annotations

import http.server
import io
import os
import subprocess
import sys

import pytest

from load_tests.live_server import REPO_ROOT
from tests.http_stub import Terminal, stub_server


@pytest.fixture
def cut_stub():
    """A stand-in OpenAI server whose chat streams stop after one delta: the connection closes with no [DONE] (a
    server killed mid-reply, a proxy timing out). Yields its URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # (the end of the body is the connection's close, as a killed server's is)

        def log_message(self, *a):
            pass

        def do_GET(self):
            data = b'{"id": "known"}'
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            self.rfile.read(int(self.headers["content-length"]))
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()
            self.wfile.write(b'data: {"choices": [{"delta": {"content": "half a rep"}}]}\n\n')

    with stub_server(Handler) as url:
        yield url


def test_a_reply_cut_off_is_an_error_not_a_success(cut_stub):
    r = subprocess.run([sys.executable, "-m", "controller.cli", "run", "known", "hi", "--url", cut_stub],
                       cwd=REPO_ROOT, capture_output=True, text=True, input="", timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert r.returncode == 1 and r.stdout.startswith("half a rep"), (r.returncode, r.stdout, r.stderr)
    assert r.stderr.strip() == "tokenpool run: the stream ended before the reply did (the server closed it)", r.stderr
    # in a conversation: said after the cut text, and the turn is not kept as the model's reply
    from controller.chat_cli import run

    out = io.StringIO()
    run(cut_stub, None, "known", None, None, {}, Terminal("hello\n/bye\n"), out)
    assert "half a rep\nerror: the stream ended before the reply did" in out.getvalue(), out.getvalue()


def test_pull_says_how_a_model_gets_here():
    """`tokenpool pull MODEL`, as an Ollama user types it: one line saying this server downloads nothing and how a
    model gets to it (it was typer's 'No such command', in a box); exit 2."""
    r = subprocess.run([sys.executable, "-m", "controller.cli", "pull", "HuggingFaceTB/SmolLM2-135M-Instruct"],
                       cwd=REPO_ROOT, capture_output=True, text=True, input="", timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "80"})
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("tokenpool pull: tokenpool downloads nothing") and \
        "hf download HuggingFaceTB/SmolLM2-135M-Instruct" in lines[0] and \
        "tokenpool serve HuggingFaceTB/SmolLM2-135M-Instruct" in lines[0], lines[0]


@pytest.fixture
def web_page():
    """Not an OpenAI server: every GET is a 200 HTML page but /missing, a 404 page; POST is a 501 page."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _page(self, code: int) -> None:
            data = b"<html><body>hello</body></html>"
            self.send_response(code)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._page(404 if self.path.startswith("/missing") else 200)

        def do_POST(self):
            self._page(501)

    with stub_server(Handler) as url:
        yield url


def test_a_url_that_is_not_a_tokenpool_server_is_named_in_one_line(web_page):
    """--url at some other web server: ls, ps, stop and run say which URL answered what, in one line, exit 1 (ls
    said a bare 'File not found' and run 'Unsupported method', naming no URL; a 200 that is no JSON was a
    traceback)."""
    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "controller.cli", *args], cwd=REPO_ROOT, capture_output=True,
                           text=True, input="", timeout=60, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        return lines[0]

    assert cli("ls", "--url", web_page) == f"tokenpool ls: {web_page}/v1/models: not JSON (is it a tokenpool server?)"
    assert cli("ps", "--url", web_page) == f"tokenpool ps: {web_page}/admin/models: not JSON (is it a tokenpool server?)"
    assert cli("ls", "--url", web_page + "/missing") == f"tokenpool ls: {web_page}/missing/v1/models: HTTP 404: Not Found"
    assert cli("run", "m", "hi", "--url", web_page) == \
        f"tokenpool run: {web_page}/v1/chat/completions: HTTP 501: Not Implemented"
