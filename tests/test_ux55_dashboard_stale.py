"""The dashboard when its server stops answering: a server that hangs (SIGSTOP here: a stuck event loop, or a proxy or
network path that keeps the connection open with nothing behind it) left the page saying "live" over figures that
had stopped moving; an action tried while the server is gone said only the browser's "Failed to fetch", at once
replaced by "Refresh failed: Failed to fetch". Plus the names assistive technology reads for the header's status and
the events filter. Headless Chromium (Debian's `chromium`) under Playwright, one browser and one live server of a
pace engine for the module; skipped without them.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import time

import pytest

from controller.keys import hash_key
from load_tests.live_server import LiveServer
from tests import dashboard_pages as pages

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs the system chromium (apt-get install chromium)")
expect = sync_api.expect

ADMIN = "admin-ux55-stale-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = {"admin_token_hash": hash_key(ADMIN), "workers": {"local": "cpu", "standby": False},
           "models": [{"name": "pace-a", "path": None, "engine": {"kind": "pace", "pace_s_per_token": 0.05}}]}
    with LiveServer(cfg, tmp_path_factory.mktemp("srv")) as srv:
        yield srv


def signed_in(browser, url: str, failed: list[str], clock: bool = False):
    """A page signed in as the admin; its console errors and page errors collected in `failed` (not its failed
    requests: these tests stop the server under it); `clock`: pages.signed_in's."""
    return pages.signed_in(browser, url, ADMIN, failed, clock=clock)


def snapshots(page, n: int) -> None:
    pages.snapshots(page, n, timeout=10_000)


@contextlib.contextmanager
def stopped(proc):
    """The server's process stopped (SIGSTOP) until the block ends: its connections stay open, nothing comes."""
    proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGCONT)


def test_a_hung_server_is_not_shown_as_live(server, browser):
    """The server stops answering with the stream open: within a few seconds the header says since when nothing has
    come (it said "live" for as long as the server hung); once the server answers again it says "live" and the
    snapshots move again. The page's clock is Playwright's, jumped past the seconds of silence (not waited for)."""
    failed: list[str] = []
    with signed_in(browser, server.url, failed, clock=True) as page:
        conn = page.locator("#conn")
        with stopped(server.proc):
            page.clock.fast_forward(6_000)
            expect(conn).to_have_text(re.compile(r"^no data since \d\d:\d\d:\d\d$"), timeout=10_000)
            expect(conn).to_have_class(re.compile(r"\bdown\b"))
            seen = page.evaluate("S.snapshots")
            time.sleep(1.5)
            assert page.evaluate("S.snapshots") == seen  # (nothing came: the header is right)
        expect(conn).to_have_text("live", timeout=15_000)
        snapshots(page, 1)  # (drawn again: none came while it hung)
    assert failed == [], "\n".join(failed)


def test_a_stream_silent_too_long_is_opened_again(server, browser):
    """A connection that stays open with nothing coming (half-open: it never ends by itself) is given up after 15 s
    of silence and a new stream opened, which goes live. The page's clock is set back (a real 15 s hang costs the
    suite 15 s), the rest is the page's own code against the live server."""
    failed: list[str] = []
    with signed_in(browser, server.url, failed) as page:
        page.evaluate("""() => { window.firstStream = S.es; S.lastData -= 20000; S.opened -= 20000; watchStream(); }""")
        assert page.evaluate("window.firstStream.readyState === EventSource.CLOSED && S.es !== window.firstStream")
        expect(page.locator("#conn")).to_have_text("live", timeout=10_000)
        snapshots(page, 1)  # (the new stream's)
    assert failed == [], "\n".join(failed)


def test_controls_have_names(server, browser):
    """The events filter is named (a bare <select> in the heading was read as an unnamed combo box); the connection
    state is a status."""
    failed: list[str] = []
    with signed_in(browser, server.url, failed) as page:
        page.click("#tabs [data-view=events]")
        expect(page.get_by_role("combobox", name="Event kinds shown")).to_be_visible()
        expect(page.get_by_role("status").filter(has_text="live")).to_have_count(1)
    assert failed == [], "\n".join(failed)


def test_an_action_with_the_server_gone_says_so(server, browser):
    """Last (it stops the module's server). Pin tried while the server is gone: the toast says the server did not
    answer, and keeps saying it (the refresh after every action replaced it at once with "Refresh failed: Failed to
    fetch")."""
    failed: list[str] = []
    with signed_in(browser, server.url, failed) as page:
        page.click("#tabs [data-view=models]")
        pin = page.locator('#models-table tr[data-model="pace-a"] [data-action=pin]')
        expect(pin).to_be_visible()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
        expect(page.locator("#conn")).to_have_text("reconnecting…", timeout=10_000)
        pin.click()
        toast = page.locator("#toast")
        expect(toast).to_have_text(re.compile(r"^Failed: the server did not answer"), timeout=15_000)
        page.wait_for_function("() => S.soon === null && S.calls === 0")  # (the refresh after an action: come and gone)
        expect(toast).to_have_text(re.compile(r"^Failed: the server did not answer"))
        expect(toast).to_have_attribute("role", "alert")
