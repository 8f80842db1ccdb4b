"""A tenant of no model (`models: []`, every request of its keys a 404) changed through the dashboard's Edit: the form
shows its Models empty, as it has none, and saving a change of its other limits sent `models: ["*"]` (the empty
field read as every model, as the create form's), so lowering its concurrency gave it every model. Its row showed
an empty Models cell; it says "none". Headless Chromium under Playwright; skipped without."""

from __future__ import annotations

import shutil

import httpx
import pytest

from controller.keys import hash_key
from tests import dashboard_pages as pages
from tests.ports import live_server_on

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs the system chromium (apt-get install chromium)")
expect = sync_api.expect

ADMIN = "admin-ux60h-tenant-edit-token"
ADM = {"Authorization": f"Bearer {ADMIN}"}
PORTS = range(26120, 26140)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = {"admin_token_hash": hash_key(ADMIN), "workers": {"local": "cpu", "standby": False},
           "tenants": [{"name": "team-a", "key_hashes": [hash_key("tp-ux60h-tenant-edit-key")]}],
           "models": [{"name": "pace-a", "path": None, "engine": {"kind": "pace", "pace_s_per_token": 0.05}}]}
    with live_server_on(PORTS, cfg, tmp_path_factory.mktemp("srv")) as srv:
        yield srv


def test_editing_a_tenant_of_no_model_keeps_it_of_no_model(server, browser):
    r = httpx.post(server.url + "/admin/tenants", headers=ADM, json={"name": "none-yet", "models": []})
    assert r.status_code == 201 and r.json()["models"] == [], r.text
    failed: list[str] = []
    with pages.signed_in(browser, server.url, ADMIN, failed) as page:
        page.click("#tabs [data-view=tenants]")
        row = page.locator('#tenants-table tr[data-tenant="none-yet"]')
        expect(row.locator("td").nth(1)).to_have_text("none")
        row.locator("[data-action=edit]").click()
        form = page.locator("#add-tenant")
        expect(form.locator("[name=models]")).to_have_value("")
        form.locator("[name=conc]").fill("3")
        form.locator("[name=conc]").press("Enter")
        expect(page.locator("#toast")).to_contain_text("Tenant none-yet changed")
        t = httpx.get(server.url + "/admin/tenants/none-yet", headers=ADM).json()
        assert (t["models"], t["max_concurrent"]) == ([], 3), t
        # a tenant made in the form with its Models emptied is still one of every model
        form.locator("[name=name]").fill("all-of-them")
        form.locator("[name=models]").fill("")
        form.locator("[name=name]").press("Enter")
        expect(page.locator("#new-key-value")).to_be_visible()
        assert httpx.get(server.url + "/admin/tenants/all-of-them", headers=ADM).json()["models"] == ["*"]
    for name in ("none-yet", "all-of-them"):
        httpx.delete(server.url + f"/admin/tenants/{name}", headers=ADM)
    assert failed == [], "\n".join(failed)
