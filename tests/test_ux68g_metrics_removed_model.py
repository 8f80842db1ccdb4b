"""Found by a pass over the admin API under concurrent use (ux68g): after `DELETE /admin/models/NAME`, /metrics went on
exporting the model's gauges `tokenpool_model_replicas{model="NAME"} 1` and its last
`tokenpool_slo_attainment_ratio`, so a scrape disagreed with GET /admin/models (a model held by an engine that no
longer had it). Now they go with the model; its counters stay (series by name since the start)."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller.keys import hash_key
from tests.ports import live_server_on

PORTS = range(30470, 30480)
ADMIN = "admin-ux68g-metrics-token"
H = {"Authorization": f"Bearer {ADMIN}"}
PACE = {"kind": "pace", "pace_s_per_token": 0.001}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = {"admin_token_hash": hash_key(ADMIN), "workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "models": [{"name": "fast", "engine": PACE}]}
    with live_server_on(PORTS, cfg, tmp_path_factory.mktemp("ux68g-metrics")) as srv:
        yield srv


def _gauges(url: str, model: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if f.name in ("tokenpool_model_replicas", "tokenpool_slo_attainment_ratio") and s.labels.get("model") == model}


def test_a_removed_models_gauges_leave_metrics(server):
    assert httpx.post(server.url + "/admin/models", json={"name": "gone", "engine": PACE}, headers=H,
                      timeout=30).status_code == 201
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    for _ in range(10):  # (an attainment is exported from 10 requests on)
        client.completions.create(model="gone", prompt="hi", max_tokens=2)
    assert _gauges(server.url, "gone") == {"tokenpool_model_replicas": 1.0, "tokenpool_slo_attainment_ratio": 1.0}
    assert httpx.delete(server.url + "/admin/models/gone", headers=H, timeout=30).status_code == 200
    time.sleep(0.6)  # (a placement round or two)
    assert _gauges(server.url, "gone") == {}
    assert _gauges(server.url, "fast") == {"tokenpool_model_replicas": 1.0}
    assert "gone" not in [m["name"] for m in httpx.get(server.url + "/admin/models", headers=H, timeout=30).json()]
