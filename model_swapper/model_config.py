"""The architecture of a model, read from a Hugging Face `config.json`: the shared description every layer reads (the
swapper lays weights out by it, the engine runs it). Read as the file says where it names everything used (a
checkpoint saved by transformers does); else through transformers' config classes, whose defaults fill what it
leaves out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tokenpool.models import SUPPORTED_ARCHS, layers_problem

DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


def parse_dtype(d: str | torch.dtype | None, default: torch.dtype = torch.float32) -> torch.dtype:
    if d is None or d == "auto":
        return default
    if isinstance(d, torch.dtype):
        return d
    try:
        return DTYPES[str(d).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {d!r}; use one of {sorted(DTYPES)}") from None


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    torch_dtype: torch.dtype
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None = None
    sliding_window: int | None = None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.num_layers * self.kv_size * torch.empty((), dtype=dtype).element_size()

    @staticmethod
    def from_pretrained(path: str | Path) -> ModelConfig:
        import json

        from tokenpool import imports

        path = Path(path)
        if not path.exists():  # (a served model's folder deleted or moved: its next load, on a restarted worker)
            raise FileNotFoundError(f"{path} does not exist (deleted or moved?)")
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json (not a Hugging Face model directory)")
        try:
            raw = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            raw = None  # (transformers says what is wrong with it)
        got = ModelConfig.from_json(raw, path) if isinstance(raw, dict) else None
        if got is not None:
            return got
        with imports.LOCK:  # (the architecture's config module is imported at its class's first look-up)
            hf = imports.transformers("AutoConfig").from_pretrained(str(path))
        return ModelConfig.from_hf(hf, path)

    @staticmethod
    def from_json(raw: dict, path: Path | None = None) -> ModelConfig | None:
        """`raw` (a config.json) read as it says, equal to `from_hf` of transformers' config of it; None where that
        would take a default of transformers' class, which differ by class (Qwen2's num_key_value_heads 32, Llama's
        eos 2, Qwen3's head_dim 128, Mistral's window 4096), or where transformers rewrites what it says (rope scaling).
        Why: transformers' config classes import its activations and with them torch.distributed.tensor, ~0.9 s of one
        core at each worker's start (tests/test_model_config_json.py holds the two readers equal)."""
        arch = raw.get("model_type")
        if arch not in SUPPORTED_ARCHS or any(k not in raw for k in _NAMED) or "auto_map" in raw:
            return None
        if raw.get("rope_scaling") is not None:
            return None
        rp = raw.get("rope_parameters")
        if rp is None:
            rp = {"rope_theta": raw.get("rope_theta"), "rope_type": "default"}
        elif not isinstance(rp, dict) or "rope_type" not in rp:
            return None
        theta = rp.get("rope_theta", raw.get("rope_theta"))
        use_window = raw.get("use_sliding_window", arch == "mistral")
        if (arch == "qwen3" and raw.get("head_dim") is None) or (use_window and "sliding_window" not in raw) or theta is None:
            return None
        ints = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                "vocab_size", "max_position_embeddings")
        if not all(type(raw[k]) is int and raw[k] > 0 for k in ints):
            return None
        heads = raw["num_attention_heads"]
        hf = {k: raw[k] for k in ints} | {
            "model_type": arch, "head_dim": raw.get("head_dim"), "rms_norm_eps": raw["rms_norm_eps"],
            "rope_parameters": rp | {"rope_theta": theta},
            "tie_word_embeddings": raw["tie_word_embeddings"], "attention_bias": raw.get("attention_bias", False),
            "use_sliding_window": use_window, "sliding_window": raw.get("sliding_window"),
            "bos_token_id": raw["bos_token_id"], "eos_token_id": raw["eos_token_id"],
            "dtype": raw.get("dtype") or raw.get("torch_dtype"),
            "hidden_act": raw.get("hidden_act", "silu"), "mlp_bias": raw.get("mlp_bias", False),
        }
        if hf["head_dim"] is None:
            hf["head_dim"] = raw["hidden_size"] // heads
        return ModelConfig.from_hf(_Raw(hf), path)

    @staticmethod
    def from_hf(hf, path: Path | None = None) -> ModelConfig:
        arch = hf.model_type
        if arch not in SUPPORTED_ARCHS:
            raise ValueError(f"architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHS)}")
        if (why := layers_problem(getattr(hf, "hidden_act", "silu"), getattr(hf, "mlp_bias", False),
                                  getattr(hf, "attention_bias", False) and arch != "qwen2")) is not None:
            raise ValueError(why)
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        rope_scaling = getattr(hf, "rope_scaling", None)
        rope_theta = getattr(hf, "rope_theta", None)
        rp = getattr(hf, "rope_parameters", None)  # transformers >= 5 folds theta and scaling here
        if isinstance(rp, dict):
            rope_theta = rp.get("rope_theta", rope_theta)
            if rp.get("rope_type", "default") not in ("default", None):
                rope_scaling = dict(rp)
        if rope_scaling is not None:
            rope_scaling = dict(rope_scaling)
            if rope_scaling.get("rope_type", rope_scaling.get("type", "default")) == "default":
                rope_scaling = None
        eos = hf.eos_token_id
        if path is not None and (path / "generation_config.json").exists():
            import json

            g = json.loads((path / "generation_config.json").read_text())
            eos = g.get("eos_token_id", eos)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        raw = hf.to_dict()  # "dtype" (transformers 5) or "torch_dtype" (older files), without the deprecation warning
        tdt = raw.get("dtype") or raw.get("torch_dtype") or torch.float32
        if isinstance(tdt, str):
            tdt = parse_dtype(tdt)
        sw = getattr(hf, "sliding_window", None) if getattr(hf, "use_sliding_window", arch == "mistral") else None
        return ModelConfig(
            arch=arch,
            hidden_size=hf.hidden_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
            head_dim=head_dim,
            intermediate_size=hf.intermediate_size,
            vocab_size=hf.vocab_size,
            max_position_embeddings=hf.max_position_embeddings,
            rms_norm_eps=hf.rms_norm_eps,
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2",
            qk_norm=arch == "qwen3",
            torch_dtype=tdt,
            eos_token_ids=eos_ids,
            bos_token_id=getattr(hf, "bos_token_id", None),
            sliding_window=sw,
        )


# What a config.json names for `ModelConfig.from_json` to read it without transformers' defaults.
_NAMED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
          "vocab_size", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "bos_token_id",
          "eos_token_id")


class _Raw:
    """A config.json's values as `from_hf` reads a transformers config: attributes, and `to_dict`."""

    def __init__(self, d: dict):
        self.__dict__.update(d)

    def to_dict(self) -> dict:
        return dict(self.__dict__)
