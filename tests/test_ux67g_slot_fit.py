"""A pooled model whose weights fit the arena's weight space by their bytes, but not as a slot (its size rounded up
to the arena's alignment): its registration fails, said as any model that cannot fit, and its requests are 503s
naming why. Before, it registered, and the policy never found room for its slot: its requests waited for ever
("planned no step for 5 s with requests waiting")."""

from __future__ import annotations

import time
import uuid

import httpx
import openai
import pytest

import load_tests.live_server as live_server
from tests.ports import free_port

MiB = 1 << 20
PAGE = 16 * 512
PORTS = range(30050, 30100)


def test_a_model_whose_slot_cannot_fit_is_refused_not_left_waiting(make_tiny, tmp_path):
    big, small = make_tiny("llama"), make_tiny("qwen2")  # 2.3 MiB of weights (a 4 MiB slot), and 1.4 MiB
    cfg = {"workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.2},
           # the KV region takes one 2 MiB aligned slot; 2.5 MiB are left for weights: 2.3 MiB fit, 4 do not
           "gpus": {"cpu_budget_gb": (4 * MiB + MiB // 2) / 1e9, "kv_cache_gb": 48 * PAGE / 1e9,
                    "host_cache_namespace": f"test-{uuid.uuid4().hex[:10]}"},
           "models": [{"name": "big", "path": str(big)}, {"name": "small", "path": str(small)}]}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(live_server, "free_port", lambda: free_port(PORTS))
        srv = live_server.LiveServer(cfg, tmp_path, wait_ready=False)
    with srv:
        deadline, health = time.monotonic() + 30, {}
        while time.monotonic() < deadline and "big" not in health.get("failed_models", {}):
            try:
                health = httpx.get(srv.url + "/health", timeout=2).json()
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        assert "can never fit" in health.get("failed_models", {}).get("big", ""), (health, srv.log())
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=20)
        with pytest.raises(openai.InternalServerError) as e:
            c.completions.create(model="big", prompt="hi", max_tokens=3)
        assert e.value.status_code == 503 and "a slot of 4.0 MiB" in str(e.value)
        r = c.completions.create(model="small", prompt="hi", max_tokens=3)  # the other model serves
        assert r.usage.completion_tokens == 3
