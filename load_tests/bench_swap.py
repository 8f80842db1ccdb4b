"""`tokenpool bench swap`: what a model switch costs, against the PCIe floor and against peers.

On CUDA: pinned H2D/D2H bandwidth of one large copy (the floor = model bytes / H2D bandwidth); swap-in
latency to ready-to-decode for 1/2/4/16 large copies and for a naive 64 MiB-chunk loop; peers in the same run
(HF from_pretrained onto the GPU from page-cached disk, HF `model.to("cuda")` from pinned memory); decode
slowdown while a 7B-sized prefetch copies, measured on a real engine (`decode_slowdown`: this model in an
LLMEngine, bf16, batch 8 decoding through its CUDA graph) and on a GEMV stand-in (`decode_standin_*`); switch
stall with and without prefetch; KV swap bandwidth for 64/256 blocks; cold load from page-cached disk into the
host cache, with where its time went (`cold_load_breakdown`: create, fill, pin), and repeated into fresh
segments against this host's memory-copy rate (`cold_load_reps`). On CPU the same code runs at toy sizes (a
smoke test for CI; its numbers mean nothing) except the cold load, which is measured the same on any host:
`python -m load_tests.bench_swap --cold-load-only MODEL` runs that part alone (the rest needs a GPU to mean
anything, and at 1.5B would need ~15 GB on CPU).

The issue-20 figure (cold load of the 15.2 GB 7B <= 2.5 s) on the H200, once on /dev/shm as it is and once on
a tmpfs with 2 MiB pages (TOKENPOOL_SHM_DIR; 5x faster to fill on the dev VM):
    tokenpool make-model --arch qwen2 --size 7b --out /tmp/mm/q7
    python -m load_tests.bench_swap --cold-load-only /tmp/mm/q7 --reps 5 \
        --json bench/results/host_cache_cold_load_h200.json
    mkdir -p /mnt/tp-huge && mount -t tmpfs -o huge=within_size,size=40g tp-huge /mnt/tp-huge
    TOKENPOOL_SHM_DIR=/mnt/tp-huge python -m load_tests.bench_swap --cold-load-only /tmp/mm/q7 --reps 5 \
        --json bench/results/host_cache_cold_load_h200_huge.json
    tokenpool bench swap --model /tmp/mm/q7 --json bench/results/swap_qwen2_7b.json   # the whole bench
"""

from __future__ import annotations

import gc
import os
import statistics
import time
import uuid
from pathlib import Path

import torch

from gpu_pool.arena import Arena
from gpu_pool.inventory import meminfo
from gpu_pool.pinned import PinnedRegion, default_shm_dir, io_threads
from load_tests.bench_common import cpu_model, header, write_json
from model_swapper.host_cache import HostModel, HostModelCache, fill_region
from model_swapper.kv_swap import HostKVPool, KVSwapper
from model_swapper.layout import ModelLayout
from model_swapper.model_config import ModelConfig
from model_swapper.prefetch import WINDOW, Prefetcher
from model_swapper.swapper import Swapper
from model_swapper.weights import safetensors_files

GB = 1e9
DTYPE = torch.bfloat16


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(fn, dev, reps: int) -> float:
    """Median wall seconds of fn() through a device sync, after one warm-up call."""
    out = []
    for i in range(reps + 1):
        _sync(dev)
        t = time.perf_counter()
        fn()
        _sync(dev)
        if i:
            out.append(time.perf_counter() - t)
    return statistics.median(out)


def _bandwidth(dev, nbytes: int, reps: int) -> dict:
    """One large copy each way between a registered host region and the device."""
    host = PinnedRegion.anonymous(nbytes)
    host.tensor.fill_(1)
    d = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    h2d = _timed(lambda: d.copy_(host.tensor, non_blocking=True), dev, reps)
    d2h = _timed(lambda: host.tensor.copy_(d, non_blocking=True), dev, reps)
    out = {"h2d_gbs": nbytes / h2d / GB, "d2h_gbs": nbytes / d2h / GB, "probe_bytes": nbytes}
    if dev.type == "cuda":  # cross-check with torch's own pinned allocator
        tp = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        out["h2d_torch_pinned_gbs"] = nbytes / _timed(lambda: d.copy_(tp, non_blocking=True), dev, reps) / GB
    host.close()
    return out


def _decode_standin(dev, nbytes: int):
    """Stand-in decode step: bf16 matmuls reading ~nbytes of weights once (memory-bound like decode). About
    190 eager launches from Python: sensitive to launch overhead and host noise in a way a real decode step
    (one CUDA-graph replay) is not -- `_engine_beside_prefetch` measures that one."""
    k = 4096 if dev.type == "cuda" else 256
    n = max(1, round(nbytes / (k * k * 2)))
    ws = [torch.randn(k, k, device=dev).to(DTYPE) for _ in range(n)]
    x = torch.randn(8, k, device=dev).to(DTYPE)

    def step():
        for w in ws:
            x @ w
    return step


def _synthetic_7b(cuda: bool, cfg: ModelConfig) -> HostModel:
    """A Qwen2.5-7B-shaped host region (content irrelevant) to prefetch while something else decodes."""
    if cuda:
        from controller.model_factory import model_config

        cfg = ModelConfig.from_hf(model_config("qwen2", "7b", "bf16"))
    lay = ModelLayout.build(cfg, DTYPE)
    return HostModel("synthetic-7b", Path("-"), lay, PinnedRegion.anonymous(lay.nbytes), True)


def _peers(model_dir: Path, dev, reps: int) -> dict:
    from transformers import AutoModelForCausalLM

    out: dict = {}
    try:
        t = time.perf_counter()
        m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=DTYPE, device_map=str(dev))
        _sync(dev)
        out["hf_from_pretrained_s"] = time.perf_counter() - t
        out["hf_from_pretrained_method"] = f'from_pretrained(dtype=bf16, device_map="{dev}")'
    except (ValueError, ImportError) as e:  # device_map needs `accelerate`
        t = time.perf_counter()
        m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=DTYPE).to(dev)
        _sync(dev)
        out["hf_from_pretrained_s"] = time.perf_counter() - t
        out["hf_from_pretrained_method"] = f"from_pretrained(dtype=bf16) + .to({dev}) [{str(e).splitlines()[0][:80]}]"
    del m
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    out["hf_to_device_from_pinned_s"] = _peer_to_device(model_dir, dev, reps)
    return out


def _peer_to_device(model_dir: Path, dev, reps: int) -> float:
    """HF model whose parameters sit in pinned host memory, moved with `model.to(device)`."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=DTYPE)
    tensors = list(m.parameters()) + list(m.buffers())
    pinned = [t.data.pin_memory() if dev.type == "cuda" else t.data for t in tensors]

    def to_dev():
        for t, p in zip(tensors, pinned, strict=True):
            t.data = p
        m.to(dev)
    return _timed(to_dev, dev, reps)


def _kv_bench(cfg: ModelConfig, dev, bw: dict, reps: int) -> dict:
    """KV swap bandwidth for 64/256 random blocks, and a bit-exact round-trip check on the real device."""
    block = (cfg.num_layers, 2, 16, cfg.num_kv_heads, cfg.head_dim)
    kv = torch.randn(512, *block, device=dev).to(DTYPE)
    kvs = KVSwapper(kv, HostKVPool.like(kv, 512), staging_blocks=256)
    g = torch.Generator().manual_seed(0)
    R: dict = {"kv_block_bytes": kvs.host.block_bytes}
    for n in (64, 256):
        ids = torch.randperm(512, generator=g)[:n].tolist()
        dst = torch.randperm(512, generator=g)[:n].tolist()
        want = kv[ids].clone()
        moved: list[list[int]] = []

        marks: list[tuple[float, float, float, float]] = []

        def out(ids=ids, moved=moved, marks=marks):
            t0 = time.perf_counter()
            if moved:
                kvs.host.allocator.free(moved.pop())
            t1 = time.perf_counter()
            h_ids, h = kvs.swap_out(ids)
            t2 = time.perf_counter()
            h.synchronize()
            marks.append((t0, t1, t2, time.perf_counter()))
            moved.append(h_ids)

        t_out = _timed(out, dev, reps)
        # where the swap-out's wall time goes (medians over the timed reps): freeing the previous host ids,
        # enqueueing the swap (allocation, index upload, gather, copies), waiting for it on the host
        m = marks[1:]
        R[f"kv_swap_out_{n}_wall_breakdown_s"] = {
            "free_previous": statistics.median(b - a for a, b, _, _ in m),
            "enqueue": statistics.median(c - b for _, b, c, _ in m),
            "wait": statistics.median(d - c for _, _, c, d in m)}
        t_in = _timed(lambda dst=dst, moved=moved: kvs.swap_in(moved[-1], dst, free_host=False).synchronize(),
                      dev, reps)
        nbytes = n * kvs.host.block_bytes
        R[f"kv_swap_out_{n}_gbs"] = nbytes / t_out / GB
        R[f"kv_swap_in_{n}_gbs"] = nbytes / t_in / GB
        R[f"kv_swap_out_{n}_vs_pinned"] = R[f"kv_swap_out_{n}_gbs"] / bw["d2h_gbs"]
        R[f"kv_swap_in_{n}_vs_pinned"] = R[f"kv_swap_in_{n}_gbs"] / bw["h2d_gbs"]
        R[f"kv_round_trip_exact_{n}"] = bool(torch.equal(kv[dst].view(torch.int16), want.view(torch.int16)))
        if kvs.stream is not None:  # where a swap's time goes: on the copy stream vs the caller's wall clock
            dev_out, dev_in = [], []
            # all swap-outs first, then the swap-ins (after the round-trip check: dst may overlap ids, so these
            # copies no longer reproduce `want`)
            for to_host, acc in ((True, dev_out), (False, dev_in)):
                for _ in range(reps):
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record(kvs.stream)
                    if to_host:
                        kvs.host.allocator.free(moved.pop())
                        moved.append(kvs.swap_out(ids)[0])
                    else:
                        kvs.swap_in(moved[-1], dst, free_host=False)
                    b.record(kvs.stream)
                    b.synchronize()
                    acc.append(a.elapsed_time(b) / 1e3)
            R[f"kv_swap_out_{n}_stream_s"], R[f"kv_swap_in_{n}_stream_s"] = (statistics.median(dev_out),
                                                                              statistics.median(dev_in))
            R[f"kv_swap_out_{n}_wall_s"], R[f"kv_swap_in_{n}_wall_s"] = t_out, t_in
            # the link time a swap occupies (copy-stream events), as a fraction of the pinned rate: swaps are
            # asynchronous in the engine, so this is their cost there; the wall figures add the host's enqueue
            # and wake-up, which jittered by 0.1-0.7 ms between runs on the H100 box
            R[f"kv_swap_out_{n}_stream_vs_pinned"] = nbytes / R[f"kv_swap_out_{n}_stream_s"] / GB / bw["d2h_gbs"]
            R[f"kv_swap_in_{n}_stream_vs_pinned"] = nbytes / R[f"kv_swap_in_{n}_stream_s"] / GB / bw["h2d_gbs"]
        kvs.host.allocator.free(moved.pop())
    kvs.host.close()
    return R


def _free(dev) -> None:
    """Return what the last phase held (arenas, an engine and its CUDA graphs) to the device."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _compute_sync(dev) -> None:
    """Wait for the compute (current) stream only: a device-wide sync would also wait for the copy stream."""
    if dev.type == "cuda":
        torch.cuda.current_stream(dev).synchronize()


def _swap_phase(host: HostModel, syn: HostModel, dev, floor: float, reps: int) -> dict:
    """Swap-in latency by number of copies, stand-in decode slowdown under a 7B prefetch, switch stall."""
    cuda = dev.type == "cuda"
    R: dict = {}
    arena = Arena(host.nbytes + syn.nbytes + (64 << 20), dev)
    sw = Swapper(arena)
    reserved0 = torch.cuda.memory_reserved(dev) if cuda else 0

    def swap(chunks):
        rm = sw.swap_in(host, chunks=chunks)
        rm.ready.synchronize()
        sw.release(rm)
    naive = -(-host.nbytes // (64 << 20))
    lat = {f"{c}_copies": _timed(lambda c=c: swap(c), dev, reps) for c in (1, 2, 4, 16)}
    lat[f"naive_64MiB_loop_{naive}_copies"] = _timed(lambda: swap(naive), dev, reps)
    R["swap_in_s"] = lat[f"{sw.chunks}_copies"]
    R["swap_in_by_copies_s"] = lat
    R["swap_in_vs_floor"] = {k: v / floor for k, v in lat.items()}
    R["memory_reserved_delta_bytes"] = (torch.cuda.memory_reserved(dev) if cuda else 0) - reserved0

    # stand-in decode slowdown while a 7B-sized prefetch copies (copy engines and HBM shared with compute)
    step = _decode_standin(dev, int(3.09e9) if cuda else 1 << 18)
    alone = _timed(step, dev, 10)
    pf = Prefetcher(sw, window=None)
    _sync(dev)
    t = time.perf_counter()
    p = pf.prefetch(syn)
    times: list[float] = []
    while not p.handle.done() or not times:
        s = time.perf_counter()
        step()
        _compute_sync(dev)
        times.append(time.perf_counter() - s)
    R["prefetch_7b_while_decoding_s"] = time.perf_counter() - t
    R["prefetch_7b_bytes"] = syn.nbytes
    R["prefetch_7b_gbs"] = syn.nbytes / R["prefetch_7b_while_decoding_s"] / GB
    pf.cancel(p)
    _sync(dev)
    sw.poll()
    R["decode_standin_bytes"] = int(3.09e9) if cuda else 1 << 18
    R["decode_standin_step_alone_s"] = alone
    R["decode_standin_step_during_prefetch_s"] = statistics.median(times)
    R["decode_standin_steps_during_prefetch"] = len(times)
    R["decode_standin_slowdown"] = R["decode_standin_step_during_prefetch_s"] / alone - 1

    # switch stall: model A decodes (stand-in), then the scheduler switches to this model
    def stall(prefetch: bool) -> float:
        pf2 = Prefetcher(sw)
        p = pf2.prefetch(host) if prefetch else None
        deadline = time.perf_counter() + 1.5 * floor + 0.005
        while time.perf_counter() < deadline:
            step()
            pf2.poll()  # once per engine step: keeps the prefetch window full
            _compute_sync(dev)
        t = time.perf_counter()
        rm = pf2.take(p) if p else sw.swap_in(host)
        rm.ready.synchronize()
        dt = time.perf_counter() - t
        sw.release(rm)
        return dt
    R["switch_stall_no_prefetch_s"] = statistics.median(stall(False) for _ in range(3))
    R["switch_stall_with_prefetch_s"] = statistics.median(stall(True) for _ in range(3))
    sw.synchronize()
    return R


def _engine_beside_prefetch(model_dir: Path, syn: HostModel, dev, batch: int = 8, context: int = 256) -> dict:
    """The issue's figure: a real decode step of this model (LLMEngine, bf16, `batch` greedy requests decoding
    through the engine's CUDA graph, overlap off as in MultiModelEngine) alone, and while a 7B-sized prefetch
    copies into free arena space.

    Two prefetch modes: the production one (`Prefetcher` default: a 1 GiB window topped up by `poll()` once
    per step, as MultiModelEngine does) and every piece enqueued at once (no host work while it copies).
    Two levels: `engine.step()` wall time (scheduling, input copies, graph replay, sampling, the token read)
    and the captured forward alone (one graph replay, CUDA-event timed). Rounds interleave alone and beside
    the prefetch, so drift (the context grows a token per step) hits both alike. A step counts as beside the
    prefetch only if the copy was still running when the step (and its poll) ended."""
    from load_tests.bench_engine import DTYPE_NAMES, decode_graph
    from token_scheduler import LLMEngine, SamplingParams
    from token_scheduler.engine import EngineConfig

    cuda = dev.type == "cuda"
    rounds, per_round = (4, 40) if cuda else (1, 2)
    # overlap off, as MultiModelEngine (where prefetches happen) runs its engines: one synchronous step per call
    eng = LLMEngine(EngineConfig(model=str(model_dir), device=str(dev), dtype="bf16" if cuda else "auto",
                                 max_num_seqs=batch, max_num_batched_tokens=8192, max_model_len=4096,
                                 kv_cache_memory_gb=2.0 if cuda else None, num_host_kv_blocks=0, overlap=False))
    g = torch.Generator().manual_seed(0)
    vocab = eng.model_config.vocab_size
    for i in range(batch):
        eng.add_request(f"dec{i}", torch.randint(0, vocab, (context,), generator=g).tolist(),
                        SamplingParams(temperature=0, ignore_eos=True, max_tokens=eng.max_model_len - context - 1))
    while any(r.is_prefilling or not r.output_token_ids for r in eng.scheduler.requests.values()):
        eng.step()
    for _ in range(20 if cuda else 1):
        eng.step()
    _sync(dev)
    R: dict = {"model_dir": str(model_dir), "batch": batch, "context_start": context,
               "engine_dtype": DTYPE_NAMES.get(eng.dtype, str(eng.dtype)), "cuda_graphs": bool(eng.runner.bucket_of),
               "overlap": eng.overlap,
               "prefetch_bytes": syn.nbytes, "rounds": rounds, "steps_alone_per_round": per_round}

    def step_op() -> float:
        t = time.perf_counter()
        eng.step()
        _compute_sync(dev)
        return time.perf_counter() - t

    graph = decode_graph(eng, batch) if cuda else None
    ev0, ev1 = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if cuda else (None, None)

    def replay_op() -> float:  # same buffers each time: rewrites the same KV slots with the same values
        ev0.record()
        graph.graph.replay()
        ev1.record()
        ev1.synchronize()
        return ev0.elapsed_time(ev1) / 1e3

    arena = Arena(syn.nbytes + (64 << 20), dev)
    sw = Swapper(arena)

    def rounds_of(op, window) -> dict:
        alone: list[float] = []
        beside: list[float] = []
        polls: list[float] = []
        gbs: list[float] = []
        for _ in range(rounds):
            alone += [op() for _ in range(per_round)]
            pf = Prefetcher(sw, window=window)
            start = end = None
            if cuda:
                start = torch.cuda.Event(enable_timing=True)
                start.record(sw.stream)
            p = pf.prefetch(syn)
            while True:
                if cuda and end is None and p.enqueued >= syn.nbytes:  # the last piece is on the copy stream
                    end = torch.cuda.Event(enable_timing=True)
                    end.record(sw.stream)
                dt = op()
                t = time.perf_counter()
                pf.poll()
                polls.append(time.perf_counter() - t)
                done = p.handle.done()
                if not done or not cuda:  # on CPU the copy finished inside prefetch(): a smoke value
                    beside.append(dt)
                if done:
                    break
            if end is not None:
                end.synchronize()
                gbs.append(syn.nbytes / (start.elapsed_time(end) / 1e3) / GB)
            pf.cancel(p)
            sw.poll()
        a = statistics.median(alone)
        b = statistics.median(beside) if beside else None  # None: every copy outran a whole step
        return {"alone_ms": 1e3 * a, "beside_prefetch_ms": b and 1e3 * b, "slowdown": b and b / a - 1,
                "n_alone": len(alone),
                "n_beside_prefetch": len(beside), "poll_ms_median": 1e3 * statistics.median(polls),
                "prefetch_gbs": statistics.median(gbs) if gbs else None, "prefetch_gbs_min": min(gbs) if gbs else None}

    modes = {"window_1GiB_poll_per_step": WINDOW, "all_enqueued_at_once": None}
    for name, window in modes.items():
        R[name] = {"engine_step": rounds_of(step_op, window)}
        if graph is not None:
            R[name]["graph_replay"] = rounds_of(replay_op, window)
    for rid in list(eng.scheduler.requests):
        eng.abort_request(rid)
    eng.step()
    sw.synchronize()
    return R


def _load_host(cache: HostModelCache, model_dir: Path, cfg: ModelConfig, R: dict) -> HostModel:
    """The node-shared host cache, or (when the shm filesystem is too small for the model, as under
    docker's 64 MB default) a private pinned region loaded the same way, so the bench still runs."""
    lay = ModelLayout.build(cfg, DTYPE)
    st = os.statvfs(cache.index.root.parent)
    if st.f_bavail * st.f_frsize >= lay.nbytes + (256 << 20):
        R["host_cache"] = f"shared ({cache.index.root.parent})"
        return cache.get(model_dir, DTYPE)
    R["host_cache"] = f"private: {cache.index.root.parent} has {st.f_bavail * st.f_frsize / 2**30:.1f} GiB free"
    t = time.perf_counter()
    region = PinnedRegion.anonymous(lay.nbytes, pin=False)
    stats = fill_region(region, model_dir, lay, torch.cuda.is_available(), create_s=time.perf_counter() - t)
    return HostModel("bench-private", model_dir, lay, region, True, load_stats=stats)


def _host_facts(warm_read_s: float) -> dict:
    """What else bears on a cold load: the page-cache warm-up read just done (slow: the files were not
    cached), dirty pages still being written back (a freshly made model), CPUs, kernel, shmem huge pages."""
    mi = meminfo()
    try:
        thp = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled").read_text().strip()
    except OSError:
        thp = "?"
    return {"warm_read_s": warm_read_s, "dirty_writeback_bytes": mi.get("Dirty", 0) + mi.get("Writeback", 0),
            "mem_available_bytes": mi.get("MemAvailable", 0), "cpus": io_threads(), "kernel": os.uname().release,
            "shmem_thp": thp}


def _copy_floor(nbytes: int, reps: int = 3) -> float:
    """This host's memory-copy rate (bytes/s of the copy, GB moved once) over `nbytes`: one plain torch copy
    between two buffers whose pages already exist, the physical floor of a load that writes `nbytes`."""
    src, dst = torch.ones(nbytes, dtype=torch.uint8), torch.zeros(nbytes, dtype=torch.uint8)
    return nbytes / _timed(lambda: dst.copy_(src), torch.device("cpu"), reps)


def cold_load_reps(model_dir: Path, reps: int) -> dict:
    """`reps` cold loads of the model (page-cached) into fresh shared segments of the host cache, each with its
    split, their medians, and the ratio to a plain memory copy of the same bytes measured in the same run."""
    model_dir = Path(model_dir)
    for f in safetensors_files(model_dir):  # page cache warm: a cold load here means "not in the host cache"
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass
    lay = ModelLayout.build(ModelConfig.from_pretrained(model_dir), DTYPE)
    copy_bps = _copy_floor(lay.nbytes)
    runs = []
    for _ in range(reps):
        cache = HostModelCache("1TB", namespace=f"bench-cold-{uuid.uuid4().hex[:8]}")
        try:
            runs.append(cache.get(model_dir, DTYPE).load_stats.as_dict())
        finally:
            cache.close()
    med = {k: statistics.median(r[k] for r in runs) for k, v in runs[0].items() if isinstance(v, float)}
    return {"device": f"{cpu_model()} ({os.cpu_count()} CPUs)", "shm_dir": str(default_shm_dir()),
            "shm_huge": runs[0].get("shm_huge"), "bytes": lay.nbytes, "threads": runs[0]["threads"], "reps": reps,
            "pinned": runs[0]["pinned"], "median": med, "runs": runs, "memcpy_gbs": copy_bps / GB,
            "memcpy_floor_s": lay.nbytes / copy_bps, "ratio_to_memcpy_floor": med["total_s"] * copy_bps / lay.nbytes}


def run_bench_swap(model_dir: Path, json_out: Path | None) -> dict:
    model_dir = Path(model_dir)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    reps = 5 if cuda else 2
    R: dict = {**header(), "model_dir": str(model_dir), "dtype": "bf16", "smoke_only": not cuda}
    cfg = ModelConfig.from_pretrained(model_dir)

    # cold load: page-cached safetensors -> shared pinned host cache (read once, register once)
    t = time.perf_counter()
    for f in safetensors_files(model_dir):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass
    R["cold_load_host"] = _host_facts(time.perf_counter() - t)
    cache = HostModelCache("1TB", namespace=f"bench-{uuid.uuid4().hex[:8]}")
    try:
        t = time.perf_counter()
        host = _load_host(cache, model_dir, cfg, R)
        R["cold_load_s"] = time.perf_counter() - t
        nb = host.nbytes
        R["model_bytes"] = nb
        R["cold_load_gbs"] = sum(f.stat().st_size for f in safetensors_files(model_dir)) / R["cold_load_s"] / GB
        R["host_pinned"] = host.region.pinned
        if host.load_stats is not None:
            R["cold_load_breakdown"] = host.load_stats.as_dict()
            R["cold_load_reps"] = cold_load_reps(model_dir, reps=3 if cuda else 1)

        bw = _bandwidth(dev, min(max(nb, 64 << 20), 4 << 30) if cuda else 8 << 20, reps)
        R["bandwidth"] = bw
        floor = nb / (bw["h2d_gbs"] * GB)
        R["pcie_floor_s"] = floor

        syn = _synthetic_7b(cuda, cfg)
        try:
            R.update(_kv_bench(cfg, dev, bw, 4 * reps))  # small copies: more reps for a steady median
            R.update(_swap_phase(host, syn, dev, floor, reps))
            _free(dev)  # the phases' arena and tensors are gone
            eb = R["decode_beside_prefetch"] = _engine_beside_prefetch(model_dir, syn, dev)
        finally:
            syn.region.close()
        prod = eb["window_1GiB_poll_per_step"]
        R["decode_slowdown"] = prod["engine_step"]["slowdown"]  # the figure: a real engine step
        R["decode_slowdown_source"] = (f"LLMEngine.step() of this model ({eb['engine_dtype']}, batch {eb['batch']}, "
                                       f"CUDA graphs {'on' if eb['cuda_graphs'] else 'off'}, overlap off) beside a "
                                       "7B-sized prefetch through the production Prefetcher (1 GiB window, poll "
                                       "per step)")
        if "graph_replay" in prod:
            R["decode_slowdown_graph_replay"] = prod["graph_replay"]["slowdown"]
        R["prefetch_7b_gbs_beside_engine"] = prod["engine_step"]["prefetch_gbs"]
        _free(dev)  # the engine is gone too: give the peers the card
        R.update(_peers(model_dir, dev, reps=3 if cuda else 1))
        ours = R["swap_in_s"]
        R["swap_in_ratio_to_floor"] = ours / floor
        R["speedup_vs_hf_from_pretrained"] = R["hf_from_pretrained_s"] / ours
        R["speedup_vs_hf_to_device_from_pinned"] = R["hf_to_device_from_pinned_s"] / ours
        R["hf_from_pretrained_vs_floor"] = R["hf_from_pretrained_s"] / floor
        R["hf_to_device_from_pinned_vs_floor"] = R["hf_to_device_from_pinned_s"] / floor
        R["switch_stall_with_prefetch_vs_floor"] = R["switch_stall_with_prefetch_s"] / floor
    finally:
        cache.close()
    write_json(json_out, R)
    return R


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="the cold-load part of `tokenpool bench swap`, alone")
    ap.add_argument("--cold-load-only", type=Path, required=True, metavar="MODEL")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    write_json(args.json, {**header(), "model_dir": str(args.cold_load_only), "dtype": "bf16",
                           **cold_load_reps(args.cold_load_only, args.reps)})
