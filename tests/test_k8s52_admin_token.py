"""The operator's admin token refused by the controller (401: the token in the operator's Secret is not the one
whose hash the controller's config.yaml holds), on kmock's emulator: every resource says so (Degraded,
Unauthorized, with what to fix), not "Rejected" as if its spec were wrong; a PooledModel or Tenant deleted then
stays Terminating and says why (its finalizer cannot remove it from the controller), as when the controller is
unreachable, instead of an error event a minute with its status unchanged."""

from __future__ import annotations

import pytest

kopf = pytest.importorskip("kopf")
kmock = pytest.importorskip("kmock")

import tests.test_operator_lifecycle as lifecycle  # noqa: E402
from tests.kmock_util import FakeController  # noqa: E402
from tests.operator_events import posted  # noqa: E402
from tests.test_operator_e2e import _obj, _until  # noqa: E402
from tests.test_operator_lifecycle import FINALIZER, Operator, _reason, _true  # noqa: E402
from tests.test_operator_lifecycle import world as lifecycle_world  # noqa: E402

world = lifecycle_world


class WrongToken(FakeController):
    """A controller that refuses the operator's admin token."""

    def _up(self, fn):
        def answer(req):
            from kmock import Response

            return Response(status=401, payload={"error": {"message": "incorrect admin token",
                                                           "type": "authentication_error"}})

        return answer


@pytest.fixture()
def wrong_token(monkeypatch):
    monkeypatch.setattr(lifecycle, "FakeController", WrongToken)  # (the world's controller)


async def _removal_refused(kube, plural: str, name: str):
    obj = await _reason(kube, plural, name, "Unauthorized")
    return obj if obj and _true(obj)["message"].startswith("removing it from the controller:") else None


@pytest.mark.asyncio
@pytest.mark.timeout(90)
async def test_a_refused_admin_token_is_said_on_every_resource(wrong_token, world):
    kube, fake = world
    assert isinstance(fake, WrongToken)
    async with Operator():
        await kube.create("gpupools", _obj("GPUPool", "default", {}))
        await kube.create("pooledmodels", _obj("PooledModel", "m", {"engine": {"kind": "pace"}}))
        await kube.create("tenants", _obj("Tenant", "t", {"keysSecretRef": {"name": "keys"}}))
        for plural, name in (("gpupools", "default"), ("pooledmodels", "m"), ("tenants", "t")):
            obj = await _until(f"{plural}/{name} Unauthorized", lambda p=plural, n=name: _reason(kube, p, n,
                                                                                               "Unauthorized"))
            assert "incorrect admin token" in _true(obj)["message"]
            assert "TOKENPOOL_ADMIN_TOKEN" in _true(obj)["message"]
        for plural, name in (("pooledmodels", "m"), ("tenants", "t")):
            await kube.delete(plural, name)
            obj = await _until(f"{plural}/{name} says why it stays", lambda p=plural, n=name: _removal_refused(
                kube, p, n))
            assert obj["metadata"].get("deletionTimestamp") and FINALIZER in obj["metadata"]["finalizers"]
        # One Warning each (the removal's Degraded has the same reason), no error event of kopf's.
        for name in ("default", "m", "t"):
            assert [(e["type"], e["reason"]) for e in posted(kube, name)] == [("Warning", "Unauthorized")], name
