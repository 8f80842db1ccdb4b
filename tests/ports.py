"""A free TCP port of a range: each test file keeps to its own range (a machine shared with other test runs).

Under pytest-xdist (the suite runs its files on several workers at once) each worker keeps to its own share of
every range -- worker gwN of W takes the ports p with (p - start) % W == N -- so two files running at once never
pick the same port (a port is only probed, then bound later by a server: two probes could both find it free)."""

from __future__ import annotations

import contextlib
import os
import socket


def worker_share() -> tuple[int, int]:
    """(this xdist worker's index, the number of workers); (0, 1) outside xdist."""
    name, count = os.environ.get("PYTEST_XDIST_WORKER", ""), os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if name.startswith("gw") and name[2:].isdigit() and count.isdigit() and int(count) > 1:
        return int(name[2:]) % int(count), int(count)
    return 0, 1


def free_port(ports: range, skip: tuple[int, ...] = ()) -> int:
    """The first port of `ports` (not one of `skip`; of this xdist worker's share) that 127.0.0.1 can bind now."""
    index, count = worker_share()
    for port in ports:
        if port in skip or (port - ports.start) % count != index:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {ports.start}-{ports.stop - 1}")


@contextlib.contextmanager
def live_server_on(ports: range, cfg: dict, work):
    """A running `tokenpool serve` of `cfg` in folder `work` (load_tests.live_server.LiveServer) on a port of
    `ports`; stopped on leaving."""
    import pytest

    import load_tests.live_server as live_server

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(live_server, "free_port", lambda: free_port(ports))
        srv = live_server.LiveServer(cfg, work)
    with srv:
        yield srv


def one_model_cfg(path, ctx: int, name: str = "tiny", max_num_seqs: int = 8) -> dict:
    """A configuration serving the model folder `path` as `name` on one local CPU worker (no standby; heartbeats
    every 0.25 s), its context `ctx` tokens."""
    return {"workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
            "models": [{"name": name, "path": str(path), "engine": {"max_num_seqs": max_num_seqs,
                                                                     "max_model_len": ctx}}]}
