"""`tokenpool config check` (and `serve --config`) on a configuration naming a tenant twice says which name, as it
says a model's ("tenant names must be unique" left the user to search a file of many tenants)."""

from __future__ import annotations

from typer.testing import CliRunner

from controller.cli import app


def test_a_tenant_named_twice_is_named(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("tenants:\n  - {name: team-a}\n  - {name: team-b}\n  - {name: team-a}\n")
    r = CliRunner().invoke(app, ["config", "check", str(f)])
    assert r.exit_code == 2
    assert " ".join(r.output.split()) == (f"tokenpool config check: config {f}: tenant names must be unique: team-a "
                                          "more than once"), r.output
