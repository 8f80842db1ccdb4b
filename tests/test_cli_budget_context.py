"""`tokenpool serve --gpu-budget` where the local workers run on the CPU, and a configuration's engine.max_model_len
past the model's positions: what the controller says and admits agrees with what the engines do."""

from __future__ import annotations

import logging
import re
import socket
from unittest import mock

import openai

from controller import pool
from controller.serve import prepare
from load_tests import live_server
from load_tests.live_server import LiveServer


def port_in_range(lo: int = 18720, hi: int = 18799) -> int:
    """A free TCP port of the range these tests take (18720-18799)."""
    for port in range(lo, hi + 1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {lo}-{hi}")


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
    assert cfg.gpus.budget_gb == 2.5 and cfg.gpus.cpu_budget_gb == 8.0
    assert not [r for r in caplog.records if "--gpu-budget" in r.getMessage()]


def test_gpu_budget_is_the_cpu_workers_arena_live(make_tiny, tmp_path):
    """A live server whose one local worker is a CPU one: its arena is --gpu-budget's size (it was 8 GB, the
    CPU default, whatever the flag said)."""
    cfg = {"workers": {"local": "cpu", "listen": {"host": "127.0.0.1", "port": port_in_range(18790, 18799)}},
           "models": [{"name": "tiny", "path": str(make_tiny("qwen2"))}]}
    with mock.patch.object(live_server, "free_port", port_in_range), \
            LiveServer(cfg, tmp_path, args=["--gpu-budget", "1.5"]) as srv:
        log = srv.log_path.read_text()
        assert re.search(r"registered as w0 \(arena 1\.5 GB\)", log), log[-3000:]
        assert "--gpu-budget 1.5 GB is the CPU worker's arena" in log, log[-3000:]
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert c.completions.create(model="tiny", prompt="Hi", max_tokens=2, temperature=0,
                                    extra_body={"ignore_eos": True}).usage.completion_tokens == 2
