"""Faults in the pooled engine as served: a worker SIGKILLed while it swaps weights in and KV out (three tiny
models over a one-slot budget and a small KV region: every switch is a weight load, idle models' KV goes to
host pages). Streams that had started end with an error event; the worker comes back; the models are
registered again and serve the same tokens as before; nothing leaks (processes, /dev/shm host copies)."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest

from controller.keys import hash_key
from load_tests.live_server import LiveServer

ADMIN = "admin-pooled-faults"
MiB = 1 << 20
PAGE = 16 * 512
H = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def models(make_tiny):
    return {"fa": make_tiny("qwen2"), "fb": make_tiny("qwen3"), "fc": make_tiny("qwen2", seed=1)}


def _pooled(srv) -> dict:
    es = [e for e in httpx.get(srv.url + "/admin/engines", headers=H, timeout=10).json() if e["alive"]]
    return es[0] if es else {}


def _greedy(c, model, n=12) -> str:
    return c.completions.create(model=model, prompt="Once upon a time", max_tokens=n, temperature=0,
                                extra_body={"ignore_eos": True}).choices[0].text


def test_worker_killed_during_weight_and_kv_swaps(models, tmp_path):
    ns = f"test-{uuid.uuid4().hex[:10]}"
    cfg = {
        "admin_token_hash": hash_key(ADMIN),
        "workers": {"local": "cpu", "heartbeat_s": 0.2, "dead_after_s": 1.5},
        # one 2 MiB weight slot for three 2 MiB models; 64 KV pages: six long streams overflow it
        "gpus": {"cpu_budget_gb": 4 * MiB / 1e9, "kv_cache_gb": 64 * PAGE / 1e9, "host_cache_namespace": ns},
        "models": [{"name": n, "path": str(p), "slo": {"ttft_s": 60, "tpot_s": 10}} for n, p in models.items()],
    }
    with LiveServer(cfg, tmp_path / "srv") as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)
        before = {n: _greedy(c, n) for n in models}
        e0 = _pooled(srv)
        results: dict = {}

        def stream(i, model):
            got = 0
            try:
                for ch in c.completions.create(model=model, prompt=f"story {i}", max_tokens=400, stream=True,
                                               extra_body={"ignore_eos": True}, temperature=0):
                    got += bool(ch.choices)
                results[i] = ("done", got)
            except (openai.APIError, httpx.HTTPError) as e:
                results[i] = ("error", got, str(e))

        threads = [threading.Thread(target=stream, args=(i, list(models)[i % 3])) for i in range(6)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60  # until weights have moved and some KV went to host pages
        while True:
            p = _pooled(srv).get("pool") or {}
            if p.get("switches", 0) >= 6 and p.get("kv_swapped_out", 0) >= 1:
                break
            assert time.monotonic() < deadline, p
            time.sleep(0.05)
        assert len(results) < 6, "every stream finished before the kill: nothing was tested"
        t_kill = time.monotonic()
        os.kill(e0["pid"], signal.SIGKILL)
        for t in threads:
            t.join(60)
        assert len(results) == 6
        errors = [r for r in results.values() if r[0] == "error"]
        assert errors and all("died" in r[2] or "engine" in r[2] for r in errors)
        assert all(r[1] > 0 for r in errors)  # those had started: an error event, not a silent end
        assert time.monotonic() - t_kill < 30
        deadline = time.monotonic() + 60  # restarted, the models registered again, same tokens as before
        while True:
            e1 = _pooled(srv)
            if e1 and e1["pid"] != e0["pid"] and all(r["state"] == "ready" for r in e1["models"]) \
                    and len(e1["models"]) == 3:
                break
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert {n: _greedy(c, n) for n in models} == before
        shm = Path("/dev/shm") / f"tokenpool-{ns}"
        segs = [f for f in shm.iterdir() if f.suffix not in (".json", ".lock")] if shm.exists() else []
        assert len(segs) <= 3  # the new worker attached to the copies the dead one made: none twice
        worker_pid = e1["pid"]
    assert not (Path("/dev/shm") / f"tokenpool-{ns}").exists()  # gone with the server
    with pytest.raises(ProcessLookupError):
        os.kill(worker_pid, 0)
    with pytest.raises(ProcessLookupError):
        os.kill(e0["pid"], 0)
