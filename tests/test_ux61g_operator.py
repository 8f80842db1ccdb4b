"""Deploying tokenpool on Kubernetes as a platform engineer does: what `kubectl apply` of a custom resource takes
must be what the operator and the controller can apply (else it is accepted, then Degraded InvalidSpec, or worse,
Ready and serving nothing), and a PooledModel applied before its GPUPool is served as soon as the pool is there
(kmock's emulator, a fake controller, the periodic rounds held off as with the default 30 s)."""

from __future__ import annotations

import copy
import time

import pytest
import pytest_asyncio

kopf = pytest.importorskip("kopf")
kmock = pytest.importorskip("kmock")

from controller.operator import builders as b  # noqa: E402
from tests.kmock_util import OPERATOR_KINDS, operator_world  # noqa: E402
from tests.test_manifests import _apply_defaults, _cel_refusals, _crd_schema, _validate_cr  # noqa: E402
from tests.test_operator_e2e import Operator, _obj, _until  # noqa: E402
from tests.test_operator_lifecycle import _reason  # noqa: E402

PORTS = range(26800, 26900)
INT32 = (-2**31, 2**31 - 1)


def _applied(kind: str, spec: dict) -> dict:
    """`spec` as the API server stores it (its structural defaults), in a resource of `kind`."""
    return {"apiVersion": "tokenpool.dev/v1alpha1", "kind": kind, "metadata": {"name": "m"},
            "spec": _apply_defaults(_crd_schema(kind)["properties"]["spec"], copy.deepcopy(spec))}


@pytest.mark.parametrize("priority,taken", [(INT32[1], True), (INT32[0], True), (INT32[1] + 1, False),
                                            (INT32[0] - 1, False), (10**12, False)])
@pytest.mark.parametrize("kind", ["PooledModel", "Tenant"])
def test_a_priority_the_controller_cannot_hold_is_refused_when_applied(kind, priority, taken):
    """The controller's priorities are 32-bit (Kubernetes' int32, as a PriorityClass's value): the CRDs took any
    integer, so `kubectl apply` of priority 3000000000 went through and the resource was Degraded InvalidSpec
    afterwards ("spec.priority: Input should be less than or equal to 2147483647"). Refused when applied now, and
    what the CRD takes, the operator applies."""
    import jsonschema

    spec = {"source": {"path": "m"}} if kind == "PooledModel" else {"keysSecretRef": {"name": "keys"}}
    obj = _applied(kind, {**spec, "priority": priority})
    build = (lambda: b.build_model_spec("m", obj["spec"])) if kind == "PooledModel" else (
        lambda: b.build_tenant_create("m", obj["spec"], []))
    if taken:
        _validate_cr(obj)
        assert _cel_refusals(obj) == []
        assert build()["priority"] == priority
    else:
        with pytest.raises(jsonschema.ValidationError, match="maximum|minimum"):
            _validate_cr(obj)
        with pytest.raises(ValueError, match="spec.priority"):
            build()


KV_OVER_ARENA = ("kvCacheGB is the KV region inside each GPU's arena of gpuBudgetGB: it must be less than gpuBudgetGB "
                 "(the rest holds the models' weights)")


@pytest.mark.parametrize("spec,refused", [
    ({"gpuBudgetGB": 60, "kvCacheGB": 80}, True),  # (GB of the GPU taken for the arena, in the wrong field)
    ({"gpuBudgetGB": 60, "kvCacheGB": 60}, True),
    ({"gpuBudgetGB": 60, "kvCacheGB": 8}, False),
    ({"gpuBudgetGB": 60}, False),
    ({"kvCacheGB": 80}, False),  # (the arena is the GPU's free memory: known on the node only)
    ({}, False),
])
def test_a_kv_region_that_leaves_no_room_for_weights_is_refused_when_applied(spec, refused):
    """A GPUPool whose kvCacheGB is not less than its gpuBudgetGB leaves each worker's arena no byte for a model's
    weights (controller.hosting: weight capacity = arena - KV): the pool was Ready (its engines joined) and every
    PooledModel waited for an engine for good, Progressing/Loading, nothing naming the pool's spec. Refused when
    applied, saying which two fields."""
    from controller.hosting import GpuSettings, HostedModels

    obj = _applied("GPUPool", spec)
    _validate_cr(obj)
    assert _cel_refusals(obj) == ([KV_OVER_ARENA] if refused else [])
    if "gpuBudgetGB" in spec and "kvCacheGB" in spec:  # what such a worker would have for weights
        hosted = HostedModels("cuda:0", GpuSettings.from_dict({"budget_bytes": int(spec["gpuBudgetGB"] * 1e9),
                                                               "kv_cache_gb": float(spec["kvCacheGB"])}), int(80e9))
        assert (hosted.weight_capacity <= 0) == refused


# --- a PooledModel applied before its GPUPool ---
@pytest_asyncio.fixture()
async def world(tmp_path, monkeypatch):
    """kmock's Kubernetes emulator and a fake controller (tests/kmock_util.py) on this file's ports."""
    async with operator_world(tmp_path, monkeypatch, port_range=PORTS, kinds=(*OPERATOR_KINDS, "pods"),
                              resync_s=None, secrets={"tokenpool-join-token": ("token", b"j")}) as w:
        yield w.kube, w.fake


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_model_applied_before_its_pool_is_served_once_the_pool_is_there(world, monkeypatch):
    """`kubectl apply -f model.yaml` then `-f pool.yaml` (or two Argo CD waves): the PooledModel says PoolNotFound,
    and once the GPUPool is there it is registered and Serving within a few seconds. It waited for its next timer
    round (30 s by default), unregistered (every request for it a 404) while `kubectl get` showed the pool Ready.
    A model whose pool is still missing stays PoolNotFound, and makes no admin call."""
    from tests.test_ux58c_operator_restart_tenant import hold_periodic_rounds

    kube, fake = world
    hold_periodic_rounds(monkeypatch)  # (rounds an hour apart: the suite's 1 s rounds would hide the wait)
    async with Operator():
        await kube.create("pooledmodels", _obj("PooledModel", "m", {"engine": {"kind": "pace"}}))
        await kube.create("pooledmodels", _obj("PooledModel", "other", {"engine": {"kind": "pace"}, "poolRef": "b"}))
        await _until("m PoolNotFound", lambda: _reason(kube, "pooledmodels", "m", "PoolNotFound"))
        await _until("other PoolNotFound", lambda: _reason(kube, "pooledmodels", "other", "PoolNotFound"))
        assert fake.models == {}
        started = time.monotonic()
        await kube.create("gpupools", _obj("GPUPool", "default", {}))
        await _until("m Serving", lambda: _reason(kube, "pooledmodels", "m", "Serving"), timeout=15)
        assert time.monotonic() - started < 10
        assert set(fake.models) == {"m"}
        posts = fake.count("POST", "/admin/models")
        await kube.create("pooledmodels", _obj("PooledModel", "third", {"engine": {"kind": "pace"}, "poolRef": "c"}))
        await _until("third PoolNotFound", lambda: _reason(kube, "pooledmodels", "third", "PoolNotFound"))
        assert await _reason(kube, "pooledmodels", "other", "PoolNotFound")  # (its pool, b, is still missing)
        assert fake.count("POST", "/admin/models") == posts and set(fake.models) == {"m"}
