"""`tokenpool run`'s conversation takes `ollama run`'s /set and /show: `/set system`, `/set parameter NAME VALUE`
(Ollama's option names: num_predict, repeat_penalty, ...), `/set verbose|quiet`, `/set format json|noformat`,
`/show info|template|system|parameters`. They were "/set is not supported here: give tokenpool run's options":
the conversation had to be left to change any of them."""

from __future__ import annotations

import http.server
import io
import json

import pytest

from controller.chat_cli import run
from tests.http_stub import Terminal, stub_server

SHOW = {"details": {"format": "safetensors", "family": "llama"}, "template": "{{ messages }}",
        "model_info": {"general.architecture": "llama", "llama.context_length": 2048}, "capabilities": ["completion"]}


@pytest.fixture(scope="module")
def stub():
    bodies: list[dict] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _json(self, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # (/v1/models/known: the model is served)
            self._json({"id": "known"})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            if self.path == "/api/show":
                return self._json(SHOW)
            if self.path == "/api/chat":  # (no Ollama chat here: --verbose falls back to the OpenAI stream)
                return self.send_error(404)
            bodies.append(body)
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()
            self.wfile.write(b'data: {"choices": [{"delta": {"content": "ok"}}], "usage": null}\n\n'
                             b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}\n\n'
                             b"data: [DONE]\n\n")

    with stub_server(Handler) as url:
        yield url, bodies


def converse(stub, typed: str, system: str | None = None) -> tuple[str, list[dict]]:
    url, bodies = stub
    bodies.clear()
    out = io.StringIO()
    run(url, None, "known", None, system, {"max_tokens": 50}, Terminal(typed + "/bye\n"), out)
    return out.getvalue(), list(bodies)


def test_set_system_and_parameters_go_with_the_next_turns(stub):
    out, bodies = converse(stub, "/set system be brief\n/set parameter temperature 0.2\n/set parameter num_predict 7\n"
                           "/set parameter repeat_penalty 1.1\n/set parameter stop END STOP\nhi\n"
                           "/set system be terse\n/clear\nagain\n")
    assert "Set system message." in out and "Set parameter 'temperature' to '0.2'" in out
    assert "Set parameter 'stop' to 'END, STOP'" in out
    first, second = bodies
    assert first["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert (first["temperature"], first["max_tokens"], first["repetition_penalty"], first["stop"]) == \
        (0.2, 7, 1.1, ["END", "STOP"])
    # the system message replaced, not added; /clear keeps it
    assert second["messages"] == [{"role": "system", "content": "be terse"}, {"role": "user", "content": "again"}]


def test_set_system_replaces_the_system_option(stub):
    _, (body,) = converse(stub, "/set system new\nhi\n", system="old")
    assert body["messages"] == [{"role": "system", "content": "new"}, {"role": "user", "content": "hi"}]


def test_bad_parameters_are_said_and_not_sent(stub):
    out, (body,) = converse(stub, "/set parameter temperature warm\n/set parameter nosuch 1\n/set parameter\n"
                            "/set history\n/set parameter num_gpu 99\n/set parameter num_ctx 0\nhi\n")
    assert "Couldn't set parameter: num_gpu is the server's here (every model's layers are on its GPU)" in out
    assert "Couldn't set parameter: num_ctx is a whole number of at least 1" in out
    assert "Couldn't set parameter: temperature takes one number" in out
    assert "Unknown parameter 'nosuch'" in out and "/set parameter num_predict VALUE" in out
    assert "/set history is not supported here" in out
    assert "temperature" not in body and "nosuch" not in body and "num_ctx" not in body


def test_format_and_verbose_modes(stub, capsys):
    out, (a, b) = converse(stub, "/set format json\n/set verbose\nhi\n/set noformat\n/set quiet\nhi\n")
    assert "Set format to 'json' mode." in out and "Disabled format." in out and "Set 'quiet' mode." in out
    assert a["response_format"] == {"type": "json_object"} and "response_format" not in b
    assert a.get("stream_options") == {"include_usage": True} and "stream_options" not in b  # (timings asked once)
    assert capsys.readouterr().err.count("total duration:") == 1


def test_show_commands(stub):
    out, bodies = converse(stub, "/show system\n/set system be brief\n/show system\n/show parameters\n"
                           "/set parameter seed 3\n/show parameters\n/show info\n/show template\n/show\n")
    assert bodies == []
    assert "No system message was specified." in out and ">>> be brief\n" in out
    assert "User defined parameters:\n  num_predict     50\n  seed            3\n" in out
    assert "    architecture        llama\n    context length      2048\n" in out and "{{ messages }}\n" in out
    assert "/show parameters  the parameters set" in out


class DrawnTerminal(io.StringIO):
    """A terminal's stderr that says when something is drawn on it."""

    def __init__(self):
        super().__init__()
        import threading

        self.drawn = threading.Event()

    def isatty(self) -> bool:
        return True

    def write(self, s: str) -> int:
        n = super().write(s)
        self.drawn.set()
        return n


def test_a_spinner_until_the_first_text_then_erased(monkeypatch):
    """As `ollama run`: until a reply's first text (a model loading, a long prefill) a spinner turns on the terminal
    (stderr), erased before the reply; the reply itself (stdout) is the text alone. Not drawn where stderr is not a
    terminal."""
    term = DrawnTerminal()

    class Slow(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["content-length"]))
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()
            self.wfile.flush()
            term.drawn.wait(10)  # (the first token comes once the spinner has turned)
            self.wfile.write(b'data: {"choices": [{"delta": {"content": "ok"}}]}\n\ndata: [DONE]\n\n')

    monkeypatch.setattr("sys.stderr", term)
    with stub_server(Slow) as url:
        out = io.StringIO()
        run(url, None, "known", "hi", None, {}, io.StringIO(""), out)
        drawn = term.getvalue()
        assert out.getvalue() == "ok\n"
        assert drawn.startswith("\r⠋ ") and drawn.endswith("\r\x1b[K"), repr(drawn)
        piped = io.StringIO()  # (not a terminal: nothing drawn; the reply comes all the same)
        term.drawn.set()
        monkeypatch.setattr("sys.stderr", piped)
        run(url, None, "known", "hi", None, {}, io.StringIO(""), out)
    assert out.getvalue() == "ok\nok\n" and piped.getvalue() == ""
