"""What the operator writes in a resource's status, called as kopf calls its handlers (no cluster needed where the
round stops before any I/O)."""

from __future__ import annotations

import threading
import uuid

import pytest

kopf = pytest.importorskip("kopf")


@pytest.fixture()
def handlers(monkeypatch):
    # Importing the handlers fixes their timers' interval for this process: the e2e test's (see test_operator_kube)
    monkeypatch.setenv("TOKENPOOL_OPERATOR_RESYNC_S", "1")
    from controller.operator import handlers

    return handlers


def test_a_spec_change_that_cannot_be_applied_still_moves_observed_generation(handlers):
    """A Serving PooledModel edited into a spec the operator cannot apply (generation 2): its status says
    InvalidSpec for generation 2, and so does status.observedGeneration, which tools that judge a resource by
    kstatus (Argo CD, Flux, `kubectl wait`-style rollouts) compare with metadata.generation: left at 1, the
    resource would look "in progress" for good instead of failed."""
    memo = kopf.Memo(applied={}, locks={}, served={})
    memo.locks_guard = threading.Lock()
    meta = {"name": "m", "namespace": "tp", "uid": str(uuid.uuid4()), "generation": 2}
    cond = {"type": "Ready", "status": "True", "reason": "Serving", "message": "on 1 engine(s)",
            "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}
    status = {"observedGeneration": 1, "registered": True, "ready": True, "conditions": [cond]}
    patch = kopf.Patch()
    handlers._reconcile_model(name="m", namespace="tp", spec={"engine": {"kind": "llm"}}, status=status, meta=meta,
                              patch=patch, memo=memo, runtime=None)
    ready = next(c for c in patch.status["conditions"] if c["status"] == "True")
    assert (ready["type"], ready["reason"], ready["observedGeneration"]) == ("Degraded", "InvalidSpec", 2)
    assert patch.status["observedGeneration"] == 2


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_an_api_call_that_never_answers_gives_up(tmp_path, monkeypatch):
    """A read of the API server that hangs (a partition, an overloaded server) ends in an error after the client's
    timeout, for kopf to retry, instead of holding the handler's thread and its object's lock for good."""
    import asyncio
    import time

    from controller.operator import kube as kube_module
    from tests.test_operator_kube import NS, _emulated

    monkeypatch.setattr(kube_module, "REQUEST_TIMEOUT_S", 0.3)
    async with _emulated(tmp_path) as (kube, k8s):
        async def hang(req):
            await asyncio.sleep(5)
            return {"kind": "Secret", "apiVersion": "v1", "metadata": {"name": "x", "namespace": NS}, "data": {}}

        k8s[f"get /api/v1/namespaces/{NS}/secrets/x"] << hang
        started = time.monotonic()
        with pytest.raises(Exception, match="timed out"):
            await asyncio.to_thread(kube.secret_data, NS, "x")
        assert time.monotonic() - started < 4


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_pool_whose_workers_cannot_start_says_why(tmp_path, handlers):
    """A pool whose worker pods will not run as they are (an image that cannot be pulled, no GPU free for the
    scheduler) said only "2 worker pod(s) scheduled, none ready yet" for good: it is Degraded with the kubelet's or
    the scheduler's reason and message, naming the pod (what KServe shows of a predictor's pods)."""
    import asyncio

    from tests.test_operator_kube import NS, _emulated, _NoEngines

    async with _emulated(tmp_path) as (kube, k8s):
        import kmock

        k8s.resources["v1/pods"] = kmock.ResourceInfo(kind="Pod", namespaced=True)
        memo = kopf.Memo(kube=kube, admin=_NoEngines(), applied={}, locks={})
        memo.locks_guard = threading.Lock()
        meta = {"name": "a", "namespace": NS, "uid": str(uuid.uuid4()), "generation": 1}
        body = kopf.Body({"apiVersion": "tokenpool.dev/v1alpha1", "kind": "GPUPool", "metadata": meta, "spec": {}})
        r = await k8s.post(f"/api/v1/namespaces/{NS}/secrets", json={"apiVersion": "v1", "kind": "Secret", "metadata": {
            "name": "tokenpool-join-token", "namespace": NS}, "data": {"token": "eA=="}})
        assert r.status < 300

        async def condition() -> dict:
            patch = kopf.Patch()
            await asyncio.to_thread(handlers.reconcile_pool, name="a", namespace=NS, spec={}, status={}, meta=meta,
                                    body=body, patch=patch, memo=memo)
            return next(c for c in patch.status["conditions"] if c["status"] == "True")

        await condition()  # (the DaemonSet made)
        r = await k8s.patch(f"/apis/apps/v1/namespaces/{NS}/daemonsets/tokenpool-workers-a", json={"status": {
            "desiredNumberScheduled": 2, "numberReady": 0}}, headers={"Content-Type": "application/merge-patch+json"})
        assert r.status < 300
        c = await condition()  # pods not made yet, or starting: only waiting
        assert (c["type"], c["reason"]) == ("Progressing", "WaitingForWorkers"), c

        async def pod(name: str, status: dict) -> None:
            r = await k8s.post(f"/api/v1/namespaces/{NS}/pods", json={"apiVersion": "v1", "kind": "Pod", "metadata": {
                "name": name, "namespace": NS, "labels": {"tokenpool.dev/pool": "a"}}, "status": status})
            assert r.status < 300

        await pod("tokenpool-workers-a-x1", {"phase": "Pending", "containerStatuses": [
            {"name": "worker-0", "state": {"waiting": {"reason": "ContainerCreating"}}}]})
        c = await condition()
        assert (c["type"], c["reason"]) == ("Progressing", "WaitingForWorkers"), c
        await pod("tokenpool-workers-a-x2", {"phase": "Pending", "containerStatuses": [
            {"name": "worker-0", "state": {"waiting": {"reason": "ImagePullBackOff",
                                                       "message": 'Back-off pulling image "ghcr.io/x/y:9"'}}}]})
        c = await condition()
        assert (c["type"], c["reason"]) == ("Degraded", "ImagePullBackOff"), c
        assert c["message"] == 'worker pod tokenpool-workers-a-x2, container worker-0: Back-off pulling image "ghcr.io/x/y:9"'
        lists = [r for r in k8s if r.method.value == "GET" and r.url.path == f"/api/v1/namespaces/{NS}/pods"]
        assert {r.url.query.get("labelSelector") for r in lists} == {"app.kubernetes.io/component=worker,tokenpool.dev/pool=a"}
        # The kubelet's other word for the same pull, between back-offs: the same reason (no flapping, no event).
        r = await k8s.patch(f"/api/v1/namespaces/{NS}/pods/tokenpool-workers-a-x2", json={"status": {
            "containerStatuses": [{"name": "worker-0", "state": {"waiting": {"reason": "ErrImagePull",
                                                                             "message": "manifest unknown"}}}]}},
            headers={"Content-Type": "application/merge-patch+json"})
        assert r.status < 300
        c = await condition()
        assert (c["type"], c["reason"]) == ("Degraded", "ImagePullBackOff") and c["message"].endswith("manifest unknown")
        r = await k8s.delete(f"/api/v1/namespaces/{NS}/pods/tokenpool-workers-a-x2")
        assert r.status < 300
        await pod("tokenpool-workers-a-x3", {"phase": "Pending", "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
             "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]})
        c = await condition()
        assert (c["type"], c["reason"]) == ("Degraded", "Unschedulable"), c
        assert "Insufficient nvidia.com/gpu" in c["message"]
