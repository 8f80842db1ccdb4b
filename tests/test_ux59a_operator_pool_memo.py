"""The operator forgets a GPUPool once it is deleted: what it kept of the pool (by uid: the last DaemonSet applied,
its lock, the engine count its round saw, its Warning's memory) was kept for good, a small leak per pool deleted,
as a GPUPool has no delete handler (no finalizer). On kmock's emulator with a fake controller, the operator run by
kopf in-process, as tests/test_operator_lifecycle.py."""

from __future__ import annotations

import pytest
import pytest_asyncio

kopf = pytest.importorskip("kopf")
kmock = pytest.importorskip("kmock")

from tests.kmock_util import operator_world  # noqa: E402
from tests.operator_memo import KEPT, MemoReader  # noqa: E402
from tests.test_operator_e2e import Operator, _obj, _until  # noqa: E402
from tests.test_operator_lifecycle import _gone, _reason  # noqa: E402

PORTS = range(25120, 25140)


@pytest_asyncio.fixture
async def world(tmp_path, monkeypatch):
    async with operator_world(tmp_path, monkeypatch, port_range=PORTS,
                              secrets={"tokenpool-join-token": ("token", b"tp-x")}) as w:
        # (its /health: the restart check notes the instance and the engine count per pool)
        w.fake.handler["get /health"] << (lambda req: kmock.Response(status=200, payload={
            "status": "ok", "engines": 1, "models": 0, "instance": "first"}))
        yield w.kube, w.fake


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_deleted_pools_memo_is_dropped(world, monkeypatch):
    """Two pools, one Ready and one Degraded (its join token's Secret missing: a Warning remembered); once deleted,
    the memo's tables and the Warning's memory hold neither pool's uid, while a pool that stays is kept."""
    held = MemoReader(monkeypatch).held
    kube, _ = world

    async with Operator() as runner:
        await kube.create("gpupools", _obj("GPUPool", "ready", {}))
        await kube.create("gpupools", _obj("GPUPool", "stays", {}))
        await kube.create("gpupools", _obj("GPUPool", "bad", {"joinTokenSecretRef": {"name": "nope", "key": "k"}}))
        ready = await _until("pool Ready", lambda: _reason(kube, "gpupools", "ready", "EnginesReady"))
        bad = await _until("pool Degraded", lambda: _reason(kube, "gpupools", "bad", "JoinTokenNotFound"))
        stays = await _until("other pool Ready", lambda: _reason(kube, "gpupools", "stays", "EnginesReady"))
        uids = {p["metadata"]["name"]: p["metadata"]["uid"] for p in (ready, bad, stays)}

        async def noted() -> bool:  # (its round's engine count is noted after the status is written)
            return all(KEPT <= held(u) for u in uids.values()) and \
                "_WARNED" in held(uids["bad"])

        await _until("the pools' memo", noted)
        for name in ("ready", "bad"):
            await kube.delete("gpupools", name)
            assert await _gone(kube, "gpupools", name)

        async def dropped() -> bool:
            return not held(uids["ready"]) and not held(uids["bad"])

        await _until("the deleted pools' memo dropped", dropped, timeout=10)
        assert KEPT <= held(uids["stays"])
    # (the handler that sees the deletes logs its rounds at DEBUG: it is invoked for every event of every pool)
    assert "Handler 'pool_event' succeeded." in runner.output
    assert not [ln for ln in runner.output.splitlines() if "Handler 'pool_event' succeeded." in ln and "DEBUG" not in ln]
