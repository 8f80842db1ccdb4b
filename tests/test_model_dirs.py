"""`tokenpool.models.model_dir_problem`, the check `tokenpool serve` and the admin API make of a model directory
before they accept it (standard library only: the controller process imports neither torch nor transformers), and
the engine's own reader refusing the same architectures."""

from __future__ import annotations

import json

import pytest

from model_swapper.model_config import ModelConfig
from tokenpool.models import SUPPORTED_ARCHS, model_dir_problem


def test_each_problem_is_named_and_a_supported_directory_passes(make_tiny, tmp_path):
    assert model_dir_problem(make_tiny("qwen2")) is None
    assert "does not exist" in model_dir_problem(tmp_path / "nowhere")
    (tmp_path / "weights.safetensors").write_bytes(b"")
    assert "is a file" in model_dir_problem(tmp_path / "weights.safetensors")
    assert "has no config.json" in model_dir_problem(tmp_path)
    cfg = tmp_path / "config.json"
    for text, expect in (("{oops", "cannot be read as JSON"), ("[1, 2]", "architecture None is not supported"),
                         ('{"model_type": "mamba"}', "architecture 'mamba' is not supported; supported: llama"),
                         ("{}", "architecture None")):
        cfg.write_text(text)
        assert expect in model_dir_problem(tmp_path), text
    for arch in SUPPORTED_ARCHS:
        cfg.write_text(json.dumps({"model_type": arch}))
        assert model_dir_problem(tmp_path) is None


def test_the_engine_refuses_what_the_check_refuses(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    assert "architecture 'gpt2' is not supported" in model_dir_problem(tmp_path)
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        ModelConfig.from_pretrained(tmp_path)


def test_the_dtype_names_a_config_may_give_are_the_engines():
    """The configuration checks `engine.dtype` with the standard library's list; it is the engine's own (and "auto")."""
    from model_swapper.model_config import DTYPES
    from tokenpool.models import DTYPE_NAMES

    assert set(DTYPE_NAMES) == {"auto", *DTYPES}


@pytest.mark.parametrize("change, expect", [({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
                                            ({"mlp_bias": True}, "mlp_bias is not supported"),
                                            ({"attention_bias": True}, "attention_bias is not supported")])
def test_an_mlp_the_engine_does_not_run_is_refused_by_the_check_and_the_engine(make_tiny, tmp_path, change, expect):
    """A llama whose MLP is GELU or has biases, or whose o_proj has one: refused by name where it was served through
    SiLU without those biases."""
    cfg = json.loads((make_tiny("llama") / "config.json").read_text()) | change
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert expect in model_dir_problem(tmp_path)
    with pytest.raises(ValueError, match=expect):
        ModelConfig.from_pretrained(tmp_path)
    for act in ("silu", "swish"):
        (tmp_path / "config.json").write_text(json.dumps(cfg | {"hidden_act": act, "mlp_bias": False,
                                                                "attention_bias": False}))
        assert model_dir_problem(tmp_path) is None and ModelConfig.from_pretrained(tmp_path).arch == "llama"
