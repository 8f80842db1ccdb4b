"""`tokenpool bench serve --url URL` and `tokenpool suite PART --url URL` with nothing listening there: one line and
exit 1. bench serve, suite fuzz and suite disconnects printed a traceback; suite corpus and suite overload reported a
run of connection errors and exited 0."""

from __future__ import annotations

import socket

import pytest
from typer.testing import CliRunner

from controller.cli import app


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bench_serve_without_a_server_at_its_url_says_so(closed_port):
    r = CliRunner().invoke(app, ["bench", "serve", "--url", f"127.0.0.1:{closed_port}", "--device", "cpu"])
    assert r.exit_code == 1, r.output
    assert r.output.startswith(f"tokenpool bench serve: cannot reach http://127.0.0.1:{closed_port}: ") \
        and r.output.count("\n") == 1 and "Traceback" not in r.output, r.output


@pytest.mark.parametrize("part", ["corpus", "overload", "disconnects"])
def test_a_suite_part_without_a_server_at_its_url_says_so(closed_port, part):
    r = CliRunner().invoke(app, ["suite", part, "--url", f"127.0.0.1:{closed_port}"])
    assert r.exit_code == 1, r.output
    assert str(r.exception) == (f"tokenpool suite {part}: cannot reach http://127.0.0.1:{closed_port}: [Errno 111] Connection refused"), \
        (r.exception, r.output)
