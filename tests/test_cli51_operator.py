"""`tokenpool operator` without kopf installed (a server's install, `pip install -e .`): one line naming the extra,
exit 2, as `suite` says its missing extra; it was a usage box, "Invalid value: the operator needs kopf ...", though
no option's value was wrong."""

from __future__ import annotations

import sys

from typer.testing import CliRunner

from controller.cli import app


def test_operator_without_kopf_says_the_extra_in_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "kopf", None)  # (import kopf: ImportError, as where it is not installed)
    r = CliRunner().invoke(app, ["operator"], env={"COLUMNS": "200"})
    assert r.exit_code == 2 and r.output.count("\n") == 1 and r.output.startswith(
        "tokenpool operator: needs kopf and kubernetes: pip install 'tokenpool[operator]'"), r.output
