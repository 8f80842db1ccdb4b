"""Scaling a PooledModel to zero. keepAlive (its weights off the GPU when idle): the CRD takes what Ollama's keep_alive
and Knative's retention take, the operator registers it with the controller and changes it in place (PATCH; the model
stays registered, its requests run on), and operators from before keepAlive see no change to make. replicas.max 0
(the scale subresource at 0, what KEDA's minReplicaCount 0 asks): on no engine while idle, loaded by a request."""

from __future__ import annotations

import copy

import jsonschema
import pytest

from controller.operator import builders as b

PACE = {"engine": {"kind": "pace"}}


@pytest.mark.parametrize("keep_alive,seconds", [(None, None), (0, 0.0), (90, 90.0), ("5m", 300.0), ("1h30m", 5400.0),
                                                 ("0s", 0.0), ("300", 300.0)])
def test_keep_alive_reaches_the_controllers_model(keep_alive, seconds):
    spec = dict(PACE, **({} if keep_alive is None else {"keepAlive": keep_alive}))
    assert b.build_model_spec("m", spec)["keep_alive"] == seconds


def test_a_keep_alive_change_is_made_in_place_and_old_digests_stay_valid():
    before = b.build_model_spec("m", PACE)
    after = b.build_model_spec("m", dict(PACE, keepAlive="5m"))
    # What every operator before keepAlive wrote to status.appliedDigest (no re-registration on upgrade).
    old = b.digest({k: v for k, v in before.items() if k not in ("slo", "priority", "replicas")})
    assert b.reload_digest(before) == old == b.reload_digest(after)
    assert b.same_registration(after, old)
    shown = dict(before, engines=["e0"])  # the controller's model, as GET /admin/models shows it
    assert b.model_matches(before, shown) and not b.model_matches(after, shown)
    assert b.live_fields(after)["keep_alive"] == 300.0  # the PATCH's body
    assert b.model_matches(after, dict(shown, keep_alive=300))


@pytest.mark.parametrize("value,valid", [(300, True), ("5m", True), ("1h30m", True), ("0", True), ("1.5h", True),
                                         (-1, False), ("-1", False), ("soon", False), ("5 m", False), (1.5, False),
                                         ("", False)])
def test_the_crd_takes_seconds_or_a_duration(value, valid):
    from tests.test_manifests import OBJECTS, _validate_cr

    obj = copy.deepcopy(next(d for _, d in OBJECTS if d["kind"] == "PooledModel"))
    obj["spec"]["keepAlive"] = value
    if valid:
        _validate_cr(obj)
        b.build_model_spec(obj["metadata"]["name"], obj["spec"])  # and the controller's parsing takes it too
    else:
        with pytest.raises(jsonschema.ValidationError):
            _validate_cr(obj)


def test_max_0_is_scaled_to_zero_and_a_request_still_loads_it():
    body = b.build_model_spec("m", dict(PACE, keepAlive="5m", replicas={"min": 0, "max": 0}))
    assert body["replicas"] == {"min": 0, "max": 1} and body["keep_alive"] == 0.0
    assert b.reload_digest(body) == b.reload_digest(b.build_model_spec("m", PACE))  # in place: a PATCH
    with pytest.raises(ValueError, match="pin"):
        b.build_model_spec("m", dict(PACE, pin=True, replicas={"min": 0, "max": 0}))


@pytest.mark.parametrize("replicas,valid", [({"min": 0, "max": 0}, True), ({"min": 0, "max": -1}, False)])
def test_the_crd_takes_max_0(replicas, valid):
    from tests.test_manifests import OBJECTS, _validate_cr

    obj = copy.deepcopy(next(d for _, d in OBJECTS if d["kind"] == "PooledModel"))
    obj["spec"].update(replicas=replicas, pin=False)
    if valid:
        _validate_cr(obj)
    else:
        with pytest.raises(jsonschema.ValidationError):
            _validate_cr(obj)


kopf = pytest.importorskip("kopf")
kmock = pytest.importorskip("kmock")

from tests.test_operator_e2e import Operator, _obj, _until  # noqa: E402
from tests.test_operator_lifecycle import _reason  # noqa: E402
from tests.test_operator_lifecycle import world as lifecycle_world  # noqa: E402

world = lifecycle_world


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_scaling_a_model_to_zero_through_its_pooled_model(world):
    """One operator for the three (each kopf run costs seconds): keepAlive registered and changed in place; a model
    of replicas.min 0 on no engine is Ready, reason ScaledToZero (KServe's minReplicas 0), not "Serving on 0
    engine(s)"; `kubectl scale pm m --replicas 0` (KEDA scaling in to its minReplicaCount 0) and back up. Every
    change a PATCH of the controller's model, which stays registered (a request in between still loads it)."""
    kube, fake = world
    async with Operator():
        await kube.create("gpupools", _obj("GPUPool", "default", {}))
        await kube.create("pooledmodels", _obj("PooledModel", "m", dict(PACE, keepAlive="5m",
                                                                          replicas={"min": 0, "max": 2})))
        await _until("m Serving", lambda: _reason(kube, "pooledmodels", "m", "Serving"))
        await _until("keep_alive 300 s", lambda: _at(fake, {"min": 0, "max": 2}, 300.0))
        await kube.patch("pooledmodels", "m", {"metadata": {"generation": 2}, "spec": {"keepAlive": 0}})
        await _until("keep_alive 0", lambda: _at(fake, {"min": 0, "max": 2}, 0.0))

        fake.models["m"]["engines"] = []  # the controller's autoscaler took it off its last engine
        obj = await _until("m ScaledToZero", lambda: _reason(kube, "pooledmodels", "m", "ScaledToZero"))
        assert obj["status"]["ready"] is True and obj["status"]["replicas"] == 0
        fake.models["m"]["engines"] = ["e0"]  # a request came
        await _until("m Serving again", lambda: _reason(kube, "pooledmodels", "m", "Serving"))

        await kube.patch("pooledmodels", "m", {"metadata": {"generation": 3}, "spec": {"replicas": {"max": 0}}})
        await _until("scaled to zero", lambda: _at(fake, {"min": 0, "max": 1}, 0.0))
        await kube.patch("pooledmodels", "m", {"metadata": {"generation": 4},
                                               "spec": {"replicas": {"max": 3}, "keepAlive": None}})
        await _until("scaled up, keep_alive unset", lambda: _at(fake, {"min": 0, "max": 3}, None))
    assert fake.count("POST", "/admin/models") == 1 and fake.count("DELETE", "/admin/models/m") == 0


async def _at(fake, replicas: dict, keep_alive) -> bool:
    m = fake.models.get("m") or {}
    return m.get("replicas") == replicas and "keep_alive" in m and m["keep_alive"] == keep_alive
