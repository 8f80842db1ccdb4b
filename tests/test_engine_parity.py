"""Engine vs HF transformers on the same weights (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import ARCHS
from token_scheduler import LLM, SamplingParams
from token_scheduler.model import llama
from token_scheduler.model.attention import AttentionMetadata


def _hf(d):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_greedy_match_hf(make_varied, arch):
    d = make_varied(arch)
    llm = LLM(d, device="cpu", dtype="fp32")
    eng = llm.engine
    hf = _hf(d)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, eng.model_config.vocab_size, (37,), generator=g).tolist()

    # Logits of every position of a 37-token prompt through the paged cache.
    blocks = list(range(-(-len(ids) // eng.config.block_size)))
    t = torch.arange(len(ids))
    meta = AttentionMetadata(torch.tensor([blocks[p // 16] for p in t]), t % 16, 16)
    meta.seqs, meta.seq_block_tables = [(0, len(ids), len(ids))], [torch.tensor(blocks)]
    with torch.no_grad():
        h = llama.forward(eng.model_config, eng.weights, eng.runner.kv, eng.runner.rope, torch.tensor(ids), t, meta)
        ours = llama.compute_logits(eng.weights, h)
        ref = hf(torch.tensor([ids])).logits[0]
    assert (ours - ref).abs().max().item() <= 1e-4

    # Greedy 64 tokens, token for token.
    with torch.no_grad():
        ref_gen = hf.generate(torch.tensor([ids]), max_new_tokens=64, min_new_tokens=64, do_sample=False)
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))[0].outputs[0]
    assert out.token_ids == ref_gen[0, len(ids):].tolist()
    assert len(set(out.token_ids)) > 8  # a varied continuation, not one repeated token


def test_rope_scaling_llama3_matches_hf(make_tiny):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from model_swapper.model_config import ModelConfig

    d = make_tiny("llama")
    hf = AutoConfig.from_pretrained(str(d))
    cfg = ModelConfig.from_hf(hf, d)
    assert cfg.rope_scaling and cfg.rope_scaling.get("rope_type") == "llama3"
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    assert torch.allclose(llama.rope_inv_freq(cfg), ref)


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_rowwise_prefill_matches_hf(make_varied, arch, monkeypatch):
    """Short prefill chunks run token by token through the batched decode attention (the CUDA default):
    chunked prompts (the second chunk attends to the first) still give HF's logits and greedy tokens."""
    from token_scheduler import runner as R

    d = make_varied(arch)
    llm = LLM(d, device="cpu", dtype="fp32", max_num_batched_tokens=24)
    eng = llm.engine
    eng.runner.rowwise_prefill_max = 1 << 20
    seen = []
    orig = R.ModelRunner._decode_meta
    monkeypatch.setattr(R.ModelRunner, "_decode_meta", lambda self, g: seen.append(g) or orig(self, g))
    hf = _hf(d)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, eng.model_config.vocab_size, (n,), generator=g).tolist() for n in (37, 9)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    for ids, o in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False)
        assert o.outputs[0].token_ids == ref[0, len(ids):].tolist()
    # the prompts went row by row: some call carried a later chunk's rows (context beyond the chunk's start)
    assert any(k > 1 and c > 24 for groups in seen for _, c, k in groups)


@pytest.mark.parametrize("row_max", [0, 1 << 20])
def test_padded_prefill_rows_match_hf(make_varied, row_max, monkeypatch):
    """Prefill and mixed steps padded to a few token counts (`padded_rows`, the CUDA default: cuBLAS's per-shape
    algorithm choice costs ms the first time): the padding rows, over the scratch block, change no token. Chunks
    by one SDPA each (row_max 0) and row by row through the decode attention, where the padding rows are rows too."""
    from token_scheduler import runner as R

    d = make_varied("qwen2")
    llm = LLM(d, device="cpu", dtype="fp32", max_num_batched_tokens=24)
    eng = llm.engine
    eng.runner.pad_rows, eng.runner.rowwise_prefill_max = True, row_max
    padded = []
    orig = R.padded_rows
    monkeypatch.setattr(R, "padded_rows", lambda t: padded.append((t, orig(t))) or orig(t))
    hf = _hf(d)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, eng.model_config.vocab_size, (n,), generator=g).tolist() for n in (37, 9, 5)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for ids, o in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert o.outputs[0].token_ids == ref[0, len(ids):].tolist()
    assert any(p > t for t, p in padded)  # some step ran with padding rows
    assert [orig(t) for t in (1, 2, 17, 64, 65, 1000, 1025)] == [1, 16, 32, 64, 128, 1024, 1280]


def test_row_pieces_match_hf(make_varied, monkeypatch):
    """Prefill and mixed steps that go row by row run as pieces of rows in order (row graphs on CUDA, eagerly here):
    with pieces of at most 8 rows and 2 sampled rows each, chunks split across pieces (a later piece attends to the
    K/V an earlier one wrote) and steps with several sampled rows still give HF's greedy tokens."""
    from token_scheduler import runner as R

    d = make_varied("qwen2")
    llm = LLM(d, device="cpu", dtype="fp32", max_num_batched_tokens=24)
    eng = llm.engine
    eng.runner.rowwise_prefill_max, eng.runner.row_graphs, eng.runner.row_graph_rows = 1 << 20, True, 1 << 20
    monkeypatch.setattr(R, "ROW_BUCKETS", (4, 8))
    monkeypatch.setattr(R, "ROW_SELECT", 2)
    pieces = []
    orig = R.ModelRunner._row_piece
    monkeypatch.setattr(R.ModelRunner, "_row_piece",
                        lambda self, reqs, pos, sel, *a: pieces.append((len(reqs), len(sel)))
                        or orig(self, reqs, pos, sel, *a))
    hf = _hf(d)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, eng.model_config.vocab_size, (n,), generator=g).tolist() for n in (37, 3, 2, 4, 11)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    for ids, o in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=10, min_new_tokens=10, do_sample=False)
        assert o.outputs[0].token_ids == ref[0, len(ids):].tolist()
    assert max(n for n, _ in pieces) == 8 and max(k for _, k in pieces) == 2
    assert any(k == 0 for _, k in pieces)  # a piece inside a long chunk: nothing sampled


def test_prompt_logprobs_match_hf(make_varied):
    """prompt_logprobs: each prompt token after the first gets HF's log-softmax at the position before it (and the top
    k), over a prompt cut into chunks (chunked prefill, two requests in a step, one asking and one not); the first is
    None, and the engine's logprobs of the generated tokens are unchanged by asking."""
    d = make_varied("qwen2")
    hf = _hf(d)
    llm = LLM(d, device="cpu", dtype="fp32", max_num_batched_tokens=16,
              enable_prefix_caching=False)  # (the second generate below runs the first's batches, not on its KV)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, llm.engine.model_config.vocab_size, (41,), generator=g).tolist()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    asks = SamplingParams(temperature=0, max_tokens=3, logprobs=0, prompt_logprobs=2, ignore_eos=True)
    plain = SamplingParams(temperature=0, max_tokens=3, logprobs=0, ignore_eos=True)
    got, other = llm.generate([ids, ids[:20]], [asks, plain])
    assert other.prompt_logprobs is None
    plp = got.prompt_logprobs
    assert len(plp) == len(ids) and plp[0] is None
    for p in range(1, len(ids)):
        row = ref[p - 1]
        top = torch.topk(row, 2)
        want = {ids[p]: row[ids[p]].item(), **{t: v for t, v in zip(top.indices.tolist(), top.values.tolist())}}
        assert list(plp[p])[0] == ids[p] and set(plp[p]) == set(want)
        for t, v in want.items():
            assert abs(plp[p][t] - v) <= 1e-4
    same = llm.generate([ids, ids[:20]], [plain, plain])[0].outputs[0]  # the same batches, not asking
    assert got.outputs[0].token_ids == same.token_ids and got.outputs[0].logprobs == same.logprobs


def _hf_last_hidden(hf, ids: list[int]) -> torch.Tensor:
    """HF's final hidden state (after the model's last norm) of the last token of `ids`."""
    with torch.no_grad():
        return hf(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1].float()


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_embeddings_match_hf(make_varied, arch):
    """SamplingParams.embed: the last prompt token's final hidden state, HF's to 1e-4, for a one-token prompt (a
    decode-shaped step), one cut into chunks (chunked prefill) and one beside a generation in the same steps; the
    generation's tokens are those it makes alone, and each embedding request ends with its prefill, KV freed."""
    d = make_varied(arch)
    hf = _hf(d)
    llm = LLM(d, device="cpu", dtype="fp32", max_num_batched_tokens=16)
    g = torch.Generator().manual_seed(3)
    vocab = llm.engine.model_config.vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (1, 41, 9)]
    plain = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = llm.generate([*prompts, prompts[2]], [SamplingParams(embed=True)] * 3 + [plain])
    for ids, o in zip(prompts, outs):
        ref = _hf_last_hidden(hf, ids)
        assert o.embedding is not None and len(o.embedding) == ref.numel()
        assert (torch.tensor(o.embedding) - ref).abs().max().item() <= 1e-4
        assert o.finished and len(o.outputs[0].token_ids) <= 1
    assert outs[3].embedding is None
    assert outs[3].outputs[0].token_ids == llm.generate(prompts[2], plain)[0].outputs[0].token_ids
    unit = llm.embed(prompts[1])[0]
    ref = _hf_last_hidden(hf, prompts[1])
    assert (torch.tensor(unit) - ref / ref.norm()).abs().max().item() <= 1e-5
    assert abs(sum(x * x for x in unit) - 1) <= 1e-6
    assert llm.engine.scheduler.kv.num_held == 0 and not llm.engine.scheduler.requests
