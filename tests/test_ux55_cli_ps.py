"""`tokenpool ps` and `tokenpool stop` with --url at a server that answers JSON but is not tokenpool (another API on
port 8000, a proxy, a mock): one line naming the URL, exit 1, never a traceback."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys

import pytest

from load_tests.live_server import REPO_ROOT
from tests.http_stub import stub_server


@pytest.fixture(scope="module")
def json_api():
    """A server whose every GET and POST answers 200 with the JSON body set in `answers[0]`."""
    answers: list = [None]

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _json(self) -> None:
            data = json.dumps(answers[0]).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = _json

        def do_POST(self):
            self.rfile.read(int(self.headers.get("content-length") or 0))
            self._json()

    with stub_server(Handler) as url:
        yield url, answers


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "controller.cli", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "TOKENPOOL_ADMIN_TOKEN": "t"})


@pytest.mark.parametrize("answer, path", [
    ({"ok": True}, "/admin/models"), ([{"x": 1}], "/admin/models"), ({"data": [{"id": "m"}]}, "/admin/models"),
    ([{"name": "m"}], None)], ids=["object", "items-without-name", "openai-list", "models-without-fields"])
def test_ps_and_stop_at_another_json_api_say_so_in_one_line(json_api, answer, path):
    """It was AttributeError ('str' object has no attribute 'get'), KeyError 'name' or TypeError (string indices
    must be integers) with their tracebacks: the answer was read as tokenpool's admin API's whatever it was."""
    url, answers = json_api
    answers[0] = answer
    for args, where in ((["ps"], path or "/admin/engines"), (["stop", "m"], path or "/admin/models/m/evict")):
        r = cli(*args, "--url", url)
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.returncode == 1 and r.stdout == "" and "Traceback" not in r.stderr, r
        assert lines == [f"tokenpool {args[0]}: {url}{where}: not a tokenpool admin API answer (is it a tokenpool "
                         "server?)"], r.stderr


def test_show_at_another_json_api_says_so(json_api):
    """`tokenpool show m` where /api/show answers a JSON object that is no Ollama show answer printed an empty
    "  Model" heading, exit 0; it is the one line `show` says for an answer that is not JSON's object, exit 1."""
    url, answers = json_api
    answers[0] = {"ok": True}
    r = cli("show", "m", "--url", url)
    assert (r.returncode, r.stdout) == (1, ""), r
    assert r.stderr == f"tokenpool show: {url}/api/show: not an Ollama show answer (is it a tokenpool server?)\n"
