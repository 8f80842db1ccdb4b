"""The PooledModel CRD refuses an empty reference where the operator would misread it."""

from __future__ import annotations

import copy

import pytest

jsonschema = pytest.importorskip("jsonschema")

from tests.test_manifests import _apply_defaults, _crd_schema, _validate_cr  # noqa: E402


@pytest.mark.parametrize("spec", [
    {"poolRef": "", "engine": {"kind": "pace"}},  # the operator's GET of pool "" was the list of pools: "found"
    {"source": {"path": ""}},  # the CEL rule's has(source.path) took it: /models/ loaded as the model
    {"source": {"path": "m"}, "loraAdapters": [{"name": "a", "path": ""}]},
])
def test_an_empty_reference_is_refused_when_applied(spec):
    obj = {"apiVersion": "tokenpool.dev/v1alpha1", "kind": "PooledModel", "metadata": {"name": "m"},
           "spec": _apply_defaults(_crd_schema("PooledModel")["properties"]["spec"], copy.deepcopy(spec))}
    with pytest.raises(jsonschema.ValidationError, match="minLength"):
        _validate_cr(obj)


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_no_pool_is_found_under_an_empty_name(tmp_path):
    """(Where the CRD is older: the operator's own read of pool "" finds none, so the model says PoolNotFound.)"""
    import asyncio

    kmock = pytest.importorskip("kmock")
    from tests.test_operator_kube import NS, _emulated

    async with _emulated(tmp_path) as (kube, k8s):
        k8s.resources["tokenpool.dev/v1alpha1/gpupools"] = kmock.ResourceInfo(kind="GPUPool", namespaced=True)
        r = await k8s.post(f"/apis/tokenpool.dev/v1alpha1/namespaces/{NS}/gpupools", json={
            "apiVersion": "tokenpool.dev/v1alpha1", "kind": "GPUPool", "metadata": {"name": "default"}, "spec": {}})
        assert r.status < 300
        assert await asyncio.to_thread(kube.pool, NS, "default") is not None
        assert await asyncio.to_thread(kube.pool, NS, "") is None
