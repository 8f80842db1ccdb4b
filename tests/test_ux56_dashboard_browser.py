"""The dashboard as an operator uses it during traffic (session 56's pass), against one live server with
authentication on, two tenants of the configuration and paced models; each test leaves the server as it found it.

- A tenant's Edit with a model name that no model answers to (a typo) took the tenant's access away unsaid: the
  toast said "Tenant NAME changed". POST /admin/tenants warns of such names; PATCH now does too, and the page shows
  the warning as it shows an error.
- Drain on a one-engine server: every request after it was a 503, and the question did not say so.
- The Models view's SLO column: a percentage of targets the page named nowhere.
- The Pool view's "In flight" tile counted engine requests beside the Requests tab's count of requests.
- A model removed: its requests in flight ended with "engine failure: model was unregistered", sent again.
"""

from __future__ import annotations

import re
import shutil
import threading
import time

import httpx
import pytest

from controller.keys import hash_key
from load_tests.live_server import LiveServer
from tests.dashboard_pages import watch

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

ADMIN = "admin-ux56-dashboard"
H = {"Authorization": f"Bearer {ADMIN}"}
PACE = {"kind": "pace", "pace_s_per_token": 0.02}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = {"admin_token_hash": hash_key(ADMIN), "workers": {"local": "cpu", "standby": False},
           "tenants": [{"name": "alice", "key_hashes": [hash_key("tp-ux56-alice")]},
                       {"name": "bob", "key_hashes": [hash_key("tp-ux56-bob")], "models": ["pace-a"]}],
           "tenants_file": str(tmp_path_factory.mktemp("tenants") / "tenants.yaml"),
           "models": [{"name": "pace-a", "path": None, "engine": PACE},
                      {"name": "pace-b", "path": None, "engine": PACE}]}
    with LiveServer(cfg, tmp_path_factory.mktemp("srv")) as srv:
        yield srv


def test_patch_warns_of_models_no_model_answers_to(server):
    with httpx.Client(base_url=server.url, headers=H) as c:
        assert c.post("/admin/tenants", json={"name": "carol", "models": ["pace-a"]}).status_code == 201
        try:
            r = c.patch("/admin/tenants/carol", json={"models": ["pace-x", "pace-*"]})
            assert r.status_code == 200, r.text
            assert r.json()["models"] == ["pace-x", "pace-*"]
            assert "['pace-x']" in r.json()["warning"], r.json()
            r = c.patch("/admin/tenants/carol", json={"models": ["pace-b"]})  # all served: no warning
            assert r.status_code == 200 and r.json()["warning"] is None, r.json()
            r = c.patch("/admin/tenants/carol", json={"max_concurrent": 2})  # models not changed: none either
            assert r.status_code == 200 and r.json()["warning"] is None, r.json()
        finally:
            c.delete("/admin/tenants/carol")


@pytest.fixture
def page(server, browser):
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
    page = ctx.new_page()
    page.failed = []
    watch(page, page.failed)
    page.dialogs, page.accept_dialogs = [], True  # (every confirm() asked, and whether it is answered OK)
    page.on("dialog", lambda d: (page.dialogs.append(d.message), d.accept() if page.accept_dialogs else d.dismiss()))
    page.goto(server.url + "/dashboard#tenants")
    page.fill("#token", ADMIN)
    page.click("#login")
    sync_api.expect(page.locator("#conn")).to_have_text("live", timeout=10_000)
    yield page
    ctx.close()
    assert page.failed == [], "\n".join(page.failed)


@pytest.mark.skipif(CHROMIUM is None, reason="needs the system chromium (apt-get install chromium)")
def test_edit_with_a_model_no_model_answers_to_says_so(server, page):
    expect = sync_api.expect
    httpx.post(server.url + "/admin/tenants", headers=H, json={"name": "dave", "models": ["pace-a"]}).raise_for_status()
    try:
        row = page.locator('#tenants-table tr[data-tenant="dave"]')
        row.locator("[data-action=edit]").click()
        expect(page.locator("#add-tenant input[name=models]")).to_have_value("pace-a")
        page.fill("#add-tenant input[name=models]", "pace-aa")
        page.click("#add-tenant button[type=submit]")
        toast = page.locator("#toast")
        expect(toast).to_contain_text("Tenant dave changed. Warning: models ['pace-aa'] match no model served now")
        expect(toast).to_have_attribute("role", "alert")
        expect(row.locator("td").nth(1)).to_have_text("pace-aa")
    finally:
        httpx.delete(server.url + "/admin/tenants/dave", headers=H)


@pytest.mark.skipif(CHROMIUM is None, reason="needs the system chromium (apt-get install chromium)")
def test_draining_the_only_engine_says_that_new_requests_fail(server, page):
    """The Drain of a one-engine server's engine asked "It takes no new requests; those in flight finish." and every
    request after it was a 503 (no engine can serve the model): the question now says so. (Dismissed here: the
    engine is not drained.)"""
    page.accept_dialogs = False
    page.locator("#tabs [data-view=pool]").click()
    page.locator('.engine[data-engine="w0"] [data-action=drain]').click()
    sync_api.expect(page.locator('.engine[data-engine="w0"] .badge')).to_have_text("alive")
    assert page.dialogs and page.dialogs[-1].startswith("Drain engine w0?"), page.dialogs
    assert "the only engine taking requests: until it is resumed, every new request gets a 503" in page.dialogs[-1]
    assert httpx.get(server.url + "/admin/pool", headers=H).json()["engines"][0]["draining"] is False


@pytest.mark.skipif(CHROMIUM is None, reason="needs the system chromium (apt-get install chromium)")
def test_a_models_slo_figure_names_its_targets(server, page):
    """The Models view's SLO column gave a percentage of targets the page named nowhere: a model's figure names them
    (a PATCH of its SLO shows at the next snapshot)."""
    page.locator("#tabs [data-view=models]").click()
    cell = page.locator('#models-table tr[data-model="pace-b"] td').nth(9)
    sync_api.expect(cell).to_have_attribute("title", re.compile(r"within TTFT 5\.00 s and TPOT 250 ms"))
    httpx.patch(server.url + "/admin/models/pace-b", headers=H,
                json={"slo": {"ttft_s": 2.0, "tpot_s": 0.05}}).raise_for_status()
    try:
        sync_api.expect(cell).to_have_attribute("title", re.compile(r"within TTFT 2\.00 s and TPOT 50 ms"))
    finally:
        httpx.patch(server.url + "/admin/models/pace-b", headers=H, json={"slo": {"ttft_s": 5.0, "tpot_s": 0.25}})


@pytest.mark.skipif(CHROMIUM is None, reason="needs the system chromium (apt-get install chromium)")
def test_the_pools_engine_requests_tile_is_not_the_requests_count(server, page):
    """One request of 3 choices: the Pool view's tile said "In flight 3" beside the Requests tab's 1 (and 0 beside
    the tab's N while their worker restarted): it counts the engines' requests, and says so."""
    expect = sync_api.expect
    page.locator("#tabs [data-view=pool]").click()
    done = []

    def ask():
        done.append(httpx.post(server.url + "/v1/completions", timeout=30, headers={"Authorization": "Bearer tp-ux56-alice"},
                               json={"model": "pace-a", "prompt": "x", "max_tokens": 60, "n": 3}).status_code)

    t = threading.Thread(target=ask)
    t.start()
    try:
        tile = page.locator("#summary .tile").nth(2)
        expect(tile.locator(".k")).to_have_text("Requests on engines")
        expect(tile.locator(".v")).to_have_text("3")
        expect(page.locator("#n-requests")).to_have_text("1")
        assert "counts every request in flight" in tile.get_attribute("title")
    finally:
        t.join()
    assert done == [200]


def test_a_model_removed_ends_its_requests_saying_so(server):
    """The Models view's Remove ("Its requests in flight end with an error"): a request in flight got a 503 "engine
    failure: model was unregistered", which the OpenAI client sent again, to a 404. It is said as what happened, and
    not to be sent again (x-should-retry: false, as an operator's cancel)."""
    alice = {"Authorization": "Bearer tp-ux56-alice"}
    with httpx.Client(base_url=server.url, timeout=30) as c:
        c.post("/admin/models", headers=H, json={"name": "pace-gone", "path": None, "engine": PACE}).raise_for_status()
        got = []
        t = threading.Thread(target=lambda: got.append(c.post("/v1/completions", headers=alice, json={
            "model": "pace-gone", "prompt": "x", "max_tokens": 500})))
        t.start()
        deadline = time.monotonic() + 10
        while not any(r["tokens"] for r in c.get("/admin/requests", headers=H).json()):
            assert time.monotonic() < deadline, "the request never ran"
            time.sleep(0.1)
        assert c.delete("/admin/models/pace-gone", headers=H).status_code == 200
        t.join()
    r = got[0]
    assert r.status_code == 503 and r.headers["x-should-retry"] == "false", (r.status_code, r.headers)
    err = r.json()["error"]
    assert err["code"] == "model_removed" and err["message"] == "model 'pace-gone' was removed by an operator", err
