"""Swap-in / release / prefetch on CPU (same API as CUDA, synchronous), and handle bookkeeping."""

from __future__ import annotations

import uuid

import pytest
import torch

from gpu_pool.arena import Arena, ArenaFull, ArenaTooSmall
from gpu_pool.pinned import default_shm_dir
from model_swapper.host_cache import HostCacheFull, HostModelCache
from model_swapper.layout import ModelLayout
from model_swapper.model_config import ModelConfig
from model_swapper.prefetch import Prefetcher
from model_swapper.swapper import SwapHandle, Swapper, split
from model_swapper.weights import load_weights


@pytest.fixture
def cache():
    ns = f"test-{uuid.uuid4().hex[:10]}"
    c = HostModelCache("256MiB", namespace=ns)
    yield c
    c.close()
    assert not (default_shm_dir() / f"tokenpool-{ns}").exists()


def test_swap_in_gives_engine_weights_as_arena_views(make_tiny, cache):
    d = make_tiny("qwen3")
    host = cache.get(d)
    arena = Arena(8 << 20, "cpu", align=4096)
    sw = Swapper(arena)
    rm = sw.swap_in(host)
    rm.ready.wait()
    rm.ready.synchronize()
    assert rm.ready.done()
    ref = load_weights(d, ModelConfig.from_pretrained(d))
    lo, hi = arena.buffer.data_ptr(), arena.buffer.data_ptr() + arena.capacity
    for k, t in ref.items():
        assert torch.equal(rm.weights[k], t), k
        assert lo <= rm.weights[k].data_ptr() < hi  # a view of the arena, not a new allocation
    assert host.pins == 0  # CPU copies are done at return: nothing left pinned
    slot = sw.release(rm)
    assert arena.alloc.free_bytes == arena.capacity and rm.weights == {}
    assert slot.nbytes >= host.nbytes


def test_same_shape_models_reuse_a_slot(make_tiny, cache):
    a, b = cache.get(make_tiny("llama", seed=0)), cache.get(make_tiny("llama", seed=1))
    assert a.layout.signature == b.layout.signature
    arena = Arena(4 << 20, "cpu", align=4096)
    sw = Swapper(arena)
    ra = sw.swap_in(a)
    ptrs = {k: t.data_ptr() for k, t in ra.weights.items()}
    slot = sw.release(ra, free_slot=False)
    rb = sw.swap_in(b, slot=slot)
    assert rb.slot_id == ra.slot_id and {k: t.data_ptr() for k, t in rb.weights.items()} == ptrs
    assert torch.equal(rb.weights["l0.qkv"], b.weights()["l0.qkv"])
    assert not torch.equal(rb.weights["l0.qkv"], a.weights()["l0.qkv"])


def test_arena_shortage_is_raised_not_handled(make_tiny, cache):
    host = cache.get(make_tiny("qwen2"))
    with pytest.raises(ArenaTooSmall):
        Swapper(Arena(host.nbytes // 2, "cpu", align=256)).swap_in(host)
    arena = Arena(host.nbytes + host.nbytes // 2, "cpu", align=256)
    sw = Swapper(arena)
    sw.swap_in(host)
    with pytest.raises(ArenaFull):
        sw.swap_in(host)


class FakeEvent:
    def __init__(self, name, fired=True):
        self.name, self.fired = name, fired

    def query(self):
        return self.fired

    def synchronize(self):
        self.fired = True


class FakeStream:
    def __init__(self):
        self.waited = []

    def wait_event(self, ev):
        self.waited.append(ev.name)


def test_per_layer_readiness_picks_the_covering_piece(make_tiny):
    cfg = ModelConfig.from_pretrained(make_tiny("qwen2"))
    lay = ModelLayout.build(cfg)
    ends = split(lay.nbytes, 4, align=256)
    h = SwapHandle(lay, ends, [FakeEvent(f"e{i}") for i in range(len(ends))])
    s = FakeStream()
    h.wait_layer(-1, s)  # the embedding lands in the first piece
    h.wait_layer(cfg.num_layers - 1, s)
    h.wait(s)
    first_needed = next(i for i, e in enumerate(ends) if e >= lay.layer_end(-1))
    last_layer = next(i for i, e in enumerate(ends) if e >= lay.layer_end(cfg.num_layers - 1))
    assert s.waited == [f"e{first_needed}", f"e{last_layer}", f"e{len(ends) - 1}"]
    assert lay.layer_end(-1) < lay.layer_end(0) < lay.layer_end(cfg.num_layers - 1) < lay.nbytes


def test_split_covers_everything_on_aligned_cuts():
    for n, p in [(1, 4), (10 << 20, 4), ((10 << 20) + 3, 3), (64 << 20, 16)]:
        ends = split(n, p)
        assert ends[-1] == n and ends == sorted(set(ends)) and len(ends) <= p
        assert all(e % (2 << 20) == 0 for e in ends[:-1])


def test_prefetch_windowed_then_take(make_tiny, cache):
    host = cache.get(make_tiny("qwen2"))
    arena = Arena(4 << 20, "cpu", align=256)
    sw = Swapper(arena)
    pf = Prefetcher(sw, piece=64 << 10, window=64 << 10)
    p = pf.prefetch(host)
    assert p.enqueued == 64 << 10 < host.nbytes  # one window's worth only
    assert host.pins == 1  # protected while prefetching
    with pytest.raises(HostCacheFull):
        cache.evict(host.key)
    pf.poll()
    assert p.enqueued == 128 << 10
    assert pf.prefetch(host) is p  # idempotent per model
    rm = pf.take(p)  # enqueues the rest
    assert p.enqueued == host.nbytes and rm.ready.done() and host.pins == 0
    for k, t in host.weights().items():
        assert torch.equal(rm.weights[k], t), k
    assert not pf.active


def test_prefetch_cancel_frees_slot_and_unpins(make_tiny, cache):
    host = cache.get(make_tiny("qwen2"))
    arena = Arena(4 << 20, "cpu", align=256)
    sw = Swapper(arena)
    pf = Prefetcher(sw, piece=64 << 10, window=64 << 10)
    p = pf.prefetch(host)
    pf.cancel(p)
    assert p.state == "cancelled" and arena.alloc.free_bytes == arena.capacity and host.pins == 0
    assert p.enqueued < host.nbytes  # the rest was never copied
    with pytest.raises(RuntimeError, match="cancelled"):
        pf.take(p)
    with pytest.raises(RuntimeError, match="never enqueued"):
        p.handle.wait()
    pf.poll()  # nothing left to do
    cache.evict(host.key)  # evictable again
    # window=None: everything is enqueued at once
    host = cache.get(make_tiny("qwen2"))
    p = Prefetcher(sw, window=None).prefetch(host)
    assert p.enqueued == host.nbytes


def test_prefetch_poll_queries_only_past_the_landed_prefix(make_tiny, cache):
    """poll() once per engine step must stay cheap: pieces known to have landed are not queried again."""
    host = cache.get(make_tiny("qwen2"))
    sw = Swapper(Arena(4 << 20, "cpu", align=256))
    pf = Prefetcher(sw, piece=64 << 10, window=128 << 10)
    p = pf.prefetch(host)
    assert p.enqueued == 128 << 10

    class Ev:  # stands in for a CUDA event (on CPU the copies are synchronous and events are None)
        def __init__(self, fired):
            self.fired, self.queries = fired, 0

        def query(self):
            self.queries += 1
            return self.fired

    evs = p.handle.events = [Ev(True), Ev(False)]
    pf.poll()  # piece 0 landed, piece 1 in flight: the window admits one more piece
    assert p.landed_pieces == 1 and p.enqueued == 192 << 10
    evs[1].fired = True
    pf.poll()
    assert evs[0].queries == 1 and p.landed_pieces >= 2
    rm = pf.take(p)
    assert p.enqueued == host.nbytes and rm.ready.done()


def test_a_safetensors_file_cut_short_or_not_one_is_named(tmp_path):
    """A model file cut short (a copy that did not finish) failed its load with "JSONDecodeError: Expecting ','
    delimiter" or a struct error; it is a ValueError naming the file and what is wrong."""
    from safetensors.torch import save_file

    from model_swapper.loader import read_header

    f = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(64, 64), "b": torch.ones(8)}, str(f))
    whole = f.read_bytes()
    assert set(read_header(f)) == {"a", "b"}
    import struct

    for data, said in ((whole[:-10], "cut short: tensor 'b'"), (whole[:40], "not a safetensors file"),
                       (whole[:5], "not a safetensors file"), (b"", "not a safetensors file"),
                       (struct.pack("<Q", 12) + b'{"a": [1, 2 ', "header does not parse")):
        f.write_bytes(data)
        with pytest.raises(ValueError, match=said) as ei:
            read_header(f)
        assert str(f) in str(ei.value)
    f.write_bytes(b"<html>not found</html>" * 10)
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_header(f)
