"""A round's status snapshot older than the write before it (ux64h): a PooledModel that turned Degraded
(ControllerUnavailable) just after turning Serving still said `ready: true` on its engines and replicas (the scale
subresource's, which an HPA reads), or, where the snapshot already said Degraded, kept its Ready condition whole.
kopf applies a round's status patch after the handler returned (its object lock released), and the next round's
snapshot is the object as the watch last showed it: a round that took the lock at once decided on a status from before
the other's write, and cleared only the fields that snapshot held (or wrote nothing where its Degraded equalled the
snapshot's). Now a round also compares with the status this process wrote last. On kmock's emulator with a fake
controller, the operator run by kopf in-process (as tests/test_ux62d_operator.py), the lag made deterministic: the
round is given the older snapshot; and rounds as kopf runs them, for each kind's observed fields."""

from __future__ import annotations

import threading
import uuid

import pytest

kopf = pytest.importorskip("kopf")
kmock = pytest.importorskip("kmock")

from tests.kmock_util import operator_world  # noqa: E402
from tests.test_operator_e2e import Operator, _obj, _until  # noqa: E402
from tests.test_operator_lifecycle import _reason, _true  # noqa: E402

PORTS = range(29100, 29150)
SERVING = {"registered", "engines", "replicas", "ready", "attainment"}  # (what a round reads of the controller)


class Lag:
    """The PooledModel's timer rounds (`handlers._reconcile_model`, spied through `monkeypatch`): `arm` gives the next
    one a status snapshot of the test's (the object as an older watch event showed it) and calls `then` first in its
    thread (the controller going down: no round in between); the round after it waits (`held`) until `release`, so the
    test reads what that one round wrote (kopf applies a timer round's patch before it runs the next)."""

    def __init__(self, monkeypatch) -> None:
        from controller.operator import handlers

        real = handlers._reconcile_model
        self.stale: dict | None = None
        self.then = None
        self.holding, self.held, self.go = False, threading.Event(), threading.Event()

        def spy(**kw):
            if kw.get("runtime") is None:  # (a timer's round; not a change handler's)
                if self.holding:
                    self.held.set()
                    self.go.wait(60)
                elif self.stale is not None:
                    kw["status"], self.stale, self.holding = self.stale, None, True
                    self.then()
            return real(**kw)

        monkeypatch.setattr(handlers, "_reconcile_model", spy)

    def arm(self, stale: dict, then) -> None:
        self.held.clear()
        self.go.clear()
        self.then, self.stale = then, stale

    def release(self) -> None:
        self.holding = False
        self.go.set()


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_a_degraded_round_on_a_snapshot_older_than_serving_keeps_nothing_of_it(tmp_path, monkeypatch):
    """A model Serving; the controller goes down, and the round that sees it has the status the model was created
    with (empty): Degraded, and neither ready, registered, engines nor replicas. Back to Serving; down again, seen by
    a round whose snapshot is the Degraded one before (its condition, its message): the status is that Degraded, not
    the Serving in between."""
    from controller.operator import handlers

    monkeypatch.setattr(handlers, "UNAVAILABLE_RETRY_S", 1.0)  # (the round after the lagging one a second on)
    lag = Lag(monkeypatch)
    async with operator_world(tmp_path, monkeypatch, port_range=PORTS) as w:
        kube, fake = w.kube, w.fake

        def down() -> None:
            fake.down = True

        async def held() -> bool:
            return lag.held.is_set()

        async def serving() -> dict:
            m = await _until("m Serving", lambda: _reason(kube, "pooledmodels", "m", "Serving"))
            assert SERVING - {"attainment"} <= set(m["status"]) and m["status"]["ready"] is True, m["status"]
            return m

        async with Operator():
            try:  # (a round held must go on before the operator stops: it waits for its rounds)
                await kube.create("gpupools", _obj("GPUPool", "default", {}))
                await kube.create("pooledmodels", _obj("PooledModel", "m", {"engine": {"kind": "pace"}}))
                await serving()

                lag.arm({}, down)  # (the create event's status: none yet)
                await _until("the round after the lagging one", held)
                m = await kube.get("pooledmodels", "m")
                assert _true(m).get("reason") == "ControllerUnavailable", m["status"]
                assert not SERVING & set(m["status"]), m["status"]
                degraded = m["status"]
                lag.release()

                fake.down = False
                await serving()
                lag.arm(degraded, down)  # (the Degraded of before: the same condition, the same message)
                await _until("the round after the lagging one", held)
                m = await kube.get("pooledmodels", "m")
                assert _true(m).get("reason") == "ControllerUnavailable", m["status"]
                assert not SERVING & set(m["status"]), m["status"]
                assert m["status"]["served"] == "m" and m["status"]["appliedDigest"]  # (the operator's bookkeeping)
            finally:
                lag.release()

def test_rounds_on_lagging_snapshots_write_over_what_this_process_wrote_last(monkeypatch):
    """Rounds as kopf runs them, each kind's observed fields: a Ready round's write, then a Degraded round on the
    snapshot from before it clears what the Ready one wrote (a pool's engines, a tenant's keys); one whose snapshot
    equals the Degraded it decides writes that Degraded all the same (the object says Ready since); a round on a fresh
    snapshot that changes nothing writes nothing; an operator restarting (nothing written yet) goes by the snapshot."""
    from controller.operator import handlers
    from tests.operator_events import captured

    captured(monkeypatch)  # (no event posted outside kopf)
    for kind, ready, seen in (("GPUPool", {"enginesReady": 2, "nodes": 1, "gpus": 2}, {"nodes": 1, "gpus": 2}),
                              ("Tenant", {"keys": 2, "observedGeneration": 1}, {}),
                              ("PooledModel", {"registered": True, "engines": ["e0"], "replicas": 1, "ready": True,
                                               "attainment": 0.9, "served": "m"}, {})):
        body = {"kind": kind, "metadata": {"name": "x", "uid": str(uuid.uuid4())}}

        def round_(snapshot: dict, fields: dict, state: str, reason: str, body: dict = body) -> dict:
            patch = kopf.Patch()
            handlers._write_status(body, patch, snapshot, fields, state, reason, f"{reason}!", 1)
            return dict(patch.status)

        first = round_({}, {}, "Degraded", "ControllerUnavailable")
        degraded = dict(first)
        ready = round_(degraded, ready, "Ready", "Up")
        now = {k: v for k, v in {**degraded, **ready}.items() if v is not None}
        # On the snapshot before the Ready write: everything observed cleared (kept: what the round saw itself).
        patch = round_({}, seen, "Degraded", "ControllerUnavailable")
        cleared = {k for k, v in patch.items() if v is None}
        assert cleared == set(ready) - set(seen) - {"observedGeneration", "served", "conditions"}, (kind, patch)
        assert _true({"status": patch}).get("reason") == "ControllerUnavailable", (kind, patch)
        now = {k: v for k, v in {**now, **patch}.items() if v is not None}
        # Ready again; then Degraded on a snapshot equal to the Degraded it decides: written.
        now = {k: v for k, v in {**now, **round_(now, ready, "Ready", "Up")}.items() if v is not None}
        patch = round_(degraded, seen, "Degraded", "ControllerUnavailable")
        assert _true({"status": patch}).get("reason") == "ControllerUnavailable", (kind, patch)
        assert {k for k, v in patch.items() if v is None} == cleared, (kind, patch)
        now = {k: v for k, v in {**now, **patch}.items() if v is not None}
        assert round_(now, seen, "Degraded", "ControllerUnavailable") == {}, kind  # (converged: no write)
        # A restarted operator (nothing written by it) on a lagging snapshot: by the snapshot, as before.
        handlers._forget(kopf.Memo(locks_guard=threading.Lock()), body["metadata"]["uid"])
        assert round_(degraded, seen, "Degraded", "ControllerUnavailable") == {k: v for k, v in seen.items()
                                                                              if degraded.get(k) != v}, kind
