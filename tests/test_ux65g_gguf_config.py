"""A configuration's `models[].path` may be a `.gguf` file (a llama-swap user's models are GGUF files): it is served
as `tokenpool serve FILE.gguf` serves one (the same conversion, once, into the same cache folder; converted after the
bind), where it was refused with "give the model's directory". `tokenpool config check` checks the file's first bytes
and architecture and says that `serve` converts it, without converting it. And a first run's log (stderr to a file)
has no progress bar: the conversion's tqdm bar is drawn at a terminal only, where it wrote every update into the log.
The served configuration (its GGUF and the same file on the command line, one server, one conversion) is
asserted by tests/test_real_model.py's test_serve_a_gguf_file, in the server it starts for that file."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

import load_tests.live_server as live_server
from controller import real_model, shutdown
from controller.cli import app
from controller.config import REAL_MODEL
from tests.test_ux56_cli_gguf_after_bind import gguf  # noqa: F401 - the stand-in conversion, a fixture


def _config(tmp_path: Path, path: Path, extra: str = "") -> Path:
    (cfg := tmp_path / "c.yaml").write_text(f"models:\n  - name: smol\n    path: {path}\n{extra}")
    return cfg


def test_config_check_says_serve_converts_it_and_refuses_a_file_that_is_no_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENPOOL_CACHE", str(tmp_path / "cache"))
    smol = real_model.find_gguf(tmp_path)
    r = CliRunner().invoke(app, ["config", "check", str(cfg := _config(tmp_path, smol))])
    folder = real_model.gguf_folder(smol.resolve(), tmp_path / "cache")
    assert (r.exit_code, r.output.splitlines()[1:]) == (0, [
        f"model 'smol': {smol.resolve()} is a GGUF file, not converted yet: `tokenpool serve` converts it once, after "
        f"it binds its port, to a safetensors folder at {folder}, and checks that folder then"]), r.output
    assert not folder.exists()  # (the check converts nothing: minutes for a 7B)

    (bad := tmp_path / "bad.gguf").write_text("not a gguf")
    r = CliRunner().invoke(app, ["config", "check", str(cfg := _config(tmp_path, bad))])
    assert (r.exit_code, " ".join(r.output.split())) == (2, (
        f"tokenpool config check: config {cfg}: models.0.path: model 'smol': {bad} cannot be converted: it is not a "
        "GGUF file (it does not begin with GGUF)")), r.output

    # a GGUF of an architecture the engine does not run: said from its header, before minutes of conversion (a
    # GGUF v3 header of no tensor and one key, general.architecture)
    key, arch = b"general.architecture", b"gemma3"
    (gemma := tmp_path / "gemma.gguf").write_bytes(
        b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key + struct.pack("<IQ", 8, len(arch))
        + arch)
    r = CliRunner().invoke(app, ["config", "check", str(cfg := _config(tmp_path, gemma))])
    assert (r.exit_code, " ".join(r.output.split())) == (2, (
        f"tokenpool config check: config {cfg}: models.0.path: model 'smol': {gemma}: architecture 'gemma3' (its "
        "general.architecture) is not supported; supported: llama, qwen2, qwen3, mistral")), r.output


def test_a_configs_gguf_is_converted_after_the_bind_then_bounds_its_context(tmp_path, monkeypatch, gguf):  # noqa: F811
    """As `tokenpool serve FILE.gguf` (tests/test_ux56_cli_gguf_after_bind.py, whose stand-in conversion `gguf`
    this is): nothing converted before the bind, the model served from the conversion's folder, converted once the
    server listens; the configuration's engine.max_model_len then bounded by the converted config.json's positions."""
    f, made = gguf
    seen = {}

    def run(cfg, prepare=None, tenants=None):
        seen["before"] = (list(made), [(m.name, m.path) for m in cfg.models])
        prepare()
        seen["max_model_len"] = cfg.models[0].engine.max_model_len
        return 0

    monkeypatch.setattr(shutdown, "run", run)
    cfg = _config(tmp_path, f, "    engine: {max_model_len: 4096}\n")
    r = CliRunner().invoke(app, ["serve", "--config", str(cfg), "--port", "0"])
    assert r.exit_code == 0, r.output
    assert seen["before"] == ([], [("smol", str(real_model.gguf_folder(f, tmp_path / "cache")))])
    assert made == ["tiny-chat.gguf"] and seen["max_model_len"] == 2048


def test_a_first_runs_conversion_writes_no_bar_into_a_log(tmp_path):
    """The first run's child making the default's models (`python -m controller.model_factory`, whose stderr is the
    server's) with stderr to a file: the conversion's start line, and no progress bar (transformers' tqdm bar wrote
    ~6 updates joined by carriage returns, hundreds for a 7B)."""
    out = tmp_path / REAL_MODEL
    with open(tmp_path / "err.log", "wb") as err:
        p = subprocess.run([sys.executable, "-m", "controller.model_factory", f"{REAL_MODEL}={out}"],
                           cwd=live_server.REPO_ROOT, stdout=subprocess.DEVNULL, stderr=err, timeout=240)
    log = (tmp_path / "err.log").read_text()
    assert p.returncode == 0 and real_model.converted(out), log
    assert "\r" not in log and "de-quantizing" not in log, log
    assert [line.split(" ", 2)[2] for line in log.splitlines()] == [
        f"tokenpool.real_model WARNING converting {real_model.GGUF_NAME} to a safetensors folder at {out} (once)"], log
