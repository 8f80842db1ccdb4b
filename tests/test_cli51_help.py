"""The help shows a flag bare, as click, ollama and vLLM do: typer (0.29) gave it a type, `--enforce-eager <bool>`,
as if it took a value (`--enforce-eager true` is then 'unexpected extra argument'); options that take one keep it."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from controller.cli import app


def _row(out: str, option: str) -> str:
    return next(line for line in out.splitlines() if re.search(rf"{option}\b", line))


def test_flags_are_shown_without_a_type():
    for args, flags, valued in ((["serve"], ["--enforce-eager", "--no-enable-prefix-caching", "--help"],
                                 ["--max-num-seqs", "--port", "--dtype"]),
                                (["show"], ["--template"], ["--url"]),
                                ([], ["--version"], [])):
        r = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "200"})
        assert r.exit_code == 0, r.output
        for flag in flags:
            assert "<" not in _row(r.output, flag), (flag, _row(r.output, flag))
        for option in valued:
            assert re.search(r"<(int range|str)>", _row(r.output, option)), (option, _row(r.output, option))


def test_no_help_paragraph_breaks_mid_sentence():
    """typer's help keeps the line breaks of a docstring's later paragraphs: `serve -h` said "...demo models, made
    on" and "first run), ..." on two lines, however wide the terminal. Each such paragraph is one line."""
    import inspect

    from typer.main import get_command

    def commands(cmd, path):
        for name, sub in getattr(cmd, "commands", {}).items():
            yield [*path, name], sub
            yield from commands(sub, [*path, name])

    broken = {" ".join(path): p for path, sub in commands(get_command(app), [])
              for p in inspect.cleandoc(sub.help or "").split("\n\n")[1:] if "\n" in p}
    assert not broken, broken


def test_help_command_as_ollama_help():
    """`tokenpool help [COMMAND]`, as `ollama help run` (it was "No such command 'help'"): the help -h prints."""
    env = {"COLUMNS": "120"}
    for args in ([], ["run"], ["bench", "pool"]):
        r, want = (CliRunner().invoke(app, a, env=env) for a in (["help", *args], [*args, "--help"]))
        assert (r.exit_code, r.output) == (0, want.output), (args, r.output)
    r = CliRunner().invoke(app, ["help", "run", "nosuch"], env=env)
    assert (r.exit_code, r.output) == (2, "tokenpool help: no command 'run nosuch' (`tokenpool -h` lists them)\n")
