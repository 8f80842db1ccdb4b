"""A free TCP port of a range: each test file keeps to its own range (a machine shared with other test runs)."""

from __future__ import annotations

import contextlib
import socket


def free_port(ports: range, skip: tuple[int, ...] = ()) -> int:
    """The first port of `ports` (not one of `skip`) that 127.0.0.1 can bind now."""
    for port in ports:
        if port in skip:
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
