"""The dashboard in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright for Python,
against a live `tokenpool serve` with one pace model and two tiny real models (the pooled engine).

Needs `apt-get install chromium` and `pip install playwright` (the system browser is used; Playwright's own
browsers are not downloaded); skipped without them. Screenshots are kept under a temporary directory whose
path is printed (TOKENPOOL_DASHBOARD_SHOTS=DIR keeps them there instead).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from controller.keys import hash_key
from load_tests.live_server import LiveServer
from tests.dashboard_pages import watch

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs the system chromium (apt-get install chromium)")

ADMIN = "admin-dashboard-token"
KEY = "tp-dashboard-tenant-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory, make_tiny):
    tiny_a, tiny_b = make_tiny("qwen2"), make_tiny("qwen2", seed=1)
    cfg = {
        "admin_token_hash": hash_key(ADMIN), "workers": {"local": "cpu", "standby": False},
        "tenants": [{"name": "team-a", "key_hashes": [hash_key(KEY)]}],
        "tenants_file": str(tmp_path_factory.mktemp("tenants") / "tenants.yaml"),
        "models": [
            {"name": "pace-a", "path": None, "engine": {"kind": "pace", "pace_s_per_token": 0.02}},
            {"name": "tiny-a", "path": str(tiny_a), "engine": {"max_num_seqs": 4}},
            {"name": "tiny-b", "path": str(tiny_b), "engine": {"max_num_seqs": 4}},
        ],
    }
    with LiveServer(cfg, tmp_path_factory.mktemp("srv"), ready_timeout=180) as srv:
        yield srv


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    # pytest's own temporary directory by default (it keeps the last few runs'), not a new /tmp directory a run
    d = Path(os.environ.get("TOKENPOOL_DASHBOARD_SHOTS") or tmp_path_factory.mktemp("dashboard-shots"))
    d.mkdir(parents=True, exist_ok=True)
    print(f"\ndashboard screenshots: {d}")
    return d


class Stream(threading.Thread):
    """One streamed completion through the official openai client; keeps its id, chunk count and error."""

    def __init__(self, url: str, model: str, max_tokens: int):
        super().__init__(daemon=True)
        self.url, self.model, self.max_tokens = url, model, max_tokens
        self.id: str | None = None
        self.chunks = 0
        self.error: str | None = None
        self.started = threading.Event()

    def run(self) -> None:
        from openai import OpenAI

        client = OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0)
        try:
            for chunk in client.completions.create(model=self.model, prompt="hello there", max_tokens=self.max_tokens,
                                                   stream=True, extra_body={"ignore_eos": True}):
                self.id = self.id or chunk.id
                self.chunks += 1
                self.started.set()
        except Exception as e:  # noqa: BLE001 - the cancelled stream ends with an error event: kept for the test
            self.error = str(e)
        finally:
            self.started.set()


@contextlib.contextmanager
def contexts_closed(browser):
    """The block's browser contexts (of conftest's module-scoped `browser`) closed on the way out."""
    try:
        yield
    finally:
        for c in browser.contexts:
            c.close()


def watched(page, errors: list[str]):
    """`page`, with its console errors and uncaught exceptions collected in `errors`."""
    watch(page, errors)
    return page


def sign_in(page, url: str) -> None:
    page.goto(url + "/dashboard")
    page.fill("#token", ADMIN)
    page.click("#login")
    sync_api.expect(page.locator("#conn")).to_have_text("live", timeout=10_000)


def test_dashboard_details(server, shots, browser):
    """Before any other traffic (this runs first): what an operator sees beyond the actions. Colours follow the
    pool's model order; a removed model leaves the charts; an idle engine says so; numeric headers sit over their
    numbers; the active tab is marked for assistive technology; times read as a 24 h clock, an engine's `at` too;
    a model's name of 128 characters is cut short, not widening the cards;
    at a phone's width (390 px) the header keeps to the screen, every tab can be tapped and a table's actions are
    in sight (the table scrolls sideways under them); signing out in one tab
    signs the others out."""
    expect = sync_api.expect
    url, auth = server.url, {"Authorization": f"Bearer {ADMIN}"}
    errors: list[str] = []
    # tiny-b, the last of the pool's models, runs: the engine's timeline (drawn first) names it alone
    httpx.post(url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60, json={
        "model": "tiny-b", "prompt": "hi", "max_tokens": 2}).raise_for_status()
    with contexts_closed(browser):
        ctx = browser.new_context(viewport={"width": 1440, "height": 900})
        page = watched(ctx.new_page(), errors)
        sign_in(page, url)
        expect(page.locator("#engines canvas.timeline")).to_have_count(1)

        # an idle engine is "idle", though the pool still names the model of its last turn
        pool = page.request.get(url + "/admin/pool").json()
        assert pool["engines"][0]["inflight"] == 0 and pool["engines"][0]["active"] == "tiny-b", pool["engines"][0]
        expect(page.locator('.engine[data-engine="w0"] .head')).to_contain_text("running now: idle")

        # authentication is on (a tenant is configured): no notice that keys take no effect
        page.click("#tabs [data-view=tenants]")
        expect(page.locator('#tenants-table tr[data-tenant="team-a"]')).to_be_visible()
        expect(page.locator("#auth-off")).to_be_hidden()

        # the Models table: a swatch per model in the palette's order, whatever the pool view drew first
        page.click("#tabs [data-view=models]")
        expect(page.locator("#tabs [aria-current=page]")).to_have_attribute("data-view", "models")
        expect(page.locator("#tabs [aria-current]")).to_have_count(1)
        names = [m["name"] for m in pool["models"]]
        for n in names:
            expect(page.locator(f'#models-table tr[data-model="{n}"]')).to_be_visible()
        swatches = page.evaluate("""names => names.map(n => getComputedStyle(document.querySelector(
            `#models-table tr[data-model="${n}"] .swatch`)).backgroundColor)""", names)
        palette = page.evaluate("""n => PALETTE.slice(0, n).map(c => {
            const d = document.createElement('div'); d.style.background = c; document.body.append(d);
            const v = getComputedStyle(d).backgroundColor; d.remove(); return v; })""", len(names))
        assert swatches == palette, (names, swatches, palette)

        # a number's header is aligned as its numbers are (right), in the models and tenants tables
        page.click("#tabs [data-view=tenants]")
        expect(page.locator("#tenants-table tbody tr").first).to_be_visible()
        for table in ("models-table", "tenants-table"):
            bad = page.evaluate("""id => {
                const t = document.getElementById(id), ths = t.querySelectorAll('thead th');
                return [...t.querySelector('tbody tr').children].flatMap((td, i) =>
                    td.classList.contains('num') && getComputedStyle(ths[i]).textAlign !== 'right'
                    ? [ths[i].textContent] : []); }""", table)
            assert bad == [], (table, bad)

        # events: the clock as the charts' (24 h), and an engine's `at` as one too, not seconds since 1970
        page.click("#tabs [data-view=events]")
        register = page.locator("#events-list li[data-kind=register]", has_text="engine=w0").first
        expect(register).to_be_visible()
        assert re.fullmatch(r"\d\d:\d\d:\d\d", register.locator(".t").inner_text())
        assert re.search(r"at=\d\d:\d\d:\d\d\.\d{3}(\s|$)", register.inner_text()), register.inner_text()

        # a model of the longest name allowed (128 characters) is cut short (its title has it all), not pushing
        # a card wider than the page; removed while the page is open, it leaves the charts' legends
        gone = "pace-gone-" + "x" * 118
        page.click("#tabs [data-view=pool]")
        httpx.post(url + "/admin/models", headers=auth, json={
            "name": gone, "path": None, "engine": {"kind": "pace"}}).raise_for_status()
        legend = page.locator("#chart-tps .u-legend")
        expect(legend).to_contain_text(gone, timeout=15_000)
        expect(page.locator(f'#engines .chip[title="{gone}"]').first).to_be_visible()
        wide = """() => [...document.querySelectorAll('main > section:not([hidden]) .card')]
            .filter(c => c.scrollWidth > c.clientWidth + 1).map(c => c.querySelector('h3')?.textContent)"""
        assert page.evaluate(wide) == []
        page.click("#tabs [data-view=models]")
        expect(page.locator(f'#models-table tr[data-model="{gone}"] .mname')).to_have_attribute("title", gone)
        assert page.evaluate(wide) == []
        page.click("#tabs [data-view=pool]")
        httpx.delete(url + f"/admin/models/{gone}", headers=auth).raise_for_status()
        expect(legend).not_to_contain_text("pace-gone", timeout=15_000)
        expect(legend).to_contain_text("tiny-b")

        # a request of 3 choices is one request: the Requests tab's count says 1, as its table does
        page.click("#tabs [data-view=requests]")
        with httpx.stream("POST", url + "/v1/completions", timeout=60, headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": "pace-a", "prompt": "hi", "max_tokens": 1000, "n": 3, "stream": True,
                                "ignore_eos": True}) as n3:
            lines = n3.iter_lines()  # (kept: a dropped iterator closes the response)
            next(lines)
            expect(page.locator("#requests-table tbody tr")).to_have_count(1, timeout=10_000)
            (req,) = page.request.get(url + "/admin/requests").json()
            assert req["choices"] == 3, req
            expect(page.locator("#n-requests")).to_have_text("1")
        # (the client went: the request ends)
        expect(page.locator("#n-requests")).to_have_text("0", timeout=10_000)
        expect(page.locator("#requests-empty")).to_be_visible()

        # a phone: nothing wider than the screen, the header holds its tabs, each one can be tapped
        phone = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
        mobile = phone.new_page()
        mobile.on("pageerror", lambda e: errors.append(f"page error (phone): {e}"))
        mobile.set_viewport_size({"width": 320, "height": 640})  # (the smallest phones: the login form fits too,
        mobile.goto(url + "/dashboard")  # and the summary's tiles are two a row, not six rows of one)
        assert mobile.evaluate("document.documentElement.scrollWidth") <= 320
        sign_in(mobile, url)
        tops = mobile.evaluate("[...document.querySelectorAll('#summary .tile')].map(t => t.offsetTop)")
        assert len(tops) == 6 and len(set(tops)) == 3, tops
        mobile.set_viewport_size({"width": 390, "height": 844})
        header = mobile.locator("header").bounding_box()
        for view in ("models", "tenants", "requests", "events", "pool"):
            tab = mobile.locator(f"#tabs [data-view={view}]")
            box = tab.bounding_box()
            assert box["x"] >= 0 and box["x"] + box["width"] <= 390, (view, box)
            assert box["y"] + box["height"] <= header["y"] + header["height"], (view, box, header)
            tab.click(timeout=3_000)  # (a tab squeezed under its neighbours is not clickable)
            expect(mobile.locator(f"#view-{view}")).to_be_visible()
            assert mobile.evaluate("document.documentElement.scrollWidth") <= 390, view
            # a table scrolls sideways in its card, its row's actions in sight (they were past the screen's edge)
            for b in mobile.locator(f"#view-{view} td.actions button").all()[:3]:
                box = b.bounding_box()
                assert 0 <= box["x"] and box["x"] + box["width"] <= 390, (view, b.inner_text(), box)
        out = mobile.locator("header form button").bounding_box()
        assert out["x"] + out["width"] <= 390, out
        mobile.screenshot(path=str(shots / "phone-pool.png"), full_page=True)

        # a stream the browser closed (it does at a 502 from a proxy, or as here when the page stops loading) is
        # opened again from the last event seen: each event once in the list, not the ring's backlog again
        page.click("#tabs [data-view=events]")
        page.select_option("#event-filter", "")
        joins = page.locator("#events-list li[data-kind=worker_join]")
        expect(joins).to_have_count(1)
        page.evaluate("window.stop()")
        expect(page.locator("#conn")).to_have_text("reconnecting…")
        expect(page.locator("#conn")).to_have_text("live", timeout=10_000)
        httpx.post(url + "/admin/tenants", headers=auth, json={"name": "probe"}).raise_for_status()
        expect(page.locator("#events-list li[data-kind=tenant_created]", has_text="probe")).to_be_visible()
        expect(joins).to_have_count(1)  # (the backlog came before that event, on the same stream)
        httpx.delete(url + "/admin/tenants/probe", headers=auth).raise_for_status()

        # signing out in one tab signs the session's other tabs out too: their open event stream ends (it
        # went on carrying the pool's snapshots and events), so they come back to the login form
        other = ctx.new_page()
        other.goto(url + "/dashboard")
        expect(other.locator("#conn")).to_have_text("live", timeout=10_000)
        page.click("header form button")
        expect(page.locator("#token")).to_be_visible()
        expect(other.locator("#token")).to_be_visible(timeout=15_000)
    assert errors == [], errors


def test_dashboard_without_auth_or_models(tmp_path_factory, shots, browser):
    """A server without tenants (authentication off, as the embedded default): the Tenants view says that keys
    made there take no effect; and once its only model is removed, the Models view says there is none."""
    expect = sync_api.expect
    cfg = {"admin_token_hash": hash_key(ADMIN), "workers": {"local": "cpu", "standby": False},
           "models": [{"name": "pace-only", "path": None, "engine": {"kind": "pace", "pace_s_per_token": 0.01}}]}
    with LiveServer(cfg, tmp_path_factory.mktemp("open")) as srv, contexts_closed(browser):
        url, auth = srv.url, {"Authorization": f"Bearer {ADMIN}"}
        assert httpx.get(url + "/v1/models").status_code == 200  # no key needed: authentication is off
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        sign_in(page, url)
        page.click("#tabs [data-view=tenants]")
        expect(page.locator('#tenants-table tr[data-tenant="anonymous"]')).to_be_visible()
        # its models: every one (the cell said "—", as if it had none)
        expect(page.locator('#tenants-table tr[data-tenant="anonymous"] td').nth(1)).to_have_text("*")
        expect(page.locator("#auth-off")).to_be_visible()
        expect(page.locator("#auth-off")).to_contain_text("take no effect")
        page.click("#tabs [data-view=models]")
        expect(page.locator('#models-table tr[data-model="pace-only"]')).to_be_visible()
        expect(page.locator("#models-empty")).to_be_hidden()
        httpx.delete(url + "/admin/models/pace-only", headers=auth).raise_for_status()
        expect(page.locator("#models-table tbody tr")).to_have_count(0, timeout=15_000)
        expect(page.locator("#models-empty")).to_be_visible()
        page.screenshot(path=str(shots / "no-models.png"))


def test_dashboard_in_a_browser(server, shots, browser):
    errors: list[str] = []
    with contexts_closed(browser):
        ctx = browser.new_context(viewport={"width": 1440, "height": 900})
        page = watched(ctx.new_page(), errors)
        page.on("dialog", lambda d: d.accept())  # every action asks for confirmation first
        run(page, ctx, server, shots)
    assert errors == [], errors


def run(page, ctx, server, shots: Path) -> None:
    expect = sync_api.expect
    url = server.url
    # --- signing in: a wrong token is refused, the right one gives an HTTP-only session cookie ---
    page.goto(url + "/dashboard")
    expect(page.locator("#token")).to_be_visible()
    page.fill("#token", "not-the-token")
    page.click("#login")
    expect(page.locator(".error")).to_have_text("That is not the admin token.")
    assert page.request.get(url + "/admin/pool").status == 401
    page.screenshot(path=str(shots / "login-refused.png"))
    # its URL is the dashboard's, whose reload is the form again (it was /dashboard/login: the token posted again)
    assert page.url == url + "/dashboard", page.url
    page.reload()
    expect(page.locator("#token")).to_be_visible()
    expect(page.locator(".error")).to_have_count(0)
    page.fill("#token", ADMIN)
    page.click("#login")
    expect(page.locator("#tabs")).to_be_visible()
    assert page.url == url + "/dashboard" and ADMIN not in page.url
    (cookie,) = ctx.cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and ADMIN not in cookie["value"]
    expect(page.locator("#conn")).to_have_text("live", timeout=10_000)

    # --- the models ---
    page.click("#tabs [data-view=models]")
    for name in ("pace-a", "tiny-a", "tiny-b"):
        expect(page.locator(f'#models-table tr[data-model="{name}"]')).to_be_visible()
    # the prefix cache's share of tiny-a's prompt tokens: "—" before any request, then what two alike found
    from openai import OpenAI

    cached = page.locator('#models-table tr[data-model="tiny-a"] td:nth-child(12)')
    expect(cached).to_have_text("—")
    client = OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    got = [client.completions.create(model="tiny-a", prompt="hello there " * 24, max_tokens=2) for _ in range(2)]
    found = got[1].usage.prompt_tokens_details.cached_tokens
    assert found > 0 and got[0].usage.prompt_tokens_details.cached_tokens == 0
    expect(cached).to_have_text(f"{100 * found / (2 * got[0].usage.prompt_tokens):.1f}%", timeout=10_000)
    page.locator('#models-table tr[data-model="tiny-b"] [data-action=pin]').click()
    expect(page.locator("#toast")).to_have_text("tiny-b pinned")
    expect(page.locator('#models-table tr[data-model="tiny-b"] .badge.pinned')).to_be_visible()

    # add a model through the form, then remove it
    page.fill("#add-model [name=name]", "pace-c")
    page.select_option("#add-model [name=kind]", "pace")
    page.click("#add-model button[type=submit]")
    expect(page.locator("#toast")).to_have_text("Model pace-c added")
    expect(page.locator('#models-table tr[data-model="pace-c"]')).to_be_visible()
    page.locator('#models-table tr[data-model="pace-c"] [data-action=remove]').click()
    expect(page.locator("#toast")).to_have_text("pace-c removed")
    expect(page.locator('#models-table tr[data-model="pace-c"]')).to_have_count(0)

    # --- streamed requests fill the requests table ---
    streams = [Stream(url, m, n) for m, n in (("pace-a", 400), ("tiny-a", 300), ("pace-a", 300),
                                              ("tiny-b", 300), ("tiny-a", 250))]
    for s in streams:
        s.start()
    for s in streams:
        assert s.started.wait(60), "a stream produced nothing"
    page.click("#tabs [data-view=requests]")
    expect(page.locator("#requests-table tbody tr")).to_have_count(5, timeout=10_000)
    victim = streams[0]
    row = page.locator(f'#requests-table tr[data-request="{victim.id}"]')
    expect(row).to_contain_text("pace-a")
    # its state: tokens came, so running (before them: "prefill" on its engine, "queued" at the controller)
    expect(row.locator(".badge.running")).to_have_attribute("title", "generating tokens")
    if page.request.get(url + "/admin/pool").json()["latency_window"]:  # the controller reports its requests
        expect(row).to_contain_text("team-a")
    page.screenshot(path=str(shots / "requests.png"))

    # --- the pool: timelines show which model ran, the charts fill ---
    page.click("#tabs [data-view=pool]")
    # the timeline is drawn at the next snapshot after the switches (a loaded CI machine: give it 15 s)
    page.wait_for_function("""() => {
        const c = document.querySelector('canvas.timeline');
        if (!c || !c.width) return false;
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        for (let i = 3; i < d.length; i += 4) if (d[i] > 0) return true;
        return false; }""", timeout=15_000)
    expect(page.locator("#engines .legend")).to_contain_text("tiny")
    expect(page.locator("#chart-tps .uplot")).to_be_visible()
    deadline = time.monotonic() + 15
    while True:  # the worker reports the pooled engine: two busy real models on one engine take turns
        w0 = page.request.get(url + "/admin/pool").json()["engines"][0]
        if not w0["pooled"] or (w0["switches"] > 0 and len({r[1] for r in w0["timeline"]}) >= 2):
            break
        assert time.monotonic() < deadline, f"no switch between two busy models: {w0['switches']}, {w0['timeline']}"
        time.sleep(0.2)
    page.screenshot(path=str(shots / "pool.png"), full_page=True)

    # --- cancel a request: its stream ends with the operator's error ---
    page.click("#tabs [data-view=requests]")
    page.locator(f'#requests-table tr[data-request="{victim.id}"] [data-action=cancel]').click()
    expect(page.locator("#toast")).to_have_text(f"Request {victim.id} cancelled")
    victim.join(10)
    assert not victim.is_alive() and victim.error and "cancelled by an operator" in victim.error
    assert victim.chunks < 400
    expect(page.locator(f'#requests-table tr[data-request="{victim.id}"]')).to_have_count(0, timeout=15_000)

    # --- events: the cancel is there, from the stream ---
    page.click("#tabs [data-view=events]")
    expect(page.locator("#events-list li[data-kind=cancel]")).to_contain_text(victim.id, timeout=15_000)
    expect(page.locator("#events-list li[data-kind=switch]")).to_have_count(0)  # hidden by default
    if w0["pooled"]:  # the engine's model switches come as events too
        page.select_option("#event-filter", "switch")
        expect(page.locator("#events-list li[data-kind=switch]").first).to_contain_text("engine=w0")
        page.select_option("#event-filter", "!switch")
    page.screenshot(path=str(shots / "events.png"))

    # an event reaches the screen pushed over the open stream (published by an action taken elsewhere): well
    # before a reconnect (the stream's retry is 1 s, plus a refresh) could bring it. Not a latency benchmark: on a
    # loaded 2-core machine the push took up to 1.0 s (it was asserted under 1 s, and that failed CI there).
    t0 = time.monotonic()
    httpx.post(url + "/admin/models/tiny-b/unpin", headers={"Authorization": f"Bearer {ADMIN}"}).raise_for_status()
    expect(page.locator("#events-list li[data-kind=unpin]")).to_contain_text("tiny-b", timeout=15_000)
    assert time.monotonic() - t0 < 3.0, f"event to screen took {time.monotonic() - t0:.2f} s"

    # --- tenants: create a key (shown once), revoke it ---
    page.click("#tabs [data-view=tenants]")
    expect(page.locator('#tenants-table tr[data-tenant="team-a"]')).to_be_visible()
    page.fill("#add-tenant [name=name]", "team-new")
    page.click("#add-tenant button[type=submit]")
    key = page.locator("#new-key-value").inner_text(timeout=15_000)
    assert key.startswith("tp-")
    assert httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    page.locator('#tenants-table tr[data-tenant="team-new"] [data-action=revoke]').click()
    expect(page.locator("#toast")).to_have_text("Tenant team-new revoked")
    expect(page.locator("#new-key")).to_be_hidden()  # (its key no longer works: not left on show)
    assert httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 401

    # --- evict a resident model: its VRAM goes (the pool's state shows it), the event is there (before the drain:
    # the request making it resident took 2-12 s after a drain and resume here, 0.1 s before) ---
    for s in streams[1:]:
        s.join(60)
    assert all(s.error is None and s.chunks > 0 for s in streams[1:]), [s.error for s in streams[1:]]
    httpx.post(url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60, json={
        "model": "tiny-a", "prompt": "hi", "max_tokens": 1}).raise_for_status()  # (resident now, whatever ran last)
    page.click("#tabs [data-view=models]")
    tiny_a = page.locator('#models-table tr[data-model="tiny-a"]')
    expect(tiny_a.locator(".badge.resident")).to_be_visible(timeout=10_000)
    tiny_a.locator("[data-action=evict]").click()
    expect(page.locator("#toast")).to_have_text("tiny-a evicted once idle")
    expect(tiny_a.locator(".badge.resident")).to_have_count(0, timeout=10_000)
    assert "tiny-a" not in page.request.get(url + "/admin/pool").json()["engines"][0]["resident"]
    page.click("#tabs [data-view=events]")
    expect(page.locator("#events-list li[data-kind=evict]").first).to_contain_text("tiny-a")

    # --- drain the worker: shown drained; resume ---
    page.click("#tabs [data-view=pool]")
    page.locator('.engine[data-engine="w0"] [data-action=drain]').click()
    expect(page.locator('.engine[data-engine="w0"] .badge')).to_have_attribute("data-state", "draining")
    expect(page.locator("#toast")).to_have_text("Engine w0 draining")
    assert page.request.get(url + "/admin/pool").json()["engines"][0]["draining"] is True
    page.screenshot(path=str(shots / "drained.png"))
    page.locator('.engine[data-engine="w0"] [data-action=resume]').click()
    expect(page.locator('.engine[data-engine="w0"] .badge')).to_have_attribute("data-state", "alive")
    page.click("#tabs [data-view=events]")
    for kind in ("drain", "resume"):
        expect(page.locator(f"#events-list li[data-kind={kind}]")).to_contain_text("engine=w0")

    # --- signing out ends the session ---
    page.click("header form button")
    expect(page.locator("#token")).to_be_visible()
    assert page.request.get(url + "/admin/pool").status == 401
