"""`tokenpool config check FILE`: a configuration checked as `tokenpool serve --config FILE` checks it, without
starting a server (there was no way short of starting one): a summary and exit 0, or the first problem in one line
and exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from controller.cli import app


def _check(path: Path):
    return CliRunner().invoke(app, ["config", "check", str(path)], env={"COLUMNS": "300"})


def test_a_good_configuration_is_summed_up(tmp_path, tiny_model):
    f = tmp_path / "c.yaml"
    f.write_text(f"listen: {{port: 18230}}\nmodels:\n  - name: tiny\n    path: {tiny_model}\n    aliases: [t]\n")
    r = _check(f)
    assert (r.exit_code, r.output) == (0, f"config {f}: ok: models tiny; listens on 127.0.0.1:18230; auth OFF (every "
                                          "caller may use every model)\n"), r.output


@pytest.mark.parametrize(("text", "said"), [
    ("models:\n  - name: m\n    path: MODEL\n    bogus: 1\n", "models.0: unknown key 'bogus'"),
    ("models:\n  - name: m\n    path: /nonexistent/m\n", "models.0.path: model 'm': path /nonexistent/m does not exist"),
    ("models: [\n", "not valid YAML at line 2, column 1"),
    ("workers: {local: [0, 0]}\n", "workers.local: GPU 0 is given twice"),
])
def test_a_bad_configuration_is_one_line_and_exit_2(tmp_path, tiny_model, text, said):
    f = tmp_path / "c.yaml"
    f.write_text(text.replace("MODEL", str(tiny_model)))
    r = _check(f)
    assert r.exit_code == 2 and r.output.startswith(f"tokenpool config check: config {f}: {said}") and \
        r.output.count("\n") == 1, r.output


def test_no_file_is_said(tmp_path):
    r = _check(tmp_path / "none.yaml")
    assert (r.exit_code, r.output) == (2, f"tokenpool config check: config {tmp_path / 'none.yaml'}: no such file\n")
