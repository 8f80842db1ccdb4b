"""What `kubectl describe` and `kubectl get` show of a GPUPool, a PooledModel and a Tenant across a controller outage:
a Normal event when each turns Ready (the first time, and back from Degraded), once per transition, not per round
(the operator posted Warnings only: a recovery was seen nowhere but in the conditions); and, while Degraded, no
status field from before the outage (a model said `ready: true` on its old replicas, the scale subresource's, a pool
its old engine count, a tenant its keys). On kmock's emulator with a fake controller, the operator run by kopf
in-process, as tests/test_operator_lifecycle.py."""

from __future__ import annotations

import threading
import uuid

import pytest

kopf = pytest.importorskip("kopf")
kmock = pytest.importorskip("kmock")

from tests.kmock_util import SECRETS, operator_world  # noqa: E402
from tests.operator_events import captured, posted  # noqa: E402
from tests.test_operator_e2e import Operator, _obj, _until  # noqa: E402
from tests.test_operator_lifecycle import _reason  # noqa: E402

PORTS = range(27500, 27600)
OBJECTS = (("gpupools", "default", "EnginesReady"), ("pooledmodels", "m", "Serving"), ("tenants", "t", "Applied"))


def _normal(kube, name: str) -> list[dict]:
    return posted(kube, name, "Normal")


def _counted(kube, n: int):
    async def check() -> bool:
        return all(len(_normal(kube, name)) >= n for _, name, _ in OBJECTS)

    return check


# What the rounds read of the controller, a round of each object: the pool's engines, the model's models, the
# tenant's tenants and models
ROUND_READS = {"/admin/engines": 1, "/admin/models": 2, "/admin/tenants": 1}


def _rounds(fake, n: int):
    """A check that the objects' rounds ran `n` more times each (by their reads) than when it was made."""
    before = {p: fake.count("GET", p) for p in ROUND_READS}

    async def check() -> bool:
        return all(fake.count("GET", p) >= before[p] + k * n for p, k in ROUND_READS.items())

    return check


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_ready_and_recovered_are_normal_events_and_a_degraded_status_keeps_nothing_stale(tmp_path, monkeypatch):
    from controller.operator import handlers

    monkeypatch.setattr(handlers, "UNAVAILABLE_RETRY_S", 1.0)  # (a round as soon as the controller is back)
    async with operator_world(tmp_path, monkeypatch, port_range=PORTS, secrets=SECRETS) as w:
        kube, fake = w.kube, w.fake
        async with Operator():
            await kube.create("gpupools", _obj("GPUPool", "default", {}))
            await kube.create("pooledmodels", _obj("PooledModel", "m", {"engine": {"kind": "pace"}}))
            await kube.create("tenants", _obj("Tenant", "t", {"keysSecretRef": {"name": "keys"}}))
            for plural, name, reason in OBJECTS:
                await _until(f"{plural}/{name} {reason}", lambda p=plural, n=name, r=reason: _reason(kube, p, n, r))
            await _until("a Normal event each", _counted(kube, 1))
            m = await kube.get("pooledmodels", "m")
            assert m["status"]["ready"] is True and m["status"]["replicas"] == 1
            assert (await kube.get("gpupools", "default"))["status"]["enginesReady"] == 1
            await _until("two more rounds", _rounds(fake, 2))  # still Ready, no other event
            for _, name, reason in OBJECTS:
                assert [e["reason"] for e in _normal(kube, name)] == [reason], name

            fake.down = True  # the controller's Service has no endpoint
            for plural, name, _ in OBJECTS:
                await _until(f"{plural}/{name} ControllerUnavailable",
                             lambda p=plural, n=name: _reason(kube, p, n, "ControllerUnavailable"))
            # What the rounds could not see is not said: no replicas (an HPA read 1), not ready, no engines, no keys.
            pool, m, t = [await kube.get(p, n) for p, n, _ in OBJECTS]
            assert not {"ready", "replicas", "registered", "engines"} & set(m["status"]), m["status"]
            assert m["status"]["served"] == "m" and m["status"]["appliedDigest"]  # (the operator's own bookkeeping)
            assert "enginesReady" not in pool["status"] and pool["status"]["nodes"] == 0  # (its DaemonSet: seen)
            assert "keys" not in t["status"], t["status"]

            fake.down = False
            for plural, name, reason in OBJECTS:
                await _until(f"{plural}/{name} {reason} again", lambda p=plural, n=name, r=reason: _reason(kube, p, n, r))
            await _until("a second Normal event each", _counted(kube, 2))
            await _until("two more rounds", _rounds(fake, 2))
            for _, name, reason in OBJECTS:
                events = _normal(kube, name)
                assert [e["reason"] for e in events] == [reason, reason], name
                assert "no longer Degraded: ControllerUnavailable" in events[1]["message"], events[1]
            m = await kube.get("pooledmodels", "m")
            assert m["status"]["ready"] is True and m["status"]["replicas"] == 1 and m["status"]["registered"]
            assert (await kube.get("tenants", "t"))["status"]["keys"] == 1


@pytest.fixture()
def handlers(monkeypatch):
    # Importing the handlers fixes their timers' interval for this process: the e2e test's (see test_operator_kube)
    monkeypatch.setenv("TOKENPOOL_OPERATOR_RESYNC_S", "1")
    from controller.operator import handlers

    return handlers


def test_a_ready_event_is_posted_once_per_transition(handlers, monkeypatch):
    """Rounds as kopf runs them, their status snapshots lagging (a timer's, a replayed event's): one Normal event on
    turning Ready, none while it stays so, one again on recovering, naming what it recovered from; none for an
    object already Ready when the operator starts (its status says so)."""
    events = captured(monkeypatch)
    body = {"kind": "PooledModel", "metadata": {"name": "m", "uid": str(uuid.uuid4())}}
    status: dict = {}

    def round_(state: str, reason: str, snapshot: dict | None = None) -> None:
        patch = kopf.Patch()
        handlers._write_status(body, patch, snapshot if snapshot is not None else status, {}, state, reason,
                               f"{reason}!", 1)
        status.update(patch.status)

    round_("Progressing", "Loading")
    before = dict(status)
    round_("Ready", "Serving")
    round_("Ready", "Serving")
    round_("Ready", "Serving", snapshot=before)  # (a lagging snapshot: still Loading)
    assert events == [("Normal", "Serving", "Serving!")]
    ready = dict(status)
    round_("Degraded", "ControllerUnavailable")
    round_("Ready", "Serving", snapshot=ready)  # (a lagging snapshot: still Ready, while Degraded was written last)
    assert events[1:] == [("Warning", "ControllerUnavailable", "ControllerUnavailable!"),
                          ("Normal", "Serving", "Serving! (no longer Degraded: ControllerUnavailable)")]
    # An operator restarting (nothing remembered) over an object that is Ready: no event.
    other = {"kind": "PooledModel", "metadata": {"name": "o", "uid": str(uuid.uuid4())}}
    handlers._write_status(other, kopf.Patch(), ready, {}, "Ready", "Serving", "Serving!", 1)
    assert len(events) == 3
    handlers._forget(kopf.Memo(locks_guard=threading.Lock()), body["metadata"]["uid"])
    assert body["metadata"]["uid"] not in handlers._TOLD_READY


def test_a_degraded_round_clears_what_it_did_not_see(handlers):
    """A Serving PooledModel (ready, 2 replicas) edited into a spec the operator cannot apply: Degraded InvalidSpec,
    and its status no longer says ready on 2 replicas (its round read nothing of the controller)."""
    memo = kopf.Memo(applied={}, locks={}, served={})
    memo.locks_guard = threading.Lock()
    meta = {"name": "m", "namespace": "tp", "uid": str(uuid.uuid4()), "generation": 2}
    status = {"observedGeneration": 1, "registered": True, "ready": True, "replicas": 2, "engines": ["e0", "e1"],
              "attainment": 0.9, "served": "m", "selector": "s", "appliedDigest": "d",
              "conditions": [{"type": "Ready", "status": "True", "reason": "Serving", "message": "on 2 engine(s)",
                              "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}]}
    patch = kopf.Patch()
    handlers._reconcile_model(name="m", namespace="tp", spec={"engine": {"kind": "llm"}}, status=status, meta=meta,
                              patch=patch, memo=memo, runtime=None)
    assert next(c for c in patch.status["conditions"] if c["status"] == "True")["reason"] == "InvalidSpec"
    assert {k: patch.status[k] for k in ("registered", "ready", "replicas", "engines", "attainment")} == dict.fromkeys(
        ("registered", "ready", "replicas", "engines", "attainment"))  # (null: removed by the merge patch)
    assert not {"served", "selector", "appliedDigest"} & set(patch.status)
