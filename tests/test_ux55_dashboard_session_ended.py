"""The dashboard open while its server restarts: sessions live in the server's memory, so the page goes back to the
sign-in form, which said nothing of why (an operator saw the form come back by itself, and a server started without
admin_token_hash wants the new run's token, not the one just used). The form now says that the session ended and
why it may have; once only (the stale cookie goes), and not after a sign-out of one's own. Headless Chromium (Debian's
`chromium`) under Playwright against a live `tokenpool serve` restarted on the same port; skipped without them.
"""

from __future__ import annotations

import shutil

import pytest
import yaml

from controller.keys import hash_key
from load_tests.live_server import LiveServer

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs the system chromium (apt-get install chromium)")
expect = sync_api.expect

ADMIN = "admin-ux55-session-ended"
CFG = {"admin_token_hash": hash_key(ADMIN), "workers": {"local": "cpu", "standby": False},
       "models": [{"name": "pace-a", "path": None, "engine": {"kind": "pace", "pace_s_per_token": 0.05}}]}


def _start(workdir, port: int | None = None) -> LiveServer:
    """A fresh server; with `port`, on the port of the one before (a restart)."""
    s = LiveServer(CFG, workdir, wait_ready=False)
    if port is not None:
        s.port, s.url = port, f"http://127.0.0.1:{port}"
        s.config_path.write_text(yaml.safe_dump(dict(CFG, listen={"host": "127.0.0.1", "port": port})))
    s.__enter__()
    s.wait_healthy(60)
    return s


def _sign_in(page) -> None:
    page.fill("#token", ADMIN)
    page.click("#login")
    expect(page.locator("#conn")).to_have_text("live", timeout=10_000)


def test_the_form_says_the_session_ended_when_the_server_restarted(tmp_path, browser):
    failed: list[str] = []
    first = _start(tmp_path / "a")
    second = None
    try:
        ctx = browser.new_context()  # (the shared browser: a context of its own, no cookie of another test's)
        try:
            page = ctx.new_page()
            page.clock.install()  # (Playwright's: jumped to the page's next try below, not waited for)
            page.on("pageerror", lambda e: failed.append(f"page error: {e}"))
            page.goto(first.url + "/dashboard#models")
            expect(page.locator(".login-box .note")).to_have_count(0)  # (a first visit: nothing ended)
            _sign_in(page)

            first.__exit__()  # the restart: the same port, a new process with no sessions
            second = _start(tmp_path / "b", port=first.port)
            page.clock.fast_forward(8_000)  # (the page's next try to reach it: 8 s on at most)
            note = page.locator('.login-box .note[role="status"]')
            expect(note).to_contain_text("Your session has ended", timeout=20_000)
            expect(note).to_contain_text("the server restarted")
            assert page.url.endswith("/dashboard#models")  # (signed in again, the same view)

            _sign_in(page)
            expect(page.locator("#view-models")).to_be_visible()
            page.reload()  # a live session: the dashboard, no note
            expect(page.locator("#conn")).to_have_text("live", timeout=10_000)

            page.click("header form button[type=submit]")  # signed out by oneself: the form, without the note
            expect(page.locator("#token")).to_be_visible(timeout=10_000)
            expect(page.locator(".login-box .note")).to_have_count(0)
            page.reload()
            expect(page.locator(".login-box .note")).to_have_count(0)
        finally:
            ctx.close()
    finally:
        for s in (first, second):
            if s is not None:
                s.__exit__()
    assert failed == [], "\n".join(failed)


def test_a_stale_cookie_gets_the_note_once(tmp_path):
    """Without a browser: a cookie the server does not know is answered with the form, the note, and the cookie's
    deletion (the next visit is a plain sign-in)."""
    import httpx

    srv = _start(tmp_path / "c")
    try:
        r = httpx.get(srv.url + "/dashboard", cookies={"tokenpool_session": "stale-session-id"})
        assert r.status_code == 200 and "Your session has ended" in r.text and 'id="token"' in r.text
        assert 'tokenpool_session=""' in r.headers["set-cookie"] and "Max-Age=0" in r.headers["set-cookie"]
        r = httpx.get(srv.url + "/dashboard")
        assert "Your session has ended" not in r.text and 'id="token"' in r.text
    finally:
        srv.__exit__()
