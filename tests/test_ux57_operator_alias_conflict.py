"""A PooledModel one of whose names (its servedName, an alias, a LoRA adapter's) is already another model's: the
controller refuses it (409), and the PooledModel showed Degraded/Rejected with the controller's words, which name no
model. It is Degraded/NameConflict now, as a clash of servedNames is, naming the model that has the name and the
PooledModel (or configuration) that model is; once that model lets the name go, it is registered.

The operator itself (kopf's KopfRunner) on kmock's Kubernetes emulator, with the fake controller of
tests/kmock_util (tests/test_operator_lifecycle's `world`), here refusing names as the controller does.
"""

from __future__ import annotations

import pytest

kopf = pytest.importorskip("kopf")
kmock = pytest.importorskip("kmock")

from tests.test_operator_e2e import NS, Operator, _cond, _obj, _until  # noqa: E402
from tests.test_operator_lifecycle import _reason, world  # noqa: E402,F401 - (world: the fixture)


def _as_the_controller(fake) -> None:
    """The fake keeps a model's aliases and refuses a name another model answers to (controller/service.py's
    `add_model` and its PATCH of aliases: 409)."""
    from kmock import Response

    plain_model, plain_add, plain_patch = fake._model, fake._add, fake._patch

    def names(m: dict) -> set[str]:
        return {m["name"], *(m.get("aliases") or []), *(lm["name"] for lm in m.get("lora_modules") or [])}

    def refused(taken: set[str]):
        return Response(status=409, payload={"error": {"message": "already served under these names (a model, an "
                                                       f"alias or an adapter): {', '.join(sorted(taken))}"}})

    def add(store, body, out):
        if store is fake.models and (taken := names(body) & set().union(*map(names, store.values()))):
            return refused(taken)
        return plain_add(store, body, out)

    def patch(store, req):
        name = fake._name(req)
        if store is fake.models and "aliases" in req.data:
            others = set().union(*(names(m) for n, m in store.items() if n != name))
            if taken := set(req.data["aliases"]) & others:
                return refused(taken)
        return plain_patch(store, req)

    fake._model = lambda body: {**plain_model(body), "aliases": body.get("aliases") or []}
    fake._add, fake._patch = add, patch


async def _conflict(kube, name: str, *said: str):
    obj = await _reason(kube, "pooledmodels", name, "NameConflict")
    return obj if obj and all(s in _cond(obj, "Degraded")["message"] for s in said) else None


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_a_name_another_model_answers_to_is_a_name_conflict_naming_it(world):  # noqa: F811
    kube, fake = world
    _as_the_controller(fake)
    async with Operator():
        await kube.create("gpupools", _obj("GPUPool", "default", {}))
        await kube.create("pooledmodels", _obj("PooledModel", "a", {"engine": {"kind": "pace"}, "aliases": ["x"]}))
        await _until("a Serving", lambda: _reason(kube, "pooledmodels", "a", "Serving"))
        # b's alias is a's name; c's name is a's alias
        await kube.create("pooledmodels", _obj("PooledModel", "b", {"engine": {"kind": "pace"}, "aliases": ["a"]}))
        await kube.create("pooledmodels", _obj("PooledModel", "c", {"engine": {"kind": "pace"}, "servedName": "x"}))
        obj = await _until("b NameConflict", lambda: _conflict(kube, "b", "alias 'a'", "model 'a'", f"{NS}/a"))
        assert _cond(obj, "Degraded")["message"] == (f"alias 'a' is already the name of model 'a' (PooledModel "
                                                     f"{NS}/a); set other aliases")
        obj = await _until("c NameConflict", lambda: _conflict(kube, "c", "model name 'x'", "model 'a'"))
        assert "is already an alias of model 'a' (PooledModel" in _cond(obj, "Degraded")["message"]
        assert set(fake.models) == {"a"}

        # a gives up its alias: c is registered (at the timer's next round)
        await kube.patch("pooledmodels", "a", {"spec": {"aliases": []}})
        await _until("c Serving", lambda: _reason(kube, "pooledmodels", "c", "Serving"))
        assert fake.models["a"]["aliases"] == [] and "x" in fake.models
