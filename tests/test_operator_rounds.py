"""One reconcile round of the operator's handlers, called as kopf calls them, against kmock's Kubernetes emulator
(the GPUPool, the Secrets) and a fake controller (tests/kmock_util.FakeController, on kmock too), counting the
admin-API requests each round makes."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import threading
import uuid

import pytest

kmock = pytest.importorskip("kmock")
kopf = pytest.importorskip("kopf")

from controller.operator.admin import AdminClient  # noqa: E402
from tests.kmock_util import FakeController, operator_world  # noqa: E402

NS = "tp"
GV = "tokenpool.dev/v1alpha1"


@pytest.fixture()
def handlers(monkeypatch):
    # Importing the handlers fixes their timers' interval for this process: the e2e test's (see test_operator_kube)
    monkeypatch.setenv("TOKENPOOL_OPERATOR_RESYNC_S", "1")
    from controller.operator import handlers

    return handlers


@contextlib.asynccontextmanager
async def _world(tmp_path):
    """(memo, emulator, fake controller): a memo as the operator's startup makes it, on both."""
    from controller.operator.kube import Kube

    async with operator_world(tmp_path, kinds=("secrets",), engine=False) as w:
        kube = await asyncio.to_thread(Kube, str(w.kubeconfig))
        memo = kopf.Memo(kube=kube, admin=AdminClient(w.controller_url, "t"), applied={}, served={}, locks={})
        memo.locks_guard = threading.Lock()
        yield memo, w.k8s, w.fake


async def _create(k8s, path: str, body: dict) -> None:
    r = await k8s.post(path, json=body)
    assert r.status < 300, await r.text()


def _meta(name: str, generation: int = 1, uid: str | None = None) -> dict:
    return {"name": name, "namespace": NS, "uid": uid or str(uuid.uuid4()), "generation": generation,
            "creationTimestamp": "2026-01-01T00:00:00Z"}


def _index(name: str, meta: dict) -> dict:
    """What kopf's index of served (or tenant) names holds for one object asking for `name`."""
    return {name: [(meta["creationTimestamp"], NS, meta["name"], meta["uid"])]}


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_model_round_reads_the_controllers_models_once(tmp_path, handlers):
    """Each round (the first, which registers; a converged one; a rename) makes one GET of /admin/models: the
    configuration check, the rename check and the comparison all read the same answer."""
    async with _world(tmp_path) as (memo, k8s, fake):
        await _create(k8s, f"/apis/{GV}/namespaces/{NS}/gpupools",
                      {"apiVersion": GV, "kind": "GPUPool", "metadata": {"name": "default", "namespace": NS}, "spec": {}})
        fake.models["cfg"] = dict(FakeController._model(
            {"name": "cfg", "path": "/m", "slo": {}, "priority": 0, "replicas": {}}), source="config")
        meta, status = _meta("m"), {}

        async def round_(spec: dict, served: str, runtime=None) -> dict:
            before = fake.count("GET", "/admin/models")
            patch = kopf.Patch()
            await asyncio.to_thread(handlers._reconcile_model, name="m", namespace=NS, spec=spec, status=status,
                                    meta=meta, patch=patch, memo=memo, runtime=runtime,
                                    served_names=_index(served, meta))
            assert fake.count("GET", "/admin/models") - before == 1, spec
            status.update(patch.status)
            return status

        spec = {"engine": {"kind": "pace"}}
        st = await round_(spec, "m")
        assert set(fake.models) == {"cfg", "m"} and st["served"] == "m"
        await round_(spec, "m")  # converged
        meta["generation"] = 2
        spec = {"engine": {"kind": "pace"}, "servedName": "m2"}
        st = await round_(spec, "m2")  # renamed: the old name goes, the new one comes
        assert set(fake.models) == {"cfg", "m2"} and st["served"] == "m2"
        meta["generation"] = 3
        spec = {"engine": {"kind": "pace"}, "servedName": "cfg"}  # the configuration's own name: refused
        st = await round_(spec, "cfg")
        assert [c["reason"] for c in st["conditions"] if c["status"] == "True"] == ["NameConflict"]
    # m, then m2 (after its dry run in place of m: the rename asked first): nothing registered twice
    assert fake.count("POST", "/admin/models") == 3


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_tenant_round_reads_the_controllers_tenants_once(tmp_path, handlers):
    """Each round of a Tenant (the first, which adds it; a converged one; a change, which replaces it) makes one
    GET of /admin/tenants: the name-conflict check and the comparison read the same answer."""
    async with _world(tmp_path) as (memo, k8s, fake):
        await _create(k8s, f"/api/v1/namespaces/{NS}/secrets", {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "keys", "namespace": NS},
            "data": {"k": base64.b64encode(b"tp-a-key").decode()}})
        meta, status = _meta("team"), {}

        async def round_(spec: dict) -> dict:
            before = fake.count("GET", "/admin/tenants")
            patch = kopf.Patch()
            await asyncio.to_thread(handlers.reconcile_tenant, name="team", namespace=NS, spec=spec, status=status,
                                    meta=meta, patch=patch, memo=memo, tenant_names=_index("team", meta))
            assert fake.count("GET", "/admin/tenants") - before == 1, spec
            status.update(patch.status)
            return status

        spec = {"keysSecretRef": {"name": "keys"}}
        st = await round_(spec)
        assert "team" in fake.tenants and st["keys"] == 1
        await round_(spec)  # converged
        meta["generation"] = 2
        st = await round_(dict(spec, priority=4))  # changed in place
        assert fake.tenants["team"]["priority"] == 4
    assert fake.count("POST", "/admin/tenants") == 1 and fake.count("PATCH", "/admin/tenants/team") == 1


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_tenants_limits_and_keys_change_in_place(tmp_path, handlers):
    """A Tenant's models, rate limits, maxConcurrent, priority or sloClass changed: a PATCH (its keys keep working,
    its usage and requests in flight carry over; a DELETE then POST answered its keys 401 in between). Its keys
    changed (the Secret rotated): a PATCH with the new key hashes (it was a DELETE then a POST, whose gap answered
    every key 401). A tenant changed behind the operator's back is set back."""
    async with _world(tmp_path) as (memo, k8s, fake):
        secret = f"/api/v1/namespaces/{NS}/secrets"
        await _create(k8s, secret, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "keys", "namespace": NS},
                                    "data": {"k": base64.b64encode(b"tp-a-key").decode()}})
        meta, status = _meta("team"), {}

        async def round_(spec: dict) -> dict:
            patch = kopf.Patch()
            await asyncio.to_thread(handlers.reconcile_tenant, name="team", namespace=NS, spec=spec, status=status,
                                    meta=meta, patch=patch, memo=memo, tenant_names=_index("team", meta))
            status.update(patch.status)
            return {c["type"]: c for c in status["conditions"] if c["status"] == "True"}

        def calls() -> tuple[int, int, int]:
            return (fake.count("POST", "/admin/tenants"), fake.count("PATCH", "/admin/tenants/team"),
                    fake.count("DELETE", "/admin/tenants/team"))

        spec = {"keysSecretRef": {"name": "keys"}}
        await round_(spec)
        assert calls() == (1, 0, 0)
        meta["generation"] = 2
        spec = {"keysSecretRef": {"name": "keys"}, "models": ["a-*"], "rateLimits": {"requestsPerSecond": 2},
                "maxConcurrent": 3, "priority": 7}
        st = await round_(spec)
        assert calls() == (1, 1, 0) and set(st) == {"Ready"}
        t = fake.tenants["team"]
        assert (t["models"], t["rate"]["requests_per_s"], t["max_concurrent"], t["priority"]) == (["a-*"], 2, 3, 7)
        await round_(spec)  # converged
        assert calls() == (1, 1, 0)
        fake.tenants["team"]["priority"] = 0  # changed by hand
        await round_(spec)
        assert calls() == (1, 2, 0) and fake.tenants["team"]["priority"] == 7
        r = await k8s.patch(f"{secret}/keys", json={"data": {"k": base64.b64encode(b"tp-rotated").decode()}},
                            headers={"Content-Type": "application/merge-patch+json"})
        assert r.status < 300
        await round_(spec)  # the keys rotated: in place too
        assert calls() == (1, 3, 0) and fake.tenants["team"]["priority"] == 7
        sent = [r.data for r in fake.handler if r.url.path.startswith("/admin/tenants") and r.method.value != "GET"]
        assert sent[-1]["key_hashes"] != sent[0]["key_hashes"] and len(sent[-1]["key_hashes"]) == 1
        meta["generation"] = 3
        await round_(dict(spec, priority=1))  # and the limits again, without the keys
        sent = [r.data for r in fake.handler if r.url.path == "/admin/tenants/team" and r.method.value == "PATCH"]
        assert calls() == (1, 4, 0) and "key_hashes" not in sent[-1]


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_model_that_failed_to_load_is_degraded_with_the_controllers_reason(tmp_path, handlers):
    """A model registered with weights no engine could load (a wrong path, too big for any GPU) is shown by the
    controller with load_error: the PooledModel says so (Degraded, LoadFailed, the reason), not 'waiting for an
    engine' for ever; once an engine has it, it is Ready."""
    async with _world(tmp_path) as (memo, k8s, fake):
        await _create(k8s, f"/apis/{GV}/namespaces/{NS}/gpupools",
                      {"apiVersion": GV, "kind": "GPUPool", "metadata": {"name": "default", "namespace": NS}, "spec": {}})
        meta, status, spec = _meta("m"), {}, {"source": {"path": "no-such-dir"}}

        async def round_() -> dict:
            patch = kopf.Patch()
            await asyncio.to_thread(handlers._reconcile_model, name="m", namespace=NS, spec=spec, status=status,
                                    meta=meta, patch=patch, memo=memo, runtime=None, served_names=_index("m", meta))
            status.update(patch.status)
            return {c["type"]: c for c in status["conditions"] if c["status"] == "True"}

        await round_()  # registered
        why = "engine w0: [Errno 2] No such file or directory: '/models/no-such-dir/config.json'"
        fake.models["m"].update(engines=[], load_error=why)
        st = await round_()
        assert set(st) == {"Degraded"} and st["Degraded"]["reason"] == "LoadFailed", st
        assert why in st["Degraded"]["message"] and status["registered"] and not status["ready"]
        fake.models["m"].update(engines=["e1"], load_error=None)
        st = await round_()
        assert set(st) == {"Ready"} and status["ready"]


def _pin_switches(fake: FakeController) -> None:
    """The controller's POST /admin/models/{name}/pin and /unpin on the fake (which kmock_util's does not answer)."""
    import re

    from kmock import Response

    def switch(req):
        if fake.down:
            return Response(status=503, payload="no endpoints available")
        name, on = req.url.path[len("/admin/models/"):].rsplit("/", 1)
        if name not in fake.models:
            return Response(status=404, payload={"error": {"message": f"no model {name!r}"}})
        fake.models[name]["pin"] = on == "pin"
        return Response(status=200, payload={"name": name, "pinned": on == "pin"})

    fake.handler["post", re.compile(r"/admin/models/.+/(pin|unpin)$")] << switch


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_pinned_model_is_pinned_in_the_controller(tmp_path, handlers):
    """spec.pin keeps the model resident 'whatever the autoscaler decides': the controller's pin (weights never
    evicted for another model's), not only replicas.min 1, which lets LRU eviction unload it. A change of pin is made
    in place (POST .../pin or .../unpin: it re-registered the model, draining and reloading it); a model unpinned
    through the admin API behind the operator's back (the listing shows the pin of now) is pinned again."""
    async with _world(tmp_path) as (memo, k8s, fake):
        _pin_switches(fake)
        await _create(k8s, f"/apis/{GV}/namespaces/{NS}/gpupools",
                      {"apiVersion": GV, "kind": "GPUPool", "metadata": {"name": "default", "namespace": NS}, "spec": {}})
        meta, status = _meta("m"), {}

        async def round_(spec: dict) -> None:
            patch = kopf.Patch()
            await asyncio.to_thread(handlers._reconcile_model, name="m", namespace=NS, spec=spec, status=status,
                                    meta=meta, patch=patch, memo=memo, runtime=None, served_names=_index("m", meta))
            status.update(patch.status)

        await round_({"engine": {"kind": "pace"}, "pin": True})
        assert fake.models["m"]["pin"] is True
        fake.models["m"]["pin"] = False  # (unpinned through the admin API)
        await round_({"engine": {"kind": "pace"}, "pin": True})
        assert fake.models["m"]["pin"] is True and fake.count("POST", "/admin/models/m/pin") == 1
        meta["generation"] = 2
        await round_({"engine": {"kind": "pace"}, "pin": False})
        assert fake.models["m"]["pin"] is False and fake.count("POST", "/admin/models/m/unpin") == 1
        await round_({"engine": {"kind": "pace"}, "pin": False})  # converged: nothing more
        meta["generation"] = 3
        await round_({"engine": {"kind": "pace"}, "pin": True, "replicas": {"min": 0, "max": 2}})
        assert fake.models["m"]["pin"] is True and fake.models["m"]["replicas"] == {"min": 1, "max": 2}
        assert [c["reason"] for c in status["conditions"] if c["status"] == "True"] == ["Serving"]
        # a restarted operator (no memo) whose status lags behind the pin change (its digest: of pin false): nothing
        from controller.operator import builders as b

        memo.applied.clear()
        spec = {"engine": {"kind": "pace"}, "pin": True, "replicas": {"min": 0, "max": 2}}
        status["appliedDigest"] = b.reload_digest(dict(b.build_model_spec("m", spec), pin=False))
        await round_(spec)
    assert fake.count("POST", "/admin/models") == 1  # registered once: never removed and registered again
    assert fake.count("DELETE", "/admin/models/m") == 0 and fake.count("POST", "/admin/models/m/drain") == 0
    assert fake.count("POST", "/admin/models/m/pin") == 2 and fake.count("POST", "/admin/models/m/unpin") == 1
    assert fake.count("PATCH", "/admin/models/m") == 1  # (the replica bounds, once; a pin alone is no PATCH)
