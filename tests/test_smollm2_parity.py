"""The engine against HF transformers on real weights (SmolLM2-135M-Instruct), CPU: 8 chat prompts.

fp32: logits at every prompt position within 1e-4, greedy continuations token for token. bf16: the first
generated token's top-1 equal for all 8 (random weights cannot show this: trained logits have real margins).

HF's fp32 side is one forward pass per prompt over the prompt, then one over the engine's continuation on its
cache, shared by the three tests (module fixtures): the logits at the prompt's positions are its prompt logits, its
argmax at each later position its greedy choice given the tokens before, and its last hidden state at the prompt's
end its embedding. Where the engine's tokens are HF's own choices, these passes read HF's greedy continuation
token for token, as `generate` would find it one decode step at a time at several times the cost; where they are
not, the first difference fails the test.
"""

from __future__ import annotations

import pytest
import torch

from tests.torch_threads import one_torch_thread  # noqa: F401 (autouse: one torch thread)
from token_scheduler import LLM, SamplingParams
from token_scheduler.model import llama
from token_scheduler.model.attention import AttentionMetadata

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "Write a haiku about the sea.",
    "What is 12 times 7?",
    "Explain what a CPU does in one sentence.",
    "Translate 'good morning' into Spanish.",
    "Give me a short tip for learning to cook.",
    "Who wrote Romeo and Juliet?",
]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def prompts(smollm2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2))
    return [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                    return_dict=True)["input_ids"] for q in QUESTIONS]


def _hf(d, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(d), dtype=dtype).eval()


@pytest.fixture(scope="module")
def fp32(smollm2, prompts):
    """The fp32 engine and its greedy continuations of the prompts."""
    llm = LLM(smollm2, device="cpu", dtype="fp32")
    return llm, llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS))


@pytest.fixture(scope="module")
def hf32(smollm2, prompts, fp32):
    """HF fp32 over each prompt, then the engine's continuation: (logits at every position, final hidden state at
    the prompt's last token)."""
    hf = _hf(smollm2, torch.float32)
    runs = []
    with torch.no_grad():
        for ids, out in zip(prompts, fp32[1]):
            r = hf(torch.tensor([ids]), output_hidden_states=True, use_cache=True)
            # the continuation on the prompt's cache, so the prompt's own numbers are those of a pass over it alone
            more = hf(torch.tensor([list(out.outputs[0].token_ids)]), past_key_values=r.past_key_values).logits[0]
            runs.append((torch.cat([r.logits[0], more]), r.hidden_states[-1][0, -1].clone()))
    return runs


def _prompt_logits(eng, ids: list[int]) -> torch.Tensor:
    """The engine's logits at every position of `ids`, one prefill through the paged cache."""
    bs = eng.block_size
    blocks = list(range(-(-len(ids) // bs)))
    t = torch.arange(len(ids))
    meta = AttentionMetadata(torch.tensor([blocks[p // bs] for p in t]), t % bs, bs)
    meta.seqs, meta.seq_block_tables = [(0, len(ids), len(ids))], [torch.tensor(blocks)]
    h = llama.forward(eng.model_config, eng.weights, eng.runner.kv, eng.runner.rope, torch.tensor(ids), t, meta)
    return llama.compute_logits(eng.weights, h)


def test_fp32_logits_and_greedy_match_hf(prompts, fp32, hf32):
    llm, outs = fp32
    tok = llm.get_tokenizer()
    eos = tok.eos_token_id
    for ids, out, (ref, _) in zip(prompts, outs, hf32):
        with torch.no_grad():
            ours = _prompt_logits(llm.engine, ids)
        assert (ours - ref[: len(ids)]).abs().max().item() <= 1e-4
        got = list(out.outputs[0].token_ids)
        # HF's greedy choice after the prompt and each of the engine's tokens: got[k] must be HF's choice given
        # got[:k], so that by induction got is HF's greedy continuation as far as it goes
        hf_next = ref[len(ids) - 1:].argmax(-1).tolist()
        assert got == hf_next[: len(got)], (tok.decode(got), tok.decode(hf_next))
        if eos in got:  # HF stops at its first EOS, and so must the engine
            assert got.index(eos) == len(got) - 1, tok.decode(got)
        elif len(got) < NEW_TOKENS:  # the engine may leave the EOS id out of its output: HF's next token is it
            assert hf_next[len(got)] == eos, (tok.decode(got), tok.decode(hf_next))
    assert "Paris" in outs[0].outputs[0].text


def test_bf16_first_token_top1_matches_hf(smollm2, prompts, hf32):
    """With the prefill run as HF runs it (`hf_exact_prefill`), all 8 first tokens are HF's. The default fast path
    must agree wherever the choice is not a near tie: a first chat token is often one (fp32 top-2 gaps of 0.03-0.1
    here, while bf16 moves logits by ~0.5), and there rounding order decides, HF's bf16 included (on one of these
    prompts HF's bf16 and fp32 runs pick different tokens)."""
    hf = _hf(smollm2, torch.bfloat16)
    with torch.no_grad():
        refs = [int(hf(torch.tensor([ids])).logits[0, -1].argmax()) for ids in prompts]
    gaps = [float((lambda v: v[0] - v[1])(logits[len(ids) - 1].topk(2).values)) for ids, (logits, _) in zip(prompts, hf32)]
    del hf
    exact = LLM(smollm2, device="cpu", dtype="bf16", hf_exact_prefill=True)
    outs = exact.generate(prompts, SamplingParams(temperature=0, max_tokens=1))
    assert [o.outputs[0].token_ids[0] for o in outs] == refs
    del exact
    fast = LLM(smollm2, device="cpu", dtype="bf16")
    outs = fast.generate(prompts, SamplingParams(temperature=0, max_tokens=1))
    clear = [i for i, g in enumerate(gaps) if g > 0.05]
    assert len(clear) >= 4
    assert [outs[i].outputs[0].token_ids[0] for i in clear] == [refs[i] for i in clear]


def test_fp32_embeddings_match_hf(smollm2, prompts, hf32):
    """LLM.embed on real weights: HF's final hidden state of each prompt's last token, L2-normalized, within 1e-5;
    the 8 questions are 8 different vectors. A fresh engine: the shared one's cache holds what `_prompt_logits`
    wrote into it outside the engine's bookkeeping."""
    got = torch.tensor(LLM(smollm2, device="cpu", dtype="fp32").embed(prompts))
    ref = torch.stack([h for _, h in hf32])
    ref = ref / ref.norm(dim=-1, keepdim=True)
    assert got.shape == ref.shape and (got - ref).abs().max().item() <= 1e-5
    sims = got @ got.T
    assert (sims - torch.eye(len(prompts))).abs().max().item() > 1e-3 and sims.diagonal().sub(1).abs().max() < 1e-5
    assert (sims.triu(1).abs().max().item()) < 0.9999
