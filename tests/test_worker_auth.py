"""Issue 16 defect 1: without a configured join token, only the controller's own workers may register
(controller/pool.py `EnginePool._admit`)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx

from controller.keys import hash_key
from load_tests.live_server import REPO_ROOT, LiveServer, free_port

ADMIN = "admin-worker-auth"


def test_rogue_worker_cannot_register_without_a_join_token(tmp_path):
    port = free_port()
    cfg = {"admin_token_hash": hash_key(ADMIN),
           "workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25,
                       "listen": {"host": "127.0.0.1", "port": port}},
           "models": [{"name": "pace", "engine": {"kind": "pace", "pace_s_per_token": 0.01}}]}
    with LiveServer(cfg, tmp_path) as srv:
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        env.pop("TOKENPOOL_JOIN_TOKEN", None)
        rogue = subprocess.Popen([sys.executable, "-m", "controller.worker", "--controller", f"127.0.0.1:{port}"],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and rogue.poll() is None:
                engines = httpx.get(srv.url + "/admin/engines", headers={"Authorization": f"Bearer {ADMIN}"}).json()
                assert not any(e["pid"] == rogue.pid for e in engines), "a worker without a join token registered"
                time.sleep(0.2)
            assert rogue.poll() not in (None, 0)  # refused, and it says so by exiting
        finally:
            if rogue.poll() is None:
                rogue.kill()
            rogue.wait()
