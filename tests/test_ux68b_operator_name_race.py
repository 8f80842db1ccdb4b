"""Two PooledModels created at once whose names clash (one's alias the other's name): each one's first round may run
before kopf has seen the other, so both were registered by rounds that each saw the names free. The one the
controller refused (409) said Degraded/Rejected with the controller's words, naming no model; and the name was
whichever's round came first, so the older one could be NameConflict, shut out by a newer one. Now the oldest has
the name, whichever registered first (as for served names): a newer one registered first lets it go, and each
status names the other PooledModel; a refused registration whose names were taken meanwhile says so.

The operator (kopf's KopfRunner) on kmock with tests/kmock_util's fake controller, refusing names as the controller
does (tests/test_ux57_operator_alias_conflict); and one round called as kopf calls it."""

from __future__ import annotations

import asyncio
import threading

import pytest

kopf = pytest.importorskip("kopf")
kmock = pytest.importorskip("kmock")

from controller.operator.admin import AdminClient  # noqa: E402
from tests.kmock_util import SECRETS, operator_world  # noqa: E402
from tests.test_operator_e2e import NS, Operator, _cond, _obj, _until  # noqa: E402
from tests.test_operator_lifecycle import _reason  # noqa: E402
from tests.test_ux57_operator_alias_conflict import _as_the_controller  # noqa: E402

PORTS = range(30200, 30250)
PACE = {"engine": {"kind": "pace"}}


def _claim(meta: dict) -> tuple:
    return meta["creationTimestamp"], NS, meta["name"], meta["uid"]


@pytest.mark.asyncio
@pytest.mark.timeout(90)
async def test_the_older_of_two_clashing_models_has_the_name_whichever_registered_first(tmp_path, monkeypatch):
    async with operator_world(tmp_path, monkeypatch, port_range=PORTS, secrets=SECRETS) as w:
        kube, fake = w.kube, w.fake
        _as_the_controller(fake)
        async with Operator():
            await kube.create("gpupools", _obj("GPUPool", "default", {}))
            # b's first round ran before a was seen: b is registered with the alias 'a'
            await kube.create("pooledmodels", _obj("PooledModel", "b", {**PACE, "aliases": ["a"]}))
            await _until("b Serving", lambda: _reason(kube, "pooledmodels", "b", "Serving"))
            # a was created first (the same second: the older by its name, as the API server's times tie)
            await kube.create("pooledmodels", _obj("PooledModel", "a", PACE))
            a = await _until("a Serving", lambda: _reason(kube, "pooledmodels", "a", "Serving"))
            b = await _until("b NameConflict", lambda: _reason(kube, "pooledmodels", "b", "NameConflict"))
            assert _cond(b, "Degraded")["message"] == (f"alias 'a' is already the name of model 'a' (PooledModel {NS}/a); "
                                                       "set other aliases")
            assert set(fake.models) == {"a"} and a["status"]["served"] == "a"
            assert fake.count("DELETE", "/admin/models/b") == 1  # b let its registration go


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_registration_refused_for_a_name_taken_meanwhile_names_who_took_it(tmp_path, monkeypatch):
    """Between a round's read of the controller's models and its POST, another PooledModel's round (which had not
    seen this one) registered a model answering to its name: not Rejected (the controller's 409) but WaitingForName,
    naming it: that one is newer, and lets the name go."""
    monkeypatch.setenv("TOKENPOOL_OPERATOR_RESYNC_S", "1")
    from controller.operator import handlers
    from controller.operator.kube import Kube
    from tests.kmock_util import FakeController

    async with operator_world(tmp_path, port_range=PORTS, kinds=("secrets",), engine=False) as w:
        fake = w.fake
        _as_the_controller(fake)
        r = await w.k8s.post(f"/apis/tokenpool.dev/v1alpha1/namespaces/{NS}/gpupools", json=_obj("GPUPool", "default", {}))
        assert r.status < 300
        kube = await asyncio.to_thread(Kube, str(w.kubeconfig))
        memo = kopf.Memo(kube=kube, admin=AdminClient(w.controller_url, "t"), applied={}, served={}, locks={})
        memo.locks_guard = threading.Lock()

        a, b = _obj("PooledModel", "a", PACE), _obj("PooledModel", "b", {**PACE, "aliases": ["a"]})

        class RegisteredMeanwhile(dict):
            """The fake's models: b's round registers b (alias 'a') right after a's round read them (none)."""

            def values(self):
                out = list(super().values())
                if "b" not in self:
                    self["b"] = {**FakeController._model(dict(name="b", slo={}, priority=0, replicas={})),
                                 "aliases": ["a"]}
                return out

        fake.models = RegisteredMeanwhile()
        b_meta = b["metadata"]
        b_meta["creationTimestamp"] = "2026-01-02T00:00:00Z"  # (newer than a)
        index = {"a": [(*_claim(a["metadata"]), "model name"), (*_claim(b_meta), "alias")],
                 "b": [(*_claim(b_meta), "model name")]}
        patch = kopf.Patch()
        await asyncio.to_thread(handlers._reconcile_model, name="a", namespace=NS, spec=a["spec"], status={},
                                meta=a["metadata"], patch=patch, memo=memo, runtime=None, model_names=index,
                                served_names={"a": [_claim(a["metadata"])], "b": [_claim(b_meta)]})
        st = {c["type"]: c for c in patch.status["conditions"]}
        assert st["Progressing"]["status"] == "True" and st["Progressing"]["reason"] == "WaitingForName", st
        assert st["Progressing"]["message"] == (f"model name 'a' is already an alias of model 'b' (PooledModel "
                                                f"{NS}/b, newer: it lets the name go)")
        assert set(fake.models) == {"b"}
