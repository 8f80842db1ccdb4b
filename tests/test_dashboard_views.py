"""controller.dashboard.views over an engine's reported state, without a server."""

from __future__ import annotations

from types import SimpleNamespace

from controller.dashboard.views import engine_models


def test_oldest_wait_is_none_when_nothing_waits():
    """A pooled engine reports oldest_wait_s 0.0 for a model with nothing waiting (pace and the pooled engine
    both do): the Models view showed "Oldest wait 0 ms" beside "Queue 0", a wait that never happened. No
    request waiting is no oldest wait (the view shows "—")."""
    e = SimpleNamespace(pool={"models": {
        "idle": {"state": "resident", "waiting": 0, "running": 2, "oldest_wait_s": 0.0},
        "busy": {"state": "resident", "waiting": 3, "running": 4, "oldest_wait_s": 1.5},
        "fresh": {"state": "host", "waiting": 1, "running": 0, "oldest_wait_s": 0.0}}})
    got = engine_models(e)
    assert got["idle"]["oldest_wait_s"] is None
    assert got["busy"]["oldest_wait_s"] == 1.5
    assert got["fresh"]["oldest_wait_s"] == 0.0  # one waiting since just now: a wait of 0 s, shown
