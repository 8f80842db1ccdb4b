"""Session 67's small mends left over.

- A model fits a GPU's weight space by its slot (its bytes rounded up to the arena's alignment), in the controller as
  in the worker: by its bytes alone, the admin API took a model within the alignment of the weight space, placement
  sent it to the worker, and the worker refused it (its requests then 503s).
- `tokenpool serve --port PORT` on a port in use printed the default's banner ("serving ... bound to 127.0.0.1
  only") before the line saying it could not listen.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid

import httpx
import pytest
import yaml

import load_tests.live_server as live_server
from controller.keys import hash_key
from tests.ports import free_port

MiB = 1 << 20
PAGE = 16 * 512
PORTS = range(30150, 30200)
ADMIN = "tpadmin-ux68a"


def test_a_model_whose_slot_exceeds_the_weight_space_is_refused_by_the_admin_api(make_tiny, tmp_path):
    big, small = make_tiny("llama"), make_tiny("qwen2")  # 2.3 MiB of weights (a 4 MiB slot), and 1.4 MiB
    cfg = {"admin_token_hash": hash_key(ADMIN),
           "workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.2},
           # the KV region takes one 2 MiB aligned slot; 2.5 MiB are left for weights: 2.3 MiB fit, 4 do not
           "gpus": {"cpu_budget_gb": (4 * MiB + MiB // 2) / 1e9, "kv_cache_gb": 48 * PAGE / 1e9,
                    "host_cache_namespace": f"test-{uuid.uuid4().hex[:10]}"},
           "models": [{"name": "small", "path": str(small)}]}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(live_server, "free_port", lambda: free_port(PORTS))
        srv = live_server.LiveServer(cfg, tmp_path)
    with srv, httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30) as admin:
        deadline, space = time.monotonic() + 20, None
        while time.monotonic() < deadline and space != 5 * MiB // 2:  # (the worker's word, once its arena is made)
            space = admin.get("/admin/engines").json()[0]["memory_bytes"]
            time.sleep(0.1)
        assert space == 5 * MiB // 2, srv.log()
        r = admin.post("/admin/models", json={"name": "big", "path": str(big)})
        assert r.status_code == 400, (r.status_code, r.text)
        msg = r.json()["error"]["message"]
        assert "model 'big' needs " in msg and ", a slot of 0.00419 GB for weights; the largest GPU's weight space " \
            "is 0.00262 GB" in msg, msg
        assert "big" not in [m["id"] for m in httpx.get(srv.url + "/v1/models").json()["data"]]


def test_serve_on_a_busy_port_says_one_line_and_no_banner(tmp_path):
    """The embedded default (no --config, no model folder) said what it serves and where, then that it could not."""
    port = free_port(PORTS)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen(1)
        p = subprocess.run([sys.executable, "-m", "controller.cli", "serve", "--port", str(port)],
                           cwd=live_server.REPO_ROOT, capture_output=True, text=True, timeout=60,
                           env={**os.environ, "TOKENPOOL_CACHE": str(tmp_path / "cache")})
    assert p.returncode == 2, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and f"ERROR cannot listen on 127.0.0.1:{port}: Address already in use" in lines[0], p.stderr


def test_placement_judges_a_model_by_its_slot():
    """Of two empty GPUs, placement took the first whose weight space held the model's bytes, though not its slot."""
    from controller.router import EngineView, ModelInfo, place

    info = ModelInfo("m", 2 * MiB + 300 * 1024)  # a 4 MiB slot
    engines = [EngineView("a", 5 * MiB // 2), EngineView("b", 4 * MiB)]
    assert info.slot_bytes == 4 * MiB and place(info, engines, {"m": info}).engine_id == "b"
    assert place(info, engines[:1], {"m": info}) is None


def test_serve_reads_the_tenants_file_once(tmp_path):
    """`tokenpool serve` read the tenants file to check it, and the server read it again as it started: a file that
    can be read once (a named pipe, as a secret handed over by a pipe is) left the server hung before listening."""
    import errno
    import threading

    fifo = tmp_path / "tenants.yaml"
    os.mkfifo(fifo)
    text = yaml.safe_dump([{"name": "alice", "key_hashes": [hash_key("k-alice")]}]).encode()

    def hand_over() -> None:  # the pipe's one reader gets the tenants, once
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                if e.errno != errno.ENXIO:  # (ENXIO: no reader yet)
                    raise
                time.sleep(0.02)
                continue
            os.set_blocking(fd, True)
            os.write(fd, text)
            os.close(fd)
            return

    writer = threading.Thread(target=hand_over, daemon=True)
    writer.start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(live_server, "free_port", lambda: free_port(PORTS))
        srv = live_server.LiveServer({"workers": {"local": "none"}, "tenants_file": str(fifo)}, tmp_path,
                                     wait_ready=False, env={"TOKENPOOL_CACHE": str(tmp_path / "cache")})
    with srv:  # (no worker: never "ready", but listening, and serving the model list)
        deadline, got = time.monotonic() + 15, None
        while time.monotonic() < deadline and got is None:
            try:
                got = httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer k-alice"}, timeout=2)
            except httpx.HTTPError:
                time.sleep(0.05)
        assert got is not None and got.status_code == 200, (got, srv.log())
        assert httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    writer.join(1)
