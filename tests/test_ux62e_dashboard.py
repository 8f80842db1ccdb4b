"""Dashboard polish (ux62e): what was found wrong, each through a live server and headless Chromium (Debian's
`chromium`) under Playwright, as tests/test_ux61h_dashboard.py; skipped without them."""

from __future__ import annotations

import contextlib
import shutil
import threading

import httpx
import pytest
import yaml

from controller.keys import hash_key
from load_tests.live_server import LiveServer
from tests import dashboard_pages as pages
from tests.ports import free_port, live_server_on

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs the system chromium (apt-get install chromium)")
expect = sync_api.expect

ADMIN = "admin-ux62e-token"
KEY = "tp-ux62e-dashboard-key"
PORTS = range(27600, 27650)  # the module's server
RESTART_PORTS = range(27650, 27700)  # the restarted one's
AUTH = {"Authorization": f"Bearer {ADMIN}"}
CFG = {"admin_token_hash": hash_key(ADMIN), "workers": {"local": "cpu", "standby": False},
       "tenants": [{"name": "team-a", "key_hashes": [hash_key(KEY)]}],
       "models": [{"name": "pace-a", "path": None, "engine": {"kind": "pace", "pace_s_per_token": 0.05}}]}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with live_server_on(PORTS, CFG, tmp_path_factory.mktemp("srv")) as srv:
        yield srv


def _stream(url: str, tokens: int, done: threading.Event) -> None:
    """A streamed request of team-a's, `tokens` tokens of pace-a at 50 ms, read to its end; `done` set then."""
    with contextlib.suppress(httpx.HTTPError), httpx.stream(
            "POST", url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
            json={"model": "pace-a", "prompt": "hi", "max_tokens": tokens, "stream": True}) as r:
        for _ in r.iter_lines():
            pass
    done.set()


def _cancel_all(url: str) -> None:
    for r in httpx.get(url + "/admin/requests", headers=AUTH).json():
        httpx.post(url + f"/admin/requests/{r['id']}/cancel", headers=AUTH)


# the tokens/s chart's legend, and the chart's latest figures, read at once (a snapshot may come between two reads)
LEGEND = """() => {
  const cells = [...document.querySelectorAll('#chart-tps .u-legend .u-value')].map((c) => c.textContent);
  const t = S.series.t, tps = S.series.tps.get('pace-a');
  return { cells, time: clock(t[t.length - 1]), tps: tps[tps.length - 1] };
}"""


def test_a_tenants_requests_per_second_counts_requests_as_they_arrive(server, browser):
    """A tenant's long streams: its Requests/s counts them as they arrive (admitted, in flight), as an operator reads
    it beside the tenant's req/s limit. It counted a request only once it ended (the Prometheus counter): 0 requests/s
    through a tenant's long streams, then a spike at their end."""
    failed: list[str] = []
    done = [threading.Event() for _ in range(3)]
    with pages.signed_in(browser, server.url, ADMIN, failed) as page:
        page.click("#tabs [data-view=tenants]")
        pages.snapshots(page, 1)  # (the table drawn from a snapshot of the tenants view)
        cell = page.locator('#tenants-table tr[data-tenant="team-a"] td:nth-child(3)')
        assert float(cell.inner_text()) == 0  # (first in the module: no request of another test in the rate)
        for d in done:
            threading.Thread(target=_stream, args=(server.url, 300, d), daemon=True).start()  # (15 s each)
        page.wait_for_function("""() => { const c = document.querySelector(
            '#tenants-table tr[data-tenant="team-a"] td:nth-child(3)'); return c && Number(c.textContent) > 0; }""",
                               timeout=10_000)
        assert not any(d.is_set() for d in done)  # (counted while they stream, not at their end)
        tenant = next(t for t in httpx.get(server.url + "/admin/pool", headers=AUTH).json()["tenants"]
                      if t["name"] == "team-a")
        # 3 requests over at most the rate's span (10 s)
        assert 3 / 10 <= tenant["requests_per_s"] and not any(d.is_set() for d in done), tenant
        _cancel_all(server.url)
        assert all(d.wait(10) for d in done)
    assert failed == [], "\n".join(failed)


def test_the_charts_legend_shows_the_latest_values_without_a_cursor(server, browser):
    """Nothing hovered (a phone never hovers): the charts' legends show the latest snapshot's values. They showed
    uPlot's "--" unless the mouse was over the chart: a phone never saw a value."""
    failed: list[str] = []
    done = threading.Event()
    with pages.signed_in(browser, server.url, ADMIN, failed) as page:
        threading.Thread(target=_stream, args=(server.url, 200, done), daemon=True).start()  # (10 s)
        page.wait_for_function("() => (S.series.tps.get('pace-a') || []).some((v) => v > 0)", timeout=10_000)
        pages.snapshots(page, 1)
        seen = page.evaluate(LEGEND)
        assert seen["cells"][0] == seen["time"], seen  # (the time's, to the second)
        assert seen["tps"] > 0 and float(seen["cells"][1].replace(",", "")) == pytest.approx(seen["tps"], rel=0.01), seen
        # hovered: the values at the cursor; the cursor gone from the chart: the latest again, not "--"
        box = page.locator("#chart-tps .u-over").bounding_box()
        page.mouse.move(box["x"] + 5, box["y"] + box["height"] / 2)
        page.wait_for_function("() => document.querySelector('#chart-tps .u-legend .u-value').textContent"
                               " !== clock(S.series.t[S.series.t.length - 1])")
        page.mouse.move(box["x"] + box["width"] / 2, max(0, box["y"] - 100))  # (off the chart, above it)
        pages.snapshots(page, 1)
        seen = page.evaluate(LEGEND)
        assert seen["cells"][0] == seen["time"] and "--" not in seen["cells"], seen
        _cancel_all(server.url)
        assert done.wait(10)
    assert failed == [], "\n".join(failed)


def _start(workdir, port: int) -> LiveServer:
    """A server on `port` (the same port again: a restart)."""
    s = LiveServer(CFG, workdir, wait_ready=False)
    s.port, s.url = port, f"http://127.0.0.1:{port}"
    s.config_path.write_text(yaml.safe_dump(dict(CFG, listen={"host": "127.0.0.1", "port": port})))
    s.__enter__()
    s.wait_healthy(60)
    return s


def test_a_restart_goes_back_to_the_form_without_a_401(tmp_path, browser):
    """The server restarted under a signed-in page: the page asks whether its session is live before it opens its
    stream again, and goes to the form at the first "no". It learnt it from 401s: the stream's reconnect, then a
    refresh's two calls, three "Failed to load resource: ... 401" errors in the browser's console before the form.
    What no page avoids: while the server is down, each try to reach it is a failed request (after 1, 2 and 4 s, then every 8 s).
    The page's clock is Playwright's: once the server is back, it jumps to the page's next try (8 s on at most)."""
    port = free_port(RESTART_PORTS)
    first, second = _start(tmp_path / "a", port), None
    logged: list[str] = []
    try:
        ctx = browser.new_context()
        try:
            page = ctx.new_page()
            page.clock.install()
            page.on("console", lambda m: logged.append(f"{m.text} ({m.location.get('url')})")
                    if m.type == "error" else None)
            page.on("pageerror", lambda e: logged.append(f"page error: {e}"))
            page.goto(first.url + "/dashboard#models")
            page.fill("#token", ADMIN)
            page.click("#login")
            expect(page.locator("#conn")).to_have_text("live", timeout=10_000)
            pages.snapshots(page, 1)
            assert logged == []

            first.__exit__()
            expect(page.locator("#conn")).to_have_text("reconnecting…", timeout=10_000)
            second = _start(tmp_path / "b", port)
            page.clock.fast_forward(8_000)  # (the next try, not waited for)
            note = page.locator('.login-box .note[role="status"]')
            expect(note).to_contain_text("Your session has ended", timeout=20_000)
            assert page.url.endswith("/dashboard#models")
            page.wait_for_timeout(500)  # (any console message of the page's last calls delivered)
        finally:
            ctx.close()
        # nothing but the tries while the server was down (three 401s besides, before: the stream's reconnect,
        # /admin/pool and /admin/requests), and those only of the question, after 1, 2 and 4 s, then every 8 s
        down = [e for e in logged if "net::ERR_CONNECTION_REFUSED" in e]
        assert [e for e in logged if e not in down] == [], "\n".join(logged)
        assert all(f"{first.url}/dashboard/session" in e for e in down), "\n".join(down)

        # the question, without a browser: 200 either way
        r = httpx.get(second.url + "/dashboard/session", cookies={"tokenpool_session": "from-before-the-restart"})
        assert r.status_code == 200 and r.json() == {"signed_in": False}
        assert r.headers["cache-control"] == "no-store"
        with httpx.Client(base_url=second.url) as c:
            assert c.post("/dashboard/login", data={"token": ADMIN}).status_code == 303
            assert c.get("/dashboard/session").json() == {"signed_in": True}
    finally:
        for s in (first, second):
            if s is not None:
                s.__exit__()
