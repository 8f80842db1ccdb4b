"""Three tiny real models interleaved token by token produce exactly what each produces alone."""

from __future__ import annotations

import pytest

from token_scheduler.engine import EngineConfig, LLMEngine
from token_scheduler.multi_engine import MultiModelEngine
from token_scheduler.request import SamplingParams

ARCHS = ("qwen2", "llama", "qwen3")
PROMPTS = ["the quick brown fox", "hello", "a b c d e f g h i j k l m n o p", "tokens, one by one"]


def _params(kind: str, i: int) -> SamplingParams:
    if kind == "greedy":
        return SamplingParams(temperature=0.0, max_tokens=10 + i, ignore_eos=True)
    return SamplingParams(temperature=1.0, top_k=20, seed=1000 + i, max_tokens=10 + i, ignore_eos=True)


_ALONE: dict = {}


def _alone(path, kind: str) -> dict[str, list[int]]:
    if (str(path), kind) in _ALONE:
        return _ALONE[str(path), kind]
    eng = LLMEngine(EngineConfig(model=str(path), device="cpu"))
    for i, p in enumerate(PROMPTS):
        eng.add_request(f"r{i}", p, _params(kind, i))
    out = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                out[o.request_id] = o.outputs[0].token_ids
    _ALONE[str(path), kind] = out
    return out


@pytest.mark.parametrize("kind,max_round_s", [("greedy", 0.0), ("seeded", 0.0), ("greedy", 4.0)])
def test_interleaved_equals_alone(make_tiny, kind, max_round_s):
    paths = {a: make_tiny(a) for a in ARCHS}
    alone = {a: _alone(p, kind) for a, p in paths.items()}
    # max_round_s=0: every turn is one step (strict token-by-token round robin); 4 s: the policy's own quotas
    multi = MultiModelEngine(dict(paths.items()), policy="token", device="cpu",
                             policy_kw={"max_round_s": max_round_s})
    for i, p in enumerate(PROMPTS):  # interleaved arrivals across models
        for a in ARCHS:
            multi.add_request(f"{a}/r{i}", p, _params(kind, i), model=a)
    done = multi.run()
    for a in ARCHS:
        for rid, toks in alone[a].items():
            assert done[f"{a}/{rid}"].outputs[0].token_ids == toks, (a, rid)
            assert done[f"{a}/{rid}"].model == a
    # token by token: the GPU changed hands between models on most steps, and every model ran
    switches = sum(x != y for x, y in zip(multi.trace, multi.trace[1:], strict=False))
    if max_round_s == 0.0:
        assert switches >= len(multi.trace) // 2
    assert all(n > 0 for n in multi.steps_per_model.values())
    assert multi.cost.to_dict()["step"]["qwen2"]["samples"] > 0


def test_add_request_validates_model(make_tiny):
    multi = MultiModelEngine({"a": make_tiny("qwen2")}, device="cpu")
    multi.add_request("x", "hi", SamplingParams(max_tokens=2))  # one model: name optional
    with pytest.raises(ValueError):
        multi.add_request("x", "hi", SamplingParams(max_tokens=2), model="a")
    with pytest.raises(ValueError):
        multi.add_request("y", "hi", SamplingParams(max_tokens=2), model="nope")
    multi.abort_request("x")
    outs = multi.step()
    assert any(o.request_id == "x" and o.finished for o in outs)
    assert not multi.has_unfinished_requests()
