"""MultiModelEngine: several models on one device, one model's batch per step, a multi-model policy choosing.

Each hosted model is a whole `LLMEngine` (its `BatchScheduler`, its `ModelRunner`, its sampler). The step
loop is the project's one loop, one level up:

    plan = policy.schedule(pool_state)      # which model runs now, what to evict/prefetch (policies/)
    execute plan's memory moves             # evict -> KV swap-out -> load (blocking) -> prefetch (async)
    outputs = engines[plan.model].step(budget)  # that model's scheduler picks its batch, its runner runs it

so interleaving is token by token across models, and each model's requests see exactly the batching rules
they would see alone. Two ways to hold the models:

- all resident (`gpu_budget=None`): every model loads its weights and its own KV pool; nothing moves.
- pooled (`gpu_budget="60GB"`): a `residency.ModelPool` reserves one arena; weights live in the pinned host
  cache and come in and out of arena slots as the plan says (prefetch while another model decodes); every
  model's KV is paged from one shared region, and a model short of KV pages first swaps out the KV of idle
  models (least recently run first) to their host pages -- KV is never dropped. The policy sees the weight
  space as its capacity; KV pages are managed here because they are a separate pool.

Request timing fields are the engine's (monotonic seconds), which is the policy's clock too.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from pathlib import Path

import torch

from token_scheduler.cost_model import H100_PCIE53, CostModel, ModelSpec
from token_scheduler.engine import EngineConfig, LLMEngine
from token_scheduler.model.config import ModelConfig
from token_scheduler.policies import make_policy
from token_scheduler.policies.batching import shape_of
from token_scheduler.policies.slo import ModelSLO
from token_scheduler.policies.state import ModelState, PoolState, Residency
from token_scheduler.request import RequestOutput, SamplingParams


class MultiModelEngine:
    def __init__(self, models: dict[str, EngineConfig | str | Path], policy: str = "token",
                 slos: dict[str, ModelSLO] | ModelSLO | None = None, device: str = "cpu",
                 cost: CostModel | None = None, policy_kw: dict | None = None, gpu_budget=None,
                 kv_cache_gb: float = 4.0, host_kv_gb: float | None = None, host_cache=None,
                 host_budget="64GB", progress=None, **engine_kwargs):
        if not models:
            raise ValueError("MultiModelEngine needs at least one model")
        self.device = device
        self.engine_kwargs = engine_kwargs
        self.progress = progress
        self.pool = None
        if gpu_budget is not None:
            from token_scheduler.residency import ModelPool

            self.pool = ModelPool(device, gpu_budget, kv_cache_gb, host_kv_gb, host_cache, host_budget)
        self.engines: dict[str, LLMEngine] = {}
        self.default_slo = slos if isinstance(slos, ModelSLO) else ModelSLO()
        # Seeded from physical numbers on a GPU; on CPU no prior fits, so it learns from the first steps.
        self.cost = cost or CostModel(H100_PCIE53 if str(device).startswith("cuda") else None, [])
        self.state = PoolState(models={}, capacity_bytes=0, cost=self.cost)
        self.policy = make_policy(policy, **(policy_kw or {}))
        self._owner: dict[str, str] = {}  # request id -> model
        self._removed: list[RequestOutput] = []  # final outputs of a removed model's requests, owed next step
        self._loads_seen = 0  # pool.stats.load_s entries already fed to the cost model
        self.steps_per_model: dict[str, int] = {}
        self.trace: deque[str] = deque(maxlen=4096)  # model of the latest steps, in order (tests, debugging)
        self.switches = 0  # steps whose model differs from the previous step's
        self.kv_swapped_out = 0  # requests whose KV went to host pages to make room for another model
        self._last_run: dict[str, float] = {}
        # policy_s/memory_s/engine_s/steps: the steps that ran; idle_*: schedule() calls that planned nothing
        # (a caller polling while requests wait that no plan can serve, e.g. static's unplaced models)
        self.timing = dict.fromkeys(("policy_s", "memory_s", "engine_s", "steps", "idle_policy_s", "idle_polls"),
                                    0.0)
        for name, cfg in models.items():
            self.add_model(name, cfg, slos[name] if isinstance(slos, dict) else None)

    # -- models --------------------------------------------------------------------------------------
    def add_model(self, name: str, cfg: EngineConfig | str | Path, slo: ModelSLO | None = None) -> None:
        """Host another model (at runtime too). Pooled: its host copy is loaded now, its weights on demand."""
        if name in self.engines:
            raise ValueError(f"model {name!r} is already hosted")
        if not isinstance(cfg, EngineConfig):
            cfg = EngineConfig(model=str(cfg), device=self.device, served_model_name=name, **self.engine_kwargs)
        cfg = dataclasses.replace(cfg, overlap=False)  # steps alternate between models: read every step
        if self.pool is None:
            eng = LLMEngine(cfg)
        else:
            mc = ModelConfig.from_pretrained(cfg.model)
            max_len = min(cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
            shared = self.pool.register(name, cfg.model, mc, cfg.torch_dtype, max_len, self.progress)
            try:
                eng = LLMEngine(cfg, shared_kv=shared, load=False)
            except BaseException:
                self.pool.unregister(name)
                raise
        self.engines[name] = eng
        spec = self._spec(name, eng)
        if self.pool is not None:
            # The policy's capacity is the weight space: a model takes its slot (rounded to the arena's
            # alignment) and its KV takes none of it (KV pages are their own pool, managed here).
            spec = dataclasses.replace(spec, weight_bytes=self.pool.slot_bytes(name), kv_bytes_per_token=0)
        self.cost.register(spec)
        resident = self.pool is None
        self.state.models[name] = ModelState(spec, slo or self.default_slo,
                                             residency=Residency.RESIDENT if resident else Residency.HOST)
        self.steps_per_model[name] = 0
        self._capacity()

    def remove_model(self, name: str) -> None:
        """Stop hosting `name`: its unfinished requests are aborted (final outputs come from the next step)."""
        eng = self.engines.get(name)
        if eng is None:
            raise ValueError(f"unknown model {name!r}; hosted: {sorted(self.engines)}")
        for rid in list(eng.scheduler.requests):
            eng.abort_request(rid)
        self._removed += [o for o in eng.step() if o.finished]
        del self.engines[name], self.state.models[name]
        if self.pool is not None:
            self.pool.unregister(name)
        if self.state.active == name:
            self.state.active = None
        self._capacity()

    def _capacity(self) -> None:
        if self.pool is not None:
            self.state.capacity_bytes = self.pool.weight_capacity
        else:
            self.state.capacity_bytes = sum(self.state.models[n].spec.weight_bytes + self._kv_pool_bytes(e)
                                            for n, e in self.engines.items())

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
        if model is not None and model in self.engines:
            self.engines[model].abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return any(e.has_unfinished_requests() for e in self.engines.values()) or bool(self._removed)

    # -- the step loop -------------------------------------------------------------------------------
    def _sync(self) -> None:
        """Point the policy's view at each model's scheduler queues (no copies of requests)."""
        pool = self.pool
        if pool is not None:
            for name in pool.poll():
                if name in self.state.models:
                    self.state.models[name].residency = Residency.RESIDENT
        for name, eng in self.engines.items():
            s, m = eng.scheduler, self.state.models[name]
            m.waiting = s.waiting
            m.running = s.running + list(s.swapped) if s.swapped else list(s.running)
            # pooled: KV pages are a pool of their own, not part of the policy's weight capacity
            m.kv_gpu_tokens = 0 if pool is not None else sum(r.num_computed_tokens for r in s.running)
        self.state.now = time.monotonic()

    def _execute_memory(self, plan) -> None:
        """The plan's memory moves, in the StepPlan contract's order. Pooled mode only."""
        pool, st = self.pool, self.state
        for name in plan.evict:
            if name != plan.model:
                pool.evict(name)
                self.engines[name].set_weights(None)
                st.models[name].residency = Residency.HOST
        for r in plan.swap_out:
            self._swap_out(self._owner[r.request_id], [r])
        if plan.model is not None and plan.batch:
            eng = self.engines[plan.model]
            if eng.weights is None or not pool.is_resident(plan.model) or pool.is_loading(plan.model):
                rm = pool.load(plan.model, protect=(plan.prefetch,) if plan.prefetch else (), order=plan.load_order)
                eng.set_weights(rm.weights, rm.slot_id)
                st.models[plan.model].residency = Residency.RESIDENT
            self._forget_evicted()
            self._make_kv_room(plan.model)
        if plan.prefetch is not None and plan.prefetch in self.engines:
            order = None if plan.prefetch_order is None else [n for n in plan.prefetch_order if n != plan.model]
            if pool.prefetch(plan.prefetch, order=order):
                m = st.models[plan.prefetch]
                m.residency = max(m.residency, Residency.LOADING)
                m.ready_at = st.now + self.cost.load_time(m.spec.weight_bytes)
            self._forget_evicted()

    def _forget_evicted(self) -> None:
        """Models the pool evicted to make a slot contiguous (not in the plan): tell the engines and the policy."""
        pool, st = self.pool, self.state
        for name, e in self.engines.items():
            if not pool.holds(name):
                if e.weights is not None:
                    e.set_weights(None)
                st.models[name].residency = Residency.HOST

    def _make_kv_room(self, model: str) -> None:
        """Before `model` steps: if the shared pages cannot cover its next step, swap out the KV of models
        that are not running now (least recently run first, newest request first) until they can."""
        eng = self.engines[model]
        pages = eng.scheduler.kv
        need = _pages_needed(eng)
        if pages.num_free >= need:
            return
        victims = sorted((n for n in self.engines if n != model), key=lambda n: self._last_run.get(n, -1.0))
        for name in victims:
            s = self.engines[name].scheduler
            for r in reversed(list(s.running)):
                if pages.num_free >= need:
                    return
                if r.num_computed_tokens and s.host_kv is not None and s.host_kv.can_allocate(len(r.block_ids)):
                    self._swap_out(name, [r])

    def _swap_out(self, model: str, reqs) -> None:
        eng = self.engines[model]
        out = eng.scheduler.preempt(reqs)
        eng.runner.swap_kv(out.swap_out, [])
        self.kv_swapped_out += len(out.swap_out)

    def step(self) -> list[RequestOutput]:
        tm = self.timing
        t0 = time.perf_counter()
        self._sync()
        plan = self.policy.schedule(self.state)
        t1 = time.perf_counter()
        if plan.idle:
            tm["idle_policy_s"] += t1 - t0
            tm["idle_polls"] += 1
        else:
            tm["policy_s"] += t1 - t0
        outputs, self._removed = self._removed, []
        if self.pool is not None:
            self._execute_memory(plan)
            # measured loads teach the cost model the link (and how much prefetch hides)
            done = self.pool.stats.load_s
            for nbytes, secs, hidden in done[self._loads_seen:]:
                self.cost.observe_load(nbytes, secs, hidden_s=hidden)
            self._loads_seen = len(done)
        t2 = time.perf_counter()
        tm["memory_s"] += t2 - t1
        if not plan.idle:
            eng = self.engines[plan.model]
            outputs += eng.step(token_budget=max(plan.num_tokens, 1))
            t3 = time.perf_counter()
            tm["engine_s"] += t3 - t2
            tm["steps"] += 1
            self.cost.observe_step(plan.model, shape_of(plan.batch), t3 - t2)
            self.state.active = plan.model
            self._last_run[plan.model] = time.monotonic()
            self.steps_per_model[plan.model] += 1
            if self.trace and self.trace[-1] != plan.model:
                self.switches += 1
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

    def reset_stats(self) -> None:
        """Zero the counters (e.g. after a warm-up); the cost model keeps what it learned."""
        self.trace.clear()
        self.switches = 0
        self.steps_per_model = dict.fromkeys(self.engines, 0)
        self.kv_swapped_out = 0
        self.timing = dict.fromkeys(self.timing, 0.0)
        if self.pool is not None:
            self.pool.reset_stats()
        self._loads_seen = 0
        if hasattr(self.policy, "reset_counters"):
            self.policy.reset_counters()

    def timing_summary(self) -> dict:
        """Where the step loop's time went. `policy_frac`: the policy CPU time of the steps that ran over their
        wall time (weights/KV moves + engine steps); idle plans are counted apart (`idle_policy_s`)."""
        tm = self.timing
        n = max(1.0, tm["steps"])
        work = tm["memory_s"] + tm["engine_s"]
        return {**tm, "policy_us_per_step": 1e6 * tm["policy_s"] / n, "engine_ms_per_step": 1e3 * tm["engine_s"] / n,
                "policy_frac": tm["policy_s"] / work if work else 0.0}

    def close(self) -> None:
        """Give the memory back: every view into the arena (weights, KV, graphs) is dropped, then the arena."""
        for eng in self.engines.values():
            eng.set_weights(None)
            r = eng.runner
            r.graphs, r.kv, r.kv_swapper = {}, None, None
        self.engines.clear()
        if self.pool is not None:
            self.pool.close()


def _pages_needed(eng: LLMEngine) -> int:
    """KV blocks the model's next step may allocate: a block per running sequence at a block boundary, the
    blocks of swapped sequences coming back, and the first waiting prompt's first chunk."""
    s = eng.scheduler
    bs = s.kv.block_size
    need = sum(1 for r in s.running if r.num_computed_tokens + 1 > len(r.block_ids) * bs)
    need += sum(s.kv.blocks_for(r.num_computed_tokens + 1) for r in s.swapped)
    if s.waiting:
        r = s.waiting[0]
        need += s.kv.blocks_for(min(r.num_tokens, s.cfg.max_num_batched_tokens))
    return need
