"""Start-up and stop internals and wording (ux64c), each where users meet them:

- the children that end with the server's process (controller/children.py): the default's model factory and a GGUF
  file's conversion, kept in one registry (each module kept its own, one sending SIGTERM, the other SIGKILL); a
  process that ends while both run ends both, each with SIGTERM first, which it may unwind on;
- `tokenpool stop` on a machine without a GPU: the weights leave "the memory of 1 engine", not "VRAM" (a CPU engine's
  arena is host RAM); an engine on a GPU keeps "VRAM";
- the dashboard's reconnect backoff (headless Chromium under Playwright, as tests/test_ux63b_dashboard_operator.py;
  skipped without them): a stream that stayed open 5 s, no data on it, then dropped, is tried again 1 s on, not at
  the doubled wait of the streams that failed before it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest

from controller import ps
from controller.keys import hash_key
from load_tests.live_server import REPO_ROOT
from load_tests.user_check import alive as _alive  # (running still: a zombie is not)
from tests.dashboard_pages import LIVE, pause_clock, run_clock
from tests.ports import live_server_on
from tests.test_ux63b_dashboard_operator import clocked_dashboard

ADMIN = "admin-ux64c-token"
H = {"Authorization": f"Bearer {ADMIN}"}
PORTS = range(28900, 28950)
BROWSER = ((shutil.which("chromium") or shutil.which("chromium-browser")) is not None
           and importlib.util.find_spec("playwright") is not None)


# --- the children ended with the server's process ---
# A stand-in for either child: says it is ready once its SIGTERM handler is set (a signal before it would end it
# unseen), and writes how it ended
STAND_IN = """import pathlib, signal, sys, time
mark = pathlib.Path({mark!r})
signal.signal(signal.SIGTERM, lambda *_: (mark.write_text("SIGTERM"), sys.exit(143)))
mark.with_suffix(".ready").write_text("")
time.sleep(60)
"""

# The server's start-up, reduced: the default's models made (serve.ensure_demo_models) and a GGUF file converted
# (real_model.ensure_gguf), each on a daemon thread as the start-up runs them; the process ends while both run, as
# the start-up ends on a signal (which does not wait for them)
BOTH = """
import sys, threading, time
from pathlib import Path
from controller import children, real_model, serve
from controller.config import default_config
from tokenpool import imports

out = Path(sys.argv[1])
stand_in = sys.argv[2]
imports.transformers = lambda *names: None  # (the tokenizers' classes, imported beside the making: not needed here)
serve.MAKER = [sys.executable, "-c", stand_in.format(mark=str(out / "maker"))]
real_model.CONVERTER = [sys.executable, "-c", stand_in.format(mark=str(out / "converter"))]
gguf = out / "m.gguf"
gguf.write_bytes(b"GGUF" + bytes(60))
threading.Thread(target=serve.ensure_demo_models, args=(default_config(),), daemon=True).start()
threading.Thread(target=real_model.ensure_gguf, args=(gguf, out / "cache"), daemon=True).start()
deadline = time.monotonic() + 30
while not ((out / "maker.ready").exists() and (out / "converter.ready").exists()):
    assert time.monotonic() < deadline, "the children did not start"
    time.sleep(0.01)
print(" ".join(str(p.pid) for p in children.running()), flush=True)
"""


def test_the_model_maker_and_a_conversion_end_with_the_process_both_by_sigterm(tmp_path):
    """Both children are in the one registry while they run, and both end when the process does, by SIGTERM (the
    conversion was SIGKILLed, the model factory SIGTERMed: two registries, two ways)."""
    r = subprocess.run([sys.executable, "-c", BOTH, str(tmp_path), STAND_IN], cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO_ROOT),
                                                   "TOKENPOOL_CACHE": str(tmp_path / "models")})
    assert r.returncode == 0, r.stderr
    pids = [int(p) for p in r.stdout.split()]
    assert len(pids) == 2, r.stdout  # (one registry holds both)
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [p for p in pids if _alive(p)]
    for p in left:
        os.kill(p, 9)
    assert not left, "a child outlived the process that started it"
    assert {n: (tmp_path / n).read_text() if (tmp_path / n).exists() else None for n in ("maker", "converter")} == {
        "maker": "SIGTERM", "converter": "SIGTERM"}


# --- `tokenpool stop`'s wording ---
def test_stop_says_vram_where_the_engines_are_gpus(monkeypatch):
    """An engine on a GPU (this machine has none: the admin API's answers as a GPU server gives them): "VRAM"."""
    answers = {"/admin/models": [{"name": "m"}], "/admin/models/m/evict": {"name": "m", "engines": 1, "resident": 1},
               "/admin/engines": [{"id": "w0", "device": "cuda:0", "models": [{"model": "m"}]}]}
    monkeypatch.setattr(ps, "fetch", lambda url, path, token, method="GET": answers[path])
    assert ps.stop("http://x", None, "m").startswith("m: its weights leave VRAM on 1 engine once")
    answers["/admin/engines"][0]["device"] = "cpu"
    assert ps.stop("http://x", None, "m").startswith("m: its weights leave the memory of 1 engine once")


@pytest.fixture(scope="module")
def server(make_tiny, tmp_path_factory):
    cfg = {"admin_token_hash": hash_key(ADMIN), "workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.2},
           "models": [{"name": "tiny", "path": str(make_tiny("qwen2"))}]}
    with live_server_on(PORTS, cfg, tmp_path_factory.mktemp("ux64c")) as srv:
        yield srv


def _stop(srv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "controller.cli", "stop", "tiny", "--url", srv.url], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "TOKENPOOL_ADMIN_TOKEN": ADMIN})


def _resident(srv) -> bool:
    return any("tiny" in e["resident"] for e in httpx.get(srv.url + "/admin/pool", headers=H).json()["engines"])


def _until(srv, want: bool, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while _resident(srv) != want:  # (the pool's state arrives with heartbeats)
        assert time.monotonic() < end, f"tiny's residency never became {want}"
        time.sleep(0.1)


def test_stop_on_a_machine_without_a_gpu_says_memory_not_vram(server):
    """`tokenpool stop` against a live server whose engine is the CPU: it said "its weights leave VRAM on 1 engine",
    a memory this machine has not; then, stopped again, "not in VRAM on any engine"."""
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200, r.text
    _until(server, True)
    out = _stop(server)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ("tiny: its weights leave the memory of 1 engine once its requests there finish; the next "
                          "request brings them back\n"), out.stdout
    _until(server, False)
    deadline = time.monotonic() + 10
    while True:  # (the engines' view of it, which the evict's `resident` reads, arrives with the next heartbeat)
        again = _stop(server)
        if "leave" not in again.stdout or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert again.returncode == 0 and again.stdout.startswith("tiny: not in any engine's memory, nothing to free"), again
    assert "VRAM" not in out.stdout + again.stdout


# --- the dashboard's reconnect after a quiet stream ---
@pytest.mark.skipif(not BROWSER, reason="needs Playwright and the system chromium (apt-get install chromium)")
def test_a_stream_open_5_s_without_data_then_dropped_is_tried_again_1_s_on(server, browser):
    """Two streams fail (the first dropped, the next answered 200 and ended at once: the backoff at 4 s), then one
    opens and stays open, no data on it (the server's stream without its snapshots: Playwright rewrites the URL), for
    5.5 s, and drops: the next try is 1 s on, not 4 (a stream that stayed open RETRY_STABLE_MS worked), and the page is
    live again. The backoff is not reset at the quiet stream's open, only once it has stayed open. The page's clock
    is run by hand (run_clock)."""
    from playwright.sync_api import expect

    with clocked_dashboard(browser, server.url, ADMIN) as page:
        conn = page.locator("#conn")

        served: list[str] = []  # how each stream was answered: "empty" (200, ended at once) or "quiet" (no data)

        def stream(route) -> None:
            if not served:
                served.append("empty")
                route.fulfill(status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
                              body="")
            else:
                served.append("quiet")
                route.continue_(url=route.request.url.replace("snapshots=true", "snapshots=false"))

        page.route("**/admin/events?*", stream)
        pause_clock(page)
        t_fail = page.evaluate("""() => { window.streamsOpened.length = 0; const t = Date.now();
                                          S.es.dispatchEvent(new Event('error')); return t; }""")
        expect(conn).to_have_text("reconnecting…")
        # tries at ~1 s (empty: ends at once) and ~3 s (quiet: opens and stays open)
        run_clock(page, 10_000, until=LIVE)
        expect(conn).to_have_text("live")
        assert served == ["empty", "quiet"], served
        quiet = page.evaluate("({opened: S.opened, snapshots: S.snapshots, events: S.events.length, wait: S.retryMs})")
        assert quiet["wait"] == 4000, quiet  # (the backoff after two failures: the quiet stream's open left it so)
        run_clock(page, quiet["opened"] + 5_500 - page.evaluate("Date.now()"))
        t_drop = page.evaluate("""() => { S.es.dispatchEvent(new Event('error')); return Date.now(); }""")
        # no data came on it (a snapshot or an event would have reset the backoff on its own)
        assert page.evaluate("({s: S.snapshots, e: S.events.length})") == {"s": quiet["snapshots"],
                                                                          "e": quiet["events"]}
        page.unroute("**/admin/events?*", stream)
        run_clock(page, 10_000, until=LIVE)
        expect(conn).to_have_text("live")
        opened = [round((t - t_fail) / 1000, 2) for t in page.evaluate("window.streamsOpened")]
        assert len(opened) == 3 and opened[:2] == pytest.approx([1, 3], abs=0.7), opened
        # (1 s after the drop: at the doubled wait, 4 s, without the quiet stream's 5 s counted as working)
        assert opened[2] - (t_drop - t_fail) / 1000 == pytest.approx(1, abs=0.7), (opened, t_drop - t_fail)
        page.wait_for_function("n => S.snapshots > n", arg=quiet["snapshots"])
        assert page.evaluate("S.retryMs") == 1000
