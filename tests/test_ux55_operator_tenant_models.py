"""A Tenant whose spec.models has a pattern no model answers to (a typo, "lama-*" for "llama-*", or a PooledModel
not registered yet): the operator showed it Ready/Applied like any other, while every request of that tenant for
those models was refused (the admin API's warning on POST /admin/tenants never reached the resource). Now the
Ready condition's reason is ModelsUnmatched (what `kubectl get tenants` prints) and its message names the patterns,
until a model answers to them: its name, an alias or a LoRA adapter's name. "*" is never one.

The operator itself (kopf's KopfRunner) on kmock's Kubernetes emulator, with the fake controller of
tests/kmock_util (tests/test_operator_lifecycle's `world`).
"""

from __future__ import annotations

import base64

import pytest

kopf = pytest.importorskip("kopf")
kmock = pytest.importorskip("kmock")

from tests.test_operator_e2e import NS, Operator, _cond, _obj, _until  # noqa: E402
from tests.test_operator_lifecycle import _reason, world  # noqa: E402,F401 - (world: the fixture)


@pytest.mark.asyncio
@pytest.mark.timeout(300)
async def test_a_tenant_whose_models_match_nothing_says_so_until_one_does(world):  # noqa: F811
    kube, fake = world
    async with Operator():
        # (the Tenant sees a model come or go at its timer's next round: 1 s here, unless the handlers were imported
        # earlier in this process at the default 30 s: see tests/test_operator_admin)
        wait = 2 * 30 + 20
        await kube.create("gpupools", _obj("GPUPool", "default", {}))
        await kube.create("pooledmodels", _obj("PooledModel", "pace-m", {"engine": {"kind": "pace"}}))
        await kube.create("tenants", _obj("Tenant", "t", {"keysSecretRef": {"name": "keys"},
                                                          "models": ["pace-*", "llama", "lama-*"]}))
        await kube.create("secrets", {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "all-keys", "namespace": NS},
                                      "data": {"k": base64.b64encode(b"tp-another-key").decode()}})  # (a key of its own)
        await kube.create("tenants", _obj("Tenant", "all", {"keysSecretRef": {"name": "all-keys"}}))  # models: ["*"]
        await _until("pace-m Serving", lambda: _reason(kube, "pooledmodels", "pace-m", "Serving"))

        # (pace-m is served: only the other two; a round before pace-m's registration named "pace-*" too)
        obj = await _until("t ModelsUnmatched", lambda: _unmatched(kube, "t", "['llama', 'lama-*']"), timeout=wait)
        ready = _cond(obj, "Ready")
        assert ready["status"] == "True" and obj["status"]["keys"] == 1  # (its keys work: pace-m is served to it)
        assert "['llama', 'lama-*']" in ready["message"] and "match no model" in ready["message"], ready
        assert "t" in fake.tenants and fake.tenants["t"]["models"] == ["pace-*", "llama", "lama-*"]
        await _until("all Applied", lambda: _reason(kube, "tenants", "all", "Applied"))

        # A model answering to "llama" by an alias, and to "lama-*" by its name: the tenant is Applied.
        await kube.create("pooledmodels", _obj("PooledModel", "lama-3", {"engine": {"kind": "pace"},
                                                                          "aliases": ["llama"]}))
        obj = await _until("t Applied", lambda: _reason(kube, "tenants", "t", "Applied"), timeout=wait)
        assert _cond(obj, "Ready")["message"] == "1 key(s)"

        # Gone again (the model deleted): said again.
        await kube.delete("pooledmodels", "lama-3")
        await _until("t ModelsUnmatched again", lambda: _unmatched(kube, "t", "['llama', 'lama-*']"), timeout=wait)


async def _unmatched(kube, name: str, patterns: str):
    """The Tenant once its Ready condition names exactly `patterns` as unmatched."""
    obj = await _reason(kube, "tenants", name, "ModelsUnmatched")
    return obj if obj and f"spec.models {patterns} match no model" in _cond(obj, "Ready")["message"] else None
