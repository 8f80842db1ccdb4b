"""`tokenpool run MODEL PROMPT --verbose` (as `ollama run --verbose`; was "No such option"): after the reply, its
timings and token counts on stderr (the counts from the stream's usage, asked for with include_usage); stdout has the
reply alone."""

from __future__ import annotations

import io

from typer.testing import CliRunner

from controller.chat_cli import turn
from controller.cli import app
from tests.http_stub import sse_chat, stub_server


def test_verbose_prints_the_replys_timings_and_counts_on_stderr():
    asked: list[dict] = []
    usage = {"prompt_tokens": 31, "completion_tokens": 3, "total_tokens": 34}
    Handler = sse_chat(asked, [*({"choices": [{"delta": {"content": t}}]} for t in ("Par", "is", ".")),
                               {"choices": [], "usage": usage}])

    class Handler(Handler):  # (a server without the Ollama API: --verbose falls back to the OpenAI stream's usage)
        def do_POST(self):
            if self.path == "/api/chat":
                return self.send_error(404)
            super().do_POST()

    with stub_server(Handler) as url:
        out, stats = io.StringIO(), io.StringIO()
        assert turn(url, None, {"model": "m", "messages": []}, out, stats) == "Paris."
        assert asked[-1]["stream_options"] == {"include_usage": True} and out.getvalue() == "Paris.\n"
        lines = stats.getvalue().splitlines()
        assert [line.split(":")[0] for line in lines] == ["total duration", "time to first token", "prompt eval count",
                                                         "eval count", "eval duration", "eval rate"], lines
        assert "prompt eval count:    31 token(s)" in lines and "eval count:           3 token(s)" in lines, lines
        # without --verbose nothing is asked or said beyond the reply
        out = io.StringIO()
        turn(url, None, {"model": "m", "messages": []}, out)
        assert "stream_options" not in asked[-1] and out.getvalue() == "Paris.\n"
        # the flag, through the command line: the reply, then the timings
        r = CliRunner().invoke(app, ["run", "m", "capital?", "--verbose", "--url", url], input="")
        assert r.exit_code == 0 and r.output.startswith("Paris.\ntotal duration:") and \
            "eval rate:" in r.output, r.output
