"""Continuous batching, chunked prefill, preemption with KV swap, sampling, stop conditions, streaming text."""

from __future__ import annotations

import random

import pytest

from tests.torch_threads import one_torch_thread  # noqa: F401 (autouse: one torch thread)
from token_scheduler import LLMEngine, SamplingParams
from token_scheduler.engine import EngineConfig
from token_scheduler.request import RequestStatus


def _engine(d, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(d), device="cpu", dtype="fp32", **kw))


def _run_alone(d, prompt, sp, **kw) -> list[int]:
    eng = _engine(d, **kw)
    eng.add_request("solo", prompt, sp)
    toks = None
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                toks = o.outputs[0].token_ids
    return toks


def _run_staggered(eng: LLMEngine, jobs: list[tuple[int, list[int], SamplingParams]]) -> dict[str, list[int]]:
    """jobs: (arrival step, prompt, params); returns token ids per job index."""
    done: dict[str, list[int]] = {}
    step = 0
    pending = sorted(enumerate(jobs), key=lambda x: x[1][0])
    while pending or eng.has_unfinished_requests():
        while pending and pending[0][1][0] <= step:
            i, (_, prompt, sp) = pending.pop(0)
            eng.add_request(f"r{i}", prompt, sp)
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
        step += 1
    return done


@pytest.fixture(scope="module")
def jobs(make_varied):
    d = make_varied("qwen2")
    rng = random.Random(0)
    out = []
    for i in range(8):
        prompt = [rng.randrange(0, 3900) for _ in range(rng.randrange(3, 90))]
        sp = (SamplingParams(temperature=0, max_tokens=rng.randrange(5, 30), ignore_eos=True) if i % 2 == 0
              else SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=100 + i, max_tokens=rng.randrange(5, 30),
                                  ignore_eos=True))
        out.append((rng.randrange(0, 12), prompt, sp))
    return d, out


def test_continuous_batching_changes_nothing(jobs):
    d, js = jobs
    alone = [_run_alone(d, p, sp) for _, p, sp in js]
    # A small token budget forces chunked prefill beside running decodes.
    eng = _engine(d, max_num_batched_tokens=24)
    got = _run_staggered(eng, js)
    for i in range(len(js)):
        assert got[f"r{i}"] == alone[i], f"request {i} differs when batched"
    assert eng.stats()["kv_blocks_used"] == 0


def test_preemption_swaps_kv_and_resumes_identically(jobs):
    d, js = jobs
    alone = [_run_alone(d, p, sp) for _, p, sp in js]
    # 12 blocks of 16 tokens cannot hold 8 concurrent requests: the scheduler must preempt and swap.
    eng = _engine(d, num_kv_blocks=12, num_host_kv_blocks=64, max_num_batched_tokens=64)
    swaps = {"out": 0, "in": 0}
    orig = eng.runner.execute

    held = []  # (the pages the stats say swapped requests hold in host memory, the host pool's pages in use)

    def spy(out, *args):
        swaps["out"] += len(out.swap_out)
        swaps["in"] += len(out.swap_in)
        held.append((eng.scheduler.stats()["kv_blocks_swapped"], eng.scheduler.host_kv.num_used))
        return orig(out, *args)

    eng.runner.execute = spy
    got = _run_staggered(eng, [(0, p, sp) for _, p, sp in js])
    assert swaps["out"] > 0 and swaps["in"] == swaps["out"]
    assert all(a == b for a, b in held) and max(a for a, _ in held) > 0, held
    for i in range(len(js)):
        assert got[f"r{i}"] == alone[i]
    assert eng.scheduler.kv.num_used == 0 and eng.scheduler.host_kv.num_used == 0


def test_preemption_without_swap_space_recomputes(jobs):
    d, js = jobs
    alone = [_run_alone(d, p, sp) for _, p, sp in js[:4]]
    eng = _engine(d, num_kv_blocks=8, num_host_kv_blocks=0)
    got = _run_staggered(eng, [(0, p, sp) for _, p, sp in js[:4]])
    assert [got[f"r{i}"] for i in range(4)] == alone


def test_seed_reproducible_and_distinct(make_varied):
    d = make_varied("llama")
    sp = SamplingParams(temperature=1.0, seed=7, max_tokens=20, ignore_eos=True)
    a = _run_alone(d, "The quick brown fox", sp)
    b = _run_alone(d, "The quick brown fox", sp)
    c = _run_alone(d, "The quick brown fox", SamplingParams(temperature=1.0, seed=8, max_tokens=20, ignore_eos=True))
    assert a == b and a != c


def test_max_tokens_and_stop_token_ids(make_varied):
    d = make_varied("qwen2")
    greedy = _run_alone(d, "abc", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert len(greedy) == 12
    stop_tok = greedy[5]
    first = greedy.index(stop_tok)
    eng = _engine(d)
    eng.add_request("x", "abc", SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_tok], ignore_eos=True))
    outs = [o for _ in range(20) for o in eng.step()]
    last = outs[-1]
    assert last.finished and last.outputs[0].finish_reason == "stop" and last.outputs[0].stop_reason == stop_tok
    assert last.outputs[0].token_ids == greedy[: first + 1]


def test_stop_string_is_cut_and_never_streamed(make_varied):
    d = make_varied("qwen2")
    eng = _engine(d)
    eng.add_request("a", "Hello", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    full = [o for _ in range(40) for o in eng.step()][-1].outputs[0].text
    stop = full[10:14]
    assert stop and stop in full
    eng.add_request("b", "Hello", SamplingParams(temperature=0, max_tokens=30, stop=[stop], ignore_eos=True))
    outs = [o for _ in range(40) for o in eng.step()]
    streamed = "".join(o.delta_text for o in outs)
    final = outs[-1].outputs[0]
    assert final.finish_reason == "stop" and final.stop_reason == stop
    assert final.text == full[: full.index(stop)] == streamed
    assert stop not in streamed


def test_streamed_text_never_splits_utf8(make_varied):
    d = make_varied("mistral")
    eng = _engine(d)
    tok = eng.tokenizer
    # Force multi-byte characters into the output: seeded sampling at high temperature over a model whose
    # vocabulary holds partial UTF-8 byte tokens.
    for i in range(4):
        eng.add_request(f"u{i}", "日本語のテキスト 🎉", SamplingParams(temperature=1.5, seed=i, max_tokens=40, ignore_eos=True))
    deltas: dict[str, list[str]] = {}
    finals = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            deltas.setdefault(o.request_id, []).append(o.delta_text)
            if o.finished:
                finals[o.request_id] = o.outputs[0]
    for rid, parts in deltas.items():
        # (a character the last tokens only began is dropped: IncrementalDetokenizer.step)
        want = tok.decode(finals[rid].token_ids, skip_special_tokens=True).rstrip("\ufffd")
        assert "".join(parts) == finals[rid].text == want
        # every non-final delta is whole characters: no lone replacement char created by a split
        for p in parts[:-1]:
            assert not p.endswith("\ufffd")


def test_a_reply_cut_inside_a_character_ends_before_it(make_varied):
    """A reply whose last token only began a character (max_tokens reached inside an emoji's UTF-8 bytes) ended with
    U+FFFD; vLLM's and Ollama's drop the unfinished character. The emoji is four byte tokens here; the text of two of
    them, finished, is what came before them."""
    from token_scheduler.detokenizer import IncrementalDetokenizer

    tok = _engine(make_varied("qwen2")).tokenizer
    head = tok.encode("ok ", add_special_tokens=False)
    emoji = tok.encode("\U0001f389", add_special_tokens=False)
    assert len(emoji) == 4 and tok.decode(emoji[:1]) == "\ufffd", emoji
    for cut in (1, 2, 3):
        ids = head + emoji[:cut]
        d = IncrementalDetokenizer(tok)
        said = [d.step(ids, n, finished=n == len(ids)) for n in range(1, len(ids) + 1)]
        assert "".join(said) == d.text == "ok ", (cut, said)
    d = IncrementalDetokenizer(tok)
    ids = head + emoji
    assert "".join(d.step(ids, n, finished=n == len(ids)) for n in range(1, len(ids) + 1)) == "ok \U0001f389"


def test_logprobs(make_varied):
    d = make_varied("qwen2")
    eng = _engine(d)
    eng.add_request("l", "Hi", SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True))
    out = [o for _ in range(10) for o in eng.step()][-1].outputs[0]
    assert len(out.logprobs) == 5
    for tid, lp in zip(out.token_ids, out.logprobs):
        assert tid in lp and lp[tid] == max(lp.values()) and lp[tid] <= 0  # greedy picks the top logprob
        assert 3 <= len(lp) <= 4


def test_abort_frees_blocks_and_bad_input_errors(make_varied):
    d = make_varied("qwen2")
    eng = _engine(d, max_model_len=64)
    eng.add_request("a", list(range(20)), SamplingParams(max_tokens=30))
    eng.step()
    assert eng.stats()["kv_blocks_used"] > 0
    eng.abort_request("a")
    outs = eng.step()
    assert outs and outs[0].finished and outs[0].outputs[0].finish_reason == "abort"
    assert eng.stats()["kv_blocks_used"] == 0 and not eng.has_unfinished_requests()
    with pytest.raises(ValueError, match="context"):
        eng.add_request("long", list(range(64)), SamplingParams())
    with pytest.raises(ValueError, match="token ids"):
        eng.add_request("bad", [10**9], SamplingParams())
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)


def test_penalties_change_output(make_varied):
    d = make_varied("qwen3")
    base = _run_alone(d, "aaa", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    pen = _run_alone(d, "aaa", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, repetition_penalty=1.8,
                                              frequency_penalty=1.5))
    assert base != pen
    assert max(pen.count(t) for t in set(pen)) <= max(base.count(t) for t in set(base))


def test_status_enum():
    assert RequestStatus.FINISHED_LENGTH.finished and not RequestStatus.SWAPPED.finished


def test_overlapped_decode_changes_nothing(jobs):
    """Overlap (step N+1 queued with N's sampled ids before N is read) gives each request exactly its
    tokens alone, also when requests join, finish by length or stop token, and when KV runs short."""
    d, js = jobs
    alone = [_run_alone(d, p, sp) for _, p, sp in js]
    stop_tok = alone[0][3]
    js = js + [(2, js[0][1], SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop_tok], ignore_eos=True))]
    alone.append(alone[0][: alone[0].index(stop_tok) + 1])
    for kw in ({"max_num_batched_tokens": 24}, {"num_kv_blocks": 12, "num_host_kv_blocks": 64}):
        eng = _engine(d, overlap=True, **kw)
        fed = []
        orig = eng.runner.launch_decode

        def spy(out, ids=None, orig=orig, fed=fed, **kw):
            fed.append(ids is not None)
            return orig(out, ids, **kw)

        eng.runner.launch_decode = spy
        got = _run_staggered(eng, js)
        for i in range(len(js)):
            assert got[f"r{i}"] == alone[i], f"request {i} differs with overlapped decode ({kw})"
        assert sum(fed) > 20, "no step was fed by the previous step's sampled ids"
        assert eng.scheduler.kv.num_used == 0 and eng._inflight is None


def test_overlapped_decode_abort_and_stop_string(make_varied):
    d = make_varied("qwen2")
    sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    full = _run_alone(d, "abc", sp)
    eng = _engine(d, overlap=True)
    text = eng.tokenizer.decode(full)
    eng.add_request("keep", "abc", sp)
    eng.add_request("gone", "abc", sp)
    for _ in range(6):
        eng.step()
    assert eng._inflight is not None  # a decode step is queued between calls
    eng.abort_request("gone")
    done = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
    assert done["gone"].outputs[0].finish_reason == "abort"
    assert done["keep"].outputs[0].token_ids == full
    assert eng.scheduler.kv.num_used == 0
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    eng.add_request("s", "abc", SamplingParams(temperature=0, max_tokens=30, stop=[stop], ignore_eos=True))
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    assert outs[-1].finished and stop not in outs[-1].outputs[0].text
    assert outs[-1].outputs[0].text == text[: text.index(stop)]
    assert eng.scheduler.kv.num_used == 0


def test_hf_exact_prefill_mode_same_tokens(make_varied):
    """The parity mode calls prefill SDPA as HF does; on CPU fp32 both calls give the same greedy tokens."""
    d = make_varied("qwen3")
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    assert _run_alone(d, "The quick brown fox", sp) == _run_alone(d, "The quick brown fox", sp, hf_exact_prefill=True)


def test_hf_exact_mode_decodes_the_reference_way(make_varied, monkeypatch):
    """hf_exact: decode steps too run the reference ops, one SDPA per sequence (never the batched decode
    attention); on CPU fp32 the tokens are the default path's."""
    from token_scheduler import runner as R

    d = make_varied("qwen2")
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    want = _run_alone(d, "The quick brown fox", sp)
    calls = []
    orig = R.ModelRunner._decode_meta
    monkeypatch.setattr(R.ModelRunner, "_decode_meta", lambda self, g: calls.append(g) or orig(self, g))
    assert _run_alone(d, "The quick brown fox", sp, hf_exact=True) == want
    assert calls == []


def test_a_stop_string_completed_by_the_last_allowed_token_finishes_as_stop(make_varied):
    """A stop string that completes on the max_tokens-th token: the text is cut before it and the finish reason is
    "stop" with the string as stop_reason (as vLLM's), not "length"."""
    d = make_varied("qwen2")
    eng = _engine(d)

    def text(n):
        eng.add_request(f"t{n}", "Hello", SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        return [o for _ in range(n + 10) for o in eng.step()][-1].outputs[0].text

    for n in range(12, 30):
        prev, full = text(n - 1), text(n)
        stop = full[max(0, len(prev) - 1):]
        if len(full) > len(prev) and full.index(stop) == len(full) - len(stop):
            break
    else:
        pytest.fail("no stop string found that only the last token completes")
    eng.add_request("s", "Hello", SamplingParams(temperature=0, max_tokens=n, stop=[stop], ignore_eos=True))
    outs = [o for _ in range(n + 10) for o in eng.step()]
    final = outs[-1].outputs[0]
    assert outs[-1].finished and final.text == full[: len(full) - len(stop)]
    assert (final.finish_reason, final.stop_reason) == ("stop", stop)
    assert not eng.has_unfinished_requests()
    assert eng.scheduler.kv.num_used == 0  # nothing held
