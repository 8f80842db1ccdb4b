"""GET /admin/tenants/{name} answers the tenant as GET /admin/tenants lists it (it was a 405), never key material;
an admin path with a trailing slash is a clear 404 in OpenAI's error shape, whichever route it resembles (Starlette's
redirect_slashes answered `DELETE /admin/tenants/` and others with a bare 307 to the path without the slash, which
clients do not follow for a DELETE, and `GET /admin/models/` with a 405)."""

from __future__ import annotations

import asyncio

from fastapi.testclient import TestClient

from controller.app import build_app
from controller.config import ModelSpec, ServerConfig, TenantSpec
from controller.keys import hash_key

ADMIN = "admin-tenant-routes"
H = {"Authorization": f"Bearer {ADMIN}"}
KEY_HASH = hash_key("key-tenant-routes-abcdefgh")


def make() -> tuple[TestClient, object]:
    cfg = ServerConfig(admin_token_hash=hash_key(ADMIN), models=[],
                       tenants=[TenantSpec(name="cfg", key_hashes=[KEY_HASH], models=["m"])])
    app = build_app(cfg)  # (no lifespan: no workers start)
    asyncio.run(app.state.controller.add_model(ModelSpec(name="m", path=None, engine={"kind": "pace"})))
    return TestClient(app, follow_redirects=False), app.state.controller


def test_get_one_tenant():
    c, _ = make()
    made = c.post("/admin/tenants", headers=H, json={"name": "team", "models": ["m"], "max_concurrent": 2})
    assert made.status_code == 201, made.text
    listed = {t["name"]: t for t in c.get("/admin/tenants", headers=H).json()}
    for name in ("cfg", "team"):
        r = c.get(f"/admin/tenants/{name}", headers=H)
        assert r.status_code == 200, r.text
        assert r.json() == listed[name]
        assert "api_key" not in r.json() and "key_hashes" not in r.json()
        assert "sha256$" not in r.text and made.json()["api_key"] not in r.text
    r = c.get("/admin/tenants/nobody", headers=H)
    assert r.status_code == 404 and r.json()["error"]["code"] == "tenant_not_found", r.text
    assert c.get("/admin/tenants/team").status_code == 401  # the admin token, as the list


def test_a_trailing_slash_is_a_clear_404():
    c, ctl = make()
    for method, path in [("DELETE", "/admin/tenants/"), ("GET", "/admin/tenants/"), ("POST", "/admin/tenants/"),
                         ("DELETE", "/admin/tenants/cfg/"), ("PATCH", "/admin/tenants/cfg/"),
                         ("GET", "/admin/tenants/cfg/"), ("GET", "/admin/engines/"), ("GET", "/admin/pool/"),
                         ("GET", "/admin/models/"), ("POST", "/admin/models/"), ("POST", "/admin/models/m/pin/")]:
        r = c.request(method, path, headers=H, json={} if method in ("POST", "PATCH") else None)
        assert r.status_code == 404, (method, path, r.status_code, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == "not_found", err
        assert "trailing slash" in err["message"] and path in err["message"], err
    # where the path without the slash is a route for that method, the answer names it
    r = c.delete("/admin/tenants/cfg/", headers=H)
    assert "DELETE /admin/tenants/cfg" in r.json()["error"]["message"], r.text
    r = c.delete("/admin/tenants/", headers=H)
    assert "DELETE /admin/tenants " not in r.json()["error"]["message"] + " ", r.text  # (no such route)
    assert ctl.tenants.get("cfg") is not None and not ctl.models["m"].pinned  # nothing was done
    assert c.delete("/admin/tenants/", headers={}).status_code == 401  # (the admin token first, as elsewhere)
