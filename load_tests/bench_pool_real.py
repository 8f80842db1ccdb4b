"""`tokenpool bench pool --real`: the seeded multi-model workload replayed on the real engine, per policy.

One `MultiModelEngine` in pooled mode per policy (arena = the GPU budget: a KV region shared by every model
plus weight slots), the same workload (load_tests/workload.py) replayed in wall-clock time, every token
timed as it comes out of `step()`. The same workload also goes through the simulator (same policy code,
H100 roofline profile), so each policy gets a measured and a simulated SLO attainment side by side.

Models are made once per (arch, size) and cached; several served models of one size share that directory,
hence one host copy (the pinned cache is keyed by directory). Each served model still has its own weight
slot, KV and requests on the GPU, so the GPU-side work (switches, PCIe traffic, VRAM) is that of distinct
models; only host RAM is saved (a 64 GiB-disk machine cannot hold 80 GB of distinct checkpoints).

Like the simulator, a run stops `drain_s` after the last arrival; requests unfinished then miss their SLO.
"""

from __future__ import annotations

import gc
import random
import time
from pathlib import Path

from load_tests.bench_common import header, write_json
from load_tests.simulator import simulate
from load_tests.workload import generate, parse_models
from token_scheduler.cost_model import spec_for
from token_scheduler.policies.slo import ModelSLO, RequestRecord, summarize


def make_models(entries, cache_dir: Path, say=print) -> dict[str, Path]:
    from controller.model_factory import make_model

    dirs = {}
    for e in entries:
        d = cache_dir / f"{e.arch}-{e.size}-bf16"
        if not (d / "config.json").exists():
            t = time.perf_counter()
            make_model(arch=e.arch, size=e.size, out=d, seed=0, dtype="bf16", device="cuda", progress=False)
            say(f"made {d} in {time.perf_counter() - t:.1f}s")
        dirs[e.name] = d
    return dirs


def replay(multi, items, slo: ModelSLO, vocab: int, drain_s: float, seed: int = 0) -> dict:
    """Feed `items` at their arrival times; step until done or `drain_s` after the last arrival."""
    from token_scheduler.request import SamplingParams

    rng = random.Random(seed)
    records: dict[str, RequestRecord] = {}
    t0 = time.monotonic()
    horizon = (items[-1].time if items else 0.0) + drain_s
    i, steps, step_s = 0, 0, 0.0
    while True:
        now = time.monotonic() - t0
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
        ts = time.perf_counter()
        outs = multi.step()
        step_s += time.perf_counter() - ts
        steps += 1
        t = time.monotonic()
        for o in outs:
            rec = records.get(o.request_id)
            if rec is not None:
                for _ in o.delta_token_ids:
                    rec.on_token(t)
    wall = time.monotonic() - t0
    for rid in list(multi._owner):
        multi.abort_request(rid)
    return {"records": list(records.values()), "wall_s": wall, "steps": steps, "step_s": step_s}


def run_real(models: str = "4x7b,6x1.5b", rate: float = 0.1, duration: float = 120.0, slo_ttft: float = 10.0,
             slo_tpot: float = 0.1, gpu_budget_gb: float = 60.0, policies=("token", "request", "static"),
             seed: int = 0, json_out: Path | str | None = None, kv_cache_gb: float = 4.0, drain_s: float = 60.0,
             cache_dir: str | Path = "~/.cache/tokenpool/bench-models", host_budget_gb: float = 48.0,
             warmup: bool = True, say=print, device: str = "cuda", model_dirs: dict | None = None,
             dtype: str = "bf16") -> dict:
    import torch

    from model_swapper.host_cache import HostModelCache
    from token_scheduler.engine import EngineConfig
    from token_scheduler.multi_engine import MultiModelEngine

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench pool --real needs a CUDA GPU (use the simulated mode without --real)")
    entries = parse_models(models)
    # model_dirs: {"7b": dir, ...} by size (tests: tiny CPU models standing in for each size)
    dirs = ({e.name: Path(model_dirs[e.size]) for e in entries} if model_dirs
            else make_models(entries, Path(cache_dir).expanduser(), say))
    tdtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    slo = ModelSLO(slo_ttft, slo_tpot)
    items = generate([e.name for e in entries], rate, duration, seed=seed)
    specs = {e.name: spec_for(e.arch, e.size, e.name) for e in entries}
    cache = HostModelCache(f"{host_budget_gb}GB", namespace=f"bench-pool-{seed}")
    out = {**header(), "mode": "real", "config": {
        "models": models, "rate_per_model": rate, "duration_s": duration, "drain_s": drain_s, "slo_ttft_s": slo_ttft,
        "slo_tpot_s": slo_tpot, "gpu_budget_gb": gpu_budget_gb, "kv_region_gb": kv_cache_gb, "seed": seed,
        "requests": len(items), "weights_gb": sum(s.weight_bytes for s in specs.values()) / 1e9,
        "note": __doc__.split("\n\n")[2].replace("\n", " ")}, "policies": {}}
    t = time.perf_counter()
    for d in sorted(set(dirs.values())):
        cache.get(d, tdtype)
    out["host_cache_load_s"] = time.perf_counter() - t
    say(f"host copies ready in {out['host_cache_load_s']:.1f}s")
    for p in policies:
        multi = MultiModelEngine(
            {n: EngineConfig(model=str(d), device=device, dtype=dtype, served_model_name=n, max_num_seqs=64,
                             max_model_len=4096, max_num_batched_tokens=2048) for n, d in dirs.items()},
            policy=p, slos=slo, device=device, gpu_budget=int(gpu_budget_gb * 1e9), kv_cache_gb=kv_cache_gb,
            host_cache=cache)
        vocab = min(e.model_config.vocab_size for e in multi.engines.values())  # ids valid for every model
        if warmup:  # every model loaded once, its prefill and bucket-1 graph run; not measured
            wu = [type(items[0])(0.0, n, 32, 4, f"warmup-{n}") for n in dirs] if items else []
            replay(multi, wu, ModelSLO(1e9, 1e9), vocab, drain_s=20.0, seed=seed + 1)  # static never serves some
        multi.reset_stats()
        r = replay(multi, items, slo, vocab, drain_s, seed)
        s = summarize(r["records"])
        pool = multi.pool
        switches = multi.switches
        loads = pool.stats.load_s
        res = {
            "slo": s.to_dict(), "wall_s": r["wall_s"], "steps": r["steps"],
            "goodput_rps": sum(x.attained() for x in r["records"]) / r["wall_s"],
            "switches_per_s": switches / r["wall_s"], "gpu_busy_frac": r["step_s"] / r["wall_s"],
            "swap_stall_s": pool.stats.stall_s, "loads": pool.stats.loads, "prefetches": pool.stats.prefetches,
            "prefetch_skipped": pool.stats.prefetch_skipped, "evictions": pool.stats.evictions,
            "forced_evictions": pool.stats.forced_evictions, "load_gb": pool.stats.load_bytes / 1e9,
            "load_gbs_mean": (sum(b for b, _, _ in loads) / sum(x for _, x, _ in loads) / 1e9) if loads else None,
            "kv_swapped_out": multi.kv_swapped_out, "timing": multi.timing_summary(),
            "cost_model": multi.cost.to_dict(),
        }
        sim = simulate(items, specs, slo, p, capacity_bytes=int(gpu_budget_gb * 1e9), drain_s=drain_s, seed=seed)
        res["simulated"] = {"attainment": sim.slo["attainment"], "ttft_p50": sim.slo["ttft_p50"],
                            "tpot_p50": sim.slo["tpot_p50"], "switches_per_s": sim.switches_per_s,
                            "gpu_busy_frac": sim.gpu_busy_frac}
        res["sim_minus_real_points"] = 100 * (sim.slo["attainment"] - s.attainment)
        out["policies"][p] = res
        say(f"{p:8s} real attainment={s.attainment:.3f} sim={sim.slo['attainment']:.3f}  TTFT p50/p99="
            f"{s.ttft_p50 or 0:.2f}/{s.ttft_p99 or 0:.2f}s TPOT p50/p99={1e3 * (s.tpot_p50 or 0):.0f}/"
            f"{1e3 * (s.tpot_p99 or 0):.0f}ms switches/s={res['switches_per_s']:.2f} busy={res['gpu_busy_frac']:.2f} "
            f"stall={pool.stats.stall_s:.2f}s policy CPU={100 * res['timing']['policy_frac']:.2f}% of step time")
        multi.close()
        write_json(Path(json_out) if json_out else None, out)  # after each policy: partial results survive
        del multi
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    cache.close()
    write_json(Path(json_out) if json_out else None, out)
    return out
