"""The dashboard's form paths opened by their address: /dashboard/login (typed, bookmarked, or left in the address
bar by a failed sign-in where the page's script did not run) and /dashboard/logout answered a GET with a 405 in JSON.
They now lead to the dashboard (the sign-in form without a session); a GET signs no one in or out. Headless Chromium
(Debian's `chromium`) under Playwright against a live `tokenpool serve`; skipped without them.
"""

from __future__ import annotations

import shutil

import pytest

from controller.keys import hash_key
from load_tests.live_server import LiveServer
from tests.dashboard_pages import watch

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs the system chromium (apt-get install chromium)")
expect = sync_api.expect

ADMIN = "admin-ux55-urls"


def test_the_form_paths_opened_by_address_lead_to_the_dashboard(tmp_path, browser):
    cfg = {"admin_token_hash": hash_key(ADMIN), "workers": {"local": "cpu", "standby": False},
           "models": [{"name": "pace-a", "path": None, "engine": {"kind": "pace", "pace_s_per_token": 0.05}}]}
    failed: list[str] = []
    with LiveServer(cfg, tmp_path / "srv") as srv:
        page = browser.new_page()
        try:
            watch(page, failed)
            r = page.goto(srv.url + "/dashboard/login")
            assert r.status == 200 and page.url == srv.url + "/dashboard", (r.status, page.url)
            page.fill("#token", ADMIN)  # the form, and it signs in
            page.click("#login")
            expect(page.locator("#conn")).to_have_text("live", timeout=10_000)

            r = page.goto(srv.url + "/dashboard/logout")  # a GET: still signed in, on the dashboard
            assert r.status == 200 and page.url == srv.url + "/dashboard", (r.status, page.url)
            expect(page.locator("#conn")).to_have_text("live", timeout=10_000)
            r = page.goto(srv.url + "/dashboard/login")
            assert r.status == 200 and page.url == srv.url + "/dashboard"
            expect(page.locator("#conn")).to_have_text("live", timeout=10_000)
        finally:
            page.close()
    assert failed == [], "\n".join(failed)
