"""Automatic prefix caching (vLLM's APC): the allocator's refcounted prefix cache (hits, eviction order, views of one
pool kept apart), and engines that start requests on cached KV blocks -- a shared system prompt, a chat's earlier
turns, an exact repeat, cache salts, LoRA adapters, prompt logprobs, chunked prefill, KV pressure with swap and
recompute, and two models sharing one pooled KV region -- giving exactly the greedy tokens of an engine without the
cache (and of HF transformers), with hits counted in whole blocks and no block leaked."""

from __future__ import annotations

import random
import uuid

import pytest
import torch

from controller.model_factory import make_lora, merge_lora
from token_scheduler.block_manager import BlockAllocator, NoFreeBlocks, block_hash
from token_scheduler.engine import EngineConfig, LLMEngine
from token_scheduler.request import SamplingParams

BS = 16  # the engines' block size (EngineConfig's default)
VOCAB = 4000  # the tiny models' vocabulary (the project tokenizer's ids)


# -- helpers ----------------------------------------------------------------------------------------------------
def _greedy(n: int = 8, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw)


def _toks(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(n)]


def _engine(d, cache: bool = True, **kw) -> LLMEngine:
    kw.setdefault("num_kv_blocks", 64)
    return LLMEngine(EngineConfig(model=str(d), device="cpu", dtype="fp32", enable_prefix_caching=cache, **kw))


def _drain(eng: LLMEngine, plp: dict | None = None) -> dict:
    """Step until nothing is left; final outputs by id (`plp`: filled with the prompt logprobs an output carried)."""
    done = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.prompt_logprobs is not None and plp is not None:
                plp[o.request_id] = o.prompt_logprobs
            if o.finished:
                done[o.request_id] = o
    return done


def _run(eng: LLMEngine, reqs: dict[str, tuple[list[int], SamplingParams]], plp: dict | None = None) -> dict:
    """Add `reqs` at once and step until they all finish; their final outputs by id."""
    for rid, (ids, sp) in reqs.items():
        eng.add_request(rid, ids, sp)
    done = _drain(eng, plp)
    assert set(done) == set(reqs)
    return done


def _staged(eng: LLMEngine, jobs: list[tuple[int, str, list[int], SamplingParams]]) -> dict:
    """jobs: (arrival step, id, prompt, params): each added before that step; final outputs by id."""
    done, step, pending = {}, 0, sorted(jobs, key=lambda j: j[0])
    while pending or eng.has_unfinished_requests():
        while pending and pending[0][0] <= step:
            _, rid, ids, sp = pending.pop(0)
            eng.add_request(rid, ids, sp)
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
        step += 1
        assert step < 5000, "engine made no progress"
    assert set(done) == {j[1] for j in jobs}
    return done


def _tokens(done: dict) -> dict[str, list[int]]:
    return {rid: o.outputs[0].token_ids for rid, o in done.items()}


def _no_leak(eng: LLMEngine) -> None:
    kv = eng.scheduler.kv
    assert kv.num_used == 0 and kv.num_free == kv.num_blocks and kv.num_held == 0
    assert eng.stats()["kv_blocks_used"] == 0
    if eng.scheduler.host_kv is not None:
        assert eng.scheduler.host_kv.num_used == 0


def _hits(n_tokens: int, n_cached_tokens: int) -> int:
    """Tokens a start on `n_cached_tokens` of cached KV takes: whole blocks, none holding the prompt's last token."""
    return min(n_cached_tokens // BS, (n_tokens - 1) // BS) * BS


def _hf(d):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()


def _hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def models(make_varied) -> dict:
    return {a: make_varied(a) for a in ("qwen2", "llama")}


# -- 1. BlockAllocator -----------------------------------------------------------------------------------------
def _hashes(n: int, extra: bytes = b"") -> list[bytes]:
    hs, parent = [], b""
    for i in range(n):
        parent = block_hash(parent, [i, i + 1], extra)
        hs.append(parent)
    return hs


def test_block_hash_covers_parent_tokens_and_extra():
    h = block_hash(b"", [1, 2, 3])
    assert h == block_hash(b"", [1, 2, 3]) and len(h) == 16
    assert h != block_hash(b"", [1, 2, 4])
    assert h != block_hash(b"", [3, 2, 1])
    assert h != block_hash(b"", [1, 2, 3], b"lora\0")
    assert block_hash(b"", [1, 2, 3], b"a\0") != block_hash(b"", [1, 2, 3], b"\0a")
    assert block_hash(h, [5, 6]) != block_hash(b"", [5, 6])
    assert block_hash(h, [5, 6]) != block_hash(block_hash(b"", [1, 2, 9]), [5, 6])
    assert block_hash(b"", [2**40]) != block_hash(b"", [0])  # ids are not truncated


def test_register_cached_prefix_take_and_refcounts():
    a = BlockAllocator(6, 2)
    b0, b1, b2 = a.allocate(3)
    h = _hashes(3)
    assert a.cached_prefix(h) == []
    a.register(b0, h[0])
    a.register(b1, h[1])
    assert a.cached_prefix(h) == [(b0, False), (b1, False)]  # the longest run from the first; both held
    a.register(b2, h[0])  # a second block of a hash already cached: the first stays the one found
    assert a.cached_prefix(h[:1]) == [(b0, False)]
    assert (a.num_used, a.num_free, a.num_cached, a.num_held) == (3, 3, 0, 3)

    a.take_cached([b0, b1])  # a second holder of each: nothing more is drawn from the pool
    assert (a.num_used, a.num_free, a.num_cached, a.num_held) == (3, 3, 0, 3)
    a.free([b0, b1, b2])  # the first holder lets go: the others still hold b0, b1; b2 was never cached
    assert (a.num_used, a.num_free, a.num_cached, a.num_held) == (2, 4, 0, 2)
    assert a.cached_prefix(h) == [(b0, False), (b1, False)]
    a.free([b1])
    assert a.cached_prefix(h) == [(b0, False), (b1, True)]  # b1 now held by none: evictable
    assert (a.num_used, a.num_free, a.num_cached, a.num_held) == (1, 5, 1, 1)
    a.free([b0])
    assert a.cached_prefix(h) == [(b0, True), (b1, True)]
    assert (a.num_used, a.num_free, a.num_cached, a.num_held) == (0, 6, 2, 0)
    with pytest.raises(ValueError, match="double free"):
        a.free([b0])  # evictable is not held: freeing again is an error
    with pytest.raises(ValueError, match="double free"):
        a.free([b2])

    a.take_cached([b0, b1])  # revived: held again, no longer free
    assert (a.num_used, a.num_free, a.num_cached, a.num_held) == (2, 4, 0, 2)
    assert a.cached_prefix(h) == [(b0, False), (b1, False)]
    a.take_cached([b0])
    a.free([b0, b1])
    assert (a.num_used, a.num_free, a.num_cached, a.num_held) == (1, 5, 1, 1)
    a.free([b0])
    assert (a.num_used, a.num_free, a.num_cached, a.num_held) == (0, 6, 2, 0)


def test_allocate_takes_plain_blocks_first_then_least_recently_freed_cached():
    a = BlockAllocator(5, 4)
    blocks = a.allocate(5)
    assert a.num_free == 0 and not a.can_allocate(1)
    with pytest.raises(NoFreeBlocks):
        a.allocate(1)
    h = _hashes(4)
    for b, hb in zip(blocks, h):  # blocks[4] is not registered
        a.register(b, hb)
    for b in (blocks[2], blocks[0], blocks[4], blocks[3], blocks[1]):  # freed in this order
        a.free([b])
    assert (a.num_free, a.num_cached, a.num_used, a.num_held) == (5, 4, 0, 0)
    assert a.allocate(1) == [blocks[4]]  # the plain free block first
    assert a.num_cached == 4 and len(a.cached_prefix(h)) == 4
    assert a.allocate(1) == [blocks[2]]  # then the least recently freed cached one, its hash forgotten
    assert a.num_cached == 3
    assert a.cached_prefix(h) == [(blocks[0], True), (blocks[1], True)]  # the run stops at h[2]
    assert a.cached_prefix(h[2:3]) == [] and a.cached_prefix(h[3:]) == [(blocks[3], True)]
    a.take_cached([blocks[0]])  # revived: no longer the next to go
    assert a.allocate(2) == [blocks[3], blocks[1]]
    assert a.cached_prefix(h) == [(blocks[0], False)]
    assert (a.num_free, a.num_cached, a.num_used, a.num_held) == (0, 0, 5, 5)
    # a block handed out again is plain: freed, it goes back to the free list, not to the cache
    a.free([blocks[2]])
    assert (a.num_free, a.num_cached) == (1, 0)
    a.register(blocks[3], h[2])  # registered again under a hash whose block was evicted: found again
    assert a.cached_prefix(h) == [(blocks[0], False)]
    a.register(blocks[1], h[1])
    assert a.cached_prefix(h) == [(blocks[0], False), (blocks[1], False), (blocks[3], False)]


def test_views_of_one_pool_never_share_cached_blocks():
    pool = BlockAllocator(4, 1)
    a, b = pool.share(16), pool.share(16)
    assert len({pool.key, a.key, b.key}) == 3
    h = _hashes(2)
    (xa,) = a.allocate(1)
    a.register(xa, h[0])
    assert a.cached_prefix(h) == [(xa, False)] and b.cached_prefix(h) == []
    (xb,) = b.allocate(1)
    b.register(xb, h[0])  # the same hash in the other view: its own block
    assert b.cached_prefix(h) == [(xb, False)] and a.cached_prefix(h) == [(xa, False)]
    assert (a.num_held, b.num_held, pool.num_used) == (1, 1, 2)
    a.free([xa])
    assert (a.num_held, pool.num_used, pool.num_free, pool.num_cached, b.num_free) == (0, 1, 3, 1, 3)
    assert b.cached_prefix(h) == [(xb, False)]
    got = b.allocate(3)  # b draws the two plain blocks, then evicts a's cached one
    assert got[-1] == xa and b.num_held == 4
    assert a.cached_prefix(h) == [] and b.cached_prefix(h) == [(xb, False)]
    b.free(got + [xb])
    assert (b.num_held, pool.num_used, pool.num_free, pool.num_cached) == (0, 0, 4, 1)
    assert b.cached_prefix(h) == [(xb, True)] and a.cached_prefix(h) == []


# -- 2. LLMEngine: the same tokens as without the cache ----------------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_shared_system_prompt(models, arch):
    """A long system prompt shared by concurrent requests: the first computes it, the others (added while it runs)
    start on its blocks -- held by a running request -- and every request's greedy tokens are those of the engine
    without the cache and HF's."""
    d = models[arch]
    system = _toks(1, 3 * BS + 5)
    tails = [_toks(10 + i, n) for i, n in enumerate((3, 11, 1, 16, 7))]
    jobs = [(0 if i == 0 else 1, f"r{i}", system + t, _greedy(10)) for i, t in enumerate(tails)]
    ref = _tokens(_staged(_engine(d, cache=False), jobs))
    eng = _engine(d)
    done = _staged(eng, jobs)
    assert _tokens(done) == ref
    assert done["r0"].num_cached_tokens == 0
    for i, t in enumerate(tails[1:], 1):  # the system prompt's whole blocks
        assert done[f"r{i}"].num_cached_tokens == _hits(len(system) + len(t), len(system)) == 3 * BS
    st = eng.stats()
    assert st["prefix_cache_queries"] == sum(len(system) + len(t) for t in tails)
    assert st["prefix_cache_hits"] == 4 * 3 * BS
    _no_leak(eng)
    assert eng.scheduler.kv.num_cached > 0  # what they computed stays cached, free to evict
    hf = _hf(d)
    for i, t in enumerate(tails):
        assert ref[f"r{i}"] == _hf_greedy(hf, system + t, 10), i
    assert len({tuple(v) for v in ref.values()}) > 1  # the outputs vary: the test could tell prompts apart


@pytest.mark.parametrize("arch,n1,want", [("qwen2", 12, 48), ("llama", 12, 48), ("qwen2", 11, 32)])
def test_multi_turn_conversation_hits_earlier_turns(models, arch, n1, want):
    """Turn 2's prompt is turn 1's prompt, its answer and a new message: it starts on turn 1's blocks (whole blocks of
    computed KV -- turn 1's last token never was: with an answer of 11 tokens turn 1 ends on a block's last token, and
    that block is not cached), counted exactly in the request and the stats."""
    d = models[arch]
    p1 = _toks(2, 37)
    eng, ref = _engine(d), _engine(d, cache=False)
    o1 = _run(eng, {"t1": (p1, _greedy(n1))})["t1"]
    a1 = o1.outputs[0].token_ids
    assert a1 == _run(ref, {"t1": (p1, _greedy(n1))})["t1"].outputs[0].token_ids
    assert o1.num_cached_tokens == 0
    p2 = p1 + a1 + _toks(3, 5)  # turn 1 computed all of its 37 + n1 tokens but the last
    o2 = _run(eng, {"t2": (p2, _greedy(12))})["t2"]
    assert o2.num_cached_tokens == _hits(len(p2), len(p1) + len(a1) - 1) == want
    assert o2.outputs[0].token_ids == _run(ref, {"t2": (p2, _greedy(12))})["t2"].outputs[0].token_ids
    st = eng.stats()
    assert (st["prefix_cache_queries"], st["prefix_cache_hits"]) == (len(p1) + len(p2), want)
    assert ref.stats()["prefix_cache_hits"] == 0 and ref.scheduler.cache_queries == 0
    # turn 3, over a prompt of 63 or 64 tokens (a whole number of blocks): at most the blocks before its last token
    p3 = p2 + o2.outputs[0].token_ids[:10]
    o3 = _run(eng, {"t3": (p3, _greedy(6))})["t3"]
    assert o3.num_cached_tokens == _hits(len(p3), len(p2) + 11) == 48
    assert o3.outputs[0].token_ids == _run(ref, {"t3": (p3, _greedy(6))})["t3"].outputs[0].token_ids
    assert eng.stats()["prefix_cache_hits"] == want + 48
    _no_leak(eng)


def test_exact_repeat(models):
    """The same prompt again: every whole block but the one holding its last token comes from the cache (a prompt
    of exactly two blocks takes one); the tokens are the first run's."""
    d = models["qwen2"]
    eng = _engine(d)
    outs = {}
    for n, want in ((40, 32), (32, 16), (16, 0), (17, 16)):
        ids = _toks(100 + n, n)
        first = _run(eng, {f"a{n}": (ids, _greedy(9))})[f"a{n}"]
        again = _run(eng, {f"b{n}": (ids, _greedy(9))})[f"b{n}"]
        assert first.num_cached_tokens == 0 and again.num_cached_tokens == want == _hits(n, n), n
        assert again.outputs[0].token_ids == first.outputs[0].token_ids
        outs[n] = (ids, again.outputs[0].token_ids)
    _no_leak(eng)
    assert eng.stats()["prefix_cache_hits"] == 32 + 16 + 16
    hf = _hf(d)
    for ids, got in outs.values():
        assert got == _hf_greedy(hf, ids, 9)


def test_cache_salt_keeps_kv_apart(models):
    """Requests share cached KV only with requests of the same salt (no salt is a salt of its own)."""
    d = models["llama"]
    ids = _toks(4, 50)
    want = _run(_engine(d, cache=False), {"x": (ids, _greedy(8))})["x"].outputs[0].token_ids
    eng = _engine(d)
    got = {}
    for rid, salt, hits in (("a1", "a", 0), ("b1", "b", 0), ("n1", None, 0), ("a2", "a", 48), ("b2", "b", 48),
                            ("n2", None, 48)):
        o = _run(eng, {rid: (ids, _greedy(8, cache_salt=salt))})[rid]
        assert o.num_cached_tokens == hits, rid
        got[rid] = o.outputs[0].token_ids
    assert all(v == want for v in got.values())
    _no_leak(eng)
    assert eng.scheduler.kv.num_cached == 3 * 3  # each salt's three whole blocks (and no more)


@pytest.fixture(scope="module")
def lora(models, tmp_path_factory):
    """qwen2: two adapters of the model and HF on its weights merged with each."""
    d = models["qwen2"]
    root = tmp_path_factory.mktemp("apc-lora")
    dirs = {n: make_lora(d, root / n, rank=8, alpha=48.0, seed=s) for n, s in (("one", 1), ("two", 2))}
    return d, dirs, {n: _hf(merge_lora(d, a, root / f"merged-{n}")) for n, a in dirs.items()}


def test_lora_requests_never_take_the_base_models_blocks(lora):
    """The prompt under an adapter after the base model: no hit from the base's blocks (its KV differs), HF's merged
    tokens; the same adapter again hits its own blocks and still gives them; another adapter does not hit them."""
    d, dirs, hfs = lora
    eng = _engine(d, lora_modules={n: str(p) for n, p in dirs.items()})
    ids = _toks(5, 45)
    base = _run(eng, {"base": (ids, _greedy(8))})["base"]
    one = _run(eng, {"one": (ids, _greedy(8, lora="one"))})["one"]
    assert base.num_cached_tokens == 0 and one.num_cached_tokens == 0
    want = _hf_greedy(hfs["one"], ids, 8)
    assert one.outputs[0].token_ids == want != base.outputs[0].token_ids
    again = _run(eng, {"again": (ids, _greedy(8, lora="one"))})["again"]
    assert again.num_cached_tokens == 32 and again.outputs[0].token_ids == want
    two = _run(eng, {"two": (ids, _greedy(8, lora="two"))})["two"]
    assert two.num_cached_tokens == 0 and two.outputs[0].token_ids == _hf_greedy(hfs["two"], ids, 8)
    base2 = _run(eng, {"base2": (ids, _greedy(8))})["base2"]
    assert base2.num_cached_tokens == 32 and base2.outputs[0].token_ids == base.outputs[0].token_ids
    _no_leak(eng)


def test_lora_replaced_under_the_same_name_gets_no_stale_kv(lora):
    d, dirs, hfs = lora
    eng = _engine(d, lora_modules={"x": str(dirs["one"])})
    ids = _toks(6, 40)
    first = _run(eng, {"first": (ids, _greedy(8, lora="x"))})["first"]
    assert first.outputs[0].token_ids == _hf_greedy(hfs["one"], ids, 8)
    eng.remove_lora("x")
    eng.add_lora("x", dirs["two"])  # the name now means other weights
    second = _run(eng, {"second": (ids, _greedy(8, lora="x"))})["second"]
    assert second.outputs[0].token_ids == _hf_greedy(hfs["two"], ids, 8)
    assert second.num_cached_tokens == 0


def test_prompt_logprobs_requests_compute_their_whole_prompt(models):
    """A request asking for prompt logprobs takes no cached block (each prompt position must be computed) even when
    its prompt is all cached, and its prompt logprobs and tokens are those of the engine without the cache; its
    blocks are offered to later requests."""
    d = models["qwen2"]
    ids = _toks(7, 41)
    asks = _greedy(5, logprobs=1, prompt_logprobs=2)
    eng, ref = _engine(d), _engine(d, cache=False)
    _run(eng, {"warm": (ids, _greedy(5))})
    gp, wp = {}, {}
    got = _run(eng, {"plp": (ids, asks)}, gp)["plp"]
    want = _run(ref, {"plp": (ids, asks)}, wp)["plp"]
    assert got.num_cached_tokens == 0 and want.num_cached_tokens is None
    assert got.outputs[0].token_ids == want.outputs[0].token_ids
    gp, wp = gp["plp"], wp["plp"]
    assert len(gp) == len(wp) == len(ids) and gp[0] is None
    for g, w in zip(gp[1:], wp[1:]):
        assert set(g) == set(w)
        assert all(abs(g[t] - w[t]) <= 1e-5 for t in w)
    for g, w in zip(got.outputs[0].logprobs, want.outputs[0].logprobs):
        assert set(g) == set(w) and all(abs(g[t] - w[t]) <= 1e-5 for t in w)
    assert eng.stats()["prefix_cache_hits"] == 0
    after = _run(eng, {"after": (ids, _greedy(5))})["after"]
    assert after.num_cached_tokens == 32 and after.outputs[0].token_ids == want.outputs[0].token_ids
    _no_leak(eng)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_chunked_prefill_with_hits(models, arch):
    """A token budget of 16 a step: prompts start on cached blocks and compute the rest in chunks beside decodes."""
    d = models[arch]
    system = _toks(8, 4 * BS + 3)
    tails = [_toks(80 + i, n) for i, n in enumerate((20, 3, 37, 9))]
    jobs = [(0, "warm", system + _toks(90, 2), _greedy(4))]
    jobs += [(6 + 2 * i, f"c{i}", system + t, _greedy(7)) for i, t in enumerate(tails)]
    ref = _tokens(_staged(_engine(d, cache=False, max_num_batched_tokens=16), jobs))
    eng = _engine(d, max_num_batched_tokens=16)
    chunks = []
    orig = eng.runner.execute

    def spy(out, *a, **kw):
        chunks.extend((c.request.request_id, c.start, c.num_tokens) for c in out.chunks
                      if c.start < c.request.num_prompt_tokens)  # prefill chunks
        return orig(out, *a, **kw)

    eng.runner.execute = spy
    done = _staged(eng, jobs)
    assert _tokens(done) == ref
    for i, t in enumerate(tails):
        assert done[f"c{i}"].num_cached_tokens == 4 * BS
        mine = [c for c in chunks if c[0] == f"c{i}"]
        assert mine[0][1] == 4 * BS and sum(n for _, _, n in mine) == len(t) + 3  # from the first uncached token
    assert any(sum(c[0] == f"c{i}" for c in chunks) > 1 for i in range(len(tails)))  # some prompt was chunked
    assert max(n for *_, n in chunks) <= 16
    _no_leak(eng)


def _pressure_jobs() -> list:
    """Three families of prompts (two blocks of shared prefix each), arriving in waves, one family coming back once
    the others have pushed its blocks out."""
    fams = [_toks(20 + f, 2 * BS + 1) for f in range(3)]
    jobs, k = [], 0
    for step, f, tail, n in ((0, 0, 5, 14), (1, 0, 9, 20), (2, 1, 3, 18), (3, 0, 14, 9), (4, 1, 12, 22),
                             (5, 2, 7, 16), (6, 2, 2, 12), (7, 1, 18, 10), (30, 0, 6, 12), (31, 2, 4, 8),
                             (45, 0, 5, 14), (46, 1, 3, 11)):
        jobs.append((step, f"p{k}", fams[f] + _toks(200 + k, tail), _greedy(n)))
        k += 1
    return jobs


@pytest.mark.parametrize("arch,host_blocks,budget", [("qwen2", 64, 2048), ("llama", 0, 2048), ("qwen2", 64, 16),
                                                    ("llama", 0, 16)])
def test_kv_pressure_evicts_preempts_and_matches(models, arch, host_blocks, budget):
    """A pool of 8 blocks for a dozen requests: cached blocks are evicted to make room, requests are preempted (their
    KV swapped to the host, or dropped and recomputed without host room), some start on cached blocks -- and every
    request's tokens are those without the cache; afterwards no block is held."""
    d = models[arch]
    jobs = _pressure_jobs()
    kw = dict(num_kv_blocks=8, num_host_kv_blocks=host_blocks, max_num_batched_tokens=budget)
    ref_eng = _engine(d, cache=False, **kw)
    ref = _tokens(_staged(ref_eng, jobs))
    eng = _engine(d, **kw)
    kv, seen = eng.scheduler.kv, {"evicted": 0, "swap_out": 0, "swap_in": 0}
    alloc = kv.allocate

    def spy_alloc(n):
        seen["evicted"] += max(0, n - (kv.num_free - kv.num_cached))  # beyond the plain free blocks
        return alloc(n)

    kv.allocate = spy_alloc
    execute = eng.runner.execute

    def spy_exec(out, *a, **k):
        seen["swap_out"] += len(out.swap_out)
        seen["swap_in"] += len(out.swap_in)
        return execute(out, *a, **k)

    eng.runner.execute = spy_exec
    done = _staged(eng, jobs)
    assert _tokens(done) == ref
    st = eng.stats()
    assert st["num_preemptions"] > 0 and seen["evicted"] > 0 and st["prefix_cache_hits"] > 0
    if host_blocks:
        assert seen["swap_out"] > 0 and seen["swap_in"] == seen["swap_out"]
    else:
        assert seen["swap_out"] == 0
    hit = [o.num_cached_tokens for o in done.values()]
    assert all(h % BS == 0 for h in hit) and sum(hit) == st["prefix_cache_hits"]
    _no_leak(eng)
    _no_leak(ref_eng)


@pytest.mark.parametrize("host_blocks", [64, 0])
def test_preempted_request_is_cached_again(models, host_blocks):
    """B is preempted (swapped out, or dropped for recompute) and A's growth evicts B's cached blocks; B's KV as it
    comes back (swapped in, or recomputed) is offered to the cache again, so B's prompt once more hits all of it."""
    d = models["llama"]
    pa, pb = _toks(30, 40), _toks(31, 40)
    jobs = [(0, "A", pa, _greedy(30)), (0, "B", pb, _greedy(20))]
    kw = dict(num_kv_blocks=6, num_host_kv_blocks=host_blocks)
    ref = _engine(d, cache=False, **kw)
    want = _tokens(_staged(ref, jobs))
    eng = _engine(d, **kw)
    assert _tokens(_staged(eng, jobs)) == want
    assert eng.stats()["num_preemptions"] == ref.stats()["num_preemptions"] == 1
    again = _run(eng, {"B2": (pb, _greedy(20))})["B2"]
    assert again.num_cached_tokens == 32 and again.outputs[0].token_ids == want["B"]
    _no_leak(eng)


def test_preempting_a_request_that_shares_its_prefix(models):
    """Three requests start on the blocks of a fourth's prefix and decode in step; KV runs short, the newest is
    preempted -- freeing only its own block, not the two it shares -- and the others must still get theirs."""
    d = models["qwen2"]
    pre = _toks(9, 8)
    jobs = [(0, "A", pre + [1, 2], _greedy(12))]
    jobs += [(1, r, pre + [ord(r), 3, 4], _greedy(12)) for r in "BCD"]
    kw = dict(block_size=4, num_kv_blocks=7, num_host_kv_blocks=64)
    ref = _tokens(_staged(_engine(d, cache=False, **kw), jobs))
    eng = _engine(d, **kw)
    assert _tokens(_staged(eng, jobs)) == ref
    _no_leak(eng)


def test_prefix_caching_off(models):
    """enable_prefix_caching=False, and the HF-exact reference modes, never take cached blocks nor count queries."""
    d = models["qwen2"]
    ids = _toks(11, 40)
    for kw in ({"cache": False}, {"hf_exact_prefill": True}):
        eng = _engine(d, **kw)
        assert not eng.scheduler.prefix_caching
        outs = [_run(eng, {f"r{i}": (ids, _greedy(4))})[f"r{i}"] for i in range(2)]
        assert [o.num_cached_tokens for o in outs] == [None, None]
        assert eng.stats()["prefix_cache_queries"] == eng.stats()["prefix_cache_hits"] == 0
        assert eng.scheduler.kv.num_cached == 0
    assert _engine(d).scheduler.prefix_caching


# -- 3. Two models over one pooled KV region --------------------------------------------------------------------
@pytest.fixture(scope="module")
def pool_cache():
    from model_swapper.host_cache import HostModelCache

    c = HostModelCache("256MiB", namespace=f"test-apc-{uuid.uuid4().hex[:10]}")
    yield c
    c.close()


def test_pooled_models_never_share_cached_blocks(models, pool_cache):
    """qwen2 and llama draw KV pages of one region (16 tokens a block each): the same token prompt to both gives each
    its own tokens (those of the model alone without the cache); the second model finds none of the first's blocks
    though their hashes are the same; the prompt again on either model hits that model's own blocks."""
    from gpu_pool.arena import MiB
    from token_scheduler.multi_engine import MultiModelEngine

    page = 16 * 512
    ids = _toks(12, 50)
    other = _toks(13, 35)
    ref = {}
    for a, d in models.items():
        ref[a] = _tokens(_run(_engine(d, cache=False), {"p": (ids, _greedy(10)), "o": (other, _greedy(6))}))
    assert ref["qwen2"]["p"] != ref["llama"]["p"]  # a model served the other's KV would tell
    multi = MultiModelEngine(dict(models), policy="token", device="cpu", gpu_budget=8 * MiB,
                             kv_cache_gb=24 * page / 1e9, host_kv_gb=64 * page / 1e9, host_cache=pool_cache)
    try:
        mem = multi.memory
        assert {e.block_size for e in multi.engines.values()} == {BS}
        assert mem.page_bytes == page
        multi.add_request("q1", ids, _greedy(10), model="qwen2")
        q1 = multi.run()["q1"]
        assert q1.num_cached_tokens == 0 and q1.outputs[0].token_ids == ref["qwen2"]["p"]
        assert mem.pages.num_cached >= 3  # qwen2's blocks stay cached in the shared region
        multi.add_request("l1", ids, _greedy(10), model="llama")
        l1 = multi.run()["l1"]
        assert l1.num_cached_tokens == 0 and l1.outputs[0].token_ids == ref["llama"]["p"]
        assert multi.engines["llama"].stats()["prefix_cache_hits"] == 0
        # both again, at once, beside another prompt: each hits its own blocks
        for a in models:
            multi.add_request(f"{a}-2", ids, _greedy(10), model=a)
            multi.add_request(f"{a}-o", other, _greedy(6), model=a)
        done = multi.run()
        for a in models:
            assert done[f"{a}-2"].num_cached_tokens == 48 and done[f"{a}-2"].outputs[0].token_ids == ref[a]["p"]
            assert done[f"{a}-o"].num_cached_tokens == 0 and done[f"{a}-o"].outputs[0].token_ids == ref[a]["o"]
            st = multi.engines[a].stats()
            assert st["prefix_cache_hits"] == 48 and st["prefix_cache_queries"] == 2 * len(ids) + len(other)
            assert multi.engines[a].scheduler.kv.num_held == 0
        assert mem.pages.num_used == 0 and mem.pages.num_free == mem.pages.num_blocks
    finally:
        multi.close()


def test_a_freed_prefix_is_evicted_from_its_end():
    """A request's cached blocks freed together are handed out last block first: the prefix's start, which more
    prompts share, stays cached longest."""
    kv = BlockAllocator(3, 4)
    blocks = kv.allocate(3)
    hs = []
    for i, b in enumerate(blocks):
        hs.append(block_hash(hs[-1] if hs else b"", [i] * 4))
        kv.register(b, hs[-1])
    kv.free(blocks)
    assert kv.num_free == 3 and kv.num_cached == 3
    assert kv.allocate(1) == [blocks[2]]
    assert [b for b, _ in kv.cached_prefix(hs)] == blocks[:2]
    assert kv.allocate(1) == [blocks[1]] and [b for b, _ in kv.cached_prefix(hs)] == blocks[:1]
