"""What a user pass over examples/remote-workers.yaml found (session 64): llama-8b (`replicas.min: 0`, keep_alive
15m) was unregistered, its weights freed, ~30 s after its request, its keep_alive never applying; a worker started
without TOKENPOOL_JOIN_TOKEN heard "bad join token"; with `workers.local: none` the log said only "listening" while
/health said "starting"; a drained worker's expected exit was logged "connection lost: IncompleteReadError" at INFO.
And the tenants file's temporary copy was written before it was made 0600.

One live server (remote-workers.yaml, tiny models, a fast autoscaler tick and a short keep_alive) and one CPU worker
started as the example's comment says, shared by the tests in file order: the drain, last, ends the worker."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from controller.autoscaler import Autoscaler, ModelLoad
from controller.config import AutoscalerSettings, TenantSpec
from controller.router import EngineView, ModelInfo, ReplicaView
from controller.tenants import TenantRegistry
from load_tests.live_server import REPO_ROOT
from tests.test_ux64g_examples import ALICE, JOIN, _registered, _until, drained, remote_example

PORTS = range(29150, 29200)
KEEP_ALIVE_S = 4.0  # llama-8b's here (15m in the example); down_ticks: 1 s


@pytest.fixture(scope="module")
def remote(tmp_path_factory, make_tiny):
    """remote-workers.yaml served (test_ux64g_examples.remote_example): cold after 1 s, llama-8b's keep_alive
    KEEP_ALIVE_S."""
    with remote_example(tmp_path_factory, make_tiny, PORTS, KEEP_ALIVE_S, down_ticks=10) as srv:
        yield srv

def _log(srv) -> str:
    return srv.log_path.read_text(errors="replace")  # (the whole of it: srv.log() is its last 5000 characters)


def _worker(srv, token: str | None) -> subprocess.Popen:
    """`[TOKENPOOL_JOIN_TOKEN=...] python -m controller.worker --controller HOST:PORT --device cpu`."""
    env = {k: v for k, v in os.environ.items() if k != "TOKENPOOL_JOIN_TOKEN"}
    env.update(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", **({"TOKENPOOL_JOIN_TOKEN": token} if token else {}))
    p = subprocess.Popen([sys.executable, "-m", "controller.worker", "--controller", f"127.0.0.1:{srv.worker_port}",
                          "--device", "cpu"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    srv.procs.append(p)
    return p


@pytest.fixture(scope="module")
def worker(remote) -> subprocess.Popen:
    w = _worker(remote, JOIN)
    _until("the worker serving qwen2-7b", lambda: _registered(remote, w.pid, "qwen2-7b", "ready"), timeout=90)
    return w


def test_no_local_worker_the_log_says_it_waits_and_a_worker_without_a_join_token_hears_so(remote):
    # with `workers.local: none` the log says what the server waits for (it said only "listening", /health 503)
    said = re.findall(r"INFO waiting for workers on (\S+) \(none local\)", _log(remote))
    assert said == [f"127.0.0.1:{remote.worker_port}"], _log(remote)
    assert httpx.get(remote.url + "/health", timeout=10).status_code == 503
    nothing = _worker(remote, None)  # started without TOKENPOOL_JOIN_TOKEN: not told its token is wrong
    assert nothing.wait(60) == 1
    err = nothing.stderr.read()
    assert "controller refused this worker: no join token given (--join-token or $TOKENPOOL_JOIN_TOKEN)" in err, err
    assert re.search(r"refused worker from .*: no join token given", _log(remote))
    assert "bad join token" not in _log(remote)


def test_a_model_scaled_to_zero_keeps_its_registration_for_its_keep_alive(remote, worker):
    c = openai.OpenAI(base_url=remote.url + "/v1", api_key=ALICE, max_retries=0, timeout=60)
    r = c.chat.completions.create(model="llama-8b", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    done = time.monotonic()
    assert r.choices[0].finish_reason == "length"
    # cold past its down_ticks (1 s), its last registration stays for its keep_alive (it went after ~1 s: its weights
    # freed, the 15 minutes of the example never applying) ...
    time.sleep(KEEP_ALIVE_S - 1.5)
    assert _registered(remote, worker.pid, "llama-8b"), _log(remote)[-3000:]
    assert "unregistering llama-8b" not in _log(remote)
    # ... and goes once it has been idle that long, as a cold one does
    _until("llama-8b given back", lambda: not _registered(remote, worker.pid, "llama-8b"), timeout=15)
    assert time.monotonic() - done > KEEP_ALIVE_S - 0.5
    assert "unregistering llama-8b" in _log(remote)


def test_a_drained_worker_s_exit_is_not_logged_as_a_lost_connection(remote, worker):
    c = openai.OpenAI(base_url=remote.url + "/v1", api_key=ALICE, max_retries=0, timeout=60)
    drained(remote, worker, c, 100)
    log = _log(remote)
    assert "was signalled to stop" in log
    # its exit was the one expected: not "engine ... connection lost: IncompleteReadError" at INFO (nor WARNING)
    assert "connection lost" not in log, log[-3000:]


def test_a_last_registration_waits_for_its_keep_alive_tick_by_tick():
    """The autoscaler's side, pure: used within its keep_alive, a cold model's last registration stays; past it, or
    with none (unset: as before), it goes; a request running counts as a use."""
    on_w = [EngineView("w", 60 * 2**30, {"llama-8b": ReplicaView("llama-8b", True, 64)})]

    def plan(keep_alive: float | None, idle: float | None) -> list[tuple[str, str]]:
        a = Autoscaler(AutoscalerSettings(down_ticks=2))
        llama = ModelLoad(ModelInfo("llama-8b", 2**30), 0, 4, 0, 64, keep_alive_s=keep_alive, idle_s=idle)
        return [(x.kind, x.model) for _ in range(3) for x in a.plan([llama], on_w)]

    assert plan(900.0, 30.0) == [] and plan(900.0, 0.0) == []
    assert plan(900.0, 900.0) == [("unload", "llama-8b")]
    assert plan(None, 30.0) == [("unload", "llama-8b")] and plan(900.0, None) == [("unload", "llama-8b")]
    assert plan(0.0, 0.0) == [("unload", "llama-8b")]


def test_the_tenants_file_is_made_0600_from_the_start(tmp_path, monkeypatch):
    """Its temporary copy is created 0600, not written with the umask's mode and chmod-ed after (the tenants' key hashes
    readable meanwhile): with no chmod taking effect and umask 0, the file has the mode it was made with."""
    f = tmp_path / "tenants.yaml"
    (tmp_path / "tenants.tmp").write_text("left by a crash\n")
    (tmp_path / "tenants.tmp").chmod(0o644)
    monkeypatch.setattr(Path, "chmod", lambda self, mode, **kw: None)
    monkeypatch.setattr(os, "chmod", lambda *a, **kw: None)
    old = os.umask(0)
    try:
        reg = TenantRegistry([], auth=True, tenants_file=str(f))
        _, key = reg.create(TenantSpec(name="carol"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert "carol" in f.read_text() and not (tmp_path / "tenants.tmp").exists()
    assert TenantRegistry([], auth=True, tenants_file=str(f)).authenticate(key).name == "carol"
