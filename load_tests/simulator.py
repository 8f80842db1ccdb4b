"""Discrete-event simulator: the real policy code, driven in virtual time by a hardware profile.

Each simulated GPU is a mechanism exactly like the engine's: it keeps a `PoolState`, asks its policy for a
`StepPlan`, and executes it -- weight loads and KV swaps on a serial host->device and a serial
device->host PCIe link (profile bandwidth), steps taking the profile's roofline time (optionally with
lognormal noise) -- then reports every measurement to its online `CostModel`, which the policy reads. The
policy never sees the profile, nor a request's true output length.

Pooled arena (`kv_cache_bytes` given, as the real engine's `ModelPool`): each GPU's budget is one arena, a KV
region carved first and weight slots placed by the pool's own slot bookkeeping (`gpu_pool.slots.SlotTable`,
over an allocator of its own: `sim_arena`); a fragmented arena skips prefetches and forces evictions exactly
where the real pool would (same code). The policy then sees what the real engine shows it: the weight space
as capacity, slot-rounded weight bytes, and the KV region apart (`PoolState.kv_capacity_bytes`), each model's
KV in blocks of one page; a region running short is resolved by the plan (other models' KV swapped out), as
in the engine, so `kv_region_exceeded` is a check that it never overflows. Without `kv_cache_bytes`, VRAM is
one byte count for weights and KV, counted by the token.

Multi-GPU: a dispatcher sends each request to a GPU. `partition`: models bin-packed by weight bytes over GPUs,
each model on one GPU; `hash`: crc32(model) % n; `p2c`: each model has two candidate GPUs (hashes) and a
request goes to the one with fewer unfinished requests (a model is registered on a GPU the first time it is
sent there). Events run in time order over all GPUs, so 1,000 GPUs cost the same per step as one.

Policy CPU cost is measured with perf_counter around `schedule()` and reported against the simulated step
time it scheduled (the brief's budget: <= 5%).
"""

from __future__ import annotations

import contextlib
import heapq
import math
import random
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass, field, replace

from gpu_pool.arena import DEFAULT_ALIGN, RangeAllocator
from gpu_pool.slots import SlotTable
from token_scheduler.cost_model import CostModel, HardwareProfile, ModelSize
from token_scheduler.policies import make_policy
from token_scheduler.policies.batching import shape_of
from token_scheduler.policies.slo import ModelSLO, RequestRecord, summarize
from token_scheduler.policies.state import ModelState, PoolState, Residency, StepPlan
from token_scheduler.request import RequestStatus
from token_scheduler.runner import GRAPH_BUCKETS
from tokenpool import env

_W, _R, _S, _F = RequestStatus.WAITING, RequestStatus.RUNNING, RequestStatus.SWAPPED, RequestStatus.FINISHED_LENGTH


@dataclass(slots=True, eq=False)
class SimRequest:
    """Request-like (the attributes policies read); `output_len` is the simulator's secret."""

    request_id: str
    model: str
    arrival_time: float
    num_prompt_tokens: int
    output_len: int
    record: RequestRecord
    num_output: int = 0
    num_computed_tokens: int = 0
    status: RequestStatus = _W
    priority: int = 0

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_output

    @property
    def kv_tokens_freed(self) -> int:  # (no prefix cache simulated: preempting frees all its KV)
        return self.num_computed_tokens

    @property
    def kv_tokens_recomputed(self) -> int:  # (nor cached blocks a restart finds)
        return self.num_computed_tokens


@dataclass
class GpuStats:
    steps: int = 0
    switches: int = 0  # steps whose model differs from the previous step's (MultiModelEngine.switches)
    busy_s: float = 0.0
    loads: int = 0  # every weight load, blocking or prefetch
    prefetches: int = 0
    prefetch_skipped: int = 0  # pooled arena: no contiguous range (and no order allowing evictions)
    evictions: int = 0  # planned and forced
    forced_evictions: int = 0  # pooled arena: evicted to make a slot contiguous, beyond the plan
    kv_peak_bytes: int = 0  # pooled arena: the most KV held in the KV region at once
    kv_region_bytes: int = 0  # pooled arena: the region's size
    load_bytes: int = 0
    load_stall_s: float = 0.0
    swap_stall_s: float = 0.0
    swap_out_bytes: int = 0
    swap_in_bytes: int = 0
    policy_cpu_s: float = 0.0
    policy_calls: int = 0
    policy_cpu_frac: list = field(default_factory=list)  # cpu / simulated step time, per step
    graph_captures: int = 0
    host_s: float = 0.0  # of busy_s: the host time per step (step_host_s, step_host_per_seq_s)
    seqs_stepped: int = 0  # sequences over all steps (their mean batch: over `steps`)
    pipelined_steps: int = 0  # (pipelined) steps whose host time overlapped the step before's device time
    co_steps: int = 0  # (co_step) decode steps of another model run beside the step before (two streams)


def sim_arena(capacity: int, kv_bytes: int, align: int = DEFAULT_ALIGN) -> SlotTable:
    """A simulated GPU's arena: `ModelPool`'s slot table over an allocator of its own (best fit, 2 MiB
    alignment), its KV region carved when the first model registers."""
    return SlotTable(RangeAllocator(capacity, align), kv_bytes)


# A co-step's device time over its own alone (`GpuSim.co_step`): the H200's two-stream pairs measured 0.66 (two 1.5B at
# batch 2-4) to 0.83 (a 7B and a 1.5B), bench/results/co_step_h200_3c76624.json; 0.8 weighs the served mix's 7B steps.
# The engine's step loop realises those figures with deep co-stepping (two 1.5B at batch 2 0.655 of alone, a 7B and a
# 1.5B 0.833: bench/results/co_loop_h200_e5c9347.json); with one step in flight past a call it realised 0.72 / 0.89.
# None when TOKENPOOL_CO_STEP is off (the engine then neither co-steps nor pairs turns).
CO_STEP_FACTOR = 0.8 if env.CO_STEP.on() else None


class GpuSim:
    """One GPU: state + policy + links. `step()` runs one plan and returns when the GPU is next free."""

    def __init__(self, gid: int, capacity: int, policy, hw: HardwareProfile, noise: float = 0.0, seed: int = 0,
                 arena: SlotTable | None = None, copy_slowdown: float = 0.0, step_host_s: float = 0.0,
                 graph_capture_s: float = 0.0, step_host_per_seq_s: float = 0.0, host_observed: bool = True,
                 pipelined: bool = False, co_step: float | None = None):
        self.gid, self.policy, self.hw, self.noise = gid, policy, hw, noise
        # TOKENPOOL_PIPELINE: a decode step continuing the model of the step before (its running requests, one token
        # each, nothing waiting, no KV moves) was queued while that one ran, so its host time overlaps the device
        # and it costs max(device, host) instead of their sum; the engine learns that (`_learn_pipelined`)
        self.pipelined = pipelined
        self._last_batch: set[int] = set()  # ids of the requests the step before ran (a continuation runs them all)
        # TOKENPOOL_CO_STEP (with `pipelined`): a decode step of another model than the step before's, both pure
        # decodes of resident weights, runs beside it on a second stream: its host time overlapped as a pipelined
        # step's, its device time this factor of its own (the H200's two-stream pairs: 0.66-0.83 of one stream,
        # bench/results/co_step_h200_3c76624.json). None: off.
        self.co_step = co_step
        self._last_decode = False
        # A decode step at a (weights' size, slot offset, batch bucket) not met before captures its CUDA graph
        # first (ModelRunner keys graphs by slot): this many seconds of host time, once (H200: 3.14 s for 98
        # captures in one served point, bench/results/serve_h200_token_1.3_seed0_8326aa3_cold.json).
        self.graph_capture_s = graph_capture_s
        self.captured: set[tuple[int, int, int]] = set()
        self.copy_slowdown = copy_slowdown  # a step beside a weight copy in flight takes this much longer
        self.step_host_s = step_host_s  # host time per step outside the device step (policy, memory moves, worker)
        self.step_host_per_seq_s = step_host_per_seq_s  # and per sequence in the step's batch
        self.host_observed = host_observed  # whether the cost model's step fit sees the host time (the engine's: no)
        self.state = PoolState(models={}, capacity_bytes=capacity, cost=CostModel(hw))
        self.arena = arena
        self.specs: dict[str, ModelSize] = {}  # the true sizes (the policy's may be the arena's view of them)
        self.kv_bytes = 0  # pooled arena: KV held in the region
        self.now = 0.0
        # Host->device link: blocking transfers (a needed load, swap-ins) go first; a prefetch in flight is
        # paused for their duration (chunked copies, as model_swapper does). Device->host is its own FIFO.
        self.fg_free = self.bg_free = self.d2h_free = 0.0
        self.loads: dict[str, list] = {}  # model -> [start, end, bytes, stall]
        self.stats = GpuStats()
        self._last_model: str | None = None
        self.outstanding = 0
        self.rng = random.Random(f"noise:{seed}:{gid}")

    def register(self, spec: ModelSize, slo: ModelSLO) -> None:
        if spec.name not in self.state.models:
            self.specs[spec.name] = spec
            a = self.arena
            m = ModelState(spec, slo)
            if a is not None:  # what MultiModelEngine shows the policy in pooled mode
                if a.kv_slot is None:
                    a.carve_kv(spec.kv_bytes_per_token)
                    self.state.capacity_bytes = a.weight_capacity
                    self.state.kv_capacity_bytes = self.stats.kv_region_bytes = a.kv_usable
                m.spec = replace(spec, weight_bytes=a.slot_bytes(spec.weight_bytes))
                m.kv_block_tokens, m.kv_block_bytes = a.block_tokens_of(spec.kv_bytes_per_token), a.page_bytes
            self.state.models[spec.name] = m
            self.state.cost.register(m.spec)

    def add(self, r: SimRequest) -> None:
        self.state.models[r.model].waiting.append(r)
        self.outstanding += 1

    def step(self) -> float | None:
        st = self.state
        st.now = self.now
        self._finish_loads()
        if self.arena is not None:
            st.weight_free_run = self.arena.alloc.largest_free
        t0 = time.perf_counter()
        plan = self.policy.schedule(st)
        cpu = time.perf_counter() - t0
        self.stats.policy_cpu_s += cpu
        self.stats.policy_calls += 1
        self._apply_moves(plan)
        if plan.idle:
            return None
        dur = self._run(plan)
        if dur > 0:
            self.stats.policy_cpu_frac.append(cpu / dur)
        return self.now

    # -- mechanism --
    def _finish_loads(self) -> None:
        for name in [n for n, ld in self.loads.items() if ld[1] <= self.now]:
            start, end, nbytes, stall, _ = self.loads.pop(name)
            m = self.state.models[name]
            if m.residency == Residency.LOADING:
                m.residency = Residency.RESIDENT
            dur = end - start
            self.state.cost.observe_load(nbytes, dur, hidden_s=max(0.0, dur - stall))

    def _foreground(self, seconds: float, after: float) -> float:
        start = max(self.now, self.fg_free, after)
        end = self.fg_free = start + seconds
        for name, ld in self.loads.items():
            if ld[1] > start and ld[4]:  # background load still in flight: paused meanwhile
                ld[1] += seconds
                self.state.models[name].ready_at = ld[1]
        if self.bg_free > start:
            self.bg_free += seconds
        return end

    def _kv(self, m: ModelState, before: int, after: int) -> None:
        """A request's KV in VRAM goes from `before` to `after` tokens (whole blocks, as the engine allocates)."""
        bt = m.kv_block_tokens
        m.kv_gpu_tokens += (-(-after // bt) - -(-before // bt)) * bt
        if self.arena is not None:
            self.kv_bytes += m.kv_bytes(after) - m.kv_bytes(before)
            self.stats.kv_peak_bytes = max(self.stats.kv_peak_bytes, self.kv_bytes)

    def _dropped(self, names: list[str]) -> None:
        """Models the arena evicted beyond the plan: the policy sees them in host memory again."""
        for name in names:
            self.state.models[name].residency = Residency.HOST
            self.loads.pop(name, None)
        self.stats.evictions += len(names)
        self.stats.forced_evictions += len(names)

    def _load(self, name: str, after: float, background: bool) -> float:
        m = self.state.models[name]
        nbytes = self.specs[name].weight_bytes
        d = self.hw.load_time(nbytes)
        if background:
            start = max(self.now, self.bg_free, self.fg_free, after)
            end = self.bg_free = start + d
        else:
            end = self._foreground(d, after)
            start = end - d
        m.residency, m.ready_at = Residency.LOADING, end
        self.loads[name] = [start, end, nbytes, 0.0, background]
        self.stats.loads += 1
        self.stats.prefetches += background
        self.stats.load_bytes += nbytes
        return end

    def _apply_moves(self, plan: StepPlan) -> None:
        models, arena = self.state.models, self.arena
        for name in plan.evict:
            m = models[name]
            assert m.residency == Residency.RESIDENT, f"evicting {name} in state {m.residency!r}"
            m.residency = Residency.HOST
            self.stats.evictions += 1
            if arena is not None:
                arena.free(name)
        out_end = self.now
        if plan.swap_out:
            nbytes = 0
            for r in plan.swap_out:
                assert r.status == _R, "only KV in VRAM can be swapped out"
                m = models[r.model]
                self._kv(m, r.num_computed_tokens, 0)
                nbytes += r.num_computed_tokens * self.specs[r.model].kv_bytes_per_token
                r.status = _S
            out_end = max(self.now, self.d2h_free) + self.hw.swap_time(nbytes)
            self.d2h_free = out_end
            self.stats.swap_out_bytes += nbytes
            self.state.cost.observe_swap(nbytes, self.hw.swap_time(nbytes))
        wait = out_end if plan.wait_swap_out else self.now
        self._ready = self._load_ready = self.now
        if plan.model is not None and plan.batch:
            m = models[plan.model]
            if m.residency == Residency.HOST:
                if arena is not None:  # ModelPool.load: raises ArenaFull as the pool does
                    self._dropped(arena.claim(plan.model, self.specs[plan.model].weight_bytes, arena.free,
                                              plan.load_order, (plan.prefetch,) if plan.prefetch else ()))
                self._load(plan.model, wait, background=False)
            elif plan.model in self.loads:
                self.loads[plan.model][4] = False  # needed now: no longer paused for other transfers
            if arena is not None:  # in use: a fallback victim from now on (a prefetch at its first step)
                arena.take(plan.model, self.now)
            self._ready = max(wait, m.ready_at if m.residency == Residency.LOADING else self.now)
            self._load_ready = self._ready
            if plan.swap_in:
                nbytes = 0
                for r in plan.swap_in:
                    assert r.status == _S, "only swapped KV can be swapped in"
                    r.status = _R
                    self._kv(m, 0, r.num_computed_tokens)
                    nbytes += r.num_computed_tokens * self.specs[m.name].kv_bytes_per_token
                self._ready = max(self._ready, self._foreground(self.hw.swap_time(nbytes), wait))
                self.stats.swap_in_bytes += nbytes
                self.state.cost.observe_swap(nbytes, self.hw.swap_time(nbytes))
        if plan.prefetch is not None and models[plan.prefetch].residency == Residency.HOST:
            if arena is not None:
                order = None if plan.prefetch_order is None else [n for n in plan.prefetch_order if n != plan.model]
                dropped = arena.claim(plan.prefetch, self.specs[plan.prefetch].weight_bytes, arena.free, order,
                                      blocking=False)
                if dropped is None:
                    self.stats.prefetch_skipped += 1
                    return
                self._dropped(dropped)
            self._load(plan.prefetch, out_end, background=True)

    def _run(self, plan: StepPlan) -> float:
        st, m = self.state, self.state.models[plan.model]
        ready = self._ready
        stall_load = max(0.0, self._load_ready - self.now)
        self.stats.load_stall_s += stall_load
        self.stats.swap_stall_s += max(0.0, ready - self.now) - stall_load
        if plan.model in self.loads:
            self.loads[plan.model][3] += stall_load
        if ready > self.now and plan.model in self.loads and self.loads[plan.model][1] <= ready:
            m.residency = Residency.RESIDENT  # the step waited for its weights
        shape = shape_of(plan.batch)
        dur = self.hw.step_time(self.specs[m.name], shape)
        if self.noise > 0:
            dur *= math.exp(self.rng.gauss(-self.noise * self.noise / 2, self.noise))
        if self.copy_slowdown and any(ld[0] < ready + dur and ld[1] > ready for ld in self.loads.values()):
            dur *= 1.0 + self.copy_slowdown
        device_s = dur
        host = self.step_host_s + self.step_host_per_seq_s * len(plan.batch)
        self.stats.host_s += host
        self.stats.seqs_stepped += len(plan.batch)
        piped = False
        if self.pipelined:  # (the set of the batch's requests is built only then: a step of every simulated GPU)
            ran = {id(r) for r, _ in plan.batch}
            decode = (not m.waiting and not plan.swap_in and not plan.swap_out
                      and all(n == 1 and r.status == _R for r, n in plan.batch))
            piped = self._last_model == m.name and decode and ran <= self._last_batch
            if (self.co_step is not None and not piped and decode and self._last_decode
                    and self._last_model not in (None, m.name) and ready <= self.now):
                piped = True
                dur *= self.co_step
                self.stats.co_steps += 1
            self._last_batch, self._last_decode = ran, decode
        if piped:
            self.stats.pipelined_steps += 1
            dur = max(dur, host)
        else:
            dur += host
        if self.graph_capture_s and self.arena is not None and all(n == 1 and r.status == _R for r, n in plan.batch):
            key = (self.specs[m.name].weight_bytes, self.arena.slots[m.name].offset,
                   next(b for b in GRAPH_BUCKETS if b >= len(plan.batch)))
            if key not in self.captured:
                self.captured.add(key)
                self.stats.graph_captures += 1
                dur += self.graph_capture_s
        start = ready
        end = start + dur
        st.cost.observe_step(m.name, shape, dur if self.host_observed or piped else device_s)
        finished = False
        for r, n in plan.batch:
            if r.status == _W:
                assert m.waiting and m.waiting[0] is r, "new requests must be admitted in FCFS order"
                m.waiting.popleft()
                m.running.append(r)
                r.status = _R
            assert r.status == _R, f"{r.request_id} scheduled while {r.status!r}"
            assert 0 < n <= r.num_tokens - r.num_computed_tokens
            r.num_computed_tokens += n
            self._kv(m, r.num_computed_tokens - n, r.num_computed_tokens)
            if r.num_computed_tokens == r.num_tokens:
                r.num_output += 1
                r.record.on_token(end)
                if r.num_output >= r.output_len:
                    r.status = _F
                    self._kv(m, r.num_computed_tokens, 0)
                    finished = True
                    self.outstanding -= 1
        if finished:
            m.running = [r for r in m.running if r.status != _F]
        if self._last_model is not None and self._last_model != m.name:
            self.stats.switches += 1
        self._last_model = st.active = m.name
        self.stats.steps += 1
        self.stats.busy_s += dur
        self.now = end
        return dur


@dataclass
class SimResult:
    policy: str
    n_gpus: int
    duration_s: float
    end_s: float
    slo: dict
    goodput_rps: float
    goodput_tokens_per_s: float
    switches_per_s: float
    load_stall_s: float
    swap_stall_s: float
    swap_gb: float
    gpu_busy_frac: float
    steps: int
    policy_cpu_us_per_step: float
    policy_cpu_frac_mean: float
    policy_cpu_frac_p99: float
    unfinished: int
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _placement(names: list[str], specs: dict[str, ModelSize], n: int, mode: str) -> dict[str, list[int]]:
    if mode == "hash":
        return {m: [zlib.crc32(m.encode()) % n] for m in names}
    if mode == "p2c":
        return {m: sorted({zlib.crc32(m.encode()) % n, zlib.crc32(b"2:" + m.encode()) % n}) for m in names}
    if mode != "partition":
        raise ValueError(f"unknown placement {mode!r}")
    load = [0] * n
    out = {}
    for m in sorted(names, key=lambda m: (-specs[m].weight_bytes, m)):
        g = min(range(n), key=lambda i: (load[i], i))
        load[g] += specs[m].weight_bytes
        out[m] = [g]
    return out


@contextlib.contextmanager
def policies_wrapped(wrap):
    """Inside the block every policy the simulator builds is `wrap(policy)` (a recorder, a watcher); yields the
    list of the wrapped policies, in the order they were built (one per simulated GPU)."""
    global make_policy
    made, make = [], make_policy

    def wrapped(*a, **kw):
        made.append(wrap(make(*a, **kw)))
        return made[-1]

    make_policy = wrapped  # _run_gpus builds its GPUs' policies by this name
    try:
        yield made
    finally:
        make_policy = make


def simulate(items, specs: dict[str, ModelSize], slos: dict[str, ModelSLO] | ModelSLO, policy: str,
             n_gpus: int = 1, capacity_bytes: int = 60 * 10**9, hw: HardwareProfile | None = None,
             placement: str = "partition", drain_s: float = 60.0, noise: float = 0.0, seed: int = 0,
             policy_kw: dict | None = None, keep_tokens: bool = False, workers: int = 1,
             kv_cache_bytes: int | None = None, copy_slowdown: float = 0.0, step_host_s: float = 0.0,
             graph_capture_s: float = 0.0, step_host_per_seq_s: float = 0.0,
             host_observed: bool = True, pipelined: bool = False, co_step: float | None = -1.0) -> SimResult:
    """Replay `items` (WorkItems, sorted by time) against `policy` on `n_gpus` simulated GPUs.

    `kv_cache_bytes`: each GPU's `capacity_bytes` is a pooled arena as the real engine's (module docstring)
    with a KV region of this size; None: one byte count for weights and KV.

    `step_host_s`: seconds of host work each step adds outside the device step (the served worker's policy,
    memory moves and step-loop work: 0.17 ms per step on the H200 at af0b71d, bench serve's `timing`); 0: none.

    `step_host_per_seq_s`: more host seconds per sequence in the step's batch (detokenizing, the books: on the H200
    the engine's host time per step grew ~0.035 ms per token a step, bench/results/sim_gap_1.6_e755649.json).
    `host_observed`: whether the policy's cost model learns a step's host time (and a graph capture) with its device
    time; the engine's does not (MultiModelEngine times the engine's step alone), so False is the engine's view.
    True (the default) keeps the results made before it existed.
    `pipelined`: TOKENPOOL_PIPELINE's engine: a decode step continuing the step before's model and requests costs
    max(device, host) rather than their sum (its host time hidden under the step in flight), and is learned so.
    `co_step` (with `pipelined`): TOKENPOOL_CO_STEP's engine (`GpuSim.co_step`): a decode of another model than the step
    before's is pipelined too, and takes this factor of its device time; None: off; default: CO_STEP_FACTOR as the
    engine's default (TOKENPOOL_CO_STEP), which also decides whether the token policy pairs turns.

    `graph_capture_s`: host seconds of one CUDA-graph capture, paid by a pooled GPU's first decode step at each
    (weights' size, slot offset, batch bucket) (H200: 0.019 s at 9ff79c5, 0.032 s before); 0: none.

    `copy_slowdown`: a step that overlaps a weight copy takes 1 + this times as long (the H100 measured a
    decode 5-7.5% slower beside a 7B prefetch, README); 0 by default, as the fitted profiles were measured
    with copies in flight.

    `workers` > 1 splits the GPUs over processes; exact (same numbers) because with a static placement
    (`partition`, `hash`) GPUs never interact. `p2c` reads every GPU's load at dispatch: one process.
    """
    from token_scheduler.cost_model import H100_PCIE53

    if co_step is not None and co_step < 0:
        co_step = CO_STEP_FACTOR
    names = sorted({w.model for w in items} | set(specs))
    where = _placement(names, specs, n_gpus, placement)
    duration = max((w.time for w in items), default=0.0)
    job = dict(specs=specs, slos=slos, policy=policy, capacity=capacity_bytes, hw=hw or H100_PCIE53,
               where=where, horizon=duration + drain_s, noise=noise, seed=seed, policy_kw=policy_kw or {},
               keep_tokens=keep_tokens, static=placement != "p2c", kv=kv_cache_bytes, copy_slowdown=copy_slowdown,
               step_host_s=step_host_s, graph_capture_s=graph_capture_s, step_host_per_seq_s=step_host_per_seq_s,
               host_observed=host_observed, pipelined=pipelined, co_step=co_step)
    workers = max(1, min(workers, n_gpus)) if placement != "p2c" else 1
    groups = [list(range(k, n_gpus, workers)) for k in range(workers)]
    if workers == 1:
        parts = [_run_gpus(items, groups[0], job)]
    else:
        import multiprocessing as mp

        per = [[w for w in items if where[w.model][0] % workers == k] for k in range(workers)]
        with mp.get_context("fork").Pool(workers) as pool:
            parts = pool.starmap(_run_gpus, [(per[k], groups[k], job) for k in range(workers)])
    records = sorted((r for p in parts for r in p[0]), key=lambda r: (r.arrival, r.request_id))
    stats = [st for p in parts for st in p[1]]
    end = max([duration] + [p[2] for p in parts])
    return _result(policy, stats, records, duration, end, parts[0][3])


def _run_gpus(items, gpu_ids: list[int], job: dict):
    """Run the GPUs `gpu_ids` (global ids) on the requests placed on them: (records, stats, end, extra)."""
    slos, specs, where = job["slos"], job["specs"], job["where"]
    slo_of = (lambda m: slos) if isinstance(slos, ModelSLO) else (lambda m: slos[m])
    gpus = {g: GpuSim(g, job["capacity"], make_policy(job["policy"], **job["policy_kw"]), job["hw"], job["noise"],
                      job["seed"], sim_arena(job["capacity"], job["kv"]) if job["kv"] else None,
                      job["copy_slowdown"], job["step_host_s"], job["graph_capture_s"], job["step_host_per_seq_s"],
                      job["host_observed"], job["pipelined"], job["co_step"]) for g in gpu_ids}
    if job["static"]:
        for m, gs in where.items():
            for g in gs:
                if g in gpus:
                    gpus[g].register(specs[m], slo_of(m))
    records: list[RequestRecord] = []
    heap: list[tuple[float, int]] = []
    busy = dict.fromkeys(gpus, False)
    i, n, horizon = 0, len(items), job["horizon"]
    while True:
        t_gpu = heap[0][0] if heap else math.inf
        t_arr = items[i].time if i < n else math.inf
        if t_arr == math.inf and t_gpu == math.inf or min(t_arr, t_gpu) > horizon:
            break
        if t_arr <= t_gpu:
            w = items[i]
            i += 1
            rec = RequestRecord(w.id, w.model, w.time, w.prompt_len, w.output_len, slo_of(w.model),
                                tokens=[] if job["keep_tokens"] else None)
            records.append(rec)
            g = min(where[w.model], key=lambda k: (gpus[k].outstanding, k))
            gpu = gpus[g]
            gpu.register(specs[w.model], slo_of(w.model))
            gpu.add(SimRequest(w.id, w.model, w.time, w.prompt_len, w.output_len, rec))
            if not busy[g]:
                busy[g] = True
                gpu.now = max(gpu.now, w.time)
                heapq.heappush(heap, (gpu.now, g))
            continue
        _, g = heapq.heappop(heap)
        nxt = gpus[g].step()
        if nxt is None:
            busy[g] = False
        else:
            heapq.heappush(heap, (nxt, g))
    extra = {}
    if 0 in gpus:
        extra["cost_model_gpu0"] = gpus[0].state.cost.to_dict()
        if hasattr(gpus[0].policy, "round_info"):
            extra["rounds_gpu0"] = gpus[0].policy.round_info()
    return records, [g.stats for g in gpus.values()], max([0.0] + [g.now for g in gpus.values()]), extra


def _result(policy: str, stats: list[GpuStats], records: list[RequestRecord], duration: float, end: float,
            extra0: dict) -> SimResult:
    summ = summarize(records)
    tot = defaultdict(float)
    fracs: list[float] = []
    for st in stats:
        for k, v in st.__dict__.items():
            if k in ("kv_peak_bytes", "kv_region_bytes"):
                tot[k] = max(tot[k], v)
            elif k != "policy_cpu_frac":
                tot[k] += v
        fracs += st.policy_cpu_frac
    fracs.sort()
    span = max(duration, 1e-9)
    good = [r for r in records if r.attained()]
    extra: dict = {k: int(tot[k]) for k in ("loads", "prefetches", "prefetch_skipped", "evictions", "forced_evictions",
                                           "graph_captures", "seqs_stepped", "pipelined_steps", "co_steps")}
    extra["blocking_loads"] = extra["loads"] - extra["prefetches"]  # the real pool's `loads`
    extra["host_s"] = tot["host_s"]
    extra["loads_per_s"] = tot["loads"] / max(end, 1e-9)  # weight loads (blocking or prefetch) per second
    if tot["kv_region_bytes"]:  # pooled arena, the largest over GPUs
        extra["kv_peak_gb"] = tot["kv_peak_bytes"] / 1e9
        extra["kv_region_exceeded"] = any(st.kv_peak_bytes > st.kv_region_bytes for st in stats)
    extra.update(extra0)
    if records and records[0].tokens is not None:
        extra["records"] = [{"id": r.request_id, "model": r.model, "output_len": r.output_len, "tokens": r.tokens}
                            for r in records]
    return SimResult(
        policy=policy, n_gpus=len(stats), duration_s=duration, end_s=end, slo=summ.to_dict(),
        goodput_rps=len(good) / span, goodput_tokens_per_s=sum(r.output_len for r in good) / span,
        switches_per_s=tot["switches"] / max(end, 1e-9), load_stall_s=tot["load_stall_s"],
        swap_stall_s=tot["swap_stall_s"], swap_gb=(tot["swap_out_bytes"] + tot["swap_in_bytes"]) / 1e9,
        gpu_busy_frac=tot["busy_s"] / (max(end, 1e-9) * len(stats)), steps=int(tot["steps"]),
        policy_cpu_us_per_step=1e6 * tot["policy_cpu_s"] / max(1, tot["policy_calls"]),
        policy_cpu_frac_mean=(sum(fracs) / len(fracs)) if fracs else 0.0,
        policy_cpu_frac_p99=fracs[int(0.99 * (len(fracs) - 1))] if fracs else 0.0,
        unfinished=sum(not r.finished for r in records), extra=extra,
    )
