"""A GPUPool carries no finalizer (it has nothing to clean up: its DaemonSet goes by its owner reference), so
deleting one never waits on the operator, running or not, while its periodic resync still runs; the timer stops
when the pool is deleted (it does not make the workers of a deleted pool again). On kmock's emulator with a fake
controller, as tests/test_operator_lifecycle.py."""

from __future__ import annotations

import asyncio

import pytest

kopf = pytest.importorskip("kopf")
kmock = pytest.importorskip("kmock")

from tests.test_operator_e2e import GV, NS, _obj, _until  # noqa: E402
from tests.test_operator_lifecycle import FINALIZER, Operator, _gone, _reason  # noqa: E402
from tests.test_operator_lifecycle import world as lifecycle_world  # noqa: E402

world = lifecycle_world


def _engines(obj: dict | None) -> int | None:
    return ((obj or {}).get("status") or {}).get("enginesReady")


@pytest.mark.asyncio
@pytest.mark.timeout(90)
async def test_a_pool_has_no_finalizer_and_its_delete_waits_on_no_operator(world):
    """`kubectl delete gpupool` returns at once, with the operator running or not (KServe's and most operators'
    objects with nothing to clean up carry no finalizer), and the pool's timer still resyncs it until then."""
    kube, fake = world
    async with Operator() as runner:
        await kube.create("gpupools", _obj("GPUPool", "default", {}))
        pool = await _until("pool Ready", lambda: _reason(kube, "gpupools", "default", "EnginesReady"))
        assert FINALIZER not in (pool["metadata"].get("finalizers") or [])
        # The timer still resyncs it: a second engine joining shows in its status with no change to the pool.
        fake.engines.append({"id": "e1", "alive": True, "draining": False, "models": []})
        await _until("2 engines ready (the timer)", lambda: _engines_are(kube, 2))
        assert FINALIZER not in ((await kube.get("gpupools", "default"))["metadata"].get("finalizers") or [])

        # Deleted while the operator runs: gone at once; its timer stops (no more rounds, no workers made again).
        await kube.delete("gpupools", "default")
        assert await _gone(kube, "gpupools", "default")
        await kube.delete("daemonsets", "tokenpool-workers-default")  # (kmock has no garbage collector)
        # The other pool as an older operator left it (an upgrade): with kopf's finalizer, which comes off.
        other = _obj("GPUPool", "other", {})
        other["metadata"]["finalizers"] = [FINALIZER]
        await kube.create("gpupools", other)
        await _until("other Ready", lambda: _reason(kube, "gpupools", "other", "EnginesReady"))
        await _until("other's finalizer removed", lambda: _no_finalizer(kube, "other"))
        reads, rounds = _reads(kube, "default"), fake.count("GET", "/admin/engines")
        # Two rounds of the other pool's timer (same interval): the deleted pool's would have gone round too.
        await _until("two rounds of the other pool's timer", lambda: _after(fake, rounds + 2))
        assert _reads(kube, "default") == reads
        assert await kube.get("daemonsets", "tokenpool-workers-default") is None

    # (A timer round that went well is a DEBUG line, not INFO: every 30 s for each object, a converged operator's
    # log would be nothing else.)
    rounds = [ln for ln in runner.output.splitlines() if "Timer 'resync_pool' succeeded." in ln]
    assert rounds and all("DEBUG" in ln for ln in rounds), rounds[:3]
    # (Its watch requests end within 10 minutes, from the API server's side: a silently dropped stream is redone.)
    watches = [r for r in kube.k8s if r.url.query.get("watch") == "true"]
    assert watches and {r.url.query.get("timeoutSeconds") for r in watches} == {"600"}

    # The operator is gone: a pool's delete does not wait on it.
    await kube.delete("gpupools", "other")
    assert await _gone(kube, "gpupools", "other")


async def _engines_are(kube, n: int) -> bool:
    return _engines(await kube.get("gpupools", "default")) == n


async def _no_finalizer(kube, name: str) -> bool:
    obj = await kube.get("gpupools", name)
    return obj is not None and FINALIZER not in (obj["metadata"].get("finalizers") or [])


def _reads(kube, name: str) -> int:
    """GETs of GPUPool `name` made so far (a timer round of it makes one; kopf itself only lists and watches)."""
    path = f"/apis/{GV}/namespaces/{NS}/gpupools/{name}"
    return sum(1 for r in kube.k8s if r.method.value == "GET" and r.url.path == path)


async def _after(fake, n: int) -> bool:
    return fake.count("GET", "/admin/engines") >= n


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_timer_round_of_a_pool_that_is_gone_touches_nothing(tmp_path, monkeypatch):
    """A round of a pool's timer after the pool was deleted (its DELETED event lost, a watch restarted) or made
    again under the same name (another uid): no DaemonSet made, no status written."""
    import threading
    import uuid

    from tests.test_operator_kube import _emulated, _NoEngines

    monkeypatch.setenv("TOKENPOOL_OPERATOR_RESYNC_S", "1")  # (importing the handlers fixes it: see test_operator_kube)
    from controller.operator import handlers

    async with _emulated(tmp_path) as (kube, k8s):
        k8s.resources[f"{GV}/gpupools"] = kmock.ResourceInfo(kind="GPUPool", namespaced=True)
        memo = kopf.Memo(kube=kube, admin=_NoEngines(), applied={}, locks={})
        memo.locks_guard = threading.Lock()
        meta = {"name": "a", "namespace": NS, "uid": str(uuid.uuid4()), "generation": 1}
        body = kopf.Body({"apiVersion": GV, "kind": "GPUPool", "metadata": meta, "spec": {}})
        for again in (False, True):
            if again:
                r = await k8s.post(f"/apis/{GV}/namespaces/{NS}/gpupools", json={
                    "apiVersion": GV, "kind": "GPUPool", "spec": {},
                    "metadata": {"name": "a", "namespace": NS, "uid": str(uuid.uuid4())}})
                assert r.status < 300
            patch = kopf.Patch()
            await asyncio.to_thread(handlers.resync_pool, name="a", namespace=NS, spec={}, status={}, meta=meta,
                                    body=body, patch=patch, memo=memo)
            assert not patch
            r = await k8s.get(f"/apis/apps/v1/namespaces/{NS}/daemonsets/tokenpool-workers-a")
            assert r.status == 404
