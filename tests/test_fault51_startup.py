"""Faults during `tokenpool serve`'s start-up and its worker's first loads, as users and operators meet them.

Since 679b5e5 the local worker starts (and joins) before the configured models' tokenizers are read, and its standby
only once its first loads are done. So a signal, a bad model or a dead worker now meets a worker that is already
running: a stop must take it (and its host copies in /dev/shm, and the run's admin token file) with it, and a worker
killed in its first loads (no standby yet) must be replaced by a cold start, its requests waiting for it."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from controller.keys import hash_key
from load_tests.live_server import LiveServer
from load_tests.user_check import alive as _alive  # (running still: a zombie is not)

ADMIN = "admin-fault51-startup"
H = {"Authorization": f"Bearer {ADMIN}"}
PACE = {"name": "pace", "engine": {"kind": "pace", "pace_s_per_token": 0.01}}
WORKERS = {"local": "cpu", "heartbeat_s": 0.25, "dead_after_s": 1.5}


class Children:
    """The server's child processes (its workers and standbys), seen while it runs: a thread reads /proc."""

    def __init__(self, pid: int):
        self.pid, self.seen, self._stop = pid, set(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for d in Path("/proc").iterdir():
                if d.name.isdigit():
                    try:
                        if int(d.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1]) == self.pid:
                            self.seen.add(int(d.name))
                    except (OSError, IndexError, ValueError):
                        pass
            time.sleep(0.02)

    def left(self, wait_s: float = 3.0) -> list[int]:
        """The children still alive `wait_s` after the server exited (a local worker exits with its controller's
        connection, so none should be)."""
        self._stop.set()
        self._t.join()
        deadline = time.monotonic() + wait_s
        while (alive := [p for p in self.seen if _alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.05)
        return alive


def _segments(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _wait_log(srv: LiveServer, pattern: str, timeout: float = 60.0) -> re.Match:
    deadline = time.monotonic() + timeout
    while not (found := re.search(pattern, srv.log_path.read_text(errors="replace"))):
        assert srv.proc.poll() is None, f"server exited ({srv.proc.returncode}) before {pattern!r}:\n{srv.log()}"
        assert time.monotonic() < deadline, f"no {pattern!r} in the log:\n{srv.log()}"
        time.sleep(0.02)
    return found


def _wait_port(port: int, timeout: float = 60.0) -> None:
    """The server's socket is bound (before its controller starts: connections wait in its backlog).

    The port is an ephemeral one (free_port binds port 0), so a connect to it while nothing listens may be given that
    same port as its own and connect to itself (TCP simultaneous open): that is not the server, and is tried again.
    (CI at 7407658 met it: the requests that followed were refused.)"""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.getsockname() != s.getpeername():
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.02)


@pytest.fixture
def shm():
    with tempfile.TemporaryDirectory(prefix="tokenpool-fault51-", dir="/dev/shm") as d:
        yield Path(d)


@pytest.fixture(scope="module")
def booting(make_tiny, tmp_path_factory):
    """A server with three factory models and a paced one, yielded while it starts (not waited for)."""
    models = {"ma": make_tiny("qwen2"), "mb": make_tiny("qwen3"), "mc": make_tiny("llama")}
    with tempfile.TemporaryDirectory(prefix="tokenpool-fault51-", dir="/dev/shm") as d:
        cfg = {"admin_token_hash": hash_key(ADMIN), "workers": WORKERS, "shutdown_grace_s": 2,
               "models": [*({"name": n, "path": str(p)} for n, p in models.items()), PACE]}
        with LiveServer(cfg, tmp_path_factory.mktemp("fault51-boot"), wait_ready=False,
                        env={"TOKENPOOL_SHM_DIR": d}) as srv:
            srv.kids = Children(srv.proc.pid)
            srv.shm = Path(d)
            yield srv


def test_requests_during_startup_wait_and_a_worker_killed_in_its_first_loads_is_replaced(booting):
    """Requests sent as soon as the port is bound (before the worker joined, or the tokenizers were read) wait, and
    succeed, though the worker is SIGKILLed in its first loads (before its standby exists: a cold start replaces it);
    the server then gets ready. Never a 5xx, nor a hang."""
    srv = booting
    _wait_port(srv.port)
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)
    got: dict[str, object] = {}

    def ask(model: str) -> None:
        try:
            r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          extra_body={"ignore_eos": True})
            got[model] = r.usage.completion_tokens
        except Exception as e:  # noqa: BLE001 - what the client met is the result
            got[model] = e

    threads = [threading.Thread(target=ask, args=(n,)) for n in ("ma", "mb", "mc", "pace")]
    for t in threads:
        t.start()
    # the first loads were sent (placement waited for every configured model); the worker is loading them
    pid = int(_wait_log(srv, r"engine w0 registered \(cpu on \S+, pid (\d+)\)").group(1))
    _wait_log(srv, r"registering pace on w0")
    assert "exited with" not in srv.log()
    assert srv.kids.seen == {pid}, srv.kids.seen  # no standby beside the first loads (pool.SPARE_WAIT_S)
    os.kill(pid, signal.SIGKILL)
    for t in threads:
        t.join(90)
    assert got == {"ma": 3, "mb": 3, "mc": 3, "pace": 3}, (got, srv.log())
    srv.wait_healthy(30)
    (e,) = [e for e in httpx.get(srv.url + "/admin/engines", headers=H, timeout=10).json() if e["alive"]]
    assert e["id"] == "w0" and e["pid"] != pid


def test_a_controller_paused_and_resumed_keeps_its_workers(booting):
    """Ctrl-Z, then fg: the server's workers (in their own session: not stopped with it) kept sending; the controller,
    resumed, must not declare them dead for its own silence, SIGKILL them and reload every model."""
    srv = booting
    srv.wait_healthy(60)
    (e0,) = [e for e in httpx.get(srv.url + "/admin/engines", headers=H, timeout=10).json() if e["alive"]]
    os.kill(srv.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(2.5)  # the pause itself (workers.dead_after_s is 1.5 s here)
    finally:
        os.kill(srv.proc.pid, signal.SIGCONT)
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)
    assert c.completions.create(model="pace", prompt="x", max_tokens=2).usage.completion_tokens == 2
    (e1,) = [e for e in httpx.get(srv.url + "/admin/engines", headers=H, timeout=10).json() if e["alive"]]
    assert "declaring it dead" not in srv.log(), srv.log()
    assert e1["pid"] == e0["pid"]


def test_the_stop_leaves_no_worker_and_no_host_copy(booting):
    """SIGTERM to the server once it serves: exit 0, its workers (and the standby) gone, /dev/shm emptied."""
    srv = booting
    srv.wait_healthy(60)
    os.kill(srv.proc.pid, signal.SIGTERM)
    assert srv.proc.wait(30) == 0, srv.log()
    assert len(srv.kids.seen) >= 2, srv.kids.seen  # (the killed worker and its successor, at least)
    assert srv.kids.left() == [], srv.log()
    assert _segments(srv.shm) == [], srv.log()
    assert "Traceback" not in srv.log()


def test_a_signal_while_the_tokenizers_load_stops_the_worker_already_started(make_tiny, tmp_path, shm):
    """SIGTERM once the worker has joined, while the configured models are registered (their tokenizers read): the
    start-up stops at once, exit 0, the worker it started is stopped, the run's admin token file removed."""
    token = tmp_path / "admin.token"
    cfg = {"admin_token_file": str(token), "workers": WORKERS,
           "models": [{"name": "ma", "path": str(make_tiny("qwen2"))}, {"name": "mb", "path": str(make_tiny("qwen3"))},
                      PACE]}
    with LiveServer(cfg, tmp_path / "srv", wait_ready=False, env={"TOKENPOOL_SHM_DIR": str(shm)}) as srv:
        kids = Children(srv.proc.pid)
        _wait_log(srv, r"engine w0 registered")
        assert token.exists()
        os.kill(srv.proc.pid, signal.SIGTERM)
        t0 = time.monotonic()
        assert srv.proc.wait(15) == 0, srv.log()
        assert time.monotonic() - t0 < 10
        log = srv.log()
    assert "signal 15 during start-up: stopping" in log and "listening on" not in log, log
    assert kids.seen and kids.left() == [], log
    assert not token.exists(), log
    assert _segments(shm) == [], log
    assert "Traceback" not in log


def test_a_tokenizer_that_cannot_be_read_refuses_the_start_and_stops_the_worker(make_tiny, tmp_path, shm):
    """A configured model whose folder passes the start's checks but whose tokenizer cannot be read: exit 2 with one
    line naming it, and the worker, which started before the tokenizers were read, stopped with the server."""
    import shutil

    bad = tmp_path / "badtok"
    shutil.copytree(make_tiny("qwen2"), bad)
    (bad / "tokenizer.json").write_text('{"not": "a tokenizer"')
    token = tmp_path / "admin.token"
    cfg = {"admin_token_file": str(token), "workers": WORKERS,
           "models": [PACE, {"name": "bt", "path": str(bad)}]}
    with LiveServer(cfg, tmp_path / "srv", wait_ready=False, env={"TOKENPOOL_SHM_DIR": str(shm)}) as srv:
        kids = Children(srv.proc.pid)
        assert srv.proc.wait(60) == 2, srv.log()
        log = srv.log()
    assert re.search(r"ERROR cannot start: cannot load the tokenizer from \S*badtok", log), log
    assert kids.seen and kids.left() == [], log
    assert not token.exists(), log
    assert _segments(shm) == [], log
    assert "Traceback" not in log


def test_a_second_ctrl_c_while_the_server_stops_does_not_break_the_stop(tmp_path, shm):
    """Ctrl-C, then Ctrl-C again while the stop waits for a worker (one that hangs: SIGSTOPped, so the stop waits its
    5 s for it, then kills it): the stop goes on, exit 0, no traceback, the admin token file removed."""
    token = tmp_path / "admin.token"
    cfg = {"admin_token_file": str(token), "workers": WORKERS, "shutdown_grace_s": 2, "models": [PACE]}
    with LiveServer(cfg, tmp_path / "srv", env={"TOKENPOOL_SHM_DIR": str(shm)}) as srv:
        kids = Children(srv.proc.pid)
        adm = {"Authorization": f"Bearer {token.read_text().strip()}"}
        (w0,) = [e["pid"] for e in httpx.get(srv.url + "/admin/engines", headers=adm, timeout=10).json() if e["alive"]]
        os.kill(w0, signal.SIGSTOP)
        try:
            os.kill(srv.proc.pid, signal.SIGINT)  # (no request in flight: the drain is over at once, the stop follows)
            deadline = time.monotonic() + 10
            while True:  # uvicorn has closed its socket: its serve is returning, the controller's stop comes next
                try:
                    socket.create_connection(("127.0.0.1", srv.port), timeout=1).close()
                except OSError:
                    break
                assert srv.proc.poll() is None and time.monotonic() < deadline, srv.log()
                time.sleep(0.02)
            end = time.monotonic() + 1.0  # well within the stop's 5 s wait for the hung worker
            while time.monotonic() < end and srv.proc.poll() is None:
                os.kill(srv.proc.pid, signal.SIGINT)
                time.sleep(0.05)
            rc = srv.proc.wait(30)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w0, signal.SIGKILL)  # (a stopped worker whose controller died stays stopped for good)
        log = srv.log()
    assert kids.left() == [], log
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log
    assert rc == 0, log
    assert not token.exists(), log


def test_a_failed_load_does_not_tell_a_tenant_the_servers_paths(make_tiny, tmp_path):
    """A model whose weights cannot be read, asked for by a tenant of a server with several while it starts: a 503
    model_load_failed that says when it is tried again but not the worker's error (it names the server's paths); /health
    tells that tenant how many models failed, not which or why (both go to operators only)."""
    import shutil

    bad = tmp_path / "secret-model-dir"
    shutil.copytree(make_tiny("qwen2"), bad)
    w = next(bad.glob("*.safetensors"))
    w.write_bytes(w.read_bytes()[:1000])
    cfg = {"admin_token_hash": hash_key(ADMIN), "workers": WORKERS, "auth": True,
           "tenants": [{"name": "t", "key_hashes": [hash_key("tenant-key-f51")]},  # (two: not a single user's server)
                       {"name": "u", "key_hashes": [hash_key("other-key-f51")]}],
           "models": [{"name": "bw", "path": str(bad)}]}
    with LiveServer(cfg, tmp_path / "srv", wait_ready=False) as srv:
        _wait_port(srv.port)
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="tenant-key-f51", max_retries=0, timeout=60)
        with pytest.raises(openai.APIStatusError) as ei:
            c.completions.create(model="bw", prompt="hi", max_tokens=1)
        err = ei.value.body if isinstance(ei.value.body, dict) else {}
        assert ei.value.status_code == 503 and err.get("code") == "model_load_failed", ei.value
        said = httpx.get(srv.url + "/health", headers={"Authorization": "Bearer tenant-key-f51"}, timeout=10).json()
        assert said["failed_models"] == 1, said  # (what /health tells a tenant: how many)
        assert "secret-model-dir" not in ei.value.message, ei.value.message
