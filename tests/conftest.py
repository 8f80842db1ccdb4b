"""Shared fixtures: tiny real models made by the model factory, cached per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ARCHS = ("llama", "qwen2", "qwen3", "mistral")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


def _make(cache: Path, arch: str, size: str = "tiny", dtype: str = "fp32", seed: int = 0) -> Path:
    from controller.model_factory import make_model

    out = cache / f"{arch}-{size}-{dtype}-{seed}"
    if not (out / "config.json").exists():
        make_model(arch=arch, size=size, out=out, seed=seed, dtype=dtype, device="cpu", progress=False)
    return out


@pytest.fixture(scope="session")
def make_tiny(model_cache):
    """make_tiny(arch="qwen2", size="tiny", dtype="fp32", seed=0) -> model directory (cached)."""

    def f(arch: str = "qwen2", size: str = "tiny", dtype: str = "fp32", seed: int = 0) -> Path:
        return _make(model_cache, arch, size, dtype, seed)

    return f


@pytest.fixture(scope="session")
def tiny_model(make_tiny) -> Path:
    return make_tiny("qwen2")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
