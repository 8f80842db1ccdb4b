"""manifests/: every object validates against the Kubernetes schemas (kubernetes-validate, strict), custom
resources against their CRD's own openAPIV3Schema (jsonschema), and the pieces agree with each other and with
the operator's builders (labels, ports, defaults, tokens)."""

from __future__ import annotations

import copy
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

kv = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")

from controller.config import ServerConfig  # noqa: E402
from controller.keys import hash_key, verify_key  # noqa: E402
from controller.operator import builders as b  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
K8S_VERSION = "1.30"  # the oldest Kubernetes these manifests are meant for (CEL validation rules, policy/v1)
CUSTOM_GROUPS = ("tokenpool.dev/", "monitoring.coreos.com/")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kustomize_files(d: Path) -> list[Path]:
    """The resource files a kustomization pulls in, recursively (what `kubectl kustomize` reads)."""
    k = yaml.safe_load((d / "kustomization.yaml").read_text())
    out: list[Path] = []
    for r in k.get("resources", []) + k.get("components", []):
        p = (d / r).resolve()
        out += _kustomize_files(p) if p.is_dir() else [p]
    return out


KUSTOMIZE_FILES = ("kustomization.yaml", "kustomizeconfig.yaml")  # kustomize's own, not objects
ALL_FILES = sorted({p for p in MANIFESTS.rglob("*.yaml") if p.name not in KUSTOMIZE_FILES
                    and p.parent.name != "example"})
# What a user applies, each on its own (README): the CRDs once per cluster, then the overlay (controller and
# operator), then custom resources (the examples). Uninstalled in the reverse order.
LAYERS = (MANIFESTS / "crds", MANIFESTS / "overlays" / "example", MANIFESTS / "examples")
OBJECTS = [(f.relative_to(MANIFESTS).as_posix(), d) for f in ALL_FILES for d in _docs(f)]
CRDS = {d["spec"]["names"]["kind"]: d for _, d in OBJECTS if d["kind"] == "CustomResourceDefinition"}


def _by_kind(kind: str, name: str | None = None) -> dict:
    found = [d for _, d in OBJECTS if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def _crd_schema(kind: str) -> dict:
    return CRDS[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _validate_cr(obj: dict) -> None:
    """A custom resource against its CRD's schema (OpenAPI v3.0 is JSON Schema draft 4 plus x-kubernetes-*,
    which draft 4 ignores; metadata is the API server's business, but for what a CRD may say of metadata.name)."""
    schema = copy.deepcopy(_crd_schema(obj["kind"]))
    jsonschema.Draft4Validator(schema).validate(obj)
    _list_types(schema, obj, "")


def _list_types(schema: dict, value, where: str) -> None:
    """What the API server checks beside the schema's draft-4 part: a map list's keys and a set list's items
    are unique (x-kubernetes-list-type)."""
    if isinstance(value, dict):
        for k, sub in (schema.get("properties") or {}).items():
            if k in value:
                _list_types(sub, value[k], f"{where}.{k}")
    elif isinstance(value, list):
        kind = schema.get("x-kubernetes-list-type")
        seen = [tuple(v.get(k) for k in schema["x-kubernetes-list-map-keys"]) for v in value] if kind == "map" else (
            [yaml.safe_dump(v) for v in value] if kind == "set" else [])
        dup = {x for x in seen if seen.count(x) > 1}
        if dup:
            raise jsonschema.ValidationError(f"{where}: duplicate {kind} list entries {sorted(map(str, dup))}")
        for v in value:
            _list_types(schema.get("items") or {}, v, f"{where}[]")


def test_every_file_is_in_a_kustomization():
    pulled = {f for layer in LAYERS for f in _kustomize_files(layer)}
    for component in (MANIFESTS / "components").iterdir():  # optional: an overlay names them (see the example's)
        pulled |= set(_kustomize_files(component))
    assert pulled == set(ALL_FILES), set(ALL_FILES) ^ pulled


def _with_monitoring(overlay: Path) -> Path:
    """`overlay` (a copy) with the ServiceMonitor component its kustomization offers in a comment."""
    k = overlay / "kustomization.yaml"
    text = k.read_text()
    on = text.replace("# components:\n#   - ../../components/servicemonitor", "components:\n  - ../../components/servicemonitor")
    assert on != text, "the example overlay no longer offers the ServiceMonitor component"
    k.write_text(on)
    return overlay


@pytest.mark.parametrize("where,obj", [o for o in OBJECTS if not o[1]["apiVersion"].startswith(CUSTOM_GROUPS)],
                         ids=lambda x: x if isinstance(x, str) else f"{x['kind']}/{x['metadata']['name']}")
def test_builtin_kinds_validate(where, obj):
    kv.validate(obj, K8S_VERSION, strict=True)


def test_validator_is_not_vacuous():
    bad = copy.deepcopy(_by_kind("Deployment", "tokenpool-controller"))
    bad["spec"]["replicas"] = "one"
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSION, strict=True)
    bad = copy.deepcopy(_by_kind("NetworkPolicy", "tokenpool-workers"))
    bad["spec"]["ingres"] = bad["spec"].pop("ingress")  # strict: unknown fields fail
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSION, strict=True)


@pytest.mark.parametrize("kind", ["GPUPool", "PooledModel", "Tenant"])
def test_crd_shape(kind):
    crd = CRDS[kind]
    v = crd["spec"]["versions"][0]
    assert crd["metadata"]["name"] == f"{crd['spec']['names']['plural']}.tokenpool.dev"
    assert crd["spec"]["names"]["shortNames"] and "status" in v["subresources"]
    schema = v["schema"]["openAPIV3Schema"]
    _structural(schema, "")
    for col in v["additionalPrinterColumns"]:
        if not col["jsonPath"].startswith(".metadata"):
            assert _resolve(schema, col["jsonPath"].split("[")[0]), col
    st = schema["properties"]["status"]["properties"]
    assert {"observedGeneration", "conditions"} <= set(st)
    assert st["conditions"]["items"]["required"] == ["type", "status"]



def _undescribed(schema: dict, where: str):
    for k, sub in (schema.get("properties") or {}).items():
        if k != "metadata":
            if not (sub.get("description") or "").strip():
                yield f"{where}.{k}"
            yield from _undescribed(sub, f"{where}.{k}")
    if "items" in schema:
        yield from _undescribed(schema["items"], f"{where}[]")


@pytest.mark.parametrize("kind", ["GPUPool", "PooledModel", "Tenant"])
def test_kubectl_explain_describes_every_field(kind):
    """`kubectl explain pooledmodel.spec.slo` prints the field's description: every field of spec and status
    has one (an empty one printed `<empty>`)."""
    assert list(_undescribed(_crd_schema(kind), kind)) == []


def _column(obj: dict, path: str):
    """What kubectl's JSONPath `path` (a printer column's: fields, and one [?(@.F=="V")] filter) finds in obj."""
    node = obj
    for part in re.findall(r'\.(\w+)|\[\?\(@\.(\w+)=="([^"]*)"\)\]', path):
        field, key, value = part
        if field:
            node = (node or {}).get(field) if isinstance(node, dict) else None
        else:
            node = next((x for x in node or [] if x.get(key) == value), None)
    return node


@pytest.mark.parametrize("kind", ["GPUPool", "PooledModel", "Tenant"])
def test_kubectl_get_says_why_a_resource_is_not_ready(kind):
    """`kubectl get pooledmodels` shows Ready False and, beside it, the reason the operator wrote (NameConflict,
    PoolNotFound, SecretNotFound...), not only False; `kubectl describe` has the message."""
    cols = {c["name"]: c["jsonPath"] for c in CRDS[kind]["spec"]["versions"][0]["additionalPrinterColumns"]}
    obj = {"status": {"conditions": b.build_conditions("Degraded", "SomeReason", "why", 1, None, "2026-01-01T00:00:00Z")}}
    assert (_column(obj, cols["Ready"]), _column(obj, cols["Reason"])) == ("False", "SomeReason")
    obj["status"]["conditions"] = b.build_conditions("Ready", "Serving", "", 2, obj["status"]["conditions"], "x")
    assert (_column(obj, cols["Ready"]), _column(obj, cols["Reason"])) == ("True", "Serving")


def test_pooledmodel_scale_subresource():
    v = CRDS["PooledModel"]["spec"]["versions"][0]
    scale = v["subresources"]["scale"]
    schema = v["schema"]["openAPIV3Schema"]
    assert _resolve(schema, scale["specReplicasPath"])["type"] == "integer"
    assert _resolve(schema, scale["statusReplicasPath"])["type"] == "integer"
    assert _resolve(schema, scale["labelSelectorPath"])["type"] == "string"


JUNCTORS = ("allOf", "anyOf", "oneOf", "not")
# What a junctor's schemas may not set (apiextensions' structural schema rules): they only validate values.
NOT_IN_JUNCTORS = ("type", "description", "default", "additionalProperties", "nullable")
INT_OR_STRING = [{"type": "integer"}, {"type": "string"}]  # allowed beside x-kubernetes-int-or-string


def _structural(s: dict, where: str) -> None:
    """What the API server demands of a structural schema: every node has a type; the schemas under allOf, anyOf,
    oneOf and not only validate values (no type, description, default, additionalProperties, nullable or
    x-kubernetes-* extension) and name only fields the structural part declares at the same place."""
    assert "type" in s or s.get("x-kubernetes-preserve-unknown-fields") or s.get("x-kubernetes-int-or-string"), where
    for k, sub in (s.get("properties") or {}).items():
        _structural(sub, f"{where}.{k}")
    if "items" in s:
        _structural(s["items"], f"{where}[]")
    if isinstance(s.get("additionalProperties"), dict):
        _structural(s["additionalProperties"], f"{where}{{}}")
    for j in JUNCTORS:
        if j == "anyOf" and s.get("x-kubernetes-int-or-string") and s[j] == INT_OR_STRING:
            continue  # the one pattern that sets types under a junctor
        for i, sub in enumerate(_branches(s, j)):
            _junctor_branch(sub, s, f"{where}.{j}[{i}]")


def _branches(s: dict, junctor: str) -> list[dict]:
    return ([s[junctor]] if junctor == "not" else s[junctor]) if junctor in s else []


def _junctor_branch(branch: dict, outer: dict, where: str) -> None:
    bad = [k for k in branch if k in NOT_IN_JUNCTORS or k.startswith("x-kubernetes-")]
    assert not bad, f"{where}: {bad} not allowed under a junctor"
    for k in branch.get("required", []):
        assert k in (outer.get("properties") or {}), f"{where}: required {k!r} is not a declared field"
    for k, sub in (branch.get("properties") or {}).items():
        assert k in (outer.get("properties") or {}), f"{where}: {k!r} is not a declared field"
        _junctor_branch(sub, outer["properties"][k], f"{where}.{k}")
    if "items" in branch:
        assert "items" in outer, f"{where}: items where the structural schema has none"
        _junctor_branch(branch["items"], outer["items"], f"{where}[]")
    for j in JUNCTORS:
        for i, sub in enumerate(_branches(branch, j)):
            _junctor_branch(sub, outer, f"{where}.{j}[{i}]")


@pytest.mark.parametrize("branch", [
    {"type": "object"},
    {"properties": {"source": {"description": "x"}}},
    {"properties": {"nowhere": {"required": ["x"]}}},
    {"required": ["nowhere"]},
])
def test_structural_check_is_not_vacuous(branch):
    schema = copy.deepcopy(_crd_schema("PooledModel"))
    schema["properties"]["spec"]["anyOf"] = [branch]
    with pytest.raises(AssertionError):
        _structural(schema, "")


def _resolve(schema: dict, path: str) -> dict | None:
    node = schema
    for part in path.strip(".").split("."):
        node = (node.get("properties") or {}).get(part)
        if node is None:
            return None
    return node


@pytest.mark.parametrize("kind", ["GPUPool", "PooledModel", "Tenant"])
def test_examples_validate_against_their_crd(kind):
    examples = [d for _, d in OBJECTS if d["kind"] == kind and d["apiVersion"] == "tokenpool.dev/v1alpha1"]
    assert examples, f"no example {kind} in manifests/examples"
    for e in examples:
        _validate_cr(e)


def test_gpupool_takes_worker_resources_as_kubernetes_quantities():
    pool = copy.deepcopy(next(d for _, d in OBJECTS if d["kind"] == "GPUPool"))
    pool["spec"]["workerResources"] = {"requests": {"cpu": 2, "memory": "40Gi", "ephemeral-storage": "1.5e9"},
                                       "limits": {"memory": "80Gi", "cpu": "500m"}}
    _validate_cr(pool)
    ds = b.build_worker_daemonset("default", "tokenpool", pool["spec"])
    kv.validate(ds, K8S_VERSION, strict=True)


@pytest.mark.parametrize("kind,path,value", [
    ("GPUPool", ("spec", "gpusPerNode"), 0),
    ("GPUPool", ("spec", "policy"), "fastest"),
    ("GPUPool", ("spec", "kvCacheGB"), 0),
    ("GPUPool", ("spec", "workerResources", "requests", "cpu"), [2]),
    ("GPUPool", ("spec", "workerResources", "requests"), "2"),
    ("GPUPool", ("spec", "workerResources", "requests", "cpu"), "two"),  # not a quantity: the DaemonSet is refused
    ("GPUPool", ("spec", "workerResources", "limits", "memory"), "8 GB"),
    ("PooledModel", ("spec", "slo", "ttftSeconds"), 0),
    ("PooledModel", ("spec", "engine", "kind"), "vllm"),
    ("PooledModel", ("spec", "engine", "maxModelLen"), 0),
    ("PooledModel", ("spec", "source", "memoryGB"), 2e6),
    ("PooledModel", ("spec", "source", "memoryGB"), 0),  # (weights placed as taking no memory)
    ("PooledModel", ("spec", "replicas", "min"), -1),
    ("PooledModel", ("spec", "loraAdapters"), [{"name": "a b", "path": "x"}]),
    ("PooledModel", ("spec", "loraAdapters"), [{"name": "a"}]),
    ("PooledModel", ("spec", "loraAdapters"), [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]),
    ("GPUPool", ("metadata", "name"), "p" * 64),  # its workers' label value
    ("Tenant", ("metadata", "name"), "t" * 65),  # the controller's tenant names
    ("Tenant", ("spec", "rateLimits", "requestsPerSecond"), -5),
    ("Tenant", ("spec", "maxConcurrent"), 0),
])
def test_crd_schemas_reject_bad_values(kind, path, value):
    obj = copy.deepcopy(next(d for _, d in OBJECTS if d["kind"] == kind))
    node = obj
    for p in path[:-1]:
        node = node.setdefault(p, {})
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        _validate_cr(obj)


CEL_MACROS = (".all(", ".exists(", ".exists_one(", ".map(", ".filter(")
CEL_PER_RULE_LIMIT = 1_000_000  # the API server's per-call cost limit (apiextensions: PerCallLimit)


def _cel_rules(schema: dict, where: str = ""):
    for rule in schema.get("x-kubernetes-validations") or []:
        yield where, schema, rule["rule"]
    for k, sub in (schema.get("properties") or {}).items():
        yield from _cel_rules(sub, f"{where}.{k}")
    if "items" in schema:
        yield from _cel_rules(schema["items"], f"{where}[]")


def _lists(schema: dict):
    """Every array schema at or under `schema`."""
    if schema.get("type") == "array":
        yield schema
    for sub in (schema.get("properties") or {}).values():
        yield from _lists(sub)
    if "items" in schema:
        yield from _lists(schema["items"])


@pytest.mark.parametrize("kind", ["GPUPool", "PooledModel", "Tenant"])
def test_cel_rules_fit_the_api_servers_cost_budget(kind):
    """The API server estimates each rule's worst case when the CRD is created and refuses the CRD when a rule
    is over budget. A list without maxItems is as long as a 3 MiB request allows (about a million items): a
    macro over it (two nested: a million squared) is over; bounded, the estimate is maxItems to the nesting."""
    for where, node, rule in _cel_rules(_crd_schema(kind)):
        depth = sum(rule.count(m) for m in CEL_MACROS)
        if not depth:
            continue
        lists = list(_lists(node))
        assert lists, (where, rule)  # a macro needs a list (or map) under the rule
        unbounded = [x for x in lists if "maxItems" not in x]
        assert not unbounded, f"{kind}{where}: {rule!r} iterates a list without maxItems"
        assert max(x["maxItems"] for x in lists) ** depth <= CEL_PER_RULE_LIMIT, (where, rule)


NEEDS_PATH = "an llm model needs source.path, its weights' directory (only engine.kind: pace runs without weights)"


@pytest.mark.parametrize("spec,valid", [
    ({}, False),  # engine.kind defaults to llm: its weights must be somewhere
    ({"source": {}}, False),
    ({"source": {"memoryGB": 3}, "engine": {"kind": "llm", "dtype": "bf16"}}, False),
    ({"engine": {"dtype": "bf16"}, "source": {"path": "m"}}, True),
    ({"source": {"path": "/abs/m"}}, True),
    ({"engine": {"kind": "pace"}}, True),  # a paced stand-in: no weights
    ({"engine": {"kind": "pace"}, "source": {"path": "m"}}, True),
])
def test_an_llm_pooledmodel_needs_a_source_path(spec, valid):
    """Refused when applied (the operator could only report InvalidSpec afterwards), as the API server does it:
    its defaults first, then the schema and its rules, with a message that names what is missing. What the CRD
    lets through, the operator's builder takes."""
    obj = {"apiVersion": "tokenpool.dev/v1alpha1", "kind": "PooledModel", "metadata": {"name": "m"},
           "spec": _apply_defaults(_crd_schema("PooledModel")["properties"]["spec"], copy.deepcopy(spec))}
    _validate_cr(obj)
    if valid:
        assert _cel_refusals(obj) == []
        b.build_model_spec("m", spec)
    else:
        assert _cel_refusals(obj) == [NEEDS_PATH]
        with pytest.raises(ValueError, match="path is required"):
            b.build_model_spec("m", spec)


def _cel_refusals(obj: dict) -> list[str]:
    """The messages of the CRD's CEL rules (x-kubernetes-validations) that `obj` breaks, evaluated as the API
    server does after its defaults: each rule with `self` the value where the rule stands."""
    celpy = pytest.importorskip("celpy")  # (cel-python: the CEL of the Kubernetes API server, in Python)
    env, out = celpy.Environment(), []

    def walk(schema: dict, value) -> None:
        for r in schema.get("x-kubernetes-validations") or []:
            if not env.program(env.compile(r["rule"])).evaluate({"self": celpy.json_to_cel(value)}):
                out.append(r["message"])
        if isinstance(value, dict):
            for k, sub in (schema.get("properties") or {}).items():
                if k in value:
                    walk(sub, value[k])
        elif isinstance(value, list) and "items" in schema:
            for v in value:
                walk(schema["items"], v)

    walk(_crd_schema(obj["kind"]), obj)
    return out


PIN_AT_ZERO = "a pinned model keeps a replica: replicas.max 0 (kubectl scale --replicas 0) needs pin: false"


@pytest.mark.parametrize("spec,refused", [
    ({"replicas": {"min": 3, "max": 2}}, "replicas.min must not exceed replicas.max"),
    ({"replicas": {"min": 0, "max": 0}}, None),  # scaled to zero
    ({"replicas": {"min": 0, "max": 0}, "pin": True}, PIN_AT_ZERO),
    ({"replicas": {"min": 1, "max": 1}, "pin": True}, None),
    ({"engine": {"kind": "pace"}, "loraAdapters": [{"name": "a", "path": "p"}]},
     "a paced model (engine.kind pace) has no weights for LoRA adapters"),
    ({"loraAdapters": [{"name": "a", "path": "p"}]}, None),
    ({"aliases": ["m"]}, "an alias repeats the model's own name (spec.servedName, else metadata.name)"),
    ({"servedName": "s", "aliases": ["s", "t"]}, "an alias repeats the model's own name (spec.servedName, else metadata.name)"),
    ({"servedName": "s", "aliases": ["m"]}, None),  # (the resource's name is free when servedName is set)
])
def test_a_pooledmodel_the_controller_would_refuse_is_refused_when_applied(spec, refused):
    """`kubectl apply` (or `kubectl scale`) of a PooledModel the operator could only mark InvalidSpec afterwards is
    refused by the API server's CEL rules with a message that says what to change; what the rules let through,
    the operator's builder takes."""
    spec = dict({"source": {"path": "m"}}, **spec)
    obj = {"apiVersion": "tokenpool.dev/v1alpha1", "kind": "PooledModel", "metadata": {"name": "m"},
           "spec": _apply_defaults(_crd_schema("PooledModel")["properties"]["spec"], copy.deepcopy(spec))}
    _validate_cr(obj)  # (the schema's own checks pass: only the rule refuses it)
    assert _cel_refusals(obj) == ([refused] if refused else [])
    if refused:
        with pytest.raises(ValueError):
            b.build_model_spec("m", spec)
    else:
        b.build_model_spec("m", spec)


# Admin-API fields a PATCH changes in place (builders.LIVE_FIELDS) -> the PooledModel spec fields they come from.
LIVE_SPEC_FIELDS = {"slo": "slo", "priority": "priority", "replicas": "replicas", "keep_alive": "keepAlive",
                    "aliases": "aliases"}


def test_the_crd_says_which_changes_reload_a_model():
    """`kubectl explain pooledmodel.spec.aliases` must not say a change registers it again (its requests drained,
    its weights unloaded) when the operator changes it in place, nor the other way round."""
    assert set(LIVE_SPEC_FIELDS) == set(b.LIVE_FIELDS)
    props = _crd_schema("PooledModel")["properties"]["spec"]["properties"]
    for field, s in props.items():
        said = s.get("description", "")
        if field in LIVE_SPEC_FIELDS.values():
            assert "registers it again" not in said, field
        if "in place" in said.lower():
            assert field in LIVE_SPEC_FIELDS.values() or field == "pin", field  # (pin: its own POST, in place)


LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")  # and at most 63 characters


def _labels_valid(labels: dict[str, str]) -> bool:
    return all(len(v) <= 63 and LABEL_VALUE.match(v) for v in labels.values())


def test_resource_names_are_bounded_as_what_they_become_needs():
    """A name Kubernetes takes (up to 253 characters) but the operator cannot use is refused when applied, not
    reported later: a GPUPool's name is a label value of its workers (63 at most: a longer one and the API server
    refuses the DaemonSet), a Tenant's is the controller's tenant name."""
    bound = _crd_schema("GPUPool")["properties"]["metadata"]["properties"]["name"]["maxLength"]
    for n, ok in ((bound, True), (bound + 1, False)):
        ds = b.build_worker_daemonset("p" * n, "tokenpool", {})
        labels = [ds["metadata"]["labels"], ds["spec"]["selector"]["matchLabels"],
                  ds["spec"]["template"]["metadata"]["labels"]]
        assert all(_labels_valid(x) for x in labels) is ok, n
    bound = _crd_schema("Tenant")["properties"]["metadata"]["properties"]["name"]["maxLength"]
    b.build_tenant_create("t" * bound, {}, [])
    with pytest.raises(ValueError):
        b.build_tenant_create("t" * (bound + 1), {}, [])


def _apply_defaults(schema: dict, value):
    """The API server's structural defaulting: a missing property with a default gets it, then recursion."""
    if schema.get("type") != "object" or not isinstance(value, dict):
        return value
    out = dict(value)
    for k, sub in (schema.get("properties") or {}).items():
        if k not in out and "default" in sub:
            out[k] = copy.deepcopy(sub["default"])
        if k in out:
            out[k] = _apply_defaults(sub, out[k])
    return out


@pytest.mark.parametrize("kind,defaults,minimal", [
    ("GPUPool", b.POOL_DEFAULTS, {}),
    ("GPUPool", b.POOL_DEFAULTS, {"nodeSelector": {"pool": "a"}, "joinTokenSecretRef": {"name": "t"}}),
    ("PooledModel", b.MODEL_DEFAULTS, {}),
    ("PooledModel", b.MODEL_DEFAULTS, {"engine": {"kind": "pace"}, "source": {"memoryGB": 1}}),
    ("PooledModel", b.MODEL_DEFAULTS, {"source": {"path": "p"}, "slo": {"ttftSeconds": 1}, "replicas": {"max": 9}}),
    ("Tenant", b.TENANT_DEFAULTS, {"keysSecretRef": {"name": "s"}}),
    ("Tenant", b.TENANT_DEFAULTS, {"keysSecretRef": {"name": "s"}, "rateLimits": {"burst": 3}, "models": ["a"]}),
])
def test_crd_defaults_equal_the_operators(kind, defaults, minimal):
    """The operator fills the same defaults as the CRD, so it works where the API server applied none."""
    by_crd = _apply_defaults(_crd_schema(kind)["properties"]["spec"], minimal)
    assert by_crd == b.with_defaults(minimal, defaults)


def test_builder_daemonset_validates_and_matches_the_policies():
    ds = b.build_worker_daemonset("default", "tokenpool", _by_kind("GPUPool")["spec"])
    kv.validate(ds, K8S_VERSION, strict=True)
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    for kind, name in (("NetworkPolicy", "tokenpool-workers"), ("PodDisruptionBudget", "tokenpool-workers")):
        sel = _by_kind(kind, name)["spec"]["podSelector" if kind == "NetworkPolicy" else "selector"]["matchLabels"]
        assert sel.items() <= pod_labels.items(), (kind, sel)
    allowed = _by_kind("NetworkPolicy", "tokenpool-workers")["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    ctl = _by_kind("Deployment", "tokenpool-controller")["spec"]["template"]["metadata"]["labels"]
    assert allowed.items() <= ctl.items()
    assert ds["spec"]["template"]["spec"]["serviceAccountName"] in {d["metadata"]["name"] for _, d in OBJECTS
                                                                     if d["kind"] == "ServiceAccount"}


def test_servicemonitor_shape():
    """A Prometheus Operator CRD kind (no schema in kubernetes-validate): it must select the controller Service
    and scrape a port that Service names, with the admin token from the Secret the operator uses too."""
    sm = _by_kind("ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    svc = _by_kind("Service", "tokenpool-controller")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    ports = {p["name"] for p in svc["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in ports and ep["path"] == "/metrics"
        assert ep["authorization"]["credentials"]["name"] == "tokenpool-admin-token"


def test_overlay_config_tokens_and_ports_agree():
    ex = MANIFESTS / "overlays" / "example"
    cfg = ServerConfig.model_validate(yaml.safe_load((ex / "config.yaml").read_text()))
    env = {f: dict(line.split("=", 1) for line in (ex / f).read_text().split() if "=" in line)
           for f in ("admin-token.env", "join-token.env")}
    assert verify_key(env["admin-token.env"]["token"], cfg.admin_token_hash)
    assert verify_key(env["join-token.env"]["token"], cfg.workers.join_token_hash)
    assert cfg.workers.listen.host == "0.0.0.0" and cfg.workers.local == "none"
    svc_ports = {p["name"]: p["port"] for p in _by_kind("Service", "tokenpool-controller")["spec"]["ports"]}
    assert svc_ports == {"http": cfg.listen.port, "workers": cfg.workers.listen.port}
    assert b.POOL_DEFAULTS["controllerAddress"] == f"tokenpool-controller:{cfg.workers.listen.port}"
    op = _by_kind("Deployment", "tokenpool-operator")["spec"]["template"]["spec"]["containers"][0]
    env_names = {e["name"] for e in op["env"]}
    assert {"TOKENPOOL_CONTROLLER_URL", "TOKENPOOL_ADMIN_TOKEN"} <= env_names
    assert op["command"][:2] == ["tokenpool", "operator"]
    ctl = _by_kind("Deployment", "tokenpool-controller")["spec"]["template"]["spec"]["containers"][0]
    assert ctl["command"] == ["tokenpool", "serve", "--config", "/etc/tokenpool/config.yaml"]


def _ports(n: int) -> list[int]:
    """n free ports: from 18130-18139 where free (the range this test was written to keep to on a shared
    machine), else any."""
    from load_tests.live_server import free_port

    out: list[int] = []
    for port in range(18130, 18140):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        out.append(port)
        if len(out) == n:
            return out
    return out + [free_port() for _ in range(n - len(out))]


def _probe_port(container: dict, probe: dict) -> str:
    port = probe["httpGet"]["port"]
    return next(p["name"] for p in container["ports"] if port in (p["name"], p["containerPort"]))


def test_controller_probes_and_service_let_a_starting_controller_be_reached(tmp_path):
    """The overlay's controller, started as in the cluster (no local worker; workers and models come later,
    through the Service): its liveness probe must pass while it waits, and while its readiness probe fails the
    Service must still route to it, or the workers and the operator never reach it (they make it ready)."""
    import httpx

    from load_tests.live_server import LiveServer

    dep = _by_kind("Deployment", "tokenpool-controller")
    ctl = dep["spec"]["template"]["spec"]["containers"][0]
    svc = _by_kind("Service", "tokenpool-controller")
    cfg = yaml.safe_load((MANIFESTS / "overlays" / "example" / "config.yaml").read_text())
    api, workers = _ports(2)
    cfg["workers"]["listen"] = {"host": "127.0.0.1", "port": workers}
    srv = LiveServer(cfg, tmp_path, wait_ready=False)
    srv.port, srv.url = api, f"http://127.0.0.1:{api}"
    srv.config_path.write_text(yaml.safe_dump(dict(cfg, listen={"host": "127.0.0.1", "port": api})))
    answers: dict[str, int] = {}
    with srv:
        for kind in ("livenessProbe", "readinessProbe"):
            probe = ctl[kind]
            assert _probe_port(ctl, probe) == "http"
            path = probe["httpGet"]["path"]
            for _ in range(150):  # the server's start (imports) on a loaded machine
                try:
                    answers[kind] = httpx.get(srv.url + path, timeout=2).status_code
                    break
                except httpx.HTTPError:
                    time.sleep(0.2)
            else:
                raise AssertionError(f"the controller did not answer {path}:\n{srv.log()}")
    assert answers["livenessProbe"] == 200, answers  # else the kubelet restarts it while it waits for workers
    if answers["readinessProbe"] != 200:  # not ready until workers join: the Service must route to it all the same
        assert svc["spec"].get("publishNotReadyAddresses") is True, answers


def test_operator_role_grants_what_it_uses_and_no_more():
    rules = _by_kind("Role", "tokenpool-operator")["rules"]
    grants = {(g, r): set(rule["verbs"]) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]}
    assert grants[("", "secrets")] == {"get"}  # tenant keys: read one by name, never list
    assert grants[("apps", "daemonsets")] == {"get", "create", "patch"}
    assert grants[("", "pods")] == {"list"}  # a waiting pool's worker pods: why they are not ready
    assert grants[("tokenpool.dev", "gpupools/finalizers")] == {"update"}  # ownerReference blockOwnerDeletion
    assert all("delete" not in v and "*" not in v for v in grants.values())
    assert not [d for _, d in OBJECTS if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]


def _images(docs: list[dict]) -> dict[str, str]:
    """Every tokenpool image the rendered objects run: the Deployments' containers and each GPUPool's workers
    (spec.image, or the CRD's default)."""
    out = {}
    for d in docs:
        if d["kind"] == "Deployment":
            for c in d["spec"]["template"]["spec"]["containers"]:
                out[f"{d['metadata']['name']}/{c['name']}"] = c["image"]
        elif d["kind"] == "GPUPool":
            spec = _apply_defaults(_crd_schema("GPUPool")["properties"]["spec"], d.get("spec") or {})
            out[f"GPUPool/{d['metadata']['name']}"] = spec["image"]
    return out


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed (kubectl kustomize renders the overlay)")
def test_an_image_tag_moves_the_workers_too(tmp_path):
    """What a user does to install another version: set `images:` newTag. The workers (a GPUPool's spec.image)
    must get it with the controller and the operator, not stay on the CRD's default: in the examples'
    kustomization, and in a kustomization that holds the base and GPUPools together. The shipped tags agree."""
    copy_root = tmp_path / "manifests"
    shutil.copytree(MANIFESTS, copy_root)
    together = copy_root / "overlays" / "together"  # the base and the pools in one kustomization
    together.mkdir()
    (together / "kustomization.yaml").write_text(yaml.safe_dump({"resources": ["../../base", "../../examples"]}))
    shipped = {}
    for k in (copy_root / "overlays" / "example" / "kustomization.yaml", copy_root / "examples" / "kustomization.yaml",
              together / "kustomization.yaml"):
        kust = yaml.safe_load(k.read_text())
        shipped[k.parent.name] = {i["newTag"] for i in kust.get("images", [])}
        kust["images"] = [{"name": "ghcr.io/tokenpool/tokenpool", "newTag": "9.9.9-test"}]
        k.write_text(yaml.safe_dump(kust))
    assert shipped["example"] == shipped["examples"] and len(shipped["example"]) == 1, shipped
    for d, n in ((copy_root / "overlays" / "example", 2), (copy_root / "examples", 1), (together, 3)):
        images = _images(_render(d))
        assert len(images) == n and (n == 2 or any(x.startswith("GPUPool/") for x in images)), (d, images)
        assert set(images.values()) == {"ghcr.io/tokenpool/tokenpool:9.9.9-test"}, (d, images)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed (kubectl kustomize renders the overlay)")
def test_rendered_overlay_validates():
    out = subprocess.run(["kubectl", "kustomize", str(MANIFESTS / "overlays" / "example")], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d] + _render(MANIFESTS / "examples")
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "Role", "RoleBinding", "ServiceAccount", "PodDisruptionBudget",
            "NetworkPolicy", "Secret", "GPUPool"} <= kinds
    # Only kinds of the cluster itself or of this install's CRDs: `kubectl apply -k` on a cluster without the
    # Prometheus Operator failed on the ServiceMonitor every time (it is components/servicemonitor now).
    assert all(d["kind"] in CRDS or not d["apiVersion"].startswith(CUSTOM_GROUPS) for d in docs), kinds
    ctl = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "tokenpool-controller")
    pool = next(d for d in docs if d["kind"] == "GPUPool")
    claims = {v["persistentVolumeClaim"]["claimName"] for v in ctl["spec"]["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    assert claims == {pool["spec"]["modelsClaim"]}  # the controller reads the models the workers load
    mounts = {m["mountPath"] for m in ctl["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert b.MODELS_MOUNT in mounts
    for d in docs:
        if d["apiVersion"].startswith(CUSTOM_GROUPS):
            if d["kind"] in CRDS:
                _validate_cr(d)
            continue
        kv.validate(d, K8S_VERSION, strict=True)
        if "namespace" in d["metadata"]:
            assert d["metadata"]["namespace"] == "tokenpool"


def _render(overlay: Path) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in docs if d["kind"] == kind])
    return found[0]


def _secret_refs(docs: list[dict]) -> dict[str, str]:
    """Where the rendered objects name the generated Secrets: what -> the Secret's name."""
    ctl = _one(docs, "Deployment", "tokenpool-controller")["spec"]["template"]["spec"]
    op = _one(docs, "Deployment", "tokenpool-operator")["spec"]["template"]["spec"]["containers"][0]
    sm = _one(docs, "ServiceMonitor")
    pool = _apply_defaults(_crd_schema("GPUPool")["properties"]["spec"], _one(docs, "GPUPool")["spec"])
    return {"controller config": next(v["secret"]["secretName"] for v in ctl["volumes"] if v["name"] == "config"),
            "operator admin token": next(e["valueFrom"]["secretKeyRef"]["name"] for e in op["env"]
                                         if e["name"] == "TOKENPOOL_ADMIN_TOKEN"),
            "ServiceMonitor admin token": sm["spec"]["endpoints"][0]["authorization"]["credentials"]["name"],
            "GPUPool join token": pool["joinTokenSecretRef"]["name"]}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed (kubectl kustomize renders the overlay)")
def test_a_changed_config_or_admin_token_rolls_what_reads_it(tmp_path):
    """What a user does to change the controller's configuration or the admin token: edit the overlay's file and
    apply it again. A Secret changed in place under a running pod changes nothing there (the controller reads its
    config at start, the operator its token from the environment): the generated Secrets' names carry a hash of
    their content, so the pods that read them roll. Every reference names a Secret the overlay makes; the join
    token keeps its name (a GPUPool names it)."""
    root = tmp_path / "manifests"
    shutil.copytree(MANIFESTS, root)
    ex = _with_monitoring(root / "overlays" / "example")
    pools = _render(root / "examples")
    before = _render(ex) + pools
    secrets = {d["metadata"]["name"] for d in before if d["kind"] == "Secret"}
    refs = _secret_refs(before)
    assert set(refs.values()) <= secrets, (refs, secrets)
    assert refs["GPUPool join token"] == "tokenpool-join-token"
    assert refs["operator admin token"] == refs["ServiceMonitor admin token"]
    (ex / "config.yaml").write_text((ex / "config.yaml").read_text() + "# changed\n")
    (ex / "admin-token.env").write_text((ex / "admin-token.env").read_text().replace("token=", "token=x", 1))
    after = _render(ex) + pools
    changed = _secret_refs(after)
    assert set(changed.values()) <= {d["metadata"]["name"] for d in after if d["kind"] == "Secret"}
    for what in ("controller config", "operator admin token"):
        assert changed[what] != refs[what], what  # a new pod template: the Deployment rolls
    assert changed["GPUPool join token"] == refs["GPUPool join token"]


@pytest.mark.parametrize("kind,valid", [("GPUPool", True), ("PooledModel", False), ("Tenant", False)])
def test_a_resource_without_spec(kind, valid):
    """`kubectl apply` of a resource with no spec at all, validated as the API server does (its defaults first):
    a GPUPool is all defaults; a PooledModel (an llm without a path) and a Tenant (no Secret) are refused like
    one with an empty spec, not let through for the operator to find invalid."""
    obj = _apply_defaults(_crd_schema(kind), {"apiVersion": "tokenpool.dev/v1alpha1", "kind": kind,
                                              "metadata": {"name": "x"}})
    if valid:
        _validate_cr(obj)
    else:
        with pytest.raises(jsonschema.ValidationError):
            _validate_cr(obj)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed (kubectl kustomize renders it)")
def test_the_crds_apply_alone_and_are_waited_for_by_label():
    """A fresh cluster refuses custom resources applied with their CRDs (no mapping until they are established):
    the CRDs go first, then `kubectl wait --for condition=established crd -l app.kubernetes.io/part-of=tokenpool`
    must find each of them."""
    alone = _render(MANIFESTS / "crds")
    assert {d["metadata"]["name"] for d in alone} == {c["metadata"]["name"] for c in CRDS.values()}
    assert len(alone) == 3 and all(d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "tokenpool" for d in alone)


TENANT_BURST_ALONE = ("rateLimits.burst is the bucket of requestsPerSecond: set requestsPerSecond too (burst alone "
                      "limits nothing)")


def _tenant_refusals(tenant: dict) -> list[str]:
    """What the API server refuses a Tenant for, after its defaults: the schema's errors, then (schema-valid) the CEL
    rules' messages."""
    obj = {**tenant, "spec": _apply_defaults(_crd_schema("Tenant")["properties"]["spec"], copy.deepcopy(tenant["spec"]))}
    return [e.message for e in jsonschema.Draft4Validator(_crd_schema("Tenant")).iter_errors(obj)] or _cel_refusals(obj)


@pytest.mark.parametrize("spec,refused", [
    ({"rateLimits": {"burst": 40}}, TENANT_BURST_ALONE),
    ({"rateLimits": {"burst": 40, "tokensPerMinute": 1000}}, TENANT_BURST_ALONE),
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
    """Tenant specs the operator could only fail on after `kubectl apply` (or apply to no effect) are refused by the
    CRD: `rateLimits.burst` without `requestsPerSecond` (the controller reads burst only as that bucket's size: the
    tenant was Ready with no limit while its spec said "40 at once"), `sloClass: ""` (no class: Degraded, Rejected,
    after the apply) and `keysSecretRef.keys: [""]` (no data key: Degraded, InvalidSecret). What the CRD lets through,
    the operator's builder takes; the example Tenant stays accepted."""
    obj = {"apiVersion": "tokenpool.dev/v1alpha1", "kind": "Tenant", "metadata": {"name": "team-b"},
           "spec": dict({"keysSecretRef": {"name": "team-b-keys"}}, **spec)}
    assert _tenant_refusals(obj) == ([refused] if refused else [])
    if not refused:
        b.build_tenant_create("team-b", _apply_defaults(_crd_schema("Tenant")["properties"]["spec"], obj["spec"]),
                              [hash_key("tp-x")])
    assert _tenant_refusals(_by_kind("Tenant")) == []


def test_burst_alone_limits_nothing_in_the_controller():
    """Why the Tenant CRD's burst rule: the controller's tenant with only a burst has no request bucket (no limit),
    as one without."""
    from controller.config import TenantSpec
    from controller.tenants import Tenant

    alone = Tenant(TenantSpec(name="t", rate={"burst": 2}))
    paired = Tenant(TenantSpec(name="t", rate={"requests_per_s": 1, "burst": 2}))
    assert alone.rps is None and paired.rps is not None and paired.rps.capacity == 2
