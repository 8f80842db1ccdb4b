"""What a model directory must be for tokenpool to serve it, checked with the standard library alone (the controller
process imports neither torch nor transformers): a Hugging Face directory whose config.json names an architecture
the engine runs. `tokenpool serve` checks its models with it before it starts, the admin API a model before it is
registered; `ModelConfig.from_hf` (the engine's reader) refuses the same architectures."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "mistral")
# the weights' dtypes an engine may be asked for (`ModelConfig`'s DTYPES, and "auto": the checkpoint's own)
DTYPE_NAMES = ("auto", "bf16", "bfloat16", "fp16", "float16", "half", "fp32", "float32", "float")


def run_dtype(dtype: str, device: str) -> str:
    """The dtype a model served at `dtype` (one of DTYPE_NAMES; the controller's EngineOptions.dtype) runs in on
    `device`: "auto" is fp32 on the CPU and bf16 on a GPU."""
    return dtype if dtype.lower() != "auto" else "fp32" if device == "cpu" else "bf16"


def dtype_bytes(dtype: str, device: str = "cuda") -> int:
    """Bytes of one element (weights, KV) of a model served at `dtype` on `device` (see run_dtype)."""
    return 4 if run_dtype(dtype, device).lower() in ("fp32", "float32", "float") else 2


def generation_config_problem(source: str) -> str | None:
    """Why a model's generation_config (vLLM's --generation-config: auto, vllm or a folder) cannot be read, or None."""
    if source in ("auto", "vllm") or (Path(source) / "generation_config.json").is_file():
        return None
    return f"{source} is not auto, vllm or a folder with a generation_config.json"


def model_dir_problem(path: str | Path) -> str | None:
    """Why `path` cannot be served, in a sentence naming it; None when it can (as far as config.json says)."""
    p = Path(path)
    if not p.exists():
        return f"path {p} does not exist"
    if not p.is_dir():
        return (f"path {p} is a file; give the model's directory" +
                (" (a .gguf file is served by `tokenpool serve FILE.gguf`, or as a configuration's model path)"
                 if p.suffix == ".gguf" else
                 " (a configuration file is given with --config FILE)" if p.suffix in (".yaml", ".yml") else ""))
    cfg = p / "config.json"
    if not cfg.is_file():
        if p.name.startswith("models--") and (p / "snapshots").is_dir():  # (a repo's folder in the Hugging Face cache)
            snaps = sorted(d for d in (p / "snapshots").iterdir() if (d / "config.json").is_file())
            return (f"{p} has no config.json: it is a Hugging Face cache folder, whose model is a folder under its "
                    f"snapshots/{f' ({snaps[0]})' if len(snaps) == 1 else ''}; `tokenpool serve "
                    f"{p.name.removeprefix('models--').replace('--', '/', 1)}` finds it in the cache")
        return f"{p} has no config.json (not a Hugging Face model directory)"
    try:
        data = json.loads(cfg.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"{cfg} cannot be read as JSON: {e}"
    arch = data.get("model_type") if isinstance(data, dict) else None
    if arch not in SUPPORTED_ARCHS:
        return f"{cfg}: architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHS)}"
    if (why := layers_problem(data.get("hidden_act", "silu"), data.get("mlp_bias", False),
                              data.get("attention_bias", False) and arch != "qwen2")) is not None:
        return f"{cfg}: {why}"
    return None


def layers_problem(hidden_act: object, mlp_bias: object, o_bias: object) -> str | None:
    """What of a supported architecture's config the engine's layers do not run (its MLP is bias-free SiLU-gated, its
    attention's output projection bias-free), in words; None when it runs it. `o_bias`: the config's attention_bias
    where it puts a bias on o_proj too (llama's, qwen3's; qwen2's biases are q, k and v's, which the engine adds).
    `model_dir_problem` and the engine's reader (`ModelConfig.from_hf`) refuse the same, where the model's weights
    would otherwise run through the wrong function or without their biases."""
    if hidden_act not in ("silu", "swish"):
        return f"hidden_act {hidden_act!r} is not supported; the engine's MLP runs SiLU ('silu')"
    if mlp_bias:
        return "mlp_bias is not supported; the engine's MLP projections have no bias"
    if o_bias:
        return "attention_bias is not supported for this architecture; the engine's o_proj has no bias"
    return None


def model_max_positions(path: str | Path | None) -> int | None:
    """The most tokens the model in directory `path` takes (its config.json's max_position_embeddings, which the
    engine bounds max_model_len by); None when its config does not say."""
    try:
        v = json.loads((Path(path) / "config.json").read_text()).get("max_position_embeddings")  # type: ignore[arg-type]
    except (OSError, TypeError, ValueError, AttributeError):
        return None
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def kv_elems_per_token(path: str | Path | None) -> int:
    """KV cache elements one token of the model in directory `path` takes (2 x layers x KV heads x head_dim, from its
    config.json); 0 when its config does not say."""
    try:
        c = json.loads((Path(path) / "config.json").read_text())  # type: ignore[arg-type]
        heads = c["num_attention_heads"]
        head_dim = c.get("head_dim") or c["hidden_size"] // heads
        return 2 * int(c["num_hidden_layers"]) * int(c.get("num_key_value_heads") or heads) * int(head_dim)
    except (OSError, TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError):
        return 0


# A LoRA adapter in PEFT's format (`save_pretrained`: adapter_config.json and adapter_model.safetensors), served over
# the model it was trained on as vLLM's --lora-modules are. The projections an adapter may change: the engine adds
# scale * B(A(x)) to each (token_scheduler.model.lora); embeddings, the LM head, DoRA and biases are refused.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def read_adapter_config(path: str | Path) -> dict:
    """A LoRA adapter directory's adapter_config.json, checked for what the engine runs; ValueError names what is
    wrong with it in a sentence."""
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"LoRA adapter path {p} " + ("is not a directory" if p.exists() else "does not exist"))
    cfg_file = p / "adapter_config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{p} has no adapter_config.json (not a PEFT LoRA adapter directory)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{cfg_file} cannot be read as JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_file} is not a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r} is not supported; only LORA")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise ValueError(f"{cfg_file}: r (a positive integer) and lora_alpha (a number) are required")
    unsupported = {"use_dora": "DoRA", "fan_in_fan_out": "fan_in_fan_out weights", "modules_to_save": "modules_to_save",
                   "alpha_pattern": "alpha_pattern", "layers_pattern": "layers_pattern"}
    for key, what in unsupported.items():
        if cfg.get(key):
            raise ValueError(f"{cfg_file}: {what} is not supported")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{cfg_file}: bias {cfg['bias']!r} is not supported; only 'none'")
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        bad = [t for t in targets if t.split(".")[-1] not in LORA_TARGETS]
        if bad:
            raise ValueError(f"{cfg_file}: target modules {bad} are not supported; supported: {', '.join(LORA_TARGETS)}")
    if not (p / ADAPTER_WEIGHTS).is_file():
        raise ValueError(f"{p} has no {ADAPTER_WEIGHTS}" +
                         (" (adapter_model.bin is not read; save with safe_serialization)"
                          if (p / "adapter_model.bin").exists() else ""))
    return cfg




# PEFT's tensor names: ...layers.N.(self_attn|mlp).MODULE.lora_(A|B)[.ADAPTER].weight
LORA_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[A-Za-z_]\w*)?\.weight$")


def lora_dims(hidden: int, q_size: int, kv_size: int, intermediate: int) -> dict[str, tuple[int, int]]:
    """Each module an adapter may change -> (its output rows, its input features)."""
    return {"q_proj": (q_size, hidden), "k_proj": (kv_size, hidden), "v_proj": (kv_size, hidden),
            "o_proj": (hidden, q_size), "gate_proj": (intermediate, hidden), "up_proj": (intermediate, hidden),
            "down_proj": (hidden, intermediate)}


# The largest LoRA rank served unless configured otherwise (vLLM's --max-lora-rank; its default is 16): a model's
# adapter slots on the device are as wide as the largest rank it hosts (token_scheduler/model/lora.py LoraSlots).
MAX_LORA_RANK = 64


def lora_modules(shapes: dict[str, tuple[int, ...]], num_layers: int, dims: dict[str, tuple[int, int]],
                 max_rank: int | None = None) -> dict[tuple[int, str], dict[str, str]]:
    """An adapter's tensors (name -> shape) as (layer, module) -> {"A": name, "B": name}, checked against a model of
    `num_layers` layers and module `dims` (lora_dims), and ranks up to `max_rank`; ValueError names the first tensor
    that does not fit."""
    mods: dict[tuple[int, str], dict[str, str]] = {}
    for key in shapes:
        m = LORA_KEY.search(key)
        if m is None or m.group(2) not in dims:
            raise ValueError(f"tensor {key} is not a LoRA weight of a supported module ({', '.join(LORA_TARGETS)})")
        layer = int(m.group(1))
        if layer >= num_layers:
            raise ValueError(f"tensor {key} is for layer {layer}; the model has {num_layers}")
        mods.setdefault((layer, m.group(2)), {})[m.group(3)] = key
    if not mods:
        raise ValueError("it has no LoRA weights")
    for (layer, mod), ab in mods.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"layer {layer} {mod} has lora_{''.join(ab)} without its pair")
        a, b = shapes[ab["A"]], shapes[ab["B"]]
        rows, feats = dims[mod]
        if len(a) != 2 or len(b) != 2 or a[1] != feats or tuple(b) != (rows, a[0]):
            raise ValueError(f"layer {layer} {mod} has A {list(a)} and B {list(b)}; this model's takes A [r, {feats}] "
                             f"and B [{rows}, r]")
        if max_rank is not None and a[0] > max_rank:
            raise ValueError(f"layer {layer} {mod} has rank {a[0]}; ranks up to {max_rank} are served "
                             "(--max-lora-rank, engine.max_lora_rank)")
    return mods


def safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's header (8 bytes of length, then JSON), without reading the
    tensors."""
    return {k: shape for k, (_, shape) in safetensors_tensors(path).items()}


def safetensors_tensors(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (dtype as the header writes it: F32, F16, BF16, I8, F8_E4M3, ...; shape) from a safetensors
    file's header, without reading the tensors."""
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= min(100 << 20, size - 8):
            raise ValueError(f"{path} is not a safetensors file (no header)")
        try:
            header = json.loads(f.read(n))
            tensors = {k: v for k, v in header.items() if k != "__metadata__"}
            end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
            shapes = {k: (str(v["dtype"]), tuple(v["shape"])) for k, v in tensors.items()}
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise ValueError(f"{path} is not a safetensors file (its header does not parse)") from None
    if 8 + n + end > size:
        raise ValueError(f"{path} is cut short: its header places {end} bytes of tensors after it; the file holds "
                         f"{size - 8 - n}")
    return shapes


# GGUF's general.file_type (llama.cpp's llama_ftype) as Ollama's quantization_level names it (fs/ggml FileType.String)
GGUF_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
                   11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M",
                   18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S",
                   25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M",
                   32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4"}
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_file_type(path: str | Path) -> str | None:
    """A GGUF file's weights type as Ollama's quantization_level gives it ("Q4_K_M", "Q8_0", "F16"): its
    general.file_type (`gguf_value`). None: not a GGUF file, or it gives none."""
    v = gguf_value(path, "general.file_type")
    return GGUF_FILE_TYPES.get(int(v)) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def gguf_value(path: str | Path, key: str) -> object:
    """A GGUF file's metadata value `key` (a number, or a string such as general.architecture's "llama"), read from
    its metadata (the general.* keys are written before the tokenizer's long arrays, so little is read; no tensor).
    None: not a GGUF file, or it has no such key, or an array there. (Hand-read where the `gguf` package reads GGUF
    files elsewhere: its GGUFReader parses every key and tensor first, 2.0 s for the default model's 98 MB file on
    this project's 2-core machine, against 70 us here, and /api/tags asks for each model it lists.)"""
    try:
        with open(path, "rb") as f:
            def take(fmt: str):
                return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

            def text() -> str:
                return f.read(take("<Q")).decode("utf-8", "replace")

            def skip(kind: int) -> None:
                if kind in _GGUF_SCALARS:
                    f.seek(struct.calcsize(_GGUF_SCALARS[kind]), 1)
                elif kind == 8:
                    f.seek(take("<Q"), 1)
                elif kind == 9:
                    inner, n = take("<I"), take("<Q")
                    if inner in _GGUF_SCALARS:
                        f.seek(n * struct.calcsize(_GGUF_SCALARS[inner]), 1)
                    else:
                        for _ in range(n):
                            skip(inner)
                else:
                    raise ValueError(f"GGUF value type {kind}")

            if f.read(4) != b"GGUF" or take("<I") < 2:
                return None
            take("<Q")  # (tensors)
            for _ in range(take("<Q")):
                name, kind = text(), take("<I")
                if name == key:
                    return take(_GGUF_SCALARS[kind]) if kind in _GGUF_SCALARS else text() if kind == 8 else None
                skip(kind)
    except (OSError, ValueError, struct.error):
        return None
    return None


def adapter_fit_problem(adapter_dir: str | Path, model_dir: str | Path, max_rank: int | None = None) -> str | None:
    """Why the LoRA adapter in `adapter_dir` cannot be served over the model in `model_dir` (its configuration, its
    tensors' names and shapes against the model's config.json, its rank against `max_rank`); None when it can."""
    try:
        read_adapter_config(adapter_dir)
    except ValueError as e:
        return str(e)
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        d = cfg.get("head_dim") or h // heads
        dims = lora_dims(h, heads * d, cfg.get("num_key_value_heads", heads) * d, cfg["intermediate_size"])
        layers = cfg["num_hidden_layers"]
    except (OSError, KeyError, TypeError, ValueError) as e:
        return f"cannot read the shapes of model {model_dir} from its config.json: {type(e).__name__}: {e}"
    try:
        shapes = safetensors_shapes(Path(adapter_dir) / ADAPTER_WEIGHTS)
    except (OSError, ValueError) as e:
        return f"LoRA adapter {adapter_dir}: {e}"
    try:
        lora_modules(shapes, layers, dims, max_rank)
    except ValueError as e:
        return f"LoRA adapter {adapter_dir} does not fit model {model_dir}: {e}"
    return None
