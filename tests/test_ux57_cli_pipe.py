"""Any command's output, its help included, piped into a reader that has gone (`tokenpool --help | head -1`): the
command ends quietly, exit 0, as `git --help | head -1` does. typer exited 1 (rich, which writes the help, ends the
process itself on a broken pipe); commands other than the listings (ls, ps, show, run) exited 1 too."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from load_tests.live_server import REPO_ROOT


def _into_a_closed_pipe(*args: str) -> tuple[int, str]:
    """The command run with its stdout a pipe whose reader is gone (as after `head -1` took its line): every write
    fails with EPIPE, whatever the timing."""
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([sys.executable, "-m", "controller.cli", *args], cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                           stdout=w, stderr=subprocess.PIPE, timeout=30,
                           env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "80"})
    finally:
        os.close(w)
    return p.returncode, p.stderr.decode()


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["config", "check", "--help"], ["bench"], ["keys", "new"]])
def test_output_into_a_reader_that_has_gone_ends_quietly_exit_0(args):
    assert _into_a_closed_pipe(*args) == (0, "")


def test_a_usage_error_keeps_its_status():
    code, err = _into_a_closed_pipe("no-such-command")
    assert code == 2 and "No such command" in err
