"""A PooledModel whose fields have the wrong shape (`slo: "fast"`, `engine: "pace"`, a LoRA adapter without a path):
the CRD's schema refuses them, but an older CRD left installed beside a newer operator passes them, and the operator's
builder raised TypeError/KeyError -- a handler traceback kopf retried for ever, the status saying nothing. Now each is
Degraded/InvalidSpec naming the field, as other bad specs are; seen on kmock (which takes any spec)."""

from __future__ import annotations

import pytest

from controller.operator import builders as b

PACE = {"engine": {"kind": "pace"}}
BAD = {
    "slo": ({**PACE, "slo": "fast"}, 'spec.slo: must be an object, got "fast"'),
    "engine": ({"engine": "pace"}, 'spec.engine: must be an object, got "pace"'),
    "lora": ({"source": {"path": "/m"}, "loraAdapters": [{"name": "x"}]},
             "spec.loraAdapters[0].path: must be a string, got null"),
    "replicas": ({**PACE, "replicas": {"min": "1"}, "pin": True}, 'spec.replicas.min: must be an integer, got "1"'),
    "pin": ({**PACE, "pin": "false"}, 'spec.pin: must be true or false, got "false"'),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_the_builder_names_the_field(case):
    spec, said = BAD[case]
    with pytest.raises(ValueError) as e:
        b.build_model_spec("m", spec)
    assert str(e.value) == said


kopf = pytest.importorskip("kopf")
kmock = pytest.importorskip("kmock")

from tests.test_operator_e2e import Operator, _cond, _obj, _until  # noqa: E402
from tests.test_operator_lifecycle import _gone, _reason, world  # noqa: E402,F401 - (world: the fixture)


@pytest.mark.asyncio
@pytest.mark.timeout(90)
async def test_the_status_says_invalid_spec(world):  # noqa: F811
    kube, fake = world
    async with Operator():
        await kube.create("gpupools", _obj("GPUPool", "default", {}))
        for case in ("slo", "engine", "lora"):
            await kube.create("pooledmodels", _obj("PooledModel", case, BAD[case][0]))
        for case in ("slo", "engine", "lora"):
            obj = await _until(f"{case} InvalidSpec", lambda c=case: _reason(kube, "pooledmodels", c, "InvalidSpec"),
                               timeout=15)
            assert _cond(obj, "Degraded")["message"] == BAD[case][1]
        assert not fake.models
        for case in ("slo", "engine", "lora"):  # (kopf's stop waits 5 s on the timer of a model left Degraded)
            await kube.delete("pooledmodels", case)
        for case in ("slo", "engine", "lora"):
            await _until(f"{case} gone", lambda c=case: _gone(kube, "pooledmodels", c))
