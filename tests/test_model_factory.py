"""The model factory: HF loads what it writes, features per arch, determinism, sharding, public shapes."""

from __future__ import annotations

import json
from math import prod
from pathlib import Path

import pytest
import torch

from controller import tokenizer_factory as tf
from controller.model_factory import ARCHS, make_model, model_config, tensor_specs


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}


def _make(out: Path, arch: str = "qwen2", size: str = "tiny", **kw) -> Path:
    return make_model(arch=arch, size=size, out=out, **{"seed": 0, "dtype": "fp32", "device": "cpu", "progress": False, **kw})


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_loads_in_hf_and_runs(make_tiny, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    d = make_tiny(arch)
    model, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tok = AutoTokenizer.from_pretrained(d)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello, 世界 🙂"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    vocab = model.config.vocab_size
    assert logits.shape == (1, ids.shape[1], vocab)
    assert torch.isfinite(logits).all()
    assert vocab == len(tok)  # no id without text (random weights sample every row)
    gen = GenerationConfig.from_pretrained(d)
    assert gen.eos_token_id == tok.convert_tokens_to_ids([tf.IM_END, tf.ENDOFTEXT])
    assert (model.config.eos_token_id, model.config.bos_token_id, model.config.pad_token_id) == (
        tok.eos_token_id, tok.bos_token_id, tok.pad_token_id)
    assert (gen.bos_token_id, gen.pad_token_id) == (tok.bos_token_id, tok.pad_token_id)


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_has_the_arch_features(make_tiny, arch):
    from transformers import AutoConfig

    d = make_tiny(arch)
    cfg = AutoConfig.from_pretrained(d)
    names = set(_tensors(d))
    assert cfg.model_type == arch and cfg.max_position_embeddings == 2048
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert cfg.tie_word_embeddings == (arch in ("qwen2", "qwen3"))
    assert ("lm_head.weight" in names) == (arch in ("llama", "mistral"))
    assert ("model.layers.0.self_attn.q_proj.bias" in names) == (arch == "qwen2")
    assert ("model.layers.0.self_attn.q_norm.weight" in names) == (arch == "qwen3")
    if arch == "qwen3":
        assert cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size
    rope = cfg.rope_parameters
    assert (rope["rope_type"] == "llama3") == (arch == "llama")
    if arch == "llama":
        assert rope["factor"] * rope["original_max_position_embeddings"] == cfg.max_position_embeddings
    if arch == "mistral":
        assert cfg.sliding_window == 4096


def test_init_statistics(make_tiny):
    t = _tensors(make_tiny("qwen3"))
    assert torch.equal(t["model.norm.weight"], torch.ones_like(t["model.norm.weight"]))
    assert torch.equal(t["model.layers.1.self_attn.k_norm.weight"], torch.ones(32))
    assert t["model.embed_tokens.weight"].std().item() == pytest.approx(0.02, rel=0.02)


def test_same_seed_same_bytes_other_seed_other_weights(make_tiny, tmp_path):
    a = make_tiny("qwen2")
    assert _files(_make(tmp_path / "again")) == _files(a)
    other = _tensors(_make(tmp_path / "seed1", seed=1))
    for name, t in _tensors(a).items():
        assert torch.equal(t, other[name]) == name.endswith("norm.weight"), name


def test_sharding(make_tiny, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    limit = 150_000
    d = _make(tmp_path / "sharded", "qwen3", max_shard_bytes=limit)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(d.glob("*.safetensors"))
    assert len(shards) > 2 and not (d / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == [p.name for p in shards]
    assert [p.name for p in shards][0] == f"model-00001-of-{len(shards):05d}.safetensors"
    whole = _tensors(make_tiny("qwen3"))
    assert set(index["weight_map"]) == set(whole)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in whole.values())
    for p in shards:  # each shard within the limit, unless it holds one tensor larger than the limit
        held = load_file(p)
        assert sum(t.numel() * t.element_size() for t in held.values()) <= limit or len(held) == 1
    parts = _tensors(d)
    assert all(torch.equal(parts[k], whole[k]) for k in whole)  # drawing does not depend on the file layout
    model, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # a re-run with the same arguments overwrites its own output, leaving no stale shard behind
    _make(d, "qwen3")
    assert sorted(p.name for p in d.glob("*.safetensors")) == ["model.safetensors"]
    assert not (d / "model.safetensors.index.json").exists()


def test_small_is_tens_of_millions(make_tiny):
    from safetensors import safe_open

    for arch in ARCHS:
        n = sum(prod(s) for _, s in tensor_specs(model_config(arch, "small")))
        assert 10e6 < n < 100e6, (arch, n)
    d = make_tiny("qwen2", size="small", dtype="bf16")
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((d / "config.json").read_text())["dtype"] == "bfloat16"


# (arch, size): hidden, layers, heads, kv heads, head_dim, intermediate, vocab, tied, rope theta,
# rope scaling factor (llama3) or None, max positions, public parameter count in billions
PUBLIC = {
    ("qwen2", "0.5b"): (896, 24, 14, 2, 64, 4864, 151936, True, 1e6, None, 32768, 0.49),
    ("qwen2", "1.5b"): (1536, 28, 12, 2, 128, 8960, 151936, True, 1e6, None, 32768, 1.54),
    ("qwen2", "3b"): (2048, 36, 16, 2, 128, 11008, 151936, True, 1e6, None, 32768, 3.09),
    ("qwen2", "7b"): (3584, 28, 28, 4, 128, 18944, 152064, False, 1e6, None, 32768, 7.62),
    ("qwen2", "8b"): (3584, 28, 28, 4, 128, 18944, 152064, False, 1e6, None, 32768, 7.62),
    ("qwen3", "0.5b"): (1024, 28, 16, 8, 128, 3072, 151936, True, 1e6, None, 40960, 0.60),
    ("qwen3", "1.5b"): (2048, 28, 16, 8, 128, 6144, 151936, True, 1e6, None, 40960, 1.72),
    ("qwen3", "3b"): (2560, 36, 32, 8, 128, 9728, 151936, True, 1e6, None, 40960, 4.02),
    ("qwen3", "8b"): (4096, 36, 32, 8, 128, 12288, 151936, False, 1e6, None, 40960, 8.19),
    ("llama", "1.5b"): (2048, 16, 32, 8, 64, 8192, 128256, True, 5e5, 32.0, 131072, 1.24),
    ("llama", "3b"): (3072, 28, 24, 8, 128, 8192, 128256, True, 5e5, 32.0, 131072, 3.21),
    ("llama", "7b"): (4096, 32, 32, 32, 128, 11008, 32000, False, 1e4, None, 4096, 6.74),
    ("llama", "8b"): (4096, 32, 32, 8, 128, 14336, 128256, False, 5e5, 8.0, 131072, 8.03),
    ("mistral", "7b"): (4096, 32, 32, 8, 128, 14336, 32000, False, 1e4, None, 32768, 7.24),
}


@pytest.mark.parametrize(("arch", "size"), sorted(PUBLIC))
def test_real_size_shapes(arch, size):
    hidden, layers, heads, kv, hd, inter, vocab, tied, theta, factor, max_pos, billions = PUBLIC[arch, size]
    cfg = model_config(arch, size)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        hidden, layers, heads, kv)
    assert (getattr(cfg, "head_dim", None) or hidden // heads) == hd
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.tie_word_embeddings) == (inter, vocab, tied)
    assert (cfg.rope_parameters["rope_theta"], cfg.rope_parameters.get("factor"), cfg.max_position_embeddings) == (
        theta, factor, max_pos)
    n = sum(prod(s) for _, s in tensor_specs(cfg))
    assert n / 1e9 == pytest.approx(billions, abs=0.006)
    assert ("model.layers.0.self_attn.q_proj.bias" in dict(tensor_specs(cfg))) == (arch == "qwen2")


def test_bad_arguments(make_tiny, tmp_path):
    for kw, msg in [({"arch": "gpt2"}, "unknown arch"), ({"size": "70b"}, "unknown size"),
                    ({"dtype": "int8"}, "unknown dtype"), ({"device": "nonsense"}, "bad device"),
                    ({"max_shard_bytes": 0}, "max_shard_bytes")]:
        with pytest.raises(ValueError, match=msg):
            _make(tmp_path / "m", **kw)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not written by make_model"):
        _make(tmp_path / "foreign")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a directory"):
        _make(tmp_path / "file")
    with pytest.raises(ValueError, match="another factory model"):
        _make(make_tiny("qwen2"), seed=7)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            _make(tmp_path / "m", device="cuda")
