"""`tokenpool suite PART --url` of a server that does not serve --model (default `pace`, the suite's own paced
server's) says so in one line (exit 1), naming what it serves, as `tokenpool loadtest` does: `suite corpus --url`
of the embedded default counted a 404 per case as its results and exited 0."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from load_tests.faults import target


class _Server(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - (http.server's name)
        if self.path == "/health":
            code, body = 200, {"status": "ok"}
        elif self.path == "/v1/models":
            code, body = 200, {"object": "list", "data": [{"id": "smollm2"}]}
        elif self.path == "/v1/models/smollm2":
            code, body = 200, {"id": "smollm2"}
        else:
            code, body = 404, {"error": {"message": "no such model"}}
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def url():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def test_suite_url_without_the_model_says_so(url):
    with pytest.raises(SystemExit) as e, target(url=url):
        pass
    assert isinstance(e.value.code, str)
    assert "'pace'" in e.value.code and "smollm2" in e.value.code and "--model" in e.value.code


def test_suite_url_with_the_model_runs(url):
    with target(url=url, model="smollm2") as t:
        assert t.model == "smollm2"
