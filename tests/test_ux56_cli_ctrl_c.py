"""Ctrl-C in the first moments of a command, while typer, rich and click import and typer builds the command: the
console script ends quietly with status 130, as typer ends a command stopped later (it printed a traceback from
whichever import it stopped)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from load_tests.live_server import REPO_ROOT, terminal_signals

# The console script as pip writes it, with a SIGINT sent to itself the moment MODULE is first imported (as a
# Ctrl-C typed at that instant arrives)
SCRIPT = """
import os, signal, sys

class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, CtrlC())
from controller.cli_main import main
sys.argv[0] = "tokenpool"
sys.exit(main())
"""


def test_the_console_script_is_cli_main():
    scripts = (REPO_ROOT / "pyproject.toml").read_text().partition("[project.scripts]")[2]
    assert re.search(r'^tokenpool = "controller.cli_main:main"$', scripts, re.M), scripts[:200]


@pytest.mark.parametrize("module", ["typer", "rich.console", "controller.ps"])
def test_ctrl_c_while_the_cli_imports_exits_130_without_a_traceback(module):
    # (SIGINT as a terminal gives it: a child inherits an ignored SIGINT, and the run that starts it may ignore it)
    r = subprocess.run([sys.executable, "-c", SCRIPT.format(module=module), "--version"], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=60, preexec_fn=terminal_signals())
    assert r.returncode == 130, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "KeyboardInterrupt" not in r.stderr, r.stderr[-2000:]


def test_without_ctrl_c_the_command_runs():
    r = subprocess.run([sys.executable, "-c", SCRIPT.format(module="no.such.module"), "--version"], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("tokenpool "), (r.returncode, r.stdout, r.stderr)
