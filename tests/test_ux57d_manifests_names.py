"""A PooledModel's name on the API is its metadata.name when spec.servedName is unset, and the controller's model
names are 128 characters at most. A resource name of up to 253 characters was applied and then Degraded InvalidSpec
with 'spec.servedName: String should have at most 128 characters', a field the user had not set. It is refused when
applied now (a CEL rule), saying to set a shorter servedName; with servedName set, a long resource name is fine."""

from __future__ import annotations

import copy

import pytest

from controller.operator import builders as b
from tests.test_manifests import _apply_defaults, _cel_refusals, _crd_schema, _validate_cr

pytest.importorskip("celpy")

LONG = "the model's name on the API is metadata.name (no spec.servedName), 128 characters at most: set a shorter " \
       "spec.servedName"


@pytest.mark.parametrize("name,spec,refused", [
    ("m" * 128, {}, None),
    ("m" * 129, {}, LONG),
    ("m" * 253, {"servedName": "short"}, None),
])
def test_a_name_too_long_for_the_controller_is_refused_when_applied(name, spec, refused):
    spec = dict({"source": {"path": "m"}}, **spec)
    obj = {"apiVersion": "tokenpool.dev/v1alpha1", "kind": "PooledModel", "metadata": {"name": name},
           "spec": _apply_defaults(_crd_schema("PooledModel")["properties"]["spec"], copy.deepcopy(spec))}
    _validate_cr(obj)
    assert _cel_refusals(obj) == ([refused] if refused else [])
    if refused:  # what the operator would have said after the apply
        with pytest.raises(ValueError, match="servedName"):
            b.build_model_spec(name, spec)
    else:
        b.build_model_spec(name, spec)
