"""`tokenpool run MODEL PROMPT --format json` (as `ollama run --format json`; was "No such option"): the request asks
for a JSON object (response_format json_object); another format is a usage error."""

from __future__ import annotations

import http.server
import json

from typer.testing import CliRunner

from controller.cli import app
from tests.http_stub import stub_server


def test_format_json_asks_for_a_json_object():
    asked = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *a):
            pass

        def do_POST(self):
            asked.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()
            chunk = {"choices": [{"delta": {"content": '{"capital": "Paris"}'}}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode())

    with stub_server(Handler) as url:
        r = CliRunner().invoke(app, ["run", "m", "capital?", "--format", "json", "--url", url], input="")
        assert (r.exit_code, r.output) == (0, '{"capital": "Paris"}\n'), r.output
        assert asked[-1]["response_format"] == {"type": "json_object"}, asked[-1]
        r = CliRunner().invoke(app, ["run", "m", "capital?", "--url", url], input="")
        assert r.exit_code == 0 and "response_format" not in asked[-1], asked[-1]
        r = CliRunner().invoke(app, ["run", "m", "capital?", "--format", "yaml", "--url", url], input="",
                               env={"COLUMNS": "200"})
        assert r.exit_code == 2 and "'yaml': the one format is json" in r.output and len(asked) == 2, r.output
