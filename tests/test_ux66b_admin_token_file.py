"""A configured `admin_token_file` is the server's own: each run writes its fresh token there and removes the file at
exit (it never reads a token from it). A file there before the start that no server wrote (yours) was overwritten by
the run's token and then removed at its exit, and a running server's was taken over by a second server (its token lost
from the file); both starts are refused now, the file left as it was. One left by a server killed with SIGKILL is
replaced by the next start with that file, which says so, and removed at its exit."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import time
from pathlib import Path

import httpx

import load_tests.live_server as live_server
from tests.ports import free_port

PORTS = range(29650, 29700)
PACE = {"name": "pace", "engine": {"kind": "pace", "pace_s_per_token": 0.02, "max_num_seqs": 256}}


@contextlib.contextmanager
def _server(tmp_path: Path, name: str, token_file: Path):
    """`tokenpool serve --config` (no local worker: it listens in ~1 s) with `token_file`, once it listens or has
    exited; stopped (SIGTERM) at the end of the block."""
    live_server.free_port = lambda: free_port(PORTS)
    srv = live_server.LiveServer({"workers": {"local": "none"}, "admin_token_file": str(token_file), "models": [PACE]},
                                 tmp_path / name, wait_ready=False, env={"TOKENPOOL_CACHE": str(tmp_path / "cache")})
    srv.__enter__()
    try:
        deadline = time.monotonic() + 60
        while srv.proc.poll() is None and "listening on" not in srv.log():
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.05)
        yield srv
    finally:
        srv.__exit__()


def _works(srv, token: str) -> bool:
    return httpx.get(srv.url + "/admin/engines", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_a_file_of_yours_is_left_as_it_is_and_the_start_refused(tmp_path):
    mine = tmp_path / "notes.txt"
    mine.write_text("my own notes\n")
    mine.chmod(0o644)
    with _server(tmp_path, "a", mine) as srv:
        assert srv.proc.poll() == 2, srv.log()  # (exited, not listening)
        log = srv.log()
    assert (mine.read_text(), stat.S_IMODE(mine.stat().st_mode)) == ("my own notes\n", 0o644)
    assert [x.split(" ERROR ", 1)[1] for x in log.splitlines() if " ERROR " in x] == [
        f"admin_token_file {mine} is there already and no tokenpool server wrote it: the server writes a fresh token "
        "for each run there and removes the file at exit (it reads no token from it; to choose the token, set "
        "admin_token_hash: tokenpool keys hash); name a path that is not there, or remove the file"], log
    assert "listening on" not in log and "Traceback" not in log, log


def test_a_running_servers_file_is_kept_and_a_killed_ones_replaced_then_removed(tmp_path):
    token_file = tmp_path / "admin-token"
    with _server(tmp_path, "first", token_file) as first:
        token = token_file.read_text().strip()
        with _server(tmp_path, "second", token_file) as second:  # (the same file, another port)
            assert second.proc.poll() == 2, second.log()
        assert "is the token file of a server still running (it holds it)" in second.log(), second.log()
        assert token_file.read_text().strip() == token and _works(first, token)
        os.killpg(first.proc.pid, signal.SIGKILL)  # (no exit of its own: its file stays)
        first.proc.wait(30)
    assert token_file.read_text().strip() == token
    with _server(tmp_path, "third", token_file) as third:
        assert third.proc.poll() is None, third.log()
        new = token_file.read_text().strip()
        assert new != token and _works(third, new) and not _works(third, token)
        assert f"{token_file}: the admin token file of a server no longer running, replaced by this run's" in third.log()
    assert not token_file.exists()
