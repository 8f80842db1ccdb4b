"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis): no 5xx, no crash."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

from controller.app import build_app
from controller.config import ServerConfig
from controller.keys import hash_key
from load_tests.faults import is_error_body
from load_tests.live_server import LiveServer

schemathesis = pytest.importorskip("schemathesis")

ADMIN, KEY = "admin-fuzz-token", "key-fuzz-0123456789"
CONFIG = {
    "admin_token_hash": hash_key(ADMIN),
    "workers": {"local": "cpu", "standby": False},
    "tenants": [{"name": "fuzz", "key_hashes": [hash_key(KEY)]}],
    # short context and a fast pace bound the work any generated request can ask for
    "models": [{"name": "pace", "engine": {"kind": "pace", "pace_s_per_token": 0.0005, "max_model_len": 48,
                                           "max_num_seqs": 256}}],
}
schema = schemathesis.openapi.from_dict(build_app(ServerConfig.model_validate(CONFIG)).openapi())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with LiveServer(CONFIG, tmp_path_factory.mktemp("fuzz")) as srv:
        yield srv


# One test an operation, each with its own id ("POST /v1/completions"): schemathesis's `schema.parametrize()` gives its
# items one node id, which pytest-xdist (the suite's two workers) takes for one test and runs once.
OPERATIONS = [r.ok() for r in schema.get_all_operations()]


@pytest.mark.parametrize("op", OPERATIONS, ids=[op.label for op in OPERATIONS])
def test_no_server_errors(op, server):
    @given(case=op.as_strategy())
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    def check(case):
        token = ADMIN if case.path.startswith("/admin") or case.path == "/metrics" else KEY
        if case.path.startswith("/admin/engines") and case.method.upper() == "POST":
            case.path_parameters = {**(case.path_parameters or {}), "engine_id": "fuzz-" + str(
                (case.path_parameters or {}).get("engine_id", ""))}  # never drain the real engine
        resp = case.call(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        # /health is readiness: 503 while a model the fuzzer registered (min replicas > 0) is not placed yet
        ok = resp.status_code < 500 or (case.path == "/health" and resp.status_code == 503)
        assert ok, (case.method, case.path, case.body, resp.status_code, resp.text[:500])
        ct = resp.headers.get("content-type") or ""
        ct = ct[0] if isinstance(ct, list) else ct
        if resp.status_code >= 400 and ct.startswith("application/json"):
            assert is_error_body(case.path, resp.content), (case.path, resp.text[:300])  # OpenAI's, or Ollama's

    check()


def test_server_still_serving(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server.url + "/v1/completions", headers=auth, timeout=30,
                   json={"model": "pace", "prompt": "still there?", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
