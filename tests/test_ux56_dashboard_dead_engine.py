"""A dead engine's card. A worker that died (killed, out of memory; a remote one is not replaced) kept its last
report's models and memory on its card until it was pruned 30 s later: "resident" chips for models the pool had
already placed on another engine, and a VRAM bar of memory no process held. A dead engine now holds nothing.
"""

from __future__ import annotations

import os
import shutil
import signal
import time

import httpx
import pytest

from controller.keys import hash_key
from load_tests.live_server import LiveServer

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

ADMIN = "admin-ux56-dead-engine"
H = {"Authorization": f"Bearer {ADMIN}"}


@pytest.mark.skipif(CHROMIUM is None, reason="needs the system chromium (apt-get install chromium)")
def test_a_dead_engine_holds_nothing(tmp_path, browser):
    expect = sync_api.expect
    cfg = {"admin_token_hash": hash_key(ADMIN), "workers": {"local": "cpu", "standby": False, "restart": False},
           "models": [{"name": "pace-a", "path": None, "engine": {"kind": "pace", "pace_s_per_token": 0.02}}]}
    with LiveServer(cfg, tmp_path) as srv, httpx.Client(base_url=srv.url, headers=H) as c:
        deadline = time.monotonic() + 15
        while (w0 := c.get("/admin/pool").json()["engines"][0])["resident"] != ["pace-a"]:
            assert time.monotonic() < deadline, w0
            time.sleep(0.2)
        assert w0["registered"] == ["pace-a"] and w0["vram"] is not None
        page = browser.new_page()
        try:
            page.goto(srv.url + "/dashboard")
            page.fill("#token", ADMIN)
            page.click("#login")
            card = page.locator('.engine[data-engine="w0"]')
            expect(card.locator(".chips").first).to_have_text("pace-a", timeout=10_000)
            os.kill(c.get("/admin/engines").json()[0]["pid"], signal.SIGKILL)
            deadline = time.monotonic() + 15
            while (w0 := c.get("/admin/pool").json()["engines"][0])["alive"]:
                assert time.monotonic() < deadline, "the worker never died"
                time.sleep(0.2)
            assert (w0["registered"], w0["resident"], w0["prefetching"], w0["vram"]) == ([], [], [], None), w0
            expect(card.locator(".badge")).to_have_text("dead", timeout=15_000)
            expect(card.locator(".chips")).to_have_text(["none", "none", "none"])
            expect(card.locator(".row2")).to_contain_text("none: its worker is dead")
        finally:
            page.close()
