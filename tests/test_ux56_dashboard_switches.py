"""The dashboard's model switches agree with /metrics after a drain and resume.

An operator drained the engine and resumed it (the Pool view's Drain, then Resume): the engine card's "switches" and
the Switches tile went back to 0 while /metrics' tokenpool_model_switches_total kept its hundreds. The worker counts
switches in its pooled engine, which is made anew once its last model is unregistered (a drain gives every
registration back); the pool view now reports the controller's count since the start, the one /metrics exports.
"""

from __future__ import annotations

import re
import time

import httpx

from controller.keys import hash_key
from load_tests.live_server import LiveServer

ADMIN = "admin-ux56-switches"
H = {"Authorization": f"Bearer {ADMIN}"}


def _metric_switches(c: httpx.Client) -> float:
    text = c.get("/metrics", headers=H).text
    m = re.search(r'^tokenpool_model_switches_total\{engine="w0"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def _complete(c: httpx.Client, model: str) -> None:
    r = c.post("/v1/completions", json={"model": model, "prompt": "hello", "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200, r.text


def _until(pred, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (v := pred()):
        assert time.monotonic() < deadline, what
        time.sleep(0.2)
    return v


def test_switches_survive_a_drain_and_resume(tmp_path, make_tiny):
    cfg = {"admin_token_hash": hash_key(ADMIN), "workers": {"local": "cpu", "standby": False},
           "models": [{"name": "tiny-a", "path": str(make_tiny("qwen2"))},
                      {"name": "tiny-b", "path": str(make_tiny("qwen2", seed=1))}]}
    with LiveServer(cfg, tmp_path, ready_timeout=120) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        for model in ("tiny-a", "tiny-b", "tiny-a"):
            _complete(c, model)
        before = _until(lambda: _metric_switches(c), "no model switch counted")
        assert c.post("/admin/engines/w0/drain", headers=H).status_code == 200
        _until(lambda: not c.get("/admin/pool", headers=H).json()["engines"][0]["registered"], "never drained")
        assert c.post("/admin/engines/w0/resume", headers=H).status_code == 200
        _until(lambda: len(c.get("/admin/pool", headers=H).json()["engines"][0]["registered"]) == 2, "never back")
        _complete(c, "tiny-b")

        def agree():
            pool = c.get("/admin/pool", headers=H).json()["engines"][0]
            return pool if pool["switches"] == _metric_switches(c) else None

        w0 = _until(agree, "the pool's switches and /metrics' disagree", timeout=10)
        assert w0["switches"] >= before > 0, (w0["switches"], before)
