"""Host time per pooled step with many models on one device, on CPU: what a GPU waits for between two steps.

    python -m load_tests.bench_host_step [--models 14x7b,21x1.5b] [--steps 2000] [--rounds 5] [--device-ms 2]

A real `MultiModelEngine`, pooled (an arena: a KV region shared by every model and weight slots for about 40%
of the models' weights, so weights rotate), token policy, hosting tiny factory models under the served models'
names (issue 14's mix: 14 "7b" and 21 "1.5b"). Each "7b" is an alias of one tiny llama checkpoint (a 4 MiB
slot), each "1.5b" of one tiny qwen2 (a 2 MiB slot): two slot sizes, as on the GPU. Load is closed-loop: model
i keeps 1 + i % 4 requests, a finished one replaced at once, so most models hold 1-4 running requests, as in
`bench serve` at 0.1 req/s/model. Lengths are lognormal as load_tests/workload.py draws them, outputs of mean
256 tokens, prompts of mean 128 (at most 512: a long prefill of a tiny model costs tens of ms of CPU, and stretches
the step period the SLO clock sees, for no host time).

Device work is not host time: `ModelRunner.execute` (the forward, its sampling, KV swap copies) and the copies of
weights into the arena (`enqueue_copy`: a DMA on a GPU, synchronous here) are timed apart and subtracted, and so
is a blocking load's wait for its weights (the switch stall). Two settings make the run look like a GPU's to the
policy, whose decisions set what the host does:
- `--device-ms`: every forward also sleeps this long, so the cost model and the SLO clock see GPU-like step
  times: the default 2 ms and the tiny model's ~0.7 ms of CPU make a step of ~3 ms, as the H200's 3.35 ms at 35
  models (the pool near its capacity: each model's streams want ~10 steps a second);
- `--link-mb-s`: weight copies land as if over a link this fast (`Link`; default 10 MB/s: a tiny "7b" in ~240
  ms, an H200's 7B load ~280 ms), so a prefetch is in flight for dozens of steps. Landing at once, as CPU copies
  do, every step would plan the next prefetch into a full arena, which a GPU run rarely does.
The collector is set as the worker sets it (`controller.heap.freeze_long_lived`). Reported per step that ran, as
the mean of each round of `--steps` steps, median over `--rounds`:

- `host_us`: `MultiModelEngine.step_tokens` wall time less the device work;
- `sync_us`: `_sync` (the pool's poll, the policy's view of the engines' queues), `policy_us`: `policy.schedule`;
- `memory_us`: `_execute_memory` (evictions, other models' KV swap-outs, loads, prefetch: the pool's bookkeeping);
- `engine_us`: `LLMEngine.step_tokens` less the forward (commit, inputs, update, outputs);
- `rest_us`: the rest of `step_tokens` (cost model, trace, timeline, late watch, other models' aborts);
- `caller_us`: the caller's `has_unfinished_requests()` before each step (the worker asks the same);
- `host_cpu_us`: `host_us` as the step thread's CPU time (`time.thread_time`), less sensitive to other processes
  on the cores (what the wall figures lose to preemption);
- `forward_us`, `copy_us`, `stall_us`: the device work left out;
- `wall_us`: the whole `step_tokens` call, device work included (what a step takes end to end);
  `tokens_per_step`: tokens the steps computed (prefill chunks make a CPU forward long).

Host work the engine does in a forward's `on_launch` (plan-ahead, TOKENPOOL_PLAN_AHEAD=1: the next step's plan)
runs while the device is busy: the emulated device is busy `--device-ms` from the launch (the CPU forward), so
that work is device time except what outlasts it (then the device waits for the host: host time). It is reported
apart as `ahead_us` (the engine's `ahead_s`), with the early plans used and not used (`ahead_used`,
`ahead_discarded`, per round); the policy and sync parts count only what runs outside it. Set
TOKENPOOL_PLAN_AHEAD in the environment of the run (read at import).

Pipelined decode (TOKENPOOL_PIPELINE=1): a step launched before the one in flight is read goes through
`ModelRunner.launch_decode` and `read` instead of `execute`; they are wrapped too (`Clock.launch`, `Clock.read`), so
the emulated device runs each step as long either way (its CPU forward plus `--device-ms`), back to back when the
next is queued before the one before ends, and the host's wait in `read` is device time. Host work done while a
step is in flight (the step before's tokens, the next plan) is then hidden but still counted in `host_us` and its
parts: with the pipeline `host_us` is the host's work per step, not the device's wait for it -- compare `wall_us`
(the step call end to end) and `period_us` (a round's wall time per step, the caller's work between steps
included); `pipelined_frac`: the share of steps launched before the step before was read. The CPU forward of a step
queued behind another runs on the step thread at its launch (a GPU's launch costs ~tens of us): that pessimizes the
pipeline's wall figures a little.

The timing wrappers themselves add about 2 us a step (mostly to `engine_us`: the forward's CPU clock), the same
in every version. On 2 shared cores the figures are noisy: alternate runs of the versions compared and compare
medians.
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import time
import uuid
from pathlib import Path

from controller.heap import freeze_long_lived
from load_tests.bench_common import bench_models_dir, cpu_model, header, write_json
from load_tests.workload import _lognormal, parse_models

PARTS = ("host_us", "sync_us", "policy_us", "memory_us", "engine_us", "rest_us", "caller_us", "host_cpu_us")
CHECKPOINTS = {"7b": "llama", "1.5b": "qwen2"}  # size -> the tiny arch standing in for it (slot 4 / 2 MiB)
MiB = 1 << 20
PAGE = 16 * 512  # a KV page: 16 tokens of the tiny models' fp32 KV (512 B a token)


def make_checkpoints(cache_dir: Path) -> dict[str, Path]:
    from controller.model_factory import make_model

    dirs = {}
    for size, arch in CHECKPOINTS.items():
        d = cache_dir / f"{arch}-tiny-fp32"
        if not (d / "config.json").exists():
            make_model(arch=arch, size="tiny", out=d, seed=0, dtype="fp32", device="cpu", progress=False)
        dirs[size] = d
    return dirs


class Clock:
    """Wall seconds inside wrapped callables, per part. Device work (the forward, a weight copy) is timed apart, wall
    and thread CPU, and not counted in the host part it runs inside."""

    def __init__(self):
        self.s = dict.fromkeys(("sync", "policy", "memory", "engine", "forward", "copy", "stall", "device",
                                "device_cpu"), 0.0)
        self.launched = 0  # > 0: inside a forward's on_launch (beside the device: not a host part)
        self.free_at = 0.0  # perf_counter when the emulated device is done with every step queued so far
        self.done_at: dict[int, float] = {}  # id(LaunchedDecode) -> when the emulated device finishes it

    def host(self, part: str, f):
        s = self.s

        @functools.wraps(f)
        def timed(*a, **kw):
            if self.launched:
                return f(*a, **kw)
            t, d = time.perf_counter(), s["device"]
            try:
                return f(*a, **kw)
            finally:
                s[part] += time.perf_counter() - t - (s["device"] - d)
        return timed

    def device(self, part: str, f, pad_s: float = 0.0):
        s = self.s

        @functools.wraps(f)
        def timed(*a, **kw):
            c, t = time.thread_time(), time.perf_counter()
            try:
                return f(*a, **kw)
            finally:
                if pad_s:
                    time.sleep(pad_s)
                dt = time.perf_counter() - t
                s[part] += dt
                s["device"] += dt
                s["device_cpu"] += time.thread_time() - c
        return timed


    def forward(self, execute, pad_s: float):
        """`ModelRunner.execute` timed as device work: the device is busy `pad_s` after the launch (the CPU forward
        and its `on_launch`); host work in `on_launch` past that is host time (the device waited for it)."""
        s = self

        @functools.wraps(execute)
        def timed(runner, out, on_launch=None):
            c, t = time.thread_time(), time.perf_counter()
            span = []  # (wall start, wall end, thread CPU) of on_launch

            def launched():
                t_l, c_l = time.perf_counter(), time.thread_time()
                s.launched += 1
                try:
                    on_launch()
                finally:
                    s.launched -= 1
                    span.append((t_l, time.perf_counter(), time.thread_time() - c_l))

            try:
                return execute(runner, out, None if on_launch is None else launched)
            finally:
                now = time.perf_counter()
                t_l, t_e, hook_cpu = span[0] if span else (now, now, 0.0)
                if pad_s:
                    time.sleep(max(0.0, t_l + pad_s - time.perf_counter()))
                over = max(0.0, t_e - (t_l + pad_s))  # on_launch's host work past the device's end
                s.free_at = time.perf_counter()
                dt = s.free_at - t - over
                s.s["forward"] += dt
                s.s["device"] += dt
                s.s["device_cpu"] += time.thread_time() - c - hook_cpu * over / max(t_e - t_l, 1e-9)
        return timed


    def launch(self, launch_decode, pad_s: float):
        """`ModelRunner.launch_decode` (an overlapped decode, TOKENPOOL_PIPELINE): the CPU forward runs now, on the step
        thread, and is device time; the emulated device runs the step for as long as `execute` would (that CPU forward
        plus `pad_s`), from the launch or, when the step before is still on it, from that step's end."""
        s = self

        @functools.wraps(launch_decode)
        def timed(runner, out, ids=None, timed=False, rows=None):
            c, t = time.thread_time(), time.perf_counter()
            step = launch_decode(runner, out, ids, timed=timed, rows=rows)
            dt = time.perf_counter() - t
            s.s["forward"] += dt
            s.s["device"] += dt
            s.s["device_cpu"] += time.thread_time() - c
            s.free_at = max(t, s.free_at) + dt + pad_s
            s.done_at[id(step)] = s.free_at
            return step
        return timed

    def read(self, read):
        """`ModelRunner.read`: the host waits until the emulated device is done with the step (device time)."""
        s = self

        @functools.wraps(read)
        def timed(step):
            t = time.perf_counter()
            time.sleep(max(0.0, s.done_at.pop(id(step), t) - t))
            try:
                return read(step)
            finally:
                dt = time.perf_counter() - t
                s.s["forward"] += dt
                s.s["device"] += dt
        return timed


class Link:
    """A host-to-device link of `mb_per_s` for the weight copies: on CPU they complete inside `enqueue_copy`;
    this hands back events that fire once the bytes would have crossed the link, one piece after another (a
    GPU's copy stream), so loads and prefetches are in flight for a while, as on a GPU. A blocking load's wait
    for its event is device time (the GPU's switch stall), `stall` in the clock."""

    def __init__(self, clock: Clock, mb_per_s: float):
        self.s_per_byte, self.free_at = 1.0 / (mb_per_s * 1e6), 0.0

        class Landing:
            __slots__ = ("t",)

            def __init__(self, t: float):
                self.t = t

            def query(self) -> bool:
                return time.monotonic() >= self.t

            @functools.partial(clock.device, "stall")
            def synchronize(self) -> None:
                time.sleep(max(0.0, self.t - time.monotonic()))

        self.event = Landing

    def idle(self) -> None:
        """Wait until every copy so far has landed."""
        time.sleep(max(0.0, self.free_at - time.monotonic()))

    def wrap(self, copy):
        @functools.wraps(copy)
        def enqueue_copy(dst, src, start, ends, stream):
            copy(dst, src, start, ends, stream)
            events, a = [], start
            for b in ends:
                self.free_at = max(self.free_at, time.monotonic()) + (b - a) * self.s_per_byte
                events.append(self.event(self.free_at))
                a = b
            return events
        return enqueue_copy


class Load:
    """Closed loop: model i keeps 1 + i % 4 requests (or `per_model` each); a finished (or aborted) one is replaced
    at once."""

    def __init__(self, multi, names: list[str], seed: int, vocab: int, max_context: int = 2048,
                 per_model: int | None = None):
        self.multi, self.rng, self.vocab, self.max_context = multi, random.Random(seed), vocab, max_context
        self.want = {n: per_model or 1 + i % 4 for i, n in enumerate(names)}
        self.live = dict.fromkeys(names, 0)
        self.owner: dict[str, str] = {}
        self.n = 0
        for n in names:
            self.top_up(n)

    def top_up(self, name: str) -> None:
        from token_scheduler.request import SamplingParams

        while self.live[name] < self.want[name]:
            p = max(1, min(512, round(_lognormal(self.rng, 128.0, 1.0))))
            o = max(1, min(self.max_context - p - 1, round(_lognormal(self.rng, 256.0, 1.0))))
            rid = f"{name}#{self.n}"
            self.n += 1
            self.multi.add_request(rid, [self.rng.randrange(self.vocab) for _ in range(p)],
                                   SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True), model=name)
            self.owner[rid] = name
            self.live[name] += 1

    def finished(self, outputs) -> None:
        for o in outputs:
            if o.status.finished:
                name = self.owner.pop(o.request.request_id)
                self.live[name] -= 1
                self.top_up(name)


def run(models: str = "14x7b,21x1.5b", steps: int = 2000, rounds: int = 5, warmup: int = 1000,
        device_ms: float = 2.0, seed: int = 0, weight_mib: int = 40, kv_mib: int = 32, link_mb_s: float = 10.0,
        cache_dir: Path | None = None, per_model: int | None = None) -> dict:
    from model_swapper import prefetch, swapper
    from model_swapper.host_cache import HostModelCache
    from token_scheduler.engine import LLMEngine
    from token_scheduler.multi_engine import MultiModelEngine
    from token_scheduler.policies.slo import ModelSLO
    from token_scheduler.runner import ModelRunner

    entries = parse_models(models)
    dirs = make_checkpoints(cache_dir or bench_models_dir())
    cache = HostModelCache(f"{2 * (weight_mib + kv_mib)}MiB", namespace=f"bench-host-{uuid.uuid4().hex[:8]}")
    clock = Clock()
    execute, eng_step = ModelRunner.execute, LLMEngine.step_tokens
    launch, read = ModelRunner.launch_decode, ModelRunner.read
    cont, complete = LLMEngine.continue_inflight, LLMEngine.complete_inflight
    copy = swapper.enqueue_copy  # weights into the arena: a DMA on a GPU, synchronous copies on CPU
    ModelRunner.execute = clock.forward(execute, device_ms / 1e3)
    LLMEngine.step_tokens = clock.host("engine", eng_step)
    ModelRunner.launch_decode = clock.launch(launch, device_ms / 1e3)
    ModelRunner.read = staticmethod(clock.read(read))
    LLMEngine.continue_inflight = clock.host("engine", cont)
    LLMEngine.complete_inflight = clock.host("engine", complete)
    link = Link(clock, link_mb_s) if link_mb_s else None
    timed_copy = clock.device("copy", copy)
    swapper.enqueue_copy = prefetch.enqueue_copy = link.wrap(timed_copy) if link else timed_copy
    try:
        multi = MultiModelEngine({e.name: dirs[e.size] for e in entries}, policy="token", device="cpu",
                                 slos=ModelSLO(10.0, 0.1), gpu_budget=(weight_mib + kv_mib) * MiB,
                                 kv_cache_gb=kv_mib * MiB / 1e9, host_cache=cache)
        multi._sync = clock.host("sync", multi._sync)
        multi._execute_memory = clock.host("memory", multi._execute_memory)
        multi.policy.schedule = clock.host("policy", multi.policy.schedule)
        vocab = min(e.model_config.vocab_size for e in multi.engines.values())
        load = Load(multi, [e.name for e in entries], seed, vocab, per_model=per_model)
        freeze_long_lived(collect=True)  # the worker's collector settings, after its models are hosted
        runs = []
        for r in range(-1, rounds):  # round -1: the warm-up (cost model fits, every model's first turns)
            n_steps = warmup if r < 0 else steps
            ran, idle, total, caller, cpu, toks = 0, 0, 0.0, 0.0, 0.0, 0
            s0 = dict(clock.s)
            a0 = {k: multi.timing[k] for k in ("ahead_s", "ahead_used", "ahead_discarded", "pipelined_steps")}
            t_round = time.perf_counter()
            while ran < n_steps:
                t0 = time.perf_counter()
                busy = multi.has_unfinished_requests()
                t1 = time.perf_counter()
                assert busy
                n, c1 = multi.timing["steps"], time.thread_time()
                outs = multi.step_tokens()
                t2, c2 = time.perf_counter(), time.thread_time()
                load.finished(outs)
                if multi.timing["steps"] == n:
                    idle += 1  # no plan now (no room, nothing fits): not a step; the worker waits 1 ms
                    time.sleep(0.001)
                    continue
                ran += 1
                toks += multi.engines[multi.trace[-1]].last_out.num_tokens
                total += t2 - t1
                cpu += c2 - c1
                caller += t1 - t0
            t_round = time.perf_counter() - t_round
            if r < 0:
                continue
            d = {k: clock.s[k] - s0[k] for k in clock.s}

            def per(x: float, n: int = ran) -> float:
                return round(1e6 * x / n, 2)

            host = total - d["device"]
            runs.append({
                "host_us": per(host), "sync_us": per(d["sync"]), "policy_us": per(d["policy"]),
                "memory_us": per(d["memory"]), "engine_us": per(d["engine"]),
                "rest_us": per(host - d["sync"] - d["policy"] - d["memory"] - d["engine"]),
                "caller_us": per(caller), "host_cpu_us": per(cpu - d["device_cpu"]), "forward_us": per(d["forward"]),
                "copy_us": per(d["copy"]), "stall_us": per(d["stall"]), "wall_us": per(total),
                "ahead_us": per(multi.timing["ahead_s"] - a0["ahead_s"]),
                "ahead_used": int(multi.timing["ahead_used"] - a0["ahead_used"]),
                "ahead_discarded": int(multi.timing["ahead_discarded"] - a0["ahead_discarded"]), "idle_polls": idle,
                "pipelined_frac": round((multi.timing["pipelined_steps"] - a0["pipelined_steps"]) / ran, 3),
                "period_us": per(t_round),
                "tokens_per_step": round(toks / ran, 2),
                "running_per_model": round(sum(len(e.scheduler.running) + len(e.scheduler.swapped)
                                               for e in multi.engines.values()) / len(multi.engines), 2)})
            print(runs[-1], flush=True)
        pool = multi.memory.stats
        info = {"switches": multi.switches, "loads": pool.loads, "prefetches": pool.prefetches,
                "evictions": pool.evictions, "forced_evictions": pool.forced_evictions,
                "kv_swapped_out": multi.kv_swapped_out, "steps": int(multi.timing["steps"]),
                "round_info": {k: v for k, v in multi.policy.round_info().items() if k not in ("turns", "empty_turns")}}
        if link:
            link.idle()  # every copy landed: the pool unpins its host copies before they go
        multi.close()
    finally:
        ModelRunner.execute, LLMEngine.step_tokens = execute, eng_step
        ModelRunner.launch_decode, ModelRunner.read = launch, staticmethod(read)
        LLMEngine.continue_inflight, LLMEngine.complete_inflight = cont, complete
        swapper.enqueue_copy = prefetch.enqueue_copy = copy
        cache.close()
    med = {k: round(statistics.median(r[k] for r in runs), 2)
           for k in (*PARTS, "forward_us", "copy_us", "stall_us", "wall_us", "ahead_us", "ahead_used", "ahead_discarded",
                     "pipelined_frac", "period_us")}
    from token_scheduler import multi_engine

    return {"plan_ahead": multi_engine.PLAN_AHEAD, "pipeline": multi_engine.PIPELINE, "models": models, "steps_per_round": steps, "rounds": rounds, "warmup_steps": warmup,
            "device_ms": device_ms, "seed": seed, "weight_mib": weight_mib, "kv_mib": kv_mib, "link_mb_s": link_mb_s,
            "median": med, "runs": runs, "engine": info}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="14x7b,21x1.5b", help="sizes 7b and 1.5b (their tiny stand-ins)")
    ap.add_argument("--steps", type=int, default=2000, help="steps per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1000, help="steps before the first round")
    ap.add_argument("--device-ms", type=float, default=2.0, help="sleep added to every forward (a GPU's step)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weight-mib", type=int, default=40, help="weight space of the arena (the models need 98)")
    ap.add_argument("--kv-mib", type=int, default=32, help="the arena's KV region")
    ap.add_argument("--link-mb-s", type=float, default=10.0,
                    help="the emulated link the weight copies cross (0: they land at once, as CPU copies do)")
    ap.add_argument("--per-model", type=int, default=None, help="requests every model keeps (default: 1 + i %% 4)")
    ap.add_argument("--label", default=None, help="a name for this run in the JSON (e.g. before/after)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    out = run(a.models, a.steps, a.rounds, a.warmup, a.device_ms, a.seed, a.weight_mib, a.kv_mib, a.link_mb_s,
              per_model=a.per_model)
    print(f"median per step over {a.rounds} rounds of {a.steps}: {out['median']}")
    res = {**header(), "cpu": cpu_model(), "label": a.label, **out}
    if a.json:
        write_json(a.json, res)
    return res


if __name__ == "__main__":
    main()
