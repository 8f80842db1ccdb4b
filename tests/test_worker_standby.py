"""The local slot's warm standby (controller/pool.py): it takes over when the worker dies, another is started,
and none outlives the server, whether the server stops or is killed."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from controller.keys import hash_key
from load_tests.live_server import LiveServer, free_port

ADMIN = "admin-standby-token"
ADM = {"Authorization": f"Bearer {ADMIN}"}


def _config(port: int, **workers) -> dict:
    return {"admin_token_hash": hash_key(ADMIN),
            "workers": {"local": "cpu", "heartbeat_s": 0.25, "dead_after_s": 1.5, **workers,
                        "listen": {"host": "127.0.0.1", "port": port}},
            "models": [{"name": "pace", "engine": {"kind": "pace", "pace_s_per_token": 0.01}}]}


def _workers(port: int) -> dict[int, bool]:
    """pid -> is a standby, of the worker processes of the controller listening on `port`."""
    out = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            argv = (p / "cmdline").read_bytes().split(b"\0")
            alive = (p / "stat").read_text().split(") ", 1)[1][0] != "Z"
        except OSError:
            continue
        if alive and b"controller.worker" in argv and f"127.0.0.1:{port}".encode() in argv:
            out[int(p.name)] = b"--standby" in argv
    return out


def _until(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _ready_engine(srv: LiveServer) -> dict | None:
    for e in httpx.get(srv.url + "/admin/engines", headers=ADM, timeout=5).json():
        if e["alive"] and e["models"] and all(m["state"] == "ready" for m in e["models"]):
            return e
    return None


def _spare(port: int, but: int | None = None) -> int | None:
    """A standby's pid (a promoted one keeps --standby in its command line: `but` excludes it)."""
    return next((pid for pid, sb in _workers(port).items() if sb and pid != but), None)


def test_standby_takes_over_and_is_replaced(tmp_path):
    port = free_port()
    with LiveServer(_config(port), tmp_path) as srv:
        e0 = _until(lambda: _ready_engine(srv), 30, "no engine")
        spare = _until(lambda: _spare(port), 30, "no standby was started")
        time.sleep(1.0)
        os.kill(e0["pid"], signal.SIGKILL)
        t0 = time.monotonic()
        e1 = _until(lambda: (e := _ready_engine(srv)) and e["pid"] != e0["pid"] and e, 30, "not restarted")
        assert e1["id"] == e0["id"] and e1["pid"] == spare, "the standby did not take over"
        took = time.monotonic() - t0
        nxt = _until(lambda: _spare(port, but=spare), 30, "no new standby after the takeover")
        r = httpx.post(srv.url + "/v1/completions", json={"model": "pace", "prompt": "x", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200, r.text
        assert took < 5.0, took
    _until(lambda: not _workers(port), 10, "a worker or its standby outlived the server")
    with pytest.raises(ProcessLookupError):
        os.kill(nxt, 0)


def test_standby_exits_when_the_controller_dies(tmp_path):
    port = free_port()
    with LiveServer(_config(port), tmp_path) as srv:
        _until(lambda: _ready_engine(srv), 30, "no engine")
        spare = _until(lambda: _spare(port), 30, "no standby was started")
        os.kill(srv.proc.pid, signal.SIGKILL)  # no stop(): the standby learns it from its closed stdin
        _until(lambda: spare not in _workers(port), 20, "the standby outlived its controller")
        _until(lambda: not _workers(port), 20, f"left behind: {_workers(port)}")  # (zombies of init do not count)


def test_no_standby_when_turned_off(tmp_path):
    port = free_port()
    with LiveServer(_config(port, standby=False), tmp_path) as srv:
        e0 = _until(lambda: _ready_engine(srv), 30, "no engine")
        time.sleep(1.0)
        assert _workers(port) == {e0["pid"]: False}
