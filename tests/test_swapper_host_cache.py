"""Pinned host model cache: exact bytes, LRU and budget, one copy shared across processes, no leaks."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import uuid

import pytest
import torch

from gpu_pool.pinned import default_shm_dir
from model_swapper.host_cache import HostCacheFull, HostCacheTooSmall, HostModelCache
from model_swapper.layout import ModelLayout
from model_swapper.model_config import ModelConfig
from model_swapper.weights import load_weights, weight_specs


@pytest.fixture
def ns():
    """A fresh cache namespace; at teardown its /dev/shm directory must be gone."""
    name = f"test-{uuid.uuid4().hex[:10]}"
    yield name
    root = default_shm_dir() / f"tokenpool-{name}"
    assert not root.exists(), f"leaked {root}: {list(root.iterdir())}"


def nbytes_of(model_dir, dtype=None) -> int:
    cfg = ModelConfig.from_pretrained(model_dir)
    return ModelLayout.build(cfg, dtype).nbytes


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_load_equals_safetensors(make_tiny, ns, arch, dtype):
    d = make_tiny(arch)
    cfg = ModelConfig.from_pretrained(d)
    cache = HostModelCache("64MiB", namespace=ns)
    seen = []
    m = cache.get(d, dtype, progress=lambda done, total: seen.append((done, total)))
    assert m.loaded_here and seen and seen[-1][0] == seen[-1][1]
    ref = load_weights(d, cfg, dtype=dtype or cfg.torch_dtype)  # transformers-independent reference
    w = m.weights()
    assert list(w) == [s.name for s in weight_specs(cfg)]
    for k in ref:
        assert torch.equal(w[k], ref[k]), k
    del w
    assert cache.get(d, dtype) is m  # attached: same object, nothing reloaded
    cache.close()


def test_load_stats(make_tiny, ns):
    d = make_tiny("qwen2")
    cache = HostModelCache("64MiB", namespace=ns, pin=False, threads=3)
    m = cache.get(d)
    s = m.load_stats
    assert s is not None and s.nbytes == m.nbytes and s.threads == 3 and not s.pinned
    assert s.pin_s == 0 and s.pin_wait_s < 0.05
    parts = s.create_s + s.fill_s + s.pin_wait_s
    assert min(s.create_s, s.fill_s) >= 0 and abs(s.total_s - parts) < 1e-3
    assert set(s.as_dict()) >= {"create_s", "fill_s", "pin_s", "pin_wait_s", "total_s", "gbs", "shm_huge"}
    assert s.shm_huge  # /dev/shm is a tmpfs: its huge= policy is known ("never" unless mounted otherwise)
    # the fill made every page (no populate pass): the segment's blocks cover the model
    assert os.stat(cache.index.seg_path(m.key)).st_blocks * 512 >= m.nbytes
    cache.release(m)
    assert cache.get(d).load_stats is None  # attached, not loaded
    cache.close()


def test_failed_fill_leaves_nothing_in_shm(make_tiny, ns, tmp_path, monkeypatch):
    """A read that fails mid-fill (a checkpoint cut short after its header was read) raises, and no segment or entry
    is left; one cut short before is refused by its header check, naming the file, with nothing left either."""
    import shutil

    import model_swapper.loader as loader

    d = tmp_path / "cut"
    shutil.copytree(make_tiny("qwen2"), d)
    st = d / "model.safetensors"
    size = st.stat().st_size
    cache = HostModelCache("64MiB", namespace=ns)
    try:
        os.truncate(st, size - (64 << 10))  # the last tensors' bytes are missing
        with pytest.raises(ValueError, match="cut short"):
            cache.get(d)
        assert cache.entries() == {} and not list(cache.index.root.glob("*.seg"))
        shutil.copy(make_tiny("qwen2") / "model.safetensors", st)
        real = loader.read_header

        def header_then_cut(path):  # the file shrinks between the plan and the reads
            out = real(path)
            os.truncate(path, size - (64 << 10))
            return out

        monkeypatch.setattr(loader, "read_header", header_then_cut)
        with pytest.raises(OSError, match="unexpected end of file"):
            cache.get(d)
        assert cache.entries() == {} and not list(cache.index.root.glob("*.seg"))
    finally:
        cache.close()


@pytest.mark.gpu
def test_load_pins_beside_the_reads(make_tiny, ns):
    d = make_tiny("qwen2")
    cache = HostModelCache("64MiB", namespace=ns)
    m = cache.get(d, torch.bfloat16)
    assert m.region.pinned and m.buffer.is_pinned() and m.load_stats.pinned and m.load_stats.pin_s > 0
    ref = load_weights(d, m.cfg, dtype=torch.bfloat16)
    w = m.weights()
    assert all(torch.equal(w[k].cuda().cpu(), ref[k]) for k in ref)
    del w
    cache.close()


def test_sharded_checkpoint(tmp_path, ns):
    from controller.model_factory import make_model

    d = make_model(arch="llama", size="tiny", out=tmp_path / "sharded", dtype="fp32", device="cpu",
                   progress=False, max_shard_bytes=200_000)
    assert (d / "model.safetensors.index.json").exists()
    cfg = ModelConfig.from_pretrained(d)
    cache = HostModelCache("64MiB", namespace=ns)
    w = cache.get(d).weights()
    ref = load_weights(d, cfg)
    assert all(torch.equal(w[k], ref[k]) for k in ref)
    del w
    cache.close()


def test_lru_eviction_and_budget(make_tiny, ns):
    a, b, c = (make_tiny("qwen2", seed=s) for s in (0, 1, 2))
    n = nbytes_of(a)
    cache = HostModelCache(int(2.5 * n), namespace=ns)
    ma = cache.get(a)
    cache.get(b)
    cache.get(a)  # a is now more recent than b
    cache.get(c)  # over budget: b (least recently used) goes
    keys = set(cache.entries())
    assert keys == {ma.key, cache.key_for(c, ma.layout.dtype)}
    assert cache.used_bytes() <= cache.budget
    assert not cache.index.seg_path(cache.key_for(b, ma.layout.dtype)).exists()
    # a pinned model (a swap in flight) is never evicted: with a and c both busy, b cannot come in
    for m in cache.models.values():
        cache.pin_model(m)
    with pytest.raises(HostCacheFull, match="in use"):
        cache.get(b)
    for m in list(cache.models.values()):
        cache.unpin_model(m)
    cache.get(b)
    cache.close()


def test_model_that_can_never_fit(make_tiny, ns):
    d = make_tiny("qwen2")
    cache = HostModelCache(nbytes_of(d) - 1, namespace=ns)
    with pytest.raises(HostCacheTooSmall, match="can never fit") as ei:
        cache.get(d)
    assert ei.value.needed == nbytes_of(d)
    cache.close()


def test_release_keeps_copy_close_unlinks(make_tiny, ns):
    d = make_tiny("qwen2")
    cache = HostModelCache("64MiB", namespace=ns)
    m = cache.get(d)
    seg = cache.index.seg_path(m.key)
    cache.release(m)
    assert seg.exists() and cache.entries()[m.key]["holders"] == []
    m2 = cache.get(d)  # attaches to the kept copy
    assert not m2.loaded_here
    cache.close()
    assert not seg.exists()


# -- several processes --------------------------------------------------------------------------------
def _child_attach(ns: str, model_dir: str, q) -> None:
    cache = HostModelCache("64MiB", namespace=ns)
    before = sorted(os.listdir(cache.index.root))
    used_before = cache.used_bytes()
    m = cache.get(model_dir)
    after = sorted(os.listdir(cache.index.root))
    maps = open("/proc/self/maps").read()
    q.put({"loaded_here": m.loaded_here, "files_same": before == after, "used_same": used_before == cache.used_bytes(),
           "sha": hashlib.sha256(m.buffer.numpy().tobytes()).hexdigest(), "mapped": str(cache.index.seg_path(m.key)) in maps,
           "holders": len(cache.entries()[m.key]["holders"])})
    cache.close()


def _child_slow_load(ns: str, model_dir: str, q_up, q_down, q_go) -> None:
    """Load, holding off until the parent waits for this load (`_waits_once`)."""
    import model_swapper.host_cache as hc

    real = hc.load_into_region

    def slow(*a, **k):
        q_go.get(timeout=60)
        return real(*a, **k)
    hc.load_into_region = slow
    cache = HostModelCache("64MiB", namespace=ns)
    m = cache.get(model_dir)
    q_up.put(m.loaded_here)
    q_down.get(timeout=120)  # hold the model until the parent is done
    cache.close()


def _child_paused_mid_fill(ns: str, model_dir: str, q_up, q_down, q_go) -> None:
    """Load, pausing after the first piece has landed (part of the segment written, the rest not yet made) until the
    parent waits for this load (`_waits_once`)."""
    import model_swapper.loader as ld

    real, calls = ld._pread_into, []

    def paused(*a, **k):
        real(*a, **k)
        if not calls:
            calls.append(1)
            q_up.put("mid-fill")
            q_go.get(timeout=60)
    ld._pread_into = paused
    cache = HostModelCache("64MiB", namespace=ns, threads=1)
    m = cache.get(model_dir)
    q_up.put(m.loaded_here)
    q_down.get(timeout=120)
    cache.close()


def _child_crash(ns: str, model_dir: str, mode: str) -> None:
    import model_swapper.host_cache as hc

    cache = HostModelCache("64MiB", namespace=ns)
    if mode == "mid-load":
        def die(*a, **k):
            os._exit(3)
        hc.load_into_region = die
    cache.get(model_dir)
    os._exit(0)  # no close(): a crashed engine


def _attached_in_child(ns: str, d) -> dict:
    """What another process sees when it attaches to the host copy of `d` (see _child_attach)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child_attach, args=(ns, str(d), q))
    p.start()
    r = q.get(timeout=120)
    p.join(60)
    assert p.exitcode == 0
    return r


def test_two_processes_share_one_copy(make_tiny, ns):
    d = make_tiny("qwen2")
    cache = HostModelCache("64MiB", namespace=ns)
    m = cache.get(d)
    r = _attached_in_child(ns, d)
    assert r["loaded_here"] is False and r["files_same"] and r["used_same"] and r["mapped"]
    assert r["holders"] == 2
    assert r["sha"] == hashlib.sha256(m.buffer.numpy().tobytes()).hexdigest()
    assert cache.entries()[m.key]["holders"] == [cache.me]  # the child's close() dropped its hold only
    cache.close()


def _waits_once(monkeypatch, q_go) -> list:
    """The first time this process's cache waits for another's load, it lets the paused loader go on: the wait is
    certain, and lasts no longer than the load. Returns the list of its waits."""
    import time

    import model_swapper.host_cache as hc

    waits: list[float] = []

    class Clock:  # host_cache's `time`
        monotonic, perf_counter = staticmethod(time.monotonic), staticmethod(time.perf_counter)

        @staticmethod
        def sleep(s: float) -> None:
            if not waits:
                q_go.put("go")
            waits.append(s)
            time.sleep(s)

    monkeypatch.setattr(hc, "time", Clock)
    return waits


def _attach_waits_for_the_loader(cache, d, p, q_up, q_down, waits) -> None:
    m = cache.get(d)  # waits for the child's load, then attaches
    assert waits and m.loaded_here is False and q_up.get(timeout=60) is True
    ref = load_weights(d, m.cfg)
    w = m.weights()
    assert all(torch.equal(w[k], ref[k]) for k in ref)
    del w
    q_down.put("done")
    p.join(60)
    assert p.exitcode == 0
    cache.close()


def test_second_process_waits_for_the_loader_instead_of_loading_twice(make_tiny, ns, monkeypatch):
    import time

    d = make_tiny("qwen2")
    ctx = mp.get_context("spawn")
    q_up, q_down, q_go = ctx.Queue(), ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_child_slow_load, args=(ns, str(d), q_up, q_down, q_go))
    p.start()
    cache = HostModelCache("64MiB", namespace=ns)
    deadline = time.monotonic() + 60
    while not cache.entries() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert next(iter(cache.entries().values()))["state"] == "loading"
    _attach_waits_for_the_loader(cache, d, p, q_up, q_down, _waits_once(monkeypatch, q_go))


def test_attach_during_the_fill_waits_for_every_byte(make_tiny, ns, monkeypatch):
    """Another process asking while the loader is mid-fill (some pages written, most not yet made) waits for
    the load to finish, then sees exactly the checkpoint's bytes."""
    d = make_tiny("qwen2")
    ctx = mp.get_context("spawn")
    q_up, q_down, q_go = ctx.Queue(), ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_child_paused_mid_fill, args=(ns, str(d), q_up, q_down, q_go))
    p.start()
    assert q_up.get(timeout=60) == "mid-fill"
    cache = HostModelCache("64MiB", namespace=ns)
    (key, e), = cache.entries().items()
    assert e["state"] == "loading" and 0 < os.stat(cache.index.seg_path(key)).st_blocks * 512 < e["nbytes"]
    _attach_waits_for_the_loader(cache, d, p, q_up, q_down, _waits_once(monkeypatch, q_go))


@pytest.mark.parametrize("mode", ["after-load", "mid-load"])
def test_crashed_process_leaves_nothing_behind(make_tiny, ns, mode):
    d = make_tiny("qwen2")
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_child_crash, args=(ns, str(d), mode))
    p.start()
    p.join(120)
    assert p.exitcode == (3 if mode == "mid-load" else 0)
    cache = HostModelCache("64MiB", namespace=ns)
    e = cache.entries()  # the dead process's holds (and a half-loaded segment) are pruned here
    assert all(not v["holders"] for v in e.values())
    if mode == "mid-load":
        assert e == {} and not list(cache.index.root.glob("*.seg"))
    m = cache.get(d)
    assert m.loaded_here == (mode == "mid-load")
    ref = load_weights(d, m.cfg)
    w = m.weights()
    assert all(torch.equal(w[k], ref[k]) for k in ref)
    del w
    cache.close()


def test_host_copy_in_parts_is_exact_shared_and_cleaned_up(make_tiny, ns, monkeypatch):
    """A host copy made of several shm files (what a big model gets) holds exactly the checkpoint's bytes,
    another process attaches to the same pages, and nothing is left in /dev/shm after close."""
    import model_swapper.host_cache as hc
    from gpu_pool import pinned

    monkeypatch.setattr(pinned, "PART_ALIGN", 64 << 10)  # a tiny model in several parts
    monkeypatch.setattr(hc, "PART_BYTES", 256 << 10)
    d = make_tiny("qwen2")
    cfg = ModelConfig.from_pretrained(d)
    cache = HostModelCache("64MiB", namespace=ns, pin=False)
    m = cache.get(d)
    seg = cache.index.seg_path(m.key)
    assert m.loaded_here and m.region.parts > 1 and seg.is_dir() and len(list(seg.iterdir())) == m.region.parts
    ref = load_weights(d, cfg, dtype=cfg.torch_dtype)
    w = m.weights()
    for k in ref:
        assert torch.equal(w[k], ref[k]), k
    del w
    r = _attached_in_child(ns, d)
    assert r["loaded_here"] is False and r["files_same"] and r["mapped"] and r["holders"] == 2
    assert r["sha"] == hashlib.sha256(m.buffer.numpy().tobytes()).hexdigest()
    cache.close()
    assert not seg.exists()
