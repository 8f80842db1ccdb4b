"""Uninstalling on kmock's Kubernetes emulator with a fake controller: `kubectl delete -k manifests/overlays/example`
deletes the namespace, and with it the controller, the operator and the custom resources at once. Nothing may stay
Terminating for want of a finalizer that no one will ever run (the objects, their CRDs, the namespace)."""

from __future__ import annotations

import pytest

kopf = pytest.importorskip("kopf")
kmock = pytest.importorskip("kmock")

from tests.test_operator_e2e import NS, Cluster, Operator, _obj, _until  # noqa: E402
from tests.test_operator_lifecycle import FINALIZER, _gone, _reason  # noqa: E402

# The lifecycle tests' world: kmock's emulator, a fake controller with one engine, the Secrets, the environment.
from tests.test_operator_lifecycle import world as lifecycle_world  # noqa: E402

world = lifecycle_world


class Namespace:
    """The watched namespace as the API server shows it to `GET /api/v1/namespaces/NS` (kmock's emulator does not
    keep namespaces: a reaction answers for it). `terminating`: being deleted, what `kubectl delete namespace` or
    `kubectl delete -k` of an overlay holding the namespace does first."""

    def __init__(self, kube: Cluster) -> None:
        self.terminating = False
        kube.k8s[f"get /api/v1/namespaces/{NS}"] << (lambda req: self.body())

    def body(self) -> dict:
        meta = {"name": NS, "uid": "ns-uid", "resourceVersion": "1"}
        if self.terminating:
            meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta, "spec": {"finalizers": ["kubernetes"]},
                "status": {"phase": "Terminating" if self.terminating else "Active"}}


async def _ready(kube: Cluster) -> None:
    await kube.create("gpupools", _obj("GPUPool", "default", {}))
    await kube.create("pooledmodels", _obj("PooledModel", "m", {"engine": {"kind": "pace"}}))
    await kube.create("tenants", _obj("Tenant", "t", {"keysSecretRef": {"name": "keys"}}))
    for plural, name, reason in (("gpupools", "default", "EnginesReady"), ("pooledmodels", "m", "Serving"),
                                 ("tenants", "t", "Applied")):
        await _until(f"{plural}/{name} {reason}", lambda p=plural, n=name, r=reason: _reason(kube, p, n, r))


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_in_a_namespace_being_deleted_a_finalizer_lets_go_when_the_controller_is_gone(world):
    """The namespace deleted: the controller's pod goes, and the finalizers that cannot reach it any more let the
    objects go (outside a namespace being deleted they hold on until it is back: test_operator_lifecycle)."""
    kube, fake = world
    ns = Namespace(kube)
    async with Operator():
        await _ready(kube)
        fake.down = True
        ns.terminating = True
        for plural, name in (("pooledmodels", "m"), ("tenants", "t"), ("gpupools", "default")):
            await kube.delete(plural, name)
        for plural, name in (("pooledmodels", "m"), ("tenants", "t"), ("gpupools", "default")):
            await _until(f"{plural}/{name} gone", lambda p=plural, n=name: _gone(kube, p, n))


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_the_operator_leaving_a_namespace_being_deleted_takes_its_finalizers_with_it(world):
    """The operator's pod stopped (SIGTERM) while its finalizers still wait (here a model's drain), or before the
    namespace's deletion reached its objects at all: on the way out it removes what the controller still has at
    once, and its finalizer from every object in a namespace being deleted. A plain restart (the namespace stays)
    leaves them for the next operator."""
    kube, fake = world
    ns = Namespace(kube)
    async with Operator():
        await _ready(kube)
        fake.engines[0]["models"] = [{"model": "m", "inflight": 1}]  # a request that will not finish in time
        await kube.delete("pooledmodels", "m")
        await _until("m draining", lambda: _reason(kube, "pooledmodels", "m", "Draining"))
    assert FINALIZER in (await kube.get("pooledmodels", "m"))["metadata"]["finalizers"]  # a restart: kept
    async with Operator():
        await _until("m draining again", lambda: _reason(kube, "pooledmodels", "m", "Draining"))
        await kube.delete("tenants", "t")
        await _until("t gone", lambda: _gone(kube, "tenants", "t"))  # (the controller answers: the finalizer ran)
        ns.terminating = True
    await _until("m gone", lambda: _gone(kube, "pooledmodels", "m"))
    assert "m" not in fake.models and not fake.tenants
    pool = await kube.get("gpupools", "default")  # not deleted yet: the namespace's deletion comes to it later
    assert FINALIZER not in (pool["metadata"].get("finalizers") or [])
    await kube.delete("gpupools", "default")
    assert await _gone(kube, "gpupools", "default")


def test_the_operators_role_may_read_its_namespace_and_nothing_more_of_it():
    """What the finalizers' letting go asks of the API server, granted by the base's Role (no ClusterRole)."""
    from tests.test_manifests import _by_kind

    rules = _by_kind("Role", "tokenpool-operator")["rules"]
    grants = {(g, r): set(rule["verbs"]) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]}
    assert grants[("", "namespaces")] == {"get"}
    assert {"list", "patch"} <= grants[("tokenpool.dev", "pooledmodels")]  # (cleanup: list, then the finalizer patch)
