"""Tenant specs the operator could only fail on after `kubectl apply` (or apply silently to no effect) are refused by
the Tenant CRD itself, as the API server checks them: its openAPIV3Schema (JSON Schema draft 4 here) and its CEL
rules (cel-python), after the CRD's defaults. What the CRD lets through, the operator's builder takes.

- `rateLimits.burst` without `requestsPerSecond`: the controller reads burst only as the requests-per-second bucket's
  size, so the tenant was Ready with no limit at all while its spec said "40 at once".
- `sloClass: ""`: names no class; the controller refused it (400) and the Tenant went Degraded (Rejected) after the
  apply.
- `keysSecretRef.keys: [""]`: names no data key; the Tenant went Degraded (InvalidSecret) after the apply.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from controller.keys import hash_key
from controller.operator import builders as b

jsonschema = pytest.importorskip("jsonschema")
celpy = pytest.importorskip("celpy")

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"
CRD = yaml.safe_load((MANIFESTS / "crds" / "tenants.yaml").read_text())
SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
EXAMPLE = next(d for d in yaml.safe_load_all((MANIFESTS / "examples" / "tenant.yaml").read_text())
               if d and d["kind"] == "Tenant")
BURST_ALONE = "rateLimits.burst is the bucket of requestsPerSecond: set requestsPerSecond too (burst alone limits nothing)"


def _defaults(schema: dict, value):
    """The API server's structural defaulting: a missing property with a default gets it, recursively."""
    if isinstance(value, dict):
        for k, sub in (schema.get("properties") or {}).items():
            if k not in value and "default" in sub:
                value[k] = copy.deepcopy(sub["default"])
            if k in value:
                _defaults(sub, value[k])
    return value


def _refusals(obj: dict) -> list[str]:
    """What the API server refuses `obj` for: the schema's errors, then (schema-valid) the CEL rules' messages."""
    errors = [e.message for e in jsonschema.Draft4Validator(SCHEMA).iter_errors(obj)]
    if errors:
        return errors
    env, out = celpy.Environment(), []

    def walk(schema: dict, value) -> None:
        for r in schema.get("x-kubernetes-validations") or []:
            if not env.program(env.compile(r["rule"])).evaluate({"self": celpy.json_to_cel(value)}):
                out.append(r["message"])
        if isinstance(value, dict):
            for k, sub in (schema.get("properties") or {}).items():
                if k in value:
                    walk(sub, value[k])

    walk(SCHEMA, obj)
    return out


def _tenant(**spec) -> dict:
    obj = {"apiVersion": "tokenpool.dev/v1alpha1", "kind": "Tenant", "metadata": {"name": "team-b"},
           "spec": dict({"keysSecretRef": {"name": "team-b-keys"}}, **spec)}
    _defaults(SCHEMA["properties"]["spec"], obj["spec"])
    return obj


@pytest.mark.parametrize("spec,refused", [
    ({"rateLimits": {"burst": 40}}, BURST_ALONE),
    ({"rateLimits": {"burst": 40, "tokensPerMinute": 1000}}, BURST_ALONE),
    ({"rateLimits": {"requestsPerSecond": 20, "burst": 40}}, None),
    ({"rateLimits": {"requestsPerSecond": 20}}, None),
    ({"rateLimits": {"tokensPerMinute": 1000}}, None),
    ({}, None),
    ({"sloClass": ""}, "'' should be non-empty"),
    ({"sloClass": "interactive"}, None),
    ({"keysSecretRef": {"name": "team-b-keys", "keys": [""]}}, "'' should be non-empty"),
    ({"keysSecretRef": {"name": "team-b-keys", "keys": ["key-1"]}}, None),
])
def test_a_tenant_spec_that_would_fail_or_do_nothing_is_refused_when_applied(spec, refused):
    obj = _tenant(**spec)
    assert _refusals(obj) == ([refused] if refused else [])
    if not refused:  # what the CRD lets through, the operator makes a tenant of
        b.build_tenant_create("team-b", obj["spec"], [hash_key("tp-x")])


def test_the_example_tenant_is_still_accepted():
    obj = copy.deepcopy(EXAMPLE)
    _defaults(SCHEMA["properties"]["spec"], obj["spec"])
    assert _refusals(obj) == []


def test_burst_alone_limits_nothing_in_the_controller():
    """Why the rule: the controller's tenant with only a burst has no request bucket (no limit), as one without."""
    from controller.config import TenantSpec
    from controller.tenants import Tenant

    alone = Tenant(TenantSpec(name="t", rate={"burst": 2}))
    paired = Tenant(TenantSpec(name="t", rate={"requests_per_s": 1, "burst": 2}))
    assert alone.rps is None and paired.rps is not None and paired.rps.capacity == 2
