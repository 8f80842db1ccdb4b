"""The dashboard with many models and a slow CPU (session 56's user testing):

- models' colours repeated after 12 (the 13th model's lines and swatches were the 1st's): the palette's twelve, then
  hues a golden angle apart at lightnesses the palette has not, never one colour twice;
- `late` events (a model past its next token's deadline: on a slow CPU at nearly every turn) flooded the Events view,
  and pushed every other event out of the page's list: a model's `late` events within a minute are one line,
  "late ×N", kept at the top;
- the charts' legend said the time as "2026-12-06 2:12pm" beside the axis's "14:12:07": to the second, as the axis.

Headless Chromium (the shared `browser`) against the app served in this process (no worker: the models are
registered, the events published on the server's own bus).
"""

from __future__ import annotations

import asyncio
import itertools
import re
import shutil
import threading
import time

import pytest

from controller.app import build_app
from controller.config import ModelSpec, ServerConfig
from controller.keys import hash_key
from tests import dashboard_pages as pages
from tests import ports

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs the system chromium (apt-get install chromium)")
expect = sync_api.expect

ADMIN = "admin-ux57-cosmetics"
MODELS = [f"m{i:02d}" for i in range(30)]


def _port() -> int:
    return ports.free_port(range(18600, 18700))


@pytest.fixture(scope="module")
def server():
    """The app on a thread's event loop; yields its URL and `publish(kind, **fields)` onto its event bus."""
    import uvicorn

    cfg = ServerConfig(admin_token_hash=hash_key(ADMIN), workers={"local": "none"},
                       models=[ModelSpec(name=n, engine={"kind": "pace"}) for n in MODELS])
    app = build_app(cfg)
    port = _port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=lambda: loop.run_until_complete(srv.serve()), daemon=True)
    t.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline and t.is_alive(), "the server did not start"
        time.sleep(0.02)

    def publish(kind: str, **fields) -> None:
        done = threading.Event()
        loop.call_soon_threadsafe(lambda: (app.state.controller.events.publish(kind, **fields), done.set()))
        assert done.wait(5)

    try:
        yield f"http://127.0.0.1:{port}", publish
    finally:
        srv.should_exit = True
        t.join(10)


def test_thirty_models_have_thirty_colours(server, browser):
    url, _ = server
    failed: list[str] = []
    with pages.signed_in(browser, url, ADMIN, failed) as page:
        page.click("#tabs [data-view=models]")
        expect(page.locator("#models-table tbody tr")).to_have_count(len(MODELS))
        rgb = page.evaluate("""names => names.map(n => getComputedStyle(document.querySelector(
            `#models-table tr[data-model="${n}"] .swatch`)).backgroundColor)""", MODELS)
        colours = [tuple(int(x) for x in re.findall(r"\d+", c)[:3]) for c in rgb]
        assert len(set(colours)) == len(MODELS), rgb

        def dist(a, b):
            return sum((x - y) ** 2 for x, y in zip(a, b)) ** 0.5

        # as far apart as the palette's own twelve are, each pair of the thirty
        palette = min(dist(a, b) for a, b in itertools.combinations(colours[:12], 2))
        closest = min(dist(a, b) for a, b in itertools.combinations(colours, 2))
        assert closest >= palette * 0.95, (closest, palette)
        many = page.evaluate("n => new Set(Array.from({ length: n }, (_, i) => modelColor(i))).size", 500)
        assert many == 500
    assert failed == [], "\n".join(failed)


def test_late_events_are_one_line_per_model(server, browser):
    url, publish = server
    failed: list[str] = []
    with pages.signed_in(browser, url, ADMIN, failed) as page:
        publish("drain", engine="w9")  # (an event the lates would have pushed out of the page's list)
        for i in range(300):
            publish("late", model=MODELS[i % 2], engine="w0", late_s=round(0.1 + i / 1000, 3), residency="resident")
        publish("late", model=MODELS[2], engine="w0", late_s=0.5, residency="host")
        page.click("#tabs [data-view=events]")
        lates = page.locator("#events-list li[data-kind=late]")
        expect(lates).to_have_count(3)
        expect(lates.nth(0).locator(".kind")).to_have_text("late")  # the newest: m02's one
        expect(lates.nth(1).locator(".kind")).to_have_text("late ×150")
        expect(lates.nth(1)).to_contain_text(re.compile(r"150 times since \d\d:\d\d:\d\d; the last: model=m01\s+"
                                                        r"engine=w0\s+late_s=0\.399"))
        expect(lates.nth(2)).to_contain_text("model=m00")
        expect(page.locator("#events-list li[data-kind=drain]")).to_contain_text("engine=w9")
        assert "_n" not in page.locator("#events-list").inner_text()
    assert failed == [], "\n".join(failed)


def test_the_legend_says_the_time_to_the_second(server, browser):
    url, _ = server
    failed: list[str] = []
    with pages.signed_in(browser, url, ADMIN, failed) as page:
        pages.snapshots(page, 1)
        over = page.locator("#chart-tps .u-over")
        box = over.bounding_box()
        page.mouse.move(box["x"] + box["width"] - 2, box["y"] + box["height"] / 2)
        value = page.locator("#chart-tps .u-legend .u-series").first.locator(".u-value")
        expect(value).to_have_text(re.compile(r"^\d\d:\d\d:\d\d$"))
    assert failed == [], "\n".join(failed)
