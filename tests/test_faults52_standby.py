"""A local worker's standby that dies (killed, OOM-killed, crashed) is replaced: the slot keeps a warm standby, so
the worker's next death is still a takeover, not a cold start. It was not replaced: the slot ran without one,
silently, until its worker died."""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from pathlib import Path

import httpx

from load_tests.live_server import LiveServer


def _children(pid: int) -> dict[int, str]:
    """The live child processes of `pid`: pid -> command line."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = d.joinpath("stat").read_text().rsplit(")", 1)[1].split()
                if int(stat[1]) == pid and stat[0] != "Z":
                    out[int(d.name)] = d.joinpath("cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, IndexError, ValueError):
                pass
    return out


def _standby(srv: LiveServer, other_than: int | None = None, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        found = [p for p, cmd in _children(srv.proc.pid).items() if "--standby" in cmd and p != other_than]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no standby (other than {other_than}):\n{srv.log()}"
        time.sleep(0.05)


def test_a_killed_standby_is_replaced_and_the_next_worker_death_is_a_takeover(tmp_path, tiny_model):
    """Then the worker dies after the files of one of its models were removed: the successor's load of it fails,
    said in one line (no traceback at each retry), and /health is 200 "degraded" naming it (the other serves)."""
    gone = tmp_path / "gone"
    shutil.copytree(tiny_model, gone)
    cfg = {"workers": {"local": "cpu", "heartbeat_s": 0.25, "dead_after_s": 1.5},
           "models": [{"name": "pace", "engine": {"kind": "pace", "pace_s_per_token": 0.01}},
                      {"name": "gone", "path": str(gone)}]}
    with LiveServer(cfg, tmp_path / "srv") as srv:
        first = _standby(srv)
        os.kill(first, signal.SIGKILL)
        second = _standby(srv, other_than=first)  # (1 s after the first one's death)
        assert re.search(rf"the standby of w0 \(pid {first}\) exited with -9; starting another", srv.log())
        worker = next(p for p, cmd in _children(srv.proc.pid).items() if "--standby" not in cmd)
        shutil.rmtree(gone)
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while not re.search(r"registering gone on w0 failed", log := srv.log()):
            assert time.monotonic() < deadline, log
            time.sleep(0.05)
        assert re.search(rf"exited with -9; its standby \(pid {second}\) takes over", log), log
        assert re.search(r"worker\[\d+\] ERROR loading gone failed: FileNotFoundError: ", log), log
        assert "Traceback" not in log, log
        r = httpx.get(srv.url + "/health", timeout=10)
        assert r.status_code == 200 and r.json()["status"] == "degraded", r.text
        assert list(r.json()["failed_models"]) == ["gone"], r.text
