"""The operator's pure builders, as data: custom resource specs in, admin-API bodies, DaemonSets and status out."""

from __future__ import annotations

import base64

import pytest

from controller.api.admin_protocol import ModelOut, TenantOut
from controller.config import RateLimit
from controller.keys import hash_key, verify_key
from controller.operator import builders as b


def test_model_spec_from_a_pooled_model():
    body = b.build_model_spec("qwen", {
        "servedName": "qwen2-7b", "source": {"path": "Qwen2-7B", "memoryGB": 15.5},
        "engine": {"dtype": "bf16", "maxNumSeqs": 32, "maxModelLen": 4096},
        "slo": {"ttftSeconds": 2, "tpotSeconds": 0.1}, "priority": 7, "replicas": {"min": 0, "max": 3}})
    assert body["name"] == "qwen2-7b" and body["path"] == "/models/Qwen2-7B"
    assert body["slo"] == {"ttft_s": 2.0, "tpot_s": 0.1} and body["priority"] == 7
    assert body["replicas"] == {"min": 0, "max": 3} and body["memory_gb"] == 15.5
    assert body["engine"] == {**body["engine"], "kind": "llm", "dtype": "bf16", "max_num_seqs": 32,
                              "max_model_len": 4096, "kv_cache_memory_gb": None}  # the rest: ModelSpec's defaults


def test_model_spec_lora_adapters():
    """loraAdapters become the model's lora_modules (relative paths under the models volume); the controller's
    model matches only with the same adapters."""
    spec = {"source": {"path": "q7"}, "loraAdapters": [{"name": "sql", "path": "adapters/sql"},
                                                       {"name": "chat", "path": "/data/chat"}]}
    body = b.build_model_spec("q", spec)
    assert body["lora_modules"] == [{"name": "sql", "path": "/models/adapters/sql"}, {"name": "chat", "path": "/data/chat"}]
    assert b.model_matches(body, _model_out(body, lora_modules=body["lora_modules"]))
    assert not b.model_matches(body, _model_out(body))
    assert not b.model_matches(body, _model_out(body, lora_modules=body["lora_modules"][:1]))
    with pytest.raises(ValueError, match="pattern"):
        b.build_model_spec("q", {**spec, "loraAdapters": [{"name": "bad name", "path": "x"}]})
    assert b.build_model_spec("q", {"source": {"path": "q7"}})["lora_modules"] == []


def test_model_spec_defaults_pin_and_absolute_paths():
    body = b.build_model_spec("m", {"source": {"path": "/data/m"}, "pin": True, "replicas": {"min": 0, "max": 2}})
    assert body["name"] == "m" and body["path"] == "/data/m"
    assert body["replicas"] == {"min": 1, "max": 2}  # pinned: at least one replica
    assert body["pin"] is True  # and the controller's pin: its weights never evicted for another model's
    assert b.build_model_spec("m", {"source": {"path": "m"}})["pin"] is False
    assert body["slo"] == {"ttft_s": 5.0, "tpot_s": 0.25} and body["priority"] == 0
    assert b.build_model_spec("p", {"engine": {"kind": "pace"}})["path"] is None


@pytest.mark.parametrize("spec,msg", [
    ({"source": {}}, "path is required"),
    ({"source": {"path": "m"}, "replicas": {"min": 3, "max": 2}}, "replicas.min"),
    ({"source": {"path": "m"}, "slo": {"ttftSeconds": 0}}, "greater than 0"),
    ({"servedName": "bad name!", "source": {"path": "m"}}, "pattern"),
])
def test_model_spec_rejects_what_the_controller_would(spec, msg):
    with pytest.raises(ValueError, match=msg):
        b.build_model_spec("m", spec)


@pytest.mark.parametrize("build,spec,message", [
    (b.build_model_spec, {"source": {"path": "m"}, "slo": {"ttftSeconds": 0}},
     "spec.slo.ttftSeconds: Input should be greater than 0"),
    (b.build_model_spec, {"source": {"path": "m", "memoryGB": 1e7}},
     "spec.source.memoryGB: Input should be less than or equal to 1000000"),
    (b.build_model_spec, {"source": {"path": "m", "memoryGB": 0}}, "spec.source.memoryGB: Input should be greater than 0"),
    (b.build_model_spec, {"source": {"path": "m"}, "engine": {"maxModelLen": 0}},
     "spec.engine.maxModelLen: Input should be greater than or equal to 1"),
    (b.build_model_spec, {"source": {"path": "m"}, "aliases": ["m"]}, "model 'm': an alias repeats the name"),
    (b.build_tenant_create, {"maxConcurrent": 0}, "spec.maxConcurrent: Input should be greater than or equal to 1"),
])
def test_an_invalid_spec_is_named_in_one_line_by_its_resources_fields(build, spec, message):
    """What the status condition (InvalidSpec) and the Warning event say, so what `kubectl get` and `kubectl
    describe` show: one line naming the custom resource's field, not pydantic's report (several lines, the admin
    API's field names, the whole input, a link)."""
    with pytest.raises(ValueError) as e:
        build("m", spec) if build is b.build_model_spec else build("m", spec, [])
    assert str(e.value) == message


def _model_out(desired: dict, **over) -> dict:
    d = ModelOut(name=desired["name"], path=desired["path"], slo=desired["slo"], priority=desired["priority"],
                 replicas=desired["replicas"], engines=["e1"], max_model_len=4096, size_bytes=1, slo_attainment=0.95)
    return {**d.model_dump(mode="json"), **over}


def test_model_matches_what_the_admin_api_shows():
    desired = b.build_model_spec("m", {"source": {"path": "m"}, "slo": {"ttftSeconds": 2}})
    assert b.model_matches(desired, _model_out(desired))
    assert b.model_matches(desired, _model_out(desired, slo={"ttft_s": 2, "tpot_s": 0.25}))  # ints are floats
    assert not b.model_matches(desired, None)
    assert not b.model_matches(desired, _model_out(desired, replicas={"min": 1, "max": 5}))
    assert not b.model_matches(desired, _model_out(desired, priority=9))
    assert not b.model_matches(desired, _model_out(desired, path="/models/other"))


def test_what_changes_in_place_and_what_registers_the_model_again():
    """Scale, SLO and priority are a PATCH (the model stays loaded); a path, engine option or adapter change is a
    re-registration, seen in what the controller shows or in the digest of what it does not show."""
    spec = {"source": {"path": "m"}, "slo": {"ttftSeconds": 2}, "replicas": {"min": 1, "max": 2}}
    desired = b.build_model_spec("m", spec)
    scaled = b.build_model_spec("m", {**spec, "replicas": {"min": 1, "max": 5}, "priority": 3,
                                      "slo": {"ttftSeconds": 9}})
    assert b.reload_digest(scaled) == b.reload_digest(desired)
    assert not b.model_reloads(scaled, _model_out(desired)) and not b.model_matches(scaled, _model_out(desired))
    assert b.live_fields(scaled) == {"slo": {"ttft_s": 9.0, "tpot_s": 0.25}, "priority": 3,
                                     "replicas": {"min": 1, "max": 5}, "keep_alive": None,  # (null: until needed)
                                     "aliases": []}
    bf16 = b.build_model_spec("m", {**spec, "engine": {"dtype": "bf16"}})
    assert b.reload_digest(bf16) != b.reload_digest(desired)  # (not shown by the controller: the digest says it)
    assert b.model_reloads(desired, _model_out(desired, path="/models/other"))


def test_model_status():
    desired = b.build_model_spec("m", {"source": {"path": "m"}})
    st = b.build_model_status(_model_out(desired), {"source": {"path": "m"}}, 4)
    assert st == {"observedGeneration": 4, "registered": True, "engines": ["e1"], "replicas": 1, "ready": True,
                  "attainment": 0.95, "selector": "app.kubernetes.io/component=worker,tokenpool.dev/pool=default"}
    pods = b.build_worker_daemonset("default", "ns", {})["spec"]["template"]["metadata"]["labels"]
    assert dict(kv.split("=") for kv in st["selector"].split(",")).items() <= pods.items()
    loading = b.build_model_status(_model_out(desired, engines=[]), {"source": {"path": "m"}}, 4)
    assert loading["registered"] and not loading["ready"] and loading["replicas"] == 0
    scaled_to_zero = b.build_model_status(_model_out(desired, engines=[]), {"replicas": {"min": 0}}, 4)
    assert scaled_to_zero["ready"]
    assert not b.build_model_status(None, {}, 1)["registered"]


def test_tenant_key_hashes_are_stable_verifiable_and_per_tenant():
    h = b.tenant_key_hashes("team-a", ["key-1", " key-2\n", ""])
    assert len(h) == 2 and h == b.tenant_key_hashes("team-a", ["key-2", "key-1"])  # same Secret, same hashes
    assert sorted(verify_key(k, x) for k in ("key-1", "key-2") for x in h) == [False, False, True, True]
    assert set(h).isdisjoint(b.tenant_key_hashes("team-b", ["key-1", "key-2"]))
    pre = hash_key("key-3")
    assert b.tenant_key_hashes("team-a", [pre]) == [pre]  # a Secret may hold hashes only


def test_secret_keys():
    data = {k: base64.b64encode(v.encode()).decode() for k, v in {"a": "ka", "b": "kb"}.items()}
    assert b.secret_keys(data, None) == ["ka", "kb"]
    assert b.secret_keys(data, ["b"]) == ["kb"]
    with pytest.raises(KeyError, match="c"):
        b.secret_keys(data, ["c"])


def test_tenant_create_body_and_match():
    hashes = b.tenant_key_hashes("t", ["k"])
    body = b.build_tenant_create("t", {"keysSecretRef": {"name": "s"}, "models": ["a-*"], "maxConcurrent": 4,
                                       "rateLimits": {"requestsPerSecond": 2, "tokensPerMinute": 600},
                                       "priority": 2, "sloClass": "gold"}, hashes)
    assert body == {"name": "t", "models": ["a-*"], "max_concurrent": 4, "priority": 2, "slo_class": "gold",
                    "rate": {"requests_per_s": 2.0, "burst": None, "tokens_per_min": 600.0}, "key_hashes": hashes}
    shown = TenantOut(name="t", models=["a-*"], rate=RateLimit(requests_per_s=2, tokens_per_min=600), max_concurrent=4,
                      priority=2, slo_class="gold", inflight=0, usage={}).model_dump(mode="json")
    assert b.tenant_matches(body, shown)
    assert not b.tenant_matches(body, {**shown, "models": ["*"]})
    assert not b.tenant_matches(body, None)
    with pytest.raises(ValueError, match="key_hashes"):
        b.build_tenant_create("t", {}, ["not-a-hash"])
    assert b.build_tenant_create("t", {}, hashes)["models"] == ["*"]


def test_worker_daemonset_one_container_per_gpu():
    spec = {"gpusPerNode": 4, "hostCacheGB": 128, "nodeSelector": {"pool": "a"}, "modelsClaim": "weights",
            "tolerations": [{"key": "gpu", "operator": "Exists"}], "controllerAddress": "ctl:9000",
            "gpuBudgetGB": 60, "policy": "request"}
    ds = b.build_worker_daemonset("a", "ns", spec)
    pod = ds["spec"]["template"]["spec"]
    assert ds["metadata"] == {**ds["metadata"], "name": "tokenpool-workers-a", "namespace": "ns"}
    assert [c["name"] for c in pod["containers"]] == ["worker-0", "worker-1", "worker-2", "worker-3"]
    for c in pod["containers"]:
        # requests by default (not BestEffort): 2 CPUs, its share of the 128 GB host cache + 4 GiB; no memory limit
        assert c["resources"] == {"requests": {"cpu": "2", "memory": "36Gi"}, "limits": {"nvidia.com/gpu": "1"}}
        assert c["command"] == ["python", "-m", "controller.worker", "--controller", "ctl:9000", "--device", "cuda:0",
                                "--policy", "request", "--host-cache-gb", "128", "--gpu-budget-gb", "60"]
        tok = next(e for e in c["env"] if e["name"] == "TOKENPOOL_JOIN_TOKEN")
        assert tok["valueFrom"]["secretKeyRef"] == {"name": "tokenpool-join-token", "key": "token"}
        assert {m["mountPath"] for m in c["volumeMounts"]} == {"/dev/shm", "/tmp", "/models"}
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["host-cache"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "128Gi"}  # shared by the pod's workers
    assert vols["models"]["persistentVolumeClaim"] == {"claimName": "weights", "readOnly": True}
    assert pod["nodeSelector"] == {"pool": "a"} and pod["tolerations"] == spec["tolerations"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    assert not pod["automountServiceAccountToken"]


def test_worker_resources_of_the_pool_keep_the_gpu():
    own = {"requests": {"cpu": "500m", "memory": "8Gi"}, "limits": {"memory": "64Gi", "nvidia.com/gpu": "2"}}
    (c,) = b.build_worker_daemonset("a", "ns", {"workerResources": own})["spec"]["template"]["spec"]["containers"]
    assert c["resources"] == {"requests": {"cpu": "500m", "memory": "8Gi"},
                              "limits": {"memory": "64Gi", "nvidia.com/gpu": "1"}}  # one GPU a worker, always
    (c,) = b.build_worker_daemonset("a", "ns", {"workerResources": {}})["spec"]["template"]["spec"]["containers"]
    assert c["resources"] == {"limits": {"nvidia.com/gpu": "1"}}  # (asked for: nothing but the GPU)
    (c,) = b.build_worker_daemonset("a", "ns", {"hostCacheGB": 5, "gpusPerNode": 1})["spec"]["template"]["spec"][
        "containers"]
    assert c["resources"]["requests"] == {"cpu": "2", "memory": "9Gi"}


def test_worker_daemonset_digest_follows_the_spec():
    one = b.build_worker_daemonset("a", "ns", {"gpusPerNode": 1})
    assert one == b.build_worker_daemonset("a", "ns", {"gpusPerNode": 1})
    two = b.build_worker_daemonset("a", "ns", {"gpusPerNode": 2})
    d = b.ANNOTATION_DIGEST
    assert one["metadata"]["annotations"][d] != two["metadata"]["annotations"][d]
    assert "models" not in {v["name"] for v in one["spec"]["template"]["spec"]["volumes"]}


def test_pool_status():
    engines = [{"alive": True, "draining": False}, {"alive": True, "draining": True}, {"alive": False, "draining": False}]
    st = b.build_pool_status(engines, {"status": {"numberReady": 3}}, {"gpusPerNode": 8}, 2)
    assert st == {"observedGeneration": 2, "nodes": 3, "gpus": 24, "enginesReady": 1}
    assert b.build_pool_status([], None, {}, None)["nodes"] == 0


def test_conditions_move_only_on_a_flip():
    c1 = b.build_conditions("Progressing", "Loading", "wait", 1, None, "t1")
    assert [(c["type"], c["status"]) for c in c1] == [("Ready", "False"), ("Progressing", "True"), ("Degraded", "False")]
    assert all(c["observedGeneration"] == 1 and c["lastTransitionTime"] == "t1" for c in c1)
    c2 = b.build_conditions("Ready", "Serving", "ok", 2, c1, "t2")
    times = {c["type"]: c["lastTransitionTime"] for c in c2}
    assert times == {"Ready": "t2", "Progressing": "t2", "Degraded": "t1"}
    assert b.build_conditions("Ready", "Serving", "ok", 2, c2, "t3") == c2  # a converged reconcile writes the same
    assert "observedGeneration" not in b.build_conditions("Ready", "r", "m", None, None, "t")[0]
    with pytest.raises(ValueError):
        b.build_conditions("Happy", "r", "m", 1, None, "t")


def test_with_defaults_and_digest():
    d = {"a": 1, "b": {"c": 2, "d": 3}}
    got = b.with_defaults({"b": {"c": 5}, "e": [1]}, d)
    assert got == {"a": 1, "b": {"c": 5, "d": 3}, "e": [1]} and d == {"a": 1, "b": {"c": 2, "d": 3}}
    assert b.digest({"x": 1, "y": 2}) == b.digest({"y": 2, "x": 1}) != b.digest({"x": 1, "y": 3})


def test_a_tenants_live_fields_are_a_patch_the_admin_api_takes():
    """What the operator PATCHes for a Tenant's limits change is a TenantPatch naming every field it shows (so a
    field the spec no longer sets, such as maxConcurrent, is cleared); its keys only when they changed (a rotation:
    `tenant_keys_unchanged`, in place too)."""
    from controller.api.admin_protocol import TenantPatch

    for spec in ({}, {"models": ["a"], "rateLimits": {"burst": 2}, "maxConcurrent": 4, "priority": -1,
                      "sloClass": "batch"}):
        live = b.tenant_live_fields(b.build_tenant_create("t", spec, []))
        patch = TenantPatch.model_validate(live)
        assert set(patch.changes()) == set(live)
        assert patch.model_dump(mode="json", exclude_unset=True) == live and "key_hashes" not in live
        assert "key_hashes" not in live
