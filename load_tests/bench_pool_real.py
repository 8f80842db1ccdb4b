"""`tokenpool bench pool --real`: the seeded multi-model workload replayed on the real engine, per policy.

One `MultiModelEngine` in pooled mode per policy (arena = the GPU budget: a KV region shared by every model
plus weight slots), the same workload (load_tests/workload.py) replayed in wall-clock time, every token
timed as it comes out of `step()`. The same workload also goes through the simulator (same policy code,
H100 roofline profile, the same arena: KV region, slot sizes, allocator and placement as the real pool), so
each policy gets a measured and a simulated SLO attainment side by side -- and the simulator's attainment
with VRAM as one byte count (`bytes_only_attainment`), which does not see fragmentation.

Models are made once per (arch, size) and cached; several served models of one size share that directory,
hence one host copy (the pinned cache is keyed by directory). Each served model still has its own weight
slot, KV and requests on the GPU, so the GPU-side work (switches, PCIe traffic, VRAM) is that of distinct
models; only host RAM is saved (a 64 GiB-disk machine cannot hold 80 GB of distinct checkpoints).

Like the simulator, a run stops `drain_s` after the last arrival; requests unfinished then miss their SLO.

Rate sweep: given several per-model rates, each policy replays the workload at each rate (in the order
given) on a fresh engine; the JSON is written after every point. `sweep[policy]` lists the points (rate
ascending), `policies[policy]` is the point at the first rate given (the single-rate shape), and
`sustained[policy]` brackets the 90%-attainment rate from the measured points alone (bench_pool.bracket:
`sustained_at_least` <= rate < `fails_at`). `ratios` are lower bounds: token's `sustained_at_least` over the
other policy's `fails_at`. Runs made apart (one process per policy, say) combine with `merge_real`;
`resimulate` puts the current simulator beside the points of an earlier real run.
"""

from __future__ import annotations

import gc
import json
import random
import time
from pathlib import Path

from load_tests.bench_common import bench_models_dir, header, spread, write_json
from load_tests.bench_pool import bracket
from load_tests.simulator import simulate
from load_tests.workload import generate, parse_models, spec_for
from token_scheduler.cost_model import MeasuredProfile, roofline_for
from token_scheduler.policies.slo import ModelSLO, RequestRecord, summarize


def make_models(entries, cache_dir: Path, say=print) -> dict[str, Path]:
    import torch

    from controller.model_factory import make_model

    device = "cuda" if torch.cuda.is_available() else "cpu"  # (bench serve --device cpu makes its models here too)
    dirs = {}
    for e in entries:
        d = cache_dir / f"{e.arch}-{e.size}-bf16"
        if not (d / "config.json").exists():
            t = time.perf_counter()
            make_model(arch=e.arch, size=e.size, out=d, seed=0, dtype="bf16", device=device, progress=False)
            say(f"made {d} in {time.perf_counter() - t:.1f}s")
        dirs[e.name] = d
    return dirs


def replay(multi, items, slo: ModelSLO, vocab: int, drain_s: float, seed: int = 0,
           idle_exit_s: float | None = None) -> dict:
    """Feed `items` at their arrival times; step until done or `drain_s` after the last arrival (or, with
    `idle_exit_s`, once every item arrived and the policy planned nothing for that long: the warm-up)."""
    from token_scheduler.request import SamplingParams

    rng = random.Random(seed)
    records: dict[str, RequestRecord] = {}
    t0 = time.monotonic()
    before = multi.timeline[-1] if multi.timeline else None  # the turn under way at the start (the warm-up's)
    before_steps = before[2] if before else 0
    horizon = (items[-1].time if items else 0.0) + drain_s
    i, steps, step_s, idle, idle_since = 0, 0, 0.0, 0, None
    samples = [(0.0, _counters(multi))]  # the pool's counters every WINDOW_S, for `windows`
    while True:
        now = time.monotonic() - t0
        if now - samples[-1][0] >= WINDOW_S:
            samples.append((now, _counters(multi)))
        while i < len(items) and items[i].time <= now:
            w = items[i]
            prompt = [rng.randrange(vocab) for _ in range(w.prompt_len)]
            multi.add_request(w.id, prompt, SamplingParams(temperature=0.0, max_tokens=w.output_len, ignore_eos=True),
                              model=w.model, arrival_time=t0 + w.time)
            records[w.id] = RequestRecord(w.id, w.model, t0 + w.time, w.prompt_len, w.output_len, slo)
            i += 1
        if now > horizon:
            break
        if not multi.has_unfinished_requests():
            if i >= len(items):
                break
            time.sleep(max(0.0, min(0.01, items[i].time - now)))
            continue
        ran, ts = multi.timing["steps"], time.perf_counter()
        outs = multi.step()
        if multi.timing["steps"] == ran:
            # The policy planned nothing although requests wait (static: models it never placed). Not a step;
            # poll again in 1 ms as the engine worker does, instead of spinning (9.2M empty polls in one
            # 180 s static run on the H100, which the policy-CPU and busy figures then counted).
            idle += 1
            idle_since = now if idle_since is None else idle_since
            if idle_exit_s is not None and i >= len(items) and now - idle_since > idle_exit_s:
                break  # an idle step has nothing to record
            time.sleep(0.001)
        else:
            step_s += time.perf_counter() - ts
            steps += 1
            idle_since = None
        t = time.monotonic()
        for o in outs:
            rec = records.get(o.request_id)
            if rec is not None:
                for _ in o.delta_token_ids:
                    rec.on_token(t)
    wall = time.monotonic() - t0
    samples.append((wall, _counters(multi)))
    turns = list(multi.timeline)  # (it keeps the latest 1024 turns): those of the replay
    at = next((k for k, tl in enumerate(turns) if tl is before), None)
    if at is not None:
        turns = turns[at + (turns[at][2] == before_steps):]
    for eng in multi.engines.values():  # what the drain left unfinished
        for rid in list(eng.scheduler.requests):
            multi.abort_request(rid)
    return {"records": list(records.values()), "wall_s": wall, "steps": steps, "step_s": step_s, "idle_polls": idle,
            "windows": windows(list(records.values()), samples, t0), "turns": turn_stats(turns)}


WINDOW_S = 15.0  # a point as a time series (`windows`), as bench serve's


def _counters(multi) -> dict:
    tm = multi.timing
    out = {"steps": tm["steps"], "engine_s": tm["engine_s"], "switches": multi.switches,
           "late_episodes": tm["late_episodes"], "pipelined_steps": tm["pipelined_steps"]}
    if hasattr(multi.policy, "rounds"):
        out["rounds"] = multi.policy.rounds
    return out


def windows(records: list[RequestRecord], samples: list, t0: float) -> list[dict]:
    """Per WINDOW_S of the replay: the requests that arrived in it (their attainment and TTFT p50) and what the pool
    did over it (steps, engine ms a step, switches and the token policy's rounds a second): whether misses come from
    all along or from one stretch, and whether turns got longer there."""
    out = []
    for (a, ca), (b, cb) in zip(samples, samples[1:]):
        if b - a < 0.05:
            continue
        arrived, w = window_arrivals(records, t0, a, b)
        ttfts = sorted(r.ttft for r in arrived if r.ttft is not None)
        steps = cb["steps"] - ca["steps"]
        w.update({"ttft_p50": ttfts[len(ttfts) // 2] if ttfts else None, "steps_per_s": steps / (b - a),
             "engine_ms_per_step": 1e3 * (cb["engine_s"] - ca["engine_s"]) / steps if steps else None,
             "switches_per_s": (cb["switches"] - ca["switches"]) / (b - a),
             "late_episodes": cb["late_episodes"] - ca["late_episodes"],
             "pipelined_frac": (cb["pipelined_steps"] - ca["pipelined_steps"]) / steps if steps else 0.0})
        if "rounds" in cb:
            w["rounds_per_s"] = (cb["rounds"] - ca["rounds"]) / (b - a)
        out.append(w)
    return out


def window_arrivals(records: list[RequestRecord], t0: float, a: float, b: float) -> tuple[list, dict]:
    """The requests that arrived in [a, b) seconds after `t0`, and a time-series window's first fields: its edges,
    how many arrived and the share of them that met their SLO (None: none arrived)."""
    arrived = [r for r in records if a <= r.arrival - t0 < b]
    return arrived, {"t0_s": round(a, 1), "t1_s": round(b, 1), "arrivals": len(arrived),
                     "attainment": sum(r.attained() for r in arrived) / len(arrived) if arrived else None}


def turn_stats(turns: list) -> dict:
    """How long the turns of the replay were (the pool's timeline: [start, model, steps, engine seconds] a turn)."""
    if not turns:
        return {"turns": 0}
    return {"turns": len(turns), **spread([t[3] for t in turns], "s"), **spread([t[2] for t in turns], "steps")}


def parse_rates(rate) -> list[float]:
    """0.1, "0.1" or "0.1,0.2,0.4" -> [0.1, ...] (order kept: the order the points run in)."""
    if isinstance(rate, str):
        rates = [float(x) for x in rate.split(",") if x.strip()]
    elif isinstance(rate, (int, float)):
        rates = [float(rate)]
    else:
        rates = [float(x) for x in rate]
    if not rates or any(r <= 0 for r in rates):
        raise ValueError(f"rates must be positive requests/s per model, got {rate!r}")
    return rates


def run_real(models: str = "4x7b,6x1.5b", rate: float | str | list = 0.1, duration: float = 120.0,
             slo_ttft: float = 10.0, slo_tpot: float = 0.1, gpu_budget_gb: float = 60.0,
             policies=("token", "request", "static"), seed: int = 0, json_out: Path | str | None = None,
             kv_cache_gb: float = 4.0, drain_s: float = 60.0, cache_dir: str | Path | None = None,
             host_budget_gb: float = 48.0, warmup: bool = True, say=print, device: str = "cuda",
             model_dirs: dict | None = None, dtype: str = "bf16", target: float = 0.9,
             stop_at_miss: bool = False, placement: str = "lru") -> dict:
    """Each policy at each rate (a fresh engine per point). `stop_at_miss`: once a policy misses `target`,
    skip its remaining rates (for an ascending list: they add nothing to the bracket). `placement`: the token
    policy's rule for a fragmented arena (TokenConfig.placement; "lru" is the behaviour before it existed)."""
    import torch

    from model_swapper.host_cache import HostModelCache

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench pool --real needs a CUDA GPU (use the simulated mode without --real)")
    rates = parse_rates(rate)
    entries = parse_models(models)
    # model_dirs: {"7b": dir, ...} by size (tests: tiny CPU models standing in for each size)
    dirs = ({e.name: Path(model_dirs[e.size]) for e in entries} if model_dirs
            else make_models(entries, Path(cache_dir).expanduser() if cache_dir else bench_models_dir(), say))
    tdtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    slo = ModelSLO(slo_ttft, slo_tpot)
    specs = {e.name: spec_for(e.arch, e.size, e.name) for e in entries}
    cache = HostModelCache(f"{host_budget_gb}GB", namespace=f"bench-pool-{seed}")
    out = {**header(), "mode": "real", "config": {
        "models": models, "rate_per_model": rates[0], "rates_per_model": rates, "duration_s": duration,
        "drain_s": drain_s, "slo_ttft_s": slo_ttft, "slo_tpot_s": slo_tpot, "gpu_budget_gb": gpu_budget_gb,
        "kv_region_gb": kv_cache_gb, "seed": seed, "target_attainment": target, "placement": placement,
        "requests": len(generate(list(dirs), rates[0], duration, seed=seed)),
        "weights_gb": sum(s.weight_bytes for s in specs.values()) / 1e9,
        "note": __doc__.split("\n\n")[2].replace("\n", " ")}, "policies": {}, "sweep": {}}
    t = time.perf_counter()
    for d in sorted(set(dirs.values())):
        cache.get(d, tdtype)
    out["host_cache_load_s"] = time.perf_counter() - t
    say(f"host copies ready in {out['host_cache_load_s']:.1f}s")
    point = dict(dirs=dirs, specs=specs, slo=slo, duration=duration, drain_s=drain_s, gpu_budget_gb=gpu_budget_gb,
                 kv_cache_gb=kv_cache_gb, cache=cache, seed=seed, warmup=warmup, device=device, dtype=dtype,
                 placement=placement)
    for p in policies:
        for r in rates:
            res = run_point(p, r, **point)
            out["sweep"].setdefault(p, []).append(res)
            summarize_sweep(out, target)
            s = res["slo"]
            say(f"{p:8s} rate={r:g}/s/model real attainment={s['attainment']:.3f} "
                f"sim={res['simulated']['attainment']:.3f}  TTFT p50/p99={s['ttft_p50'] or 0:.2f}/"
                f"{s['ttft_p99'] or 0:.2f}s TPOT p50/p99={1e3 * (s['tpot_p50'] or 0):.0f}/"
                f"{1e3 * (s['tpot_p99'] or 0):.0f}ms switches/s={res['switches_per_s']:.2f} "
                f"busy={res['gpu_busy_frac']:.2f} stall={res['swap_stall_s']:.2f}s "
                f"(sim {res['simulated']['swap_stall_s']:.2f}s) forced/skipped={res['forced_evictions']}/"
                f"{res['prefetch_skipped']} (sim {res['simulated']['forced_evictions']}/"
                f"{res['simulated']['prefetch_skipped']}) "
                f"policy CPU={100 * res['timing']['policy_frac']:.2f}% of step time")
            write_json(Path(json_out) if json_out else None, out)  # after each point: partial results survive
            if stop_at_miss and s["attainment"] < target:
                break
    cache.close()
    if "token" in out["sustained"]:
        say("sustained:", {p: (v["sustained_at_least"], v["fails_at"]) for p, v in out["sustained"].items()},
            "ratio lower bounds:", {k: v["ratio_lower_bound"] for k, v in out["ratios"].items()})
    return out


def policy_kw(p: str, placement: str) -> dict | None:
    return {"placement": placement} if p == "token" else None


def host_per_step_s(point: dict) -> float:
    """Seconds per step a real point spent in its step calls outside the engine's step -- the policy, memory moves,
    detokenizing, the books: the replay's busy time (`gpu_busy_frac` x `wall_s`, timed around `multi.step()`) less
    `timing.engine_s` (what the cost model's step fits are fitted to), over the steps. 0 where a point lacks them.
    H200, token policy, seed 0 at e755649: 0.75 ms at 1.44 req/s/model (14.1 tokens a step), 1.02 ms at 1.6 (20.6)."""
    tm = point.get("timing") or {}
    steps, engine_s = tm.get("steps") or 0, tm.get("engine_s")
    busy, wall = point.get("gpu_busy_frac"), point.get("wall_s")
    if not steps or engine_s is None or busy is None or wall is None:
        return 0.0
    return max(0.0, (busy * wall - engine_s) / steps)


def simulate_point(items, specs, slo, p: str, *, gpu_budget_gb: float, kv_cache_gb: float, drain_s: float,
                   seed: int, placement: str = "lru", hw=None, step_host_s: float = 0.0) -> dict:
    """The simulator beside a real point, keyed as the real point is: in the real engine's arena, and (only
    the attainment) with VRAM as one byte count. `hw`: the simulator's ground truth (default: the physical
    roofline; `MeasuredProfile`: the costs the real run measured). `step_host_s`: host seconds each step adds
    outside the device step, which the policy's cost model does not see, as in the engine (`host_per_step_s`
    of the real point, beside its measured costs: those fits price the engine's step alone)."""
    kw = dict(capacity_bytes=int(gpu_budget_gb * 1e9), drain_s=drain_s, seed=seed, policy_kw=policy_kw(p, placement),
              hw=hw, step_host_s=step_host_s, host_observed=False)
    sim = simulate(items, specs, slo, p, kv_cache_bytes=int(kv_cache_gb * 1e9), **kw)
    flat = simulate(items, specs, slo, p, **kw)
    e = sim.extra
    return {"attainment": sim.slo["attainment"], "ttft_p50": sim.slo["ttft_p50"], "tpot_p50": sim.slo["tpot_p50"],
            "switches_per_s": sim.switches_per_s, "gpu_busy_frac": sim.gpu_busy_frac,
            "swap_stall_s": sim.load_stall_s, "loads": e["blocking_loads"], "prefetches": e["prefetches"],
            "prefetch_skipped": e["prefetch_skipped"], "evictions": e["evictions"],
            "forced_evictions": e["forced_evictions"], "kv_peak_gb": e.get("kv_peak_gb", 0.0),
            "kv_region_exceeded": e.get("kv_region_exceeded", False),
            "bytes_only_attainment": flat.slo["attainment"], "bytes_only_swap_stall_s": flat.load_stall_s,
            "step_host_s": step_host_s, "steps": sim.steps, "rounds": e.get("rounds_gpu0", {}).get("rounds")}


def run_point(p: str, rate: float, *, dirs, specs, slo, duration, drain_s, gpu_budget_gb, kv_cache_gb, cache, seed,
              warmup, device, dtype, placement="lru") -> dict:
    """One policy at one rate: a fresh pooled engine, the seeded workload replayed, the simulator beside it."""
    import torch

    from token_scheduler.engine import EngineConfig
    from token_scheduler.multi_engine import MultiModelEngine

    items = generate(list(dirs), rate, duration, seed=seed)
    multi = MultiModelEngine(
        {n: EngineConfig(model=str(d), device=device, dtype=dtype, served_model_name=n, max_num_seqs=64,
                         max_model_len=4096, max_num_batched_tokens=2048) for n, d in dirs.items()},
        policy=p, slos=slo, device=device, gpu_budget=int(gpu_budget_gb * 1e9), kv_cache_gb=kv_cache_gb,
        host_cache=cache, policy_kw=policy_kw(p, placement))
    vocab = min(e.model_config.vocab_size for e in multi.engines.values())  # ids valid for every model
    if warmup:  # every model loaded once, its prefill and bucket-1 graph run; not measured
        wu = [type(items[0])(0.0, n, 32, 4, f"warmup-{n}") for n in dirs] if items else []
        # static never serves some models: stop once nothing is planned for 0.5 s rather than after 20 s
        replay(multi, wu, ModelSLO(1e9, 1e9), vocab, drain_s=20.0, seed=seed + 1, idle_exit_s=0.5)
    multi.reset_stats()
    r = replay(multi, items, slo, vocab, drain_s, seed)
    s = summarize(r["records"])
    mem = multi.memory
    loads = mem.stats.load_s
    res = {
        "rate": rate, "requests": len(items),
        "slo": s.to_dict(), "wall_s": r["wall_s"], "steps": r["steps"], "idle_polls": r["idle_polls"],
        "goodput_rps": sum(x.attained() for x in r["records"]) / r["wall_s"],
        "switches_per_s": multi.switches / r["wall_s"], "gpu_busy_frac": r["step_s"] / r["wall_s"],
        "swap_stall_s": mem.stats.stall_s, "loads": mem.stats.loads, "prefetches": mem.stats.prefetches,
        "prefetch_skipped": mem.stats.prefetch_skipped, "evictions": mem.stats.evictions,
        "forced_evictions": mem.stats.forced_evictions, "load_gb": mem.stats.load_bytes / 1e9,
        "load_gbs_mean": (sum(b for b, _, _ in loads) / sum(x for _, x, _ in loads) / 1e9) if loads else None,
        "kv_swapped_out": multi.kv_swapped_out, "timing": multi.timing_summary(),
        "windows": r["windows"], "turns": r["turns"],
        "cost_model": multi.cost.to_dict(),
    }
    if hasattr(multi.policy, "round_info"):  # token policy: rounds, skips, turns and empty turns per model
        res["policy_info"] = multi.policy.round_info()
    if device.startswith("cuda"):  # allocator retries (cudaFree + retry, device-wide syncs) would show here
        ms = torch.cuda.memory_stats()
        free, total = torch.cuda.mem_get_info()
        res["cuda_memory"] = {"alloc_retries": ms.get("num_alloc_retries", 0), "ooms": ms.get("num_ooms", 0),
                              "reserved_peak_gb": ms.get("reserved_bytes.all.peak", 0) / 1e9,
                              "allocated_peak_gb": ms.get("allocated_bytes.all.peak", 0) / 1e9,
                              "device_free_gb": free / 1e9, "device_total_gb": total / 1e9}
    res["simulated"] = simulate_point(items, specs, slo, p, gpu_budget_gb=gpu_budget_gb, kv_cache_gb=kv_cache_gb,
                                      drain_s=drain_s, seed=seed, placement=placement)
    res["sim_minus_real_points"] = 100 * (res["simulated"]["attainment"] - s.attainment)
    # the same simulation driven by the costs this run measured (its cost model's fits) instead of the roofline,
    # and the host time per step it measured outside them, which those fits leave out (H200, 1.6 req/s/model: without
    # it 37,801 simulated steps in 1,662 rounds where the engine ran 24,232 in 137; with it 26,547 in 131 -- though
    # attainment still read 99% against the real 74.2%: bench/results/sim_gap_1.6_e755649.json)
    res["simulated_measured_costs"] = simulate_point(
        items, specs, slo, p, gpu_budget_gb=gpu_budget_gb, kv_cache_gb=kv_cache_gb, drain_s=drain_s, seed=seed,
        placement=placement, hw=MeasuredProfile.from_cost_dict(
            res["cost_model"], roofline_for(torch.cuda.get_device_name() if device.startswith("cuda") else None)),
        step_host_s=host_per_step_s(res))
    res["sim_measured_minus_real_points"] = 100 * (res["simulated_measured_costs"]["attainment"] - s.attainment)
    multi.close()
    del multi
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return res


# -- what the points say --------------------------------------------------------------------------------

def summarize_sweep(out: dict, target: float | None = None) -> dict:
    """(Re)derive `policies`, `sustained` and `ratios` of a real-mode result from its `sweep` points."""
    target = out["config"].get("target_attainment", 0.9) if target is None else target
    out["config"]["target_attainment"] = target
    first = out["config"]["rate_per_model"]
    out["sweep"] = {p: sorted(pts, key=lambda x: x["rate"]) for p, pts in out["sweep"].items()}
    out["policies"] = {p: x for p, pts in out["sweep"].items() for x in pts if x["rate"] == first}
    out["sustained"] = {}
    for p, pts in out["sweep"].items():
        b = bracket([(x["rate"], x["slo"]["attainment"]) for x in pts], target)
        b["simulated"] = bracket([(x["rate"], x["simulated"]["attainment"]) for x in pts], target)
        out["sustained"][p] = b
    out["ratios"] = bound_ratios(out["sustained"], target)
    return out


def bound_ratios(sustained: dict, target: float = 0.9, base: str = "token") -> dict:
    """`base`'s sustained rate over each other policy's, bounded from measured brackets only.

    Lower bound: base's `sustained_at_least` / the other's `fails_at` (the other's sustained rate is below
    its first miss). Upper bound: base's `fails_at` / the other's `sustained_at_least`, where both exist.
    """
    b0 = sustained.get(base)
    if b0 is None:
        return {}
    t, t_hi = b0["sustained_at_least"], b0["fails_at"]
    out = {}
    for p, b in sustained.items():
        if p == base:
            continue
        lo, f = b["sustained_at_least"], b["fails_at"]
        e = {"ratio_lower_bound": None, "ratio_upper_bound": (t_hi / lo if t_hi is not None and lo > 0 else None),
             "unbounded": False, f"{base}_sustained_at_least": t, f"{p}_fails_at": f}
        if t <= 0:
            e["reason"] = f"{base} met the {target:.0%} target at no measured rate"
        elif f is None:
            e["reason"] = (f"{p} met the target at every measured rate (up to {max(r for r, _ in b['points']):g}"
                           f"/s/model): no upper bound on its sustained rate; measure higher rates")
        elif lo <= 0:
            e["unbounded"] = True
            e["bracket_lower_bound"] = t / f
            e["reason"] = (f"{p} met the target at no measured rate (lowest {f:g}/s/model), so its sustained rate "
                           f"is 0 as far as the measured rates show and the ratio is unbounded; bracket_lower_bound "
                           f"= {base}'s sustained_at_least / {f:g} assumes only that it misses above {f:g} too")
        else:
            e["ratio_lower_bound"] = t / f
            e["reason"] = f"{base} sustained >= {t:g}/s/model; {p} missed the target at {f:g}/s/model"
        if not (b0["monotone"] and b["monotone"]):
            e["reason"] += "; attainment was not monotone in the rate, brackets read conservatively"
        out[f"{base}/{p}"] = e
    return out


def merge_real(paths, json_out: Path | str | None = None, target: float | None = None) -> dict:
    """Combine `--real` result files (one per process, say) into one, and summarize the combined points.

    Every file must have the same configuration apart from its rates. A (policy, rate) point found in more
    than one file is taken from the last one (listed under `replaced`). Accepted: run_real's output, older
    single-rate outputs (no `sweep`), and files that keep such outputs under `runs` (bench/results/).
    """
    runs = []
    for path in paths:
        d = json.loads(Path(path).read_text())
        for key, run in (d["runs"].items() if isinstance(d.get("runs"), dict) else [(None, d)]):
            if run.get("mode") != "real":
                raise ValueError(f"{path}{f' runs.{key}' if key else ''}: not a --real result")
            runs.append((f"{path}{f'#runs.{key}' if key else ''}", run))
    if not runs:
        raise ValueError("nothing to merge")
    skip = {"rate_per_model", "rates_per_model", "requests", "target_attainment", "note"}
    cfg0 = runs[0][1]["config"]
    sweep: dict[tuple[str, float], dict] = {}
    merged_from, replaced = [], []
    for src, run in runs:
        cfg = run["config"]
        diff = sorted(k for k in set(cfg) | set(cfg0) if k not in skip and cfg.get(k) != cfg0.get(k))
        if diff:
            raise ValueError(f"{src}: configuration differs from {runs[0][0]} in {diff}")
        pts = run.get("sweep") or {p: [{**x, "rate": x.get("rate", cfg["rate_per_model"])}]
                                   for p, x in run.get("policies", {}).items()}
        for p, xs in pts.items():
            for x in xs:
                if (p, x["rate"]) in sweep:
                    replaced.append([p, x["rate"]])
                sweep[p, x["rate"]] = x
        merged_from.append({"source": src, **{k: run.get(k) for k in ("device", "date", "commit", "command")},
                            "points": [[p, x["rate"]] for p, xs in pts.items() for x in xs]})

    def one(key):
        vals = sorted({str(m[key]) for m in merged_from})
        return vals[0] if len(vals) == 1 else vals

    out = {**header(), "device": one("device"), "commit": one("commit"), "date": max(m["date"] for m in merged_from),
           "mode": "real", "merged_from": merged_from, "replaced": replaced,
           "config": {**cfg0, "rates_per_model": sorted({r for _, r in sweep})}, "sweep": {}}
    for (p, _), x in sweep.items():
        out["sweep"].setdefault(p, []).append(x)
    summarize_sweep(out, target)
    write_json(Path(json_out) if json_out else None, out)
    return out


_COUNTERS = ("loads", "prefetches", "prefetch_skipped", "forced_evictions", "evictions", "swap_stall_s")


def resimulate(path: Path | str, json_out: Path | str | None = None, placements=("lru", "window")) -> dict:
    """The current simulator beside every point of a `--real` result: attainment and the pool's counters, real
    and simulated, per placement rule (the run's own first; a run without `config.placement` ran "lru")."""
    d = json.loads(Path(path).read_text())
    if d.get("mode") != "real":
        raise ValueError(f"{path}: not a --real result")
    cfg = d["config"]
    ran = cfg.get("placement", "lru")
    placements = [ran] + [x for x in placements if x != ran]
    entries = parse_models(cfg["models"])
    specs = {e.name: spec_for(e.arch, e.size, e.name) for e in entries}
    slo = ModelSLO(cfg["slo_ttft_s"], cfg["slo_tpot_s"])
    out = {**header(), "mode": "resimulated", "source": str(path), "source_commit": d.get("commit"),
           "config": cfg, "placement_of_real_run": ran, "points": []}
    for p, pts in d["sweep"].items():
        for x in pts:
            items = generate(list(specs), x["rate"], cfg["duration_s"], seed=cfg["seed"])
            row = {"policy": p, "rate": x["rate"], "real": {"attainment": x["slo"]["attainment"],
                                                           **{k: x.get(k) for k in _COUNTERS}}}
            for pl in placements if p == "token" else [ran]:
                row[f"simulated_{pl}"] = simulate_point(
                    items, specs, slo, p, gpu_budget_gb=cfg["gpu_budget_gb"], kv_cache_gb=cfg["kv_region_gb"],
                    drain_s=cfg["drain_s"], seed=cfg["seed"], placement=pl)
            row["sim_minus_real_points"] = 100 * (row[f"simulated_{ran}"]["attainment"] - x["slo"]["attainment"])
            if "cost_model" in x:  # the run's own measured costs as the simulator's ground truth
                row["simulated_measured_costs"] = simulate_point(
                    items, specs, slo, p, gpu_budget_gb=cfg["gpu_budget_gb"], kv_cache_gb=cfg["kv_region_gb"],
                    drain_s=cfg["drain_s"], seed=cfg["seed"], placement=ran,
                    hw=MeasuredProfile.from_cost_dict(x["cost_model"], roofline_for(x.get("device") or d.get("device"))),
                    step_host_s=host_per_step_s(x))
                row["sim_measured_minus_real_points"] = 100 * (row["simulated_measured_costs"]["attainment"]
                                                               - x["slo"]["attainment"])
            out["points"].append(row)
    write_json(Path(json_out) if json_out else None, out)
    return out
