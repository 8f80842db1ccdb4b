"""The engine's weight layout and loading from HF safetensors.

The engine owns its weights as a flat `dict[name, Tensor]`. Projections that run on the same input are
fused at load time (q|k|v, gate|up) so a decode step launches fewer, larger matmuls. The layout (names,
shapes, order) is a pure function of the config, so the swapper can pack a model into one contiguous
buffer and hand the runner views into it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from model_swapper.model_config import ModelConfig


@dataclass(frozen=True)
class WeightSpec:
    name: str  # engine name
    shape: tuple[int, ...]
    sources: tuple[str, ...]  # HF tensor names, concatenated along dim 0 in this order


def weight_specs(cfg: ModelConfig) -> list[WeightSpec]:
    h, q, kv, i = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    specs = [WeightSpec("embed", (cfg.vocab_size, h), ("model.embed_tokens.weight",))]
    for n in range(cfg.num_layers):
        p = f"model.layers.{n}."
        specs += [
            WeightSpec(f"l{n}.ln1", (h,), (p + "input_layernorm.weight",)),
            WeightSpec(f"l{n}.qkv", (q + 2 * kv, h), tuple(p + f"self_attn.{x}_proj.weight" for x in "qkv")),
        ]
        if cfg.qkv_bias:
            specs.append(WeightSpec(f"l{n}.qkv_b", (q + 2 * kv,), tuple(p + f"self_attn.{x}_proj.bias" for x in "qkv")))
        if cfg.qk_norm:
            specs += [
                WeightSpec(f"l{n}.q_norm", (cfg.head_dim,), (p + "self_attn.q_norm.weight",)),
                WeightSpec(f"l{n}.k_norm", (cfg.head_dim,), (p + "self_attn.k_norm.weight",)),
            ]
        specs += [
            WeightSpec(f"l{n}.o", (h, q), (p + "self_attn.o_proj.weight",)),
            WeightSpec(f"l{n}.ln2", (h,), (p + "post_attention_layernorm.weight",)),
            WeightSpec(f"l{n}.gate_up", (2 * i, h), (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")),
            WeightSpec(f"l{n}.down", (h, i), (p + "mlp.down_proj.weight",)),
        ]
    specs.append(WeightSpec("norm", (h,), ("model.norm.weight",)))
    if not cfg.tie_word_embeddings:
        specs.append(WeightSpec("lm_head", (cfg.vocab_size, h), ("lm_head.weight",)))
    return specs


def weight_numel(cfg: ModelConfig) -> int:
    total = 0
    for s in weight_specs(cfg):
        n = 1
        for d in s.shape:
            n *= d
        total += n
    return total


def safetensors_files(model_dir: Path) -> list[Path]:
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {model_dir}")
    return files


def tensor_locations(model_dir: Path) -> dict[str, Path]:
    """HF tensor name -> file holding it."""
    from safetensors import safe_open

    loc: dict[str, Path] = {}
    for f in safetensors_files(model_dir):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                loc[k] = f
    return loc


def load_into(model_dir: Path, cfg: ModelConfig, out: dict[str, torch.Tensor]) -> None:
    """Read HF tensors and write them (cast, fused) into pre-allocated `out[name]` tensors of the layout."""
    from safetensors import safe_open

    loc = tensor_locations(Path(model_dir))
    by_file: dict[Path, list[tuple[WeightSpec, str]]] = {}
    for spec in weight_specs(cfg):
        for src in spec.sources:
            if src not in loc:
                raise KeyError(f"{model_dir}: missing tensor {src}")
            by_file.setdefault(loc[src], []).append((spec, src))
    for f, items in by_file.items():
        with safe_open(str(f), framework="pt") as sf:
            for spec, src in items:
                t = sf.get_tensor(src)
                out[spec.name].narrow(0, _row_offset(cfg, spec, src), t.shape[0]).copy_(t)


def _row_offset(cfg: ModelConfig, spec: WeightSpec, src: str) -> int:
    if len(spec.sources) == 1:
        return 0
    if spec.name.endswith(".gate_up"):
        return 0 if "gate_proj" in src else cfg.intermediate_size
    # q|k|v (weight or bias)
    return {"q_proj": 0, "k_proj": cfg.q_size, "v_proj": cfg.q_size + cfg.kv_size}[src.split(".")[-2]]


def load_weights(model_dir: str | Path, cfg: ModelConfig, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Allocate the layout on `device` and fill it from safetensors."""
    out = {s.name: torch.empty(s.shape, dtype=dtype, device=device) for s in weight_specs(cfg)}
    load_into(Path(model_dir), cfg, out)
    return out
