"""MultiModelEngine: several models on one device, one model's batch per step, a multi-model policy choosing.

Each hosted model is a whole `LLMEngine` (its weights, its `BatchScheduler` over its own KV block pool with
host swap space, its `ModelRunner`). The step loop is the project's one loop, one level up:

    plan = policy.schedule(pool_state)      # which model runs now (token_scheduler.policies)
    outputs = engines[plan.model].step()    # that model's scheduler picks its batch, its runner runs it

so interleaving is token by token across models, and each model's requests see exactly the batching rules
they would see alone (running first, swapped resume oldest first, chunked prefill, preempt newest by swap).
Request timing fields are the engine's (monotonic seconds), which is the policy's clock too.

What the policy plans beyond "which model" is not executed yet, and is not needed while every model stays
resident: the pool capacity is set to all weights + all KV pools, so the policy never plans an eviction or a
cross-model KV swap. Weight eviction/prefetch waits for the model_swapper integration; see the notes at the
end of this module for what the single-model engine would need to expose.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from token_scheduler.cost_model import H100_PCIE53, CostModel, ModelSpec
from token_scheduler.engine import EngineConfig, LLMEngine
from token_scheduler.policies import make_policy
from token_scheduler.policies.batching import shape_of
from token_scheduler.policies.slo import ModelSLO
from token_scheduler.policies.state import ModelState, PoolState, Residency
from token_scheduler.request import RequestOutput, SamplingParams


class MultiModelEngine:
    def __init__(self, models: dict[str, EngineConfig | str | Path], policy: str = "token",
                 slos: dict[str, ModelSLO] | ModelSLO | None = None, device: str = "cpu",
                 cost: CostModel | None = None, policy_kw: dict | None = None, **engine_kwargs):
        if not models:
            raise ValueError("MultiModelEngine needs at least one model")
        self.engines: dict[str, LLMEngine] = {}
        for name, cfg in models.items():
            if not isinstance(cfg, EngineConfig):
                cfg = EngineConfig(model=str(cfg), device=device, served_model_name=name, **engine_kwargs)
            self.engines[name] = LLMEngine(cfg)
        slos = slos or ModelSLO()
        specs = {n: self._spec(n, e) for n, e in self.engines.items()}
        on_cuda = any(e.device.type == "cuda" for e in self.engines.values())
        # Seeded from physical numbers on a GPU; on CPU no prior fits, so it learns from the first steps.
        self.cost = cost or CostModel(H100_PCIE53 if on_cuda else None, list(specs.values()))
        capacity = sum(s.weight_bytes + self._kv_pool_bytes(e) for s, e in
                       zip(specs.values(), self.engines.values(), strict=True))
        self.state = PoolState(
            models={n: ModelState(specs[n], slos if isinstance(slos, ModelSLO) else slos[n],
                                  residency=Residency.RESIDENT) for n in self.engines},
            capacity_bytes=capacity, cost=self.cost,
        )
        self.policy = make_policy(policy, **(policy_kw or {}))
        self._owner: dict[str, str] = {}  # request id -> model
        self.steps_per_model: dict[str, int] = dict.fromkeys(self.engines, 0)
        self.trace: list[str] = []  # model of every step, in order (cheap; tests and debugging)

    @staticmethod
    def _spec(name: str, eng: LLMEngine) -> ModelSpec:
        return ModelSpec.from_config(name, eng.model_config, torch.empty((), dtype=eng.dtype).element_size())

    @staticmethod
    def _kv_pool_bytes(eng: LLMEngine) -> int:
        return eng.runner.kv.numel() * eng.runner.kv.element_size()

    # -- requests ------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    model: str | None = None, arrival_time: float | None = None):
        if model is None:
            if len(self.engines) != 1:
                raise ValueError(f"which model? this engine hosts {sorted(self.engines)}")
            model = next(iter(self.engines))
        if model not in self.engines:
            raise ValueError(f"unknown model {model!r}; hosted: {sorted(self.engines)}")
        if request_id in self._owner:
            raise ValueError(f"request id {request_id!r} is already in use")
        req = self.engines[model].add_request(request_id, prompt, params, arrival_time=arrival_time)
        self._owner[request_id] = model
        return req

    def abort_request(self, request_id: str) -> None:
        model = self._owner.get(request_id)
        if model is not None:
            self.engines[model].abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return any(e.has_unfinished_requests() for e in self.engines.values())

    # -- the step loop -------------------------------------------------------------------------------
    def _sync(self) -> None:
        """Point the policy's view at each model's scheduler queues (no copies of requests)."""
        for name, eng in self.engines.items():
            s, m = eng.scheduler, self.state.models[name]
            m.waiting = s.waiting
            m.running = s.running + list(s.swapped) if s.swapped else list(s.running)
            m.kv_gpu_tokens = sum(r.num_computed_tokens for r in s.running)
        self.state.now = time.monotonic()

    def step(self) -> list[RequestOutput]:
        self._sync()
        plan = self.policy.schedule(self.state)
        outputs: list[RequestOutput] = []
        if not plan.idle:
            eng = self.engines[plan.model]
            t0 = time.perf_counter()
            outputs = eng.step()
            self.cost.observe_step(plan.model, shape_of(plan.batch), time.perf_counter() - t0)
            self.state.active = plan.model
            self.steps_per_model[plan.model] += 1
            self.trace.append(plan.model)
        # Aborted requests of a model with nothing else to do still owe their final output.
        for name, eng in self.engines.items():
            m = self.state.models[name]
            if name != plan.model and not m.has_work and eng.has_unfinished_requests():
                outputs += eng.step()
        for o in outputs:
            if o.finished:
                self._owner.pop(o.request_id, None)
        return outputs

    def run(self) -> dict[str, RequestOutput]:
        """Step until every request finished; the final output of each, by request id."""
        done: dict[str, RequestOutput] = {}
        while self.has_unfinished_requests():
            for o in self.step():
                if o.finished:
                    done[o.request_id] = o
        return done


# What the single-model engine would need to expose for the policy's full plan to be executed here:
# 1. LLMEngine.step(token_budget=None) passing it to BatchScheduler.schedule(token_budget), and the step's
#    SchedulerOutput (or its shape) returned or kept, so the policy's prefill chunk is honoured and the cost
#    model fits the exact shape instead of the policy's predicted batch.
# 2. BatchScheduler.preempt(request_ids) -> SchedulerOutput with only swap_out (public form of _preempt) and a
#    runner call to execute it, for cross-model KV swap-out between turns.
# 3. Weight eviction / (pre)load hooks on ModelRunner that keep CUDA graphs valid (graphs capture weight
#    addresses: weights must come back to the same VRAM slab, e.g. via model_swapper's arena).
