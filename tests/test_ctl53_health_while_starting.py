"""`tokenpool serve` serves its socket while the controller starts: /health answers 503 "starting" while the
configured models' tokenizers are read (a probe or a `curl` used to hang on the listen backlog until they were),
and a request sent meanwhile waits for the start-up, then is answered as usual."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx

import controller.app
import token_scheduler.tokenizer
from controller import shutdown
from controller.config import ModelSpec, ServerConfig
from controller.pool import EngineHandle, Replica

PORT = 18650


class _Closed:
    def is_closing(self) -> bool:
        return True


def test_health_answers_starting_while_the_tokenizers_load_then_ok(monkeypatch):
    reading, release = threading.Event(), threading.Event()
    real = token_scheduler.tokenizer.load_tokenizer

    def slow_tokenizer(path):
        reading.set()
        assert release.wait(30)
        return real(path)

    monkeypatch.setattr(token_scheduler.tokenizer, "load_tokenizer", slow_tokenizer)
    built = {}
    build = controller.app.build_app

    def build_app(cfg, manage_controller=True):
        app = build(cfg, manage_controller)
        built["app"], built["loop"] = app, asyncio.get_running_loop()
        return app

    monkeypatch.setattr(controller.app, "build_app", build_app)
    cfg = ServerConfig(listen={"port": PORT}, models=[ModelSpec(name="p", engine={"kind": "pace"}, memory_gb=1)],
                       workers={"local": "none", "dead_after_s": 60})
    rc: list[int] = []
    srv = threading.Thread(target=lambda: rc.append(shutdown.run(cfg)), daemon=True)
    srv.start()
    url = f"http://127.0.0.1:{PORT}"
    try:
        assert reading.wait(30)  # the configured model's tokenizer is being read: the controller has not started
        r = httpx.get(url + "/health", timeout=5)
        assert r.status_code == 503 and r.json()["status"] == "starting", r.text
        assert r.headers.get("date")
        waited: list[httpx.Response] = []  # a request sent now waits for the start-up
        asker = threading.Thread(target=lambda: waited.append(httpx.get(url + "/v1/models", timeout=30)))
        asker.start()
        asker.join(0.3)
        assert not waited
        # an engine that serves the model (no worker process: none are started here)
        e = EngineHandle("w0", None, "cpu", "node", 1, 10**9, _Closed())
        e.replicas = {"p": Replica("p", state="ready")}
        ctl = built["app"].state.controller
        built["loop"].call_soon_threadsafe(ctl.pool.engines.__setitem__, "w0", e)
        release.set()
        asker.join(30)
        assert waited and waited[0].status_code == 200, waited
        assert [m["id"] for m in waited[0].json()["data"]] == ["p"]
        deadline = time.monotonic() + 10
        while (r := httpx.get(url + "/health", timeout=5)).status_code != 200:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.02)
        assert r.json()["status"] == "ok"
    finally:
        release.set()
        if "app" in built:  # (ctl.on_fatal: the served loop's should_exit, as a found-unservable config sets it)
            built["loop"].call_soon_threadsafe(built["app"].state.controller.on_fatal)
        srv.join(30)
    assert rc == [0]
