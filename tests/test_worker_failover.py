"""Engine workers as processes: a worker killed mid-stream fails its streams fast and comes back."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from controller.keys import hash_key
from load_tests.live_server import REPO_ROOT, LiveServer, free_port

ADMIN = "admin-failover-token"
JOIN = "join-token-for-remote-workers"
WORKER_PORT = free_port()
ADM = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = {
        "admin_token_hash": hash_key(ADMIN),
        "metrics_public": True,
        "workers": {"local": "cpu", "heartbeat_s": 0.25, "dead_after_s": 1.5, "join_token_hash": hash_key(JOIN),
                    "prune_dead_after_s": 1.0,
                    "listen": {"host": "127.0.0.1", "port": WORKER_PORT}},
        "models": [{"name": "pace", "engine": {"kind": "pace", "pace_s_per_token": 0.02, "max_num_seqs": 64}}],
    }
    with LiveServer(cfg, tmp_path_factory.mktemp("failover")) as srv:
        yield srv


def _remote_worker(token: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.pop("TOKENPOOL_JOIN_TOKEN", None)
    return subprocess.Popen([sys.executable, "-m", "controller.worker", "--controller", f"127.0.0.1:{WORKER_PORT}",
                             "--join-token", token, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def test_remote_worker_registers_with_join_token(server):
    bad = _remote_worker("wrong-token")
    assert bad.wait(30) != 0  # refused, and it says so by exiting
    good = _remote_worker(JOIN, "--gpu-budget-gb", "0.05", "--policy", "request")  # its own pool settings
    try:
        deadline = time.monotonic() + 30
        while not any(e["pid"] == good.pid and e["alive"] for e in engines(server)):
            assert time.monotonic() < deadline and good.poll() is None
            time.sleep(0.2)
        eid = next(e["id"] for e in engines(server) if e["pid"] == good.pid)
        while f'engine="{eid}"' not in httpx.get(server.url + "/metrics", timeout=10).text:  # its first Stats
            assert time.monotonic() < deadline
            time.sleep(0.2)
        (e,) = [e for e in engines(server) if e["id"] == eid]
        assert e["pool"]["vram"]["budget_bytes"] == 50_000_000  # the worker's --gpu-budget-gb, not the config's
    finally:
        good.kill()
        good.wait()
    deadline = time.monotonic() + 5  # its connection closes: declared dead at once, not restarted
    while any(e["pid"] == good.pid and e["alive"] for e in engines(server)):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    deadline = time.monotonic() + 10  # dead for prune_dead_after_s: gone from the views and the metrics
    while any(e["pid"] == good.pid for e in engines(server)):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert f'engine="{eid}"' not in httpx.get(server.url + "/metrics", timeout=10).text


def engines(srv):
    return httpx.get(srv.url + "/admin/engines", headers=ADM).json()


def test_kill_worker_mid_stream(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=30)
    (e0,) = [e for e in engines(server) if e["alive"]]
    stream = c.chat.completions.create(model="pace", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=2000, stream=True)
    it = iter(stream)
    for _ in range(5):
        next(it)
    os.kill(e0["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises((openai.APIError, httpx.HTTPError)) as ei:
        for _ in it:
            assert time.monotonic() - t0 < 2.0
    assert time.monotonic() - t0 < 2.0
    assert "died" in str(ei.value) or "engine" in str(ei.value)

    deadline = time.monotonic() + 30  # restarted with the same id, the model placed again
    while True:
        try:
            r = c.completions.create(model="pace", prompt="x", max_tokens=3)
            break
        except openai.APIStatusError as e:
            assert e.status_code == 503 and time.monotonic() < deadline
            time.sleep(0.2)
    assert r.usage.completion_tokens == 3
    (e1,) = [e for e in engines(server) if e["alive"]]
    assert e1["id"] == e0["id"] and e1["pid"] != e0["pid"]


def test_request_without_tokens_is_retried_on_restart(server):
    """A request whose engine dies before its first token is placed again (nothing was sent yet)."""
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    (e0,) = [e for e in engines(server) if e["alive"]]
    os.kill(e0["pid"], signal.SIGSTOP)  # hung: requests queue on it until it is declared dead
    reply = _in_background(c.completions.create, model="pace", prompt="x", max_tokens=3)
    time.sleep(0.3)
    os.kill(e0["pid"], signal.SIGKILL)
    assert reply.result(60).usage.completion_tokens == 3


def _in_background(fn, *args, **kwargs) -> concurrent.futures.Future:
    """`fn(*args, **kwargs)` on a thread of its own: `.result(timeout)` is its value, or raises its error."""
    done: concurrent.futures.Future = concurrent.futures.Future()

    def run():
        try:
            done.set_result(fn(*args, **kwargs))
        except Exception as e:  # noqa: BLE001 - handed to the test through the future
            done.set_exception(e)

    threading.Thread(target=run, daemon=True).start()
    return done


def _alive(srv, other_than: int | None = None, timeout: float = 30) -> dict:
    """The slot's live engine (once one other than pid `other_than` has joined and holds the model)."""
    deadline = time.monotonic() + timeout
    while True:
        live = [e for e in engines(srv) if e["alive"] and e["pid"] != other_than]
        if live:
            return live[0]
        assert time.monotonic() < deadline, engines(srv)
        time.sleep(0.1)


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_one_sigterm_to_an_idle_worker_stops_it_and_its_standby_takes_over(server):
    """A single SIGTERM to a local worker (not the server) used to leave it serving for 60 s, waiting for a
    controller that was not stopping; with nothing in flight it now stops at once and the slot's standby serves."""
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    e0 = _alive(server)
    c.completions.create(model="pace", prompt="x", max_tokens=2)  # (the model is registered on it)
    os.kill(e0["pid"], signal.SIGTERM)
    assert _gone(e0["pid"], 20), "the signalled worker did not exit"
    e1 = _alive(server, other_than=e0["pid"])
    assert e1["id"] == e0["id"]
    assert c.completions.create(model="pace", prompt="x", max_tokens=3).usage.completion_tokens == 3


def test_one_sigterm_to_a_busy_worker_finishes_its_stream_and_later_requests_wait_for_its_successor(server):
    """The signalled worker's stream finishes (no error), it then exits, and a request sent meanwhile is not
    refused: it waits for the standby that takes the slot."""
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    e0 = _alive(server)
    stream = c.chat.completions.create(model="pace", messages=[{"role": "user", "content": "hi"}], max_tokens=60,
                                       stream=True)
    it = iter(stream)
    for _ in range(3):  # (tokens sent: a stream cut now could not be run again elsewhere)
        next(it)
    os.kill(e0["pid"], signal.SIGTERM)
    time.sleep(0.3)  # (the worker has said it stops: the request is not sent there)
    reply = _in_background(c.completions.create, model="pace", prompt="x", max_tokens=3)
    chunks = list(it)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert reply.result(60).usage.completion_tokens == 3
    assert _gone(e0["pid"], 20)
    assert _alive(server)["pid"] != e0["pid"]


def test_a_request_not_streamed_is_run_again_when_its_worker_dies_mid_generation(server):
    """A non-streamed request whose worker is
    SIGKILLed after it made tokens: nothing was sent, so it runs again from its start on the restarted worker and
    the client gets the whole answer, not a 503."""
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    e0 = _alive(server)
    reply = _in_background(c.completions.create, model="pace", prompt="x", max_tokens=60)  # ~1.2 s
    deadline = time.monotonic() + 30
    while not any(r["tokens"] >= 5 for r in httpx.get(server.url + "/admin/requests", headers=ADM).json()):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(e0["pid"], signal.SIGKILL)
    r = reply.result(60)
    assert r.usage.completion_tokens == 60 and r.choices[0].finish_reason == "length"
