"""A remote worker keeps its pool across a lost connection (a quick reconnect reuses what it hosts). Joining a
restarted controller, it kept the models the new one never registered there: their weights, KV and host copy (a
file in /dev/shm) stayed until the worker exited, in no view (/admin/engines listed no model on it, its stats did).
Now what the new controller serves is registered there at once (nothing to load) and the rest is unloaded."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import yaml

from controller.keys import hash_key
from load_tests.live_server import REPO_ROOT, LiveServer
from tests import ports

ADMIN = "admin-ux67f-rejoin-token"
JOIN = "join-token-ux67f-rejoin"
ADM = {"Authorization": f"Bearer {ADMIN}"}
PORTS = range(30010, 30050)


def _pace(name: str) -> dict:
    return {"name": name, "engine": {"kind": "pace", "pace_s_per_token": 0.01, "max_num_seqs": 4}}


def _server(work, api: int, workers: int, models: list[str]) -> LiveServer:
    cfg = {"admin_token_hash": hash_key(ADMIN), "auth": False,
           "workers": {"local": "none", "heartbeat_s": 0.25, "join_token_hash": hash_key(JOIN),
                       "listen": {"host": "127.0.0.1", "port": workers}},
           "models": [_pace(n) for n in models]}
    srv = LiveServer(cfg, work, wait_ready=False)
    srv.port, srv.url = api, f"http://127.0.0.1:{api}"
    srv.config_path.write_text(yaml.safe_dump(dict(cfg, listen={"host": "127.0.0.1", "port": api})))
    return srv


def _hosted(srv) -> dict[str, set[str]] | None:
    """The live engines': the models the controller has registered there, and those the worker's pool holds."""
    try:
        engines = httpx.get(srv.url + "/admin/engines", headers=ADM, timeout=5).json()
    except httpx.HTTPError:
        return None
    return {k: v for e in engines if e["alive"]
            for k, v in (("registered", {r["model"] for r in e["models"] if r["state"] == "ready"}),
                         ("hosts", set((e.get("pool") or {}).get("registered") or ())))}


def _until(what: str, check, srv, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not (got := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{srv.log()}"
        time.sleep(0.05)
    return got


def test_a_remote_worker_joining_a_restarted_controller_lets_go_of_what_it_no_longer_serves(tmp_path):
    api = ports.free_port(PORTS)
    workers = ports.free_port(PORTS, skip=(api,))
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TOKENPOOL_JOIN_TOKEN=JOIN)
    worker = None
    try:
        with _server(tmp_path / "a", api, workers, ["pace-a", "pace-b"]) as a:
            worker = subprocess.Popen([sys.executable, "-m", "controller.worker", "--controller",
                                       f"127.0.0.1:{workers}", "--device", "cpu"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            both = {"registered": {"pace-a", "pace-b"}, "hosts": {"pace-a", "pace-b"}}
            _until("both models on the worker", lambda: _hosted(a) == both, a)
        # the controller restarted serving pace-a alone; the worker (still running) joins it again
        with _server(tmp_path / "b", api, workers, ["pace-a"]) as b:
            one = {"registered": {"pace-a"}, "hosts": {"pace-a"}}
            _until("the worker hosting pace-a alone", lambda: _hosted(b) == one, b, timeout=30)
            assert worker.poll() is None
    finally:
        if worker is not None:
            worker.kill()
            worker.wait(10)
