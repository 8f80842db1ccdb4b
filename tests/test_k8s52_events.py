"""The Kubernetes events the operator posts (what `kubectl describe` shows), on kmock's emulator with a fake
controller: a retry the handlers ask for while they wait (a model's drain, the controller unreachable) is in the
object's status, and Degraded in one Warning event, not an event per retry (kopf aggregates none: a drain posted one
a second, a controller down one every 5 s per object)."""

from __future__ import annotations

import pytest

kopf = pytest.importorskip("kopf")
kmock = pytest.importorskip("kmock")

from tests.operator_events import posted  # noqa: E402
from tests.test_operator_e2e import _obj, _until  # noqa: E402
from tests.test_operator_lifecycle import Operator, _reason  # noqa: E402
from tests.test_operator_lifecycle import world as lifecycle_world  # noqa: E402

world = lifecycle_world


@pytest.mark.asyncio
@pytest.mark.timeout(90)
async def test_a_drain_and_a_controller_down_post_no_event_per_retry(world):
    kube, fake = world
    async with Operator():
        await kube.create("gpupools", _obj("GPUPool", "default", {}))
        await kube.create("pooledmodels", _obj("PooledModel", "m", {"engine": {"kind": "pace"}}))
        await _until("m Serving", lambda: _reason(kube, "pooledmodels", "m", "Serving"))
        fake.engines[0]["models"] = [{"model": "m", "inflight": 1}]  # a request that does not finish
        await kube.delete("pooledmodels", "m")
        await _until("m draining", lambda: _reason(kube, "pooledmodels", "m", "Draining"))
        reads = fake.count("GET", "/admin/engines")
        await _until("three more looks at its requests (retries a second apart)",
                     lambda: _at_least(fake, reads + 3))
        # The controller gone: the finalizer's next retry turns m Degraded, with one Warning event, posted after
        # whatever m's retries before it posted (kopf posts an object's events in order): only its turning Ready.
        fake.down = True
        await _until("m's Warning", lambda: _warned(kube, "m", "ControllerUnavailable"))
        assert [(e["type"], e["reason"]) for e in posted(kube, "m")] == [("Normal", "Serving"),
                                                                          ("Warning", "ControllerUnavailable")]
        assert "m" in fake.models and await kube.get("pooledmodels", "m") is not None  # (still held, Terminating)


async def _at_least(fake, n: int) -> bool:
    return fake.count("GET", "/admin/engines") >= n


async def _warned(kube, name: str, reason: str) -> bool:
    return any(e["reason"] == reason for e in posted(kube, name))
