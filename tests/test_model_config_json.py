"""`ModelConfig.from_json` (config.json read as it says, without transformers' config classes) against `from_hf` of
transformers' own reading of the same file: equal wherever it answers, and it answers for the checkpoints transformers
saves (the factory's, SmolLM2's); where the file leaves a value to a class's default, or transformers rewrites it, it
gives way to transformers (None), and `from_pretrained` is transformers' reading either way."""

from __future__ import annotations

import json

import pytest

from model_swapper.model_config import ModelConfig
from tokenpool.models import SUPPORTED_ARCHS

# SmolLM2-135M-Instruct's config.json as tokenpool's GGUF conversion writes it (transformers' save_pretrained)
SMOLLM2 = {
    "_model_name_or_path": "Smollm2 135M 8k Lc100K Mix1 Ep2", "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 1, "dtype": "float32", "eos_token_id": 2, "head_dim": 64, "hidden_act": "silu",
    "hidden_size": 576, "initializer_range": 0.02, "intermediate_size": 1536, "max_position_embeddings": 8192,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30,
    "num_key_value_heads": 3, "pad_token_id": 2, "pretraining_tp": 1, "rms_norm_eps": 9.999999747378752e-06,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}, "tie_word_embeddings": True,
    "transformers_version": "5.25.0", "unk_token_id": 0, "use_cache": True, "vocab_size": 49152,
}


def _hf(d, raw: dict, generation: dict | None = None) -> ModelConfig | None:
    """transformers' reading of `raw` written into `d` (None where transformers refuses it)."""
    from transformers import AutoConfig

    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(raw))
    if generation is not None:
        (d / "generation_config.json").write_text(json.dumps(generation))
    try:
        return ModelConfig.from_hf(AutoConfig.from_pretrained(str(d)), d)
    except Exception:  # noqa: BLE001 (transformers' refusals: ValueError, TypeError, huggingface_hub's validation)
        return None


def _json(raw: dict, d) -> ModelConfig | None:
    """The JSON reader's answer; None also where it refuses the model as the engine's reader does (ValueError)."""
    try:
        return ModelConfig.from_json(raw, d)
    except ValueError:
        return None


def _variants(base: dict):
    """(name, config.json, generation_config.json or None): `base`, each key it names left out, and rewrites."""
    yield "as saved", base, None
    for k in sorted(base):
        if k not in ("model_type", "architectures"):
            yield f"without {k}", {kk: v for kk, v in base.items() if kk != k}, None
    theta = (base.get("rope_parameters") or {}).get("rope_theta", base.get("rope_theta", 10000.0))
    flat = {k: v for k, v in base.items() if k != "rope_parameters"}
    yield "rope_theta at the top", flat | {"rope_theta": theta}, None
    yield "llama3 rope_scaling", flat | {"rope_theta": theta, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 1024}}, None
    yield "linear rope_scaling (old key 'type')", flat | {"rope_scaling": {"type": "linear", "factor": 2.0}}, None
    yield "yarn rope_parameters", base | {"rope_parameters": {
        "rope_type": "yarn", "rope_theta": theta, "factor": 4.0, "original_max_position_embeddings": 1024}}, None
    yield "head_dim null", base | {"head_dim": None}, None
    yield "head_dim other than hidden/heads", base | {"head_dim": 2 * base["hidden_size"] // base["num_attention_heads"]}, None
    yield "num_key_value_heads null", base | {"num_key_value_heads": None}, None
    yield "sliding window on", base | {"use_sliding_window": True, "sliding_window": 64}, None
    yield "sliding window on, its size left out", {k: v for k, v in base.items() if k != "sliding_window"} | {
        "use_sliding_window": True}, None
    yield "sliding window null", base | {"sliding_window": None}, None
    yield "torch_dtype (older files)", {k: v for k, v in base.items() if k != "dtype"} | {"torch_dtype": "bfloat16"}, None
    yield "dtype bfloat16", base | {"dtype": "bfloat16"}, None
    yield "eos a list", base | {"eos_token_id": [base["eos_token_id"], 0]}, None
    yield "eos null", base | {"eos_token_id": None}, None
    yield "generation_config's eos", base, {"eos_token_id": [7, 8]}
    yield "attention_bias on", base | {"attention_bias": True}, None
    yield "gelu", base | {"hidden_act": "gelu"}, None
    yield "tied off", base | {"tie_word_embeddings": False}, None
    yield "a float size", base | {"hidden_size": float(base["hidden_size"])}, None
    yield "auto_map", base | {"auto_map": {"AutoConfig": "x.Config"}}, None


def _bases(make_tiny):
    for arch in SUPPORTED_ARCHS:
        yield arch, json.loads((make_tiny(arch) / "config.json").read_text())
    yield "smollm2", SMOLLM2


def test_the_json_reader_equals_transformers_wherever_it_answers(make_tiny, tmp_path):
    answered = refused = 0
    for name, base in _bases(make_tiny):
        for i, (what, raw, gen) in enumerate(_variants(base)):
            d = tmp_path / f"{name}-{i}"
            ref = _hf(d, raw, gen)
            fast = _json(raw, d)
            if what == "as saved":
                assert fast is not None, f"{name}: a saved checkpoint's config.json is read without transformers"
            if ref is None:
                assert fast is None, f"{name}, {what}: transformers refuses it, the JSON reader gave {fast}"
                continue
            assert fast is None or fast == ref, f"{name}, {what}:\n json {fast}\n hf   {ref}"
            assert ModelConfig.from_pretrained(d) == ref, f"{name}, {what}"
            answered += fast is not None
            refused += fast is None
    assert answered > 30 and refused > 30  # (both readers' sides were taken)


def test_a_saved_checkpoint_is_read_without_transformers_config_classes(make_tiny, tmp_path):
    """The point of the JSON reader: a worker reading its models' configs imports no architecture's config module
    (llama's imports transformers' activations and with them torch.distributed.tensor, ~0.9 s of a core)."""
    import subprocess
    import sys

    d = tmp_path / "smollm2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(SMOLLM2))
    code = ("import sys; from model_swapper.model_config import ModelConfig as M; "
            f"[M.from_pretrained(p) for p in {[str(make_tiny(a)) for a in SUPPORTED_ARCHS] + [str(d)]!r}]; "
            "print(sorted(m for m in sys.modules if m.startswith('transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip() == "[]", out


@pytest.mark.parametrize("bad", ["[1, 2]", "not json"])
def test_a_config_json_not_an_object_is_transformers_error(tmp_path, bad):
    (tmp_path / "config.json").write_text(bad)
    with pytest.raises((OSError, ValueError)):
        ModelConfig.from_pretrained(tmp_path)
