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
