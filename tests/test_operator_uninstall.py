"""Uninstalling on kmock's Kubernetes emulator with a fake controller. Nothing may stay Terminating for want of a
finalizer that no one will ever run (the objects, their CRDs, the namespace): the README's uninstall (the custom
resources first, while the operator runs; then the overlay, the namespace, the CRDs), a one-step
`kubectl delete -k manifests/overlays/example` (which deletes the operator and so must delete no custom resource),
and a namespace deleted under a running operator (best effort: its finalizers let go)."""

from __future__ import annotations

import pytest

kopf = pytest.importorskip("kopf")
kmock = pytest.importorskip("kmock")

from tests.test_manifests import MANIFESTS, _docs, _kustomize_files  # noqa: E402
from tests.test_operator_e2e import GV, NS, Cluster, Operator, _obj, _until  # noqa: E402
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
        self.forbidden = False  # True: the operator's Role is gone (403)
        kube.k8s[f"get /api/v1/namespaces/{NS}"] << (lambda req: self.body())

    def body(self):
        from kmock import Response

        if self.forbidden:
            return Response(status=403, payload={"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                                 "reason": "Forbidden", "code": 403, "message": "forbidden"})
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


PLURALS = {"GPUPool": "gpupools", "PooledModel": "pooledmodels", "Tenant": "tenants"}
# What the operator acts with: deleting any of them (or the namespace that holds them) takes its rights or its pod.
OPERATOR = {(k, "tokenpool-operator") for k in ("ServiceAccount", "Role", "RoleBinding", "Deployment")}


def _objects(kustomization) -> list[dict]:
    """The objects a kustomization renders (their kind and name are what a delete needs)."""
    return [d for f in _kustomize_files(kustomization) for d in _docs(f)]


class Uninstall:
    """`kubectl delete -k` of a kustomization as a cluster carries it out, in the worst order it may take: kubectl
    sends its deletes one after another without waiting, and the namespace controller deletes a namespace's content
    in no set order, so the operator may lose its rights (its Role, RoleBinding or ServiceAccount deleted) and its pod
    before it has released any finalizer. Then every custom resource the deletes reach is deleted: by name, by its
    namespace's deletion, by its CRD's. (kmock's emulator carries out a write whatever a reaction answers, so the
    operator without rights is an operator stopped, its last reads refused.)"""

    def __init__(self, kube: Cluster, ns: Namespace) -> None:
        self.kube, self.ns = kube, ns

    @staticmethod
    def takes_the_operator(objects: list[dict]) -> bool:
        return bool({(d["kind"], d["metadata"]["name"]) for d in objects} & OPERATOR
                    or any(d["kind"] == "Namespace" for d in objects))

    async def _all(self, plural: str) -> list[str]:
        r = await self.kube.k8s.get(f"/apis/{GV}/namespaces/{NS}/{plural}")
        return [o["metadata"]["name"] for o in (await r.json())["items"]]

    async def delete_all(self) -> None:
        """`kubectl -n tokenpool delete pooledmodels,tenants,gpupools --all` (the operator's own rights untouched)."""
        for plural in PLURALS.values():
            for name in await self._all(plural):
                await self.kube.delete(plural, name)

    async def delete_k(self, objects: list[dict]) -> None:
        doomed: set[tuple[str, str]] = set()
        for d in objects:
            if d["kind"] == "Namespace":
                self.ns.terminating = True
                doomed |= {(p, n) for p in PLURALS.values() for n in await self._all(p)}
            elif d["kind"] == "CustomResourceDefinition":
                doomed |= {(d["spec"]["names"]["plural"], n) for n in await self._all(d["spec"]["names"]["plural"])}
            elif d["kind"] in PLURALS:
                doomed.add((PLURALS[d["kind"]], d["metadata"]["name"]))
        for plural, name in sorted(doomed):
            if await self.kube.get(plural, name) is not None:
                await self.kube.delete(plural, name)

    async def terminating(self) -> list[str]:
        return [f"{p}/{n}" for p in PLURALS.values() for n in await self._all(p)
                if (await self.kube.get(p, n))["metadata"].get("deletionTimestamp")]


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_deleting_the_overlay_in_one_step_leaves_nothing_terminating(world):
    """`kubectl delete -k manifests/overlays/example` with custom resources still there (a user who skipped the
    first step): it deletes the operator, so it must delete no custom resource (none of them, not their namespace,
    not their CRDs), or those would stay Terminating for good. They stay, inert, until the operator is back
    (`kubectl apply -k` of the overlay again): then the uninstall goes on in order."""
    kube, fake = world
    ns = Namespace(kube)
    uninstall, overlay = Uninstall(kube, ns), _objects(MANIFESTS / "overlays" / "example")
    async with Operator():
        await _ready(kube)
        assert uninstall.takes_the_operator(overlay)
        ns.forbidden = True  # its Role gone first: on its way out it cannot even see its namespace
    await uninstall.delete_k(overlay)
    assert await uninstall.terminating() == []
    for plural, name in (("pooledmodels", "m"), ("tenants", "t")):
        assert FINALIZER in (await kube.get(plural, name))["metadata"]["finalizers"]
    assert FINALIZER not in ((await kube.get("gpupools", "default"))["metadata"].get("finalizers") or [])
    ns.forbidden = False
    async with Operator():
        await uninstall.delete_all()
        for plural, name in (("pooledmodels", "m"), ("tenants", "t"), ("gpupools", "default")):
            await _until(f"{plural}/{name} gone", lambda p=plural, n=name: _gone(kube, p, n))
    assert not fake.models and not fake.tenants


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_the_readmes_uninstall_leaves_nothing_behind(world):
    """The README's uninstall, step by step: the custom resources (`kubectl -n tokenpool delete
    pooledmodels,tenants,gpupools --all --wait`, while the operator runs their finalizers: the controller loses
    the model and the tenant), then the overlay, the namespace and the CRDs."""
    kube, fake = world
    uninstall = Uninstall(kube, Namespace(kube))
    async with Operator():
        await _ready(kube)
        await uninstall.delete_all()
        for plural, name in (("pooledmodels", "m"), ("tenants", "t"), ("gpupools", "default")):
            await _until(f"{plural}/{name} gone", lambda p=plural, n=name: _gone(kube, p, n))
        assert not fake.models and not fake.tenants
    await uninstall.delete_k(_objects(MANIFESTS / "overlays" / "example"))
    await uninstall.delete_k([{"kind": "Namespace", "metadata": {"name": "tokenpool"}}])
    await uninstall.delete_k(_objects(MANIFESTS / "crds"))
    assert {p: await uninstall._all(p) for p in PLURALS.values()} == {p: [] for p in PLURALS.values()}


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
