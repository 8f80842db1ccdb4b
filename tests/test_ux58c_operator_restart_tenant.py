"""A restarted controller: a Tenant whose `spec.models` names a PooledModel is registered again at once (its keys), but
its restart round may run before the model's, which then says ModelsUnmatched; once the model is back the Tenant's
status must say so at once, not at the next periodic round (held off here, as with the default 30 s). On kmock with a
fake controller whose first POST /admin/models after the restart fails (the model comes back a few seconds after the
tenant: deterministic, where the order of the two restart rounds is not)."""

from __future__ import annotations

import dataclasses
import importlib

import pytest

kopf = pytest.importorskip("kopf")
kmock = pytest.importorskip("kmock")

from tests.test_operator_e2e import Operator, _obj, _until  # noqa: E402
from tests.test_operator_lifecycle import _reason, world  # noqa: E402,F401


def hold_periodic_rounds(monkeypatch) -> None:
    """The RESYNC_S timer rounds an hour apart (the suite's 1 s rounds would hide what the restart check must do)."""
    importlib.import_module("controller.operator.handlers")  # (under the world's env, as the other operator tests)
    spawning = kopf.get_default_registry()._spawning
    periodic = {"resync_model", "reconcile_tenant", "resync_pool"}
    monkeypatch.setattr(spawning, "_handlers", [
        dataclasses.replace(h, interval=3600, initial_delay=3600) if getattr(h.fn, "__name__", "") in periodic else h
        for h in spawning._handlers])
    assert sum(h.interval == 3600 for h in spawning._handlers) == 3


def serve_health(fake, state: dict) -> None:
    fake.handler["get /health"] << (lambda req: kmock.Response(status=200, payload={
        "status": "ok", "engines": sum(1 for e in fake.engines if e.get("alive")), "models": len(fake.models),
        "instance": state["instance"]}))


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_tenants_models_unmatched_clears_once_its_model_is_back(world, monkeypatch):  # noqa: F811
    kube, fake = world
    state = {"instance": "first", "hold": False}
    serve_health(fake, state)
    hold_periodic_rounds(monkeypatch)
    add = fake._add

    def held_add(store, body, out):  # the restarted controller refuses the model's first registration (503)
        if state["hold"] and store is fake.models:
            return kmock.Response(status=503, payload="starting")
        return add(store, body, out)

    fake._add = held_add
    async with Operator():
        await kube.create("gpupools", _obj("GPUPool", "default", {}))
        await kube.create("pooledmodels", _obj("PooledModel", "m", {"engine": {"kind": "pace"}}))
        await kube.create("tenants", _obj("Tenant", "t", {"keysSecretRef": {"name": "keys"}, "models": ["m"]}))
        await _until("m Serving", lambda: _reason(kube, "pooledmodels", "m", "Serving"))
        await _until("t Applied", lambda: _reason(kube, "tenants", "t", "Applied"))
        await _until("the restart checks' first look", lambda: _true(fake.count("GET", "/health") >= 2))

        fake.models.clear()  # the controller restarts: what the admin API made is gone
        fake.tenants.clear()
        state["hold"], state["instance"] = True, "second"
        await _until("the tenant back", lambda: _true("t" in fake.tenants), timeout=10)
        await _until("t ModelsUnmatched (m not back yet)", lambda: _reason(kube, "tenants", "t", "ModelsUnmatched"),
                     timeout=10)
        state["hold"] = False
        await _until("the model back", lambda: _true("m" in fake.models), timeout=15)
        await _until("t Applied again", lambda: _reason(kube, "tenants", "t", "Applied"), timeout=4)


async def _true(v: bool) -> bool:
    return v
