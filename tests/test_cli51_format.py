"""`tokenpool run MODEL PROMPT --format json` (as `ollama run --format json`; was "No such option"): the request asks
for a JSON object (response_format json_object); another format is a usage error."""

from __future__ import annotations

from typer.testing import CliRunner

from controller.cli import app
from tests.http_stub import sse_chat, stub_server


def test_format_json_asks_for_a_json_object():
    asked: list[dict] = []
    Handler = sse_chat(asked, [{"choices": [{"delta": {"content": '{"capital": "Paris"}'}}]}])

    with stub_server(Handler) as url:
        r = CliRunner().invoke(app, ["run", "m", "capital?", "--format", "json", "--url", url], input="")
        assert (r.exit_code, r.output) == (0, '{"capital": "Paris"}\n'), r.output
        assert asked[-1]["response_format"] == {"type": "json_object"}, asked[-1]
        r = CliRunner().invoke(app, ["run", "m", "capital?", "--url", url], input="")
        assert r.exit_code == 0 and "response_format" not in asked[-1], asked[-1]
        r = CliRunner().invoke(app, ["run", "m", "capital?", "--format", "yaml", "--url", url], input="",
                               env={"COLUMNS": "200"})
        assert r.exit_code == 2 and "'yaml': the one format is json" in r.output and len(asked) == 2, r.output
