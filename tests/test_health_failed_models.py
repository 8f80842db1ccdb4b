"""/health answers anyone (probes send no key). Where a model's load keeps failing it says which and why (the
worker's error: paths, exception text) only to whoever may change what is served; to others, on a server with
tenants, only how many models fail."""

from __future__ import annotations

from fastapi.testclient import TestClient

from controller.app import build_app
from controller.config import ServerConfig, TenantSpec
from controller.keys import hash_key

ADMIN, TENANT = "health-admin-token", "health-tenant-key"


def _failing(cfg: ServerConfig) -> TestClient:
    app = build_app(cfg)  # (no lifespan: no workers start, so the server is not ready)
    ctl = app.state.controller
    ctl._load_errors["broken"] = "engine w0: cannot read /srv/models/broken/model.safetensors"
    return TestClient(app)


def test_a_failing_models_reason_goes_only_to_an_operator():
    c = _failing(ServerConfig(admin_token_hash=hash_key(ADMIN), models=[],
                              tenants=[TenantSpec(name="a", key_hashes=[hash_key(TENANT)]),
                                       TenantSpec(name="b")]))
    said = {}
    for who, headers in (("probe", {}), ("tenant", {"Authorization": f"Bearer {TENANT}"}),
                         ("admin", {"Authorization": f"Bearer {ADMIN}"})):
        r = c.get("/health", headers=headers)
        assert r.status_code == 503 and r.json()["status"] == "starting", r.text
        said[who] = r.json()["failed_models"]
    assert said["probe"] == said["tenant"] == 1
    assert list(said["admin"]) == ["broken"]
    assert said["admin"]["broken"].startswith("engine w0: cannot read /srv/models/broken/model.safetensors")


def test_without_auth_health_names_the_failing_model():
    r = _failing(ServerConfig(models=[])).get("/health")
    assert r.status_code == 503 and list(r.json()["failed_models"]) == ["broken"], r.text
