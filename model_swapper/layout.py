"""Where each engine weight lives inside a model's contiguous byte region.

The host cache and the arena slot use the same layout, so a swap-in is one (or a few) flat byte copies and
the engine's `dict[str, Tensor]` is a set of views computed from offsets. Order follows `weight_specs(cfg)`
(embed, layer 0, ..., layer L-1, norm, lm_head), so "layers 0..n are ready" is "bytes [0, layer_end(n))
have landed" — the trick behind per-layer readiness with only a few large copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model_swapper.model_config import ModelConfig
from model_swapper.weights import WeightSpec, weight_specs

TENSOR_ALIGN = 256  # every tensor starts on a 256 B boundary: aligned for any dtype and for vector loads


@dataclass(frozen=True)
class Placement:
    spec: WeightSpec
    offset: int  # bytes from the region's start
    nbytes: int
    layer: int  # -1: before layer 0 (embed); num_layers: after the last layer (norm, lm_head)


def _layer_of(name: str, num_layers: int) -> int:
    if name.startswith("l") and "." in name and name[1:name.index(".")].isdigit():
        return int(name[1:name.index(".")])
    return -1 if name == "embed" else num_layers


@dataclass(frozen=True)
class ModelLayout:
    cfg: ModelConfig
    dtype: torch.dtype
    places: tuple[Placement, ...]
    nbytes: int  # total, a multiple of TENSOR_ALIGN

    @staticmethod
    def build(cfg: ModelConfig, dtype: torch.dtype | None = None) -> ModelLayout:
        dtype = dtype or cfg.torch_dtype
        places, off = [], 0
        for spec in weight_specs(cfg):
            n = dtype.itemsize
            for d in spec.shape:
                n *= d
            places.append(Placement(spec, off, n, _layer_of(spec.name, cfg.num_layers)))
            off += -(-n // TENSOR_ALIGN) * TENSOR_ALIGN
        return ModelLayout(cfg, dtype, tuple(places), off)

    @property
    def signature(self) -> tuple:
        """Equal signatures: same names, shapes, dtype, offsets. Such models can share a slot's CUDA graphs."""
        return (self.dtype, self.nbytes, tuple((p.spec.name, p.spec.shape, p.offset) for p in self.places))

    def layer_end(self, layer: int) -> int:
        """Bytes that must have landed before `layer` can run: everything up to the end of that layer.
        `layer` = -1 is the embedding; `layer` >= num_layers (or None) means the whole model."""
        if layer is None or layer >= self.cfg.num_layers:
            return self.nbytes
        end = 0
        for p in self.places:
            if p.layer > layer:
                break
            end = p.offset + p.nbytes
        return end

    def views(self, region: torch.Tensor) -> dict[str, torch.Tensor]:
        """Engine tensors as views into a uint8 `region` laid out by this layout (no copies)."""
        if region.dtype != torch.uint8 or region.dim() != 1 or region.numel() < self.nbytes:
            raise ValueError(f"region must be a 1-D uint8 tensor of >= {self.nbytes} bytes")
        return {p.spec.name: region[p.offset:p.offset + p.nbytes].view(self.dtype).view(p.spec.shape)
                for p in self.places}
