"""Every Kubernetes API call the operator makes over a whole life (pools, models and tenants created, changed,
waiting, Degraded, deleted; the operator leaving a namespace being deleted), recorded by kmock's emulator, is one
that the operator's Role in manifests/base/rbac.yaml grants: on a real cluster a missing verb is a 403 that only
shows there. And the Role grants nothing the operator never calls."""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio

kopf = pytest.importorskip("kopf")
kmock = pytest.importorskip("kmock")

from tests.kmock_util import OPERATOR_KINDS, SECRETS, operator_world  # noqa: E402
from tests.test_manifests import _by_kind  # noqa: E402
from tests.test_operator_e2e import NS, Operator, _until  # noqa: E402
from tests.test_operator_lifecycle import _gone, _reason  # noqa: E402
from tests.test_operator_uninstall import _ready  # noqa: E402

PORTS = range(18800, 18850)


@pytest_asyncio.fixture()
async def world(tmp_path, monkeypatch):
    async with operator_world(tmp_path, monkeypatch, port_range=PORTS, kinds=(*OPERATOR_KINDS, "pods"),
                              resync_s=None, secrets=SECRETS) as w:
        yield w.kube, w.fake


# The operator's two clients: kopf's (aiohttp) and the official client's (controller/operator/kube.py).
OPERATOR_AGENTS = ("kopf/", "OpenAPI-Generator/")


def _calls(k8s) -> set[tuple[str, str, str]]:
    """(apiGroup, resource[/subresource], verb) of every request the emulator had (but discovery's)."""
    out = set()
    for r in k8s:
        if not r.headers.get("User-Agent", "").startswith(OPERATOR_AGENTS):
            continue  # the test's own requests (kubectl's)
        parts = r.url.path.strip("/").split("/")
        if parts[0] == "api":
            group, rest = "", parts[2:]
        elif parts[0] == "apis" and len(parts) > 3:
            group, rest = parts[1], parts[3:]
        else:
            continue  # /api, /apis, /apis/GROUP/VERSION: discovery (any authenticated user)
        if rest[:1] == ["namespaces"] and len(rest) > 2:
            rest = rest[2:]  # a namespaced resource
        if not rest or not rest[0]:
            continue  # /api/v1, /version...: discovery
        resource = rest[0] + (f"/{rest[2]}" if len(rest) > 2 else "")
        verb = {"GET": "list" if len(rest) == 1 else "get", "POST": "create", "PATCH": "patch", "PUT": "update",
                "DELETE": "delete"}[r.method.value]
        if verb in ("get", "list") and r.url.query.get("watch") in ("true", "1"):
            verb = "watch"
        out.add((group, resource, verb))
    return out


def _granted() -> dict[tuple[str, str], set[str]]:
    rules = _by_kind("Role", "tokenpool-operator")["rules"]
    return {(g, r): set(rule["verbs"]) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]}


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_the_role_grants_every_call_the_operator_makes(world):
    from tests.test_operator_uninstall import Namespace

    kube, fake = world
    ns = Namespace(kube)
    async with Operator():
        await _ready(kube)
        # changed
        await kube.patch("pooledmodels", "m", {"metadata": {"generation": 2}, "spec": {"replicas": {"max": 2}}})
        await kube.patch("tenants", "t", {"metadata": {"generation": 2}, "spec": {"priority": 3}})
        # the pool waiting on a worker pod that cannot pull its image (its pods listed; Degraded: a Warning event)
        fake.engines.clear()
        ds = f"/apis/apps/v1/namespaces/{NS}/daemonsets/tokenpool-workers-default"
        await kube.k8s.patch(ds, json={"status": {"desiredNumberScheduled": 1, "numberReady": 0}},
                             headers={"Content-Type": "application/merge-patch+json"})
        await kube.k8s.post(f"/api/v1/namespaces/{NS}/pods", json={
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "w", "namespace": NS, "labels": {
                "app.kubernetes.io/component": "worker", "tokenpool.dev/pool": "default"}},
            "status": {"containerStatuses": [{"name": "worker-0", "state": {"waiting": {
                "reason": "ImagePullBackOff", "message": "no such image"}}}]}})
        await kube.patch("gpupools", "default", {"metadata": {"generation": 2}, "spec": {"hostCacheGB": 8}})
        await _until("the pool ImagePullBackOff", lambda: _reason(kube, "gpupools", "default", "ImagePullBackOff"))
        await kube.delete("pooledmodels", "m")
        await _until("m gone", lambda: _gone(kube, "pooledmodels", "m"))
        ns.terminating = True  # the operator leaves a namespace being deleted: it releases t on its way out
    await asyncio.sleep(0)
    calls = _calls(kube.k8s)
    granted = _granted()
    missing = sorted(c for c in calls if c[2] not in granted.get((c[0], c[1]), set()))
    assert not missing, f"the operator calls these, which its Role does not grant (a 403 on a cluster): {missing}"
    assert ("", "events", "create") in calls and ("", "pods", "list") in calls  # (the scenario reached them)
    # Nothing it may write that it never writes (a read verb beside `list` of the same resources grants nothing more;
    # gpupools/finalizers `update` is what the API server asks of whoever sets the DaemonSet's blockOwnerDeletion).
    writes = {(g, r, v) for (g, r), verbs in granted.items() for v in verbs if v not in ("get", "list", "watch")}
    unused = sorted(writes - calls - {("tokenpool.dev", "gpupools/finalizers", "update")})
    assert not unused, f"the Role grants writes the operator never makes: {unused}"
