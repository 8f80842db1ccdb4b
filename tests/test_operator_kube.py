"""controller/operator/kube.py against kmock's Kubernetes emulator: what reaches the cluster when a GPUPool
changes (the worker DaemonSet it applies), without the rest of the operator."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import threading
import uuid

import pytest

kmock = pytest.importorskip("kmock")
pytest.importorskip("kubernetes")

from controller.operator import builders as b  # noqa: E402
from controller.operator.kube import Kube  # noqa: E402
from tests.kmock_util import free_port, write_kubeconfig  # noqa: E402

NS = "tp"


@contextlib.asynccontextmanager
async def _emulated(tmp_path):
    """A `Kube` on a fresh emulator, and the emulator (to read objects back the way kubectl would)."""
    async with kmock.KubernetesEmulator() as k8s, kmock.Server(k8s, port=free_port()):
        k8s.resources["apps/v1/daemonsets"] = kmock.ResourceInfo(kind="DaemonSet", namespaced=True)
        k8s.resources["v1/secrets"] = kmock.ResourceInfo(kind="Secret", namespaced=True)
        cfg = write_kubeconfig(k8s, tmp_path / "kubeconfig", NS)
        yield await asyncio.to_thread(Kube, str(cfg)), k8s


async def _daemonset(k8s, name: str) -> dict:
    r = await k8s.get(f"/apis/apps/v1/namespaces/{NS}/daemonsets/{name}")
    assert r.status == 200, await r.text()
    return await r.json()


def _owned(ds: dict) -> dict:
    ds["metadata"]["ownerReferences"] = [{"apiVersion": "tokenpool.dev/v1alpha1", "kind": "GPUPool", "name": "a",
                                          "uid": str(uuid.uuid4()), "controller": True, "blockOwnerDeletion": True}]
    return ds


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_pool_spec_change_replaces_what_the_daemonset_had(tmp_path):
    """The DaemonSet after a change is the builder's for the new spec, whatever the old one held: a node
    selector label the pool no longer asks for leaves the pods' nodeSelector (a JSON merge patch merges maps:
    the old key stayed, and the workers could only go on nodes with both labels, or none)."""
    async with _emulated(tmp_path) as (kube, k8s):
        await _pool_changes(kube, k8s)


async def _pool_changes(kube: Kube, k8s) -> None:
    name = "tokenpool-workers-a"
    one = b.build_worker_daemonset("a", NS, {"nodeSelector": {"gpu": "h100", "zone": "z1"}, "gpusPerNode": 2})
    await asyncio.to_thread(kube.apply_daemonset, _owned(one))
    got = await _daemonset(k8s, name)
    assert got["spec"]["template"]["spec"]["nodeSelector"] == {"gpu": "h100", "zone": "z1"}

    for spec in ({"nodeSelector": {"gpu": "h200"}, "gpusPerNode": 1},  # a key dropped, a value changed
                 {"nodeSelector": {}, "gpusPerNode": 1},  # every GPU node
                 {"gpusPerNode": 1}):  # the default selector again
        want = b.build_worker_daemonset("a", NS, spec)
        await asyncio.to_thread(kube.apply_daemonset, _owned(want))
        got = await _daemonset(k8s, name)
        pod = got["spec"]["template"]["spec"]
        assert (pod.get("nodeSelector") or {}) == want["spec"]["template"]["spec"]["nodeSelector"], spec
        assert [c["name"] for c in pod["containers"]] == ["worker-0"]
        assert got["metadata"]["annotations"][b.ANNOTATION_DIGEST] == want["metadata"]["annotations"][b.ANNOTATION_DIGEST]


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_refused_daemonset_says_why_in_the_pools_status(tmp_path, monkeypatch):
    """The API server refuses a DaemonSet the CRD's schema lets through (a toleration with operator Exists and a
    value): the GPUPool's Degraded condition carries the API server's message, not only '422 Unprocessable
    Entity', and the handler asks kopf to retry."""
    import kopf

    # Importing the handlers fixes their timers' interval for this process: the e2e test's (see test_operator_admin)
    monkeypatch.setenv("TOKENPOOL_OPERATOR_RESYNC_S", "1")
    from controller.operator import handlers

    why = ('DaemonSet.apps "tokenpool-workers-a" is invalid: spec.template.spec.tolerations[0].operator: '
           'Invalid value: "Exists": value must be empty when `operator` is \'Exists\'')
    async with _emulated(tmp_path) as (kube, k8s):
        k8s[f"post /apis/apps/v1/namespaces/{NS}/daemonsets"] << 422 << {
            "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Invalid", "code": 422, "message": why}
        memo = kopf.Memo(kube=kube, applied={}, locks={})
        memo.locks_guard = threading.Lock()
        spec = {"tolerations": [{"key": "gpu", "operator": "Exists", "value": "x"}]}
        meta = {"name": "a", "namespace": NS, "uid": str(uuid.uuid4()), "generation": 3}
        body = kopf.Body({"apiVersion": "tokenpool.dev/v1alpha1", "kind": "GPUPool", "metadata": meta, "spec": spec})
        patch = kopf.Patch()
        with pytest.raises(kopf.TemporaryError, match="value must be empty"):
            await asyncio.to_thread(handlers.reconcile_pool, name="a", namespace=NS, spec=spec, status={}, meta=meta,
                                    body=body, patch=patch, memo=memo)
    degraded = next(c for c in patch.status["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "WorkersNotApplied"
    assert why in degraded["message"] and degraded["observedGeneration"] == 3


class _NoEngines:
    """The admin API of a controller no worker has joined yet."""

    def engines(self) -> list[dict]:
        return []


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_pool_without_its_join_token_secret_says_so(tmp_path, monkeypatch):
    """The workers' join token comes from a Secret (joinTokenSecretRef). Without it the worker pods cannot start
    (CreateContainerConfigError): the pool is Degraded and names the Secret, instead of waiting for workers
    that never come; once the Secret is there, it waits for them."""
    import kopf

    monkeypatch.setenv("TOKENPOOL_OPERATOR_RESYNC_S", "1")  # see the test above
    from controller.operator import handlers

    async with _emulated(tmp_path) as (kube, k8s):
        memo = kopf.Memo(kube=kube, admin=_NoEngines(), applied={}, locks={})
        memo.locks_guard = threading.Lock()
        spec = {"joinTokenSecretRef": {"name": "join"}}
        meta = {"name": "a", "namespace": NS, "uid": str(uuid.uuid4()), "generation": 1}
        body = kopf.Body({"apiVersion": "tokenpool.dev/v1alpha1", "kind": "GPUPool", "metadata": meta, "spec": spec})

        async def conditions() -> dict:
            patch = kopf.Patch()
            await asyncio.to_thread(handlers.reconcile_pool, name="a", namespace=NS, spec=spec, status={},
                                    meta=meta, body=body, patch=patch, memo=memo)
            return {c["type"]: c for c in patch.status["conditions"] if c["status"] == "True"}

        st = await conditions()
        assert st["Degraded"]["reason"] == "JoinTokenNotFound" and "'join'" in st["Degraded"]["message"]
        await _daemonset(k8s, "tokenpool-workers-a")  # applied all the same: its pods start once the Secret is there
        r = await k8s.post(f"/api/v1/namespaces/{NS}/secrets", json={
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "join", "namespace": NS}, "data": {"other": "eA=="}})
        assert r.status < 300
        st = await conditions()
        assert st["Degraded"]["reason"] == "JoinTokenNotFound" and "no key 'token'" in st["Degraded"]["message"]
        r = await k8s.patch(f"/api/v1/namespaces/{NS}/secrets/join", json={"data": {"token": "eA=="}},
                            headers={"Content-Type": "application/merge-patch+json"})
        assert r.status < 300
        st = await conditions()
        assert set(st) == {"Progressing"} and st["Progressing"]["reason"] == "WaitingForWorkers"


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_pool_waiting_for_engines_says_what_it_waits_for(tmp_path, monkeypatch):
    """A pool with no engine said "no engine has joined yet" whatever held it up. Its DaemonSet's status tells:
    no node to run on (a nodeSelector that matches no node: a DaemonSet never asks the cluster autoscaler for
    one, so it waits for good: Degraded, a Warning event), pods not ready yet, or pods ready whose engines do not
    join the controller (a wrong join token or controllerAddress)."""
    import kopf

    monkeypatch.setenv("TOKENPOOL_OPERATOR_RESYNC_S", "1")
    from controller.operator import handlers

    async with _emulated(tmp_path) as (kube, k8s):
        memo = kopf.Memo(kube=kube, admin=_NoEngines(), applied={}, locks={})
        memo.locks_guard = threading.Lock()
        spec = {"nodeSelector": {"gpu": "h100"}}
        meta = {"name": "a", "namespace": NS, "uid": str(uuid.uuid4()), "generation": 1}
        body = kopf.Body({"apiVersion": "tokenpool.dev/v1alpha1", "kind": "GPUPool", "metadata": meta, "spec": spec})
        r = await k8s.post(f"/api/v1/namespaces/{NS}/secrets", json={"apiVersion": "v1", "kind": "Secret", "metadata": {
            "name": "tokenpool-join-token", "namespace": NS}, "data": {"token": "eA=="}})
        assert r.status < 300

        async def condition(ds_status: dict | None = None) -> dict:
            if ds_status is not None:  # what the DaemonSet controller writes
                r = await k8s.patch(f"/apis/apps/v1/namespaces/{NS}/daemonsets/tokenpool-workers-a",
                                    json={"status": ds_status}, headers={"Content-Type": "application/merge-patch+json"})
                assert r.status < 300
            patch = kopf.Patch()
            await asyncio.to_thread(handlers.reconcile_pool, name="a", namespace=NS, spec=spec, status={},
                                    meta=meta, body=body, patch=patch, memo=memo)
            return next(c for c in patch.status["conditions"] if c["status"] == "True")

        c = await condition()  # (the DaemonSet controller has not looked at it yet)
        assert (c["type"], c["reason"], c["message"]) == ("Progressing", "WaitingForWorkers", "no engine has joined yet")
        c = await condition({"observedGeneration": 1, "desiredNumberScheduled": 0, "numberReady": 0})
        assert (c["type"], c["reason"]) == ("Degraded", "NoNodes") and "{'gpu': 'h100'}" in c["message"], c
        c = await condition({"desiredNumberScheduled": 2})
        assert (c["type"], c["message"]) == ("Progressing", "2 worker pod(s) scheduled, none ready yet"), c
        c = await condition({"numberReady": 2})
        assert c["type"] == "Progressing" and c["message"].startswith("2 worker pod(s) ready, no engine has joined"), c


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_recreated_pool_adopts_the_daemonset_its_name_left(tmp_path):
    """A GPUPool deleted with --cascade=orphan (its DaemonSet kept, the garbage collector strips the ownerReference)
    and made again, or made again before the collector came by: the DaemonSet has the same spec, so the digest
    matches, but it must become the new pool's (its uid) or deleting the new pool leaves the workers behind."""
    async with _emulated(tmp_path) as (kube, k8s):
        name = "tokenpool-workers-a"
        ds = _owned(b.build_worker_daemonset("a", NS, {}))
        await asyncio.to_thread(kube.apply_daemonset, ds)
        r = await k8s.patch(f"/apis/apps/v1/namespaces/{NS}/daemonsets/{name}",  # what an orphaning delete leaves
                            json={"metadata": {"ownerReferences": None}},
                            headers={"Content-Type": "application/merge-patch+json"})
        assert r.status < 300 and not (await _daemonset(k8s, name))["metadata"].get("ownerReferences")
        again = _owned(b.build_worker_daemonset("a", NS, {}))  # the new pool: another uid, the same spec
        await asyncio.to_thread(kube.apply_daemonset, again)
        got = await _daemonset(k8s, name)
        assert got["metadata"]["ownerReferences"] == again["metadata"]["ownerReferences"]
        newer = _owned(b.build_worker_daemonset("a", NS, {}))  # made again before the collector came by
        await asyncio.to_thread(kube.apply_daemonset, newer)
        got = await _daemonset(k8s, name)
        assert got["metadata"]["ownerReferences"] == newer["metadata"]["ownerReferences"]


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_worker_resources_given_as_numbers_reach_the_daemonset(tmp_path):
    """workerResources quantities as YAML numbers (cpu: 2, cpu: 0.5: the CRD takes int-or-string, as Kubernetes
    does): the client refused the DaemonSet before sending it (its models take quantities as strings), so the
    pool got no workers and no status saying why."""
    async with _emulated(tmp_path) as (kube, k8s):
        spec = {"workerResources": {"requests": {"cpu": 2, "memory": "8Gi"}, "limits": {"cpu": 0.5, "memory": 4}}}
        await asyncio.to_thread(kube.apply_daemonset, _owned(b.build_worker_daemonset("a", NS, spec)))
        res = (await _daemonset(k8s, "tokenpool-workers-a"))["spec"]["template"]["spec"]["containers"][0]["resources"]
        assert res == {"requests": {"cpu": "2", "memory": "8Gi"},
                       "limits": {"cpu": "0.5", "memory": "4", "nvidia.com/gpu": "1"}}



async def _patch_ds(k8s, name: str, body: dict) -> None:
    r = await k8s.patch(f"/apis/apps/v1/namespaces/{NS}/daemonsets/{name}", json=body,
                        headers={"Content-Type": "application/merge-patch+json"})
    assert r.status < 300, await r.text()


def _ds_patches(k8s, name: str) -> int:
    return sum(1 for r in k8s if r.method.value == "PATCH" and r.url.path.endswith(f"/daemonsets/{name}"))


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_hand_edited_daemonset_is_set_back_and_api_server_defaults_are_not_an_edit(tmp_path):
    """`kubectl set image` or `kubectl edit` on the workers' DaemonSet (its digest annotation untouched): the next
    apply sets back what the pool asks for. What the API server adds by itself (defaults, a quantity written
    another way) is not an edit: nothing is patched for it, round after round."""
    async with _emulated(tmp_path) as (kube, k8s):
        name = "tokenpool-workers-a"
        spec = {"workerResources": {"requests": {"cpu": 0.5, "memory": "1Gi"}}, "gpusPerNode": 2}
        want = _owned(b.build_worker_daemonset("a", NS, spec))
        await asyncio.to_thread(kube.apply_daemonset, want)
        got = await _daemonset(k8s, name)
        pod = got["spec"]["template"]["spec"]
        for c in pod["containers"]:  # what the API server fills in and how it writes quantities back
            c.update(imagePullPolicy="IfNotPresent", terminationMessagePath="/dev/termination-log")
            c["resources"]["requests"]["cpu"] = "500m"
        await _patch_ds(k8s, name, {"spec": {"revisionHistoryLimit": 10, "template": {"spec": dict(
            pod, restartPolicy="Always", dnsPolicy="ClusterFirst")}}})
        before = _ds_patches(k8s, name)
        await asyncio.to_thread(kube.apply_daemonset, _owned(b.build_worker_daemonset("a", NS, spec)) | {
            "metadata": want["metadata"]})
        assert _ds_patches(k8s, name) == before  # converged: no write

        edited = copy.deepcopy(pod)
        edited["containers"][0]["image"] = "example.org/other:1"
        edited["containers"] = edited["containers"][:1]
        edited["nodeSelector"] = {"somewhere": "else"}
        await _patch_ds(k8s, name, {"spec": {"template": {"spec": edited}}})
        await asyncio.to_thread(kube.apply_daemonset, _owned(b.build_worker_daemonset("a", NS, spec)) | {
            "metadata": want["metadata"]})
        pod = (await _daemonset(k8s, name))["spec"]["template"]["spec"]
        assert [(c["name"], c["image"]) for c in pod["containers"]] == [
            (c["name"], c["image"]) for c in want["spec"]["template"]["spec"]["containers"]]
        assert pod["nodeSelector"] == want["spec"]["template"]["spec"]["nodeSelector"]
