"""`tokenpool serve FILE.gguf` converts the file after the port is bound, as the embedded default makes its models:
/health answers "starting" meanwhile and requests wait (tests/test_ctl53_health_while_starting.py has that served
start-up), where the port refused connections for the conversion's seconds (minutes for a 7B). What reads the
converted config (--max-model-len against the model's positions, the models' checks) runs after it; its refusal is
the start-up's StartupError (logged in one line, exit 2). A file that is no GGUF is still refused before the bind."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from controller import real_model, shutdown
from controller.cli import app
from controller.startup import StartupError


@pytest.fixture
def gguf(tmp_path, monkeypatch):
    """A .gguf file (its first bytes) whose conversion writes a llama config of 2048 positions; `made` records
    conversions."""
    monkeypatch.setenv("TOKENPOOL_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "tiny-chat.gguf"
    f.write_bytes(b"GGUF" + bytes(60))
    made = []

    def ensure_gguf(path, cache):
        out = real_model.gguf_folder(path, cache)
        if (out / real_model.MARKER).exists():  # (converted before: as the real one)
            return out
        out.mkdir(parents=True)
        (out / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 2048}))
        (out / real_model.MARKER).write_text("{}")
        made.append(path.name)
        return out

    monkeypatch.setattr(real_model, "ensure_gguf", ensure_gguf)
    return f, made


def test_a_gguf_file_is_converted_after_the_bind(gguf, monkeypatch, tmp_path, caplog):
    f, made = gguf
    seen = {}

    def run(cfg, prepare=None, tenants=None):
        seen["made_before"] = list(made)
        seen["models"] = [(m.name, m.path) for m in cfg.models]
        prepare()
        return 0

    monkeypatch.setattr(shutdown, "run", run)
    r = CliRunner().invoke(app, ["serve", str(f), "--port", "0"])
    assert r.exit_code == 0, r.output
    assert seen["made_before"] == [] and made == ["tiny-chat.gguf"], seen
    folder = real_model.gguf_folder(f, tmp_path / "cache")
    assert seen["models"] == [("tiny-chat", str(folder))]

    # converted once: a second start finds it in the cache and checks it before the bind, as any model folder
    made.clear()
    r = CliRunner().invoke(app, ["serve", str(f), "--port", "0", "--max-model-len", "4096"])
    assert r.exit_code == 2 and made == [], r.output
    assert "--max-model-len 4096 is more than model 'tiny-chat' takes: 2048 tokens" in caplog.text


def test_max_model_len_is_checked_once_the_conversion_is_made(gguf, monkeypatch):
    f, made = gguf
    seen = {}

    def run(cfg, prepare=None, tenants=None):
        seen["made_before"] = list(made)
        with pytest.raises(StartupError) as e:
            prepare()
        seen["refused"] = str(e.value)
        return 2

    monkeypatch.setattr(shutdown, "run", run)
    r = CliRunner().invoke(app, ["serve", str(f), "--port", "0", "--max-model-len", "4096"])
    assert r.exit_code == 2, r.output
    assert seen["made_before"] == [] and made == ["tiny-chat.gguf"]
    assert seen["refused"] == ("--max-model-len 4096 is more than model 'tiny-chat' takes: 2048 tokens "
                               "(max_position_embeddings in its config.json)")


def test_a_file_that_is_no_gguf_is_refused_before_the_bind(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENPOOL_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "notes.gguf"
    bad.write_text("not a gguf")
    monkeypatch.setattr(shutdown, "run", lambda *a, **k: pytest.fail("bound"))
    r = CliRunner().invoke(app, ["serve", str(bad), "--port", "0"])
    assert r.exit_code == 2
    assert f"{bad} cannot be converted: it is not a GGUF file" in " ".join(r.output.split()), r.output
