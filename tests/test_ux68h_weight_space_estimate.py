"""A worker's weight space before its arena exists (controller/hosting.py `HostedModels.weight_capacity`, which the
controller takes at the worker's join and start-up's `_check_fits` judges by) is the arena's own arithmetic
(`gpu_pool.placement.kv_region_bytes`): the KV region rounded up to the arena's alignment, at most all of kv_cache_gb
while the page (the first model's) is not known. It was `budget - kv bytes`, up to 2 MiB more than the arena had: a
model the worker then refused passed start-up."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from controller import messages as m
from controller.app import build_app
from controller.config import EngineOptions, ModelSpec, ServerConfig
from controller.hosting import GpuSettings, HostedModels
from controller.pool import EngineHandle, _weight_capacity
from token_scheduler.policies.slo import ModelSLO

MiB = 2**20
SLO = ModelSLO(ttft_s=5.0, tpot_s=0.5)
# a 3.5 MiB arena whose 1 MiB KV region takes 2 MiB (the alignment): 1.5 MiB of weight space, less than a tiny
# model's 2 MiB slot (the old estimate: 2.5 MiB, enough)
SHORT = dict(budget_bytes=int(3.5 * MiB), kv_cache_gb=MiB / 1e9)


class _Closed:  # a worker connection already closed (EngineHandle.send writes nothing)
    def is_closing(self) -> bool:
        return True


@pytest.mark.parametrize("arch,budget,kv", [
    ("qwen2", 6 * MiB, 1.0 * MiB),  # pages divide the region: the estimate is exact
    ("qwen2", 7 * MiB, 2.5 * MiB),
    ("qwen3", 5 * MiB, 0.3 * MiB),
])
def test_the_estimate_is_never_more_than_the_arena_has(make_tiny, request, arch, budget, kv):
    """Before the arena, and once it is made but no model has carved its KV region, the weight space a worker reports
    is at most what the arena has once the first model registered, and within one alignment (2 MiB) of it."""
    path = make_tiny(arch)
    hm = HostedModels("cpu", GpuSettings(budget_bytes=budget, kv_cache_gb=kv / 1e9,
                                         namespace=f"test-{uuid.uuid4().hex[:10]}"))
    request.addfinalizer(hm.close)
    before = hm.weight_capacity
    opts = EngineOptions(max_num_seqs=2, max_model_len=64)
    hm.prepare(str(path), opts)  # the arena, no KV region yet
    made = hm.weight_capacity
    hm.host("a", str(path), opts, SLO)
    real = hm.weight_capacity
    assert real == hm.kinds["llm"].memory.arena.capacity - hm.kinds["llm"].memory.slot_table.kv_slot.nbytes
    assert before == made <= real < before + 2 * MiB
    if kv == MiB:
        assert before == real


def test_a_model_the_worker_refuses_fails_start_up(make_tiny, request):
    """gpus settings whose arena leaves a tiny model's slot no room once the KV region is aligned: the worker refuses
    the model ("can never fit"), and the controller, judging the joined worker by its estimate, now refuses start-up
    naming the model (it passed, and the model's registration failed on the worker)."""
    path = make_tiny("qwen2")
    hm = HostedModels("cpu", GpuSettings(**SHORT, namespace=f"test-{uuid.uuid4().hex[:10]}"))
    request.addfinalizer(hm.close)
    opts = EngineOptions(max_num_seqs=2, max_model_len=64)
    hm.prepare(str(path), opts)
    with pytest.raises(ValueError, match="can never fit"):
        hm.host("a", str(path), opts, SLO)

    cfg = ServerConfig(models=[ModelSpec(name="tiny", path=str(path))],
                       gpus={"cpu_budget_gb": SHORT["budget_bytes"] / 1e9, "kv_cache_gb": SHORT["kv_cache_gb"]})
    ctl = build_app(cfg).state.controller
    asyncio.run(ctl.add_model(cfg.models[0]))
    ctl.pool.local_slots = 1
    stopped = []
    ctl.on_fatal = lambda: stopped.append(True)
    reg = m.Register(host="node1", pid=1234, device="cpu", memory_bytes=64 * MiB, slot=0)
    e = EngineHandle("w0", 0, "cpu", "node1", 1234, _weight_capacity(reg, ctl.pool.gpu_settings(reg)), _Closed())
    ctl.pool.engines["w0"] = e
    ctl._registered(e, None)  # the pool's call once a worker joined: the first placement
    assert e.memory_bytes == int(1.5 * MiB)
    assert stopped == [True] and ctl.fatal.startswith("model 'tiny' could never load")
    assert e.replicas == {}
