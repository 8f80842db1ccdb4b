"""MultiModelEngine: several models on one device, one model's batch per step, a multi-model policy choosing.

Each hosted model is a whole `LLMEngine` (its `BatchScheduler`, its `ModelRunner`, its sampler). The step
loop is the project's one loop, one level up:

    plan = policy.schedule(state)           # which model runs now, its batch, what to evict/swap/prefetch
    execute plan's memory moves             # evict -> other models' KV swap-out -> load (blocking) -> prefetch
    tokens = engines[plan.model].step_tokens(plan.batch, own swap-outs)   # exactly the plan's batch runs
    outputs = detokenize(tokens)            # text and stop strings: inline (step), or beside the next step

The policy decides once: its batch (built by the one builder, `policies.batching.select_batch`, over the
models' own scheduler queues) is what the model's scheduler commits and its runner runs -- nothing here or
in the scheduler builds another or preempts on its own. For that the policy sees every byte the batch needs:
weights (`PoolState.capacity_bytes`) and KV, counted in the allocators' own blocks (state.py). Limits are
the engines' configs (`_sync_limits`), and the cost model learns from the batch that ran (`eng.last_out`).

Two ways to hold the models:

- all resident (`gpu_budget=None`): every model loads its weights and a KV cache of its own (`own_kv_bytes`);
  nothing moves.
- pooled (`gpu_budget="60GB"`): a `residency.ModelPool` (`self.memory`) reserves one arena; weights live in
  the pinned host cache and come in and out of arena slots as the plan says (prefetch while another model
  decodes); every model's KV is paged from one shared region (`PoolState.kv_capacity_bytes`, a page per
  block). A model short of pages gets them by the plan's swap-outs of other models' KV (the policy's victim
  order, newest request first) to host pages -- dropped only where the host has no room.

Request timing fields are the engine's (monotonic seconds), which is the policy's clock too.

Plan-ahead (`plan_ahead=True`: a server's `gpus.plan_ahead`, by default $TOKENPOOL_PLAN_AHEAD, on): the policy's
plan for step N+1 is made while step N's forward runs on the device -- in its `on_launch`, after the caller's own --
instead of while the device waits at the start of N+1. At N+1 that plan is used if it is still valid
(`_take_ahead`), else the policy plans as without the flag.
`TokenPolicy.schedule` advances the policy's own state on every call (the turn's step count, the round's queue,
new rounds), so an early plan that is not used is undone (`checkpoint`/`restore`) before the step plans again:
the policy sees one schedule call per step either way. Only policies with `checkpoint` plan ahead.

Pipeline (TOKENPOOL_PIPELINE, on by default since session 31: 40 models on the H200, seed 1, 91.5% and 94.1% where
off met 53.1% in the same call; it runs on plan-ahead's early plans, so plan-ahead off turns it off too): within a
model's turn of decode steps the device does not wait for the host between steps. A decode step N the runner can
launch overlapped (`ModelRunner.can_launch`: a graph bucket, no KV moves, no penalties or logprobs) is queued and its
early plan for N+1 made beside it; when that plan is exactly N's continuation (`_continues`: the
same model, resident, nothing waiting or swapped, a 1-token decode of each request `scheduler.continuation` keeps,
and nothing else), N is left in flight and the call returns. The next call queues N+1 fed with N's sampled ids on
the device, then reads N and applies its tokens (its outputs are that call's), then plans N+2 beside N+1
(`_step_pipelined`). Anything else reads the step in flight first (`_flush`) and goes on exactly as without the
flag: a plan for another model or with memory moves, a request added, aborted, finished or stopped since the plan,
KV blocks short, and every change from outside a step (add/remove_model, abort_request, set_pinned, preload, a
keep-alive eviction, reset_stats, close); an idle step too, so `run()` drains everything. A request that stops on
the token N samples has a row in N+1 whose result is dropped (`scheduler.update` skips it). The cost model learns a
pipelined step's time as the interval between its completion and the one before, less the caller's own time between
the two step calls, and not under the device's time for it (`_learn_pipelined`).
Queuing another model's early-planned step behind the one in flight as well (most turns at many models are one step)
was tried at c29a20e and served far worse: 36 models on the H200, seed 0, 44.4% against 93.9% at the default, with
steps priced at about twice their device time by the intervals learned
(bench/results/serve_h200_models36_seed0_c29a20e_pipeline_across.json). Reverted. Tried again at 1b95bf0 with a
step queued behind another priced on the device's clock (CUDA events, from the step before's end to its own): the fits
came out near the device's times (7B 3.30 ms + 0.60 a sequence, against 3.81 + 0.35 unpipelined), and it served as
badly, 41.2% (bench/results/serve_h200_models36_seed0_1b95bf0_pipeline_across.json): the same tokens per second of
device time, fewer and larger steps, 401 late episodes against 8, TTFT p50 4.7 s against 2.2. So the prices were not
the cause; what is was not found. Reverted. A third time at 476b472, after the copy stall below was fixed (behind a
switch, TOKENPOOL_PIPELINE_ACROSS): 40 models, seed 1, 89.4% against 94.1% within turns only, in the same call, at the
same step rate (335 against 333 steps/s): the switches' host time it overlaps was not what held the device back
(bench/results/serve_h200_models40_seed1_0f7c205_pipeline_across.json). Reverted (2996f11).
Co-stepping (TOKENPOOL_CO_STEP, on by default since session 36; `_co_step`): when the early plan is another model's
decode, that step is launched on a second CUDA stream beside the step in flight, then the step in flight is read --
the device runs two models' small steps at once. With the token policy's paired turns (`TokenConfig.pair_turns`) that
is most steps. H200, 40 models, seed 0: 92.8% where 87.4% without (bench/results/serve_h200_models40_seed0_
1a50452_costep_paired.json). That left the device half the time: after a read the other model's step ran alone
while the host applied tokens and launched the next. Deep co-stepping (TOKENPOOL_CO_STEP_DEEP, on by default since
session 37; `_hold`, `_keep_back`) keeps both models' steps in flight, one a stream, and queues each model's next
step behind its own (fed by its sampled ids on the device) before reading the older: two 1.5B at batch 2 step at
0.655 of one alone (the device's two-stream figure, 0.659), 0.720 one deep (`diag_gpu co-loop`, bench/results/
co_loop_h200_e5c9347.json); 40 models served 99.6% (seed 0) and 100% (seed 1)
(bench/results/serve_h200_models40_seed{0_e5c9347,1_a68ef1f}_deep.json).
The pipeline within a turn (this flag) does not slow the device: a step queued back to back took the same device time
as one the device waited for (H200, `diag_gpu pipe-dev`: 7B 4.58 ms either way, 1.5B 1.78 against 1.86; a step's
wall 4.96 -> 4.58 and 2.15 -> 1.79 ms; bench/results/pipeline_device_time_h200_d9f1c6f.json). Served at 36 models
(seed 1) it still fell to 49.5% against 88.8% off (50.2% against 86.1% at adcf9be). Over all turns, not just the late
models' last ones, pipelined turns are shorter (1.5B p90 3 steps against 15) and steps cost what they were priced at
(1.03x against 1.02x); what differs is the rounds the token policy plans: 1.8 s against 4.2 s at the mean (0.19 against
6.4 s in the first, lightly loaded 15 s), taken in full where unpipelined ones end at 0.41 of their plan
(bench/results/serve_h200_models36_seed1_adcf9be_timed_pipeline.json). Why they come out so short is the lead.
Session 29 (H200, 36 models, seed 1): still 54.8% against 100% off at 5e464df. The step trace (TOKENPOOL_STEP_TRACE)
shows why the fits go wild (7B 1.59 ms + 2.84 ms a sequence learned, against 3.46 + 0.63 off): in a turn of several
sequences (a 7B's from 2, a 1.5B's from 3; not at 1) the interval between two reads alternates ~4.6 and ~19.5 ms while
each step's device time stays at ~4.5 ms (CUDA events from the replay: 7B batch 2 p99 4.7 ms): the host stalls ~15 ms
every other step, outside the caller's gap, so ~10% of those steps are learned at 4x their price and the device
idles. Not the collector (young/middle passes 0.1-1.8 ms) and not the GIL's switch interval (0.5 ms: the same
stalls). Learning pipelined steps at their device time, or not at all, served no better (46%: the stall itself
stays, and the fit of the steps read at once extrapolates badly).
Session 30 found it: the "cycle" lines put the stall in the host's wait for the step's tokens (CPU = wall: spinning
on its event), in stretches as long as a weight prefetch. A pipelined step's inputs are queued behind the step in
flight, and a pinned host-to-device copy of 2 KB or more queued behind a running kernel waits for a prefetch on the
swapper's stream to end (`diag_gpu copy-contention`: ~52 ms for 3 GB; the block table is 2 KB+ from 7B batch 2 and
1.5B batch 3). Decode graphs now read their inputs from the pinned buffers in place (`gpu_pool.pinned.device_view`):
served at 36 models, seed 1, pipelined 100% (0 stalled calls of 48k) where it was 46-55%
(bench/results/serve_h200_models36_seed1_4307f4b_pipeline.json; logs/session30).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import time
from collections import deque
from pathlib import Path

import torch

from model_swapper.model_config import ModelConfig
from token_scheduler.cost_model import (
    PHASE_KEYS,
    CostModel,
    ModelSize,
    StepShape,
    phase_kind,
    roofline_for,
    step_phases,
)
from token_scheduler.detokenizer import detokenize
from token_scheduler.engine import EngineConfig, LLMEngine
from token_scheduler.graph_cap import CAPTURES, CAPTURES_ZERO
from token_scheduler.policies import make_policy
from token_scheduler.policies.slo import ModelSLO, next_token_slack
from token_scheduler.policies.state import ModelState, PoolState, Residency, StepPlan
from token_scheduler.policies.token import ROUND_TERMS, TURN_ENDS
from token_scheduler.request import Request, RequestOutput, RequestStatus, SamplingParams, TokenOutput
from tokenpool import env

log = logging.getLogger(__name__)

GRAPH_PRECAPTURE = env.GRAPH_PRECAPTURE.on()  # see ModelRunner.capture_first
PLAN_AHEAD = env.PLAN_AHEAD.on()  # see the module docstring and `MultiModelEngine._take_ahead`
PIPELINE = env.PIPELINE.on()  # see the module docstring and `MultiModelEngine._step_pipelined`; needs plan-ahead
TIME_STEPS = env.TIME_STEPS.on()  # each step's device time in the books of `_phases` (a diagnostic)
CO_STEP = env.CO_STEP.on()  # see `MultiModelEngine._co_step`; needs the pipeline
CO_STEP_DEEP = env.CO_STEP_DEEP.on()  # see `MultiModelEngine._hold`; needs co-stepping
PIPELINE_LEARN = env.PIPELINE_LEARN.checked()  # what a pipelined step teaches the cost model (`_learn_pipelined`)
AHEAD_MAX_AGE_S = 0.1  # an early plan older than this at its step (the caller paused) is made again
_RUNNING, _WAITING = RequestStatus.RUNNING, RequestStatus.WAITING


class MultiModelEngine:
    def __init__(self, models: dict[str, EngineConfig | str | Path], policy: str = "token",
                 slos: dict[str, ModelSLO] | ModelSLO | None = None, device: str = "cpu",
                 cost: CostModel | None = None, policy_kw: dict | None = None, gpu_budget=None,
                 kv_cache_gb: float = 4.0, host_kv_gb: float | None = None, host_cache=None,
                 host_budget="64GB", progress=None, host_namespace: str = "tokenpool", plan_ahead: bool | None = None,
                 min_page_bytes: int = 0, **engine_kwargs):
        self.device = device
        self.engine_kwargs = engine_kwargs
        self.progress = progress
        self.memory = None
        if gpu_budget is not None:
            from token_scheduler.residency import ModelPool

            # the device memory of the models (arena, KV region, weight slots, host copies); the memory moves of
            # the plans run through it
            self.memory = ModelPool(device, gpu_budget, kv_cache_gb, host_kv_gb, host_cache, host_budget,
                                    namespace=host_namespace, min_page_bytes=min_page_bytes)
        self.engines: dict[str, LLMEngine] = {}
        self.default_slo = slos if isinstance(slos, ModelSLO) else ModelSLO()
        # Seeded from the GPU's physical numbers (roofline_for its name: on the H200 a 7B step's prior is 4.7 ms, as
        # measured, where the H100's was 6.2); on CPU no prior fits, so it learns from the first steps.
        self.cost = cost or CostModel(roofline_for(torch.cuda.get_device_name(torch.device(device)))
                                      if str(device).startswith("cuda") else None, [])
        self.state = PoolState(models={}, capacity_bytes=0, cost=self.cost,
                               can_load=self.memory.can_load if self.memory is not None else None)
        self._queues: list[tuple] = []  # (scheduler, its model's ModelState) of every hosted model, for `_sync`
        self.policy = make_policy(policy, **(policy_kw or {}))
        # outputs owed by the next step: a removed model's requests' final ones, and (pipeline) those of a step in
        # flight that something outside a step completed (`_flush`)
        self._removed: list[TokenOutput] = []
        self._aborts_owed = False  # abort_request aborted a request since the last step: its final output is owed
        self._loads_seen = 0  # memory.stats.loads_done already fed to the cost model
        self.steps_per_model: dict[str, int] = {}
        # per model, over the steps that ran: [engine seconds, seconds the plans priced them at] (`_stepped`)
        self.priced: dict[str, list[float]] = {}
        self.trace: deque[str] = deque(maxlen=4096)  # model of the latest steps, in order (tests, debugging)
        self.switches = 0  # steps whose model differs from the previous step's
        self._turn_steps = 0  # steps of the current turn (the latest run of one model's steps)
        self.kv_swapped_out = 0  # requests whose KV went to host pages (preempted, by any model's plan)
        # What happened, for live views (the worker drains it into its Stats): switches, loads, evictions,
        # model registrations; and runs of consecutive steps of one model: [t_wall_start, model, steps, dur_s]
        self.events: deque[dict] = deque(maxlen=1024)
        self.timeline: deque[list] = deque(maxlen=1024)
        self.stall_s = 0.0  # CPU-visible waits for weights at switches (pooled), summed
        # "late" events: a model with a request past its next token's deadline (a miss under way), once until it
        # steps again -- why a model fell behind is then in the event stream (its residency, its last step)
        self._late: set[str] = set()
        self._late_check = 0.0
        self._last_run: dict[str, float] = {}
        self._last_request: dict[str, float] = {}  # (or its registration, where none came since: `expire`'s clock)
        self._keep_alive: dict[str, float] = {}  # model -> idle seconds before its weights are evicted
        self._evict_idle: set[str] = set()  # models whose weights go once they are idle, once (`evict_when_idle`)
        # policy_s/memory_s/engine_s/steps: the steps that ran; idle_*: schedule() calls that planned nothing
        # (a caller polling while requests wait that no plan can serve, e.g. static's unplaced models)
        # policy_cpu_s: the policy's own thread CPU time; policy_s less it is time the step thread waited for the
        # CPU or the GIL (another thread of the process holding it) in the middle of a plan
        # Plan-ahead: policy_s/policy_cpu_s are the time before the step's memory moves (checking the early plan, and
        # planning again when it failed); ahead_s/ahead_cpu_s the early plans' own (in on_launch, beside the device:
        # part of engine_s), ahead_used/ahead_discarded how many of them ran or were not used
        self.timing = dict.fromkeys(("policy_s", "policy_cpu_s", "memory_s", "engine_s", "steps", "idle_policy_s",
                                     "idle_polls", "late_episodes", "ahead_s", "ahead_cpu_s", "ahead_used",
                                     "ahead_discarded", "pipelined_steps", "pipeline_kept", "pipeline_flushes",
                                     "co_steps", "co_kept", "co_deep_kept", *PHASE_KEYS),
                                    0.0)
        # Pipeline: (model, perf_counter at its launch, lane) of the decode step left in flight by the latest step call
        # (its engine's `_inflight`), or None; `_t_done`: when the latest step's tokens were read
        self._pipe: tuple[str, float, int] | None = None
        # (deep co-stepping) an older step in flight beside it, on the other lane, read before it (`_hold`)
        self._back: tuple[str, float, int] | None = None
        self._co_step_on = CO_STEP  # (`_co_step`)
        self._co_deep = CO_STEP_DEEP  # (`_hold`)
        self._lane_streams: dict = {}  # device -> lane 1's CUDA stream (`_on_lane`)
        self._kv_moved = False  # a plan swapped KV since lane 1 last caught up with the current stream (`_on_lane`)
        self._t_done = 0.0
        # `_t_ret`: when the latest step call returned; `_gap`: the caller's time from then to this call (its own work
        # between step calls, inside the interval of the step kept in flight: `_learn_pipelined` leaves it out), and
        # before earlier calls that read no step
        self._t_ret = self._gap = 0.0
        # (TOKENPOOL_STEP_TRACE, a diagnostic) each step's timing sample, one CSV line (`_trace_step`)
        trace = env.STEP_TRACE.get()
        self._trace = open(trace, "a", buffering=1) if trace else None  # noqa: SIM115 - closed in close()
        self._gc_t0 = 0.0
        # (trace) a pipelined call's cycle line and when it ended, written as the call returns
        self._cycle: tuple | None = None
        if self._trace is not None:  # and every collection's pause, from whichever thread (kind "gc")
            gc.callbacks.append(self._trace_gc)
        # Plan-ahead: (the plan, the policy's checkpoint before it, {id(request)} of the step it was made
        # beside, when it was made), or None
        self._ahead: tuple | None = None
        self._can_plan_ahead = hasattr(self.policy, "checkpoint")
        self.plan_ahead = PLAN_AHEAD if plan_ahead is None else plan_ahead  # (see the module docstring)
        self._pipeline = PIPELINE  # (`pipeline`)
        # One tokenizer per model directory: aliases of a checkpoint share it (a large vocabulary takes ~0.5 s
        # to load; a restarted worker registers every model again). Loaded by `tokenizer()`, off the step
        # thread when the caller prepares a registration there.
        self._tokenizers: dict[str, object] = {}
        self.add_s: dict[str, dict[str, float]] = {}  # model -> seconds of its registration's phases (the log)
        for name, cfg in models.items():
            self.add_model(name, cfg, slos[name] if isinstance(slos, dict) else None)

    # -- models --------------------------------------------------------------------------------------
    def add_model(self, name: str, cfg: EngineConfig | str | Path, slo: ModelSLO | None = None) -> None:
        """Host another model (at runtime too). Pooled: its host copy is loaded now, its weights on demand."""
        if name in self.engines:
            raise ValueError(f"model {name!r} is already hosted")
        self._settle()
        if not isinstance(cfg, EngineConfig):
            cfg = EngineConfig(model=str(cfg), device=self.device, served_model_name=name, **self.engine_kwargs)
        # steps alternate between models: read every step; a request's `model` is the name it is hosted under
        cfg = dataclasses.replace(cfg, overlap=False, served_model_name=name)
        t0 = t1 = t2 = time.perf_counter()
        try:
            tok = self.tokenizer(cfg.model)
            t1 = time.perf_counter()
            shared = None
            if self.memory is not None:
                mc = ModelConfig.from_pretrained(cfg.model)
                max_len = min(cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
                shared = self.memory.register(name, cfg.model, mc, cfg.torch_dtype, max_len, self.progress)
                # The context is bounded by what the KV region holds of this model (vLLM bounds max_model_len by
                # its KV cache, refusing to start past it): past that, every request that leaves max_tokens out
                # asked for the whole context's room, and the engine refused it whatever its prompt
                held = shared.allocator.num_blocks * shared.block_size
                if max_len > held:
                    log.warning("%s: its context of %d tokens is bounded to the %d of its tokens the KV region "
                                "holds (gpus.kv_cache_gb)", name, max_len, held)
                    cfg = dataclasses.replace(cfg, max_model_len=held)
            t2 = time.perf_counter()
            eng = LLMEngine(cfg, shared_kv=shared, load=self.memory is None, tokenizer=tok)
            eng.time_launches = self.pipeline  # (`_learn_pipelined`; and `_phases`' dev_s of a pipelined step)
            eng.runner.time_steps = TIME_STEPS  # (`_phases`: dev_s)
        except BaseException:
            if self.memory is not None:
                self.memory.unregister(name)  # a no-op if it was not registered
            self._prune_tokenizers()
            raise
        self.engines[name] = eng
        # pool_s: the KV region's carving (the first model) and the host copy; engine_s: the runner (on CUDA the
        # attention kernels' warm-up, once per shape)
        self.add_s[name] = {"tokenizer_s": t1 - t0, "pool_s": t2 - t1, "engine_s": time.perf_counter() - t2}
        spec = self._spec(name, eng)
        kv = eng.scheduler.kv
        if self.memory is not None:
            # The policy's capacity is the weight space: a model takes its slot (rounded to the arena's
            # alignment); its KV takes pages of the KV region (a block per page, whatever its width).
            spec = dataclasses.replace(spec, weight_bytes=self.memory.slot_bytes(name))
            m = ModelState(spec, slo or self.default_slo, residency=Residency.HOST, kv_block_tokens=kv.block_size,
                           kv_block_bytes=self.memory.page_bytes)
        else:
            m = ModelState(spec, slo or self.default_slo, residency=Residency.RESIDENT, kv_block_tokens=kv.block_size)
            m.own_kv_bytes = m.kv_bytes(kv.num_blocks * kv.block_size)
        self.cost.register(spec)
        self.state.models[name] = m
        self._index_queues()
        self.steps_per_model[name] = 0
        self.priced[name] = [0.0, 0.0]
        # keep_alive's clock starts at its registration: with none, weights preloaded (`preload`) before any request
        # were evicted as soon as they landed, whatever its keep_alive
        self._last_request[name] = time.monotonic()
        self._capacity()
        self._sync_limits()
        self._event("register", name)

    def tokenizer(self, model_dir: str | Path):
        """The tokenizer of `model_dir`, loaded once while a model of that directory is hosted. Two threads
        asking at once both load it, and one of the two is kept."""
        key = str(model_dir)
        tok = self._tokenizers.get(key)
        if tok is None:
            from token_scheduler.tokenizer import load_tokenizer

            tok = self._tokenizers.setdefault(key, load_tokenizer(key))
        return tok

    def _prune_tokenizers(self) -> None:
        """Forget the tokenizers of directories no hosted model uses (a prepared one comes back if needed)."""
        used = {str(e.config.model) for e in self.engines.values()}
        for key in [k for k in self._tokenizers if k not in used]:
            del self._tokenizers[key]

    def remove_model(self, name: str) -> None:
        """Stop hosting `name`: its unfinished requests are aborted (final outputs come from the next step),
        the policy forgets it, and its weight slot, KV pages, CUDA graphs and (when no other registration shares
        it) its host copy are given back. The other models are not disturbed."""
        eng = self.engines.get(name)
        if eng is None:
            raise ValueError(f"unknown model {name!r}; hosted: {sorted(self.engines)}")
        # its step in flight read before its weights, KV and graphs go (its tokens owed), and the early plan undone
        # before the policy forgets `name` (its checkpoint still knows it)
        self._settle()
        for rid in list(eng.scheduler.requests):
            eng.abort_request(rid)
        if eng._inflight is not None:  # an overlapped decode in flight: read it so its blocks are returned
            eng.step_tokens()
        self._removed += eng.take_aborted()
        del self.engines[name], self.state.models[name]
        self._index_queues()
        self.policy.forget(name)
        self._sync_limits()
        self._last_run.pop(name, None)
        self._late.discard(name)
        self._last_request.pop(name, None)
        self._keep_alive.pop(name, None)
        self.steps_per_model.pop(name, None)
        self.priced.pop(name, None)
        self.add_s.pop(name, None)
        self._prune_tokenizers()
        eng.set_weights(None)
        eng.runner.graphs, eng.runner.kv, eng.runner.kv_swapper = {}, None, None
        if self.memory is not None:
            self.memory.pinned.discard(name)
            self.memory.unregister(name)
        if self.state.active == name:
            self.state.active = None
        self.cost.forget(name)
        self._capacity()
        self.events.append({"kind": "unregister", "model": name, "t": time.time()})

    def set_slo(self, name: str, slo: ModelSLO) -> None:
        """`name`'s SLO from now on: what the policy weighs its next turns by (requests already admitted keep the
        SLO they came under)."""
        if name not in self.engines:
            raise ValueError(f"unknown model {name!r}; hosted: {sorted(self.engines)}")
        self._settle()
        self.state.models[name].slo = slo

    def set_keep_alive(self, name: str, seconds: float | None) -> None:
        """Evict `name`'s weights once it has been idle (no request) for `seconds` (Ollama's keep_alive,
        llama-swap's ttl); None: they stay until the policy needs the room."""
        if seconds is None:
            self._keep_alive.pop(name, None)
        else:
            self._keep_alive[name] = max(0.0, float(seconds))

    def evict_when_idle(self, name: str) -> None:
        """Evict `name`'s weights (the host copy stays) as soon as it has no request, once: an operator freeing the
        GPU now (Ollama's `stop`, keep_alive 0 on a request). A pinned model's stay; a later request brings them
        back as any evicted model's."""
        if name not in self.engines:
            raise ValueError(f"unknown model {name!r}; hosted: {sorted(self.engines)}")
        self._evict_idle.add(name)

    def evicting(self) -> set[str]:
        """The models an `evict_when_idle` waits on (a request still running, a copy still landing)."""
        return set(self._evict_idle)

    def preload(self, name: str) -> bool:
        """Start bringing `name`'s weights in now, into free room only (nothing is evicted for it)."""
        if self.memory is None or self.memory.holds(name):
            return True
        self._settle()
        if self.memory.prefetch(name):
            m = self.state.models[name]
            m.residency = max(m.residency, Residency.LOADING)
            self._event("prefetch", name, preload=True)
            return True
        return False

    def expire(self) -> None:
        """keep_alive: idle models past their time lose their weights (the host copy stays). Called before every
        step, and by an idle caller now and then (nothing steps while nothing is asked)."""
        if self.memory is None:
            self._evict_idle.clear()
            return
        now = time.monotonic()
        for name in [*self._keep_alive, *self._evict_idle]:
            m = self.state.models.get(name)
            if m is None or m.pinned:
                self._evict_idle.discard(name)  # (gone, or pinned: its weights stay)
                continue
            if self.engines[name].has_unfinished_requests():
                continue  # (an evict waits for the requests, whose weights may still be on their way in)
            if not self.memory.holds(name):
                self._evict_idle.discard(name)  # (out already, and idle: nothing left to do)
                continue
            if not self.memory.landed(name):
                continue  # (a copy in flight: evicted once it lands)
            ttl = 0.0 if name in self._evict_idle else self._keep_alive[name]
            if now - max(self._last_run.get(name, 0.0), self._last_request.get(name, 0.0)) >= ttl:
                self._evict_idle.discard(name)
                self._settle()
                self.memory.evict(name)
                self.engines[name].set_weights(None)
                m.residency = Residency.HOST
                self._event("evict", name, keep_alive=ttl)

    def tick(self) -> None:
        """What an idle caller does now and then (nothing steps while nothing is asked): loads that finished are
        taken as resident and prefetch windows topped up (else only a step polls them), then `expire`."""
        if self.memory is not None:
            self._poll_loads()
        self.expire()
        for eng in self.engines.values():
            if eng._retiring:  # LoRA adapters unlisted while their requests ran
                eng.retire_loras()

    def set_pinned(self, name: str, pinned: bool) -> None:
        """Keep `name`'s weights in VRAM (pooled): no plan or fallback evicts them; they are brought in now if
        there is free room (else at its next step, and then they stay)."""
        if name not in self.engines:
            raise ValueError(f"unknown model {name!r}; hosted: {sorted(self.engines)}")
        self._settle()
        self.state.models[name].pinned = pinned
        if self.memory is None:
            return
        if pinned:
            self.memory.pinned.add(name)
            if not self.memory.holds(name) and self.memory.prefetch(name):
                m = self.state.models[name]
                m.residency = max(m.residency, Residency.LOADING)
                self._event("prefetch", name, pinned=True)
        else:
            self.memory.pinned.discard(name)

    def _sync_limits(self) -> None:
        """One set of batch limits: the hosted engines' own (EngineConfig.max_num_seqs and
        max_num_batched_tokens), so the policy never plans a batch the engine would cut."""
        if self.engines:
            cfgs = [e.config for e in self.engines.values()]
            self.policy.set_limits(min(c.max_num_seqs for c in cfgs), min(c.max_num_batched_tokens for c in cfgs))

    def _capacity(self) -> None:
        """Pooled: the weight space, and the KV region apart; all resident: the weights (KV: caches of their own)."""
        if self.memory is not None:
            self.state.capacity_bytes = self.memory.weight_capacity
            pages = self.memory.pages
            self.state.kv_capacity_bytes = pages.num_blocks * self.memory.page_bytes if pages is not None else 0
        else:
            self.state.capacity_bytes = sum(self.state.models[n].spec.weight_bytes for n in self.engines)

    @staticmethod
    def _spec(name: str, eng: LLMEngine) -> ModelSize:
        return ModelSize.from_config(name, eng.model_config, torch.empty((), dtype=eng.dtype).element_size())

    @staticmethod
    def _own_kv_bytes(eng: LLMEngine) -> int:
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
        if self._model_of(request_id) is not None:
            raise ValueError(f"request id {request_id!r} is already in use")
        req = self.engines[model].add_request(request_id, prompt, params, arrival_time=arrival_time)
        self._last_request[model] = time.monotonic()
        return req

    def _model_of(self, request_id: str) -> str | None:
        """The model an unfinished request belongs to: its engine's scheduler is the one registry of a request
        (a few dict lookups, one per hosted model, where a second map would have to be kept in step)."""
        return next((n for n, e in self.engines.items() if request_id in e.scheduler.requests), None)

    def abort_request(self, request_id: str) -> None:
        model = self._model_of(request_id)
        if model is not None:
            self._settle()
            self.engines[model].abort_request(request_id)
            self._aborts_owed = True  # its final output goes out with the next step, whichever model runs

    def has_unfinished_requests(self) -> bool:
        return any(e.has_unfinished_requests() for e in self.engines.values()) or bool(self._removed)

    # -- the step loop -------------------------------------------------------------------------------
    def _index_queues(self) -> None:
        self._queues = [(e.scheduler, self.state.models[n]) for n, e in self.engines.items()]

    def _sync(self) -> None:
        """Point the policy's view at each model's scheduler queues (no copies of requests)."""
        mem = self.memory
        if mem is not None:
            self._poll_loads()
            self.state.weight_free_run = mem.arena.alloc.largest_free  # a slot needs one contiguous range
        # Every step, every model: O(1) each. The running list is the scheduler's own (the policy only reads it,
        # and the scheduler changes it only after the plan is made); KV in whole blocks is what the model's
        # allocator holds -- exactly its running requests' blocks (swapped ones hold host blocks, waiting ones
        # none), counted as they are drawn instead of summed over the requests (35 models, 85 running requests:
        # 11.3 -> 1.6 us).
        for s, m in self._queues:
            m.waiting = s.waiting
            m.running = s.running + list(s.swapped) if s.swapped else s.running
            m.kv_gpu_tokens = s.kv.num_held * s.kv.block_size
            m.host_kv_free = s.host_free
        self.state.now = time.monotonic()

    def _poll_loads(self) -> None:
        """Models whose weights finished coming in are resident."""
        for name in self.memory.poll():
            if name in self.state.models:
                self.state.models[name].residency = Residency.RESIDENT

    def _execute_memory(self, plan, keep: tuple[str, ...] = ()) -> None:
        """The plan's memory moves, in the StepPlan contract's order (all resident: KV swap-outs only). `keep`: models a
        prefetch may not evict (a step of theirs is in flight on another stream: `_co_step`)."""
        mem, st = self.memory, self.state
        for name in plan.evict if mem is not None else ():
            if name != plan.model:
                mem.evict(name)
                self.engines[name].set_weights(None)
                st.models[name].residency = Residency.HOST
                self._event("evict", name)
        others: dict[str, list] = {}  # the stepping model's own swap-outs go with its batch (step)
        for r in plan.swap_out:
            name = r.model  # a request's model is its engine's served name (add_model sets it to the key)
            if name != plan.model:
                others.setdefault(name, []).append(r)
        for name, reqs in others.items():
            eng = self.engines[name]
            out = eng.scheduler.preempt(reqs)
            eng.runner.swap_kv(out.swap_out, [])
            self.kv_swapped_out += len(out.swap_out)
        if mem is None:
            return
        if plan.model is not None and plan.batch:
            eng = self.engines[plan.model]
            if eng.weights is None or not mem.is_resident(plan.model) or mem.is_loading(plan.model):
                was = mem.is_resident(plan.model) or mem.holds(plan.model)
                stall0, forced = mem.stats.stall_s, mem.stats.forced_evictions
                t0 = time.monotonic()
                rm = mem.load(plan.model, protect=(plan.prefetch,) if plan.prefetch else (), order=plan.load_order)
                waited = time.monotonic() - t0
                for r in (*eng.scheduler.waiting, *eng.scheduler.running):  # (those the load kept from their start)
                    if r.first_token_time is None:
                        r.load_s += waited
                eng.set_weights(rm.weights, rm.slot_id)
                if GRAPH_PRECAPTURE:
                    eng.runner.capture_first()
                st.models[plan.model].residency = Residency.RESIDENT
                self._event("load", plan.model, prefetched=was, stall_s=round(mem.stats.stall_s - stall0, 6))
                self._forget_evicted(forced)
        if plan.prefetch is not None and plan.prefetch in self.engines:
            order = (None if plan.prefetch_order is None
                     else [n for n in plan.prefetch_order if n != plan.model and n not in keep])
            was, forced = mem.holds(plan.prefetch), mem.stats.forced_evictions
            if mem.prefetch(plan.prefetch, order=order):
                if not was:
                    self._event("prefetch", plan.prefetch)
                m = st.models[plan.prefetch]
                m.residency = max(m.residency, Residency.LOADING)
                m.ready_at = st.now + self.cost.load_time(m.spec.weight_bytes)
            self._forget_evicted(forced)

    def _forget_evicted(self, forced_before: int) -> None:
        """Models `memory` evicted to make a slot contiguous (not in the plan) since its count of such evictions
        was `forced_before`: tell the engines and the policy. Every other eviction is the plan's or keep_alive's,
        which tell them as they evict, so most steps (none forced) have nothing to look at."""
        mem, st = self.memory, self.state
        if mem.stats.forced_evictions == forced_before:
            return
        for name, e in self.engines.items():
            if not mem.holds(name):
                if e.weights is not None:
                    e.set_weights(None)
                    self._event("evict", name, forced=True)
                st.models[name].residency = Residency.HOST

    def step(self) -> list[RequestOutput]:
        """One step, detokenized inline (`step_tokens`, then `detokenize` and `stop_requests`)."""
        outputs, stopped = self.detokenize(self.step_tokens())
        self.stop_requests(stopped)
        return outputs

    # Text is made apart from the step: a caller may run it while the next step runs (controller/worker.py)
    detokenize = staticmethod(detokenize)

    def stop_requests(self, stopped: list[tuple[Request, str]]) -> None:
        """Finish the requests `detokenize` found a stop string in (those of models still hosted)."""
        for req, stop in stopped:
            eng = self.engines.get(req.model)  # a request's model is its engine's served name (add_model)
            if eng is not None:
                eng.stop_requests([(req, stop)])

    @property
    def pipeline(self) -> bool:
        """Whether decode steps are pipelined (TOKENPOOL_PIPELINE): only with plan-ahead (it runs on early plans)."""
        return self._pipeline and self.plan_ahead

    def step_tokens(self, on_launch=None) -> list[TokenOutput]:
        """One step of the model the policy picks: token ids, no text (see `LLMEngine.step_tokens`, and there
        `on_launch`)."""
        if self._pipe is not None:  # (pipeline) a step in flight: continued, else read before anything else
            # (summed over calls that read no step: a deep co-step's first call leaves both steps in flight)
            self._gap += time.perf_counter() - self._t_ret
            # (deep co-stepping) the older of two steps in flight continued, else read first
            outputs = self._step_pipelined(on_launch, back=True) if self._back is not None else None
            if outputs is None and self._back is not None:
                self._removed += self._read("_back")
            if outputs is None and self._pipe is not None:
                outputs = self._step_pipelined(on_launch)
                if outputs is None and self._pipe is not None and self._co_step_on:
                    outputs = self._co_step(on_launch)
            if outputs is not None:
                return outputs
            self._flush(learn=True)
        self._gap = 0.0  # (nothing in flight: no interval to leave the caller's time out of)
        tm = self.timing
        t0, c0 = time.perf_counter(), time.thread_time()
        plan = self._take_ahead() if self._ahead is not None else None
        if plan is None:
            self._sync()
            plan = self.policy.schedule(self.state)
        # the CPU clock read inside the wall interval: CPU <= wall for intervals of a few µs (an early plan's check)
        c1, t1 = time.thread_time(), time.perf_counter()
        if plan.idle:
            tm["idle_policy_s"] += t1 - t0
            tm["idle_polls"] += 1
        else:
            tm["policy_s"] += t1 - t0
            tm["policy_cpu_s"] += c1 - c0
        outputs, self._removed = self._removed, []
        if self._keep_alive or self._evict_idle:
            self.expire()
        self._execute_memory(plan)
        self._learn_loads()
        if plan.swap_out or plan.swap_in:
            self._kv_moved = True
        t2 = time.perf_counter()
        tm["memory_s"] += t2 - t1
        if not plan.idle:
            eng = self.engines[plan.model]
            own = [r for r in plan.swap_out if r.model == plan.model]
            ahead = self.plan_ahead and self._can_plan_ahead
            pipe = self.pipeline and self._can_plan_ahead
            # pipeline: a decode the runner can launch is queued, not read: kept in flight when the early plan (made
            # in the hook) continues it, read now otherwise
            captures = self._captures(eng)
            c2 = time.thread_time()
            at_launch = []  # (perf_counter, thread_time) when the step's device work was queued
            launched = _marked(on_launch, at_launch)
            outputs += eng.step_tokens(plan.batch, own, self._ahead_hook(eng, launched) if ahead else launched,
                                       launch=pipe)
            if pipe and eng._inflight is not None:
                if self._keeps(eng):
                    self._pipe = (plan.model, t2, 0)
                else:
                    outputs += eng.complete_inflight()
            t3 = time.perf_counter()
            ran = eng.last_out  # the batch that ran: the plan's, less requests aborted since it was made
            self.kv_swapped_out += len(ran.swap_out)
            # (a step kept in flight is learned from when it is read; a step that captured a CUDA graph is not
            # learned: its tens of ms of capture, warm-up forwards included, are not what the shape costs)
            shape = _ran_shape(ran) if ran.chunks else None
            if shape is not None and self._pipe is None and self._captures(eng) == captures:
                self.cost.observe_step(plan.model, shape, t3 - t2)
                if self._trace is not None:
                    self._trace_step(plan.model, "read", shape, t3 - t2, eng.device_s, 0.0, True)
            if shape is not None and at_launch:  # the books count every step
                if self._pipe is None and eng.t_read is not None:
                    self._phases(shape, (t2, c2), at_launch[0], eng.t_read, (t3, time.thread_time()),
                                 dev=eng.device_s)
                elif self._pipe is not None:  # kept in flight: the pipeline's, with no wait (its read is the next
                    # call's, booked with the step that call queues)
                    self._phases(shape, (t2, c2), at_launch[0], at_launch[0], (t3, time.thread_time()),
                                 kind="pipelined")
            self._stepped(plan.model, t3 - t2, plan.expected_s)
        return self._after_step(plan.model, outputs)

    def _phases(self, shape: StepShape, t2, launched, read, t3, kind: str | None = None,
                dev: float | None = None) -> None:
        """The books of where a step's time went, by its kind (`phase_kind`; "pipelined" for a step queued before the
        one in flight was read): before its device work was queued (plan committed, KV moved, inputs filled, graph
        replayed or eager forward launched), from then to tokens on the host (sampling and the wait for the device;
        pipelined: the step before's), and after (the scheduler's update); each as wall and the step thread's CPU
        time (wall less CPU: waits for the GIL, the CPU or the device)."""
        kind = kind or phase_kind(shape)
        tm = self.timing
        for (ta, ca), (tb, cb), ph in ((t2, launched, "pre"), (launched, read, "wait"), (read, t3, "post")):
            tm[f"ph_{kind}_{ph}_s"] += tb - ta
            tm[f"ph_{kind}_{ph}_cpu_s"] += cb - ca
        tm[f"ph_{kind}_steps"] += 1
        tm[f"ph_{kind}_seqs"] += shape.num_seqs
        if dev is not None:  # (TOKENPOOL_TIME_STEPS) the device's time for the step read (pipelined: the one before)
            tm[f"ph_{kind}_dev_s"] += dev
            tm[f"ph_{kind}_dev_n"] += 1

    @staticmethod
    def _captures(eng: LLMEngine) -> int:
        """How many CUDA graphs `eng`'s runner (and the runners sharing its graphs) captured so far."""
        done = eng.runner.graphs.get(CAPTURES)
        return done[0] if done else 0

    def _learn_loads(self) -> None:
        """Measured loads teach the cost model the link (and how much prefetch hides)."""
        if self.memory is not None:
            st = self.memory.stats
            new = st.loads_done - self._loads_seen
            if new:
                for i in range(-min(new, len(st.load_s)), 0):  # the newest, in order (a deque's ends index in O(1))
                    nbytes, secs, hidden = st.load_s[i]
                    self.cost.observe_load(nbytes, secs, hidden_s=hidden)
                self._loads_seen = st.loads_done

    def _stepped(self, name: str, engine_s: float, priced_s: float = 0.0) -> None:
        """The books of a step of `name` that ran (its engine time `engine_s`; `priced_s`: what the plan expected it to
        take, `StepPlan.expected_s`): counters, switches, the timeline."""
        tm = self.timing
        tm["engine_s"] += engine_s
        tm["steps"] += 1
        pb = self.priced[name]  # [engine seconds, priced seconds]: whether the policy's turns buy what it planned
        pb[0] += engine_s
        pb[1] += priced_s
        self.state.active = name
        self._last_run[name] = time.monotonic()
        self._late.discard(name)
        self.steps_per_model[name] += 1
        if self.trace and self.trace[-1] != name:
            self.switches += 1  # (the event carries the steps of the turn it ends)
            self._event("switch", name, previous=self.trace[-1], turn_steps=self._turn_steps)
            self._turn_steps = 0
        self._turn_steps += 1
        self.trace.append(name)
        tl = self.timeline
        if tl and tl[-1][1] == name:
            tl[-1][2] += 1
            tl[-1][3] += engine_s
        else:
            tl.append([time.time() - engine_s, name, 1, engine_s])

    def _after_step(self, stepped: str | None, outputs: list[TokenOutput]) -> list[TokenOutput]:
        """The end of every step call: the late watch, and the final outputs aborted requests of models that did not
        step (`stepped`) still owe -- no step runs for them; looked for only after an abort, not in every model at
        every step."""
        if self.state.now >= self._late_check:
            self._watch_late(self.state.now)
        if self._aborts_owed:
            self._aborts_owed = False
            for name, eng in self.engines.items():
                if name != stepped and eng._aborted:
                    outputs += eng.take_aborted()
        self._t_ret = time.perf_counter()
        if self._cycle is not None:
            (cols, t_end), self._cycle = self._cycle, None
            self._trace_row(*cols, _ms(self._t_ret - t_end))
        return outputs

    # -- pipeline ------------------------------------------------------------------------------------
    def _continues(self, plan: StepPlan, eng: LLMEngine) -> bool:
        """Whether `plan` (an early plan, made while `eng`'s step is in flight, its tokens not applied) is exactly that
        step's continuation: the same model, its weights resident and not moving, nothing waiting or swapped, and its
        batch a 1-token decode of each request `scheduler.continuation` keeps -- every live request of the step in
        flight (all of the model's running ones) but those whose token of that step is their last by length -- and
        nothing else. Early plans move no memory but a prefetch (`_plan_ahead` drops the rest), which goes to another
        model's slot and never evicts the stepping one (`_execute_memory` keeps it out of the order). Whether the KV
        blocks of one more token are free and the runner can launch it, `continuation` itself says."""
        name, s, out = plan.model, eng.scheduler, eng._inflight.out
        if plan.idle or name != s.model or s.waiting or s.swapped or not plan.batch or eng.weights is None:
            return False
        mem = self.memory
        if mem is not None and (not mem.is_resident(name) or mem.is_loading(name)):
            return False
        live, keep, reqs = 0, set(), s.requests
        for c in out.chunks:
            r = c.request
            if r.finished or reqs.get(r.request_id) is not r:
                continue
            live += 1
            if len(r.output_token_ids) + 1 < r.max_output_tokens:
                keep.add(id(r))
        if live != len(s.running) or len(plan.batch) != len(keep):
            return False
        return all(n == 1 and id(r) in keep for r, n in plan.batch)

    # -- co-stepping ----------------------------------------------------------------------------------
    def _keeps(self, eng: LLMEngine) -> bool:
        """Whether `eng`'s step just launched stays in flight past this call: the early plan continues it
        (`_continues`), or (co-stepping) it is another model's decode step that can run beside it (`_co_candidate`)."""
        ahead = self._ahead
        if ahead is None:
            return False
        if self._continues(ahead[0], eng):
            self.timing["pipeline_kept"] += 1
            return True
        if self._co_step_on and self._co_candidate(ahead[0], eng.scheduler.model):
            self.timing["co_kept"] += 1
            return True
        return False

    def _co_candidate(self, plan: StepPlan, beside: str) -> bool:
        """Whether `plan` (an early plan) can be launched while model `beside`'s step is in flight (`_co_step`):
        another model's decode of requests already running, one token each, that its runner can launch overlapped (a
        graph bucket, no penalties or logprobs), its weights resident and landed, no memory move but a prefetch."""
        name = plan.model
        if plan.idle or name == beside or not plan.batch or plan.evict or plan.swap_out or plan.swap_in:
            return False
        eng = self.engines.get(name)
        if eng is None or eng._inflight is not None or eng.weights is None:
            return False
        mem = self.memory
        if mem is not None and (not mem.is_resident(name) or mem.is_loading(name)):
            return False
        return (all(n == 1 and q.status is _RUNNING and q.output_token_ids and not q.is_prefilling
                    for q, n in plan.batch)
                and eng.runner.launchable(len(plan.batch), (q for q, _ in plan.batch)))

    def _co_step(self, on_launch) -> list[TokenOutput] | None:
        """(Co-stepping, TOKENPOOL_CO_STEP) A step while model A's decode step is in flight and the early plan is
        another model B's decode (`_co_candidate`): B's step is launched on the other lane -- a second CUDA stream,
        with graphs of its own (`ModelRunner.lane`) -- so the device runs both at once, then A is read and its tokens
        applied (this call's outputs), then the plan for the step after B is made beside B, which stays in flight as
        the pipeline's step. Why: a small decode step leaves the device idle at each of its ~170 kernel boundaries
        (fill and drain); another model's kernels fill them. On the H200 two 1.5B batch-2 steps took 2.30 ms on two
        streams against 3.50 on one, a 7B and a 1.5B 5.19 against 6.29 (`diag_gpu co-step`, 3c76624). Each step is
        learned at its interval between reads (`_learn_pipelined`), not at its device time, which the other shares.
        None: not such a step (the caller reads A and goes on as usual)."""
        name_a, _, lane_a = self._pipe
        if self._ahead is None or not self._co_candidate(self._ahead[0], name_a):
            return None
        plan = self._take_ahead()  # (checked again at its step: age, requests, KV blocks; undone if stale)
        if plan is None:
            return None
        tm = self.timing
        outputs, self._removed = self._removed, []
        self._execute_memory(plan, keep=(name_a,))  # (a prefetch at most: never into A's slot, its step reads it)
        self._learn_loads()
        t2 = time.perf_counter()
        eng = self.engines[plan.model]
        self.engines[name_a]._inflight.overlapped = True
        lane = 1 - lane_a
        at_launch = []
        with self._on_lane(eng, lane):
            outputs += eng.step_tokens(plan.batch, [], _marked(on_launch, at_launch), launch=True)
        tm["co_steps"] += 1
        self._back, self._pipe = self._pipe, None  # A, the older
        if eng._inflight is None:  # (B ran and was read at once)
            outputs += self._read("_back")
        else:
            eng._inflight.overlapped = True
            self._pipe = (plan.model, t2, lane)
            if at_launch:
                self._phases(_ran_shape(eng.last_out), (t2, at_launch[0][1]), at_launch[0], at_launch[0],
                             (time.perf_counter(), time.thread_time()), kind="pipelined")
            kept = False
            if self._co_deep:  # the plan beside both, neither read: A stays in flight if it continues A
                self._plan_ahead(eng.last_out)
                kept = self._keep_back()
                if not kept:
                    self._drop_ahead()
            if not kept:
                outputs += self._read("_back")  # A read, beside B
                self._plan_ahead(eng.last_out)  # beside B, A's tokens applied
                outputs += self._hold()
        self._stepped(plan.model, time.perf_counter() - t2, plan.expected_s)
        return self._after_step(plan.model, outputs)

    @contextlib.contextmanager
    def _on_lane(self, eng: LLMEngine, lane: int):
        """`eng`'s launches inside on co-stepping lane `lane`: lane 0 is the current stream and the runner's own graphs,
        lane 1 a second stream of the device and graphs (and a graph memory pool) of their own."""
        if lane == 0:
            yield
            return
        r = eng.runner
        r.lane = lane
        try:
            if r.is_cuda:
                s = self._lane_streams.get(r.device)
                if s is None:
                    s = self._lane_streams[r.device] = torch.cuda.Stream(r.device)
                if self._kv_moved:  # KV blocks freed by a swap-out may be this step's: the current stream waited
                    # for the copies (`swap_kv`), so this one waits for it (rare; it also waits for the step in flight)
                    s.wait_stream(torch.cuda.current_stream(r.device))
                    self._kv_moved = False
                with torch.cuda.stream(s):
                    yield
            else:
                yield
        finally:
            r.lane = 0

    def _settle(self) -> None:
        """Before a change from outside a step (a model added or removed, an abort, pins, preloads, keep-alive
        evictions, counters reset, close): the step in flight read (`_flush`) and the early plan undone
        (`_drop_ahead`)."""
        self._flush()
        self._drop_ahead()

    def _flush(self, learn: bool = False) -> None:
        """(Pipeline) Read the step left in flight and apply its tokens, their outputs owed by the next step; before
        anything that needs it finished: another model's step, any memory move, a model added or removed, an abort,
        pins, preloads, keep-alive evictions, counters reset, close, and a step with nothing to continue."""
        for which in ("_back", "_pipe"):  # (the older first)
            if getattr(self, which) is not None:
                self._removed += self._read(which, learn)
                self.timing["pipeline_flushes"] += 1

    def _read(self, which: str, learn: bool = True) -> list[TokenOutput]:
        """Read the step in flight that `which` ("_pipe" or "_back") names and apply its tokens (returned), learned
        at its interval (`_learn_pipelined`) less the caller's gap before this call, which goes with the first step
        read in a call. `learn` False: a read from outside a step call (the caller's pause is in its time)."""
        name, t_launch, _ = getattr(self, which)
        setattr(self, which, None)
        eng = self.engines[name]
        step = eng._inflight
        outputs = eng.complete_inflight()
        if learn:
            self._learn_pipelined(name, step, t_launch, self._gap)
            self._gap = 0.0
        else:
            self._t_done = time.perf_counter()
        return outputs

    def _keep_back(self) -> bool:
        """(Deep co-stepping, TOKENPOOL_CO_STEP_DEEP) Whether the older step in flight (`_back`) stays in flight past
        this call: the early plan continues it (`_continues`), so the next call queues its model's next step on its
        lane before reading it -- the device then always has the two models' next steps queued, one a stream, and
        never waits for the host between them."""
        ahead = self._ahead
        if ahead is None or not self._co_deep or not self._continues(ahead[0], self.engines[self._back[0]]):
            return False
        self.timing["co_deep_kept"] += 1
        return True

    def _hold(self) -> list[TokenOutput]:
        """After a step's launch and the early plan beside it: what stays in flight past this call. The older step
        (`_back`, deep co-stepping) when the plan continues it (`_keep_back`), else it is read; then the newest
        (`_pipe`) when the plan continues it or can run beside it (`_keeps`), else it is read. The outputs of the
        steps read."""
        outputs = []
        if self._back is not None:
            if self._keep_back():
                return outputs
            outputs += self._read("_back")
        if not self._keeps(self.engines[self._pipe[0]]):
            outputs += self._read("_pipe")  # (launched in this call: the gap went with the step read before)
        return outputs

    def _learn_pipelined(self, name: str, step, t_launch: float, gap: float = 0.0) -> None:
        """The cost model learns a step kept in flight (`step`, a LaunchedDecode) once it is read: the interval between
        completions -- from its launch, or from the read of the step before if that came later (it queued behind it),
        to its own read -- less `gap`, the caller's own time between the two step calls inside it, and not under the
        device's time for it where that was measured (CUDA events: `LaunchedDecode.device_s`). That is the step
        loop's time a step: the device's when the host keeps up, the loop's host time (policy, memory moves, books,
        the GIL shared with the thread making text) when it does not -- what a turn's time quota buys steps at.
        - Without `gap`, a caller that works between step calls on the step's thread (`bench pool --real` replays
          arrivals and makes text there) has that work priced into every step: on the H200 at 1.6 req/s/model it
          taught 1.5B decodes of ~1.6 ms as 5-8 ms, whose time quotas then bought turns of seconds: 29.9%, TTFT p50
          13.6 s, where the served worker (text made on another thread, gap ~0) met 99.2% (df838c1).
        - The device's time alone leaves the loop's host time out, as a step read at once is learned (`step_tokens`):
          served 77.0% at 1.6, the harness 90.6% (71b3f4c); device time is the floor here (a device-bound step whose
          read the caller's gap delayed less than the interval shows).
        Not learned when longer than AHEAD_MAX_AGE_S: the caller paused between the two calls."""
        t = time.perf_counter()
        dt = t - max(t_launch, self._t_done) - gap
        dev = step.device_s()
        if dev is not None and not step.overlapped:  # (a step beside another model's takes longer on the device,
            # sharing it: the interval is its cost then)
            dt = dev if PIPELINE_LEARN == "device" else max(dt, dev)
        learn = bool(step.out.chunks) and 0.0 < dt <= AHEAD_MAX_AGE_S and PIPELINE_LEARN != "none"
        if learn:
            self.cost.observe_step(name, _ran_shape(step.out), dt)
        if self._trace is not None and step.out.chunks:
            self._trace_step(name, "pipelined", _ran_shape(step.out), dt, dev, gap, learn)
        self._t_done = t

    def _trace_gc(self, phase: str, info: dict) -> None:
        """(TOKENPOOL_STEP_TRACE) A collection's pause as a line: when, "gc", its generation, the objects it
        collected, then (in the seconds column of a step's line) its ms."""
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        elif self._trace is not None:
            self._trace_row("gc", info["generation"], info["collected"], 0, 0,
                            _ms(time.perf_counter() - self._gc_t0), "", 0, 0)

    def _trace_step(self, name: str, kind: str, shape: StepShape, secs: float, dev: float | None, gap: float,
                    learned: bool) -> None:
        """(TOKENPOOL_STEP_TRACE) One step's timing sample as a CSV line: what the cost model learned from it or
        would have (`learned`), beside the device's time and the caller's gap. Other lines: "gc" (`_trace_gc`) and
        "cycle", a pipelined call's host time in ms (`_step_pipelined`): its checks and continuation, the launch of
        N+1, the wait for N's tokens, the caller's gap before the call, the next early plan, the rest from the
        read to that plan, the step thread's CPU time in the launch and in the wait (wall less CPU: the GIL, the
        OS), and the call's tail after the plan."""
        self._trace_row(name, kind, shape.num_seqs, shape.new_tokens, shape.ctx_tokens, _ms(secs),
                        "" if dev is None else _ms(dev), _ms(gap), int(learned))

    def _trace_row(self, *cols) -> None:
        """(TOKENPOOL_STEP_TRACE) One CSV line: when (time.monotonic), then `cols`."""
        self._trace.write(f"{time.monotonic():.6f},{','.join(map(str, cols))}\n")

    def _step_pipelined(self, on_launch, back: bool = False) -> list[TokenOutput] | None:
        """A step while a decode step N of model A is in flight (`_pipe`): when the early plan for N+1 is still
        exactly N's continuation (`_continues`), N+1 is queued fed with N's sampled ids on the device, then N is read
        and its tokens applied (its outputs returned by this call), then the plan for N+2 is made beside N+1. N+1 stays
        in flight if that plan continues it too, else it is read before returning. None: no continuation (something
        changed since the plan: a request added, finished, stopped; short of KV blocks; the plan too old): the caller
        reads N (`_flush`) and steps as without the flag, the early plan checked there as usual (`_take_ahead`).
        `back` (deep co-stepping): N is the older of two steps in flight (`_back`), the other model's step stays in
        flight beside N+1 and becomes the older (`_hold`)."""
        tm = self.timing
        if self._keep_alive or self._evict_idle:
            self.expire()  # (flushes first if it evicts anything)
            if self._pipe is None:
                return None
        t0, c0 = time.perf_counter(), time.thread_time()
        name, t_launch, lane = self._back if back else self._pipe
        eng = self.engines[name]
        ahead = self._ahead
        if (ahead is None or ahead[0].model != name or t0 - ahead[3] > AHEAD_MAX_AGE_S
                or not self._continues(ahead[0], eng)):
            return None
        nxt = eng.scheduler.continuation(eng._inflight.out, eng.runner.can_launch)  # grows the blocks it needs
        if nxt is None:
            return None
        plan = ahead[0]
        self._ahead = None
        tm["ahead_used"] += 1
        self.state.now = time.monotonic()
        prev = eng._inflight
        c1, t1 = time.thread_time(), time.perf_counter()  # (inside the wall interval, as in step_tokens)
        tm["policy_s"] += t1 - t0
        tm["policy_cpu_s"] += c1 - c0
        outputs, self._removed = self._removed, []
        if plan.prefetch is not None and self.memory is not None:  # the one memory move an early plan keeps
            # (a prefetch into another model's slot: A's weights stay, resident, and those of a step beside it)
            self._execute_memory(plan, keep=(name, self._pipe[0]) if back else ())
            self._learn_loads()
        t2, c2 = time.perf_counter(), time.thread_time()
        tm["memory_s"] += t2 - t1
        at_launch = []
        with self._on_lane(eng, lane):  # (N+1 on N's stream: it takes N's sampled ids there)
            outputs += eng.continue_inflight(nxt, _marked(on_launch, at_launch))  # N+1 queued, then N read
        if at_launch and eng.t_read is not None:
            self._phases(_ran_shape(nxt), (t2, c2), at_launch[0], eng.t_read,
                         (time.perf_counter(), time.thread_time()), kind="pipelined", dev=eng.device_s)
        gap, self._gap = self._gap, 0.0
        self._learn_pipelined(name, prev, t_launch, gap)
        if back:
            self._back, self._pipe = self._pipe, (name, t2, lane)
        else:
            self._pipe = (name, t2, lane)
        tm["pipelined_steps"] += 1
        t_plan = time.perf_counter()
        self._plan_ahead(nxt)  # beside N+1 (as the hook does for a step launched the usual way)
        if self._trace is not None and at_launch and eng.t_read is not None:
            t_end = time.perf_counter()  # (the host's cycle of a pipelined call, where a stall between reads went)
            (launched, c_l), (read, c_r) = at_launch[0], eng.t_read
            # written by `_after_step`, with the call's tail (books, late watch) after the plan
            self._cycle = ((name, "cycle", len(nxt.chunks), _ms(t2 - t0), _ms(launched - t2), _ms(read - launched),
                            _ms(gap), _ms(t_end - t_plan), _ms(t_plan - read), _ms(c_l - c2), _ms(c_r - c_l)),
                           t_end)
        outputs += self._hold()
        self._stepped(name, time.perf_counter() - t2, plan.expected_s)  # (the same model as before: no switch)
        return self._after_step(name, outputs)

    # -- plan-ahead ----------------------------------------------------------------------------------
    def _ahead_hook(self, eng: LLMEngine, on_launch):
        """The `on_launch` of a step with plan-ahead: the caller's, then the next step's plan (`_plan_ahead`)."""
        def launched():
            if on_launch is not None:
                on_launch()
            self._plan_ahead(eng.last_out)
        return launched

    def _plan_ahead(self, ran) -> None:
        """While step `ran` (the SchedulerOutput committed and launched) runs on the device: the policy's plan for the
        next step, kept for `_take_ahead`. A plan that moves memory (evictions, KV swaps) or plans nothing is undone
        at once (the policy's checkpoint restored) and the next step plans as usual: its moves were judged against
        KV and weights the running step still changes, and an idle plan saves nothing."""
        tm = self.timing
        t0, c0 = time.perf_counter(), time.thread_time()
        self._drop_ahead()  # (none is pending here: the step took it)
        policy = self.policy
        cp = policy.checkpoint()
        try:
            self._sync()
            plan = policy.schedule(self.state)
        except Exception:  # noqa: BLE001 - undone; the next step plans again (and raises there, as without the flag)
            plan = None
        if plan is None or plan.idle or plan.evict or plan.swap_out or plan.swap_in:
            policy.restore(cp)
            tm["ahead_discarded"] += 1
        else:
            prev = {id(c.request) for c in ran.chunks}
            if self._back is not None:  # (deep co-stepping: the older step in flight's tokens are not applied either)
                prev.update(id(c.request) for c in self.engines[self._back[0]]._inflight.out.chunks)
            self._ahead = (plan, cp, prev, t0)
        c1, t1 = time.thread_time(), time.perf_counter()
        tm["ahead_s"] += t1 - t0
        tm["ahead_cpu_s"] += c1 - c0

    def _drop_ahead(self) -> None:
        """Undo a pending early plan (the policy's state back to before it): something it assumed is changing
        (a model added or removed, an abort, weights moved outside a plan, pins, counters reset). Done before the
        change, not found after it: the policy's checkpoint predates e.g. `forget` of a removed model."""
        if self._ahead is not None:
            self.policy.restore(self._ahead[1])
            self._ahead = None
            self.timing["ahead_discarded"] += 1

    def _take_ahead(self) -> StepPlan | None:
        """The early plan, when still valid at its step; else None (undone: the caller plans as usual).

        Valid: its model still hosted (removals, additions, aborts, evictions and pins outside plans drop it before
        they happen: `_drop_ahead`), made less than AHEAD_MAX_AGE_S ago, and every batch entry still runs as
        planned: its request still this model's, unfinished (one that finished at the step before -- a stop
        token, its length, a stop string, an abort -- is not run), RUNNING or WAITING (new requests in FCFS
        order at the queue's head, as `commit` requires); a request that was in the step before may only decode (1
        token: a prefill chunk planned before that step's tokens were counted is stale); and the KV blocks the
        batch needs now are free (a decode that crossed a block boundary at the step before needs one block the
        plan did not count). New requests since the plan are picked up a step later."""
        plan, cp, prev, t_made = self._ahead
        self._ahead = None
        eng = self.engines.get(plan.model)
        now = time.monotonic()
        if (eng is None or time.perf_counter() - t_made > AHEAD_MAX_AGE_S
                or not _still_fits(plan.batch, eng.scheduler, prev)):
            self.policy.restore(cp)
            self.timing["ahead_discarded"] += 1
            return None
        self.timing["ahead_used"] += 1
        self.state.now = now  # the clock of this step's memory moves and late watch (the rest: at the next plan)
        return plan

    def _watch_late(self, now: float) -> None:
        """Twice a second: a "late" event for each model that has a request past its next token's deadline and
        has not stepped since its last such event (what it waited on: its weights' residency, its last step)."""
        self._late_check = now + 0.5
        for name, eng in self.engines.items():
            s, m = eng.scheduler, self.state.models[name]
            if name in self._late or not (s.waiting or s.running or s.swapped):
                continue
            late = max(-next_token_slack(r, m.slo, now) for r in (*s.waiting, *s.running, *s.swapped))
            if late > 0:
                self._late.add(name)
                self.timing["late_episodes"] += 1
                last = self._last_run.get(name)
                # its last turn (steps, engine ms per step) against what the cost model predicts for a decode of
                # its running requests now: a fit that prices its steps short plans it turns too short
                turn = next((t for t in reversed(self.timeline) if t[1] == name), None)
                ctx = sum(r.num_tokens for r in s.running)
                n = max(1, len(s.running))
                self._event("late", name, late_s=round(late, 3), residency=m.residency.name.lower(),
                            since_step_s=None if last is None else round(now - last, 3),
                            waiting=len(s.waiting), running=len(s.running) + len(s.swapped), active=self.state.active,
                            turn_steps=turn[2] if turn else 0,
                            turn_ms_per_step=round(1e3 * turn[3] / turn[2], 3) if turn else None,
                            predicted_ms_per_step=round(1e3 * self.cost.step_time(name, StepShape(n, n, ctx)), 3))

    def estimate(self, name: str) -> dict[str, float]:
        """This engine's own numbers for a new request's TTFT (the controller routes and admits with them):
        seconds of prefill per prompt token, of one decode step now, and of the load when the weights are not
        in VRAM (0 when resident or landing)."""
        m = self.state.models[name]
        n = max(1, len(m.running))
        resident = self.memory is None or self.memory.holds(name)
        return {"prefill_s_per_token": max(0.0, self.cost.step_coefficients(name)[2]),
                "decode_step_s": self.cost.step_time(name, StepShape(n, n, n * 256)),
                "load_s": 0.0 if resident else self.cost.load_time(m.spec.weight_bytes),
                "resident": 1.0 if resident else 0.0}

    def _event(self, kind: str, model: str, **fields) -> None:
        self.events.append({"kind": kind, "model": model, "t": time.time(), **fields})

    def snapshot(self) -> dict:
        """What this device's models and memory are doing now, for the admin API and the dashboard (plain data,
        cheap: no tensors)."""
        mem, now = self.memory, time.monotonic()
        models = {}
        for name, eng in self.engines.items():
            s = eng.scheduler
            if mem is None:
                state = "resident"
            elif mem.holds(name):
                state = "resident" if mem.landed(name) else "loading"
            else:
                state = "host"
            oldest = min((r.arrival_time for r in s.waiting), default=None)
            engine_s, priced_s = self.priced.get(name, (0.0, 0.0))
            models[name] = {
                "state": state, "waiting": len(s.waiting), "running": len(s.running), "swapped": len(s.swapped),
                "oldest_wait_s": max(0.0, now - oldest) if oldest is not None else 0.0,
                # (distinct pages: a prefix-cached page several requests share is one page)
                "kv_pages_used": len({b for r in s.running for b in r.block_ids}),
                "kv_swapped": sum(len(r.host_block_ids or ()) for r in s.swapped),
                "steps": self.steps_per_model.get(name, 0),
                "engine_s": engine_s, "priced_s": priced_s,
                # what the policy weighs it by, and its residency (PATCH /admin/models changes them in place)
                "slo": dataclasses.asdict(self.state.models[name].slo), "keep_alive_s": self._keep_alive.get(name)}
        if mem is not None:
            held = [n for n in mem.entries if mem.holds(n)]
            weights = sum(mem.slot_bytes(n) for n in held)
            kv = mem._kv_slot.nbytes if mem._kv_slot is not None else 0
            vram = {"budget_bytes": mem.arena.capacity, "weights_bytes": weights, "kv_bytes": kv,
                    "free_bytes": mem.arena.capacity - weights - kv,
                    "kv_pages_total": mem.pages.num_blocks if mem.pages else 0,
                    "kv_pages_used": mem.pages.num_used if mem.pages else 0}
            host = mem.host_bytes()
            stall = mem.stats.stall_s
        else:
            weights = sum(self.state.models[n].spec.weight_bytes for n in self.engines)
            kv = sum(self._own_kv_bytes(e) for e in self.engines.values())
            vram = {"budget_bytes": weights + kv, "weights_bytes": weights, "kv_bytes": kv, "free_bytes": 0,
                    "kv_pages_total": sum(e.scheduler.kv.num_blocks for e in self.engines.values()),
                    "kv_pages_used": sum(e.scheduler.kv.num_used for e in self.engines.values())}
            host, stall = 0, 0.0
        counters = dict(self.timing)
        books = getattr(self.policy, "round_books", None)  # (the token policy) rounds planned against their wall
        if books is not None:
            counters.update(zip(("rounds_timed", "round_planned_s", "round_wall_s", "rounds_overrun"), books))
            # rounds formed, and how many of them took the deadline rule (quota.need_round: pace quotas did not fit)
            counters["rounds_formed"], counters["need_rounds"] = self.policy.rounds, self.policy.need_rounds
            counters.update(zip((f"round_{k}" for k in ROUND_TERMS), self.policy.round_terms))
            counters.update(zip((f"turn_end_{k}" for k in TURN_ENDS), self.policy.turn_ends))
        if mem is not None:  # the pool's counters (its latest loads aside: asdict copied them, every snapshot)
            counters.update((k, v) for k, v in vars(mem.stats).items() if not isinstance(v, deque))
            # graph_output_bytes: held now (the kept graphs' logits), not summed over time; graph_evictions: over the cap
            (counters["graph_captures"], counters["graph_capture_s"], counters["graph_first_captures"],
             counters["graph_first_capture_s"], counters["graph_output_bytes"],
             counters["graph_evictions"]) = mem.graphs.get(CAPTURES, CAPTURES_ZERO)
        return {
            "device": str(self.device), "active": self.state.active, "registered": sorted(self.engines),
            "resident": sorted(n for n, m in models.items() if m["state"] == "resident"),
            "prefetching": sorted(n for n, m in models.items() if m["state"] == "loading"),
            "switches": self.switches, "switch_stall_s": stall / max(1, self.switches),
            "steps": int(self.timing["steps"]), "kv_swapped_out": self.kv_swapped_out,
            "vram": vram, "host_cache_bytes": host, "models": models,
            # cumulative, for rates over a window (bench serve: where the step loop's time went)
            "counters": counters,
            # what the cost model has learned (the step fits per model, the link): a served run's fits, which
            # the simulator can replay (`bench pool --profile FILE`); non-finite numbers as None, for JSON
            "cost_model": _finite(self.cost.to_dict())}

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
        self._settle()
        self.trace.clear()
        self.switches = self._turn_steps = 0
        self.steps_per_model = dict.fromkeys(self.engines, 0)
        self.priced = {n: [0.0, 0.0] for n in self.engines}
        self.kv_swapped_out = 0
        self.timing = dict.fromkeys(self.timing, 0.0)
        if self.memory is not None:
            self.memory.reset_stats()
        self._loads_seen = 0
        self.policy.reset_counters()

    def timing_summary(self) -> dict:
        """Where the step loop's time went. `policy_frac`: the policy CPU time of the steps that ran over their
        wall time (weights/KV moves + engine steps); idle plans are counted apart (`idle_policy_s`)."""
        tm = self.timing
        n = max(1.0, tm["steps"])
        work = tm["memory_s"] + tm["engine_s"]
        return {**{k: v for k, v in tm.items() if not k.startswith("ph_")},
                "policy_us_per_step": 1e6 * tm["policy_s"] / n, "engine_ms_per_step": 1e3 * tm["engine_s"] / n,
                "policy_frac": tm["policy_s"] / work if work else 0.0, "step_phases": step_phases(tm)}

    def close(self) -> None:
        """Give the memory back: every view into the arena (weights, KV, graphs) is dropped, then the arena."""
        self._settle()
        for eng in self.engines.values():
            eng.set_weights(None)
            r = eng.runner
            r.graphs, r.kv, r.kv_swapper = {}, None, None
        self.engines.clear()
        if self.memory is not None:
            self.memory.close()
        if self._trace is not None:
            gc.callbacks.remove(self._trace_gc)
            self._trace.close()
            self._trace = None


def _still_fits(batch: list, s, prev: set) -> bool:
    """Whether `batch` (an early plan's) still runs as planned on scheduler `s` (`MultiModelEngine._take_ahead`);
    `prev`: {id(request)} of the step that ran since it was planned."""
    live, kv = s.requests, s.kv
    bs, need, w, waiting = kv.block_size, 0, 0, s.waiting
    for r, n in batch:
        if live.get(r.request_id) is not r or r.num_tokens - r.num_computed_tokens < n:
            return False
        if n != 1 and id(r) in prev:
            return False
        st = r.status
        if st is _RUNNING:
            c = r.num_computed_tokens + n
            grow = -(-c // bs) - len(r.block_ids)
            if grow > 0:
                need += grow
        elif st is _WAITING:
            if w >= len(waiting) or waiting[w] is not r:
                return False
            w += 1
            need += -(-(r.num_computed_tokens + n) // bs) - len(r.block_ids)
        else:
            return False
    return need <= kv.num_free


def _finite(d):
    """`d` (dicts, lists, numbers) with every non-finite float as None."""
    if isinstance(d, dict):
        return {k: _finite(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_finite(v) for v in d]
    return None if isinstance(d, float) and not math.isfinite(d) else d


def _marked(on_launch, into: list):
    """`on_launch`, first noting when it was called (wall, the thread's CPU) in `into`."""
    def launched():
        into.append((time.perf_counter(), time.thread_time()))
        if on_launch is not None:
            on_launch()
    return launched


def _ms(seconds: float) -> str:
    """Seconds as milliseconds for the step trace (TOKENPOOL_STEP_TRACE)."""
    return f"{seconds * 1e3:.4f}"


def _ran_shape(out) -> StepShape:
    """The shape of a step that ran (its chunks' start positions: the requests' cursors have moved on)."""
    seqs, tokens, ctx, pairs = len(out.chunks), 0, 0, 0
    for c in out.chunks:
        tokens += c.num_tokens
        ctx += c.start + c.num_tokens
        if c.num_tokens > 1:
            pairs += c.num_tokens * (c.start + c.num_tokens)
    return StepShape(seqs, tokens, ctx, pairs)
