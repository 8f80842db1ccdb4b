"""Two Tenants whose Secrets hold the same API key (a Secret copied from another team's, the example's key left as
it is): the controller gives a request on that key to whichever of the two it made first, so the other tenant's
models and limits never apply to it, and both Tenants showed Ready/Applied. Now the older Tenant keeps the key; the
younger is not given it and says so (Degraded, KeyConflict, naming the other Tenant), with its other keys applied,
or none (revoked) when it has no other; once the older one goes, the key is the younger's.

The operator itself (kopf's KopfRunner) on kmock's Kubernetes emulator, with the fake controller of
tests/kmock_util (tests/test_operator_lifecycle's `world`).
"""

from __future__ import annotations

import base64

import pytest

kopf = pytest.importorskip("kopf")
kmock = pytest.importorskip("kmock")

from tests.test_operator_e2e import NS, Operator, _cond, _obj, _until  # noqa: E402
from tests.test_operator_lifecycle import _gone, _reason, world  # noqa: E402,F401 - (world: the fixture)

WAIT = 2 * 30 + 20  # a change another Tenant makes is seen at the next timer round (see test_ux55_operator_tenant_models)


def _tenant(name: str, secret: str, created: str) -> dict:
    obj = _obj("Tenant", name, {"keysSecretRef": {"name": secret}})
    obj["metadata"]["creationTimestamp"] = created
    return obj


async def _secret(kube, name: str, **keys: str) -> None:
    await kube.create("secrets", {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NS},
                                  "data": {k: base64.b64encode(v.encode()).decode() for k, v in keys.items()}})


async def _conflict(kube, name: str, owner: str, keys: int):
    """The Tenant once Degraded KeyConflict naming `owner`, with `keys` keys applied."""
    obj = await _reason(kube, "tenants", name, "KeyConflict")
    ok = obj and f"Tenant {NS}/{owner}'s (older)" in _cond(obj, "Degraded")["message"] and obj["status"]["keys"] == keys
    return obj if ok else None


@pytest.mark.asyncio
@pytest.mark.timeout(300)
async def test_a_key_two_tenants_hold_is_the_older_ones(world):  # noqa: F811
    kube, fake = world
    await _secret(kube, "a-keys", k="tp-the-shared-key")
    await _secret(kube, "b-keys", copied="tp-the-shared-key", own="tp-b-own-key")
    await _secret(kube, "c-keys", k=" tp-the-shared-key\n")  # (as a file read it: the same key)
    async with Operator():
        await kube.create("tenants", _tenant("c", "c-keys", "2026-03-01T00:00:00Z"))
        await kube.create("tenants", _tenant("b", "b-keys", "2026-02-01T00:00:00Z"))
        await kube.create("tenants", _tenant("a", "a-keys", "2026-01-01T00:00:00Z"))

        await _until("a Applied", lambda: _reason(kube, "tenants", "a", "Applied"), timeout=WAIT)
        # b: its own key applied, the shared one not (Degraded: a request on it is a's)
        obj = await _until("b KeyConflict", lambda: _conflict(kube, "b", "a", 1), timeout=WAIT)
        assert "1 key(s) of Secret 'b-keys'" in _cond(obj, "Degraded")["message"]
        assert _cond(obj, "Ready")["status"] == "False"
        # c: no key of its own: revoked (fail closed), not in the controller
        await _until("c KeyConflict", lambda: _conflict(kube, "c", "a", 0), timeout=WAIT)
        await _until("c out of the controller", lambda: _none_of(fake, "c"), timeout=WAIT)
        assert "a" in fake.tenants and "b" in fake.tenants

        # a goes: the key is b's (the older of the two left), and c's conflict names b now
        await kube.delete("tenants", "a")
        await _until("a gone", lambda: _gone(kube, "tenants", "a"))
        obj = await _until("b Applied with both keys", lambda: _reason(kube, "tenants", "b", "Applied"), timeout=WAIT)
        assert obj["status"]["keys"] == 2
        await _until("c KeyConflict with b", lambda: _conflict(kube, "c", "b", 0), timeout=WAIT)
        assert "c" not in fake.tenants


async def _none_of(fake, name: str) -> bool:
    return name not in fake.tenants
