"""LoRA adapters over a hosted model's weights (PEFT's format; vLLM's multi-LoRA serving).

An adapter changes some projections of each layer: y = W x + scale * B (A x), A [r, in], B [out, r], scale =
lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA). The engine's projections are fused (q|k|v, gate|up), so an
adapter is kept in the same shape: for a fused projection, the A of its parts stacked ([r_q + r_k + r_v, in]) and B
block-diagonal ([q + 2 kv, r_q + r_k + r_v], zeros where a part's output does not read another part's rank), with the
scale folded into B. The base weights are never changed: requests of several adapters and of the base model share a
step, each row getting its own adapter's delta (`LoraRows`).
"""

from __future__ import annotations

from collections import OrderedDict
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
    def load(name: str, path: str | Path, cfg: ModelConfig, dtype: torch.dtype,
             max_rank: int | None = None) -> LoraAdapter:
        """Read a PEFT LoRA adapter for a model of `cfg`; ValueError when it is not one the engine can run, does not
        fit that model, or has a rank over `max_rank`."""
        from safetensors import safe_open

        acfg = read_adapter_config(path)
        alpha, rslora = float(acfg["lora_alpha"]), bool(acfg.get("use_rslora"))
        file = Path(path) / ADAPTER_WEIGHTS
        shapes = safetensors_shapes(file)  # (a file cut short, or not safetensors: a ValueError saying so)
        try:
            mods = lora_modules(shapes, cfg.num_layers,
                                lora_dims(cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size), max_rank)
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


# On CUDA with Triton: the mask product and the expand GEMM of each projection as one kernel (triton_lora.expand_),
# two launches a projection instead of three. False: cuBLAS's (for A/B runs: load_tests/diag_lora.py).
EXPAND_TRITON = True


def _in_cols(cfg: ModelConfig) -> dict[str, int]:
    return {"qkv": cfg.hidden_size, "o": cfg.q_size, "gate_up": cfg.hidden_size, "down": cfg.intermediate_size}


class LoraSlots:
    """A model's adapters in fixed device slots, so that one step -- one captured decode graph -- serves any mix of
    them and of the model, without a graph or an index op per adapter (vLLM's --max-loras, punica's layout).

    Per layer and projection: A of every slot stacked, [slots x rank, in], and B side by side, [out, slots x rank];
    slot s holds its adapter in rows / columns [s x rank, s x rank + r) and zeros past its own rank r or where it
    leaves the projection alone. A step's rows each name a slot (-1: the model alone); the mask M [rows, slots x rank]
    is 1 where a column is the row's slot, and every projection adds `((x A^T) * M) B^T` to its output: three ops a
    projection whatever the adapters (two with the Triton expand, which applies M itself), and rows of no adapter get
    exactly zero added. The tensors never
    move (a graph reads them by address); an adapter is copied into a slot when a step needs it (`slot_of`)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, slots: int, rank: int,
                 projs: frozenset[str], use_triton: bool = False):
        self.slots, self.rank, self.projs, self.dtype = slots, rank, projs, dtype
        self.use_triton = use_triton
        ins, outs = _in_cols(cfg), _out_rows(cfg)
        n = slots * rank
        self.a = [{p: torch.zeros(n, ins[p], dtype=dtype, device=device) for p in projs}
                  for _ in range(cfg.num_layers)]
        self.b = [{p: torch.zeros(outs[p], n, dtype=dtype, device=device) for p in projs}
                  for _ in range(cfg.num_layers)]
        self.col_slot = torch.arange(n, device=device) // rank  # the slot of each column of x A^T
        self.held: OrderedDict[int, int] = OrderedDict()  # adapter uid -> its slot, least recently used first

    @staticmethod
    def shape_for(adapters) -> tuple[int, frozenset[str]]:
        """The rank (a multiple of 8, for aligned rows) and projections slots must have to hold any of `adapters`."""
        r, projs = 8, set()
        for ad in adapters:
            for layer in ad.layers:
                for p, (a, _) in layer.items():
                    projs.add(p)
                    r = max(r, -(-a.shape[0] // 8) * 8)
        return r, frozenset(projs)

    def holds(self, adapters) -> bool:
        r, projs = self.shape_for(adapters)
        return r <= self.rank and projs <= self.projs

    def slot_of(self, ad: LoraAdapter, keep: set[int]) -> int:
        """`ad`'s slot, written there first if it is not held (into a free slot, else the least recently used one
        whose adapter is not in `keep`, the uids the step needs). Stream-ordered: a step queued before on this
        stream reads the slot's former contents."""
        s = self.held.get(ad.uid)
        if s is None:
            free = set(range(self.slots)) - set(self.held.values())
            if free:
                s = min(free)
            else:
                old = next(u for u in self.held if u not in keep)
                s = self.held.pop(old)
            self._write(s, ad)
            self.held[ad.uid] = s
        self.held.move_to_end(ad.uid)
        return s

    def forget(self, uid: int) -> None:
        """An adapter unloaded: its slot is free again (its contents are overwritten when the slot is next used)."""
        self.held.pop(uid, None)

    def _write(self, s: int, ad: LoraAdapter) -> None:
        lo, hi = s * self.rank, (s + 1) * self.rank
        for n, layer in enumerate(ad.layers):
            for p in self.projs:
                a, b = self.a[n][p][lo:hi], self.b[n][p][:, lo:hi]
                a.zero_()
                b.zero_()
                if p in layer:
                    aa, bb = layer[p]
                    r = aa.shape[0]
                    a[:r].copy_(aa, non_blocking=True)
                    b[:, :r].copy_(bb, non_blocking=True)

    def mask(self, slot_ids: torch.Tensor) -> torch.Tensor:
        """M [rows, slots x rank]: 1 where a column is the row's slot (rows of slot -1: all 0), in the model dtype."""
        return (slot_ids[:, None] == self.col_slot[None, :]).to(self.dtype)

    def rows(self, slot_ids: torch.Tensor) -> SlotRows:
        """The deltas of a step whose row i is slot `slot_ids[i]`'s (-1: the model alone); [rows] int64, on the
        device (a graph's input buffer: the mask is computed in the graph)."""
        expand = self.use_triton and EXPAND_TRITON
        return SlotRows(self, slot_ids, None if expand else self.mask(slot_ids))


class SlotRows:
    """`LoraRows`' interface over `LoraSlots`: each row's adapter by its slot id (`mask` None: the Triton expand
    applies it; else the mask itself, [rows, slots x rank])."""

    def __init__(self, slots: LoraSlots, slot_ids: torch.Tensor, mask: torch.Tensor | None):
        self.slots, self.slot_ids, self.mask = slots, slot_ids, mask

    def add_(self, layer: int, proj: str, x: torch.Tensor, outs: list[torch.Tensor]) -> None:
        a = self.slots.a[layer].get(proj)
        if a is None:
            return
        t = x @ a.t()
        b = self.slots.b[layer][proj]
        if self.mask is None and len(outs) == 1:
            from token_scheduler.model.triton_lora import expand_

            expand_(outs[0], t, b, self.slot_ids, self.slots.rank)
            return
        t.mul_(self.mask if self.mask is not None else self.slots.mask(self.slot_ids))
        if len(outs) == 1:  # (the fused forward's projections: the delta summed into the output by the GEMM)
            outs[0].addmm_(t, b.t())
            return
        delta = t @ b.t()
        c = 0
        for o in outs:
            w = o.shape[-1]
            o.add_(delta[:, c: c + w])
            c += w
