"""Pooled multi-model engine on CUDA: weights through arena slots, CUDA graphs shared per slot."""

from __future__ import annotations

import uuid

import pytest

from token_scheduler.engine import EngineConfig, LLMEngine
from token_scheduler.multi_engine import MultiModelEngine
from token_scheduler.request import SamplingParams

pytestmark = pytest.mark.gpu

PROMPTS = ["the quick brown fox", "hello", "a b c d e f g h i j k l m n o p", "tokens, one by one"]


@pytest.fixture
def host_cache():
    from model_swapper.host_cache import HostModelCache

    c = HostModelCache("1GiB", namespace=f"test-{uuid.uuid4().hex[:10]}")
    yield c
    c.close()


def _params(i: int) -> SamplingParams:
    return SamplingParams(temperature=1.0, top_k=20, seed=7 + i, max_tokens=12 + i, ignore_eos=True)


def _alone(path) -> dict[str, list[int]]:
    eng = LLMEngine(EngineConfig(model=str(path), device="cuda", dtype="bf16", max_num_seqs=8, kv_cache_memory_gb=0.05))
    for i, p in enumerate(PROMPTS):
        eng.add_request(f"r{i}", p, _params(i))
    out = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                out[o.request_id] = o.outputs[0].token_ids
    return out


def _pooled(paths: dict, budget: int, host_cache) -> MultiModelEngine:
    """The models of `paths` in one pooled CUDA engine (bf16) with a `budget`-byte arena, token by token."""
    return MultiModelEngine({n: EngineConfig(model=str(p), device="cuda", dtype="bf16", served_model_name=n,
                                             max_num_seqs=8) for n, p in paths.items()},
                            policy="token", device="cuda", gpu_budget=budget, kv_cache_gb=0.002,
                            host_cache=host_cache, policy_kw={"max_round_s": 0.0})


def _run_equals_alone(multi: MultiModelEngine, paths: dict, alone: dict) -> None:
    """Every prompt to every model at once, run to the end: each request's tokens are its model's alone."""
    for i, p in enumerate(PROMPTS):
        for n in paths:
            multi.add_request(f"{n}/r{i}", p, _params(i), model=n)
    done = multi.run()
    for n in paths:
        for rid, toks in alone[n].items():
            assert done[f"{n}/{rid}"].outputs[0].token_ids == toks, (n, rid)


@pytest.mark.parametrize("precapture,pipeline", [(False, False), (True, False), (False, True)])
def test_pooled_cuda_equals_alone_and_reuses_slot_graphs(make_varied, host_cache, monkeypatch, precapture, pipeline):
    from gpu_pool.arena import MiB
    from token_scheduler import multi_engine

    monkeypatch.setattr(multi_engine, "GRAPH_PRECAPTURE", precapture)
    # TOKENPOOL_PIPELINE: a model's next decode queued on the GPU before the one in flight is read (same tokens)
    monkeypatch.setattr(multi_engine, "PIPELINE", pipeline)

    # two models of one shape (seeds differ) and one of another; each takes one 2 MiB slot (bf16), the budget
    # is a 2 MiB KV region + one slot, so the three rotate through the same slot
    paths = {"a": make_varied("qwen2"), "b": make_varied("qwen2", seed=1), "c": make_varied("llama")}
    alone = {n: _alone(p) for n, p in paths.items()}
    multi = _pooled(paths, 4 * MiB, host_cache)
    if pipeline:  # a step kept in flight is timed on the device (CUDA events): what it learns is not under that
        from token_scheduler.runner import LaunchedDecode

        seen = []  # ("dev", device seconds) and ("learned", seconds), in order
        dev = LaunchedDecode.device_s
        monkeypatch.setattr(LaunchedDecode, "device_s", lambda self: seen.append(("dev", dev(self))) or seen[-1][1])
        obs = multi.cost.observe_step
        monkeypatch.setattr(multi.cost, "observe_step",
                            lambda n, shape, dt: (seen.append(("learned", dt)), obs(n, shape, dt)))
    _run_equals_alone(multi, paths, alone)
    assert multi.memory.stats.loads + multi.memory.stats.prefetches > len(paths)  # they rotated
    # graphs are keyed by (shape, slot, bucket): "a" and "b" (same shape) replayed the same captured graphs
    graphs = [g for k, g in multi.memory.graphs.items() if k[0] not in ("pool", "warm", "captures")]
    assert any({"a", "b"} <= g.users for g in graphs)
    # each captured once, counted in the pool's counters (bench serve's graph_captures); per shape, the first
    # capture of a bucket is the one with warm-up forwards
    c = multi.snapshot()["counters"]
    assert c["graph_captures"] == len(graphs) and c["graph_capture_s"] > 0
    assert 0 < c["graph_first_captures"] <= c["graph_captures"]
    assert c["graph_output_bytes"] == sum(g.logits.numel() * g.logits.element_size() for g in graphs)
    assert c["graph_evictions"] == 0  # (under TOKENPOOL_GRAPH_CAP's default)
    warm = [w for k, w in multi.memory.graphs.items() if k[0] == "warm"]
    # one first capture per (shape, bucket) warmed: decode buckets and the prefills' row graphs ("attention": kernels)
    assert c["graph_first_captures"] == sum(len([b for b in w if b != "attention"]) for w in warm)
    if precapture:  # every decode bucket of both shapes captured (and warmed) at their first load
        buckets = next(iter(multi.engines.values())).runner.buckets
        assert len(warm) == 2 and all(set(buckets) <= w for w in warm)
    assert multi.memory.stats.forced_evictions == 0
    if pipeline:  # it did pipeline: some steps were launched before the one in flight was read
        assert multi.timing["pipelined_steps"] > 0, multi.timing
        timed = [x for k, x in seen if k == "dev"]
        assert timed and all(t is not None and 0 < t < 0.1 for t in timed)
        pairs = [(a[1], b[1]) for a, b in zip(seen, seen[1:]) if a[0] == "dev" and b[0] == "learned"]
        assert pairs and all(learned >= d for d, learned in pairs)  # the device's time is the floor
    multi.close()


@pytest.mark.parametrize("budget_mib,deep", [(16, False), (4, False), (16, True), (4, True)])
def test_co_stepped_models_equal_alone(make_varied, host_cache, monkeypatch, budget_mib, deep):
    """TOKENPOOL_CO_STEP on CUDA: two models' decode steps in flight at once on two streams, each lane with graphs
    and a graph memory pool of its own -- "a" and "b" share a shape, so one pool for both would alias their
    intermediates. Token by token (every plan another model's): the tokens are each model's alone, steps did run
    beside each other, lane 1 captured its own graphs. 16 MiB: all resident; 4 MiB: they rotate through one slot
    (prefetches beside steps in flight). `deep` (TOKENPOOL_CO_STEP_DEEP; "a" and "b" alone, alternating): both
    models' steps stay in flight and each model's next step is queued on its stream, fed by its step before's sampled
    ids, before the older is read."""
    from gpu_pool.arena import MiB
    from token_scheduler import multi_engine

    monkeypatch.setattr(multi_engine, "PIPELINE", True)
    monkeypatch.setattr(multi_engine, "PLAN_AHEAD", True)
    monkeypatch.setattr(multi_engine, "CO_STEP", True)
    monkeypatch.setattr(multi_engine, "CO_STEP_DEEP", deep)
    paths = {"a": make_varied("qwen2"), "b": make_varied("qwen2", seed=1), "c": make_varied("llama")}
    if deep:
        del paths["c"]
    alone = {n: _alone(p) for n, p in paths.items()}
    multi = _pooled(paths, budget_mib * MiB, host_cache)
    _run_equals_alone(multi, paths, alone)
    c = multi.snapshot()["counters"]
    if budget_mib == 16:
        # (deep: a co-step starts each pair of steps in flight, then each model continues its own)
        assert c["co_steps"] > (0 if deep else 10), c
        assert (c["co_deep_kept"] > 10) == deep, c
        lane1 = [k for k in multi.memory.graphs if len(k) == 3 and isinstance(k[0], tuple) and k[0][:2] == ("lane", 1)]
        assert lane1
        assert ("pool", lane1[0][0]) in multi.memory.graphs
    assert multi.memory.stats.forced_evictions == 0
    multi.close()


def test_device_view_is_the_pinned_memory_itself(make_varied):
    """`gpu_pool.pinned.device_view`: a CUDA tensor at the pinned tensor's own address (no copy); a kernel reads
    the host bytes as they are when it runs (written after the view was made) and its writes land in host memory;
    and a decode graph uploads its inputs through such views (the step's H2D input copies avoided: session 30)."""
    import torch

    from gpu_pool.pinned import device_view, kernel_copy

    host = torch.zeros(300, dtype=torch.long, pin_memory=True)
    view = device_view(host)
    assert view.is_cuda and view.data_ptr() == host.data_ptr() and view.shape == host.shape
    host.copy_(torch.arange(300))  # after the view was made
    on_dev = torch.empty(300, dtype=torch.long, device="cuda")
    kernel_copy(on_dev, view)
    assert on_dev.tolist() == list(range(300))
    kernel_copy(view[:10], on_dev[100:110] * 2)
    torch.cuda.synchronize()
    assert host[:10].tolist() == [2 * i for i in range(100, 110)]
    from token_scheduler.runner import _DecodeGraph

    eng = LLMEngine(EngineConfig(model=str(make_varied("qwen2")), device="cuda", dtype="bf16", max_num_seqs=4,
                                 kv_cache_memory_gb=0.05))
    graphs = [g for g in eng.runner.graphs.values() if isinstance(g, _DecodeGraph)]
    assert graphs and all(g.views is not None for g in graphs)
