"""`tokenpool run MODEL` as a user types at it, and `tokenpool pull`: the commands run as subprocesses (`run` on a
terminal, a pty) against a live server whose keys are checked, as `ollama run`'s users type Ollama's commands."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest

from controller.keys import hash_key
from load_tests.live_server import REPO_ROOT, LiveServer, terminal_signals

KEY = "key-ux55-cli-0123"


@pytest.fixture(scope="module")
def server(make_varied, tmp_path_factory):
    cfg = {"workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "tenants": [{"name": "user", "key_hashes": [hash_key(KEY)]}],
           "models": [{"name": "tiny", "path": str(make_varied("qwen2")),
                       "engine": {"max_num_seqs": 4, "max_model_len": 96}}]}
    with LiveServer(cfg, tmp_path_factory.mktemp("ux55-cli")) as srv:
        yield srv


def converse(url: str, lines: list[str], *args: str, timeout: float = 60) -> tuple[int, str]:
    """`tokenpool run tiny ARGS` on a terminal: each line typed once the prompt (">>> ") is there, then /bye; the exit
    status and what the terminal showed (stdout and stderr both)."""
    leader, follower = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "controller.cli", "run", "tiny", "--url", url, "--api-key", KEY, *args],
                         cwd=REPO_ROOT,
                         stdin=follower, stdout=follower, stderr=follower, preexec_fn=terminal_signals(),
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "TERM": "dumb"})
    os.close(follower)
    shown, typed = b"", 0
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if shown.count(b">>> ") > typed:  # (a prompt waits for the next line)
                os.write(leader, ((lines + ["/bye"])[typed] + "\n").encode())
                typed += 1
            ready, _, _ = select.select([leader], [], [], 0.2)
            if ready:
                try:
                    got = os.read(leader, 65536)
                except OSError:  # (the terminal's other end closed: the command ended)
                    break
                if not got:
                    break
                shown += got
            elif p.poll() is not None:
                break
        return p.wait(timeout=10), shown.decode(errors="replace")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(leader)


def test_num_predict_minus_one_is_no_limit_as_ollamas(server):
    """`/set parameter num_predict -1` is Ollama's "no limit" (its default; -2: up to the context): it was sent as
    max_tokens -1, and every turn after it was "error: max_tokens: Input should be greater than or equal to 1" until
    the conversation was left. Now the reply's room is the model's, as with no --max-tokens (the --max-tokens given
    is lifted); num_predict 0 is refused when set, not at every turn."""
    rc, shown = converse(server.url, ["/set verbose", "/set parameter num_predict -1", "hi",
                                      "/set parameter num_predict 0", "/set parameter num_predict 3", "/clear", "hi"],
                         "--max-tokens", "2", "--temperature", "0")
    assert rc == 0, shown
    assert "Set parameter 'num_predict' to '-1'" in shown and "error:" not in shown, shown
    assert "Couldn't set parameter: num_predict takes a whole number of at least 1, or -1 (no limit)" in shown
    counts = [int(n) for n in re.findall(r"(?<!prompt )eval count:\s+(\d+) token", shown)]
    assert len(counts) == 2 and counts[0] > 3 and counts[1] == 3, shown  # (-1: past --max-tokens 2; then 3)


def tokenpool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "controller.cli", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "TOKENPOOL_API_KEY": ""})


def test_pull_without_the_key_says_so(server):
    """`tokenpool pull MODEL` to a server that checks keys, without one (or with a wrong one): it said "tokenpool
    downloads nothing: 'tiny' is not a Hugging Face repo id ... hf download ...", exit 2, as if the model were not
    served; it is the server's 401 now, in one line, exit 1, as `run` and `ls` say it. With the key: served already
    (exit 0); a model not served: how one gets there (exit 2)."""
    for key in ([], ["--api-key", "wrong-key-0123"]):
        r = tokenpool("pull", "tiny", "--url", server.url, *key)
        assert r.returncode == 1 and r.stdout == "", r
        assert r.stderr.startswith("tokenpool pull: ") and "API key" in r.stderr, r.stderr
        assert "downloads nothing" not in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = tokenpool("pull", "tiny", "--url", server.url, "--api-key", KEY)
    assert r.returncode == 0 and "served by" in r.stdout and "already" in r.stdout, r
    r = tokenpool("pull", "nope", "--url", server.url, "--api-key", KEY)
    assert r.returncode == 2 and "tokenpool downloads nothing" in r.stderr, r


def test_models_and_chat_are_the_commands_a_user_types_first(server):
    """`tokenpool models` answered "No such command 'models'. Did you mean 'make-model'?" (a command that writes
    random weights) and `tokenpool chat MODEL` "No such command 'chat'": they are `ls` and `run` now, hidden as
    `list` is (the help lists each command once)."""
    listed = tokenpool("ls", "--url", server.url, "--api-key", KEY)
    assert listed.returncode == 0 and "tiny" in listed.stdout, listed
    r = tokenpool("models", "--url", server.url, "--api-key", KEY)
    assert (r.returncode, r.stdout, r.stderr) == (0, listed.stdout, ""), r
    r = tokenpool("chat", "tiny", "hi", "--url", server.url, "--api-key", KEY, "--max-tokens", "2")
    assert r.returncode == 0 and r.stdout.strip() and r.stderr == "", r
    shown = tokenpool("--help").stdout
    listed_commands = re.findall(r"^│ (\S+) ", shown, re.M)
    assert "run" in listed_commands and "ls" in listed_commands, shown
    assert "chat" not in listed_commands and "models" not in listed_commands, shown
