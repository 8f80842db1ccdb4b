"""The dashboard as an operator uses it around the actions (tests/test_dashboard_browser.py has the actions): the
keyboard while the snapshots redraw the page, the view in the URL (reload, Back), the session ending elsewhere, and
the server stopping with the page open. Headless Chromium (Debian's `chromium`) under Playwright, one browser and
one live server of a pace engine for the module; skipped without them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import re
import shutil
import signal
import threading
import time

import httpx
import pytest

from controller.keys import hash_key
from load_tests.live_server import LiveServer
from tests import dashboard_pages as pages
from tests.dashboard_pages import snapshots

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs the system chromium (apt-get install chromium)")
expect = sync_api.expect

ADMIN = "admin-dashboard-ops-token"
KEY = "tp-dashboard-ops-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = {"admin_token_hash": hash_key(ADMIN), "workers": {"local": "cpu"},
           "tenants": [{"name": "team-a", "key_hashes": [hash_key(KEY)]}],
           "models": [{"name": "pace-a", "path": None, "engine": {"kind": "pace", "pace_s_per_token": 0.05}}]}
    with LiveServer(cfg, tmp_path_factory.mktemp("srv")) as srv:
        yield srv


def signed_in(browser, url: str, failed: list[str] | None = None):
    """A page signed in as the admin; its console errors, page errors and failed requests collected in `failed`."""
    return pages.signed_in(browser, url, ADMIN, failed, requests=True)


def _stream(server, done: threading.Event) -> None:
    """A request in flight for 10 s (200 tokens of pace-a at 50 ms), read to its end; `done` set then."""
    with contextlib.suppress(httpx.HTTPError), httpx.stream(
            "POST", server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
            json={"model": "pace-a", "prompt": "hi", "max_tokens": 200, "stream": True}) as r:
        for _ in r.iter_lines():
            pass
    done.set()


def test_focus_survives_the_snapshots(server, browser):
    """A button the keyboard is on stays focused while the snapshots redraw its table (each replaced every row,
    so the focus fell back to the page at the next second, and Enter did nothing; a mouse click that straddled a
    redraw was lost the same way): Enter then acts on it, in a row whose numbers change meanwhile too. (Runs first:
    before any request, the Models view says its latency window is fed, not "not fed".)"""
    failed: list[str] = []
    done = threading.Event()
    stream = functools.partial(_stream, server, done)  # its row's age and tokens change

    with signed_in(browser, server.url, failed) as page:
        # (first, before any request: a fresh server's window is fed, it has nothing in it yet; it said "not fed")
        page.click("#tabs [data-view=models]")
        expect(page.locator("#window-note")).to_have_text("(latency and SLO over the last 60 s)")
        threading.Thread(target=stream, daemon=True).start()
        page.click("#tabs [data-view=requests]")
        cancel = page.locator("#requests-table tbody tr [data-action=cancel]")
        expect(cancel).to_have_count(1, timeout=10_000)
        cancel.focus()
        tokens = page.locator("#requests-table tbody tr td:nth-child(7)").inner_text()
        snapshots(page, 1)  # (a redraw after the focus and the read: 20 tokens a second on)
        assert page.locator("#requests-table tbody tr td:nth-child(7)").inner_text() != tokens  # (redrawn)
        assert page.evaluate("document.activeElement.dataset.action") == "cancel"
        page.keyboard.press("Enter")
        expect(page.locator("#toast")).to_contain_text("cancelled")
        assert done.wait(10)

        page.click("#tabs [data-view=models]")
        pin = page.locator('#models-table tr[data-model="pace-a"] [data-action=pin]')
        pin.focus()
        snapshots(page, 1)  # (a redraw after the focus)
        assert page.evaluate("document.activeElement.dataset.action") == "pin"
        page.keyboard.press("Enter")
        expect(page.locator("#toast")).to_have_text("pace-a pinned")
        httpx.post(server.url + "/admin/models/pace-a/unpin", headers={"Authorization": f"Bearer {ADMIN}"})
    assert failed == [], "\n".join(failed)


def test_the_view_is_in_the_url(server, browser):
    """The view is the URL's fragment: a reload stays on it (it went back to the pool), Back and Forward go
    through the views seen; it is kept through signing out and in again (the login form dropped it: the page signed
    in on the pool)."""
    with signed_in(browser, server.url) as page:
        page.click("#tabs [data-view=models]")
        assert page.url.endswith("/dashboard#models")
        page.reload()
        expect(page.locator("#view-models")).to_be_visible()
        expect(page.locator("#tabs [aria-current=page]")).to_have_attribute("data-view", "models")
        expect(page.locator('#models-table tr[data-model="pace-a"]')).to_be_visible()
        page.click("#tabs [data-view=events]")
        expect(page.locator("#view-events")).to_be_visible()
        page.go_back()
        expect(page.locator("#view-models")).to_be_visible()
        expect(page.locator("#view-events")).to_be_hidden()
        page.go_back()
        expect(page.locator("#view-pool")).to_be_visible()
        page.go_forward()
        expect(page.locator("#view-models")).to_be_visible()
        expect(page.locator("#tabs [aria-current=page]")).to_have_attribute("data-view", "models")
        page.click("header form button")
        expect(page.locator("#token")).to_be_visible(timeout=10_000)
        page.fill("#token", ADMIN)
        page.click("#login")
        expect(page.locator("#view-models")).to_be_visible()
        assert page.url.endswith("/dashboard#models"), page.url


def test_the_model_form_is_emptied_once_added(server, browser):
    """The add-model form is emptied once the model is added, as the tenant form is (left filled, the next Enter
    asked to add it again, a 409). It asks for a path unless the engine is pace, and for seconds per token only then
    (its placeholder said an empty path made a pace engine: the server refused an llm model without one)."""
    failed: list[str] = []
    with signed_in(browser, server.url, failed) as page:
        page.click("#tabs [data-view=models]")
        path, pace = page.locator("#add-model [name=path]"), page.locator("#add-model [name=pace]")
        page.fill("#add-model [name=name]", "pace-form")
        page.click("#add-model button[type=submit]")  # (llm, no path: the browser asks for one, nothing is sent)
        assert path.evaluate("p => p.validity.valueMissing") and pace.is_disabled()
        page.select_option("#add-model [name=kind]", "pace")
        assert not path.evaluate("p => p.required") and pace.is_enabled()
        page.click("#add-model button[type=submit]")
        expect(page.locator("#toast")).to_have_text("Model pace-form added")
        expect(page.locator("#add-model [name=name]")).to_have_value("")
        expect(page.locator("#add-model [name=kind]")).to_have_value("llm")
        expect(pace).to_be_disabled()
        assert path.evaluate("p => p.required")
        page.locator('#models-table tr[data-model="pace-form"] [data-action=remove]').click()
        expect(page.locator("#toast")).to_have_text("pace-form removed")
    assert failed == [], "\n".join(failed)


def test_a_failed_action_says_why_at_once(server, browser):
    """An action the server refuses: the toast says why, as an alert (read out at once; it was a polite status),
    and the form keeps what was typed, to be corrected. Redrawn lists given one key twice (seqs of a restarted
    server's events) keep both items."""
    with signed_in(browser, server.url) as page:
        page.click("#tabs [data-view=models]")
        page.fill("#add-model [name=name]", "pace-a")
        page.select_option("#add-model [name=kind]", "pace")
        page.click("#add-model button[type=submit]")
        toast = page.locator("#toast")
        expect(toast).to_have_text("Failed: model 'pace-a' is already registered")
        expect(toast).to_have_attribute("role", "alert")
        expect(toast).to_have_class("error")
        expect(page.locator("#add-model [name=name]")).to_have_value("pace-a")
        items = page.evaluate("""() => {
            const ol = document.createElement('ol');
            patch(ol, [el('li', { 'data-seq': 1 }, 'old')]);
            patch(ol, [el('li', { 'data-seq': 1 }, 'new'), el('li', { 'data-seq': 1 }, 'old')]);
            return [...ol.children].map((li) => li.textContent); }""")
        assert items == ["new", "old"], items


def test_aliases_tenant_limits_and_a_new_key(server, browser):
    """What the snapshots do not carry, from /admin/models and /admin/tenants: a model's aliases (settable in the
    add form), a tenant's models and limits. A tenant made here gets a new key in place (PATCH with the new key's
    hash, made in the page): the tenant is there all along (it was DELETE then POST: a moment with no tenant, its
    usage reset), its old key is refused once the new one is shown, its models, limits and usage stay; one of the
    configuration file is changed there."""
    failed: list[str] = []
    auth = {"Authorization": f"Bearer {ADMIN}"}
    with signed_in(browser, server.url, failed) as page:
        page.click("#tabs [data-view=models]")
        page.fill("#add-model [name=name]", "pace-aliased")
        page.fill("#add-model [name=aliases]", "pa, pa-2")
        page.select_option("#add-model [name=kind]", "pace")
        page.click("#add-model button[type=submit]")
        expect(page.locator('#models-table tr[data-model="pace-aliased"] .aliases')).to_have_text("pa, pa-2")
        assert httpx.get(server.url + "/admin/models", headers=auth).json()[-1]["aliases"] == ["pa", "pa-2"]
        httpx.delete(server.url + "/admin/models/pace-aliased", headers=auth).raise_for_status()

        page.click("#tabs [data-view=tenants]")
        page.fill("#add-tenant [name=name]", "team-keyed")
        page.fill("#add-tenant [name=models]", "pace-a")
        page.fill("#add-tenant [name=rps]", "5")
        page.fill("#add-tenant [name=conc]", "3")
        page.click("#add-tenant button[type=submit]")
        old = page.locator("#new-key-value").inner_text(timeout=15_000)
        expect(page.locator("#new-key")).to_have_text(f"Key for team-keyed{old}Copy Copy it now: it is shown once "
                                                       "(only its hash is kept).")  # (no warning: nor a "null" for one)
        row = page.locator('#tenants-table tr[data-tenant="team-keyed"]')
        expect(row.locator("td").nth(1)).to_have_text("pace-a")
        expect(row).to_contain_text("5 req/s · 3 at once")
        expect(page.locator('#tenants-table tr[data-tenant="team-a"] td').nth(1)).to_have_text("*")
        expect(page.locator('#tenants-table tr[data-tenant="team-a"] [data-action=rotate]')).to_have_count(0)

        models = lambda key: httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {key}"})  # noqa: E731
        httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {old}"}, timeout=30, json={
            "model": "pace-a", "prompt": "hi", "max_tokens": 2}).raise_for_status()
        calls: list[tuple[str, int, int]] = []  # each change the page asks for: method, and just before it reaches
        # the server, the tenant's status and its old key's

        def probe(route) -> None:
            if route.request.method != "GET":
                there = httpx.get(server.url + "/admin/tenants/team-keyed", headers=auth).status_code
                calls.append((route.request.method, there, models(old).status_code))
            route.continue_()
        page.route(re.compile(r"/admin/tenants(/.*)?$"), probe)
        row.locator("[data-action=rotate]").click()
        expect(page.locator("#toast")).to_have_text("Tenant team-keyed has a new key")
        assert calls == [("PATCH", 200, 200)], calls
        new = page.locator("#new-key-value").inner_text()
        assert re.fullmatch(r"tp-[A-Za-z0-9_-]{43}", new) and new != old, new
        assert models(old).status_code == 401 and models(new).status_code == 200
        t = httpx.get(server.url + "/admin/tenants/team-keyed", headers=auth).json()
        assert t["models"] == ["pace-a"] and t["rate"]["requests_per_s"] == 5 and t["max_concurrent"] == 3
        assert t["usage"]["requests"] == 1 and t["usage"]["completion_tokens"] == 2, t["usage"]
        # the hash made in the page (its own SHA-256: crypto.subtle is missing over plain HTTP) for other lengths
        for n in (0, 55, 56, 64, 200):
            msg = bytes(range(n))
            assert page.evaluate("a => hex(sha256(new Uint8Array(a)))", list(msg)) == hashlib.sha256(msg).hexdigest()
        expect(row).to_contain_text("5 req/s · 3 at once")
        httpx.delete(server.url + "/admin/tenants/team-keyed", headers=auth).raise_for_status()
    assert failed == [], failed


def test_a_tenant_changed_in_place(server, browser):
    """A tenant's models and limits changed from the dashboard (a row's Edit fills the tenant form; Save sends PATCH):
    its key keeps working, its usage and its rate's burst (which the form does not show) stay, an emptied field
    lifts that limit; the form is then for creating again. What POST /admin/tenants warns of (a model no model
    answers to) stays beside the new key: the page dropped it, so a typo in a tenant's models showed only as its
    404s."""
    failed: list[str] = []
    auth = {"Authorization": f"Bearer {ADMIN}"}
    with signed_in(browser, server.url, failed) as page:
        page.click("#tabs [data-view=tenants]")
        form = page.locator("#add-tenant")
        form.locator("[name=name]").fill("team-edit")
        form.locator("[name=models]").fill("pace-a, pace-typo")
        form.locator("[name=rps]").fill("5")
        form.locator("[name=conc]").fill("3")
        form.locator("button[type=submit]").click()
        expect(page.locator("#new-key-warning")).to_contain_text("models ['pace-typo'] match no model served now")
        key = page.locator("#new-key-value").inner_text()
        bearer = {"Authorization": f"Bearer {key}"}
        httpx.post(server.url + "/v1/completions", headers=bearer, timeout=30, json={
            "model": "pace-a", "prompt": "hi", "max_tokens": 2}).raise_for_status()
        httpx.patch(server.url + "/admin/tenants/team-edit", headers=auth,
                    json={"rate": {"requests_per_s": 5, "burst": 10}}).raise_for_status()  # (set elsewhere)

        row = page.locator('#tenants-table tr[data-tenant="team-edit"]')
        row.locator("[data-action=edit]").click()
        expect(page.locator("#tenant-form-title")).to_have_text("Change tenant team-edit")
        expect(form.locator("[name=name]")).to_have_attribute("readonly", "")
        expect(form.locator("[name=rps]")).to_have_value("5")
        expect(form.locator("[name=models]")).to_be_focused()
        form.locator("[name=models]").fill("pace-a")
        form.locator("[name=rps]").fill("8")
        form.locator("[name=tpm]").fill("600")
        form.locator("[name=conc]").fill("")
        form.locator("button[type=submit]").click()
        expect(page.locator("#toast")).to_have_text("Tenant team-edit changed")
        t = httpx.get(server.url + "/admin/tenants/team-edit", headers=auth).json()
        assert (t["models"], t["rate"], t["max_concurrent"]) == (
            ["pace-a"], {"requests_per_s": 8, "burst": 10, "tokens_per_min": 600}, None), t
        assert t["usage"]["requests"] == 1, t["usage"]
        assert httpx.get(server.url + "/v1/models", headers=bearer).status_code == 200
        expect(row).to_contain_text("8 req/s (burst 10) · 600 tok/min")
        expect(page.locator("#tenant-form-title")).to_have_text("Create a tenant key")
        expect(form.locator("[name=name]")).to_have_value("")
        expect(form.locator("[name=name]")).not_to_have_attribute("readonly", "")

        row.locator("[data-action=edit]").click()  # (Cancel: back to creating, nothing sent)
        expect(form.locator("[name=name]")).to_have_value("team-edit")
        page.click("#tenant-form-cancel")
        expect(form.locator("button[type=submit]")).to_have_text("Create")
        expect(form.locator("[name=name]")).to_have_value("")
        httpx.delete(server.url + "/admin/tenants/team-edit", headers=auth).raise_for_status()
    assert failed == [], "\n".join(failed)


def test_snapshots_too_rare_to_catch_live(server, browser):
    """Snapshots given to the page's stream handlers as the stream would (one evaluate: the next snapshot would
    redraw): a worker just killed (its standby takes over within a second), whose card offers no Drain and runs
    nothing (it said "idle"); more requests in flight than the snapshot lists (500 of 1,000 streams), which the
    Requests count says (it said 500) and the table notes."""
    failed: list[str] = []
    with signed_in(browser, server.url, failed) as page:
        expect(page.locator('.engine[data-engine="w0"] [data-action=drain]')).to_be_visible()
        card = page.evaluate("""() => {
            const p = structuredClone(S.pool);
            Object.assign(p.engines[0], { alive: false, inflight: 0 });
            S.es.dispatchEvent(new MessageEvent('pool', { data: JSON.stringify(p) }));
            const c = document.querySelector('.engine[data-engine="w0"]');
            return { state: c.querySelector('.badge').dataset.state, actions: c.querySelectorAll('button').length,
                     running: c.querySelector('.head b').textContent }; }""")
        assert card == {"state": "dead", "actions": 0, "running": "—"}, card

        page.click("#tabs [data-view=requests]")
        shown = page.evaluate("""() => {
            const r = { id: 'cmpl-x', model: 'pace-a', tenant: 'team-a', engines: ['w0'], state: 'running', age_s: 1,
                        tokens: 1, tokens_per_s: 1, choices: 1 };
            S.es.dispatchEvent(new MessageEvent('inflight', { data: '1000' }));
            S.es.dispatchEvent(new MessageEvent('requests', { data: JSON.stringify([r]) }));
            return [document.getElementById('n-requests').textContent,
                    document.getElementById('requests-note').textContent,
                    document.querySelectorAll('#requests-table tbody tr').length]; }""")
        assert shown == ["1000", "(the oldest 1 of 1000)", 1], shown
    assert failed == [], "\n".join(failed)


def test_signed_out_elsewhere_goes_to_the_login_once(server, browser):
    """Signed out in another tab, a page goes to the login form as its event stream ends, without an error in the
    browser's log: it went through a reconnect answered 401 and a refresh whose two calls got 401s, each navigating
    again and aborting the other (failed requests). The tab signing out waits for its stream's end too (its
    navigation aborted the open stream)."""
    failed: list[str] = []
    with signed_in(browser, server.url, failed) as page:
        other = page.context.new_page()
        other.on("requestfailed", lambda r: failed.append(f"failed (signing out): {r.method} {r.url} {r.failure}"))
        other.goto(server.url + "/dashboard")
        expect(other.locator("#conn")).to_have_text("live", timeout=10_000)
        other.click("header form button")
        expect(other.locator("#token")).to_be_visible(timeout=10_000)
        expect(page.locator("#token")).to_be_visible(timeout=10_000)
        assert other.request.get(server.url + "/admin/pool").status == 401
    assert failed == [], "\n".join(failed)


def test_signed_out_with_a_call_in_flight_does_not_reconnect(server, browser):
    """A page whose stream ends (signed out elsewhere) while one of its calls is still in flight goes to the login
    form once that call ends, having opened no new stream meanwhile: the browser's own reconnect (1 s after the
    end) was still pending when the call ended, and the navigation aborted it (CI: a failed request)."""
    failed: list[str] = []
    held: list = []
    with signed_in(browser, server.url, failed) as page:
        page.evaluate("S.calls++")  # (a call in flight: the page waits for it before it navigates)
        page.route("**/admin/events*", lambda route: held.append(route))  # (a new stream would wait here, pending)
        other = page.context.new_page()
        other.goto(server.url + "/dashboard")
        expect(other.locator("#conn")).to_have_text("live", timeout=10_000)
        other.click("header form button")
        expect(other.locator("#token")).to_be_visible(timeout=10_000)
        page.wait_for_function("S.leaving && S.es.readyState !== EventSource.OPEN", timeout=10_000)
        page.wait_for_timeout(1_500)  # (past the 1 s the server's retry: asks of a reconnect)
        assert held == [], "a new stream was opened after the session's end"
        page.evaluate("S.calls--; signedOut()")
        expect(page.locator("#token")).to_be_visible(timeout=10_000)
    assert failed == [], "\n".join(failed)


def focused(page) -> list:
    """Where the keyboard is: the focused element's row key (tenant, model or request), its action, its tag."""
    return page.evaluate("""() => { const a = document.activeElement, r = a.closest('tr');
        return [r && (r.dataset.tenant || r.dataset.model || r.dataset.request) || null, a.dataset.action || null,
                a.tagName]; }""")


def test_signing_out_starts_no_call_the_server_would_refuse(server, browser):
    """A snapshot that lands while the tab signs out (its session dropped, its stream not ended yet) and names a
    changed pool made the page fetch the models' and tenants' details: two 401s in the browser's log
    (test_dashboard_browser's details test failed on them once, a tenant deleted just before signing out). Here
    the snapshot comes right after the logout's answer, every time: the page starts no call once it signs out."""
    failed: list[str] = []
    with signed_in(browser, server.url, failed) as page:
        page.evaluate("""() => {
            const real = window.fetch;
            window.fetch = async (url, opts) => {
                const r = await real(url, opts);
                if (String(url).endsWith('/dashboard/logout')) {
                    const p = structuredClone(S.pool);
                    p.tenants = [...p.tenants, { ...p.tenants[0], name: 'named-while-signing-out' }];
                    S.es.dispatchEvent(new MessageEvent('pool', { data: JSON.stringify(p) }));
                }
                return r;
            }; }""")
        page.click("header form button")
        expect(page.locator("#token")).to_be_visible(timeout=10_000)
        assert page.request.get(server.url + "/admin/pool").status == 401
    assert failed == [], "\n".join(failed)


def test_the_stream_ending_waits_for_the_sign_outs_own_request(server, browser):
    """The server ends a signed-out session's stream a beat after the logout: the tab signing out went to the login
    form then, while its logout request (or the redirect it follows) was still in flight, and aborted it (a failed
    request: test_signed_out_elsewhere_goes_to_the_login_once failed on it once, on a loaded machine). Here the
    logout's answer is held for a second, every time: the page waits for it, then goes to the login form."""
    failed: list[str] = []
    with signed_in(browser, server.url, failed) as page:
        def held(route) -> None:
            answer = route.fetch(max_redirects=0)  # the session dropped: the stream ends meanwhile
            time.sleep(1.0)
            route.fulfill(response=answer)
        page.route("**/dashboard/logout", held)
        page.click("header form button")
        expect(page.locator("#token")).to_be_visible(timeout=10_000)
    assert failed == [], "\n".join(failed)


def test_the_focus_stays_in_place_when_an_action_removes_its_row(server, browser):
    """An action that removes its own row (Revoke, Remove, Cancel) or its own button (Pin becomes Unpin) left the
    keyboard's focus on the page's body (Tab started again from the top): it goes to the same button in the next row
    (the row before, past the last), else the table's heading."""
    failed: list[str] = []
    auth = {"Authorization": f"Bearer {ADMIN}"}
    for name in ("team-f1", "team-f2"):
        httpx.post(server.url + "/admin/tenants", headers=auth, json={"name": name}).raise_for_status()
    done = threading.Event()
    stream = functools.partial(_stream, server, done)  # to be cancelled

    threading.Thread(target=stream, daemon=True).start()
    with signed_in(browser, server.url, failed) as page:
        wait = lambda where: page.wait_for_function(  # noqa: E731
            "w => { const a = document.activeElement, r = a.closest('tr'); return JSON.stringify(w) === "
            "JSON.stringify([r && (r.dataset.tenant || r.dataset.model || r.dataset.request) || null, "
            "a.dataset.action || null, a.tagName]); }", arg=where, timeout=15_000)
        page.click("#tabs [data-view=tenants]")
        page.locator('#tenants-table tr[data-tenant="team-f1"] [data-action=revoke]').focus()
        page.keyboard.press("Enter")
        wait(["team-f2", "revoke", "BUTTON"])  # (the next row's)
        page.keyboard.press("Enter")
        wait(["team-a", "revoke", "BUTTON"])  # (the last row's gone: the one before it)

        page.click("#tabs [data-view=models]")
        page.locator('#models-table tr[data-model="pace-a"] [data-action=pin]').focus()
        page.keyboard.press("Enter")
        wait(["pace-a", "unpin", "BUTTON"])  # (replaced in place)
        page.keyboard.press("Enter")
        wait(["pace-a", "pin", "BUTTON"])

        page.click("#tabs [data-view=requests]")
        page.locator("#requests-table tbody tr [data-action=cancel]").focus()
        page.keyboard.press("Enter")
        wait([None, None, "H3"])  # (no row left: the table's heading)
        assert page.evaluate("document.activeElement.textContent").startswith("In flight")
        assert done.wait(10)
    assert failed == [], "\n".join(failed)


def test_a_new_key_is_copied(server, browser):
    """A new key (created, or a tenant's New key) has a Copy button, which says it copied (it had none: the key, shown
    once, was to be selected by hand). Over plain HTTP, where a browser has no navigator.clipboard, it selects the key
    (Ctrl+C copies it) and says so, or copies it the old way."""
    failed: list[str] = []
    with signed_in(browser, server.url, failed) as page:
        page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
        page.click("#tabs [data-view=tenants]")
        page.fill("#add-tenant [name=name]", "team-copy")
        page.click("#add-tenant button[type=submit]")
        key = page.locator("#new-key-value").inner_text(timeout=15_000)
        page.click("#new-key-copy")
        expect(page.locator("#new-key-copied")).to_have_text("Copied to the clipboard")
        assert page.evaluate("navigator.clipboard.readText()") == key
        # plain HTTP (an insecure context): no navigator.clipboard
        page.evaluate("Object.defineProperty(Navigator.prototype, 'clipboard', { get: () => undefined })")
        page.evaluate("getSelection().removeAllRanges()")
        page.click("#new-key-copy")
        expect(page.locator("#new-key-copied")).to_have_text(re.compile(
            r"Copied to the clipboard|Selected: press Ctrl\+C"))
        assert page.evaluate("getSelection().toString()") == key
        httpx.delete(server.url + "/admin/tenants/team-copy",
                     headers={"Authorization": f"Bearer {ADMIN}"}).raise_for_status()
    assert failed == [], "\n".join(failed)


def test_the_charts_last_time_label_fits(server, browser):
    """A time label at the chart's right edge is drawn whole: uPlot's 25 px right of the plot were a few short of
    half a label, whose last digit was cut off. The charts get 60 s ending on a whole minute (a tick at the edge at
    every width's spacing) and the canvas's last columns must be blank, at a phone's width and a laptop's."""
    with signed_in(browser, server.url) as page:
        page.evaluate("S.es.close()")  # (no snapshot redraws them meanwhile)
        for width in (390, 1280):
            page.set_viewport_size({"width": width, "height": 800})
            ink = page.evaluate("""async () => {
                resizeCharts();
                const T = Math.floor(Date.now() / 60000) * 60;
                S.series.t = Array.from({ length: 61 }, (_, i) => T - 60 + i);
                for (const n of S.series.tps.keys()) S.series.tps.set(n, S.series.t.map(() => 1));
                renderChart('chart-tps', 'tps');
                await new Promise(requestAnimationFrame);  // (uPlot draws its new size and data in a microtask)
                const c = document.querySelector('#chart-tps canvas'), g = c.getContext('2d');
                const d = g.getImageData(c.width - 2, 0, 2, c.height).data;
                let ink = 0;
                for (let i = 3; i < d.length; i += 4) if (d[i] > 0) ink++;
                return ink; }""")
            assert ink == 0, (width, ink)


def test_a_trusted_local_proxys_https_makes_the_cookie_secure(server):
    """`tokenpool serve` behind a TLS-terminating proxy on the same host (nginx, caddy on 127.0.0.1): uvicorn trusts
    a loopback peer's X-Forwarded-Proto by default, so the session cookie is Secure when the proxy says https, and
    not when it says http or nothing (tests/test_dash51b_cookie.py: an untrusted peer's header is not believed)."""
    def attrs(headers: dict[str, str]) -> set[str]:
        r = httpx.post(server.url + "/dashboard/login", data={"token": ADMIN}, headers=headers)
        assert r.status_code == 303, r.text
        return {a.strip().lower() for a in r.headers["set-cookie"].split(";")[1:]}

    assert "secure" in attrs({"X-Forwarded-Proto": "https"})
    assert "secure" not in attrs({"X-Forwarded-Proto": "http"}) and "secure" not in attrs({})


def test_server_stop_with_the_dashboard_open(server, browser):
    """Last (it stops the module's server). A SIGTERM with a dashboard open: its event stream ends once the drain
    is over, so the server stops without waiting out uvicorn's graceful timeout for it and cancelling it (an ERROR
    and a traceback in the log at every restart); the page says it reconnects."""
    with signed_in(browser, server.url) as page:
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
        expect(page.locator("#conn")).to_have_text("reconnecting…", timeout=10_000)
    log = server.log()
    assert "graceful shutdown exceeded" not in log and "Traceback" not in log, log
