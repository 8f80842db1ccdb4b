"""Pure functions: custom resources in, admin-API bodies, Kubernetes objects and status out. No I/O here.

Defaults live in one place per resource (`*_DEFAULTS`, the same values the CRDs default to; a test keeps the
two equal), so the operator behaves the same whether or not the API server applied the CRD defaults.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import re
from typing import Any

from pydantic import BaseModel, ValidationError

from controller.api.admin_protocol import TenantCreate
from controller.config import ModelSpec
from controller.keys import hash_key, is_key_hash
from controller.operator import GROUP

POOL_DEFAULTS: dict[str, Any] = {
    "nodeSelector": {"nvidia.com/gpu.present": "true"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "gpusPerNode": 1,
    "hostCacheGB": 16,
    "policy": "token",
    "image": "ghcr.io/tokenpool/tokenpool:0.1.0",
    "controllerAddress": "tokenpool-controller:9000",
    "joinTokenSecretRef": {"name": "tokenpool-join-token", "key": "token"},
}
MODEL_DEFAULTS: dict[str, Any] = {
    "poolRef": "default",
    "source": {},
    "engine": {"kind": "llm", "dtype": "auto"},
    "slo": {"ttftSeconds": 5.0, "tpotSeconds": 0.25},
    "priority": 0,
    "pin": False,
    "replicas": {"min": 1, "max": 4},
    "drainTimeoutSeconds": 120,
    "loraAdapters": [],
}
TENANT_DEFAULTS: dict[str, Any] = {"models": ["*"], "priority": 0, "rateLimits": {}}
# A worker pod's terminationGracePeriodSeconds over its drain grace (spec.drainGraceSeconds, else the worker's own
# $TOKENPOOL_WORKER_DRAIN_S, 45 s): the worker exits at most STOP_MARGIN_S (5 s, controller/worker.py) after the grace,
# then closes its models; the kubelet's SIGKILL comes after this.
WORKER_STOP_MARGIN_S = 15
WORKER_DRAIN_DEFAULT_S = 45  # (tokenpool.env.WORKER_DRAIN_S's default: a test keeps the two equal)
MODELS_MOUNT = "/models"  # where a pool's model volume is mounted in workers (and the controller)
LABEL_POOL = f"{GROUP}/pool"
ANNOTATION_DIGEST = f"{GROUP}/spec-digest"


MAPS = frozenset({"nodeSelector"})  # free-form maps: a given one replaces the default whole


def with_defaults(spec: dict | None, defaults: dict) -> dict:
    """`spec` over `defaults`, objects merged key by key (what the API server's structural defaulting does:
    a default fills a missing field, also inside a given object; a given map is taken as it is)."""
    out = copy.deepcopy(defaults)
    for k, v in (spec or {}).items():
        merge = isinstance(v, dict) and isinstance(out.get(k), dict) and k not in MAPS
        out[k] = with_defaults(v, out[k]) if merge else copy.deepcopy(v)
    return out


def digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


# --- PooledModel -> ModelSpec ---
def served_name(name: str, spec: dict) -> str:
    return spec.get("servedName") or name


# The CRD's schema of spec.keepAlive (manifests/crds/pooledmodels.yaml): an integer 0 or more, or this pattern.
KEEP_ALIVE_PATTERN = r"^([0-9]+(\.[0-9]+)?|([0-9]+(\.[0-9]+)?(ms|s|m|h|d))+)$"


def _keep_alive(v: Any) -> Any:
    """spec.keepAlive as the CRD takes it (the controller's parsing takes more: "-1" for forever, "300us"), else
    ValueError saying what the CRD takes: the controller's own message suggested '-1', which the CRD refuses."""
    if v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0) or (
            isinstance(v, str) and re.fullmatch(KEEP_ALIVE_PATTERN, v)):
        return v
    raise ValueError(f"spec.keepAlive: bad duration {v!r}: use seconds (0 or more) or a duration such as '30s', "
                     "'5m', '1h30m' (0: freed as soon as idle; unset: kept until another model needs the memory)")


def build_model_spec(name: str, spec: dict) -> dict:
    """The admin API's `POST /admin/models` body (controller.config.ModelSpec JSON); ValueError when invalid."""
    s = with_defaults(spec, MODEL_DEFAULTS)
    _model_shapes(s)
    src = s["source"]
    path = src.get("path")
    if path is not None and not path.startswith("/"):
        path = f"{MODELS_MOUNT}/{path}"
    lo, hi = s["replicas"]["min"], s["replicas"]["max"]
    keep_alive = _keep_alive(s.get("keepAlive"))  # seconds or "5m": the controller's parsing
    if hi == 0:  # scaled to zero (the scale subresource at 0: KEDA's minReplicaCount 0, kubectl scale --replicas 0)
        if s["pin"]:
            raise ValueError("replicas.max 0 (scaled to zero) with pin: a pinned model keeps a replica; unpin it")
        # Registered still, on no engine while idle and its weights freed as soon as it is: a request loads it on
        # one engine (the controller is its own activator), and the autoscaler's trigger scales it up again.
        lo, hi, keep_alive = 0, 1, 0
    if s["pin"]:  # pinned: always at least one replica resident, whatever the autoscaler thinks
        lo = max(lo, 1)
    body: dict[str, Any] = {
        "name": served_name(name, spec),
        "path": path,
        "slo": {"ttft_s": s["slo"]["ttftSeconds"], "tpot_s": s["slo"]["tpotSeconds"]},
        "priority": s["priority"],
        "replicas": {"min": lo, "max": hi},
        "engine": {"kind": s["engine"]["kind"], "dtype": s["engine"]["dtype"]},
        "pin": bool(s["pin"]),  # the controller's pin: its weights are never evicted for another model's
    }
    for field, key in (("maxNumSeqs", "max_num_seqs"), ("maxModelLen", "max_model_len")):
        if s["engine"].get(field) is not None:
            body["engine"][key] = s["engine"][field]
    if src.get("memoryGB") is not None:
        body["memory_gb"] = src["memoryGB"]
    if keep_alive is not None:
        body["keep_alive"] = keep_alive
    # (unset: the controller's defaults, what every registration before these fields had)
    for field, key in (("aliases", "aliases"), ("toolCallParser", "tool_call_parser"), ("preload", "preload")):
        if s.get(field) is not None:
            body[key] = s[field]
    body["lora_modules"] = [{"name": a["name"], "path": a["path"] if a["path"].startswith("/") else
                             f"{MODELS_MOUNT}/{a['path']}"} for a in s["loraAdapters"]]
    return _validated(ModelSpec, body, MODEL_FIELDS)


def _model_shapes(s: dict) -> None:
    """ValueError naming the field where a value the builder reads into is not the CRD's type. The CRD's schema
    refuses these, but an older CRD left installed (or none) passes them, and the builder's indexing raised
    TypeError/KeyError: a handler traceback, retried by kopf for ever, where a bad spec says InvalidSpec."""
    def bad(field: str, want: str, v: Any) -> ValueError:
        return ValueError(f"spec.{field}: must be {want}, got {json.dumps(v)}")

    for field in ("source", "engine", "slo", "replicas"):
        if not isinstance(s[field], dict):
            raise bad(field, "an object", s[field])
    if not isinstance(s["source"].get("path"), str | None):
        raise bad("source.path", "a string", s["source"]["path"])
    for k in ("min", "max"):
        if not isinstance(v := s["replicas"].get(k), int) or isinstance(v, bool):
            raise bad(f"replicas.{k}", "an integer", v)
    if not isinstance(s["pin"], bool):
        raise bad("pin", "true or false", s["pin"])
    if not isinstance(s["loraAdapters"], list):
        raise bad("loraAdapters", "a list", s["loraAdapters"])
    for i, a in enumerate(s["loraAdapters"]):
        if not isinstance(a, dict):
            raise bad(f"loraAdapters[{i}]", "an object (name, path)", a)
        for k in ("name", "path"):
            if not isinstance(a.get(k), str):
                raise bad(f"loraAdapters[{i}].{k}", "a string", a.get(k))


# The admin API's field names (a pydantic error's loc) -> the custom resource's spec fields.
MODEL_FIELDS = {"name": "servedName", "path": "source.path", "memory_gb": "source.memoryGB", "slo": "slo",
                "ttft_s": "ttftSeconds", "tpot_s": "tpotSeconds", "keep_alive": "keepAlive",
                "lora_modules": "loraAdapters", "max_num_seqs": "maxNumSeqs", "max_model_len": "maxModelLen",
                "tool_call_parser": "toolCallParser"}
TENANT_FIELDS = {"rate": "rateLimits", "requests_per_s": "requestsPerSecond", "tokens_per_min": "tokensPerMinute",
                 "max_concurrent": "maxConcurrent", "slo_class": "sloClass"}


def _validated(model: type[BaseModel], body: dict, fields: dict[str, str]) -> dict:
    """`body` checked by the admin API's own model, as JSON; ValueError in one line naming the resource's spec
    fields (the status condition's message and the Warning event: pydantic's own text is several lines, with
    the whole input and a link)."""
    try:
        return model.model_validate(body).model_dump(mode="json")
    except ValidationError as e:
        raise ValueError("; ".join(
            (f"spec.{'.'.join(fields.get(str(x), str(x)) for x in err['loc'])}: " if err["loc"] else "")
            + err["msg"].removeprefix("Value error, ") for err in e.errors())) from None


# What a registered model changes in place (PATCH /admin/models/{name}): a change of only these (HPA's scaling
# through replicas, an SLO, priority, keep_alive or its aliases) keeps its weights loaded and its requests running.
LIVE_FIELDS = ("slo", "priority", "replicas", "keep_alive", "aliases")


def live_fields(desired: dict) -> dict:
    return {k: desired[k] for k in LIVE_FIELDS}


def reload_digest(desired: dict) -> str:
    """The digest of what needs the model registered again to change (its path, engine options, adapters...), and
    its pin (which changes in place, `same_registration`: kept in the digest, the digests that status.appliedDigest
    holds from before stay valid; so are keep_alive and aliases, as every digest before they changed in place held
    them: null, none)."""
    return digest({**{k: v for k, v in desired.items() if k not in LIVE_FIELDS}, "keep_alive": None, "aliases": []})


def same_registration(desired: dict, applied: str | None) -> bool:
    """Whether `applied` (the reload digest last applied; None: not known) is that of `desired` but for the pin, which
    changes in place (POST /admin/models/{name}/pin or /unpin): nothing to register again."""
    return applied is None or applied in {reload_digest(dict(desired, pin=p)) for p in (False, True)}


def model_reloads(desired: dict, actual: dict) -> bool:
    """Whether the controller's model (a `GET /admin/models` item) differs from `desired` in what it shows and
    cannot change in place (the pin can: `pin_differs`)."""
    return (actual.get("path") != desired["path"]
            or (actual.get("lora_modules") or []) != desired.get("lora_modules", []))


def pin_differs(desired: dict, actual: dict) -> bool:
    """Whether the controller's model is pinned now (its listing's `pin`) other than `desired` asks."""
    return bool(actual.get("pin")) != desired.get("pin", False)


def model_matches(desired: dict, actual: dict | None) -> bool:
    """Whether the controller's model (a `GET /admin/models` item) already is `desired` in what it shows."""
    if actual is None:
        return False
    return (not model_reloads(desired, actual) and not pin_differs(desired, actual)
            and actual.get("priority") == desired["priority"]
            and actual.get("replicas") == desired["replicas"]
            and list(actual.get("aliases") or []) == list(desired.get("aliases") or [])
            and _seconds(actual.get("keep_alive")) == _seconds(desired.get("keep_alive"))
            and {k: float(v) for k, v in (actual.get("slo") or {}).items()} ==
            {k: float(v) for k, v in desired["slo"].items()})


def _seconds(v: Any) -> float | None:
    return None if v is None else float(v)


def build_model_status(actual: dict | None, spec: dict, generation: int | None) -> dict:
    """status fields of a PooledModel from its controller entry (None: not registered)."""
    engines = list(actual.get("engines", [])) if actual else []
    s = with_defaults(spec, MODEL_DEFAULTS)
    return {
        "observedGeneration": generation,
        "registered": actual is not None,
        "engines": engines,
        "replicas": len(engines),
        "selector": f"app.kubernetes.io/component=worker,{LABEL_POOL}={s['poolRef']}",
        "ready": actual is not None and (bool(engines) or (s["replicas"]["min"] == 0 and not s["pin"])),
        "attainment": actual.get("slo_attainment") if actual else None,
    }


# --- Tenant -> TenantCreate ---
def tenant_key_hashes(name: str, keys: list[str]) -> list[str]:
    """Hashes for the keys of a tenant's Secret. A value that already is a hash passes as is; a key is hashed
    with a salt derived from the key itself, so the same Secret always gives the same hashes (idempotent
    reconciles) while the salt still differs per key and per tenant."""
    out = []
    for k in keys:
        k = k.strip()
        if not k:
            continue
        if is_key_hash(k):
            out.append(k)
        else:
            salt = hmac.new(k.encode(), f"tokenpool-tenant:{name}".encode(), hashlib.sha256).hexdigest()[:32]
            out.append(hash_key(k, salt))
    return sorted(set(out))


def secret_keys(secret_data: dict[str, str] | None, wanted: list[str] | None) -> list[str]:
    """Decoded values of a Secret's `data` (base64), only the `wanted` data keys when given."""
    import base64

    data = secret_data or {}
    names = wanted if wanted else sorted(data)
    missing = [n for n in names if n not in data]
    if missing:
        raise KeyError(f"Secret has no data key(s) {missing}")
    return [base64.b64decode(data[n]).decode() for n in names]


def build_tenant_create(name: str, spec: dict, key_hashes: list[str]) -> dict:
    """The admin API's `POST /admin/tenants` body (TenantCreate JSON); ValueError when invalid."""
    s = with_defaults(spec, TENANT_DEFAULTS)
    r = s["rateLimits"]
    body = {
        "name": name,
        "models": s["models"],
        "rate": {"requests_per_s": r.get("requestsPerSecond"), "burst": r.get("burst"),
                 "tokens_per_min": r.get("tokensPerMinute")},
        "max_concurrent": s.get("maxConcurrent"),
        "priority": s["priority"],
        "slo_class": s.get("sloClass"),
        "key_hashes": key_hashes,
    }
    return _validated(TenantCreate, body, TENANT_FIELDS)


# What a tenant changes in place (PATCH /admin/tenants/{name}): all it shows but its keys, which only a DELETE then
# a POST change (their hashes are not shown: the digest covers them).
TENANT_LIVE_FIELDS = ("models", "rate", "max_concurrent", "priority", "slo_class")


def tenant_matches(desired: dict, actual: dict | None) -> bool:
    """Whether the controller's tenant shows what `desired` asks (key hashes are not shown: see the digest)."""
    if actual is None:
        return False
    return all(actual.get(k) == desired[k] for k in TENANT_LIVE_FIELDS)


def tenant_live_fields(desired: dict) -> dict:
    return {k: desired[k] for k in TENANT_LIVE_FIELDS}


def tenant_keys_unchanged(desired: dict, actual: dict, applied: str | None) -> bool:
    """Whether `desired` holds the key hashes last applied (`applied`: the digest of what was applied then), so a
    PATCH can make the controller's tenant `desired`. Known when the digest is the same, or when `desired` with
    the fields the controller shows now is what was applied (only those fields changed since)."""
    if applied is None:
        return False
    return applied == digest(desired) or applied == digest({**desired, **{k: actual.get(k) for k in TENANT_LIVE_FIELDS}})


# --- GPUPool -> worker DaemonSet ---
def worker_resources(s: dict) -> dict:
    """Each worker container's requests and limits: the pool's `workerResources`, or by default requests of 2 CPUs
    (its step loop and its loads) and memory for its share of the host cache plus 4 GiB (the process, CUDA's
    host side), so the pods are not BestEffort, the first evicted under memory pressure. No memory limit by
    default: the shared cache's pages are charged to whichever container touched them first. Always one GPU."""
    own = s.get("workerResources")
    if own is None:
        share = -(-s["hostCacheGB"] // s["gpusPerNode"])  # (ceil)
        own = {"requests": {"cpu": "2", "memory": f"{share + 4}Gi"}}
    # Quantities as strings: the CRD takes YAML numbers too (int-or-string, as Kubernetes does), which the client's
    # models refuse (a DaemonSet with cpu: 2 was never sent)
    limits = {**{k: str(v) for k, v in own.get("limits", {}).items()}, "nvidia.com/gpu": "1"}
    requests = {k: str(v) for k, v in (own.get("requests") or {}).items()}
    return {**({"requests": requests} if requests else {}), "limits": limits}


def build_worker_daemonset(pool: str, namespace: str, spec: dict) -> dict:
    """One pod per GPU node, one worker container per GPU. Every container asks the device plugin for one GPU,
    so inside it the GPU is `cuda:0`; the pod's containers share one memory-backed /dev/shm, the node's host
    weight cache. The join token comes from a Secret through the environment (the worker reads
    TOKENPOOL_JOIN_TOKEN), so it never shows in a process listing."""
    s = with_defaults(spec, POOL_DEFAULTS)
    labels = {"app.kubernetes.io/name": "tokenpool", "app.kubernetes.io/component": "worker", LABEL_POOL: pool}
    tok = s["joinTokenSecretRef"]
    mounts = [{"name": "host-cache", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"}]
    volumes: list[dict] = [
        {"name": "host-cache", "emptyDir": {"medium": "Memory", "sizeLimit": f"{s['hostCacheGB']}Gi"}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if s.get("modelsClaim"):
        mounts.append({"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True})
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": s["modelsClaim"], "readOnly": True}})
    containers = [{
        "name": f"worker-{i}",
        "image": s["image"],
        "command": ["python", "-m", "controller.worker", "--controller", s["controllerAddress"], "--device", "cuda:0",
                    "--policy", s["policy"], "--host-cache-gb", str(s["hostCacheGB"])]
        + (["--gpu-budget-gb", str(s["gpuBudgetGB"])] if s.get("gpuBudgetGB") else [])
        + (["--kv-cache-gb", str(s["kvCacheGB"])] if s.get("kvCacheGB") else []),
        "env": [
            {"name": "TOKENPOOL_JOIN_TOKEN", "valueFrom": {"secretKeyRef": {"name": tok["name"], "key": tok["key"]}}},
            {"name": "HOME", "value": "/tmp"},
        ],
        "resources": worker_resources(s),
        "volumeMounts": mounts,
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
    } for i in range(s["gpusPerNode"])]
    grace = s.get("drainGraceSeconds")
    if grace is not None:  # (unset: the DaemonSet of before the field, so an upgraded operator rolls no worker)
        for c in containers:
            c["env"].append({"name": "TOKENPOOL_WORKER_DRAIN_S", "value": str(int(grace))})
    ds = {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": f"tokenpool-workers-{pool}", "namespace": namespace, "labels": labels},
        "spec": {
            "selector": {"matchLabels": {LABEL_POOL: pool, "app.kubernetes.io/component": "worker"}},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": "tokenpool-worker",
                    "automountServiceAccountToken": False,
                    "nodeSelector": s["nodeSelector"],
                    "tolerations": s["tolerations"],
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
                    # a worker's SIGTERM drain: its requests in flight get spec.drainGraceSeconds (its
                    # $TOKENPOOL_WORKER_DRAIN_S, else 45 s), its models move to the other engines meanwhile, and it
                    # exits 5 s after that at most (worker.py)
                    "terminationGracePeriodSeconds": int(WORKER_DRAIN_DEFAULT_S if grace is None else grace)
                    + WORKER_STOP_MARGIN_S,
                    "containers": containers,
                    "volumes": volumes,
                },
            },
        },
    }
    ds["metadata"]["annotations"] = {ANNOTATION_DIGEST: digest(ds["spec"])}
    return ds


def build_pool_status(engines: list[dict], daemonset: dict | None, spec: dict, generation: int | None) -> dict:
    s = with_defaults(spec, POOL_DEFAULTS)
    st = (daemonset or {}).get("status") or {}
    nodes = int(st.get("numberReady") or 0)
    return {
        "observedGeneration": generation,
        "nodes": nodes,
        "gpus": nodes * s["gpusPerNode"],
        "enginesReady": sum(1 for e in engines if e.get("alive") and not e.get("draining")),
    }


def workers_not_ready(daemonset: dict | None) -> bool:
    """Whether the DaemonSet's status counts pods that are not ready (the pods then say why: `pods_stuck`)."""
    st = (daemonset or {}).get("status") or {}
    return int(st.get("numberReady") or 0) < int(st.get("desiredNumberScheduled") or 0)


# What a worker container waits on that only a change makes go (the kubelet's waiting reasons): an image that cannot
# be pulled, a Secret or key it names missing, a crash loop.
STUCK = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
                   "CreateContainerError", "RunContainerError", "CrashLoopBackOff"})


def pods_stuck(pods: list[dict] | None) -> tuple[str, str] | None:
    """(reason, message) of the first worker pod (by name) that will not run as it is: a container waiting for a
    STUCK reason, or a pod the scheduler cannot place (Unschedulable: no GPU free on its node, say); None if none."""
    for p in sorted(pods or [], key=lambda p: p["metadata"]["name"]):
        name, st = p["metadata"]["name"], p.get("status") or {}
        for c in (st.get("initContainerStatuses") or []) + (st.get("containerStatuses") or []):
            w = (c.get("state") or {}).get("waiting") or {}
            if w.get("reason") in STUCK:  # (the kubelet alternates the two of a pull: one reason, no flapping)
                reason = "ImagePullBackOff" if w["reason"] == "ErrImagePull" else w["reason"]
                return reason, f"worker pod {name}, container {c.get('name')}: {w.get('message') or w['reason']}"
        for cond in st.get("conditions") or []:
            if (cond.get("type"), cond.get("status"), cond.get("reason")) == ("PodScheduled", "False", "Unschedulable"):
                return "Unschedulable", f"worker pod {name}: {cond.get('message') or 'no node can take it'}"
    return None


def pool_waiting(daemonset: dict | None, spec: dict, pods: list[dict] | None = None) -> tuple[str, str, str]:
    """(state, reason, message) of a pool with no engine ready, from its worker DaemonSet's status: no node to run
    on (a nodeSelector no node matches, taints not tolerated: a DaemonSet never asks the cluster autoscaler for a
    node), pods not ready yet (Degraded where one of its `pods` will not run as it is: `pods_stuck`), or pods ready
    whose engines have not joined the controller."""
    ds = daemonset or {}
    st, gen = ds.get("status") or {}, (ds.get("metadata") or {}).get("generation")
    seen = "desiredNumberScheduled" in st and (gen is None or st.get("observedGeneration", -1) >= gen)
    desired, ready = int(st.get("desiredNumberScheduled") or 0), int(st.get("numberReady") or 0)
    if seen and desired == 0:
        s = with_defaults(spec, POOL_DEFAULTS)
        return ("Degraded", "NoNodes", f"no node runs a worker: none has the labels {s['nodeSelector']} with taints "
                "the pool tolerates (spec.nodeSelector, spec.tolerations)")
    if seen and not ready:
        stuck = pods_stuck(pods)
        if stuck is not None:
            return ("Degraded", *stuck)
        return "Progressing", "WaitingForWorkers", f"{desired} worker pod(s) scheduled, none ready yet"
    if seen and ready:
        return ("Progressing", "WaitingForWorkers", f"{ready} worker pod(s) ready, no engine has joined the "
                "controller yet (their join token, spec.controllerAddress)")
    return "Progressing", "WaitingForWorkers", "no engine has joined yet"


# --- conditions ---
CONDITION_TYPES = ("Ready", "Progressing", "Degraded")


def build_conditions(state: str, reason: str, message: str, generation: int | None, previous: list[dict] | None,
                     now: str) -> list[dict]:
    """Ready/Progressing/Degraded with `state` the one that is True. A condition's lastTransitionTime moves only
    when its status flips, so re-running a reconcile that changes nothing writes the same conditions."""
    if state not in CONDITION_TYPES:
        raise ValueError(f"state must be one of {CONDITION_TYPES}, got {state!r}")
    prev = {c.get("type"): c for c in previous or []}
    out = []
    for t in CONDITION_TYPES:
        status = "True" if t == state else "False"
        old = prev.get(t)
        since = old["lastTransitionTime"] if old and old.get("status") == status and old.get("lastTransitionTime") else now
        c = {"type": t, "status": status, "reason": reason, "message": message, "lastTransitionTime": since}
        if generation is not None:
            c["observedGeneration"] = generation
        out.append(c)
    return out
