"""The dashboard through an operator's pass (ux67d), each through a live CPU server and headless Chromium (Debian's
`chromium`) under Playwright, as tests/test_ux62e_dashboard.py; skipped without them:

- Evict on a model of a CPU engine asked "Evict M from GPU memory?" (and its title said GPU memory), where the Pool
  view labels that engine's memory RAM: it names the memory as the model's engines have it;
- the Models table of three loaded models (their latency figures) was wider than its card at 1280 px, the most
  common laptop width: its last column ("Load stall (loads)") passed under the sticky actions, its header cut to
  "Lo s (loa" and its loads' count hidden, with no edge drawn (the actions' border was only drawn under 1100 px, and
  drawn nowhere: a collapsed table's border does not stay with a sticky cell). Its cells are a little closer, and a
  table wider than its card, at any width, has its actions' edge drawn;
- an idle engine's card said "running now: idle" and outlined, among its resident and registered models, the model
  of its last turn, as the model it runs now: the outline is the model it runs, while it runs one.
"""

from __future__ import annotations

import contextlib
import shutil
import threading

import httpx
import openai
import pytest

from controller.keys import hash_key
from tests import dashboard_pages as pages
from tests.ports import live_server_on

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs the system chromium (apt-get install chromium)")
expect = sync_api.expect

ADMIN = "admin-ux67d-token"
KEY = "tp-ux67d-dashboard-key"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
PORTS = range(29910, 29930)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    cfg = {"admin_token_hash": hash_key(ADMIN), "workers": {"local": "cpu", "standby": False},
           "tenants": [{"name": "team-a", "key_hashes": [hash_key(KEY)]}],
           "models": [{"name": "tiny", "path": str(tiny_model)},
                      {"name": "pace-a", "path": None, "engine": {"kind": "pace", "pace_s_per_token": 0.05}}]}
    with live_server_on(PORTS, cfg, tmp_path_factory.mktemp("srv")) as srv:
        openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY).completions.create(model="tiny", prompt="hi",
                                                                              max_tokens=2)  # (resident: Evict shown)
        yield srv


def test_evict_names_the_memory_of_a_cpu_engine(server, browser):
    asked: list[str] = []
    failed: list[str] = []
    with pages.signed_in(browser, server.url, ADMIN, failed) as page:
        page.on("dialog", lambda d: asked.append(d.message))  # (signed_in's handler accepts it)
        page.click("#tabs [data-view=models]")
        evict = page.locator('#models-table tr[data-model="tiny"] [data-action=evict]')
        expect(evict).to_have_attribute("title", "free its RAM once its requests finish; the next request brings it "
                                                 "back")
        evict.click()
        expect(page.locator("#toast")).to_have_text("tiny evicted once idle")
    assert asked == ["Evict tiny from RAM?"]
    assert failed == [], "\n".join(failed)


# The Models table's rows as three loaded models' figures draw them (one of each kind of the widest: seconds, ms)
LOADED = """(first) => {
    const p = structuredClone(S.pool), m0 = p.models[0];
    p.models = [first, 'qwen3-small', 'llama-tiny'].map((name, i) => ({ ...m0, name, state: 'resident',
        pinned: i === 2, waiting: 0, oldest_wait_s: null, running: 1, kv_pages_used: 2, kv_swapped: 0,
        ttft_p50: 0.369, ttft_p99: 1.19, tpot_p50: 0.108, tpot_p99: 0.126, attainment: 1, tokens_per_s: 16.8,
        cache_hit_frac: 0.665, loads: 4, load_stall_s: 0.0001 }));
    if (S.es) S.es.close();  // (no snapshot draws over them)
    renderModels(p);
}"""
# Whether the table is wider than its card, and whether its actions' edge is drawn
EDGE = """() => { const card = document.querySelector('#models-table').closest('.card');
    const cell = document.querySelector('#models-table td.actions');
    return [card.scrollWidth > card.clientWidth, getComputedStyle(cell).boxShadow !== 'none'
            || getComputedStyle(cell).borderLeftStyle !== 'none'] }"""


def test_the_models_table_fits_at_1280_and_marks_its_actions_edge_where_it_does_not(server, browser):
    failed: list[str] = []
    with pages.signed_in(browser, server.url, ADMIN, failed) as page:
        page.click("#tabs [data-view=models]")
        page.evaluate(LOADED, "qwen2-small")
        page.wait_for_function("document.querySelectorAll('#models-table tbody tr').length === 3")
        head = page.locator("#models-table th", has_text="Load stall")
        actions = page.locator("#models-table th:last-child")
        # at 1280 px the whole table is in its card: the last column's header beside the actions, not under them
        page.wait_for_function(f"() => !({EDGE})()[0]")
        assert head.bounding_box()["x"] + head.bounding_box()["width"] <= actions.bounding_box()["x"] + 0.5
        expect(page.locator('#models-table tr[data-model="qwen2-small"] td:nth-last-child(2)')).to_have_text("0 ms (4)")
        assert page.evaluate(EDGE) == [False, False]  # (no edge where nothing passes under the actions)
        # narrower, and at 1280 px with a long model name: the table scrolls in its card, its actions' edge drawn
        page.set_viewport_size({"width": 1000, "height": 800})
        page.wait_for_function(f"() => ({EDGE})().every(Boolean)")
        page.set_viewport_size({"width": 1280, "height": 800})
        page.wait_for_function(f"() => !({EDGE})()[0]")
        page.evaluate(LOADED, "Qwen2.5-Coder-7B-Instruct-AWQ")
        page.wait_for_function(f"() => ({EDGE})().every(Boolean)")
    assert failed == [], "\n".join(failed)


def test_an_idle_engine_outlines_no_model_as_running(server, browser):
    failed: list[str] = []
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY)
    card = ".engine[data-engine]"
    with pages.signed_in(browser, server.url, ADMIN, failed) as page:
        client.completions.create(model="tiny", prompt="hi", max_tokens=2)  # (a turn of tiny's: the last one)
        expect(page.locator(f"{card} .facts b")).to_have_text("idle")
        pages.snapshots(page, 1)
        assert page.locator(f"{card} .chip").count() >= 2  # (tiny resident and registered)
        expect(page.locator(f"{card} .chip.active")).to_have_count(0)
        # while it runs one (pace-a's 10 s): outlined, as "running now" says
        done = threading.Event()

        def pace() -> None:
            with contextlib.suppress(openai.APIError):  # (cancelled below)
                client.completions.create(model="pace-a", prompt="hi", max_tokens=200)
            done.set()

        threading.Thread(target=pace, daemon=True).start()
        expect(page.locator(f"{card} .facts b")).to_have_text("pace-a", timeout=10_000)
        expect(page.locator(f"{card} .chip.active").first).to_have_text("pace-a")
        assert not done.is_set()
        for r in httpx.get(server.url + "/admin/requests", headers=AUTH).json():  # (not left for the next test)
            httpx.post(server.url + f"/admin/requests/{r['id']}/cancel", headers=AUTH)
    assert failed == [], "\n".join(failed)
