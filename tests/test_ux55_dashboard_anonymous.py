"""A tenant named "anonymous". Without authentication every caller is the tenant of that name, which the pool lists
beside the others; the dashboard told it apart by its name alone. So:

- with authentication on, a tenant of the configuration named "anonymous" (a team may be called so) lost its limits
  and its Revoke button in the Tenants view, and the view said "Authentication is off on this server";
- without authentication, POST /admin/tenants made a second "anonymous" (the dashboard's form, or a Kubernetes
  Tenant through the operator): the pool listed two tenants of one name.

Now the pool says whether authentication is on (`auth`) and the page goes by that; the name is refused for a new
tenant, with a message that says why.
"""

from __future__ import annotations

import asyncio
import shutil

import pytest
from fastapi.testclient import TestClient

from controller.app import build_app
from controller.config import ModelSpec, ServerConfig
from controller.keys import hash_key
from load_tests.live_server import LiveServer
from tests.dashboard_pages import watch

ADMIN = "admin-ux55-anonymous"
H = {"Authorization": f"Bearer {ADMIN}"}


def _client(auth: bool) -> TestClient:
    tenants = [{"name": "team-a", "key_hashes": [hash_key("tp-ux55-team-a")]}] if auth else []
    app = build_app(ServerConfig(admin_token_hash=hash_key(ADMIN), models=[], tenants=tenants))
    asyncio.run(app.state.controller.add_model(ModelSpec(name="m", path=None, engine={"kind": "pace"})))
    return TestClient(app)


@pytest.mark.parametrize("auth", [False, True])
def test_the_name_anonymous_is_refused_for_a_new_tenant(auth):
    c = _client(auth)
    r = c.post("/admin/tenants", headers=H, json={"name": "anonymous", "max_concurrent": 1})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "tenant_name_reserved" and err["param"] == "name" and "reserved" in err["message"], err
    pool = c.get("/admin/pool", headers=H).json()
    assert pool["auth"] is auth
    assert [t["name"] for t in pool["tenants"]] == (["team-a"] if auth else ["anonymous"])
    assert c.post("/admin/tenants", headers=H, json={"name": "anonymous-2"}).status_code == 201  # (only that name)


sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs the system chromium (apt-get install chromium)")
def test_a_configured_tenant_named_anonymous_is_a_tenant_like_the_others(tmp_path, browser):
    """Authentication on, a tenant of the configuration named "anonymous" with a limit: the Tenants view shows its
    limit and its Revoke, and does not say that authentication is off."""
    expect = sync_api.expect
    cfg = {"admin_token_hash": hash_key(ADMIN), "workers": {"local": "cpu", "standby": False},
           "tenants": [{"name": "team-a", "key_hashes": [hash_key("tp-ux55-team-a")]},
                       {"name": "anonymous", "key_hashes": [hash_key("tp-ux55-anon")], "max_concurrent": 3}],
           "models": [{"name": "pace-a", "path": None, "engine": {"kind": "pace", "pace_s_per_token": 0.05}}]}
    failed: list[str] = []
    with LiveServer(cfg, tmp_path / "srv") as srv:
        page = browser.new_page()
        try:
            watch(page, failed)
            page.goto(srv.url + "/dashboard#tenants")
            page.fill("#token", ADMIN)
            page.click("#login")
            expect(page.locator("#conn")).to_have_text("live", timeout=10_000)
            row = page.locator('#tenants-table tr[data-tenant="anonymous"]')
            expect(row.locator("td").nth(8)).to_have_text("3 at once", timeout=10_000)
            expect(row.locator("[data-action=revoke]")).to_be_visible()
            expect(page.locator("#auth-off")).to_be_hidden()
            expect(page.locator('#tenants-table tr[data-tenant="team-a"] [data-action=revoke]')).to_be_visible()
        finally:
            page.close()
    assert failed == [], "\n".join(failed)
