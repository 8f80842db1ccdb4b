"""`tokenpool serve` serves its socket while the controller starts: /health answers 503 "starting" while the
configured models' tokenizers are read (a probe or a `curl` used to hang on the listen backlog until they were),
and a request sent meanwhile waits for the start-up, then is answered as usual (a 503 if the start-up fails)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import httpx

import controller.app
import token_scheduler.tokenizer
from controller import shutdown
from controller.config import ModelSpec, ServerConfig
from controller.pool import EngineHandle, Replica
from tests.ports import free_port


class _Closed:
    def is_closing(self) -> bool:
        return True


class _Starting:
    """`tokenpool serve` (shutdown.run) in a thread, its one model's tokenizer read only once `release` is set, and
    then `fail` raised instead when given; `app`/`loop`: the served app and its loop."""

    def __init__(self, monkeypatch, port: int, fail: Exception | None = None):
        self.reading, self.release, self.built, self.rc = threading.Event(), threading.Event(), {}, []
        self.url = f"http://127.0.0.1:{port}"
        real, build = token_scheduler.tokenizer.load_tokenizer, controller.app.build_app

        def slow_tokenizer(path):
            self.reading.set()
            assert self.release.wait(30)
            if fail is not None:
                raise fail
            return real(path)

        def build_app(cfg, manage_controller=True, controller=None):
            app = build(cfg, manage_controller, controller)
            self.built["app"], self.built["loop"] = app, asyncio.get_running_loop()
            return app

        monkeypatch.setattr(token_scheduler.tokenizer, "load_tokenizer", slow_tokenizer)
        monkeypatch.setattr(controller.app, "build_app", build_app)
        cfg = ServerConfig(listen={"port": port}, workers={"local": "none", "dead_after_s": 60},
                           models=[ModelSpec(name="p", engine={"kind": "pace"}, memory_gb=1)])
        self.thread = threading.Thread(target=lambda: self.rc.append(shutdown.run(cfg)), daemon=True)
        self.thread.start()
        assert self.reading.wait(30)  # the model's tokenizer is being read: the controller has not started

    def ask_later(self, path: str) -> list[httpx.Response]:
        """GET `path` from another thread; its response lands in the list returned."""
        got: list[httpx.Response] = []
        t = threading.Thread(target=lambda: got.append(httpx.get(self.url + path, timeout=30)), daemon=True)
        t.start()
        t.join(0.3)
        assert not got  # (it waits for the start-up)
        self.asker = t
        return got

    def stop(self) -> None:
        self.release.set()
        if "app" in self.built and self.thread.is_alive():  # (ctl.on_fatal: the served loop's should_exit, as a
            with contextlib.suppress(RuntimeError):  # found-unservable config sets it; RuntimeError: already closed)
                self.built["loop"].call_soon_threadsafe(lambda: self.built["app"].state.controller.on_fatal())
        self.thread.join(30)


def test_health_answers_starting_while_the_tokenizers_load_then_ok(monkeypatch):
    s = _Starting(monkeypatch, 18650)
    try:
        r = httpx.get(s.url + "/health", timeout=5)
        assert r.status_code == 503 and r.json()["status"] == "starting", r.text
        assert r.headers.get("date")
        waited = s.ask_later("/v1/models")
        # an engine that serves the model (no worker process: none are started here)
        e = EngineHandle("w0", None, "cpu", "node", 1, 10**9, _Closed())
        e.replicas = {"p": Replica("p", state="ready")}
        s.built["loop"].call_soon_threadsafe(s.built["app"].state.controller.pool.engines.__setitem__, "w0", e)
        s.release.set()
        s.asker.join(30)
        assert waited and waited[0].status_code == 200, waited
        assert [m["id"] for m in waited[0].json()["data"]] == ["p"]
        deadline = time.monotonic() + 10
        while (r := httpx.get(s.url + "/health", timeout=5)).status_code != 200:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.02)
        assert r.json()["status"] == "ok"
    finally:
        s.stop()
    assert s.rc == [0]


def test_a_request_that_waited_for_a_start_up_that_fails_gets_a_503(monkeypatch):
    s = _Starting(monkeypatch, 18652, fail=OSError("/srv/secret/tokenizer.json: unreadable"))
    try:
        waited = s.ask_later("/v1/models")
        s.release.set()
        s.asker.join(30)
        assert waited and waited[0].status_code == 503, waited
        err = waited[0].json()["error"]
        assert err["message"] == "the server could not start (its log says why)", err  # (no path to a caller)
        s.thread.join(30)
    finally:
        s.stop()
    assert s.rc == [2]


def test_what_the_models_need_first_runs_after_the_bind(monkeypatch, caplog):
    """`shutdown.run`'s `prepare` (the default's models, made on a first run: ~10 s) runs once the socket is served:
    /health answers 503 "starting" meanwhile (the port refused connections for those seconds); a StartupError it
    raises is logged as its one line and the server exits 2, a request that waited for it hearing a 503."""
    from controller.startup import StartupError

    port = free_port(range(19100, 19150))  # (a fixed port collided with another file's range under xdist)
    cfg = ServerConfig(listen={"port": port}, workers={"local": "none"}, models=[])
    running, release, rc = threading.Event(), threading.Event(), []

    def prepare() -> None:
        running.set()
        assert release.wait(30)
        raise StartupError("cannot make the default's models under /nowhere: read-only file system")

    t = threading.Thread(target=lambda: rc.append(shutdown.run(cfg, prepare)), daemon=True)
    t.start()
    assert running.wait(30)
    r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    assert r.status_code == 503 and r.json()["status"] == "starting", r.text
    got: list[httpx.Response] = []
    asker = threading.Thread(target=lambda: got.append(httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30)))
    asker.start()
    asker.join(0.3)
    assert not got  # (it waits for the start-up)
    release.set()
    asker.join(30)
    t.join(30)
    assert rc == [2] and got and got[0].status_code == 503, (rc, got)
    assert "cannot make the default's models under /nowhere: read-only file system" in caplog.text


def test_the_default_makes_its_models_after_the_bind(monkeypatch, tmp_path):
    """`tokenpool serve` with no configuration hands the making of its models to the served start-up (`prepare`),
    not before the bind; that step makes them, then checks them."""
    from controller import serve as srv
    from controller import startup

    made, seen = [], {}
    monkeypatch.setattr(srv, "ensure_demo_models", lambda cfg: made.append(cfg.is_default))
    monkeypatch.setattr(startup, "check_models", lambda cfg: made.append("checked"))

    def run(cfg, prepare=None, tenants=None):
        seen["made_before"] = list(made)
        prepare()
        return 0

    monkeypatch.setattr(shutdown, "run", run)
    monkeypatch.setenv("TOKENPOOL_CACHE", str(tmp_path))
    srv.serve(port=0)
    assert seen["made_before"] == [] and made == [True, "checked"]
