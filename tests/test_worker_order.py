"""A worker applies the controller's LoadModel and UnloadModel in the order they were sent.

Found by CI: the autoscaler dropped an extra registration and placed it again a moment later; the worker answered
the second LoadModel at once (the model was still hosted) and then applied the older UnloadModel between steps, so
the controller routed requests to a worker that no longer hosted the model ("model tiny-b is not loaded here").
These tests play the controller's side of the protocol against a real `controller.worker.Worker`."""

from __future__ import annotations

import asyncio

from controller import messages as m
from controller.config import EngineOptions
from controller.worker import Worker
from load_tests.worker_harness import FakeController
from load_tests.worker_harness import with_worker as _with_worker
from token_scheduler.policies.slo import ModelSLO
from token_scheduler.request import SamplingParams

PACE = EngineOptions(kind="pace", pace_s_per_token=0.001, max_model_len=64)


async def _generate(ctl: FakeController, rid: str, model: str) -> m.Delta:
    ctl.send(m.NewRequest(rid, model, [1, 2, 3], SamplingParams(max_tokens=3, temperature=0.0)))
    while True:
        out = await ctl.expect(m.Outputs)
        for d in out.deltas:
            if d.request_id == rid and d.finished:
                return d


def test_unload_then_load_in_one_tick_leaves_the_model_hosted():
    async def body(ctl: FakeController, worker: Worker) -> None:
        ctl.send(m.LoadModel("a", None, PACE))
        assert (await ctl.expect(m.ModelLoaded)).ok
        ctl.send(m.UnloadModel("a"), m.LoadModel("a", None, PACE))
        assert (await ctl.expect(m.ModelLoaded)).ok
        d = await _generate(ctl, "r1", "a")
        assert d.error is None and d.finish_reason == "length", d
        assert "a" in worker.models

    asyncio.run(_with_worker(body))


def test_load_then_unload_in_one_tick_leaves_nothing_hosted_and_sends_no_answer():
    async def body(ctl: FakeController, worker: Worker) -> None:
        ctl.send(m.LoadModel("a", None, PACE), m.UnloadModel("a"))
        late = await ctl.quiet(1.0)
        assert not any(isinstance(x, m.ModelLoaded) and x.ok for x in late), late
        assert "a" not in worker.models and not worker._loading and not worker._unload_when_loaded
        d = await _generate(ctl, "r1", "a")
        assert d.error == "model a is not loaded here"

    asyncio.run(_with_worker(body))


def test_load_unload_load_in_one_tick_is_hosted_and_answered_once():
    async def body(ctl: FakeController, worker: Worker) -> None:
        ctl.send(m.LoadModel("a", None, PACE), m.UnloadModel("a"), m.LoadModel("a", None, PACE))
        got = [x for x in await ctl.quiet(1.0) if isinstance(x, m.ModelLoaded)]
        assert [x.ok for x in got] == [True], got
        d = await _generate(ctl, "r1", "a")
        assert d.error is None and d.finish_reason == "length", d

    asyncio.run(_with_worker(body))


def test_a_retune_sent_while_the_model_loads_is_applied_once_it_is_hosted(make_tiny):
    """RetuneModel (PATCH /admin/models) right behind the LoadModel, before the model is hosted: the policy weighs
    it by the new SLO and keep_alive, not the LoadModel's."""
    path = str(make_tiny("qwen2"))

    async def body(ctl: FakeController, worker: Worker) -> None:
        ctl.send(m.LoadModel("a", path, EngineOptions(), ModelSLO(1.0, 0.1)),
                 m.RetuneModel("a", ModelSLO(9.0, 0.9, 2.0), 60.0))
        assert (await ctl.expect(m.ModelLoaded)).ok
        mm = worker.models._of("a")
        for _ in range(100):  # (applied between steps)
            if mm.state.models["a"].slo != ModelSLO(1.0, 0.1):
                break
            await asyncio.sleep(0.02)
        assert mm.state.models["a"].slo == ModelSLO(9.0, 0.9, 2.0)
        assert mm._keep_alive["a"] == 60.0
        assert not worker._retune_later

    asyncio.run(_with_worker(body))
