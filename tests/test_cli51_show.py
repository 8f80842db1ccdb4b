"""`tokenpool show MODEL` (as `ollama show`; it was "No such command 'show'"): the server's /api/show laid out as
Ollama prints it, --template for the chat template, an unknown model one line and exit 1."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from controller.cli import app
from tests.http_stub import JsonHandler, stub_server

SHOWN = {"modelfile": "", "parameters": "", "template": "{{ messages }}",
         "details": {"format": "safetensors", "family": "llama", "families": ["llama"]},
         "model_info": {"general.architecture": "llama", "llama.context_length": 8192, "context_length": 8192,
                        "llama.embedding_length": 576},
         "capabilities": ["completion", "tools"]}  # (a live server's answer for smollm2, tools added)


@pytest.fixture(scope="module")
def show_stub():
    """A stand-in tokenpool server serving one model, `smollm2`; records what /api/show was asked."""
    asked = []

    class Handler(JsonHandler):
        def do_GET(self):
            if self.path == "/v1/models/smollm2":
                self._json(200, {"id": "smollm2"})
            elif self.path == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": "smollm2", "object": "model"}]})
            else:
                name = self.path.rsplit("/", 1)[-1]
                self._json(404, {"error": {"message": f"The model `{name}` does not exist.", "code": "model_not_found"}})

        def do_POST(self):
            asked.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            self._json(200, SHOWN)

    with stub_server(Handler) as url:
        yield url, asked


def test_show_lays_out_the_model_as_ollama_show(show_stub):
    url, asked = show_stub
    r = CliRunner().invoke(app, ["show", "smollm2:latest", "--url", url])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines() == ["  Model", "    architecture        llama", "    context length      8192",
                                     "    embedding length    576", "    format              safetensors", "",
                                     "  Capabilities", "    completion", "    tools"], r.output
    assert asked[-1] == {"model": "smollm2"}  # (NAME:latest as the server names it)
    r = CliRunner().invoke(app, ["show", "smollm2", "--template", "--url", url])
    assert (r.exit_code, r.output) == (0, "{{ messages }}\n"), r.output


def test_show_of_a_model_not_served_is_one_line(show_stub):
    url, _ = show_stub
    r = CliRunner().invoke(app, ["show", "nosuch", "--url", url])
    assert (r.exit_code, r.output) == (1, 'tokenpool show: model "nosuch" not found; served: smollm2\n'), r.output


def test_pull_of_a_model_served_already_succeeds(show_stub):
    """`tokenpool pull smollm2` as `ollama pull` before `ollama run`: the server has it, so it is there (exit 0, as
    the server's own /api/pull answers); a model it does not serve is still the how-to, exit 2."""
    url, _ = show_stub
    r = CliRunner().invoke(app, ["pull", "smollm2:latest", "--url", url])
    assert (r.exit_code, r.output) == (0, f"smollm2:latest: served by {url} already (as smollm2); tokenpool "
                                          "downloads nothing\n"), r.output
    r = CliRunner().invoke(app, ["pull", "nosuch", "--url", url], env={"COLUMNS": "200"})
    assert r.exit_code == 2 and "tokenpool pull: tokenpool downloads nothing" in r.output, r.output


def test_show_piped_into_a_reader_that_stops_early_exits_0_quietly(show_stub):
    """`tokenpool show MODEL | true` (a reader gone before it reads): no error, exit 0 and nothing on stderr, as `ls`,
    `ps` and `run` (it exited 1); and `--template | head -1` (a long template, the reader gone after one line)."""
    import subprocess
    import sys

    url, _ = show_stub
    SHOWN["template"] = "{{ messages }}\n" * 20000  # (more than a pipe's buffer)
    try:
        for args, lines in (([], 0), (["--template"], 1)):
            p = subprocess.Popen([sys.executable, "-m", "controller.cli", "show", "smollm2", *args, "--url", url],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(lines):
                p.stdout.readline()
            p.stdout.close()  # (as `true`, or `head -1` after its line)
            _, err = p.communicate(timeout=60)
            assert (p.returncode, err.decode()) == (0, ""), args
    finally:
        SHOWN["template"] = "{{ messages }}"
