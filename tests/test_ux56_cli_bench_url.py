"""`tokenpool bench serve --url URL` with nothing listening there: one line and exit 1 (it was httpx's traceback)."""

from __future__ import annotations

import socket

from typer.testing import CliRunner

from controller.cli import app


def test_bench_serve_without_a_server_at_its_url_says_so():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = CliRunner().invoke(app, ["bench", "serve", "--url", f"127.0.0.1:{port}", "--device", "cpu"])
    assert r.exit_code == 1, r.output
    assert r.output.startswith(f"tokenpool bench serve: cannot reach http://127.0.0.1:{port}: ") \
        and r.output.count("\n") == 1 and "Traceback" not in r.output, r.output
