"""LoRA adapters over a hosted model's weights (PEFT's format; vLLM's multi-LoRA serving).

An adapter changes some projections of each layer: y = W x + scale * B (A x), A [r, in], B [out, r], scale =
lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA). The engine's projections are fused (q|k|v, gate|up), so an
adapter is kept in the same shape: for a fused projection, the A of its parts stacked ([r_q + r_k + r_v, in]) and B
block-diagonal ([q + 2 kv, r_q + r_k + r_v], zeros where a part's output does not read another part's rank), with the
scale folded into B. The base weights are never changed: requests of several adapters and of the base model share a
step, each row getting its own adapter's delta (`LoraRows`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import torch

from model_swapper.model_config import ModelConfig
from tokenpool.models import ADAPTER_WEIGHTS, lora_dims, lora_modules, read_adapter_config, safetensors_shapes


def _fused(cfg: ModelConfig) -> dict[str, tuple[str, int]]:
    """The engine's fused projection of each module an adapter may change, and the part's row offset in it."""
    q, kv, i = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    return {"q_proj": ("qkv", 0), "k_proj": ("qkv", q), "v_proj": ("qkv", q + kv), "o_proj": ("o", 0),
            "gate_proj": ("gate_up", 0), "up_proj": ("gate_up", i), "down_proj": ("down", 0)}


def _out_rows(cfg: ModelConfig) -> dict[str, int]:
    return {"qkv": cfg.q_size + 2 * cfg.kv_size, "o": cfg.hidden_size, "gate_up": 2 * cfg.intermediate_size,
            "down": cfg.hidden_size}


_UIDS = count(1)


@dataclass
class LoraAdapter:
    name: str
    path: str
    # per layer: fused projection -> (A [R, in], B [out, R] times the scale); projections it leaves alone are absent
    layers: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]
    uid: int = field(default_factory=lambda: next(_UIDS))  # this load's (its requests' cached KV is keyed by it)

    @staticmethod
    def load(name: str, path: str | Path, cfg: ModelConfig, dtype: torch.dtype) -> LoraAdapter:
        """Read a PEFT LoRA adapter for a model of `cfg`; ValueError when it is not one the engine can run or does
        not fit that model."""
        from safetensors import safe_open

        acfg = read_adapter_config(path)
        alpha, rslora = float(acfg["lora_alpha"]), bool(acfg.get("use_rslora"))
        file = Path(path) / ADAPTER_WEIGHTS
        shapes = safetensors_shapes(file)  # (a file cut short, or not safetensors: a ValueError saying so)
        try:
            mods = lora_modules(shapes, cfg.num_layers,
                                lora_dims(cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size))
        except ValueError as e:
            raise ValueError(f"LoRA adapter {name!r} does not fit this model: {e}") from None
        try:
            with safe_open(str(file), framework="pt") as f:
                t = {k: f.get_tensor(k).float() for ab in mods.values() for k in ab.values()}
        except Exception as e:  # noqa: BLE001 - safetensors' own error type (SafetensorError) for a damaged file
            raise ValueError(f"LoRA adapter {name!r}: cannot read {file}: {e}") from None
        fused = _fused(cfg)
        layers: list[dict[str, list]] = [{} for _ in range(cfg.num_layers)]
        for (layer, mod), ab in sorted(mods.items()):
            a, b = t[ab["A"]], t[ab["B"]]
            r = a.shape[0]
            proj, off = fused[mod]
            scale = alpha / (r ** 0.5 if rslora else r)
            layers[layer].setdefault(proj, []).append((off, b.shape[0], a, b * scale))
        out = _out_rows(cfg)
        stacked: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
        for per in layers:
            d = {}
            for proj, items in per.items():
                a = torch.cat([x[2] for x in items])
                b = torch.zeros(out[proj], a.shape[0])
                c = 0
                for off, rows, _, bb in items:
                    b[off: off + rows, c: c + bb.shape[1]] = bb
                    c += bb.shape[1]
                d[proj] = (a.to(dtype).contiguous(), b.to(dtype).contiguous())
            stacked.append(d)
        return LoraAdapter(name, str(path), stacked)

    def to(self, device: torch.device) -> LoraAdapter:
        layers = [{k: (a.to(device), b.to(device)) for k, (a, b) in d.items()} for d in self.layers]
        return LoraAdapter(self.name, self.path, layers, self.uid)


class LoraRows:
    """The adapters of one step's rows: (adapter, the rows it applies to, as indices into the step's tokens). Rows of
    no adapter are the base model's and are left as they are."""

    def __init__(self, groups: list[tuple[LoraAdapter, torch.Tensor]]):
        self.groups = groups

    def add_(self, layer: int, proj: str, x: torch.Tensor, outs: list[torch.Tensor]) -> None:
        """Add each adapter's delta of projection `proj` of `layer` (input `x` [T, in]) to its rows of `outs`, the
        projection's output as its parts (q, k, v / gate, up / the whole), in place."""
        for ad, idx in self.groups:
            ab = ad.layers[layer].get(proj)
            if ab is None:
                continue
            a, b = ab
            delta = (x.index_select(0, idx) @ a.t()) @ b.t()
            c = 0
            for o in outs:
                w = o.shape[-1]
                o.index_add_(0, idx, delta[:, c: c + w])
                c += w
