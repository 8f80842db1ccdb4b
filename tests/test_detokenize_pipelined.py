"""Text made beside the next step (the worker's pipeline) equals text made inline: the same deltas in the same
order, the same final text, token ids and finish reasons. A request a stop string ends emits nothing after its
end although its engine stepped it once more, and its KV is freed."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest

from controller import messages as m
from controller.config import EngineOptions
from load_tests.worker_harness import FakeController, with_worker
from token_scheduler import EngineConfig, LLMEngine, SamplingParams
from token_scheduler.detokenizer import detokenize

GREEDY = dict(temperature=0.0, ignore_eos=True, max_tokens=24)


@pytest.fixture(scope="module")
def model(make_varied):
    return make_varied("qwen2")


@pytest.fixture(scope="module")
def reference(model):
    """Each request's outputs, made inline (LLMEngine.step), and the request set with stop strings cut from the
    texts they make: one early (the request stops mid-generation), one never met, two at once."""
    eng = LLMEngine(EngineConfig(model=str(model), device="cpu", dtype="fp32"))
    tok = eng.tokenizer
    prompts = {f"r{i}": tok.encode(p, add_special_tokens=False)
               for i, p in enumerate(["Hello", "The sea", "abc", "One two"])}
    plain = _inline(eng, {rid: (p, SamplingParams(**GREEDY)) for rid, p in prompts.items()})
    texts = {rid: outs[-1].outputs[0].text for rid, outs in plain.items()}
    assert all(len(t) > 12 for t in texts.values()), texts
    reqs = {
        "r0": (prompts["r0"], SamplingParams(**GREEDY, stop=[texts["r0"][6:9]])),
        "r1": (prompts["r1"], SamplingParams(**GREEDY, stop=["\x07never\x07"], logprobs=2)),
        "r2": (prompts["r2"], SamplingParams(**GREEDY, stop=[texts["r2"][9:11], texts["r2"][4:7]])),
        "r3": (prompts["r3"], SamplingParams(**GREEDY)),
    }
    return reqs, _inline(LLMEngine(EngineConfig(model=str(model), device="cpu", dtype="fp32")), reqs)


def _inline(eng: LLMEngine, reqs: dict) -> dict[str, list]:
    for rid, (prompt, sp) in reqs.items():
        eng.add_request(rid, prompt, sp)
    got = defaultdict(list)
    while eng.has_unfinished_requests():
        for o in eng.step():
            got[o.request_id].append(o)
    return got


def _view(o) -> tuple:
    c = o.outputs[0]
    return o.delta_text, o.delta_token_ids, o.finished, c.finish_reason, c.stop_reason


def test_text_made_a_step_late_is_the_inline_text(model, reference):
    reqs, want = reference
    eng = LLMEngine(EngineConfig(model=str(model), device="cpu", dtype="fp32"))
    live = {rid: eng.add_request(rid, prompt, sp) for rid, (prompt, sp) in reqs.items()}
    got = defaultdict(list)
    unsent = None
    while eng.has_unfinished_requests() or unsent:
        tokens = eng.step_tokens() if eng.has_unfinished_requests() else []
        if unsent:  # the previous step's text, after this step ran: the worker's order
            outs, stops = detokenize(unsent)
            eng.stop_requests(stops)
            for o in outs:
                got[o.request_id].append(o)
        unsent = tokens
    for rid in reqs:
        assert [_view(o) for o in got[rid]] == [_view(o) for o in want[rid]], rid
        assert got[rid][-1].outputs[0].text == want[rid][-1].outputs[0].text
        assert got[rid][-1].outputs[0].token_ids == want[rid][-1].outputs[0].token_ids
    stopped = want["r0"][-1].outputs[0]
    assert stopped.finish_reason == "stop" and isinstance(stopped.stop_reason, str)
    assert len(stopped.token_ids) < GREEDY["max_tokens"]
    # the engine stepped it once more before the stop reached it; that token was never emitted
    assert len(live["r0"].output_token_ids) == len(stopped.token_ids) + 1
    assert not eng.scheduler.requests and eng.scheduler.kv.num_used == 0


def test_worker_streams_the_inline_deltas_in_order(model, reference):
    reqs, want = reference

    async def body(ctl: FakeController, worker) -> None:
        ctl.send(m.LoadModel("tiny", str(model), EngineOptions()))
        assert (await ctl.expect(m.ModelLoaded, 60)).ok
        ctl.send(*(m.NewRequest(rid, "tiny", prompt, sp) for rid, (prompt, sp) in reqs.items()))
        got = defaultdict(list)
        while len([r for r, ds in got.items() if ds[-1].finished]) < len(reqs):
            for d in (await ctl.expect(m.Outputs, 60)).deltas:
                assert not (got[d.request_id] and got[d.request_id][-1].finished), f"{d} after the end"
                got[d.request_id].append(d)
        late = [x for x in await ctl.quiet(0.5) if isinstance(x, m.Outputs)]
        assert not late, late
        for rid in reqs:
            ref = want[rid]
            assert [(d.text, d.token_ids, d.finished, d.finish_reason) for d in got[rid]] == [
                (o.delta_text, o.delta_token_ids, o.finished, o.outputs[0].finish_reason) for o in ref], rid
        lps = [pairs for d in got["r1"] for pairs in d.logprobs]
        assert [p[0][0] for p in lps] == want["r1"][-1].outputs[0].token_ids and all(len(p) >= 2 for p in lps)
        for _ in range(100):  # the stop reaches the engine at the next step boundary
            if not worker.models.busy():
                break
            await asyncio.sleep(0.02)
        eng = worker.models.engines["tiny"]
        assert not eng.scheduler.requests and eng.scheduler.kv.num_used == 0

    asyncio.run(with_worker(body))


def test_on_launch_comes_after_the_forward_is_queued_and_before_its_tokens_are_read(model):
    """The worker makes the previous step's text from `on_launch` on: the step's inputs are prepared then."""
    eng = LLMEngine(EngineConfig(model=str(model), device="cpu", dtype="fp32"))
    req = eng.add_request("a", [1, 2, 3], SamplingParams(**GREEDY))
    calls = []
    for n in range(3):
        out = eng.step_tokens(on_launch=lambda: calls.append((req.num_computed_tokens, len(req.output_token_ids))))
        assert out[0].num_output_tokens == n + 1
    # each call saw the step before it: its forward queued, its cursor and tokens not yet advanced
    assert calls == [(0, 0), (3, 1), (4, 2)]


def test_the_prefix_caches_part_rides_the_first_delta_made_a_step_late(model):
    """A request started on cached blocks says so on its first delta and its last (Anthropic's message_start, OpenAI's
    continuous usage), also when the first output was made after the next step had appended a token to the request's
    cumulative list: the worker told the first delta by that list's length, which had run ahead under load, and sent
    0 (the Messages API's message_start then counted the cached tokens as input)."""
    from controller.worker import to_delta

    eng = LLMEngine(EngineConfig(model=str(model), device="cpu", dtype="fp32"))
    prompt = list(range(1, 3 * eng.scheduler.kv.block_size + 2))
    _inline(eng, {"warm": (prompt, SamplingParams(**{**GREEDY, "max_tokens": 1}))})
    eng.add_request("again", prompt, SamplingParams(**{**GREEDY, "max_tokens": 4}))
    deltas, unsent = [], None
    while eng.has_unfinished_requests() or unsent:
        tokens = eng.step_tokens() if eng.has_unfinished_requests() else []
        if unsent:  # the previous step's output, converted after this step appended its token: the worker's order
            outs, _ = detokenize(unsent)
            deltas += [(to_delta(o), len(o.outputs[0].token_ids)) for o in outs]
        unsent = tokens
    cached = 3 * eng.scheduler.kv.block_size
    assert len(deltas) == 4 and deltas[0][1] == 2, "the first output's cumulative list had not run ahead"
    assert [d.num_cached_tokens for d, _ in deltas] == [cached, 0, 0, cached]
