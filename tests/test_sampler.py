"""The batched sampler equals sampling each row alone (the per-row reference below is the textbook form of each
filter, written out once per row), and a seeded row draws the same token in any batch."""

from __future__ import annotations

import pytest
import torch

from token_scheduler.request import Request, SamplingParams
from token_scheduler.sampler import Sampler, _filter


def _row_reference(row: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    if 0 < top_k < row.numel():
        row = row.masked_fill(row < torch.topk(row, top_k).values[-1], float("-inf"))
    if top_p < 1.0:
        s, idx = torch.sort(row, descending=True)
        p = s.softmax(-1)
        row = row.scatter(0, idx, s.masked_fill(p.cumsum(-1) - p > top_p, float("-inf")))
    if min_p > 0.0:
        p = row.softmax(-1)
        row = row.masked_fill(p < min_p * p.max(), float("-inf"))
    return row


def _req(rid: str, **sp) -> Request:
    return Request(rid, [1, 2, 3], SamplingParams(**sp))


def test_batched_filters_equal_each_row_alone():
    g = torch.Generator().manual_seed(0)
    settings = [(-1, 1.0, 0.0), (5, 1.0, 0.0), (-1, 0.8, 0.0), (-1, 1.0, 0.1), (20, 0.9, 0.05), (1, 0.5, 0.0),
                (63, 1.0, 0.0), (64, 0.99, 0.2)]
    x = torch.randn(len(settings), 64, generator=g) * 3
    got = _filter(x, *map(list, zip(*settings)))
    for i, (k, p, mp) in enumerate(settings):
        torch.testing.assert_close(got[i], _row_reference(x[i], k, p, mp), rtol=0, atol=0)


def test_seeded_row_draws_the_same_token_alone_and_in_any_batch():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 200, generator=g)
    seeded = dict(temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    alone = Sampler(torch.device("cpu"), seed=0).sample_tokens(logits[2:3].clone(), [_req("s", **seeded)])
    for other_seed in (0, 7):  # the engine's own generator (unseeded rows) differs; the seeded row does not
        reqs = [_req("u0", temperature=1.0), _req("g", temperature=0.0), _req("s", **seeded),
                _req("u1", temperature=0.7, min_p=0.1), _req("s2", temperature=1.2, seed=5),
                _req("p", temperature=0.8, repetition_penalty=1.3)]
        mixed = Sampler(torch.device("cpu"), seed=other_seed).sample_tokens(logits.clone(), reqs)
        assert mixed[2].item() == alone[0].item()
        assert mixed[1].item() == logits[1].argmax().item()  # greedy row


def test_sampled_and_top_logprobs_are_the_log_softmax_values():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 50, generator=g)
    reqs = [_req("a", temperature=0.0, logprobs=3), _req("b", temperature=0.0), _req("c", temperature=0.0, logprobs=0)]
    res = Sampler(torch.device("cpu"))(logits.clone(), reqs)
    lsm = torch.log_softmax(logits, -1)
    assert res.token_ids == logits.argmax(-1).tolist()
    a = res.logprobs[0]
    top = torch.topk(lsm[0], 3)
    assert list(a) == top.indices.tolist()  # the sampled (greedy) token first, then the rest of the top 3
    assert all(abs(a[t] - v) < 1e-6 for t, v in zip(top.indices.tolist(), top.values.tolist()))
    assert res.logprobs[1] == {}
    assert res.logprobs[2] == {res.token_ids[2]: lsm[2, res.token_ids[2]].item()}


def test_model_dtype_logits_sample_as_their_fp32_upcast():
    """A decode graph may keep its logits in bf16 (runner.STEP_IO): every path -- greedy (ties included: the first
    maximum), penalties, temperature and filters with seeded and unseeded rows, logprobs -- gives what the same values
    upcast to fp32 give, and the caller's logits are left as they were."""
    g = torch.Generator().manual_seed(3)
    low = (torch.randn(5, 300, generator=g) * 4).to(torch.bfloat16)
    low[0, 17] = low[0, 230] = low[0].max() + 1  # a tie: both pick 17
    before = low.clone()
    def cases():  # fresh requests each time: a seeded request carries its generator along
        yield [_req(f"g{i}", temperature=0.0) for i in range(5)]
        yield [_req("g", temperature=0.0), _req("p", temperature=0.0, repetition_penalty=1.5),
               _req("s", temperature=0.8, top_k=40, top_p=0.9, seed=11), _req("u", temperature=1.1, min_p=0.05),
               _req("f", temperature=0.7, frequency_penalty=0.5, presence_penalty=0.2, seed=3)]

    for i, (mine, theirs) in enumerate(zip(cases(), cases())):
        for r in mine + theirs:
            r.output_token_ids = [17, 5, 5]
        ours = Sampler(torch.device("cpu"), seed=4).sample_tokens(low, mine)
        ref = Sampler(torch.device("cpu"), seed=4).sample_tokens(low.float(), theirs)
        assert ours.tolist() == ref.tolist(), i
        assert ours[0].item() == 17 and torch.equal(low, before)
    def reqs():
        return [_req("a", temperature=0.0, logprobs=3), _req("b", temperature=0.5, logprobs=0, seed=2)]

    ours = Sampler(torch.device("cpu"))(low[:2], reqs())
    ref = Sampler(torch.device("cpu"))(low[:2].float(), reqs())
    assert ours.token_ids == ref.token_ids and ours.logprobs == ref.logprobs


def test_logit_bias_moves_each_row_by_its_own_bias_only():
    """OpenAI's logit_bias: each row's biases are added to its logits before the draw (greedy and seeded alike),
    other rows are untouched, and the logprobs returned are the model's own."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 40, generator=g)
    top = logits.argmax(-1).tolist()
    low = logits.argmin(-1).tolist()
    reqs = [_req("a", temperature=0.0, logit_bias={low[0]: 100.0}),  # the least likely token wins
            _req("b", temperature=0.0, logit_bias={top[1]: -100.0}),  # the most likely one is gone
            _req("c", temperature=0.0, logprobs=0),  # no bias: untouched
            _req("d", temperature=0.9, seed=11, logit_bias={"7": -3.5, 2: 1.25})]  # (keys as JSON gives them)
    res = Sampler(torch.device("cpu"))(logits.clone(), reqs)
    second = logits[1].clone()
    second[top[1]] -= 100.0
    assert res.token_ids[:3] == [low[0], second.argmax().item(), top[2]]
    assert res.logprobs[2] == {top[2]: torch.log_softmax(logits[2], -1)[top[2]].item()}
    biased = logits[3:4].clone()
    biased[0, 7] -= 3.5
    biased[0, 2] += 1.25
    alone = Sampler(torch.device("cpu")).sample_tokens(biased, [_req("d", temperature=0.9, seed=11)])
    assert res.token_ids[3] == alone.item()


def test_allowed_token_ids_keep_only_those_tokens_of_their_row():
    """vLLM's allowed_token_ids: a row draws only among its ids, greedy (the likeliest of them) or seeded (the draw of
    its logits with every other id at -inf), with logit_bias on top; other rows are untouched; ids past the
    vocabulary are ignored; the logprobs returned are the model's own."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 40, generator=g)
    top = logits.argmax(-1).tolist()
    allowed = [3, 17, 29, 1000]
    best = max(allowed[:3], key=lambda t: logits[0, t].item())
    reqs = [_req("a", temperature=0.0, allowed_token_ids=allowed, logprobs=0),
            _req("b", temperature=0.0),
            _req("c", temperature=1.0, seed=4, allowed_token_ids=[8, 9]),
            _req("d", temperature=0.0, allowed_token_ids=[3, 17], logit_bias={17: 100.0})]
    res = Sampler(torch.device("cpu"))(logits.clone(), reqs)
    assert res.token_ids[0] == best and res.token_ids[1] == top[1] and res.token_ids[3] == 17
    assert res.logprobs[0] == {best: torch.log_softmax(logits[0], -1)[best].item()}
    masked = torch.full((1, 40), float("-inf"))
    masked[0, [8, 9]] = logits[2, [8, 9]]
    alone = Sampler(torch.device("cpu")).sample_tokens(masked, [_req("c", temperature=1.0, seed=4)])
    assert res.token_ids[2] == alone.item() and res.token_ids[2] in (8, 9)
    for bad in ([], [-1]):
        with pytest.raises(ValueError, match="allowed_token_ids must be a non-empty list"):
            SamplingParams(allowed_token_ids=bad)


def test_bad_words_mask_the_token_that_would_complete_a_word():
    """vLLM's bad_words: a one-token word is never drawn; a longer word's last token is masked only where the output
    ends with the word's other tokens; other rows untouched."""
    logits = torch.zeros(3, 16)
    logits[:, 4] = 10.0  # the likeliest everywhere
    logits[:, 6] = 9.0

    def req(rid, out, seqs):
        r = Request(rid, [1, 2], SamplingParams(temperature=0.0, bad_words=["w"]))
        r.output_token_ids, r.bad_word_ids = out, seqs
        return r

    rows = [req("one-token word", [1], [[4]]),
            req("prefix made", [7, 2, 3], [[2, 3, 4]]),
            req("prefix not made", [7, 3, 2], [[2, 3, 4], [9, 4]])]
    assert Sampler(torch.device("cpu")).sample_tokens(logits.clone(), rows).tolist() == [6, 6, 4]
    with pytest.raises(ValueError, match="bad_words must be non-empty words"):
        SamplingParams(bad_words=[" "])


def test_min_tokens_forbids_stop_tokens_until_the_output_is_long_enough():
    """vLLM's min_tokens: EOS (unless ignore_eos) and the stop token ids cannot be drawn while the output is
    shorter; from then on they can."""
    logits = torch.zeros(3, 16)
    logits[:, 5] = 10.0  # EOS, by far the likeliest
    logits[:, 9] = 9.0  # a stop token id, next
    logits[:, 3] = 8.0

    def req(rid, made, **sp):
        r = Request(rid, [1, 2], SamplingParams(temperature=0.0, stop_token_ids=[9], **sp), eos_token_ids=(5,))
        r.output_token_ids = [3] * made
        return r

    rows = [req("short", 1, min_tokens=2), req("long enough", 2, min_tokens=2),
            req("ignore eos", 0, min_tokens=2, ignore_eos=True)]
    assert Sampler(torch.device("cpu")).sample_tokens(logits.clone(), rows).tolist() == [3, 5, 5]
    with pytest.raises(ValueError, match="logit_bias values must be in"):
        SamplingParams(logit_bias={1: 101})
    with pytest.raises(ValueError, match="token ids"):
        SamplingParams(logit_bias={"x": 1})

