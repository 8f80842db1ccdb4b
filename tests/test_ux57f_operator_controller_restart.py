"""A restarted controller has lost the models and tenants the operator made through its admin API. The operator sees
the restart within about a second (the controller's /health `instance` is new at each start) and registers them
again at once; it used to wait for the next timer round (30 s by default), every tenant key a 401 and every model a
404 meanwhile, while the statuses said Ready. On kmock with a fake controller; the timer rounds are held off (as
with the default 30 s: the suite's 1 s rounds would hide the gap)."""

from __future__ import annotations

import dataclasses
import importlib
import time

import pytest

kopf = pytest.importorskip("kopf")
kmock = pytest.importorskip("kmock")

from tests.test_operator_e2e import Operator, _obj, _until  # noqa: E402
from tests.test_operator_lifecycle import _reason, world  # noqa: E402,F401


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_restarted_controller_gets_its_models_and_tenants_back_at_once(world, monkeypatch):  # noqa: F811
    kube, fake = world
    state = {"instance": "first"}
    fake.handler["get /health"] << (lambda req: kmock.Response(
        status=200, payload={"status": "ok", "engines": 1, "models": len(fake.models), "instance": state["instance"]}))
    # (imported here, under the world's TOKENPOOL_OPERATOR_RESYNC_S, as the other operator tests import it; kopf
    # registers its handlers then, and the operator's runner finds them)
    importlib.import_module("controller.operator.handlers")
    spawning = kopf.get_default_registry()._spawning
    periodic = {"resync_model", "reconcile_tenant", "resync_pool"}  # (the RESYNC_S rounds: held off here)
    monkeypatch.setattr(spawning, "_handlers", [
        dataclasses.replace(h, interval=3600, initial_delay=3600) if getattr(h.fn, "__name__", "") in periodic else h
        for h in spawning._handlers])
    assert sum(h.interval == 3600 for h in spawning._handlers) == 3
    async with Operator():
        await kube.create("gpupools", _obj("GPUPool", "default", {}))
        await kube.create("pooledmodels", _obj("PooledModel", "m", {"engine": {"kind": "pace"}}))
        await kube.create("tenants", _obj("Tenant", "t", {"keysSecretRef": {"name": "keys"}}))
        await _until("m Serving", lambda: _reason(kube, "pooledmodels", "m", "Serving"))
        await _until("t Applied", lambda: _reason(kube, "tenants", "t", "Applied"))
        await _until("the restart checks' first look", lambda: _health_asked(fake, 2))

        fake.models.clear()  # the controller restarts: what the admin API made is gone
        fake.tenants.clear()
        state["instance"] = "second"
        t0 = time.monotonic()
        await _until("the model back", lambda: _true("m" in fake.models), timeout=10)
        await _until("the tenant back", lambda: _true("t" in fake.tenants), timeout=10)
        assert time.monotonic() - t0 < 5
        assert fake.count("POST", "/admin/models") == 2 and fake.count("POST", "/admin/tenants") == 2

        # Nothing more while it stays the same controller (the checks ask /health, about once a second in all).
        asked = fake.count("GET", "/health")
        await _until("a few more checks", lambda: _health_asked(fake, asked + 2))
        assert fake.count("POST", "/admin/models") == 2 and fake.count("POST", "/admin/tenants") == 2


async def _true(v: bool) -> bool:
    return v


async def _health_asked(fake, n: int) -> bool:
    return fake.count("GET", "/health") >= n
