"""The admin API answers a create of a name already taken (a tenant, a model, an alias) with 409 Conflict in OpenAI's
error shape, as the Kubernetes API and the kmock emulation of this controller do (it was a 400, which reads as a bad
body)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from controller.app import build_app
from controller.config import ServerConfig, TenantSpec
from controller.keys import hash_key

ADMIN = "admin-conflicts-token"
H = {"Authorization": f"Bearer {ADMIN}"}


def client() -> TestClient:
    cfg = ServerConfig(admin_token_hash=hash_key(ADMIN), models=[], tenants=[TenantSpec(name="team-a")])
    return TestClient(build_app(cfg))  # (no lifespan: no workers start)


def test_a_tenant_name_taken_is_a_409():
    c = client()
    assert c.post("/admin/tenants", headers=H, json={"name": "team-b"}).status_code == 201
    for name in ("team-a", "team-b"):  # one of the configuration, one made here
        r = c.post("/admin/tenants", headers=H, json={"name": name})
        assert r.status_code == 409, r.text
        assert r.json() == {"error": {"message": f"tenant {name!r} exists", "type": "invalid_request_error",
                                      "param": "name", "code": "tenant_exists"}}
    assert [t["name"] for t in c.get("/admin/tenants", headers=H).json()] == ["team-a", "team-b"]
    r = c.post("/admin/tenants", headers=H, json={"name": "bad name"})  # a bad body is still a 400
    assert r.status_code == 400 and r.json()["error"]["param"] == "name"


def test_a_model_name_or_alias_taken_is_a_409():
    c = client()
    pace = {"name": "alpha", "engine": {"kind": "pace"}, "aliases": ["a"]}
    assert c.post("/admin/models", headers=H, json=pace).status_code == 201
    r = c.post("/admin/models", headers=H, json=pace)
    assert r.status_code == 409 and r.json()["error"]["code"] == "model_exists", r.text
    assert "already registered" in r.json()["error"]["message"]
    r = c.post("/admin/models", headers=H, json={"name": "beta", "engine": {"kind": "pace"}, "aliases": ["a"]})
    assert r.status_code == 409 and r.json()["error"]["code"] == "model_exists", r.text
    assert r.json()["error"]["param"] == "aliases" and "a" in r.json()["error"]["message"]
    assert [m["name"] for m in c.get("/admin/models", headers=H).json()] == ["alpha"]
    # a name that is another model's alias: the field at fault is the name
    r = c.post("/admin/models", headers=H, json={"name": "a", "engine": {"kind": "pace"}})
    assert r.status_code == 409 and r.json()["error"]["param"] == "name", r.text


def test_a_tenant_naming_no_served_model_is_made_with_a_warning():
    """A tenant whose models match nothing served is kept (a PooledModel may come after its Tenant) and told so in
    `warning`; names and globs that match a model's name or alias are not named there."""
    c = client()
    assert c.post("/admin/models", headers=H, json={"name": "alpha", "engine": {"kind": "pace"},
                                                    "aliases": ["a"]}).status_code == 201
    r = c.post("/admin/tenants", headers=H, json={"name": "team-c", "models": ["alpha", "a", "al*", "qwen*", "betta"]})
    assert r.status_code == 201, r.text
    assert "['qwen*', 'betta'] match no model served now" in r.json()["warning"], r.json()
    assert c.get("/admin/tenants/team-c", headers=H).json()["models"] == ["alpha", "a", "al*", "qwen*", "betta"]
    r = c.post("/admin/tenants", headers=H, json={"name": "team-d", "models": ["a*"]})
    assert r.status_code == 201 and r.json()["warning"] is None, r.text


def test_a_models_bad_body_is_said_without_pydantics_prefix():
    """A model refused by its own rule (an llm engine needs a path) is said as the rule says it, not after
    pydantic's "Value error, "."""
    r = client().post("/admin/models", headers=H, json={"name": "x1"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] == "model 'x1': path is required unless engine.kind is 'pace'"


def test_a_bad_query_parameter_is_named_as_sent_and_a_wrong_admin_token_is_said_so():
    c = client()
    r = c.get("/admin/pool?timeline_s=9999", headers=H)
    assert r.status_code == 400 and r.json()["error"]["param"] == "timeline_s", r.text
    assert r.json()["error"]["message"].startswith("timeline_s: ")
    r = c.get("/admin/pool", headers={"Authorization": "Bearer not-the-token"})
    assert r.status_code == 401 and r.json()["error"]["message"] == "incorrect admin token", r.text
    assert c.get("/admin/pool").json()["error"]["message"] == "admin token required"
