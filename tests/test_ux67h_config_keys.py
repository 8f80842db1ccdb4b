"""README (Configuration): "unknown keys are errors". `is_default`, the mark the program puts on the embedded
default's configuration, was taken from a YAML file too: `is_default: true` passed `tokenpool config check`, and
`tokenpool serve --config` then printed the default's banner (SmolLM2 and the demo models, which it did not serve),
bound to 127.0.0.1 whatever `listen.host` said, and ran the default's model making. A file's `is_default` is now an
unknown key, said as any other."""

from __future__ import annotations

from typer.testing import CliRunner

from controller.cli import app
from controller.config import ServerConfig, default_config


def _check(path):
    return CliRunner().invoke(app, ["config", "check", str(path)], env={"COLUMNS": "300"})


def test_is_default_in_a_file_is_an_unknown_key(tmp_path, tiny_model):
    f = tmp_path / "c.yaml"
    f.write_text(f"is_default: true\nmodels:\n  - name: tiny\n    path: {tiny_model}\n")
    r = _check(f)
    assert (r.exit_code, r.output) == (2, f"tokenpool config check: config {f}: unknown key 'is_default'\n"), r.output


def test_a_near_miss_is_not_pointed_at_it(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("is_defualt: true\n")
    r = _check(f)
    assert (r.exit_code, r.output) == (2, f"tokenpool config check: config {f}: unknown key 'is_defualt'\n"), r.output


def test_the_embedded_default_keeps_its_mark():
    cfg = default_config()  # (and through serve's --api-key round trip, a dump validated again)
    assert cfg.is_default and ServerConfig.model_validate(cfg.model_dump()).is_default
