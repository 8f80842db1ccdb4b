"""Where the keyboard's focus goes when a model's Evict leaves its row (the model no longer resident) while the row
stays: to the next row's Evict (the row before, past the last), as the page's rule says (the same button in the next
row, else the nearest control beside it). It went to the nearest control of its own row, that model's Remove: Enter
pressed once more asked to remove the model just evicted. patch() itself, on rows drawn in the page as the Models
view draws them. Headless Chromium under Playwright; skipped without."""

from __future__ import annotations

import shutil

import pytest

from controller.keys import hash_key
from tests import dashboard_pages as pages
from tests.ports import live_server_on

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs the system chromium (apt-get install chromium)")

ADMIN = "admin-ux60h-focus-evict-token"
PORTS = range(26160, 26180)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = {"admin_token_hash": hash_key(ADMIN), "workers": {"local": "cpu", "standby": False},
           "tenants": [{"name": "team-a", "key_hashes": [hash_key("tp-ux60h-focus-evict-key")]}],
           "models": [{"name": "pace-a", "path": None, "engine": {"kind": "pace", "pace_s_per_token": 0.05}}]}
    with live_server_on(PORTS, cfg, tmp_path_factory.mktemp("srv")) as srv:
        yield srv


ROWS = """(evicted, names) => {
    const old = document.getElementById('ux60h-rows');
    if (old) old.remove();
    const tbody = document.createElement('tbody');
    document.body.append(el('table', { id: 'ux60h-rows' }, tbody));
    const row = (name, resident) => el('tr', { 'data-model': name }, el('td', { text: name }),
        el('td', { class: 'actions' }, el('button', { 'data-action': 'pin' }, 'Pin'), ' ',
           resident ? el('button', { 'data-action': 'evict' }, 'Evict') : null, ' ',
           el('button', { class: 'danger', 'data-action': 'remove' }, 'Remove')));
    patch(tbody, names.map((n) => row(n, true)));
    tbody.querySelector(`tr[data-model="${evicted}"] [data-action=evict]`).focus();
    patch(tbody, names.map((n) => row(n, n !== evicted)));
    const a = document.activeElement, r = a.closest('tr');
    return [r ? r.dataset.model : null, a.dataset.action || null];
}"""


def _evict(page, evicted: str, names: list[str]) -> list:
    return page.evaluate(f"([e, n]) => ({ROWS})(e, n)", [evicted, names])


def test_the_focus_goes_to_the_next_rows_evict_when_evict_leaves_its_row(server, browser):
    failed: list[str] = []
    with pages.signed_in(browser, server.url, ADMIN, failed) as page:
        page.evaluate("S.es.close()")  # (no snapshot meanwhile)
        assert _evict(page, "a", ["a", "b", "c"]) == ["b", "evict"]
        assert _evict(page, "c", ["a", "b", "c"]) == ["b", "evict"]  # (past the last: the one before)
        # no other row has an Evict: the nearest control beside it, in its row
        assert _evict(page, "a", ["a"]) == ["a", "remove"]
    assert failed == [], "\n".join(failed)
