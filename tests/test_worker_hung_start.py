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
