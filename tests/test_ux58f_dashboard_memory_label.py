"""The Pool view labelled an engine's memory "VRAM" on a CPU-only worker (device `cpu`: its arena is host RAM): the
label is now the device's kind, "RAM" on a CPU engine ("VRAM" on a GPU's, `cuda:N`), and so is the line said where
no report came ("no RAM report")."""

from __future__ import annotations

import shutil

import httpx
import pytest

from controller.keys import hash_key
from tests import ports
from tests.dashboard_pages import signed_in

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ADMIN = "admin-ux58f-dashboard"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = {"admin_token_hash": hash_key(ADMIN), "workers": {"local": "cpu", "standby": False},
           "models": [{"name": "pace-a", "path": None, "engine": {"kind": "pace", "pace_s_per_token": 0.01}}]}
    with ports.live_server_on(range(24800, 24900), cfg, tmp_path_factory.mktemp("ux58f-dash")) as srv:
        yield srv


@pytest.mark.skipif(CHROMIUM is None, reason="needs the system chromium (apt-get install chromium)")
def test_a_cpu_engines_memory_is_labelled_ram(server, browser):
    engines = httpx.get(server.url + "/admin/engines", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    assert [e["device"] for e in engines] == ["cpu"], engines
    failed: list[str] = []
    with signed_in(browser, server.url, ADMIN, failed) as page:
        page.locator("#tabs [data-view=pool]").click()
        card = page.locator('.engine[data-engine="w0"]')
        sync_api.expect(card.locator(".facts").first).to_have_text("cpu on " + engines[0]["host"])
        label = card.locator(".row2 > div").first.locator(".muted").first
        sync_api.expect(label).to_have_text("RAM")
        assert "VRAM" not in card.inner_text(), card.inner_text()
    assert failed == [], failed
