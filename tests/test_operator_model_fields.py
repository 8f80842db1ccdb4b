"""What a PooledModel sets of the controller's model besides its weights, engine and scaling: aliases (other names
clients use), toolCallParser (tool_choice "auto"), preload. Before, a model registered through the operator could
have none of them: tool_choice "auto" was a 400 on every PooledModel."""

from __future__ import annotations

import copy

import jsonschema
import pytest

from controller.operator import builders as b

PACE = {"engine": {"kind": "pace"}}


def test_the_fields_reach_the_controllers_model_and_a_change_registers_it_again_but_aliases():
    plain = b.build_model_spec("m", PACE)
    assert (plain["aliases"], plain["tool_call_parser"], plain["preload"]) == ([], None, False)
    full = b.build_model_spec("m", dict(PACE, aliases=["m-latest", "org/m"], toolCallParser="hermes", preload=True))
    assert (full["aliases"], full["tool_call_parser"], full["preload"]) == (["m-latest", "org/m"], "hermes", True)
    for field, value in (("toolCallParser", "hermes"), ("preload", True)):
        changed = b.build_model_spec("m", dict(PACE, **{field: value}))
        assert not b.same_registration(changed, b.reload_digest(plain)), field  # not a PATCH: registered again
    # aliases change in place (PATCH /admin/models/{name}): the same registration, a PATCH naming them
    named = b.build_model_spec("m", dict(PACE, aliases=["x"]))
    assert b.same_registration(named, b.reload_digest(plain)) and b.live_fields(named)["aliases"] == ["x"]
    shown = {**plain, "pin": False, "engines": []}  # (as GET /admin/models lists it)
    assert b.model_matches(plain, shown) and not b.model_matches(named, shown)
    # Unset, as every PooledModel before these fields: the digest in its status.appliedDigest is still its own.
    assert b.reload_digest(b.build_model_spec("m", dict(PACE, aliases=[], preload=False))) == b.reload_digest(plain)


@pytest.mark.parametrize("field,value,valid", [
    ("aliases", ["m-latest", "org/m:1"], True), ("aliases", ["a b"], False), ("aliases", ["x", "x"], False),
    ("toolCallParser", "hermes", True), ("toolCallParser", "mistral", False),
    ("preload", True, True), ("preload", "yes", False)])
def test_the_crd_checks_them(field, value, valid):
    from tests.test_manifests import OBJECTS, _validate_cr

    obj = copy.deepcopy(next(d for _, d in OBJECTS if d["kind"] == "PooledModel"))
    obj["spec"][field] = value
    if valid:
        _validate_cr(obj)
        b.build_model_spec(obj["metadata"]["name"], obj["spec"])
    else:
        with pytest.raises(jsonschema.ValidationError):
            _validate_cr(obj)
