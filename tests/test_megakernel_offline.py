"""The batch-1 decode megakernel's host side without a GPU: the parameter table the Python side writes is the one the
CUDA source reads, its shared-memory layout fits Hopper's limit for the models it serves, and it refuses what it
cannot run. With nvcc on PATH, the source also compiles for sm_90 (its GPU tests: tests/test_gpu_megakernel.py)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch

from controller.model_factory import model_shape
from model_swapper.model_config import ModelConfig
from token_scheduler.model import megakernel

SRC = megakernel.SRC.read_text()
HOPPER_SMEM = 232448  # shared_memory_per_block_optin on the H100 and H200


def _enum(prefix: str) -> list[str]:
    body = re.search(r"enum \{([^}]*" + prefix + r"N)\s*\}", SRC).group(1)
    return [n.strip()[len(prefix):] for n in body.split(",") if n.strip()][:-1]


def test_the_parameter_and_weight_tables_match_the_cuda_source():
    assert _enum("P_") == list(megakernel.P_NAMES)
    assert _enum("W_") == ["QKV", "QKVB", "O", "GU", "DOWN", "LN1", "LN2"]
    assert [k.upper().replace("_", "").replace("GATEUP", "GU") for k in megakernel.W_KEYS] == _enum("W_")
    for name, value in (("D", megakernel.D), ("KP", megakernel.KP), ("RG", megakernel.RG), ("NCW", megakernel.NCW),
                        ("SPL", megakernel.SPL), ("NBIAS", megakernel.NBIAS)):
        assert re.search(rf"#define {name} (\d+)", SRC).group(1) == str(value), name


def _cfg(arch: str, size: str) -> ModelConfig:
    s = model_shape(arch, size)
    return ModelConfig(arch=arch, hidden_size=s.hidden, num_layers=s.layers, num_heads=s.heads,
                       num_kv_heads=s.kv_heads, head_dim=s.head_dim or s.hidden // s.heads,
                       intermediate_size=s.intermediate, vocab_size=s.vocab, max_position_embeddings=4096,
                       rms_norm_eps=s.rms_eps, rope_theta=s.rope_theta, rope_scaling=None,
                       tie_word_embeddings=s.tied, qkv_bias=True, qk_norm=False, torch_dtype=torch.bfloat16,
                       eos_token_ids=(0,))


@pytest.mark.parametrize("size", ["1.5b", "7b"])
def test_the_shared_memory_layout_fits_hopper(size):
    nslot, smem = megakernel.smem_layout(_cfg("qwen2", size), HOPPER_SMEM)
    assert nslot >= 4 and smem <= HOPPER_SMEM
    assert megakernel.smem_layout(_cfg("qwen2", size), smem) == (nslot, smem)
    with pytest.raises(ValueError, match="shared memory"):
        megakernel.smem_layout(_cfg("qwen2", size), 64 * 1024)


def test_it_refuses_what_it_cannot_run():
    cfg = _cfg("qwen2", "1.5b")
    w = {"l0.qkv": torch.zeros(1, dtype=torch.bfloat16)}
    assert "Hopper" in megakernel.reason_not(cfg, w, torch.zeros(1, dtype=torch.bfloat16))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_the_source_compiles_for_sm90(tmp_path):
    out = subprocess.run(["nvcc", "-std=c++17", "-arch=sm_90", "-cubin", "-Xptxas", "-v", "-o",
                          str(tmp_path / "k.cubin"), str(megakernel.SRC)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "tp_decode_step" in out.stderr
