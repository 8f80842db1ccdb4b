"""What a model directory must be for tokenpool to serve it, checked with the standard library alone (the controller
process imports neither torch nor transformers): a Hugging Face directory whose config.json names an architecture
the engine runs. `tokenpool serve` checks its models with it before it starts, the admin API a model before it is
registered; `ModelConfig.from_hf` (the engine's reader) refuses the same architectures."""

from __future__ import annotations

import json
from pathlib import Path

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "mistral")
# the weights' dtypes an engine may be asked for (`ModelConfig`'s DTYPES, and "auto": the checkpoint's own)
DTYPE_NAMES = ("auto", "bf16", "bfloat16", "fp16", "float16", "half", "fp32", "float32", "float")


def model_dir_problem(path: str | Path) -> str | None:
    """Why `path` cannot be served, in a sentence naming it; None when it can (as far as config.json says)."""
    p = Path(path)
    if not p.exists():
        return f"path {p} does not exist"
    if not p.is_dir():
        return (f"path {p} is a file; give the model's directory" +
                (" (a .gguf file is served by `tokenpool serve FILE.gguf`)" if p.suffix == ".gguf" else ""))
    cfg = p / "config.json"
    if not cfg.is_file():
        return f"{p} has no config.json (not a Hugging Face model directory)"
    try:
        data = json.loads(cfg.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"{cfg} cannot be read as JSON: {e}"
    arch = data.get("model_type") if isinstance(data, dict) else None
    if arch not in SUPPORTED_ARCHS:
        return f"{cfg}: architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHS)}"
    return None
