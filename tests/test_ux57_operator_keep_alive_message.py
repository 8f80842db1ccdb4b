"""A PooledModel's keepAlive the operator cannot take: its InvalidSpec message suggested '-1' (forever: the
controller's own parsing takes it), which the CRD refuses (minimum 0, and its pattern). The operator now takes what
the CRD takes, no more, and its message suggests only values the CRD takes; seen in the status on kmock."""

from __future__ import annotations

import copy
import re

import jsonschema
import pytest
import yaml

from controller.operator import builders as b
from tests.test_manifests import OBJECTS, _validate_cr

VALUES = [300, 0, "5m", "1h30m", "0", "1.5h", "250ms", -1, "-1", "-1s", "forever", "5 min", 1.5, "300us", "", True]


def _crd_takes(value) -> bool:
    obj = copy.deepcopy(next(d for _, d in OBJECTS if d["kind"] == "PooledModel"))
    obj["spec"]["keepAlive"] = value
    try:
        _validate_cr(obj)
    except jsonschema.ValidationError:
        return False
    return True


def _operator_takes(value) -> bool:
    try:
        b.build_model_spec("m", {"engine": {"kind": "pace"}, "keepAlive": value})
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("value", VALUES)
def test_the_operator_takes_what_the_crd_takes(value):
    assert _operator_takes(value) == _crd_takes(value)


def test_the_message_suggests_only_values_the_crd_takes():
    with pytest.raises(ValueError) as e:
        b.build_model_spec("m", {"engine": {"kind": "pace"}, "keepAlive": "5 min"})
    said = str(e.value)
    suggested = re.findall(r"'([^']*)'", said.split(":", 2)[2])  # (the quoted values after "bad duration '5 min'")
    assert suggested and "-1" not in said
    for value in suggested:
        assert _crd_takes(value), (value, said)


def test_the_pattern_is_the_crds():
    from load_tests.live_server import REPO_ROOT

    crd = yaml.safe_load((REPO_ROOT / "manifests/crds/pooledmodels.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert spec["keepAlive"]["pattern"] == b.KEEP_ALIVE_PATTERN and spec["keepAlive"]["minimum"] == 0


kopf = pytest.importorskip("kopf")
kmock = pytest.importorskip("kmock")

from tests.test_operator_e2e import Operator, _cond, _obj, _until  # noqa: E402
from tests.test_operator_lifecycle import _gone, _reason, world  # noqa: E402,F401 - (world: the fixture)


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_the_status_says_what_the_crd_takes(world):  # noqa: F811
    kube, fake = world
    async with Operator():
        await kube.create("gpupools", _obj("GPUPool", "default", {}))
        await kube.create("pooledmodels", _obj("PooledModel", "m", {"engine": {"kind": "pace"}, "keepAlive": "-1"}))
        obj = await _until("m InvalidSpec", lambda: _reason(kube, "pooledmodels", "m", "InvalidSpec"))
        said = _cond(obj, "Degraded")["message"]
        assert said.startswith("spec.keepAlive: bad duration '-1': use seconds (0 or more)") and "'5m'" in said, said
        assert "m" not in fake.models
        await kube.delete("pooledmodels", "m")  # (kopf's stop waits 5 s on the timer of a model left Degraded)
        await _until("m gone", lambda: _gone(kube, "pooledmodels", "m"))
