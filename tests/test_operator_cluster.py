"""The operator on a real cluster (runs when KUBECONFIG is set, e.g. a kind cluster; skipped otherwise).

What the kmock test cannot show: the API server's own CRD validation (schemas, the CEL rule on replicas) and
defaulting, metadata.generation, the scale subresource, finalizers and garbage collection of the worker
DaemonSet. The operator runs here in-process (KopfRunner) against the cluster, and the controller is a local
CPU `tokenpool serve` (the DaemonSet's GPU pods may stay Pending on a cluster without GPUs: the controller's own
CPU worker serves). Needs rights to create CRDs and a namespace (cluster-admin on a test cluster).

    kind create cluster && KUBECONFIG=~/.kube/config pytest -q tests/test_operator_cluster.py
"""

from __future__ import annotations

import base64
import os
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.skipif(not os.environ.get("KUBECONFIG"), reason="no cluster: set KUBECONFIG to run")

ROOT = Path(__file__).resolve().parent.parent
GROUP, VERSION = "tokenpool.dev", "v1alpha1"


def _until(what: str, check, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def _ready(obj: dict | None) -> bool:
    conds = ((obj or {}).get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" and
               c.get("observedGeneration") == obj["metadata"]["generation"] for c in conds)


@pytest.mark.timeout(600)
def test_operator_on_a_cluster(tmp_path, monkeypatch):
    kopf_testing = pytest.importorskip("kopf.testing")
    openai = pytest.importorskip("openai")
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    from controller.keys import hash_key, new_key
    from load_tests.live_server import LiveServer

    config.load_kube_config(config_file=os.environ["KUBECONFIG"].split(os.pathsep)[0])
    api = client.ApiClient()
    ext, core, custom, apps = (client.ApiextensionsV1Api(api), client.CoreV1Api(api), client.CustomObjectsApi(api),
                               client.AppsV1Api(api))

    made_crds = []
    for f in sorted((ROOT / "manifests" / "crds").glob("*.yaml")):
        crd = yaml.safe_load(f.read_text())
        if crd.get("kind") != "CustomResourceDefinition":
            continue
        try:
            ext.create_custom_resource_definition(crd)
            made_crds.append(crd["metadata"]["name"])
        except ApiException as e:
            if e.status != 409:
                raise
            cur = ext.read_custom_resource_definition(crd["metadata"]["name"])
            crd["metadata"]["resourceVersion"] = cur.metadata.resource_version
            ext.replace_custom_resource_definition(crd["metadata"]["name"], crd)
    for name in [f"{p}.{GROUP}" for p in ("gpupools", "pooledmodels", "tenants")]:
        _until(f"CRD {name} established", lambda n=name: any(
            c.type == "Established" and c.status == "True" for c in (ext.read_custom_resource_definition(n).status.conditions or [])))

    ns = f"tokenpool-e2e-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": ns}})
    admin_token, tenant_key = new_key("tpadmin"), new_key()
    cfg = {"admin_token_hash": hash_key(admin_token), "auth": True, "workers": {"local": "cpu", "standby": False},
           "autoscaler": {"enabled": False}}

    def cr(plural: str, name: str) -> dict | None:
        try:
            return custom.get_namespaced_custom_object(GROUP, VERSION, ns, plural, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def create(plural: str, kind: str, name: str, spec: dict) -> None:
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, plural, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name}, "spec": spec})

    try:
        with LiveServer(cfg, tmp_path / "srv") as srv:
            import httpx

            adm = {"Authorization": f"Bearer {admin_token}"}
            models = lambda: {m["name"]: m for m in httpx.get(srv.url + "/admin/models", headers=adm).json()}  # noqa: E731
            tenants = lambda: {t["name"] for t in httpx.get(srv.url + "/admin/tenants", headers=adm).json()}  # noqa: E731
            monkeypatch.setenv("TOKENPOOL_CONTROLLER_URL", srv.url)
            monkeypatch.setenv("TOKENPOOL_ADMIN_TOKEN", admin_token)
            monkeypatch.setenv("TOKENPOOL_OPERATOR_RESYNC_S", "2")
            runner = kopf_testing.KopfRunner(["run", "--standalone", "--verbose", "-n", ns, "-m",
                                              "controller.operator.handlers"], timeout=60)
            with runner:
                # The API server validates against the CRD: a CEL rule and a schema bound.
                with pytest.raises(ApiException) as e:
                    create("pooledmodels", "PooledModel", "bad", {"engine": {"kind": "pace"},
                                                                   "replicas": {"min": 3, "max": 2}})
                assert e.value.status == 422
                with pytest.raises(ApiException):
                    create("gpupools", "GPUPool", "bad", {"gpusPerNode": 0})
                with pytest.raises(ApiException) as e:  # loraAdapters is a map list keyed by name
                    create("pooledmodels", "PooledModel", "bad", {"source": {"path": "m"}, "loraAdapters": [
                        {"name": "a", "path": "x"}, {"name": "a", "path": "y"}]})
                assert e.value.status == 422
                with pytest.raises(ApiException) as e:  # an llm model (the default kind) needs source.path
                    create("pooledmodels", "PooledModel", "bad", {"source": {"memoryGB": 1}})
                assert e.value.status == 422 and "an llm model needs source.path" in e.value.body, e.value.body
                for spec, says in (({"engine": {"kind": "pace"}, "pin": True, "replicas": {"min": 0, "max": 0}},
                                    "a pinned model keeps a replica"),
                                   ({"engine": {"kind": "pace"}, "aliases": ["bad"]}, "an alias repeats"),
                                   ({"engine": {"kind": "pace"}, "loraAdapters": [{"name": "a", "path": "x"}]},
                                    "a paced model")):
                    with pytest.raises(ApiException) as e:  # the CEL rules, with their messages
                        create("pooledmodels", "PooledModel", "bad", spec)
                    assert e.value.status == 422 and says in e.value.body, e.value.body

                core.create_namespaced_secret(ns, {"metadata": {"name": "keys"},
                                                   "data": {"k": base64.b64encode(tenant_key.encode()).decode()}})
                core.create_namespaced_secret(ns, {"metadata": {"name": "tokenpool-join-token"},  # the pool's default
                                                   "data": {"token": base64.b64encode(b"tpjoin-test").decode()}})
                create("gpupools", "GPUPool", "default", {})
                create("pooledmodels", "PooledModel", "pace-m", {"engine": {"kind": "pace"}})  # the rest defaulted
                create("tenants", "Tenant", "team", {"keysSecretRef": {"name": "keys"}})

                pm = _until("PooledModel Ready", lambda: (o := cr("pooledmodels", "pace-m")) and _ready(o) and o)
                assert pm["spec"]["replicas"] == {"min": 1, "max": 4}  # server-side defaults
                _until("Tenant Ready", lambda: _ready(cr("tenants", "team")))
                _until("GPUPool Ready", lambda: _ready(cr("gpupools", "default")))
                assert "pace-m" in models() and "team" in tenants()
                ds = apps.read_namespaced_daemon_set("tokenpool-workers-default", ns)
                assert ds.metadata.owner_references[0].kind == "GPUPool"
                c = openai.OpenAI(base_url=srv.url + "/v1", api_key=tenant_key, max_retries=0)
                assert c.completions.create(model="pace-m", prompt="hi", max_tokens=2).usage.completion_tokens == 2

                # Scale through the scale subresource (what HPA and KEDA use).
                custom.patch_namespaced_custom_object_scale(GROUP, VERSION, ns, "pooledmodels", "pace-m",
                                                            {"spec": {"replicas": 3}},
                                                            _content_type="application/merge-patch+json")
                _until("max 3 in the controller", lambda: models().get("pace-m", {}).get("replicas", {}).get("max") == 3)
                pm = _until("generation 2 observed", lambda: (o := cr("pooledmodels", "pace-m")) and _ready(o) and o)
                assert pm["metadata"]["generation"] == 2
                scale = custom.get_namespaced_custom_object_scale(GROUP, VERSION, ns, "pooledmodels", "pace-m")
                assert scale["spec"]["replicas"] == 3 and scale["status"]["replicas"] >= 1
                assert "tokenpool.dev/pool=default" in scale["status"]["selector"]  # what an HPA needs

                # Delete while a request streams: the finalizer drains it first.
                done: dict = {}
                started = threading.Event()

                def consume() -> None:
                    reason = None
                    for ch in c.completions.create(model="pace-m", prompt="hi", max_tokens=150, stream=True):
                        started.set()
                        reason = ch.choices[0].finish_reason or reason
                    done.update(reason=reason, t=time.monotonic())

                t = threading.Thread(target=consume)
                t.start()
                assert started.wait(30)
                custom.delete_namespaced_custom_object(GROUP, VERSION, ns, "pooledmodels", "pace-m")
                assert "pace-m" in models()
                _until("model removed", lambda: "pace-m" not in models())
                removed = time.monotonic()
                t.join(30)
                assert done["reason"] == "length" and done["t"] <= removed
                _until("PooledModel gone", lambda: cr("pooledmodels", "pace-m") is None)

                custom.delete_namespaced_custom_object(GROUP, VERSION, ns, "tenants", "team")
                _until("tenant removed", lambda: "team" not in tenants())
                custom.delete_namespaced_custom_object(GROUP, VERSION, ns, "gpupools", "default")
                _until("workers garbage-collected", lambda: not apps.list_namespaced_daemon_set(ns).items, timeout=120)
    finally:
        for plural in ("pooledmodels", "tenants"):  # if the operator stopped early, release its finalizers
            for o in custom.list_namespaced_custom_object(GROUP, VERSION, ns, plural).get("items", []):
                custom.patch_namespaced_custom_object(GROUP, VERSION, ns, plural, o["metadata"]["name"],
                                                      {"metadata": {"finalizers": None}},
                                                      _content_type="application/merge-patch+json")
        core.delete_namespace(ns)
        for name in made_crds:
            ext.delete_custom_resource_definition(name)
