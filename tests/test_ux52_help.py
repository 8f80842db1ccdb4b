"""A group's list of commands (`tokenpool suite -h`, `tokenpool -h`) shows each command's first help paragraph as
one text, wrapped only at the terminal's width: typer (0.29, rich markup) kept the docstring's own line breaks
there, so `suite -h` said "Without" and "--url: three tiny ..." on two rows however wide the terminal."""

from __future__ import annotations

import inspect

from typer.main import get_command
from typer.testing import CliRunner

from controller.cli import app


def test_command_lists_are_not_broken_where_the_docstrings_lines_end():
    for group in (["suite"], ["bench"], []):
        r = CliRunner().invoke(app, [*group, "--help"], env={"COLUMNS": "400"})
        assert r.exit_code == 0, r.output
        cmd = get_command(app)
        for name in group:
            cmd = cmd.commands[name]
        for name, sub in cmd.commands.items():
            if sub.hidden:
                continue
            first = " ".join(inspect.cleandoc(sub.help or "").split("\n\n")[0].split())
            row = next(line for line in r.output.splitlines() if line.lstrip("│ ").startswith(name + " "))
            assert first in " ".join(row.split()), (group, name, row)
