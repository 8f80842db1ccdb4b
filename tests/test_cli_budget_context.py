"""`tokenpool serve --gpu-budget` where the local workers run on the CPU, and a configuration's engine.max_model_len
past the model's positions: what the controller says and admits agrees with what the engines do."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from controller import pool
from controller.serve import prepare
from load_tests.live_server import REPO_ROOT, LiveServer


def test_gpu_budget_sizes_the_cpu_workers_arena_where_the_local_workers_are_on_the_cpu(make_tiny, monkeypatch,
                                                                                           caplog):
    """--gpu-budget on a machine whose local worker is a CPU one used to set gpus.budget_gb only, which a CPU worker
    never reads (its arena is gpus.cpu_budget_gb): the flag was silently ignored. It sizes that arena now, saying so
    in one line; where the local workers are GPUs, the CPU budget is left alone."""
    q = make_tiny("qwen2")
    monkeypatch.setattr(pool, "local_devices", lambda spec: ["cpu"])
    with caplog.at_level(logging.WARNING, logger="tokenpool"):
        cfg, _ = prepare(None, None, None, [q], [], 2.5)
    assert cfg.gpus.cpu_budget_gb == 2.5 and cfg.gpus.budget_gb == 2.5
    said = [r.getMessage() for r in caplog.records if "--gpu-budget" in r.getMessage()]
    assert len(said) == 1 and "gpus.cpu_budget_gb" in said[0] and "\n" not in said[0], said
    monkeypatch.setattr(pool, "local_devices", lambda spec: ["cuda:0"])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tokenpool"):
        cfg, _ = prepare(None, None, None, [q], [], 2.5)
    assert cfg.gpus.budget_gb == 2.5 and cfg.gpus.cpu_budget_gb is None  # (the CPU default: hosting.default_budget)
    assert not [r for r in caplog.records if "--gpu-budget" in r.getMessage()]


def _shorten(src: Path, dst: Path) -> Path:
    """A copy of the model at `src` with a 64-token context (max_position_embeddings)."""
    shutil.copytree(src, dst)
    c = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**c, "max_position_embeddings": 64}))
    return dst


@pytest.fixture(scope="module")
def live(make_tiny, tmp_path_factory):
    """One live server for the live tests below (a start-up of a real model is most of their cost): `tokenpool serve
    --gpu-budget 1.5` whose one local worker is a CPU one, serving "tiny" and "short" (the 64-token copy of it,
    engine.max_model_len 1000, loaded at its first request as Ollama's are). Neither test asks for the other's
    model."""
    work = tmp_path_factory.mktemp("budget-context")
    short = _shorten(make_tiny("qwen2"), work / "short")
    cfg = {"workers": {"local": "cpu", "standby": False},
           "models": [{"name": "tiny", "path": str(make_tiny("qwen2"))},
                      {"name": "short", "path": str(short), "engine": {"max_model_len": 1000},
                       "replicas": {"min": 0, "max": 1}}]}
    with LiveServer(cfg, work / "srv", args=["--gpu-budget", "1.5"]) as srv:
        yield srv


def test_gpu_budget_is_the_cpu_workers_arena_live(live):
    """A live server whose one local worker is a CPU one: its arena is --gpu-budget's size (it was 8 GB, the
    CPU default, whatever the flag said)."""
    srv = live
    log = srv.log_path.read_text()
    assert re.search(r"registered as w0 \(arena 1\.5 GB\)", log), log[-3000:]
    assert "--gpu-budget 1.5 GB is the CPU worker's arena" in log, log[-3000:]
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert c.completions.create(model="tiny", prompt="Hi", max_tokens=2, temperature=0,
                                extra_body={"ignore_eos": True}).usage.completion_tokens == 2
    # `tokenpool ps` says the arena the flag gave (its engine line named the device's memory only)
    token = re.search(r"admin token for this run written to (\S+) ", log).group(1)
    r = subprocess.run([sys.executable, "-m", "controller.cli", "ps", "--url", srv.url], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO_ROOT),
                            "TOKENPOOL_ADMIN_TOKEN": Path(token).read_text().strip()})
    line = next(x for x in r.stdout.splitlines() if x.startswith("engine w0"))
    assert re.search(r"[\d.]+ [KMGT]?B weights and [\d.]+ [KMGT]?B KV cache in a 1\.5 GB arena", line), line


def test_ps_names_each_engines_arena():
    from controller.ps import render

    engine = {"id": "w0", "host": "h", "device": "cuda:0", "memory_bytes": 80 * 10**9, "alive": True,
              "inflight": 0, "step_s": 0.01, "models": [],
              "pool": {"vram": {"budget_bytes": 60 * 10**9, "weights_bytes": 3 * 10**9, "kv_bytes": 6 * 10**9}}}
    assert "engine w0 on h/cuda:0: 3.0 GB weights and 6.0 GB KV cache in a 60.0 GB arena, 0 in " \
        "flight" in render([], [engine])
    # a pooled engine's memory_bytes, once it reports, is its arena's room for weights (EnginePool._stats): the
    # line called the 7.5 GB of a 25 GB machine's 8 GB CPU arena "the device"
    cpu = {**engine, "device": "cpu", "memory_bytes": 7_498_780_672,
           "pool": {"vram": {"budget_bytes": 8 * 10**9, "weights_bytes": 0, "kv_bytes": 501_219_328}}}
    line = render([], [cpu]).splitlines()[-1]
    assert line.startswith("engine w0 on h/cpu: 0 B weights and 501.2 MB KV cache in a 8.0 GB arena, "
                           "0 in flight") and "7.5 GB" not in line, line
    cpu["pool"]["vram"]["kv_bytes"] = 0  # (no KV slot in the arena at that moment: said, not left out)
    assert "0 B weights and 0 B KV cache in a 8.0 GB arena, 0 in flight" in render([], [cpu])
    del engine["pool"]  # (no pool view yet: the device's memory, as before)
    assert "engine w0 on h/cuda:0: 0 B of 80.0 GB used by weights, 0 in flight" in render([], [engine])


@pytest.fixture
def short_model(make_tiny, tmp_path):
    """The tiny qwen2 model with a 64-token context (max_position_embeddings), which the engine bounds a longer
    configured max_model_len by."""
    return _shorten(make_tiny("qwen2"), tmp_path / "short")


def test_a_configured_max_model_len_past_the_models_positions_is_the_models(short_model, tmp_path, caplog):
    """engine.max_model_len 1000 over a model of 64 positions: the engine runs 64 (min of the two); the controller
    now takes that effective 64 as the model's context too (a relative path in a file, an absolute one, and a
    model registered through the admin API's ModelSpec alike), saying so in one line; one within the model's is
    kept as it is."""
    from controller.config import ModelSpec, load_config

    (tmp_path / "c.yaml").write_text("models:\n  - name: s\n    path: short\n    engine: {max_model_len: 1000}\n"
                                     "  - name: k\n    path: short\n    engine: {max_model_len: 32}\n")
    with caplog.at_level(logging.WARNING, logger="tokenpool"):
        cfg = load_config(tmp_path / "c.yaml")
    assert [m.engine.max_model_len for m in cfg.models] == [64, 32]
    said = [r.getMessage() for r in caplog.records if "max_model_len" in r.getMessage()]
    assert len(said) == 1 and "model 's'" in said[0] and "1000" in said[0] and "64" in said[0], said
    spec = ModelSpec.model_validate({"name": "s", "path": str(short_model), "engine": {"max_model_len": 1000}})
    assert spec.engine.max_model_len == 64


def test_models_and_a_too_long_prompts_400_say_the_engines_context_live(live):
    """/v1/models said the configured 1000 while the engine runs 64, and the controller admitted prompts the
    engine then refused. Now: the card says 64 before and after the model loads, a 64-token prompt is a 400
    naming 64, and a 63-token one is served. (Once the model had loaded, its engine's 64 was taken; until then,
    for a model loaded on demand, the controller went by the configured 1000.)"""
    srv = live  # "short": engine.max_model_len 1000 over 64 positions, loaded at its first request
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert c.models.retrieve("short").model_extra["max_model_len"] == 64
    with pytest.raises(openai.BadRequestError) as ei:
        c.completions.create(model="short", prompt=[5] * 64, max_tokens=1)
    assert "maximum context length is 64 tokens" in ei.value.message, ei.value.message
    r = c.completions.create(model="short", prompt=[5] * 63, max_tokens=1, extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == 63 and r.usage.completion_tokens == 1
    assert [m.model_extra["max_model_len"] for m in c.models.list() if m.id == "short"] == [64]
    card = httpx.get(srv.url + "/v1/models/short", timeout=10).json()
    assert card["max_model_len"] == 64


def test_ps_says_a_model_on_a_dead_engine_is_unavailable():
    """A model registered on an engine that died read `resident` in `tokenpool ps` while the engine's own line said
    dead: now `unavailable` there (a live engine's row keeps its residency)."""
    from controller.ps import rows

    model = {"name": "m", "size_bytes": 10**9, "last_used": None}
    eng = {"id": "w0", "host": "h", "device": "cuda:0", "alive": False,
           "models": [{"model": "m", "state": "ready", "inflight": 0}],
           "pool": {"models": {"m": {"state": "resident"}}}}
    assert rows([model], [eng], now=0.0)[0][2:5] == ["w0", "h/cuda:0", "unavailable"]
    eng["alive"] = True
    assert rows([model], [eng], now=0.0)[0][2:5] == ["w0", "h/cuda:0", "resident"]
