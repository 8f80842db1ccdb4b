"""The dashboard through an operator's day (ux61h): what was found wrong, each through a live server and headless
Chromium (Debian's `chromium`) under Playwright, as tests/test_dashboard_browser_ops.py; skipped without them."""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import threading

import httpx
import pytest

from controller.keys import hash_key
from tests import dashboard_pages as pages
from tests.ports import live_server_on

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs the system chromium (apt-get install chromium)")
expect = sync_api.expect

ADMIN = "admin-ux61h-token"
KEY = "tp-ux61h-dashboard-key"
PORTS = range(26950, 26970)
AUTH = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = {"admin_token_hash": hash_key(ADMIN), "workers": {"local": "cpu", "standby": False},
           "tenants": [{"name": "team-a", "key_hashes": [hash_key(KEY)]}],
           "models": [{"name": "pace-a", "path": None, "engine": {"kind": "pace", "pace_s_per_token": 0.05}}]}
    with live_server_on(PORTS, cfg, tmp_path_factory.mktemp("srv")) as srv:
        yield srv


def _stream(url: str, tokens: int, done: threading.Event) -> None:
    """A streamed request of team-a's, `tokens` tokens of pace-a at 50 ms, read to its end; `done` set then."""
    with contextlib.suppress(httpx.HTTPError), httpx.stream(
            "POST", url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
            json={"model": "pace-a", "prompt": "hi", "max_tokens": tokens, "stream": True}) as r:
        for _ in r.iter_lines():
            pass
    done.set()


def test_a_tenants_tokens_per_minute_counts_its_streams_in_flight(server, browser):
    """A tenant streaming a long reply: its Tokens/min counts the tokens made so far, as the Models view's tokens/s
    of its model does. It counted a request's tokens only once it ended (the Prometheus counters): 0 tokens/min for
    the whole of a tenant's long streams, beside its model's 20 tokens/s, then a spike at their end."""
    failed: list[str] = []
    done = threading.Event()
    with pages.signed_in(browser, server.url, ADMIN, failed) as page:
        page.click("#tabs [data-view=tenants]")
        threading.Thread(target=_stream, args=(server.url, 300, done), daemon=True).start()  # (15 s)
        cell = page.locator('#tenants-table tr[data-tenant="team-a"] td:nth-child(4)')
        page.wait_for_function("""() => { const c = document.querySelector(
            '#tenants-table tr[data-tenant="team-a"] td:nth-child(4)'); return c && Number(c.textContent) > 0; }""",
                               timeout=10_000)
        assert not done.is_set()  # (counted while it streams, not at its end)
        assert len(httpx.get(server.url + "/admin/requests", headers=AUTH).json()) == 1
        # about 60 s x 20 tokens/s once the stream has gone on a few seconds (the rate's samples reach back 10 s)
        pages.snapshots(page, 4)
        assert float(cell.inner_text()) >= 300, cell.inner_text()
        tenant = next(t for t in httpx.get(server.url + "/admin/pool", headers=AUTH).json()["tenants"]
                      if t["name"] == "team-a")
        assert tenant["tokens_per_min"] >= 300 and not done.is_set()
        httpx.post(server.url + "/admin/requests/" + httpx.get(server.url + "/admin/requests", headers=AUTH)
                   .json()[0]["id"] + "/cancel", headers=AUTH)
        assert done.wait(10)
    assert failed == [], "\n".join(failed)


def test_a_stopped_servers_figures_say_how_old_they_are(server, browser):
    """Last (it stops the module's server). The server stopped with a dashboard open: past a few seconds without a
    snapshot the figures are dimmed and the header says since when nothing came, beside "reconnecting…". It said
    only "reconnecting…", for as long as it took, over figures left as they were: a tab left open showed a dead
    server's last tokens/s and requests hours on, and nothing said how old they were. The page's clock is
    Playwright's, jumped past those seconds (not waited for)."""
    with pages.signed_in(browser, server.url, ADMIN, clock=True) as page:
        pages.snapshots(page, 1)
        since, main = page.locator("#conn-since"), page.locator("main")
        expect(since).to_be_hidden()
        expect(main).not_to_have_class(re.compile("stale"))
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
        expect(page.locator("#conn")).to_have_text("reconnecting…", timeout=10_000)
        page.clock.fast_forward(6_000)
        expect(since).to_have_text(re.compile(r"^no data since \d\d:\d\d:\d\d$"), timeout=15_000)
        assert since.inner_text() == "no data since " + page.evaluate("clock(S.lastData / 1000)")  # (the last snapshot)
        expect(main).to_have_class(re.compile(r"\bstale\b"))
        assert float(main.evaluate("m => getComputedStyle(m).opacity")) < 1
