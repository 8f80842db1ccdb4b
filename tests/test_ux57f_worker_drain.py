"""A remote worker (a Kubernetes worker pod: a node drain, a DaemonSet rollout) that gets SIGTERM drains: the streams
in flight finish, new requests go to another engine (its models registered there at once), then it exits 0. Its
grace running out, or a second signal, ends what it still runs with an error saying so. It used to stop at once:
every stream on it ended with an error."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
import yaml

from controller.keys import hash_key
from load_tests.live_server import REPO_ROOT, LiveServer
from tests import ports
from tests.test_worker_failover import _in_background

ADMIN = "admin-ux57f-drain-token"
JOIN = "join-token-ux57f-drain"
ADM = {"Authorization": f"Bearer {ADMIN}"}


def _port(skip: tuple[int, ...] = ()) -> int:
    return ports.free_port(range(18900, 18950), skip)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    api = _port()
    workers = _port(skip=(api,))
    cfg = {"admin_token_hash": hash_key(ADMIN), "auth": False,
           "workers": {"local": "none", "heartbeat_s": 0.25, "dead_after_s": 1.5, "prune_dead_after_s": 1.0,
                       "join_token_hash": hash_key(JOIN), "listen": {"host": "127.0.0.1", "port": workers}},
           "models": [{"name": "pace", "engine": {"kind": "pace", "pace_s_per_token": 0.02, "max_num_seqs": 16}}]}
    srv = LiveServer(cfg, tmp_path_factory.mktemp("ux57f-drain"), wait_ready=False)
    srv.port, srv.url, srv.worker_port = api, f"http://127.0.0.1:{api}", workers
    srv.config_path.write_text(yaml.safe_dump(dict(cfg, listen={"host": "127.0.0.1", "port": api})))
    procs: list[subprocess.Popen] = []
    srv.procs = procs
    with srv:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(srv.url + "/", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.1)
        try:
            yield srv
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait(10)


def _worker(srv, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TOKENPOOL_JOIN_TOKEN=JOIN)
    p = subprocess.Popen([sys.executable, "-m", "controller.worker", "--controller", f"127.0.0.1:{srv.worker_port}",
                          *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    srv.procs.append(p)
    return p


def _engines(srv) -> list[dict]:
    return httpx.get(srv.url + "/admin/engines", headers=ADM, timeout=10).json()


def _until(what: str, check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (got := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return got


def _hosts(srv, pid: int) -> bool:
    """Whether worker `pid` is alive and has the model registered (and ready)."""
    return any(e["pid"] == pid and e["alive"] and any(r["model"] == "pace" and r.get("state", "ready") == "ready"
                                                      for r in e["models"]) for e in _engines(srv))


def _joined(srv, pid: int) -> bool:
    return any(e["pid"] == pid and e["alive"] for e in _engines(srv))


def _stream(c: openai.OpenAI, n: int):
    it = iter(c.chat.completions.create(model="pace", messages=[{"role": "user", "content": "hi"}], max_tokens=n,
                                        stream=True))
    for _ in range(3):  # tokens sent: a stream cut now could not be run again elsewhere
        next(it)
    return it


def test_sigterm_drains_a_remote_worker_then_its_grace_or_a_second_signal_ends_the_rest(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    a = _worker(server, "--drain-grace-s", "20")
    _until("worker A hosting the model", lambda: _hosts(server, a.pid))
    b = _worker(server, "--drain-grace-s", "1")
    _until("worker B joined", lambda: _joined(server, b.pid))

    # A drains: its stream finishes, a request sent meanwhile goes to B (the model registered there at once), and A
    # exits 0 as soon as its stream is done, long before its 20 s grace.
    it = _stream(c, 60)  # ~1.2 s at 0.02 s a token
    assert _hosts(server, a.pid) and not _hosts(server, b.pid)
    os.kill(a.pid, signal.SIGTERM)
    _until("the model registered on B", lambda: _hosts(server, b.pid), timeout=10)  # at once, not per request
    reply = _in_background(c.completions.create, model="pace", prompt="x", max_tokens=3)
    chunks = list(it)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert reply.result(30).usage.completion_tokens == 3
    assert a.wait(10) == 0, a.stderr.read()[-3000:]
    assert _hosts(server, b.pid)

    # B's grace (1 s) runs out under a long stream: it ends with an error that says so; B exits 0.
    it = _stream(c, 2000)
    t0 = time.monotonic()
    os.kill(b.pid, signal.SIGTERM)
    with pytest.raises(openai.APIError) as ei:
        list(it)
    assert time.monotonic() - t0 < 8
    assert "stopped (signalled) before the request finished" in str(ei.value), ei.value
    assert b.wait(15) == 0, b.stderr.read()[-3000:]

    # A second signal stops a draining worker at once: its stream ends with an error that says so.
    d = _worker(server, "--drain-grace-s", "30")
    _until("worker D hosting the model", lambda: _hosts(server, d.pid))
    it = _stream(c, 2000)
    os.kill(d.pid, signal.SIGTERM)
    time.sleep(0.5)
    assert d.poll() is None  # draining
    t0 = time.monotonic()
    os.kill(d.pid, signal.SIGTERM)
    with pytest.raises(openai.APIError) as ei:
        list(it)
    assert time.monotonic() - t0 < 5
    assert "a second signal (15) stopped its worker before the request finished" in str(ei.value), ei.value
    assert d.wait(15) == 0, d.stderr.read()[-3000:]
