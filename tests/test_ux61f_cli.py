"""The client commands as a user coming from `ollama` meets them: an empty --url (`--url "$HOST"`, HOST unset) and a
closed stdin (`<&-`, as some job runners start a command) are said in one line, never a traceback; a closed stderr
(`2>&-`) or stdout (`>&-`) loses nothing but what would have gone there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from load_tests.live_server import REPO_ROOT, LiveServer
from tests.http_stub import sse_chat, stub_server


def cli(*args: str, close: int | None = None, **env: str) -> subprocess.CompletedProcess:
    """`tokenpool ARGS`; `close`: a descriptor (0, 1 or 2) closed in the child, as `tokenpool ... <&-` (`>&-`,
    `2>&-`) starts it: Python's sys.stdin (stdout, stderr) is then None. What the others got is captured."""
    pipes = {"stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    if close is not None:
        pipes[("stdin", "stdout", "stderr")[close]] = None
    return subprocess.run([sys.executable, "-m", "controller.cli", *args], cwd=REPO_ROOT, text=True, timeout=60,
                          **pipes, preexec_fn=None if close is None else (lambda: os.close(close)),
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **env})


@pytest.mark.parametrize("args", [["ls"], ["ps"], ["run", "m", "hi"], ["stop", "m"], ["show", "m"], ["pull", "m"]],
                         ids=lambda a: a[0])
def test_an_empty_url_is_a_usage_error_naming_it(args):
    """`--url ""` was None to the client commands: base_url's TypeError, a traceback (`suite`'s --url, the same
    callback, took it as no --url at all and started its own paced server; not run here, as it would start one)."""
    r = cli(*args, "--url", "")
    assert r.returncode == 2 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-3000:])
    assert "Invalid value for '--url'" in r.stderr and "empty" in r.stderr, r.stderr


def test_an_empty_tokenpool_url_is_the_default_as_an_empty_ollama_host_is():
    r = cli("ls", TOKENPOOL_URL="")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.startswith("tokenpool ls: cannot reach http://127.0.0.1:8000"), r.stderr


def test_run_with_stdin_closed_sends_the_prompt():
    """`tokenpool run M PROMPT <&-`: AttributeError ('NoneType' object has no attribute 'isatty'), a traceback; the
    prompt is the whole message, nothing being piped in."""
    asked: list[dict] = []
    with stub_server(sse_chat(asked, [{"choices": [{"delta": {"content": "hello"}}]}])) as url:
        r = cli("run", "m", "hi", "--url", url, close=0)
    assert (r.returncode, r.stdout, r.stderr) == (0, "hello\n", ""), r.stderr[-3000:]
    assert [m["messages"] for m in asked] == [[{"role": "user", "content": "hi"}]]


def test_run_with_stdin_closed_and_no_prompt_says_so():
    r = cli("run", "m", "--url", "http://127.0.0.1:9", close=0)
    assert (r.returncode, r.stdout, r.stderr) == (1, "", "tokenpool run: the prompt is empty\n"), r.stderr[-3000:]


def test_keys_hash_from_a_closed_stdin_is_a_usage_error():
    r = cli("keys", "hash", "-", close=0)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "stdin holds no key" in r.stderr, r.stderr


@pytest.mark.parametrize("verbose", [[], ["--verbose"]], ids=["plain", "verbose"])
def test_run_with_stderr_closed_still_prints_the_reply(verbose):
    """`tokenpool run M PROMPT 2>&-` printed nothing, exit 1: the spinner's `sys.stderr.isatty()` (None's
    AttributeError) ended it before the reply, its traceback lost with stderr. The reply is printed (--verbose's
    timings, stderr's, go nowhere)."""
    asked: list[dict] = []
    with stub_server(sse_chat(asked, [{"choices": [{"delta": {"content": "hello"}}]}])) as url:
        r = cli("run", "m", "hi", "--url", url, *verbose, close=2)
    assert (r.returncode, r.stdout) == (0, "hello\n")
    assert len(asked) == 1


def test_run_with_stdout_closed_ends_quietly_as_ls_does():
    """`tokenpool run M PROMPT >&-` was AttributeError ('NoneType' object has no attribute 'write'), a traceback,
    exit 1, once the first text came; the reply goes nowhere, exit 0, as `tokenpool ls >&-` ends (click's echo
    drops its lines)."""
    asked: list[dict] = []
    with stub_server(sse_chat(asked, [{"choices": [{"delta": {"content": "hello"}}]}])) as url:
        r = cli("run", "m", "hi", "--url", url, close=1)
    assert (r.returncode, r.stderr) == (0, ""), r.stderr[-3000:]


THINKING_TEMPLATE = (  # (tests/test_ux60b_thinking_budget.py's: the prompt opens the think block, as Qwen3's)
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else %}{{- '<think>\\n' }}{%- endif %}{%- endif %}")


@pytest.fixture(scope="module")
def server(tiny_model, make_varied, tmp_path_factory):
    """One live server for the file's tests of it: `tiny` (the tiny model) and `think` (a varied tiny model whose
    template opens a think block, as Qwen3's), its admin token file in a cache of its own (TOKENPOOL_CACHE)."""
    import shutil

    work = tmp_path_factory.mktemp("ux61f")
    think = work / "think"
    shutil.copytree(make_varied("qwen2"), think)
    (think / "chat_template.jinja").write_text(THINKING_TEMPLATE)
    with LiveServer(None, work / "srv", args=[str(tiny_model), str(think), "--served-model-name", "tiny", "think"],
                    env={"TOKENPOOL_CACHE": str(work / "cache")}) as srv:
        yield srv


def test_ps_and_stop_at_the_listening_url_of_a_server_on_every_interface(server):
    """A server on 0.0.0.0 logs `listening on http://0.0.0.0:PORT`; `tokenpool ps --url` that URL (and `stop`) got
    401 "admin token required", naming the file that server had written its token to, while `--url :PORT` worked:
    the token file was read for 127.0.0.1, localhost and ::1 only. 0.0.0.0 reaches this machine as they do (the
    server here listens on 127.0.0.1, which a connection to 0.0.0.0 reaches on Linux, as one to 0.0.0.0's server)."""
    cache = server.extra_env["TOKENPOOL_CACHE"]
    assert (Path(cache) / f"admin-token-{server.port}").is_file()
    env = {"TOKENPOOL_CACHE": cache, "TOKENPOOL_ADMIN_TOKEN": ""}  # (unset: an empty variable is click's unset)
    shown = cli("ps", "--url", f"http://0.0.0.0:{server.port}", **env)
    stopped = cli("stop", "tiny", "--url", f"0.0.0.0:{server.port}", **env)
    assert shown.returncode == 0 and shown.stdout.startswith("NAME"), shown.stderr[-3000:]
    assert "tiny" in shown.stdout.splitlines()[1], shown.stdout
    assert stopped.returncode == 0 and stopped.stdout.startswith("tiny: "), stopped.stderr[-3000:]


def test_run_verbose_shows_a_thinking_models_thinking(server):
    """`tokenpool run --verbose` reads the server's Ollama /api/chat, which gives a thinking model's thinking apart
    (`message.thinking`); read as `content` alone, a reply that was all thinking (the block still open at
    --max-tokens) printed a blank line where `run` without --verbose printed its text. It is shown as `ollama run`
    shows it: "Thinking...", the thinking, then (once an answer follows) "...done thinking."."""
    import httpx

    asked = {"model": "think", "messages": [{"role": "user", "content": "hi"}], "stream": False,
             "options": {"num_predict": 8, "temperature": 0}}
    said = httpx.post(server.url + "/api/chat", json=asked, timeout=60).json()["message"]
    r = cli("run", "think", "hi", "--max-tokens", "8", "--temperature", "0", "--verbose", "--url", server.url)
    assert said["content"] == "" and said["thinking"], said  # (the reply is all thinking: the case)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout == f"Thinking...\n{said['thinking']}\n", r.stdout
    assert "eval count:           8 token(s)" in r.stderr, r.stderr


def test_a_thought_is_shown_but_not_kept_as_the_turn():
    """The thinking, then the answer: both shown, as `ollama run` prints them; the turn a conversation keeps (what
    `turn` returns) is the answer, as Ollama keeps the thinking apart from the message's content."""
    import http.server
    import io
    import json

    from controller.chat_cli import turn

    lines = [{"message": {"role": "assistant", "content": "", "thinking": "Let me see."}},
             {"message": {"role": "assistant", "content": "", "thinking": " Two."}},
             {"message": {"role": "assistant", "content": "It is 2."}},
             {"message": {"role": "assistant", "content": ""}, "done": True, "total_duration": 5, "eval_count": 3}]

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *a):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["content-length"]))
            self.send_response(200)
            self.send_header("content-type", "application/x-ndjson")
            self.end_headers()
            for x in lines:
                self.wfile.write(json.dumps(x).encode() + b"\n")

    out, stats = io.StringIO(), io.StringIO()
    with stub_server(Handler) as url:
        kept = turn(url, None, {"model": "m", "messages": [{"role": "user", "content": "1+1?"}]}, out, stats)
    assert out.getvalue() == "Thinking...\nLet me see. Two.\n...done thinking.\n\nIt is 2.\n"
    assert kept == "It is 2."


def test_the_token_file_is_read_for_every_interface_address_not_another_host(tmp_path, monkeypatch):
    """config.local_admin_token, as `suite` and `bench serve` read it too (not only `ps`/`stop`): the URL a server on
    every interface logs (0.0.0.0, ::) reaches this machine, so its run's token file is read for it; never for
    another host, where the token would be sent."""
    from controller import config

    monkeypatch.setattr(config, "cache_dir", lambda: tmp_path)
    config.admin_token_file(8123).write_text("tok-8123\n")
    for url in ("http://0.0.0.0:8123", "http://[::]:8123", "http://127.0.0.1:8123", "http://localhost:8123"):
        assert config.local_admin_token(url) == "tok-8123", url
    for url in ("http://10.0.0.7:8123", "http://example.com:8123", "http://0.0.0.0:8124"):
        assert config.local_admin_token(url) is None, url
