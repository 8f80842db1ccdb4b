"""`ollama rm` and `ollama show`'s habits in tokenpool's CLI: `tokenpool rm MODEL` says how a server stops serving a
model (it was "No such command 'rm'"), and `tokenpool show` prints a model's parameter count and quantization,
as `ollama show` does, where the server's /api/show gives them."""

from __future__ import annotations

from typer.testing import CliRunner

from controller.chat_cli import render_show
from controller.cli import app


def test_rm_says_what_tokenpool_does_instead():
    r = CliRunner().invoke(app, ["rm", "smollm2"], env={"COLUMNS": "200"})
    assert r.exit_code == 2 and r.output.startswith("tokenpool rm: tokenpool deletes no model files: a running "
                                                    "server stops serving smollm2 with the Remove button"), r.output
    assert "`tokenpool stop smollm2` frees its GPU memory only" in r.output


def test_show_prints_parameters_and_quantization_as_ollama_show():
    got = {"details": {"format": "safetensors", "family": "llama", "quantization_level": "BF16"},
           "model_info": {"general.architecture": "llama", "general.parameter_count": 134_515_008,
                          "llama.context_length": 8192, "llama.embedding_length": 576}, "capabilities": ["completion"]}
    assert render_show(got).splitlines()[:7] == [
        "  Model", "    architecture        llama", "    parameters          134.52M",
        "    context length      8192", "    embedding length    576", "    quantization        BF16",
        "    format              safetensors"]
    got["details"]["parameter_size"] = "135M"  # (the server's own words win)
    got["model_info"]["general.parameter_count"] = 8_030_261_248
    assert "    parameters          135M" in render_show(got)
    del got["details"]["parameter_size"]
    assert "    parameters          8.0B" in render_show(got)


def test_ollama_run_flags_nowordwrap_and_keepalive():
    """`ollama run M --nowordwrap` (replies are never wrapped here: taken) and `--keepalive 5m` (said what sets it
    here, exit 2); both were "No such option"."""
    from tests.http_stub import sse_chat, stub_server

    asked: list[dict] = []
    with stub_server(sse_chat(asked, [{"choices": [{"delta": {"content": "ok"}}]}])) as url:
        r = CliRunner().invoke(app, ["run", "m", "hi", "--nowordwrap", "--url", url], env={"COLUMNS": "200"})
        assert (r.exit_code, r.output) == (0, "ok\n") and asked[0]["messages"] == [{"role": "user", "content": "hi"}]
        r = CliRunner().invoke(app, ["run", "m", "hi", "--keepalive", "5m", "--url", url], env={"COLUMNS": "200"})
    assert r.exit_code == 2 and r.output.startswith("tokenpool run: --keepalive is ollama run's: here how long a "
                                                    "model stays in VRAM once idle is its configuration's keep_alive")
    assert len(asked) == 1


def test_ls_shows_each_models_size_as_ollama_list():
    """`tokenpool ls` said NAME and CONTEXT; `ollama list` users look for SIZE too (from the server's /api/tags;
    "-" for a model it does not size)."""
    import http.server
    import json

    from tests.http_stub import stub_server

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            body = {"/v1/models": {"data": [{"id": "known", "max_model_len": 8192}, {"id": "other"}]},
                    "/api/tags": {"models": [{"name": "known", "size": 538_090_408}]}}[self.path]
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    with stub_server(Handler) as url:
        r = CliRunner().invoke(app, ["ls", "--url", url], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and r.output.splitlines() == [
        "NAME   SIZE       CONTEXT", "known  538.1 MB   8192", "other  -          -"], r.output
