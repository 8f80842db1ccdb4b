"""Placement on a live server: a worker that joins after the models were placed gets its share of them (idle
registrations move), requests to every model are served wherever it went, and when that worker dies its models
come back to the one left. The bug this guards: every model stayed on the first worker to join (2 GPUs served
as one)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import openai
import pytest

from controller.keys import hash_key
from load_tests.live_server import REPO_ROOT, LiveServer
from tests import ports

ADMIN = "admin-placement-token"
JOIN = "join-token-placement"
WORKER_PORT = ports.free_port(range(30550, 30575))  # (the workers' listener: an ephemeral port taken at import
# could be any process's outgoing connection's by the time the module's server binds it)
ADM = {"Authorization": f"Bearer {ADMIN}"}
MODELS = [f"pace-{i}" for i in range(4)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = {
        "admin_token_hash": hash_key(ADMIN),
        # dead_after_s 30: the killed worker's death is its connection's loss, seen at once. A silence limit only
        # declared the late worker dead as it warmed up beside a loaded host's other work (silent 1.6-4.0 s just
        # after it joined: it joined again, and the spread failed, a stream was cut or a request hung)
        "workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25, "dead_after_s": 30.0,
                    "join_token_hash": hash_key(JOIN), "prune_dead_after_s": 1.0,
                    "listen": {"host": "127.0.0.1", "port": WORKER_PORT}},
        "gpus": {"cpu_budget_gb": 4},
        "autoscaler": {"interval_s": 0.3},
        "models": [{"name": n, "memory_gb": 1, "engine": {"kind": "pace", "pace_s_per_token": 0.01}}
                   for n in MODELS],
    }
    with LiveServer(cfg, tmp_path_factory.mktemp("placement")) as srv:
        yield srv


def placed(srv) -> dict[str, set[str]]:
    """engine id -> models registered there (alive engines)."""
    es = httpx.get(srv.url + "/admin/engines", headers=ADM, timeout=10).json()
    return {e["id"]: {r["model"] for r in e["models"]} for e in es if e["alive"]}


def wait_for(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def complete_all(srv) -> None:
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
    for name in MODELS:
        stream = client.completions.create(model=name, prompt="hello", max_tokens=5, stream=True)
        chunks = [c for c in stream if c.choices]
        assert len(chunks) == 5 and chunks[-1].choices[0].finish_reason == "length"


def test_a_late_worker_gets_its_share_and_gives_it_back_when_it_dies(server):
    (first,) = placed(server).values()
    assert first == set(MODELS)  # one worker: every model is registered there
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    late = subprocess.Popen([sys.executable, "-m", "controller.worker", "--controller", f"127.0.0.1:{WORKER_PORT}",
                             "--join-token", JOIN, "--gpu-budget-gb", "4"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        spread = wait_for(lambda: (p := placed(server)) and len(p) == 2 and all(len(v) == 2 for v in p.values())
                          and p)
        assert set().union(*spread.values()) == set(MODELS)  # each model registered once, half on each
        # the moves end: still two and two a while later
        time.sleep(1.5)
        assert sorted(len(v) for v in placed(server).values()) == [2, 2]
        wait_for(lambda: httpx.get(server.url + "/health", timeout=10).status_code == 200)
        complete_all(server)
    finally:
        late.kill()
        late.wait()
    # the late worker is gone: its models are registered on the one left and served there
    wait_for(lambda: (p := placed(server)) and len(p) == 1 and next(iter(p.values())) == set(MODELS))
    wait_for(lambda: all(r["state"] == "ready" for e in httpx.get(server.url + "/admin/engines", headers=ADM,
                                                                  timeout=10).json() if e["alive"]
                         for r in e["models"]))
    complete_all(server)
