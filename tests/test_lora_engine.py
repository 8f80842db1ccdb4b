"""Multi-LoRA serving vs HF transformers on the merged weights (fp32, CPU): requests of several adapters (all targets;
some targets of some layers; rsLoRA) and of the base model share the engine's steps, chunked prefill included, and
each gets the greedy tokens, logprobs and final hidden state HF gives on its adapter merged into the model (or on the
base model); adapters that cannot be served are refused with a reason."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from controller.model_factory import make_lora, merge_lora
from token_scheduler import LLM, SamplingParams
from token_scheduler.engine import EngineConfig, LLMEngine
from tokenpool.models import adapter_fit_problem

MAX_TOKENS = 8
# name -> make_lora arguments: every target at a large alpha; two attention targets of the last layer only (of 2);
# rsLoRA (scale alpha / sqrt(r)) over the output and MLP projections
ADAPTERS = {
    "full": dict(rank=8, alpha=48.0, seed=1),
    "part": dict(rank=4, alpha=64.0, seed=2, targets=("q_proj", "v_proj"), layers=[1]),
    "rs": dict(rank=4, alpha=24.0, seed=3, targets=("o_proj", "gate_proj", "up_proj", "down_proj"), rslora=True),
}


def _hf(d: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()


def _greedy(hf, ids: list[int], n: int = MAX_TOKENS) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def _prompts(vocab: int, lengths, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def setup(make_varied, tmp_path_factory):
    """arch -> (model dir, {adapter name: adapter dir}, {None or adapter name: HF model on the merged weights})."""
    cache: dict[str, tuple] = {}

    def f(arch: str):
        if arch not in cache:
            d = make_varied(arch)
            root = tmp_path_factory.mktemp(f"lora-{arch}")
            dirs = {name: make_lora(d, root / name, **kw) for name, kw in ADAPTERS.items()}
            hfs = {None: _hf(d), **{name: _hf(merge_lora(d, a, root / f"merged-{name}")) for name, a in dirs.items()}}
            cache[arch] = (d, dirs, hfs)
        return cache[arch]

    return f


def _run(eng: LLMEngine, reqs: dict[str, tuple[list[int], SamplingParams]]) -> dict:
    for rid, (ids, sp) in reqs.items():
        eng.add_request(rid, ids, sp)
    done = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
    assert set(done) == set(reqs)
    return done


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_mixed_adapters_in_one_engine_match_hf_merged(setup, arch):
    """One engine, adapters from its config and one added at runtime: base and adapter requests of prompts of several
    lengths step together; each request's greedy tokens are HF's on its merged model, each adapter changes some
    continuation (LoRA is not ignored), an adapter request's logprobs are HF's merged log-softmax, and an embedding
    request of an adapter is HF's merged last hidden state."""
    d, dirs, hfs = setup(arch)
    eng = LLMEngine(EngineConfig(model=str(d), device="cpu", dtype="fp32",
                                 lora_modules={"full": str(dirs["full"]), "part": str(dirs["part"])}))
    eng.add_lora("rs", dirs["rs"])
    assert sorted(eng.loras) == ["full", "part", "rs"]
    prompts = _prompts(eng.model_config.vocab_size, (5, 13, 29, 2), seed=7)
    greedy = dict(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    reqs: dict[str, tuple[list[int], SamplingParams]] = {}
    for i, ids in enumerate(prompts):
        for name in (None, "full", "part", "rs"):
            reqs[f"{name}-{i}"] = (ids, SamplingParams(**greedy, lora=name))
    reqs["lp"] = (prompts[1], SamplingParams(**greedy, logprobs=2, lora="full"))
    reqs["lp-rs"] = (prompts[2], SamplingParams(**greedy, logprobs=0, lora="rs"))
    reqs["emb"] = (prompts[2], SamplingParams(embed=True, lora="full"))
    reqs["emb-part"] = (prompts[0], SamplingParams(embed=True, lora="part"))
    reqs["emb-base"] = (prompts[0], SamplingParams(embed=True))
    done = _run(eng, reqs)

    ref = {(name, i): _greedy(hfs[name], ids) for i, ids in enumerate(prompts) for name in (None, "full", "part", "rs")}
    for (name, i), want in ref.items():
        assert done[f"{name}-{i}"].outputs[0].token_ids == want, (name, i)
    for name in ("full", "part", "rs"):  # each adapter changes something: the test fails if LoRA were ignored
        assert any(ref[name, i] != ref[None, i] for i in range(len(prompts))), name

    for rid, ids, name, k in (("lp", prompts[1], "full", 2), ("lp-rs", prompts[2], "rs", 0)):
        out = done[rid].outputs[0]
        assert out.token_ids == ref[name, prompts.index(ids)]
        with torch.no_grad():
            logits = hfs[name](torch.tensor([ids + out.token_ids])).logits[0].float()
        lps = torch.log_softmax(logits[len(ids) - 1: len(ids) - 1 + MAX_TOKENS], -1)
        assert out.logprobs is not None and len(out.logprobs) == MAX_TOKENS
        for row, tok, got in zip(lps, out.token_ids, out.logprobs):
            top = torch.topk(row, k).indices.tolist() if k else []
            assert set(got) == {tok, *top}
            for t, v in got.items():
                assert abs(v - row[t].item()) <= 1e-4

    for rid, ids, name in (("emb", prompts[2], "full"), ("emb-part", prompts[0], "part"), ("emb-base", prompts[0], None)):
        with torch.no_grad():
            want = hfs[name](torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1].float()
        got = done[rid].embedding
        assert got is not None and (torch.tensor(got) - want).abs().max().item() <= 1e-4, rid
    assert (torch.tensor(done["emb-part"].embedding) - torch.tensor(done["emb-base"].embedding)).abs().max() > 1e-3
    assert eng.scheduler.kv.num_held == 0 and not eng.scheduler.requests


@pytest.mark.parametrize("knobs", ["default", "rowwise", "padded", "row_pieces"])
def test_chunked_prefill_beside_decodes_matches_hf_merged(setup, knobs, monkeypatch):
    """A long adapter prompt prefilled over several steps (max_num_batched_tokens 16) beside requests decoding (base
    and another adapter's): the tokens are still HF's on each merged model. Also as CUDA runs its steps: short chunks
    row by row through the decode attention, as row pieces (the steps of CUDA's row graphs, each row its adapter's
    slot), and padded row counts (padding rows belong to no adapter). Through the
    offline `LLM` API, which passes lora_modules on to the engine, and n=2 of an adapter request."""
    from token_scheduler import runner as R

    d, dirs, hfs = setup("qwen2")
    llm = LLM(d, device="cpu", dtype="fp32", max_num_batched_tokens=16,
              lora_modules={"full": str(dirs["full"]), "part": str(dirs["part"])})
    run = llm.engine.runner
    if knobs == "rowwise":
        run.rowwise_prefill_max = 1 << 20
    elif knobs == "padded":
        run.pad_rows = True
    elif knobs == "row_pieces":  # (as CUDA's row graphs run a prefill: pieces of rows, each row its adapter's slot)
        run.rowwise_prefill_max, run.row_graphs, run.row_graph_rows = 1 << 20, True, 1 << 20
    steps = []
    orig = R.ModelRunner._lora_slots

    def spy(self, out):
        steps.append([(c.request.sampling_params.lora, c.start, c.num_tokens, c.sample) for c in out.chunks])
        return orig(self, out)

    monkeypatch.setattr(R.ModelRunner, "_lora_slots", spy)
    long_, short, tiny = _prompts(llm.engine.model_config.vocab_size, (53, 3, 6), seed=11)
    params = [SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, lora=name)
              for name in ("part", None, "full", "full")]
    params[3] = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, lora="full", n=2)
    outs = llm.generate([short, tiny, long_, short], params)
    assert outs[0].outputs[0].token_ids == _greedy(hfs["part"], short)
    assert outs[1].outputs[0].token_ids == _greedy(hfs[None], tiny)
    assert outs[2].outputs[0].token_ids == _greedy(hfs["full"], long_)
    assert [c.token_ids for c in outs[3].outputs] == [_greedy(hfs["full"], short)] * 2
    # the long prompt's later chunks ran in steps where other requests decoded
    assert any(any(lo == "full" and s > 0 and n > 1 for lo, s, n, _ in st) and
               any(n == 1 and s >= len(short) for lo, s, n, _ in st) for st in steps)
    assert not llm.engine.scheduler.requests


def test_refusals(setup, make_tiny, tmp_path):
    """Unknown adapter names, adapters of another model's shapes, DoRA, a missing directory and a name loaded twice
    are refused with a reason; an adapter is not removed while a request of it is unfinished, and once removed a
    request naming it is refused."""
    d, dirs, _ = setup("llama")
    eng = LLMEngine(EngineConfig(model=str(d), device="cpu", dtype="fp32", lora_modules={"full": str(dirs["full"])}))
    sp = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    with pytest.raises(ValueError, match="nosuch"):
        eng.add_request("x", [1, 2, 3], SamplingParams(temperature=0, lora="nosuch"))
    assert not eng.scheduler.requests

    # an adapter of llama tiny onto qwen3 tiny (q width 128, not 64)
    q3 = make_tiny("qwen3")
    why = adapter_fit_problem(dirs["full"], q3)
    assert isinstance(why, str) and "does not fit" in why
    assert adapter_fit_problem(dirs["full"], d) is None and adapter_fit_problem(dirs["part"], d) is None
    e3 = LLMEngine(EngineConfig(model=str(q3), device="cpu", dtype="fp32"))
    with pytest.raises(ValueError, match="does not fit"):
        e3.add_lora("full", dirs["full"])
    assert e3.loras == []
    with pytest.raises(ValueError, match="does not fit"):
        LLMEngine(EngineConfig(model=str(q3), device="cpu", dtype="fp32", lora_modules={"x": str(dirs["full"])}))

    dora = tmp_path / "dora"
    shutil.copytree(dirs["full"], dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match="DoRA"):
        eng.add_lora("dora", dora)
    assert "DoRA" in (adapter_fit_problem(dora, d) or "")
    with pytest.raises(ValueError, match="does not exist"):
        eng.add_lora("gone", tmp_path / "missing")
    assert "does not exist" in (adapter_fit_problem(tmp_path / "missing", d) or "")
    with pytest.raises(ValueError, match="already loaded"):
        eng.add_lora("full", dirs["part"])
    with pytest.raises(ValueError, match="not loaded"):
        eng.remove_lora("nosuch")
    assert eng.loras == ["full"]

    eng.add_request("r", [5, 6, 7, 8], replace(sp, lora="full"))
    eng.step()  # prefill: running, not finished
    with pytest.raises(ValueError, match="unfinished"):
        eng.remove_lora("full")
    while eng.has_unfinished_requests():
        eng.step()
    eng.remove_lora("full")
    assert eng.loras == []
    with pytest.raises(ValueError, match="full"):
        eng.add_request("r2", [5, 6, 7], SamplingParams(temperature=0, lora="full"))
    # base requests still run, and the adapter can be hosted again under the same name
    assert _run(eng, {"b": ([5, 6, 7], sp)})["b"].outputs[0].token_ids
    eng.add_lora("full", dirs["full"])
    assert eng.loras == ["full"]


def test_overlapped_decode_then_adapter_request_matches_hf_merged(setup, monkeypatch):
    """Overlapped decode (queued a step ahead, as on CUDA): base requests decode overlapped; an adapter request that
    arrives meanwhile decodes overlapped too, in the same launched steps (its rows name their adapter's slot), and
    every request still gets HF's tokens on its model."""
    from token_scheduler import runner as R

    d, dirs, hfs = setup("llama")
    eng = LLMEngine(EngineConfig(model=str(d), device="cpu", dtype="fp32", overlap=True,
                                 lora_modules={"full": str(dirs["full"])}))
    launched = []
    orig = R.ModelRunner.launch_decode
    monkeypatch.setattr(R.ModelRunner, "launch_decode",
                        lambda self, out, *a, **k: launched.append([c.request.sampling_params.lora for c in out.chunks])
                        or orig(self, out, *a, **k))
    a, b, c = _prompts(eng.model_config.vocab_size, (7, 4, 10), seed=13)
    sp = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    eng.add_request("a", a, sp)
    eng.add_request("b", b, sp)
    done = {}
    for _ in range(3):
        done.update({o.request_id: o for o in eng.step() if o.finished})
    assert launched  # the base decode went overlapped
    eng.add_request("c", c, replace(sp, lora="full"))
    eng.add_request("c-base", c, sp)
    while eng.has_unfinished_requests():
        done.update({o.request_id: o for o in eng.step() if o.finished})
    assert done["a"].outputs[0].token_ids == _greedy(hfs[None], a)
    assert done["b"].outputs[0].token_ids == _greedy(hfs[None], b)
    assert done["c"].outputs[0].token_ids == _greedy(hfs["full"], c)
    assert done["c-base"].outputs[0].token_ids == _greedy(hfs[None], c)
    assert any("full" in rows and None in rows for rows in launched)  # adapter and base rows in one launched step


@pytest.mark.parametrize("host_blocks", [0, 64], ids=["recompute", "swap"])
def test_preempted_adapter_requests_resume_on_their_adapter(setup, host_blocks, monkeypatch):
    """KV for far fewer tokens than the requests need: adapter and base requests are preempted (recomputed, or
    swapped out and back) and still give HF's tokens on their merged models; an adapter request's prompt logprobs,
    over a chunked prefill, are HF's merged log-softmax."""
    from token_scheduler import runner as R

    d, dirs, hfs = setup("qwen2")
    eng = LLMEngine(EngineConfig(model=str(d), device="cpu", dtype="fp32", num_kv_blocks=6,
                                 num_host_kv_blocks=host_blocks, max_num_batched_tokens=32,
                                 lora_modules={n: str(p) for n, p in dirs.items()}))
    preempted = []
    orig = R.ModelRunner.execute
    monkeypatch.setattr(R.ModelRunner, "execute", lambda self, out, *a: preempted.append(len(out.swap_out))
                        or orig(self, out, *a))
    n = 16
    prompts = _prompts(eng.model_config.vocab_size, (20, 17, 23, 19, 14, 21), seed=17)
    names = ["full", None, "part", "rs", "full", None]
    sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    reqs = {f"r{i}": (ids, replace(sp, lora=name)) for i, (ids, name) in enumerate(zip(prompts, names))}
    reqs["plp"] = (prompts[2], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1, lora="rs"))
    done = _run(eng, reqs)
    for i, (ids, name) in enumerate(zip(prompts, names)):
        assert done[f"r{i}"].outputs[0].token_ids == _greedy(hfs[name], ids, n), (i, name)
    assert eng.scheduler.num_preemptions > 0
    if host_blocks:
        assert sum(preempted) > 0  # some request's KV went to the host
    assert eng.scheduler.kv.num_used == 0
    ids = prompts[2]
    with torch.no_grad():
        ref = torch.log_softmax(hfs["rs"](torch.tensor([ids])).logits[0].float(), -1)
    plp = done["plp"].prompt_logprobs
    assert plp is not None and len(plp) == len(ids) and plp[0] is None
    for p in range(1, len(ids)):
        assert abs(plp[p][ids[p]] - ref[p - 1, ids[p]].item()) <= 1e-4


def test_damaged_adapter_weights_refused_with_value_error(setup, tmp_path):
    """A damaged adapter_model.safetensors (its data cut short) is refused as add_lora documents (ValueError), and the
    torch-free check says why before the engine tries; so is an adapter of a rank over max_lora_rank."""
    d, dirs, _ = setup("llama")
    bad = tmp_path / "cut"
    shutil.copytree(dirs["full"], bad)
    w = bad / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    eng = LLMEngine(EngineConfig(model=str(d), device="cpu", dtype="fp32"))
    with pytest.raises(ValueError, match="cut short"):
        eng.add_lora("cut", bad)
    assert "cut short" in adapter_fit_problem(bad, d)
    w.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(ValueError, match="not a safetensors file"):
        eng.add_lora("cut", bad)
    assert "not a safetensors file" in adapter_fit_problem(bad, d)
    assert eng.loras == [] and eng.set_loras({"cut": str(bad)}) and eng.loras == []
    small = LLMEngine(EngineConfig(model=str(d), device="cpu", dtype="fp32", max_lora_rank=4))  # (vLLM's max_lora_rank)
    with pytest.raises(ValueError, match="has rank 8; ranks up to 4 are served"):
        small.add_lora("full", dirs["full"])
    small.add_lora("part", dirs["part"])  # (rank 4)
    assert small.loras == ["part"]


def test_adapter_slots_are_bounded(setup, monkeypatch):
    """max_loras (vLLM's --max-loras) bounds a model's adapter slots on its device: with one slot, adapters asked for
    in turn take it in turn (written again each time), a step asking for more adapters than there are slots takes them
    by index instead (each request still on its own adapter), and the slots go with the weights. The tokens are HF's
    throughout; an adapter unloaded frees its slot."""
    from token_scheduler import runner

    d, dirs, hfs = setup("qwen2")
    eng = LLMEngine(EngineConfig(model=str(d), device="cpu", dtype="fp32", max_loras=1,
                                 lora_modules={k: str(v) for k, v in dirs.items()}))
    ids = _prompts(eng.model_config.vocab_size, [6], seed=5)[0]
    sp = {k: SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, lora=k) for k in ("full", "part")}
    uid = {k: eng.runner.loras[k].uid for k in sp}
    for k in ("full", "part", "full"):
        done = _run(eng, {k: (ids, sp[k])})
        assert done[k].outputs[0].token_ids == _greedy(hfs[k], ids)
        slots = eng.runner._slots
        assert slots.slots == 1 and list(slots.held) == [uid[k]]
    by_index = []
    orig = runner.ModelRunner._lora_rows
    monkeypatch.setattr(runner.ModelRunner, "_lora_rows", lambda self, out: by_index.append(r := orig(self, out)) or r)
    done = _run(eng, {"a": (ids, sp["full"]), "b": (ids, sp["part"])})  # (two adapters a step, one slot)
    assert done["a"].outputs[0].token_ids == _greedy(hfs["full"], ids)
    assert done["b"].outputs[0].token_ids == _greedy(hfs["part"], ids)
    assert any(r is not None and len(r.groups) == 2 for r in by_index)
    eng.remove_lora("full")
    assert uid["full"] not in eng.runner._slots.held
    eng.set_weights(None)  # (evicted: the slots go with the weights)
    assert eng.runner._slots is None


def test_slots_hold_adapters_of_several_ranks_and_reload(setup, monkeypatch):
    """Slots are made for the largest rank and every projection hosted: adapters of rank 8 and 4 and of different
    targets share them; a fourth adapter added at runtime makes them again (more slots), and an adapter reloaded under
    its name with other weights is written anew (its old slot is not served). Tokens are HF's on each merged model."""
    from token_scheduler import runner

    monkeypatch.setattr(runner, "GPU_LORAS", 8)
    d, dirs, hfs = setup("qwen2")
    eng = LLMEngine(EngineConfig(model=str(d), device="cpu", dtype="fp32",
                                 lora_modules={"part": str(dirs["part"]), "rs": str(dirs["rs"])}))
    ids = _prompts(eng.model_config.vocab_size, [9], seed=21)[0]
    greedy = dict(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    done = _run(eng, {k: (ids, SamplingParams(**greedy, lora=k)) for k in ("part", "rs")})
    first = eng.runner._slots
    assert (first.slots, first.rank) == (2, 8) and first.projs == {"qkv", "o", "gate_up", "down"}
    eng.add_lora("full", dirs["full"])
    done |= _run(eng, {f"{k}2": (ids, SamplingParams(**greedy, lora=k)) for k in ("part", "rs", "full")})
    assert eng.runner._slots is not first and eng.runner._slots.slots == 3
    for k in ("part", "rs", "full"):
        assert done[f"{k}2"].outputs[0].token_ids == _greedy(hfs[k], ids), k
    assert done["part"].outputs[0].token_ids == done["part2"].outputs[0].token_ids
    eng.remove_lora("rs")
    eng.add_lora("rs", dirs["part"])  # (the name now serves other weights)
    done = _run(eng, {"again": (ids, SamplingParams(**greedy, lora="rs"))})
    assert done["again"].outputs[0].token_ids == _greedy(hfs["part"], ids)


def test_no_memory_for_the_slots_falls_back_to_rows_by_index(setup, monkeypatch):
    """Slots that do not fit on the device (torch.OutOfMemoryError making them) leave adapter steps to the by-index
    path, not an error: the tokens are still HF's on the merged weights, no overlapped launch takes adapter rows, the
    allocation is not retried at every step, and it is tried again once the weights change."""
    from token_scheduler.model import lora as L

    d, dirs, hfs = setup("llama")
    tries = []

    def no_memory(self, *a, **k):
        tries.append(1)
        raise torch.OutOfMemoryError("CUDA out of memory (test)")

    monkeypatch.setattr(L.LoraSlots, "__init__", no_memory)
    from token_scheduler import runner as R

    launched = []
    orig = R.ModelRunner.launch_decode
    monkeypatch.setattr(R.ModelRunner, "launch_decode",
                        lambda self, out, *a, **k: launched.append([c.request.sampling_params.lora for c in out.chunks])
                        or orig(self, out, *a, **k))
    eng = LLMEngine(EngineConfig(model=str(d), device="cpu", dtype="fp32", overlap=True,
                                 lora_modules={"full": str(dirs["full"])}))
    a, b = _prompts(eng.model_config.vocab_size, (7, 5), seed=23)
    sp = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    done = _run(eng, {"a": (a, replace(sp, lora="full")), "b": (b, sp), "a2": (b, replace(sp, lora="full"))})
    assert done["a"].outputs[0].token_ids == _greedy(hfs["full"], a)
    assert done["a2"].outputs[0].token_ids == _greedy(hfs["full"], b)
    assert done["b"].outputs[0].token_ids == _greedy(hfs[None], b)
    assert len(tries) == 1 and eng.runner._slots is None
    assert not launched  # (adapter rows in every step: none went overlapped)
    _run(eng, {"b2": (b, sp)})
    assert launched and not any("full" in rows for rows in launched)  # (the model's rows alone do)
    w = eng.weights
    eng.set_weights(None)
    eng.set_weights(w)  # (resident again: the slots are tried again, at the next adapter step)
    _run(eng, {"c": (a, replace(sp, lora="full"))})
    assert len(tries) == 2


def test_slots_made_again_without_memory_in_a_launched_decode(setup, monkeypatch):
    """Slots made again at a launched (overlapped) decode, when an adapter is added at runtime, that do not fit: that
    step runs its adapter rows by index, eagerly, and still on their adapter (HF's tokens), never on the model alone."""
    from token_scheduler.model import lora as L

    d, dirs, hfs = setup("qwen2")
    made = []
    real = L.LoraSlots.__init__

    def second_fails(self, *a, **k):
        made.append(1)
        if len(made) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        real(self, *a, **k)

    monkeypatch.setattr(L.LoraSlots, "__init__", second_fails)
    eng = LLMEngine(EngineConfig(model=str(d), device="cpu", dtype="fp32", overlap=True,
                                 lora_modules={"full": str(dirs["full"])}))
    a = _prompts(eng.model_config.vocab_size, (6,), seed=29)[0]
    n = 12
    eng.add_request("a", a, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, lora="full"))
    done = {}
    for _ in range(3):  # (its prefill, then decodes launched overlapped over one slot)
        done.update({o.request_id: o for o in eng.step() if o.finished})
    assert eng.runner._slots is not None and eng.runner._slots.slots == 1 and eng._inflight is not None
    eng.add_lora("part", dirs["part"])  # (two hosted: the next step makes two slots, which fail)
    while eng.has_unfinished_requests():
        done.update({o.request_id: o for o in eng.step() if o.finished})
    assert len(made) == 2 and eng.runner._slots_failed is not None
    assert done["a"].outputs[0].token_ids == _greedy(hfs["full"], a, n)
