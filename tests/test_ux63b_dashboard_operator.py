"""Reconnects and events (ux63b), each where users meet them:

- the dashboard (headless Chromium under Playwright, as tests/test_ux62j_polish.py; skipped without them): its
  reconnects back off (1, 2, 4, then every 8 s) also where the stream opens and ends at once (a server or a proxy that
  answers it 200, empty): the backoff went back to 1 s at each open, and such a stream was asked for once a second
  for good; it goes back to 1 s once a stream brings data, and a real stream after them connects and shows the pool;
- the operator (kmock's emulator, a fake controller, kopf in-process, as tests/test_k8s52_events.py): a model
  flapping between Progressing and Ready posts one Normal event, not one per return to Ready (kopf makes each a new
  Event object, where client-go counts repeats on one: a `kubectl describe` line each); past the window, a round
  that finds it still Ready posts it again, saying how many went unposted; the first recovery from Degraded is told
  however soon (a model flapping between Degraded and Ready: tests/test_ux64d_operator.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import shutil
import threading
import uuid

import pytest

from controller.keys import hash_key
from tests.dashboard_pages import LIVE, pause_clock, run_clock
from tests.ports import live_server_on

ADMIN = "admin-ux63b-token"
PORTS = range(28350, 28375)  # the dashboard's server
OPERATOR_PORTS = range(28375, 28400)  # kmock's emulator and the fake controller
CFG = {"admin_token_hash": hash_key(ADMIN), "workers": {"local": "cpu"},
       "models": [{"name": "pace-a", "path": None, "engine": {"kind": "pace", "pace_s_per_token": 0.05}}]}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER = CHROMIUM is not None and importlib.util.find_spec("playwright") is not None
OPERATOR = all(importlib.util.find_spec(m) is not None for m in ("kopf", "kmock", "openai"))

# When the page opens each event stream, by the page's clock (Playwright's sync API hands its events over late,
# within its own calls)
STREAM_CLOCK = """(() => {
  window.streamsOpened = [];
  const Native = window.EventSource;
  window.EventSource = class extends Native {
    constructor(url, init) { window.streamsOpened.push(Date.now()); super(url, init); }
  };
})();"""


@contextlib.contextmanager
def clocked_dashboard(browser, url: str, admin: str):
    """A browser context's dashboard page at `url`, signed in with `admin`, live and drawing its first snapshot, its
    event streams' openings clocked (`window.streamsOpened`), its clock Playwright's (page.clock: pause_clock,
    run_clock). Closed after."""
    from playwright.sync_api import expect

    ctx = browser.new_context()
    try:
        ctx.add_init_script(STREAM_CLOCK)
        page = ctx.new_page()
        page.clock.install()
        page.goto(url + "/dashboard")
        page.fill("#token", admin)
        page.click("#login")
        expect(page.locator("#conn")).to_have_text("live", timeout=15_000)
        page.wait_for_function("S.snapshots >= 1")
        yield page
    finally:
        ctx.close()


def _gaps(times: list[float]) -> list[float]:
    return [round(b - a, 2) for a, b in zip(times, times[1:], strict=False)]


# --- the dashboard's reconnect to a stream that ends as it opens ---
@pytest.mark.skipif(not BROWSER, reason="needs Playwright and the system chromium (apt-get install chromium)")
def test_a_stream_that_ends_as_it_opens_is_asked_for_less_and_less_often(tmp_path, browser):
    """The page's stream answered 200 and ended at once (Playwright fulfils it, empty), the server up all along
    (GET /dashboard/session says the session is live): the page's next streams open 1, 3 and 7 s on (1, 2, 4 s
    apart), not once a second. The real stream back: the next try (8 s after the last) connects, the page is live and
    draws the pool's snapshots, and the backoff is at 1 s again. The page's clock is run by hand (run_clock)."""
    from playwright.sync_api import expect

    with live_server_on(PORTS, CFG, tmp_path / "srv") as server, clocked_dashboard(browser, server.url, ADMIN) as page:
        conn = page.locator("#conn")

        cut: list[str] = []  # (the streams fulfilled empty)

        def empty(route) -> None:
            cut.append(route.request.url)
            route.fulfill(status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
                          body="")

        page.route("**/admin/events?*", empty)
        pause_clock(page)
        # the stream fails (as a proxy or a restart would end it): from here every stream opens and ends at once
        t_fail = page.evaluate("""() => { window.streamsOpened.length = 0; const t = Date.now();
                                          S.es.dispatchEvent(new Event('error')); return t; }""")
        expect(conn).to_have_text("reconnecting…")
        run_clock(page, 9_000)  # (tries at ~1, 3 and 7 s; the next at ~15)
        opened = [round((t - t_fail) / 1000, 2) for t in page.evaluate("window.streamsOpened")]
        # (was 1, 2, 3, ..., 9: one a second. Gaps: each try's own delays, a session's answer, do not add up)
        assert len(opened) == 3 and opened[0] == pytest.approx(1, abs=0.7), opened
        assert _gaps(opened) == pytest.approx([2, 4], abs=0.7), opened
        assert len(cut) == 3, cut

        # the stream served again: the next try, ~15 s on, connects; data, and 1 s again
        page.unroute("**/admin/events?*", empty)
        drawn = page.evaluate("S.snapshots")
        run_clock(page, 15_000, until=LIVE)
        expect(conn).to_have_text("live")
        page.wait_for_function("n => S.snapshots >= n", arg=drawn + 2)
        opened = [round((t - t_fail) / 1000, 2) for t in page.evaluate("window.streamsOpened")]
        assert len(opened) == 4 and _gaps(opened) == pytest.approx([2, 4, 8], abs=0.7), opened
        assert page.evaluate("S.retryMs") == 1000
        assert page.evaluate("S.pool.models.map((m) => m.name)") == ["pace-a"]
        assert page.locator("#conn-since").is_hidden()
        assert "stale" not in (page.locator("main").get_attribute("class") or "")


# --- the operator's Normal events of a model flapping ---
def _normal(kube, name: str) -> list[dict]:
    from tests.operator_events import posted

    return posted(kube, name, "Normal")


def _off_this_loop(main) -> None:
    """Run the coroutine function `main` to its end on an event loop of its own thread: Playwright's sync API, whose
    browser this module's dashboard test keeps open, runs a loop in this thread (pytest-asyncio could start none)."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as e:  # noqa: BLE001 - raised again in the test's thread
            failed.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join()
    if failed:
        raise failed[0]


@pytest.mark.skipif(not OPERATOR, reason="needs kopf, kmock and openai (the operator's test extras)")
@pytest.mark.timeout(120)
def test_a_model_flapping_between_progressing_and_ready_posts_one_normal_event(tmp_path, monkeypatch):
    """A PooledModel evicted from its engine and loaded again, twice (Loading, then Serving): one "Normal Serving"
    event, not three (each was an Event object of its own, a line of `kubectl describe` each). Past the window
    (EVENT_REPEAT_S, 10 min; shortened here), a round of it still Serving posts it, saying how many were not."""
    _off_this_loop(lambda: _flapping(tmp_path, monkeypatch))


async def _flapping(tmp_path, monkeypatch) -> None:
    from controller.operator import handlers
    from tests.kmock_util import SECRETS, operator_world, pace_model_serving
    from tests.test_operator_e2e import Operator, _until
    from tests.test_operator_lifecycle import _reason

    async with operator_world(tmp_path, monkeypatch, port_range=OPERATOR_PORTS, secrets=SECRETS) as w:
        kube, fake = w.kube, w.fake
        async with Operator():
            await pace_model_serving(kube)

            async def flap() -> None:
                fake.models["m"]["engines"] = []  # evicted: registered, on no engine
                await _until("m Loading", lambda: _reason(kube, "pooledmodels", "m", "Loading"))
                fake.models["m"]["engines"] = ["e0"]  # loaded again
                await _until("m Serving again", lambda: _reason(kube, "pooledmodels", "m", "Serving"))

            for _ in range(2):  # (each flap waits on the operator's rounds, ~2 s; the unit test below flaps more)
                await flap()
            assert [(e["reason"], e["message"]) for e in _normal(kube, "m")] == [("Serving", "on 1 engine(s)")]

            monkeypatch.setattr(handlers, "EVENT_REPEAT_S", 0.0)  # (the window past)
            await _until("a second Normal event", lambda: _at_least(kube, "m", 2))
            await asyncio.sleep(1.5)  # (the rounds after it: nothing more to say)
            assert [(e["reason"], e["message"]) for e in _normal(kube, "m")] == [
                ("Serving", "on 1 engine(s)"),
                ("Serving", "on 1 engine(s) (2 more times since the last such event, not posted)")]


async def _at_least(kube, name: str, n: int) -> bool:
    return len(_normal(kube, name)) >= n


@pytest.mark.skipif(not OPERATOR, reason="needs kopf, kmock and openai (the operator's test extras)")
def test_a_recovery_from_degraded_is_told_however_soon(monkeypatch):
    """Rounds as kopf runs them (as tests/test_ux62d_operator.py): a return to Ready within the window is not posted,
    but the first from Degraded (its Warning posted in between) is (another message); the plain returns after it, within
    the window of the first, are not."""
    monkeypatch.setenv("TOKENPOOL_OPERATOR_RESYNC_S", "1")  # (importing the handlers fixes their timers' interval)
    import kopf

    from controller.operator import handlers
    from tests.operator_events import captured

    posted = captured(monkeypatch)
    body = {"kind": "PooledModel", "metadata": {"name": "m", "uid": str(uuid.uuid4())}}
    status: dict = {}

    def round_(state: str, reason: str) -> None:
        patch = kopf.Patch()
        handlers._write_status(body, patch, status, {}, state, reason, f"{reason}!", 1)
        status.update(patch.status)

    for state, reason in (("Progressing", "Loading"), ("Ready", "Serving"), ("Progressing", "Loading"),
                          ("Ready", "Serving"), ("Degraded", "ControllerUnavailable"), ("Ready", "Serving"),
                          ("Progressing", "Loading"), ("Ready", "Serving"), ("Progressing", "Loading"),
                          ("Ready", "Serving")):
        round_(state, reason)
    assert posted == [("Normal", "Serving", "Serving!"),
                      ("Warning", "ControllerUnavailable", "ControllerUnavailable!"),
                      ("Normal", "Serving", "Serving! (no longer Degraded: ControllerUnavailable)")]
    uid = body["metadata"]["uid"]
    assert handlers._UNTOLD[uid] == (("Ready", "Serving"), ("Normal", "Serving", "Serving!"))  # (3 returns held back)
    handlers._forget(kopf.Memo(locks_guard=threading.Lock()), uid)
    assert uid not in handlers._POSTED and uid not in handlers._UNTOLD
