"""The node's host copies (/dev/shm) go with the server even when its worker died just before the stop.

A worker gives the host copies back as it exits (`HostedModels.close`: those no other live process holds are
unlinked); a worker SIGKILLed (or crashed: `os._exit`) cannot, and its copies were left for the next worker to
attach to. When the server stopped before a next worker had joined, nothing ever removed them: every model's
weights stayed in /dev/shm (RAM) after the server exited -- gigabytes per model on a real node."""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path

import httpx

from controller.keys import hash_key
from load_tests.live_server import LiveServer

ADMIN = "admin-leak-shm"
MiB = 1 << 20
PAGE = 16 * 512


def _segments(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_host_copies_of_a_killed_worker_go_with_the_server(make_tiny, tmp_path):
    models = {"sa": make_tiny("qwen2"), "sb": make_tiny("qwen3")}
    cfg = {
        "admin_token_hash": hash_key(ADMIN),
        # no standby: the next worker is a cold start, so the stop comes before it has joined
        "workers": {"local": "cpu", "heartbeat_s": 0.25, "dead_after_s": 1.5, "standby": False},
        "gpus": {"cpu_budget_gb": 4 * MiB / 1e9, "kv_cache_gb": 64 * PAGE / 1e9},
        "shutdown_grace_s": 5,
        "models": [{"name": n, "path": str(p), "slo": {"ttft_s": 60, "tpot_s": 10}} for n, p in models.items()],
    }
    with tempfile.TemporaryDirectory(prefix="tokenpool-leak-shm-", dir="/dev/shm") as shm:
        root = Path(shm)
        with LiveServer(cfg, tmp_path, env={"TOKENPOOL_SHM_DIR": shm}) as srv:
            h = {"Authorization": f"Bearer {ADMIN}"}
            deadline = time.monotonic() + 60
            while True:  # both models registered: their host copies made
                es = [e for e in httpx.get(srv.url + "/admin/engines", headers=h, timeout=10).json() if e["alive"]]
                if es and len(es[0]["models"]) == 2 and all(m["state"] == "ready" for m in es[0]["models"]):
                    break
                assert time.monotonic() < deadline, es
                time.sleep(0.1)
            assert any(s.endswith(".seg") for s in _segments(root)), _segments(root)
            os.kill(es[0]["pid"], signal.SIGKILL)
            os.kill(srv.proc.pid, signal.SIGTERM)  # at once: no worker has the copies when the server stops
            rc = srv.proc.wait(60)
            log = srv.log()
        assert rc == 0, log
        assert _segments(root) == [], (_segments(root), log)
