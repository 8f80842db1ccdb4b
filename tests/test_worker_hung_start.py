"""A local worker process that never joins its controller (hung in its start-up, or a standby stopped with SIGSTOP
before it took over) is killed after a deadline and the slot gets another: the slot used to stay without a worker
for good, every request for its models waiting in vain."""

from __future__ import annotations

import asyncio
import sys

import controller.pool as pool_mod
from controller.config import GPUSettings, WorkerSettings
from controller.pool import EnginePool


def test_a_local_worker_that_never_joins_is_killed_and_replaced(monkeypatch):
    monkeypatch.setattr(pool_mod, "COLD_JOIN_S", 0.3)

    async def go():
        pool = EnginePool(WorkerSettings(local="cpu", standby=False), GPUSettings(), on_registered=lambda e, p: None,
                          on_dead=lambda e, o: None, on_loaded=lambda e, r, s: None, on_stats=lambda e: None)
        spawned: list[asyncio.subprocess.Process] = []

        async def spawn(slot, device, standby=False):  # a worker that never registers
            p = await asyncio.create_subprocess_exec(sys.executable, "-c", "import time; time.sleep(60)")
            spawned.append(p)
            return p

        pool._spawn = spawn
        task = asyncio.create_task(pool._supervise(0, "cpu"))
        try:
            for _ in range(200):
                if len(spawned) >= 2:
                    break
                await asyncio.sleep(0.05)
            assert len(spawned) >= 2, "the hung worker was not replaced"
            assert await asyncio.wait_for(spawned[0].wait(), 5) == -9
        finally:
            pool._stopping = True
            task.cancel()
            for p in spawned:
                if p.returncode is None:
                    p.kill()
                    await p.wait()

    asyncio.run(go())


def test_a_standby_starts_once_its_workers_first_loads_are_done(monkeypatch):
    """The spare's warm-up (imports, a CUDA context) ran beside its worker's first loads on the host's cores and
    slowed the server's start; it starts once the worker has joined and loaded (start-up's registrations)."""
    from controller.pool import EngineHandle, Replica

    # (then once the slot has been idle SPARE_IDLE_S, 2 s: tests/test_ux63g_start_stop.py; shortened here)
    monkeypatch.setattr(pool_mod, "SPARE_IDLE_S", 0.2)

    async def go():
        pool = EnginePool(WorkerSettings(local="cpu", standby=True), GPUSettings(), on_registered=lambda e, p: None,
                          on_dead=lambda e, o: None, on_loaded=lambda e, r, s: None, on_stats=lambda e: None)
        spawned: list[tuple[bool, asyncio.subprocess.Process]] = []

        async def spawn(slot, device, standby=False):
            p = await asyncio.create_subprocess_exec(sys.executable, "-c", "import time; time.sleep(60)")
            spawned.append((standby, p))
            if not standby:  # it joins with a model loading
                e = EngineHandle("w0", 0, "cpu", "node1", p.pid, 10**9, None)
                e.replicas["m"] = Replica("m")
                pool.engines["w0"] = e
            return p

        pool._spawn = spawn
        task = asyncio.create_task(pool._supervise(0, "cpu"))
        try:
            await asyncio.sleep(0.8)  # (the spare used to start 0.2 s after the join)
            assert [s for s, _ in spawned] == [False], "a spare started beside the worker's first load"
            pool.engines["w0"].replicas["m"].state = "ready"
            for _ in range(40):
                if len(spawned) == 2:
                    break
                await asyncio.sleep(0.05)
            assert [s for s, _ in spawned] == [False, True]
        finally:
            pool._stopping = True
            task.cancel()
            for _, p in spawned:
                if p.returncode is None:
                    p.kill()
                    await p.wait()

    asyncio.run(go())
