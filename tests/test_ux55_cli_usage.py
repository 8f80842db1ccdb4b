"""The usage line of `tokenpool COMMAND -h` and of a usage error (run here as `python -m controller.cli`), as a new
user reads it: the arguments as the README, click and ollama write them (`tokenpool run [OPTIONS] MODEL
[PROMPT]...`)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from load_tests.live_server import REPO_ROOT


def tokenpool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "controller.cli", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "120"})


@pytest.mark.parametrize("args, usage", [
    (["run"], "run [OPTIONS] MODEL [PROMPT]..."), (["stop"], "stop [OPTIONS] MODEL"), (["show"], "show [OPTIONS] MODEL"),
    (["keys", "hash"], "keys hash [OPTIONS] KEY"), (["config", "check"], "config check [OPTIONS] FILE"),
    (["serve"], "serve [OPTIONS] [MODEL_DIR]...")])
def test_required_arguments_are_written_bare(args, usage):
    """typer 0.29 wrote a required argument in braces, `tokenpool run [OPTIONS] {MODEL} [PROMPT]...`, in the help and
    in every usage error ("Missing argument 'MODEL'"), where the README says `tokenpool run MODEL [PROMPT]` (braces
    read as a set of choices). Optional ones stay in brackets."""
    shown = tokenpool(*args, "--help")
    assert shown.returncode == 0 and f"cli {usage}" in shown.stdout and "{" not in \
        shown.stdout.split("Usage:")[1].splitlines()[0], shown.stdout
    if "[" not in usage.removeprefix(" ".join(args) + " [OPTIONS]"):  # (a required argument left out: usage error)
        missing = tokenpool(*args)
        assert missing.returncode == 2 and f"cli {usage}" in missing.stderr, missing.stderr
