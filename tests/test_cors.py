"""Browser clients (chat UIs calling the API from a page) need CORS. By default only pages served from this machine
may call the API, as Ollama allows; `cors_origins` (`--allowed-origins`, vLLM's flag) names others, "*" any. Errors
carry the headers too, else a browser reports a 401 as a network failure."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from controller.app import build_app
from controller.config import ServerConfig, TenantSpec
from controller.keys import hash_key
from controller.serve import origins_given
from controller.startup import StartupError

PREFLIGHT = {"Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization,content-type"}


def _client(**cfg) -> TestClient:
    return TestClient(build_app(ServerConfig(models=[], tenants=[TenantSpec(name="a", key_hashes=[hash_key("k")])],
                                             **cfg)))


def test_by_default_only_pages_of_this_machine_may_call_the_api():
    c = _client()
    for origin in ("http://localhost:3000", "http://127.0.0.1:8080", "https://localhost", "http://[::1]:5173"):
        r = c.options("/v1/chat/completions", headers={"Origin": origin, **PREFLIGHT})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin, (origin, r.headers)
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        assert "access-control-allow-credentials" not in r.headers
        # an error (no key) carries the header too, and its body is the API's error JSON
        r = c.get("/v1/models", headers={"Origin": origin})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == origin
        assert r.json()["error"]["message"]
    for origin in ("https://evil.example", "http://localhost.evil.example", "http://127.0.0.1.nip.io:80"):
        r = c.options("/v1/chat/completions", headers={"Origin": origin, **PREFLIGHT})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers, (origin, r.headers)
        assert "access-control-allow-origin" not in c.get("/v1/models", headers={"Origin": origin}).headers


def test_the_configured_origins_replace_the_default():
    c = _client(cors_origins=["https://chat.example.com"])
    ok = c.get("/v1/models", headers={"Origin": "https://chat.example.com", "Authorization": "Bearer k"})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://chat.example.com"
    assert "access-control-allow-origin" not in c.get("/v1/models", headers={"Origin": "http://localhost:3000"}).headers
    anyone = _client(cors_origins=["*"]).get("/v1/models", headers={"Origin": "https://x.example"})
    assert anyone.headers["access-control-allow-origin"] == "*"


def test_allowed_origins_take_vllms_json_list_or_one_an_option():
    assert origins_given(['["*"]']) == ["*"]
    assert origins_given(["https://a.example/", '["https://b.example", "http://c:1"]']) == [
        "https://a.example", "https://b.example", "http://c:1"]
    with pytest.raises(StartupError, match="not a JSON list"):
        origins_given(["[https://a.example]"])
    with pytest.raises(StartupError, match="a JSON list of strings"):
        origins_given(['[1, 2]'])
