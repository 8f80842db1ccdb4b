"""CUDA checks for the swap path (skipped without CUDA by conftest): no allocator traffic across swaps,
exact weights and KV on the device, async readiness, and bandwidth figures printed for the log."""

from __future__ import annotations

import random
import time
import uuid

import pytest
import torch

from gpu_pool.arena import Arena
from gpu_pool.pinned import PinnedRegion
from model_swapper.host_cache import HostModelCache
from model_swapper.kv_swap import HostKVPool, KVSwapper
from model_swapper.prefetch import Prefetcher
from model_swapper.swapper import Swapper

pytestmark = pytest.mark.gpu


@pytest.fixture
def cache():
    c = HostModelCache("4GiB", namespace=f"gputest-{uuid.uuid4().hex[:8]}")
    yield c
    c.close()


@pytest.mark.gpu
def test_host_copy_is_page_locked(make_tiny, cache):
    host = cache.get(make_tiny("qwen2"), torch.bfloat16)
    assert host.region.pinned and host.buffer.is_pinned()


@pytest.mark.gpu
def test_memory_reserved_unchanged_across_100_swaps(make_tiny, cache):
    hosts = [cache.get(make_tiny("qwen2", seed=s), torch.bfloat16) for s in (0, 1)]
    arena = Arena(64 << 20, "cuda")
    sw = Swapper(arena)
    rm = sw.swap_in(hosts[0])  # warm-up: stream and events exist
    rm.ready.synchronize()
    slot = sw.release(rm, free_slot=False)
    torch.cuda.synchronize()
    reserved, allocated = torch.cuda.memory_reserved(), torch.cuda.memory_allocated()
    for i in range(100):
        h = hosts[i % 2]
        if i % 3 == 0:  # same slot (CUDA-graph reuse path)
            rm = sw.swap_in(h, slot=slot)
            rm.ready.wait()
            slot = sw.release(rm, free_slot=False)
        else:  # a fresh slot from the arena
            rm = sw.swap_in(h)
            rm.ready.wait()
            sw.release(rm)
    torch.cuda.synchronize()
    assert torch.cuda.memory_reserved() == reserved
    assert torch.cuda.memory_allocated() == allocated


@pytest.mark.gpu
def test_swap_in_equals_host_copy(make_tiny, cache):
    host = cache.get(make_tiny("llama"), torch.bfloat16)
    sw = Swapper(Arena(64 << 20, "cuda"), chunks=4)
    rm = sw.swap_in(host)
    compute = torch.cuda.Stream()
    with torch.cuda.stream(compute):
        rm.ready.wait_layer(0)  # GPU-side wait, no CPU block
        rm.ready.wait()
        got = {k: v.clone() for k, v in rm.weights.items()}
    compute.synchronize()
    for k, v in host.weights().items():
        assert torch.equal(got[k].cpu(), v), k
    sw.synchronize()
    assert host.pins == 0


@pytest.mark.gpu
def test_prefetch_then_take(make_tiny, cache):
    host = cache.get(make_tiny("qwen3"), torch.bfloat16)
    sw = Swapper(Arena(64 << 20, "cuda"))
    pf = Prefetcher(sw, piece=64 << 10, window=128 << 10)
    p = pf.prefetch(host)
    x = torch.randn(1024, 1024, device="cuda")
    for _ in range(5):
        x = x @ x.T / 1024
        pf.poll()
    rm = pf.take(p)
    rm.ready.wait()
    for k, v in host.weights().items():
        assert torch.equal(rm.weights[k].cpu(), v), k


@pytest.mark.gpu
@pytest.mark.parametrize("direct_min_bytes", [1 << 40, 0])
def test_kv_round_trip_cuda(direct_min_bytes):
    block = (4, 2, 16, 2, 64)
    kv = torch.randn(256, *block, device="cuda").to(torch.bfloat16)
    pool = HostKVPool.like(kv, 200)
    assert pool.region.pinned
    sw = KVSwapper(kv, pool, staging_blocks=32, direct_min_bytes=direct_min_bytes)
    rng = random.Random(0)
    for n in (1, 64, 150):
        src = rng.sample(range(256), n)
        want = kv[src].clone()
        ids, h = sw.swap_out(src)
        h.wait()  # compute may overwrite the blocks after this point in stream order
        kv[src] = 0
        dst = rng.sample(range(256), n)
        sw.swap_in(ids, dst).wait()
        assert torch.equal(kv[dst].view(torch.int16), want.view(torch.int16))
    pool.close()


@pytest.mark.gpu
def test_bandwidth_printed():
    n = 1 << 30
    host = PinnedRegion.anonymous(n)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    for label, chunks in (("1 copy", 1), ("4 copies", 4), ("64 MiB loop", 16)):
        step = n // chunks
        dev.copy_(host.tensor, non_blocking=True)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(chunks):
            dev[i * step:(i + 1) * step].copy_(host.tensor[i * step:(i + 1) * step], non_blocking=True)
        torch.cuda.synchronize()
        print(f"pinned H2D {label}: {n / (time.perf_counter() - t) / 1e9:.1f} GB/s")
    t = time.perf_counter()
    host.tensor.copy_(dev, non_blocking=True)
    torch.cuda.synchronize()
    print(f"pinned D2H 1 copy: {n / (time.perf_counter() - t) / 1e9:.1f} GB/s")
    host.close()
