"""A request waiting for its model's registration on an engine is answered when that registration is dropped.

Seen as a flaky `test_a_model_removed_while_its_requests_are_placed` (one request of 120 timed out after 30 s):
`EnginePool.unload` took the registration away while it was still loading, and a request waiting for it to be
ready (`Controller._place`) was never woken: the worker's answer to a load it was told to drop finds no
registration (or never comes), so the request waited out LOAD_TIMEOUT_S, ten minutes, holding its client and its
tenant's concurrency slot. It is a 404 (the model was removed) now, at once."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx

from controller.keys import hash_key
from load_tests.live_server import LiveServer

ADMIN = {"Authorization": "Bearer leak-admin"}


def test_a_request_waiting_for_a_registration_that_is_removed_is_answered(make_tiny, tmp_path):
    cfg = {"admin_token_hash": hash_key("leak-admin"), "auth": False,
           "workers": {"local": "cpu", "standby": False, "dead_after_s": 30.0},
           "models": [{"name": "keep", "engine": {"kind": "pace"}}]}
    out: dict = {}

    def ask(url: str) -> None:
        t0 = time.monotonic()
        try:
            r = httpx.post(url + "/v1/completions", json={"model": "m1", "prompt": "hi", "max_tokens": 2}, timeout=60)
            out["status"], out["body"] = r.status_code, r.text
        except httpx.HTTPError as e:
            out["status"], out["body"] = -1, repr(e)
        out["took"] = time.monotonic() - t0

    with LiveServer(cfg, tmp_path) as srv, httpx.Client(base_url=srv.url, headers=ADMIN, timeout=10) as c:
        # The worker is stopped (SIGSTOP) while the registration is sent, so it stays "loading" until the model is
        # removed (a first registration used to take seconds on a CPU; warmed up ahead, it takes a fraction of one)
        path, pid = str(make_tiny("qwen2")), c.get("/admin/engines").json()[0]["pid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            assert c.post("/admin/models", json={"name": "m1", "path": path}).status_code == 201
            _removed_while_loading(c, srv.url, ask, out)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert not c.get("/admin/requests").json()


def _removed_while_loading(c: httpx.Client, url: str, ask, out: dict) -> None:
    """A request for m1 waits for its registration, which is still loading; the model is removed: a 404 at once."""
    th = threading.Thread(target=ask, args=(url,))
    th.start()
    deadline = time.monotonic() + 60
    while True:  # the request waits for the registration: it is in flight, the registration still loading
        reqs = [r for r in c.get("/admin/requests").json() if r.get("model") == "m1"]
        loading = [r for e in c.get("/admin/engines").json() for r in e["models"]
                   if r["model"] == "m1" and r["state"] == "loading"]
        if reqs and loading:
            break
        assert time.monotonic() < deadline and "status" not in out, (reqs, loading, out)
        time.sleep(0.01)
    assert c.delete("/admin/models/m1").status_code == 200
    th.join(60)
    assert out.get("status") == 404 and "was unregistered" in out["body"], out
    assert out["took"] < 30, out
