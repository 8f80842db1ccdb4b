"""Ollama's load request (an empty prompt to /api/generate, no messages to /api/chat) in the dashboard's window: it
made nothing for its caller and its time is the model's load, so it is no request of the last 60 s (GET
/admin/pool's per-model and per-tenant `requests`, TTFT/TPOT and SLO attainment; the Models and Tenants views), as it
is none of the tenant's usage nor a latency sample in /metrics (512c678). It was: a tenant that had only loaded
showed 100% attainment over its loads, and the model a TTFT p50/p99 that was its load's time."""

from __future__ import annotations

import httpx
import pytest

from controller.keys import hash_key
from tests.ports import live_server_on

PORTS = range(26100, 26120)
ADMIN = "admin-ux60h-load-window"
ADM = {"Authorization": f"Bearer {ADMIN}"}
KEY = "key-ux60h-load-window-abcdef"


@pytest.fixture(scope="module")
def server(make_tiny, tmp_path_factory):
    tiny = str(make_tiny("qwen2"))
    cfg = {"admin_token_hash": hash_key(ADMIN),
           # dead_after_s past the 5 s beat: at its 3 s default the worker was declared dead (and killed) 3 s after each
           # registration, again and again (~15 s of the setup) until one lived through its warm-up
           "workers": {"local": "cpu", "standby": False, "heartbeat_s": 5.0, "dead_after_s": 30},
           "models": [{"name": "ga", "path": tiny, "engine": {"max_num_seqs": 4, "max_model_len": 128}}],
           "tenants": [{"name": "loader", "key_hashes": [hash_key(KEY)]}]}
    with live_server_on(PORTS, cfg, tmp_path_factory.mktemp("ux60h_load_window")) as srv:
        yield srv


def window(server) -> tuple[dict, dict]:
    """(model ga's row, tenant loader's row) of GET /admin/pool."""
    r = httpx.get(server.url + "/admin/pool", headers=ADM, timeout=30)
    assert r.status_code == 200, r.text
    p = r.json()
    return (next(m for m in p["models"] if m["name"] == "ga"), next(t for t in p["tenants"] if t["name"] == "loader"))


def test_a_load_is_no_request_of_the_dashboards_window(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    for _ in range(2):
        r = httpx.post(server.url + "/api/generate", headers=auth, json={"model": "ga"}, timeout=120)
        assert r.status_code == 200 and r.json()["done_reason"] == "load", r.text
        r = httpx.post(server.url + "/api/chat", headers=auth, json={"model": "ga", "messages": []}, timeout=120)
        assert r.status_code == 200 and r.json()["done_reason"] == "load", r.text
    m, t = window(server)
    assert (m["requests"], m["ttft_p50"], m["ttft_p99"], m["attainment"]) == (0, None, None, None), m
    assert (t["requests"], t["attainment"]) == (0, None), t
    # a generation is one (the window is fed)
    r = httpx.post(server.url + "/api/generate", headers=auth, timeout=120,
                   json={"model": "ga", "prompt": "Hi", "stream": False, "options": {"num_predict": 2}})
    assert r.status_code == 200 and r.json()["done_reason"] != "load", r.text
    m, t = window(server)
    assert m["requests"] == 1 and m["ttft_p50"] is not None and m["attainment"] is not None, m
    assert t["requests"] == 1, t
