"""The operator as a user drives it, on kmock's Kubernetes emulator with a fake controller (no live server, so
cheap): resources applied, changed and deleted in different orders; what is left behind after each delete
(finalizers, the controller's entries) and what the statuses say on the way. tests/test_operator_e2e.py covers
the same against a live `tokenpool serve`."""

from __future__ import annotations

import base64

import pytest
import pytest_asyncio

kopf = pytest.importorskip("kopf")
kmock = pytest.importorskip("kmock")

from tests.kmock_util import SECRETS, FakeController, operator_world  # noqa: E402
from tests.operator_events import posted  # noqa: E402
from tests.test_operator_e2e import NS, Cluster, Operator, _cond, _obj, _until  # noqa: E402

FINALIZER = "tokenpool.dev/finalizer"


def _true(obj: dict | None) -> dict:
    """The condition that is True, or {}."""
    return next((c for c in ((obj or {}).get("status") or {}).get("conditions") or [] if c["status"] == "True"), {})


async def _reason(kube: Cluster, plural: str, name: str, reason: str):
    obj = await kube.get(plural, name)
    return obj if _true(obj).get("reason") == reason else None


async def _removing(kube: Cluster, plural: str, name: str):
    """The object if its finalizer says it cannot reach the controller (not a reconcile from before the delete)."""
    obj = await _reason(kube, plural, name, "ControllerUnavailable")
    return obj if obj and _true(obj)["message"].startswith("removing it from the controller:") else None


async def _gone(kube: Cluster, plural: str, name: str) -> bool:
    return await kube.get(plural, name) is None


@pytest_asyncio.fixture()
async def world(tmp_path, monkeypatch):
    # (FakeController read here, when the fixture runs: tests/test_k8s52_admin_token.py puts another in its place)
    async with operator_world(tmp_path, monkeypatch, controller=FakeController, secrets=SECRETS) as w:
        yield w.kube, w.fake


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_deletes_in_any_order_leave_nothing_behind(world):
    kube, fake = world
    async with Operator():
        await kube.create("gpupools", _obj("GPUPool", "default", {}))
        await kube.create("pooledmodels", _obj("PooledModel", "m", {"engine": {"kind": "pace"}}))
        await kube.create("tenants", _obj("Tenant", "t", {"keysSecretRef": {"name": "keys"}}))
        for plural, name in (("gpupools", "default"), ("pooledmodels", "m"), ("tenants", "t")):
            await _until(f"{plural}/{name} Ready", lambda p=plural, n=name: _reason(kube, p, n, {
                "gpupools": "EnginesReady", "pooledmodels": "Serving", "tenants": "Applied"}[p]))
        assert "m" in fake.models and "t" in fake.tenants

        # The pool first, under a model that uses it: the pool goes (its workers with it, by their owner
        # reference); the model says it has no pool, and stays served (its engines may be elsewhere).
        await kube.delete("gpupools", "default")
        await _until("the pool gone", lambda: _gone(kube, "gpupools", "default"))
        await _until("PoolNotFound", lambda: _reason(kube, "pooledmodels", "m", "PoolNotFound"))
        # The tenant's Secret, then the tenant: revoked, then gone.
        await kube.delete("secrets", "keys")
        await _until("SecretNotFound", lambda: _reason(kube, "tenants", "t", "SecretNotFound"))
        assert "t" not in fake.tenants
        await kube.delete("tenants", "t")
        await _until("the tenant gone", lambda: _gone(kube, "tenants", "t"))
        # The model, without a pool: its finalizer still removes it from the controller.
        await kube.delete("pooledmodels", "m")
        await _until("the model gone", lambda: _gone(kube, "pooledmodels", "m"))
        assert "m" not in fake.models and not fake.tenants


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_a_delete_while_the_controller_is_gone_says_so_and_finishes_when_it_is_back(world, monkeypatch):
    """The controller's Deployment deleted (or not ready) when a PooledModel and a Tenant are deleted: their
    finalizers cannot remove them from the controller, so the objects stay (a tenant's keys must not outlive it),
    and each says why (Degraded, ControllerUnavailable) instead of still showing Ready; once the controller is
    back, both finish and nothing is left."""
    from controller.operator import handlers

    monkeypatch.setattr(handlers, "UNAVAILABLE_RETRY_S", 1.0)  # (the finalizers try again a second apart)
    kube, fake = world
    async with Operator():
        await kube.create("gpupools", _obj("GPUPool", "default", {}))
        await kube.create("pooledmodels", _obj("PooledModel", "m", {"engine": {"kind": "pace"}}))
        await kube.create("tenants", _obj("Tenant", "t", {"keysSecretRef": {"name": "keys"}}))
        await _until("m Serving", lambda: _reason(kube, "pooledmodels", "m", "Serving"))
        await _until("t Applied", lambda: _reason(kube, "tenants", "t", "Applied"))
        fake.down = True
        for plural, name in (("pooledmodels", "m"), ("tenants", "t")):
            await kube.delete(plural, name)
            obj = await _until(f"{plural}/{name} ControllerUnavailable", lambda p=plural, n=name: _removing(kube, p, n))
            assert obj["metadata"].get("deletionTimestamp") and FINALIZER in obj["metadata"]["finalizers"]
            assert "503" in _cond(obj, "Degraded")["message"]
        assert "m" in fake.models and "t" in fake.tenants
        fake.down = False
        for plural, name in (("pooledmodels", "m"), ("tenants", "t")):
            await _until(f"{plural}/{name} gone", lambda p=plural, n=name: _gone(kube, p, n))
        assert "m" not in fake.models and "t" not in fake.tenants


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_two_models_of_one_served_name_deleted_in_either_order(world):
    """Two PooledModels asking for one served name: the older has it. Deleting the newer (Degraded NameConflict)
    leaves the older's model served; deleting the older hands the name to the one left, with its settings."""
    kube, fake = world
    async with Operator():
        await kube.create("gpupools", _obj("GPUPool", "default", {}))
        old = _obj("PooledModel", "a", {"engine": {"kind": "pace"}, "servedName": "shared", "priority": 1})
        await kube.create("pooledmodels", old)
        await _until("a Serving", lambda: _reason(kube, "pooledmodels", "a", "Serving"))
        for n in ("b", "c"):
            newer = _obj("PooledModel", n, {"engine": {"kind": "pace"}, "servedName": "shared", "priority": 2})
            newer["metadata"]["creationTimestamp"] = "2026-01-02T00:00:00Z"
            await kube.create("pooledmodels", newer)
            await _until(f"{n} NameConflict", lambda n=n: _reason(kube, "pooledmodels", n, "NameConflict"))
        await kube.delete("pooledmodels", "b")
        await _until("b gone", lambda: _gone(kube, "pooledmodels", "b"))
        assert fake.models["shared"]["priority"] == 1 and fake.count("DELETE", "/admin/models/shared") == 0
        await kube.delete("pooledmodels", "a")
        await _until("a gone", lambda: _gone(kube, "pooledmodels", "a"))
        await _until("c Serving", lambda: _reason(kube, "pooledmodels", "c", "Serving"))
        assert fake.models["shared"]["priority"] == 2
        await kube.delete("pooledmodels", "c")
        await _until("c gone", lambda: _gone(kube, "pooledmodels", "c"))
        assert not fake.models


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_a_pool_change_reaches_its_workers_and_a_lost_join_token_is_named(world):
    """A new image (what an upgrade does) and more GPUs per node reach the worker DaemonSet, which stays the pool's;
    the join token's Secret deleted: the pool says its workers cannot start, until the Secret is back."""
    kube, fake = world
    async with Operator():
        pool = _obj("GPUPool", "default", {"image": "ghcr.io/tokenpool/tokenpool:0.1.0"})
        await kube.create("gpupools", pool)
        await _until("pool Ready", lambda: _reason(kube, "gpupools", "default", "EnginesReady"))
        await kube.patch("gpupools", "default", {"metadata": {"generation": 2},
                                                 "spec": {"image": "ghcr.io/tokenpool/tokenpool:0.2.0", "gpusPerNode": 2}})

        async def rolled():
            ds = await kube.get("daemonsets", "tokenpool-workers-default")
            cs = ds["spec"]["template"]["spec"]["containers"]
            return ds if [c["image"] for c in cs] == ["ghcr.io/tokenpool/tokenpool:0.2.0"] * 2 else None

        ds = await _until("the new image on 2 workers", rolled)
        assert [(o["kind"], o["uid"]) for o in ds["metadata"]["ownerReferences"]] == [("GPUPool", pool["metadata"]["uid"])]
        await kube.delete("secrets", "tokenpool-join-token")
        await _until("JoinTokenNotFound", lambda: _reason(kube, "gpupools", "default", "JoinTokenNotFound"))
        await kube.create("secrets", {"apiVersion": "v1", "kind": "Secret",
                                      "metadata": {"name": "tokenpool-join-token", "namespace": NS},
                                      "data": {"token": base64.b64encode(b"tp-join").decode()}})
        await _until("pool Ready again", lambda: _reason(kube, "gpupools", "default", "EnginesReady"))


def _events(kube: Cluster, name: str, reason: str) -> list[dict]:
    """The Warning events the operator posted about object `name` with `reason`."""
    return [e for e in posted(kube, name, "Warning") if e.get("reason") == reason]


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_a_resource_turning_degraded_is_a_warning_event_once(world):
    """`kubectl describe` (or `kubectl get events`) shows why a resource is Degraded: a Warning event with the
    condition's reason when it turns Degraded, not one per periodic round while it stays so. (The operator posted
    none: kopf posts no log message unless told to.)"""
    kube, fake = world
    async with Operator():
        await kube.create("pooledmodels", _obj("PooledModel", "m", {"engine": {"kind": "pace"}, "poolRef": "nowhere"}))
        await kube.create("tenants", _obj("Tenant", "t", {"keysSecretRef": {"name": "missing"}}))
        await _until("PoolNotFound", lambda: _reason(kube, "pooledmodels", "m", "PoolNotFound"))
        await _until("SecretNotFound", lambda: _reason(kube, "tenants", "t", "SecretNotFound"))
        await _until("the events", _both_events(kube))
        await _until("two more rounds of each", _rounds(kube, fake, 2))  # still Degraded, for the same reason
        for name, reason, what, kind in (("m", "PoolNotFound", "'nowhere'", "PooledModel"),
                                         ("t", "SecretNotFound", "'missing'", "Tenant")):
            events = _events(kube, name, reason)
            assert len(events) == 1, (name, events)
            assert what in events[0]["message"] and events[0]["involvedObject"]["kind"] == kind


def _rounds(kube: Cluster, fake: FakeController, n: int):
    """A check that m's and t's rounds ran `n` more times each than when it was made: m's reads of its pool
    'nowhere', t's of the controller's tenants."""
    def counts() -> tuple[int, int]:
        pool = sum(1 for r in kube.k8s if r.method.value == "GET" and r.url.path.endswith("/gpupools/nowhere"))
        return pool, fake.count("GET", "/admin/tenants")

    before = counts()

    async def check() -> bool:
        return all(now >= b + n for now, b in zip(counts(), before))

    return check


def _both_events(kube: Cluster):
    async def check() -> bool:
        return bool(_events(kube, "m", "PoolNotFound")) and bool(_events(kube, "t", "SecretNotFound"))

    return check
