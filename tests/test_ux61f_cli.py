"""The client commands as a user coming from `ollama` meets them: an empty --url (`--url "$HOST"`, HOST unset) and a
closed stdin (`<&-`, as some job runners start a command) are said in one line, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from load_tests.live_server import REPO_ROOT
from tests.http_stub import sse_chat, stub_server


def cli(*args: str, close_stdin: bool = False, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "controller.cli", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60, stdin=None if close_stdin else subprocess.DEVNULL,
                          # (fd 0 closed in the child, as `tokenpool ... <&-`: Python's sys.stdin is then None)
                          preexec_fn=(lambda: os.close(0)) if close_stdin else None,
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
        r = cli("run", "m", "hi", "--url", url, close_stdin=True)
    assert (r.returncode, r.stdout, r.stderr) == (0, "hello\n", ""), r.stderr[-3000:]
    assert [m["messages"] for m in asked] == [[{"role": "user", "content": "hi"}]]


def test_run_with_stdin_closed_and_no_prompt_says_so():
    r = cli("run", "m", "--url", "http://127.0.0.1:9", close_stdin=True)
    assert (r.returncode, r.stdout, r.stderr) == (1, "", "tokenpool run: the prompt is empty\n"), r.stderr[-3000:]


def test_keys_hash_from_a_closed_stdin_is_a_usage_error():
    r = cli("keys", "hash", "-", close_stdin=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "stdin holds no key" in r.stderr, r.stderr
