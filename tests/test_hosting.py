"""A worker's models: two tiny real models in one MultiModelEngine (token policy) and a PaceEngine beside it."""

from __future__ import annotations

from controller.hosting import HostedModels, pace_engine
from token_scheduler.engine import EngineConfig, LLMEngine
from token_scheduler.request import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def _alone(path, prompt_ids: list[int]) -> list[int]:
    eng = LLMEngine(EngineConfig(model=str(path), device="cpu"))
    eng.add_request("r", prompt_ids, GREEDY)
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                return o.outputs[0].token_ids
    raise AssertionError("no output")


def test_models_share_one_multi_model_engine(make_tiny):
    paths = {"a": make_tiny("qwen2"), "b": make_tiny("llama")}
    hm = HostedModels("cpu")
    for name, path in paths.items():
        eng = hm.host(name, str(path), {"max_num_seqs": 4}, {"ttft_s": 5.0, "tpot_s": 0.5, "priority": 1.0})
        assert eng.max_model_len > 0
    hm.add_paced("p", pace_engine(None, {"kind": "pace", "pace_s_per_token": 0.0}))
    assert set(hm.multi.engines) == {"a", "b"} and hm.names() == ["a", "b", "p"]

    prompt = [5, 9, 13, 17]
    for name in ("a", "b", "p"):
        for i in range(2):
            hm.add_request(name, f"{name}{i}", prompt, GREEDY)
    done: dict[str, list[int]] = {}
    while hm.busy():
        outs, ran = hm.step()
        assert ran
        done.update({o.request_id: o.outputs[0].token_ids for o in outs if o.finished})
    assert sorted(done) == ["a0", "a1", "b0", "b1", "p0", "p1"]
    for name, path in paths.items():  # interleaved with the other model, token for token what it makes alone
        want = _alone(path, prompt)
        assert done[f"{name}0"] == done[f"{name}1"] == want
    assert all(n > 0 for n in hm.multi.steps_per_model.values()) and not hm.multi.trace
    assert set(hm.stats()) == {"a", "b", "p"} and all(s["step_s"] > 0 for s in hm.stats().values())
    assert hm.round_s > 0  # measured: how long a model waits through the others' turns

    hm.add_request("a", "late", prompt, GREEDY)
    hm.unload("a")
    assert "a" not in hm and set(hm.multi.engines) == {"b"}
    hm.unload("b")
    hm.unload("p")
    assert hm.multi is None and hm.names() == [] and not hm.busy()
