"""A GPUPool round under way when its pool is deleted leaves nothing of it in the operator's memo (ux60f). The DELETED
event drops what the operator kept of the pool (`pool_event`, tests/test_ux59a_operator_pool_memo.py), but its timer
rounds run in threads: one still under way then noted its restart check's `seen` (or, waiting on the pool's lock, its
DaemonSet's digest and engine count) after the forget, a memo entry per deleted pool kept for good. On kmock's
emulator with a fake controller, the operator run by kopf in-process; the round held in its restart check's question
to the controller (ControllerWatch.instance) while the pool is deleted."""

from __future__ import annotations

import asyncio
import threading

import pytest

kopf = pytest.importorskip("kopf")
kmock = pytest.importorskip("kmock")

from tests.operator_memo import KEPT, MemoReader  # noqa: E402
from tests.test_operator_e2e import Operator, _obj, _until  # noqa: E402
from tests.test_operator_lifecycle import _gone, _reason  # noqa: E402
from tests.test_ux59a_operator_pool_memo import world as world  # noqa: E402,F401  (the fixture: kmock + fake controller)


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_round_that_ends_after_its_pools_delete_notes_nothing(world, monkeypatch):
    from controller.operator import handlers

    held = MemoReader(monkeypatch).held
    hold, held_now, released = threading.Event(), threading.Event(), threading.Event()
    real_instance = handlers.ControllerWatch.instance

    def instance(self):  # (the restart check's question: held while `hold` is set)
        if hold.is_set():
            held_now.set()
            released.wait(20)
            got = real_instance(self)
            returned.append(got)
            return got
        return real_instance(self)

    returned: list = []
    monkeypatch.setattr(handlers.ControllerWatch, "instance", instance)
    kube, _ = world

    async with Operator():
        await kube.create("gpupools", _obj("GPUPool", "going", {}))
        pool = await _until("pool Ready", lambda: _reason(kube, "gpupools", "going", "EnginesReady"))
        uid = pool["metadata"]["uid"]

        async def noted() -> bool:
            return KEPT <= held(uid)

        await _until("the pool's memo", noted)
        hold.set()
        await _until("a round held in its restart check", lambda: asyncio.sleep(0.05, held_now.is_set()))
        await kube.delete("gpupools", "going")
        assert await _gone(kube, "gpupools", "going")

        async def forgot() -> bool:
            return not held(uid)

        await _until("the deleted pool's memo dropped", forgot, timeout=10)
        released.set()
        hold.clear()
        await _until("the held round went on", lambda: asyncio.sleep(0.05, bool(returned)))
        await asyncio.sleep(1.0)  # (what the round does after its question: noting it, its engine count's look)
        assert not held(uid), held(uid)
        assert handlers._deleted(uid)
