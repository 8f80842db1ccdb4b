"""Polish (ux62j), each through a live server where users meet it:

- the dashboard, its server stopped: the page asked GET /dashboard/session once a second for as long as the server
  was down (one net::ERR_CONNECTION_REFUSED line in the console each); now 1, 2, 4, then every 8 s, 1 s again once
  the stream opens, a server back up still seen at the next try (headless Chromium under Playwright, as
  tests/test_ux62e_dashboard.py; skipped without them);
- the Messages API's 400 for a tool_result of no tool_use of the previous message: Anthropic's wording now, its
  names in backticks (the official `anthropic` client);
- GET /admin/pool's and /admin/requests' fields (the dashboard's data) and the admin actions' answers: a
  description of each in the OpenAPI schema (/docs), its units where a figure has one (TenantPoolOut.requests_per_s
  had none: requests arriving, or ended?).
"""

from __future__ import annotations

import importlib.util
import shutil

import httpx
import pytest
import yaml

from controller.keys import hash_key
from load_tests.live_server import LiveServer
from tests.dashboard_pages import LIVE, pause_clock, run_clock
from tests.ports import free_port, live_server_on

ADMIN = "admin-ux62j-token"
KEY = "tp-ux62j-key"
PORTS = range(28100, 28150)  # the module's server
RESTART_PORTS = range(28150, 28200)  # the stopped and restarted one's
AUTH = {"Authorization": f"Bearer {ADMIN}"}
CFG = {"admin_token_hash": hash_key(ADMIN), "workers": {"local": "cpu"},
       "tenants": [{"name": "team-a", "key_hashes": [hash_key(KEY)]}],
       "models": [{"name": "pace-a", "path": None, "engine": {"kind": "pace", "pace_s_per_token": 0.05}}]}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER = CHROMIUM is not None and importlib.util.find_spec("playwright") is not None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with live_server_on(PORTS, CFG, tmp_path_factory.mktemp("srv")) as srv:
        yield srv


# --- the Messages API's 400 for a tool_result of no call ---
def test_a_tool_result_of_no_call_is_anthropics_400_word_for_word(server):
    """A tool_result whose tool_use_id no tool_use block of the previous message has: the 400's message is
    Anthropic's (clients and people search for it), its names in backticks, as the API words it now: it was the
    older wording, without them."""
    anthropic = pytest.importorskip("anthropic")
    c = anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=30)
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                               "input": {"city": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                                         {"type": "tool_result", "tool_use_id": "toolu_9", "content": "rain"}]}]
    for stream in (False, True):
        with pytest.raises(anthropic.BadRequestError) as ei:
            c.messages.create(model="pace-a", max_tokens=4, messages=msgs, stream=stream)
        assert ei.value.body["error"] == {
            "type": "invalid_request_error",
            "message": "messages.2.content.1: unexpected `tool_use_id` found in `tool_result` blocks: toolu_9. Each "
                       "`tool_result` block must have a corresponding `tool_use` block in the previous message."}, \
            ei.value.body


# --- the admin models' descriptions in /docs ---
# The admin API's response models whose every field the OpenAPI schema describes: GET /admin/pool's and
# /admin/requests' (the dashboard's figures: a rate says per what, over how long, of what) and the actions' answers
DESCRIBED = ("PoolOut", "EnginePoolOut", "VramOut", "ModelPoolOut", "TenantPoolOut", "RequestOut", "CancelOut",
             "EvictOut", "DrainOut", "GPUOut")


def test_the_admin_models_fields_are_described_in_the_openapi_schema(server):
    schemas = httpx.get(server.url + "/openapi.json", timeout=30).json()["components"]["schemas"]
    bare = {m: sorted(k for k, f in schemas[m]["properties"].items() if not f.get("description")) for m in DESCRIBED}
    assert {m: v for m, v in bare.items() if v} == {}
    rps = schemas["TenantPoolOut"]["properties"]["requests_per_s"]["description"]
    # what the figure counts (views.tenant_requests): arrivals, in flight and ended, refusals too, over ~10 s
    assert all(w in rps for w in ("arriving per second", "~10 s", "in flight", "ended", "429s included")), rps
    # the figures with a unit say it
    units = {("ModelPoolOut", "load_s"): "seconds", ("ModelPoolOut", "ttft_p50"): "seconds",
             ("ModelPoolOut", "tpot_p99"): "seconds", ("ModelPoolOut", "tokens_per_s"): "per second",
             ("EnginePoolOut", "step_s"): "seconds", ("EnginePoolOut", "switch_stall_s"): "seconds",
             ("TenantPoolOut", "tokens_per_min"): "per minute", ("TenantPoolOut", "rejected_per_min"): "per minute",
             ("PoolOut", "window_s"): "seconds", ("VramOut", "budget_bytes"): "bytes",
             ("ModelOut", "keep_alive"): "seconds", ("ModelOut", "max_model_len"): "tokens",
             ("EngineOut", "memory_bytes"): "bytes"}
    for (m, f), unit in units.items():
        assert unit in schemas[m]["properties"][f]["description"], (m, f)
    # the figures seen: GET /admin/pool's tenant as it describes it (none of team-a's requests yet)
    pool = httpx.get(server.url + "/admin/pool", headers=AUTH, timeout=30).json()
    team = next(t for t in pool["tenants"] if t["name"] == "team-a")
    assert set(team) == set(schemas["TenantPoolOut"]["properties"]) and team["requests_per_s"] == 0


# --- the dashboard's reconnect while its server is down ---
def _start(workdir, port: int) -> LiveServer:
    """A server on `port` (the same port again: a restart)."""
    s = LiveServer(CFG, workdir, wait_ready=False)
    s.port, s.url = port, f"http://127.0.0.1:{port}"
    s.config_path.write_text(yaml.safe_dump(dict(CFG, listen={"host": "127.0.0.1", "port": port})))
    s.__enter__()
    s.wait_healthy(60)
    return s


# When the page's tries start, by the page's clock (Playwright's, run by hand: run_clock): Playwright's sync API hands
# its events over only within its calls, and a failed request's timing has no start
TRY_CLOCK = """(() => {
  const fetch = window.fetch;
  window.fetch = function (url, ...rest) {
    if (String(url).endsWith("/dashboard/session")) window.noteTry(Date.now());
    return fetch.call(this, url, ...rest);
  };
})();"""


def _gaps(times: list[float]) -> list[float]:
    return [round(b - a, 2) for a, b in zip(times, times[1:], strict=False)]


@pytest.mark.skipif(not BROWSER, reason="needs Playwright and the system chromium (apt-get install chromium)")
def test_a_stopped_server_is_asked_less_and_less_often_and_seen_back_up(tmp_path, browser):
    """The server stopped under a signed-in page: the page's tries to reach it (GET /dashboard/session, each a
    failed request in the console) come 1, 2, 4, then 8 s apart, not once a second; the header says
    "reconnecting…" and since when no data came. The server back up on its port: seen at the next try (within 8 s),
    the page at the login form (the restart forgot its session). A stream that opens again starts over at 1 s:
    the network gone then back (the server up throughout). The page's clock is Playwright's, run by hand (its waits
    are not waited out), standing still while a server starts or stops."""
    from playwright.sync_api import expect

    port = free_port(RESTART_PORTS)
    first, second = _start(tmp_path / "a", port), None
    asked: list = []  # (the page's GET /dashboard/session requests)
    started: list[float] = []  # (when each started, unix seconds: the page's clock, TRY_CLOCK)
    try:
        ctx = browser.new_context()
        try:
            ctx.expose_function("noteTry", lambda t: started.append(t / 1000))
            ctx.add_init_script(TRY_CLOCK)
            page = ctx.new_page()
            page.clock.install()
            page.on("request", lambda r: asked.append(r) if r.url.endswith("/dashboard/session") else None)
            page.on("dialog", lambda d: d.accept())
            page.goto(first.url + "/dashboard")
            page.fill("#token", ADMIN)
            page.click("#login")
            conn = page.locator("#conn")
            expect(conn).to_have_text("live", timeout=15_000)
            pause_clock(page)

            def tries(since: float) -> list[float]:
                """When each try started, in seconds since `since` (unix seconds)."""
                assert len(started) == len(asked)  # (each a request of the page's, as Playwright saw them)
                return [round(t - since, 2) for t in started]

            # the network gone, then back before long: the tries back off, then the stream opens again. (Chromium's
            # offline mode fails new requests, not the stream already open: its failure is signalled by hand)
            ctx.set_offline(True)
            t_fail = page.evaluate("() => { const t = Date.now(); S.es.dispatchEvent(new Event('error')); return t; }")
            expect(conn).to_have_text("reconnecting…")
            run_clock(page, 4_500)  # (tries at ~1 and ~3 s)
            ctx.set_offline(False)
            run_clock(page, 15_000, until=LIVE)
            expect(conn).to_have_text("live")  # (the next try, ~7 s: 4 s after the last)
            offline = tries(t_fail / 1000)
            assert offline == pytest.approx([1, 3, 7], abs=0.6), offline
            assert page.evaluate("S.retryMs") == 1000  # (the stream opened: 1 s again, as the tries below show)

            # the server stopped: tries ~1, 3 and 7 s on (1, 2, 4 s apart) in 8.5 s, not 8 of them (the wait's cap,
            # 8 s, is test_ux63b_dashboard_operator's: the next try here is at ~15 s)
            asked.clear(), started.clear()
            t_stop = page.evaluate("Date.now()") / 1000
            first.__exit__()
            expect(conn).to_have_text("reconnecting…")
            run_clock(page, 8_500)
            seen = [t for t in tries(t_stop) if t < 8.5]
            assert len(seen) == 3 and _gaps(seen) == pytest.approx([2, 4], abs=0.6), seen
            # the header: "reconnecting…", and since when nothing came (watchStream, every second as before)
            assert page.locator("#conn-since").is_visible()
            assert page.locator("#conn-since").inner_text().startswith("no data since ")

            # back up on the same port: seen at the next try, 8 s on at most (the tries 8 s apart from here)
            second = _start(tmp_path / "b", port)
            t_up = page.evaluate("Date.now()") / 1000
            page.clock.run_for(8_000)  # (its answer, a session ended, takes the page to the login form)
            note = page.locator('.login-box .note[role="status"]')
            expect(note).to_contain_text("Your session has ended", timeout=20_000)
            after = tries(t_stop)[2:]
            assert all(g == pytest.approx(8, abs=0.6) for g in _gaps(after)), after
            assert after[-1] < t_up - t_stop + 8.6, (after, t_up - t_stop)  # (the try answered: the last one)
        finally:
            ctx.close()
    finally:
        for s in (first, second):
            if s is not None:
                s.__exit__()
