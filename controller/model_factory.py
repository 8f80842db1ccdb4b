"""Randomly initialised Hugging Face model directories with the real shapes of public models.

There is no model hub: tests, demos and benchmarks get their models from `make_model`. A directory holds
`config.json` (a transformers config class), `generation_config.json`, safetensors weights (sharded with
`model.safetensors.index.json` above `max_shard_bytes`, 5 GB by default) and the project's tokenizer
(`controller.tokenizer_factory`). Weights are normal(0, 0.02), norms 1.0, qwen2's q/k/v biases normal(0, 0.02).

Real sizes take the shapes of this public model (* = the arch has none of that size: the nearest one):

| size | qwen2        | qwen3       | llama         | mistral           |
|------|--------------|-------------|---------------|-------------------|
| 0.5b | Qwen2.5-0.5B | Qwen3-0.6B* | Llama-3.2-1B* | Mistral-7B-v0.1*  |
| 1.5b | Qwen2.5-1.5B | Qwen3-1.7B* | Llama-3.2-1B* | Mistral-7B-v0.1*  |
| 3b   | Qwen2.5-3B   | Qwen3-4B*   | Llama-3.2-3B  | Mistral-7B-v0.1*  |
| 7b   | Qwen2.5-7B   | Qwen3-8B*   | Llama-2-7B    | Mistral-7B-v0.1   |
| 8b   | Qwen2.5-7B*  | Qwen3-8B    | Llama-3.1-8B  | Mistral-7B-v0.1*  |

Qwen2.5 shapes are the -Instruct releases' (32k positions). Real sizes keep the public vocab_size (rows past
the tokenizer decode to nothing; they are there for the shapes' sake). The test sizes have exactly the tokenizer's
ids, so whatever random weights sample decodes to text. `tiny` (0.4-0.6M params) and `small` (26-31M) are CPU-test
sizes that exercise each arch's features: qwen2 q/k/v bias, qwen3 q/k norm with head_dim != hidden/heads,
llama3 rope scaling, GQA everywhere, tied (qwen) and untied (llama, mistral) heads. Mistral keeps
sliding_window=4096, which is past the 2048 positions of tiny/small, so it never masks there.

Determinism: each tensor is drawn from its own generator seeded by sha256(seed, tensor name), so the bytes do
not depend on tensor order or sharding, and the same seed gives identical files -- given the same torch and
the same kind of device: CUDA and CPU generators draw different numbers. Weights are drawn in the target
dtype on the device (CUDA when present) and streamed to disk one tensor at a time.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from dataclasses import dataclass, replace
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING

from controller import tokenizer_factory
from controller.hosting import import_torch
from tokenpool import imports

if TYPE_CHECKING:  # torch is imported when a model is made (`import_torch`), not with this module
    import torch

ARCHS = ("llama", "qwen2", "qwen3", "mistral")
SIZES = ("tiny", "small", "0.5b", "1.5b", "3b", "7b", "8b")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # (torch's names: `_torch_dtype`)
INIT_STD = 0.02
MAX_SHARD_BYTES = 5 * 10**9  # HF's default "5GB"
MARKER = "tokenpool_factory.json"  # records the arguments, so a re-run may overwrite its own output

_SAFETENSORS_DTYPE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
_HF_CLASS = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral"}


def _torch_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of DTYPES' `dtype`; torch imported through `hosting.import_torch`, as every first import of
    torch in a process that may have threads (a worker's): torch imported by two threads at once is not safe
    (hosting's `_IMPORTS`)."""
    return getattr(import_torch(), DTYPES[dtype])


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int | None  # None: the tokenizer's size
    tied: bool
    max_positions: int
    rope_theta: float
    rms_eps: float
    head_dim: int | None = None  # None: hidden // heads
    rope_scaling: dict | None = None
    sliding_window: int | None = None


def _llama3_rope(factor: float, original: int = 8192) -> dict:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": original}


PUBLIC = {
    "Qwen2.5-0.5B": Shape(896, 24, 14, 2, 4864, 151936, True, 32768, 1e6, 1e-6),
    "Qwen2.5-1.5B": Shape(1536, 28, 12, 2, 8960, 151936, True, 32768, 1e6, 1e-6),
    "Qwen2.5-3B": Shape(2048, 36, 16, 2, 11008, 151936, True, 32768, 1e6, 1e-6),
    "Qwen2.5-7B": Shape(3584, 28, 28, 4, 18944, 152064, False, 32768, 1e6, 1e-6),
    "Qwen3-0.6B": Shape(1024, 28, 16, 8, 3072, 151936, True, 40960, 1e6, 1e-6, head_dim=128),
    "Qwen3-1.7B": Shape(2048, 28, 16, 8, 6144, 151936, True, 40960, 1e6, 1e-6, head_dim=128),
    "Qwen3-4B": Shape(2560, 36, 32, 8, 9728, 151936, True, 40960, 1e6, 1e-6, head_dim=128),
    "Qwen3-8B": Shape(4096, 36, 32, 8, 12288, 151936, False, 40960, 1e6, 1e-6, head_dim=128),
    "Llama-3.2-1B": Shape(2048, 16, 32, 8, 8192, 128256, True, 131072, 5e5, 1e-5, 64, _llama3_rope(32.0)),
    "Llama-3.2-3B": Shape(3072, 28, 24, 8, 8192, 128256, True, 131072, 5e5, 1e-5, 128, _llama3_rope(32.0)),
    "Llama-3.1-8B": Shape(4096, 32, 32, 8, 14336, 128256, False, 131072, 5e5, 1e-5, 128, _llama3_rope(8.0)),
    "Llama-2-7B": Shape(4096, 32, 32, 32, 11008, 32000, False, 4096, 1e4, 1e-5),
    "Mistral-7B-v0.1": Shape(4096, 32, 32, 8, 14336, 32000, False, 32768, 1e4, 1e-5, sliding_window=4096),
}

PUBLIC_FOR = {  # (arch, size) -> public model; keep in step with the module docstring's table
    **{("qwen2", s): f"Qwen2.5-{m}" for s, m in [("0.5b", "0.5B"), ("1.5b", "1.5B"), ("3b", "3B"), ("7b", "7B"),
                                                  ("8b", "7B")]},
    **{("qwen3", s): f"Qwen3-{m}" for s, m in [("0.5b", "0.6B"), ("1.5b", "1.7B"), ("3b", "4B"), ("7b", "8B"),
                                                ("8b", "8B")]},
    ("llama", "0.5b"): "Llama-3.2-1B", ("llama", "1.5b"): "Llama-3.2-1B", ("llama", "3b"): "Llama-3.2-3B",
    ("llama", "7b"): "Llama-2-7B", ("llama", "8b"): "Llama-3.1-8B",
    **{("mistral", s): "Mistral-7B-v0.1" for s in ("0.5b", "1.5b", "3b", "7b", "8b")},
}

# CPU-test sizes: the family's rope and norm settings, GQA, tiny vocab. qwen3's head_dim makes the q width
# differ from hidden, as in every public Qwen3; llama's rope scaling puts head_dim 16's frequencies in all
# three llama3 bands (kept, smoothed, scaled).
_FAMILY = {
    "qwen2": dict(rope_theta=1e6, rms_eps=1e-6, tied=True),
    "qwen3": dict(rope_theta=1e6, rms_eps=1e-6, tied=True),
    "llama": dict(rope_theta=5e5, rms_eps=1e-5, tied=False, rope_scaling=_llama3_rope(8.0, 256)),
    "mistral": dict(rope_theta=1e4, rms_eps=1e-5, tied=False, sliding_window=4096),
}
_TEST_SIZES = {
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=192),
    "small": dict(hidden=512, layers=8, heads=8, kv_heads=2, intermediate=1536),
}


def model_shape(arch: str, size: str) -> Shape:
    """The dimensions of `arch` at `size` (a public model's for the real sizes)."""
    _check_choice("arch", arch, ARCHS)
    _check_choice("size", size, SIZES)
    if size not in _TEST_SIZES:
        return PUBLIC[PUBLIC_FOR[arch, size]]
    s = Shape(**_TEST_SIZES[size], **_FAMILY[arch], vocab=None, max_positions=2048)
    if arch == "qwen3":
        s = replace(s, head_dim=2 * s.hidden // s.heads)
    if size == "small" and arch == "llama":
        s = replace(s, tied=True)  # as the small public Llamas (3.2-1B/3B); tiny keeps the untied path
    return s


def model_config(arch: str, size: str, dtype: str = "bf16"):
    """The transformers config (LlamaConfig, Qwen2Config, ...) of `arch` at `size`; writes nothing."""
    _check_choice("dtype", dtype, DTYPES)
    torch_dtype = _torch_dtype(dtype)  # (torch before transformers, which imports it)

    s = model_shape(arch, size)
    tok = tokenizer_factory.build_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in tokenizer_factory.SPECIAL_TOKENS}
    kw = dict(
        architectures=[f"{_HF_CLASS[arch]}ForCausalLM"],
        vocab_size=s.vocab or len(tok),  # every id decodes to text: random weights do sample every row
        hidden_size=s.hidden,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        intermediate_size=s.intermediate,
        max_position_embeddings=s.max_positions,
        rms_norm_eps=s.rms_eps,
        rope_theta=s.rope_theta,
        rope_scaling=s.rope_scaling,
        tie_word_embeddings=s.tied,
        initializer_range=INIT_STD,
        bos_token_id=ids[tokenizer_factory.BOS],
        eos_token_id=ids[tokenizer_factory.IM_END],  # generation_config.json lists every stop token
        pad_token_id=ids[tokenizer_factory.PAD],
        dtype=torch_dtype,
    )
    if s.head_dim is not None:
        kw["head_dim"] = s.head_dim
    if arch in ("qwen2", "qwen3"):
        kw.update(use_sliding_window=False, max_window_layers=s.layers)
    if arch == "mistral":
        kw["sliding_window"] = s.sliding_window
    return imports.transformers(f"{_HF_CLASS[arch]}Config")(**kw)


def tensor_specs(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of every weight, in module order (embedding, layers, final norm, head)."""
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    hd = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    bias = cfg.model_type == "qwen2"
    specs = [("model.embed_tokens.weight", (v, h))]
    for n in range(cfg.num_hidden_layers):
        a, m = f"model.layers.{n}.self_attn.", f"model.layers.{n}.mlp."
        specs.append((f"model.layers.{n}.input_layernorm.weight", (h,)))
        for proj, rows in (("q", q), ("k", kv), ("v", kv)):
            specs.append((f"{a}{proj}_proj.weight", (rows, h)))
            if bias:
                specs.append((f"{a}{proj}_proj.bias", (rows,)))
        specs.append((f"{a}o_proj.weight", (h, q)))
        if cfg.model_type == "qwen3":
            specs += [(f"{a}q_norm.weight", (hd,)), (f"{a}k_norm.weight", (hd,))]
        specs += [(f"model.layers.{n}.post_attention_layernorm.weight", (h,)),
                  (f"{m}gate_proj.weight", (i, h)), (f"{m}up_proj.weight", (i, h)), (f"{m}down_proj.weight", (h, i))]
    specs.append(("model.norm.weight", (h,)))
    if not cfg.tie_word_embeddings:
        specs.append(("lm_head.weight", (v, h)))
    return specs


def make_model(arch: str, size: str, out: str | Path, seed: int = 0, dtype: str = "bf16",
               device: str | None = None, progress: bool = True, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write a randomly initialised HF model directory of `arch` at `size` into `out`; return `out`.

    `out` must be absent, empty, or an earlier output of make_model with the same arguments (overwritten).
    config.json is written last: its presence means the directory is complete.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():  # (said before torch and transformers are imported: ~2 s on 2 cores)
        raise ValueError(f"{out} exists and is not a directory")
    model_shape(arch, size)  # (an unknown arch, size or dtype too)
    _check_choice("dtype", dtype, DTYPES)
    import_torch()  # (before transformers, which imports it)
    GenerationConfig = imports.transformers("GenerationConfig")  # noqa: N806 (transformers' name)

    cfg = model_config(arch, size, dtype)
    dev = _device(device)
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    record = {"arch": arch, "size": size, "seed": seed, "dtype": dtype}
    _prepare_out(out, record)
    (out / MARKER).write_text(json.dumps({**record, "rng_device": dev.type}, indent=2) + "\n")
    tok = tokenizer_factory.build_tokenizer()
    tok.save_pretrained(str(out))
    eos = tok.convert_tokens_to_ids(list(tokenizer_factory.EOS_TOKENS))
    GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=eos, pad_token_id=cfg.pad_token_id).save_pretrained(out)
    _write_weights(out, tensor_specs(cfg), seed, _torch_dtype(dtype), dev, max_shard_bytes,
                   f"{arch} {size}" if progress else None)
    cfg.save_pretrained(out)
    return out


def _check_choice(what: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


def _device(device: str | None) -> torch.device:
    torch = import_torch()
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"bad device {device!r}: {e}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: the factory draws weights on cpu or cuda (cuda:N)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _prepare_out(out: Path, record: dict) -> None:
    if out.is_dir() and any(out.iterdir()):
        marker = out / MARKER
        if not marker.exists():
            raise ValueError(f"{out} is not empty and was not written by make_model; choose an empty directory")
        before = {k: v for k, v in json.loads(marker.read_text()).items() if k in record}
        if before != record:
            raise ValueError(f"{out} holds another factory model ({before}); asked for {record}")
        for f in out.iterdir():  # our own earlier output; its sharding may differ
            if f.is_dir():
                shutil.rmtree(f)
            else:
                f.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") >> 1


class _Drawer:
    """Draws each tensor into one reused host buffer: pinned when drawing on CUDA, so the copy back is a DMA at
    full speed, and no fresh pages are faulted in per tensor. A drawn tensor is valid until the next draw."""

    def __init__(self, specs, seed: int, dtype: torch.dtype, dev: torch.device):
        self.seed, self.dev = seed, dev
        torch = import_torch()
        self.host = torch.empty(max(prod(s) for _, s in specs), dtype=dtype, pin_memory=dev.type == "cuda")

    def __call__(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        out = self.host[: prod(shape)].view(shape)
        if name.endswith("norm.weight"):
            return out.fill_(1.0)
        torch = import_torch()
        gen = torch.Generator(device=self.dev).manual_seed(_tensor_seed(self.seed, name))
        if self.dev.type == "cpu":
            return out.normal_(0.0, INIT_STD, generator=gen)
        return out.copy_(torch.empty(shape, dtype=out.dtype, device=self.dev).normal_(0.0, INIT_STD, generator=gen))


def _shards(specs, itemsize: int, max_shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list] = [[]]
    size = 0
    for name, shp in specs:
        n = prod(shp) * itemsize
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shp))
        size += n
    return shards


def _write_weights(out: Path, specs, seed: int, dtype: torch.dtype, dev: torch.device, max_shard_bytes: int,
                   label: str | None) -> None:
    itemsize = dtype.itemsize
    shards = _shards(specs, itemsize, max_shard_bytes)
    total = sum(prod(s) for _, s in specs) * itemsize
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    draw = _Drawer(specs, seed, dtype, dev)
    with _Progress(label, total) as bar:
        for fname, shard in zip(names, shards, strict=True):
            _write_safetensors(out / fname, shard, draw, dtype, bar.advance)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {name: f for f, shard in zip(names, shards, strict=True) for name, _ in shard}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_safetensors(path: Path, specs, draw, dtype: torch.dtype, advance) -> None:
    """Stream tensors into one safetensors file: 8-byte header length, JSON header, raw little-endian data.

    Written by hand rather than with safetensors.torch.save_file so each tensor goes from the device to disk
    as soon as it is drawn (no shard-sized staging copy), under a header laid out the same way every time.
    """
    torch = import_torch()
    itemsize, st_dtype = dtype.itemsize, _SAFETENSORS_DTYPE[str(dtype).removeprefix("torch.")]
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shp in specs:
        n = prod(shp) * itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shp), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors' own writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shp in specs:
            t = draw(name, shp)
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            advance(t.numel() * itemsize)


class _Progress:
    """A rich progress bar over bytes written, or nothing when `label` is None."""

    def __init__(self, label: str | None, total: int):
        self.label, self.total, self._bar = label, total, None

    def __enter__(self) -> _Progress:
        if self.label is not None:
            from rich import progress as rp

            self._bar = rp.Progress("[progress.description]{task.description}", rp.BarColumn(), rp.DownloadColumn(),
                                    rp.TransferSpeedColumn(), rp.TimeElapsedColumn())
            self._bar.__enter__()
            self._task = self._bar.add_task(f"writing {self.label}", total=self.total)
        return self

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


LORA_STD = 0.05  # A's and B's: a delta of the base weights' order (PEFT starts B at zero; a trained one is not)


def make_lora(model_dir: str | Path, out: str | Path, rank: int = 4, alpha: float = 8.0, seed: int = 0,
              targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
              rslora: bool = False, layers: list[int] | None = None) -> Path:
    """Write a random LoRA adapter of the model in `model_dir` in PEFT's format (adapter_config.json,
    adapter_model.safetensors with PEFT's tensor names) into `out`; return `out`. `layers`: only these layers'
    modules (all by default)."""
    torch = import_torch()
    from safetensors.torch import save_file

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kvh = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // heads
    shapes = {"q_proj": (heads * d, h), "k_proj": (kvh * d, h), "v_proj": (kvh * d, h), "o_proj": (h, heads * d),
              "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}
    tensors = {}
    for n in range(cfg["num_hidden_layers"]) if layers is None else layers:
        for mod in targets:
            rows, feats = shapes[mod]
            part = "self_attn" if mod in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{n}.{part}.{mod}"
            for ab, shape in (("A", (rank, feats)), ("B", (rows, rank))):
                g = torch.Generator().manual_seed(_tensor_seed(seed, f"{key}.lora_{ab}"))
                tensors[f"{key}.lora_{ab}.weight"] = (torch.randn(shape, generator=g) * LORA_STD).contiguous()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(model_dir), "r": rank,
        "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": list(targets), "bias": "none",
        "use_rslora": rslora, "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}}, indent=2) + "\n")
    return out


def merge_lora(model_dir: str | Path, adapter_dir: str | Path, out: str | Path) -> Path:
    """A copy of the model in `model_dir` with the adapter's deltas merged into its weights (W + scale B A, in fp32,
    then the checkpoint's dtype): the reference an engine serving the adapter unmerged is checked against."""
    import_torch()  # (before safetensors.torch imports it)
    from safetensors.torch import load_file, save_file

    model_dir, out = Path(model_dir), Path(out)
    acfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    lora = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    shutil.copytree(model_dir, out)
    for f in sorted(out.glob("*.safetensors")):
        ts = load_file(str(f))
        for name in list(ts):
            key = "base_model.model." + name.removesuffix(".weight")
            if f"{key}.lora_A.weight" in lora:
                a, b = lora[f"{key}.lora_A.weight"].float(), lora[f"{key}.lora_B.weight"].float()
                r = a.shape[0]
                scale = acfg["lora_alpha"] / (r ** 0.5 if acfg.get("use_rslora") else r)
                ts[name] = (ts[name].float() + scale * (b @ a)).to(ts[name].dtype).contiguous()
        save_file(ts, str(f), metadata={"format": "pt"})
    return out


def main(argv: list[str] | None = None) -> int:
    """python -m controller.model_factory [--result-fd FD] NAME=DIR ...: the embedded default's models made into these
    folders (`config.ensure_demo_models`: SmolLM2 converted, the demos drawn; those made already are left alone).
    `tokenpool serve`'s first run runs it as its child (`serve.ensure_demo_models`), so that torch and transformers stay
    out of the server's process. Exit 2 where a model cannot be made into its folder (an OSError or ValueError: the
    cache's to fix), 1 on another error; the reason, one line, written to FD."""
    import argparse
    import logging
    import os
    import signal
    import sys
    import traceback

    from controller.config import ModelSpec, ServerConfig, ensure_demo_models

    ap = argparse.ArgumentParser(prog="python -m controller.model_factory",
                                 description="Make the embedded default's models (tokenpool serve's first run does).")
    ap.add_argument("models", nargs="+", metavar="NAME=DIR", help="a default model's name and its folder")
    ap.add_argument("--result-fd", type=int, default=None, metavar="FD", help="where the reason of a failure is written")
    a = ap.parse_args(argv)
    # the server stopped while this runs (children.stop_all's SIGTERM): unwound as an exception is, so that a
    # conversion's temporary folder is removed on the way out
    signal.signal(signal.SIGTERM, lambda sig, _frame: sys.exit(128 + sig))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    # torch's loggers at its own default: a SIGTERM during `import torch` (Ctrl-C on a first run's start-up) left
    # them unset, and its atexit "FakeTensor cache stats" lines came out at INFO under the server's "stopped"
    logging.getLogger("torch").setLevel(logging.WARNING)
    models = [ModelSpec(name=n, path=d) for n, _, d in (m.partition("=") for m in a.models)]
    try:
        ensure_demo_models(ServerConfig(models=models, auth=False, is_default=True))
        return 0
    except Exception as e:  # noqa: BLE001 - said to the server, which says it as its one line
        ours = isinstance(e, (OSError, ValueError))  # (ValueError: make_model's refusal of a path that is a file)
        if not isinstance(e, (OSError, ValueError, RuntimeError)):  # (RuntimeError: real_model's own words, e.g.
            traceback.print_exc()  # the SmolLM2 wheel that could not be fetched; anything else, a bug: its traceback)
        why = e.strerror if isinstance(e, OSError) and e.strerror else e
        if a.result_fd is not None:
            with os.fdopen(a.result_fd, "w") as f:
                f.write(" ".join(str(why).split()) + "\n")
        return 2 if ours else 1


if __name__ == "__main__":
    from controller import children

    try:
        code = main()
    except SystemExit as e:  # (argparse's, or the SIGTERM's, unwound: a half-made folder removed)
        code = e.code
    children.exit_now(code)
