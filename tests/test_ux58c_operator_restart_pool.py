"""A restarted controller: its engines are gone and come back as the workers join it again. The GPUPool's
`enginesReady` (and its Ready condition) must follow within about a second, as the restart check sees it (the
controller's /health, which the operator asks once a second anyway: its `instance`, its `engines`), not at the next
periodic round (held off here, as with the default 30 s). On kmock with a fake controller."""

from __future__ import annotations

import pytest

kopf = pytest.importorskip("kopf")
kmock = pytest.importorskip("kmock")

from tests.test_operator_e2e import Operator, _obj, _until  # noqa: E402
from tests.test_operator_lifecycle import _reason, world  # noqa: E402,F401
from tests.test_ux58c_operator_restart_tenant import _true, hold_periodic_rounds, serve_health  # noqa: E402


async def _engines(kube, n: int) -> bool:
    pool = await kube.get("gpupools", "default")
    return ((pool or {}).get("status") or {}).get("enginesReady") == n


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_pools_engines_ready_follows_a_controller_restart(world, monkeypatch):  # noqa: F811
    kube, fake = world
    state = {"instance": "first"}
    serve_health(fake, state)
    hold_periodic_rounds(monkeypatch)
    engine = dict(fake.engines[0])
    async with Operator():
        await kube.create("gpupools", _obj("GPUPool", "default", {}))
        await _until("the pool EnginesReady", lambda: _reason(kube, "gpupools", "default", "EnginesReady"))
        assert await _engines(kube, 1)
        await _until("the restart check's first look", lambda: _true(fake.count("GET", "/health") >= 2))

        fake.engines.clear()  # the controller restarts: no engine has joined it yet
        state["instance"] = "second"
        await _until("enginesReady 0", lambda: _engines(kube, 0), timeout=5)
        assert await _reason(kube, "gpupools", "default", "WaitingForWorkers")
        fake.engines.append(dict(engine))  # a worker joins the new controller
        await _until("enginesReady 1 again", lambda: _engines(kube, 1), timeout=5)
        assert await _reason(kube, "gpupools", "default", "EnginesReady")

        # Nothing more while the controller and its engines stay as they are (one GET /admin/engines per round).
        rounds = fake.count("GET", "/admin/engines")
        asked = fake.count("GET", "/health")
        await _until("a few more checks", lambda: _true(fake.count("GET", "/health") >= asked + 2))
        assert fake.count("GET", "/admin/engines") == rounds
