"""Where the keyboard's focus goes when its button leaves a row that stays (ux61c). A button turned into its
counterpart (Pin into Unpin once pinned, Drain into Resume once draining) keeps the focus, wherever the counterpart is
drawn; any other button gone gives it to the same button in the next row, as the page's rule says. refocus() took
the button now at the focused one's place, whichever it was: that worked for Pin turned Unpin only because Unpin is
drawn where Pin was, and in a row drawn without spaces between its buttons an Evict gone gave the focus to the row's
Remove (Enter asked to remove the model just evicted), a Pin turned Unpin too. patch() itself, on rows drawn in the
page. Headless Chromium under Playwright; skipped without."""

from __future__ import annotations

import shutil

import pytest

from controller.keys import hash_key
from tests import dashboard_pages as pages
from tests.ports import live_server_on

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs the system chromium (apt-get install chromium)")

ADMIN = "admin-ux61c-focus-token"
PORTS = range(26400, 26420)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = {"admin_token_hash": hash_key(ADMIN), "workers": {"local": "cpu", "standby": False},
           "tenants": [{"name": "team-a", "key_hashes": [hash_key("tp-ux61c-focus-key")]}],
           "models": [{"name": "pace-a", "path": None, "engine": {"kind": "pace", "pace_s_per_token": 0.05}}]}
    with live_server_on(PORTS, cfg, tmp_path_factory.mktemp("srv")) as srv:
        yield srv


# Rows (`before`, then `after`: {key: [actions]}) drawn by patch() into a table of the page, spaced (" " between the
# buttons, as the dashboard draws them) or not; the focus put on `focus` ([key, action]) in the first; where it is
# after the second ([key, action])
ROWS = """([before, after, focus, spaced]) => {
    const old = document.getElementById('ux61c-rows');
    if (old) old.remove();
    const tbody = document.createElement('tbody');
    document.body.append(el('table', { id: 'ux61c-rows' }, tbody));
    const rows = (what) => Object.entries(what).map(([key, actions]) => el('tr', { 'data-model': key },
        el('td', { text: key }),
        el('td', { class: 'actions' }, actions.flatMap((a, i) => [i && spaced ? ' ' : null,
            el('button', { 'data-action': a }, a)]))));
    patch(tbody, rows(before));
    tbody.querySelector(`tr[data-model="${focus[0]}"] [data-action="${focus[1]}"]`).focus();
    patch(tbody, rows(after));
    const a = document.activeElement, r = a.closest('tr');
    return [r ? r.dataset.model : null, a.dataset.action || null];
}"""

# An engine's card as renderEngines draws it: its Drain (Resume) in its head, its key on the card
CARD = """(after) => {
    const old = document.getElementById('ux61c-card');
    if (old) old.remove();
    const box = el('div', { id: 'ux61c-card' });
    document.body.append(box);
    const card = (extra, action) => el('div', { class: 'card engine', 'data-engine': 'e0' },
        el('div', { class: 'head' }, el('h3', { text: 'e0' }), ...extra, el('button', { 'data-action': action }, action)));
    patch(box, [card([el('span', { class: 'badge ready', text: 'ready' })], 'drain')]);
    box.querySelector('[data-action=drain]').focus();
    patch(box, [card(after, 'resume')]);
    const a = document.activeElement, c = a.closest('[data-engine]');
    return [c ? c.dataset.engine : null, a.dataset.action || null];
}"""


def _rows(page, before: dict, after: dict, focus: list, spaced: bool) -> list:
    return page.evaluate(ROWS, [before, after, focus, spaced])


@pytest.mark.parametrize("spaced", [True, False], ids=["spaced", "unspaced"])
def test_the_focus_follows_a_button_to_its_counterpart_and_no_other(server, browser, spaced):
    failed: list[str] = []
    three = ["a", "b", "c"]
    with pages.signed_in(browser, server.url, ADMIN, failed) as page:
        page.evaluate("S.es.close()")  # (no snapshot meanwhile)
        # Pin turned Unpin (the model resident: its Evict goes with the pin), as the Models view draws it
        before = {k: ["pin", "evict", "remove"] for k in three}
        assert _rows(page, before, {**before, "a": ["unpin", "remove"]}, ["a", "pin"], spaced) == ["a", "unpin"]
        assert _rows(page, {**before, "a": ["unpin", "remove"]}, before, ["a", "unpin"], spaced) == ["a", "pin"]
        # the counterpart drawn elsewhere in the row, another button where Pin was: the counterpart
        before = {k: ["evict", "pin", "remove"] for k in three}
        assert _rows(page, before, {**before, "b": ["unpin", "remove"]}, ["b", "pin"], spaced) == ["b", "unpin"]
        # Evict gone (the model no longer resident), Remove now where it was: the next row's Evict
        before = {k: ["pin", "evict", "remove"] for k in three}
        assert _rows(page, before, {**before, "a": ["pin", "remove"]}, ["a", "evict"], spaced) == ["b", "evict"]
        assert _rows(page, before, {**before, "c": ["pin", "remove"]}, ["c", "evict"], spaced) == ["b", "evict"]
        # no other row has an Evict: the nearest control beside it, in its row (after it first)
        assert _rows(page, {"a": ["pin", "evict", "remove"]}, {"a": ["pin", "remove"]}, ["a", "evict"],
                     spaced) == ["a", "remove"]
        # an engine's Drain turned Resume: Resume, its state's badge redrawn beside it (or a note added before it)
        draining = "el('span', { class: 'badge draining', text: 'draining' })"
        assert page.evaluate(f"() => ({CARD})([{draining}])") == ["e0", "resume"]
        assert page.evaluate(f"() => ({CARD})([{draining}, el('span', {{ text: 'note' }})])") == ["e0", "resume"]
    assert failed == [], "\n".join(failed)
