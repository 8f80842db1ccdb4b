"""controller.dashboard.views over an engine's reported state, without a server."""

from __future__ import annotations

import time
from types import SimpleNamespace

from controller.dashboard import views
from controller.dashboard.activity import Activity
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


def test_the_model_running_now_is_one_that_runs():
    """A pace model runs beside the pooled engine's turns: while only it ran, the engine's `active` (GET /admin/pool,
    the dashboard's "running now") still named the pooled engine's last model. The model running now is the pool's
    active one while it runs, else the one with the most running; idle, the model of the last turn."""
    def active(**running):
        e = SimpleNamespace(id="w0", device="cpu", host="h", alive=True, draining=False, subs={}, step_s=0.01, pool={
            "active": "big", "timeline": [], "vram": None, "models": {
                n: {"state": "resident", "waiting": 0, "running": running.get(n, 0)} for n in ("big", "small", "pace")}})
        return views._engine_out(None, Activity(hooked=False), e, time.time(), 60.0, 0.25).active
    assert active(pace=1) == "pace"
    assert active(big=1, pace=3) == "big"
    assert active(small=1, pace=2) == "pace"
    assert active() == "big"
