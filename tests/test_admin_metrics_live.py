"""/metrics of a live `tokenpool serve`, read as Prometheus reads it (prometheus_client's parser): names keep the
conventions (`_total` only on counters), so the KV capacity gauge is `tokenpool_kv_blocks`; the old
`tokenpool_kv_blocks_total` gauge is still exported for one release, marked deprecated."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller.keys import hash_key
from load_tests.live_server import LiveServer

ADMIN = "admin-metrics-live"
ADM = {"Authorization": f"Bearer {ADMIN}"}
DEPRECATED = {"tokenpool_kv_blocks_total": "tokenpool_kv_blocks"}  # (gauge -> its replacement) until the next release



@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = {"admin_token_hash": hash_key(ADMIN),
           "workers": {"local": "cpu", "standby": False},
           "tenants": [{"name": "t", "key_hashes": [hash_key("t-key")]}],
           "models": [{"name": "pace", "engine": {"kind": "pace", "pace_s_per_token": 0.005}}]}
    with LiveServer(cfg, tmp_path_factory.mktemp("srv")) as srv:
        yield srv


def families(srv) -> dict:
    r = httpx.get(srv.url + "/metrics", headers=ADM, timeout=10)
    assert r.status_code == 200
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def test_kv_capacity_gauge_is_not_named_like_a_counter(server):
    r = httpx.post(server.url + "/v1/completions", headers={"Authorization": "Bearer t-key"},
                   json={"model": "pace", "prompt": "x", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200
    deadline = time.monotonic() + 20  # (engine gauges come with the worker's Stats messages)
    while not (fams := families(server)).get("tokenpool_kv_blocks_used") or \
            not fams["tokenpool_kv_blocks_used"].samples:
        assert time.monotonic() < deadline, "no engine gauges on /metrics"
        time.sleep(0.2)
    gauges_total = sorted(n for n, f in fams.items() if f.type == "gauge" and n.endswith("_total"))
    assert gauges_total == sorted(DEPRECATED), gauges_total  # no new gauge takes a counter's suffix
    for n, f in fams.items():
        if f.type == "counter":
            assert all(s.name.endswith("_total") for s in f.samples), n
    kv = fams["tokenpool_kv_blocks"]
    assert kv.type == "gauge"
    blocks = {(s.labels["engine"], s.labels["model"]): s.value for s in kv.samples}
    assert blocks and all(v > 0 for v in blocks.values()), blocks
    assert {m for _, m in blocks} == {"pace"}
    old = fams["tokenpool_kv_blocks_total"]
    assert "deprecated" in old.documentation.lower() and "tokenpool_kv_blocks" in old.documentation
    assert {(s.labels["engine"], s.labels["model"]): s.value for s in old.samples} == blocks
    used = {(s.labels["engine"], s.labels["model"]): s.value for s in fams["tokenpool_kv_blocks_used"].samples}
    assert used.keys() == blocks.keys() and all(used[k] <= blocks[k] for k in blocks)
