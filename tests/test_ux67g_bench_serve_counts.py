"""`bench serve --url` against a pooled server of three models over one weight slot: its steps, switches, KV
swap-outs and the switch and load events it counted are what the server counted over the point (GET /admin/engines
and /metrics once the engines reported after it). The point's counters were read at its last response, and its
event stream stopped there: the last heartbeat's steps, switches and loads (up to `workers.heartbeat_s` of them)
were missing from the report. Its config gives the server's arena and KV region (it gave the command's defaults)."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

import load_tests.live_server as live_server
from controller.keys import hash_key
from load_tests.bench_serve import run_serve
from tests.ports import free_port

ADMIN = "admin-67g"
MiB = 1 << 20
PAGE = 16 * 512
PORTS = range(30050, 30100)


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def _engine(srv) -> dict:
    (e,) = [e for e in httpx.get(srv.url + "/admin/engines", headers={"Authorization": f"Bearer {ADMIN}"},
                                 timeout=10).json() if e["alive"]]
    return e


def test_bench_serve_reports_what_the_server_counted(make_tiny, tmp_path):
    models = {"ba": make_tiny("qwen2"), "bb": make_tiny("qwen3"), "bc": make_tiny("qwen2", seed=1)}
    cfg = {"admin_token_hash": hash_key(ADMIN), "metrics_public": True,
           # a 1 s heartbeat: the engines' view (their counters, their events) is up to 1 s behind a point's end
           "workers": {"local": "cpu", "standby": False, "heartbeat_s": 1.0, "dead_after_s": 30.0},
           "gpus": {"cpu_budget_gb": 4 * MiB / 1e9, "kv_cache_gb": 128 * PAGE / 1e9,
                    "host_cache_namespace": f"test-{uuid.uuid4().hex[:10]}"},
           "models": [{"name": n, "path": str(p), "slo": {"ttft_s": 60, "tpot_s": 5}} for n, p in models.items()]}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(live_server, "free_port", lambda: free_port(PORTS))
        srv = live_server.LiveServer(cfg, tmp_path)
    with srv:
        e0, m0 = _engine(srv), httpx.get(srv.url + "/metrics", timeout=10).text
        out = run_serve(url=srv.url, admin_token=ADMIN, rate=2.0, duration=1.0, slo_ttft=60.0, slo_tpot=5.0,
                        drain_s=60.0, say=lambda _: None)
        res = out["policies"]["server"]
        asked = time.time()  # the server's own count: a view its engine took after the point
        while (e1 := _engine(srv))["pool"]["loop"]["t"] < asked:
            time.sleep(0.05)
        m1 = httpx.get(srv.url + "/metrics", timeout=10).text
    p0, p1 = e0["pool"], e1["pool"]
    # the server's arena and KV region, not the command's defaults (60 and 4 GB)
    assert (out["config"]["gpu_budget_gb"], out["config"]["kv_region_gb"]) == (4 * MiB / 1e9, 2 * MiB / 1e9)
    assert res["responses"].get("200", 0) > 3, res["responses"]  # (a few prompts past a context: 400s)
    switches = p1["switches"] - p0["switches"]
    assert switches > 0
    assert res["steps"] == p1["steps"] - p0["steps"]
    assert round(res["switches_per_s"] * res["wall_s"]) == switches == res["events"]["counts"]["switch"]
    assert switches == _metric(m1, "tokenpool_model_switches_total") - _metric(m0, "tokenpool_model_switches_total")
    loads = _metric(m1, "tokenpool_model_swaps_total") - _metric(m0, "tokenpool_model_swaps_total")
    assert res["events"]["counts"]["load"] == loads == p1["counters"]["loads_done"] - p0.get("counters", {}).get("loads_done", 0)
    assert res["kv_swapped_out"] == p1["kv_swapped_out"] - p0["kv_swapped_out"]
