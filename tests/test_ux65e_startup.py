"""`tokenpool serve`'s start-up: the local worker is spawned before the app's imports (its own start-up, the way to
ready, runs beside them: bench/results/startup_cpu2_*.json), and the admin token files of servers killed by SIGKILL
are removed by the next start, never a running server's."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from load_tests.live_server import REPO_ROOT, LiveServer
from load_tests.user_check import alive
from tests.ports import free_port

PORTS = range(29350, 29400)
PACE = {"name": "pace", "engine": {"kind": "pace", "pace_s_per_token": 0.01}}
WORKERS = {"local": "cpu", "heartbeat_s": 0.25, "dead_after_s": 1.5}


def test_the_local_worker_is_spawned_before_the_apps_imports(tmp_path):
    """When `tokenpool serve` imports controller.app (FastAPI, the routes: ~0.3 s of a 2-core host), its local worker
    is already running; a SIGTERM then stops the start-up cleanly, the worker with it (exit 0)."""
    port = free_port(PORTS)
    (tmp_path / "c.yaml").write_text(json.dumps({"listen": {"host": "127.0.0.1", "port": port},
                                                 "admin_token_file": str(tmp_path / "token"), "workers": WORKERS,
                                                 "models": [PACE]}))
    code = f"""
import json, os, signal, sys
from pathlib import Path
seen = {{}}
def children():
    out = {{}}
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == os.getpid():
                out[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\\0", b" ").decode()
        except (OSError, ValueError):
            pass
    return out
class AppImport:  # (looks, at the app's import, at what this process has started; imports nothing itself)
    def find_spec(self, name, path=None, target=None):
        if name == "controller.app" and not seen:
            seen["children"] = children()
            os.kill(os.getpid(), signal.SIGTERM)
        return None
sys.meta_path.insert(0, AppImport())
from controller import serve
try:
    serve.serve(config_path=Path({str(tmp_path / "c.yaml")!r}))
    seen["rc"] = 0
except SystemExit as e:
    seen["rc"] = e.code
print(json.dumps(seen))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, TOKENPOOL_CACHE=str(tmp_path / "cache")))
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    workers = [int(p) for p, cmd in got["children"].items() if "-m controller.worker" in cmd]
    assert len(workers) == 1, (got, r.stderr[-3000:])
    assert got["rc"] == 0 and "signal 15 during start-up: stopping" in r.stderr, r.stderr[-3000:]
    deadline = time.monotonic() + 10
    while alive(workers[0]):
        assert time.monotonic() < deadline, f"worker {workers[0]} outlived its server"
        time.sleep(0.05)
    assert not (tmp_path / "token").exists() and "Traceback" not in r.stderr, r.stderr[-3000:]


def _server(cfg: dict, work: Path, env: dict[str, str], used: list[int]) -> LiveServer:
    """A LiveServer (not waited for) on a port of PORTS not in `used` (a server starting may not have bound its port
    yet), which it joins."""
    import pytest

    import load_tests.live_server as live_server

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(live_server, "free_port", lambda: free_port(PORTS, skip=tuple(used)))
        srv = live_server.LiveServer(cfg, work, wait_ready=False, env=env)
    used.append(srv.port)
    return srv


def _wait_log(srv: LiveServer, pattern: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, srv.log_path.read_text(errors="replace")):
        assert srv.proc.poll() is None, f"server exited ({srv.proc.returncode}) before {pattern!r}:\n{srv.log()}"
        assert time.monotonic() < deadline, f"no {pattern!r} in the log:\n{srv.log()}"
        time.sleep(0.02)


def test_a_sigkilled_servers_token_file_is_removed_by_the_next_start_and_a_running_ones_kept(tmp_path):
    """A server killed by SIGKILL leaves its run's admin token file (0600, its token); the next `tokenpool serve` of
    that user removes it, and keeps the file of a server still running (it holds the file's lock), and a file whose
    port a server answers on (one of an earlier version, which took no lock)."""
    cache = tmp_path / "cache"
    env = {"TOKENPOOL_CACHE": str(cache)}
    cfg = {"workers": WORKERS, "models": [PACE]}
    written = r"admin token for this run written to"
    used: list[int] = []
    with socket.socket() as old_server:  # a server of an earlier version, answering on its port
        used.append(free_port(PORTS))
        old_server.bind(("127.0.0.1", used[-1]))
        old_server.listen()
        old = cache / f"admin-token-{used[-1]}"
        cache.mkdir()
        old.write_text("old-versions-token\n")
        with _server(cfg, tmp_path / "running", env, used) as running:
            _wait_log(running, written)
            with _server(cfg, tmp_path / "killed", env, used) as killed:
                _wait_log(killed, written)
                dead = cache / f"admin-token-{killed.port}"
                os.kill(killed.proc.pid, signal.SIGKILL)
                killed.proc.wait(10)
                assert dead.exists() and dead.stat().st_mode & 0o777 == 0o600  # (the leftover, as it was)
                kept = (cache / f"admin-token-{running.port}").read_text()
                with _server(cfg, tmp_path / "next", env, used) as nxt:
                    _wait_log(nxt, written)
                    assert not dead.exists(), nxt.log()
                    assert f"removed the admin token files of servers no longer running (port {killed.port}) " \
                           f"from {cache}" in nxt.log()
                    assert (cache / f"admin-token-{running.port}").read_text() == kept
                    assert old.read_text() == "old-versions-token\n"
                    assert (cache / f"admin-token-{nxt.port}").exists()
        assert running.proc.returncode == 0 and nxt.proc.returncode == 0
        assert sorted(p.name for p in cache.glob("admin-token-*")) == [old.name]  # (each removed its own at exit)
