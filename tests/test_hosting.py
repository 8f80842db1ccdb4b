"""A worker's models: two tiny real models in one MultiModelEngine (token policy) and a paced one beside it,
hosted through the same calls."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from controller.config import EngineOptions
from controller.hosting import GpuSettings, HostedModels
from token_scheduler.engine import EngineConfig, LLMEngine
from token_scheduler.policies.slo import ModelSLO
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


def test_models_share_one_pooled_engine(make_tiny, request):
    """Two models whose weights cannot both be in the budget: registered (host copies, no VRAM), then run in
    one pooled engine whose weight slots hold one model at a time -- token for token what each makes alone."""
    from gpu_pool.arena import MiB

    paths = {"a": make_tiny("qwen2"), "b": make_tiny("qwen3")}  # 2 MiB slots each
    ns = f"test-{uuid.uuid4().hex[:10]}"
    # 4 MiB arena: a 2 MiB KV region (64 pages, rounded up to the alignment) and one 2 MiB weight slot
    hm = HostedModels("cpu", GpuSettings(budget_bytes=4 * MiB, kv_cache_gb=64 * 16 * 512 / 1e9, namespace=ns))
    request.addfinalizer(hm.close)  # (an assertion failing half-way left the host copies in /dev/shm)
    assert hm.weight_capacity == 2 * MiB  # before the engine exists: the arena's arithmetic (kv_region_bytes)
    for name, path in paths.items():
        hm.prepare(str(path), EngineOptions())  # the host copy, off the step thread
        eng = hm.host(name, str(path), EngineOptions(max_num_seqs=4), ModelSLO(ttft_s=5.0, tpot_s=0.5))
        assert eng.max_model_len > 0
    paced = EngineOptions(kind="pace", pace_s_per_token=0.0)
    hm.prepare(None, paced)
    hm.host("p", None, paced, None)
    assert set(hm.kinds["llm"].engines) == {"a", "b"} and hm.names() == ["a", "b", "p"]

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
    mm = hm.kinds["llm"]
    assert all(n > 0 for n in mm.steps_per_model.values())
    assert mm.memory.weight_capacity == 2 * MiB and mm.switches > 0 and mm.memory.stats.evictions > 0
    st = hm.snapshot()
    assert st["registered"] == ["a", "b", "p"] and st["vram"]["budget_bytes"] == 4 * MiB
    assert len(st["resident"]) <= 2 and st["timeline"] and {r[1] for r in st["timeline"]} == {"a", "b", "p"}
    kinds = {e["kind"] for e in hm.drain_events()}
    assert {"register", "switch", "load", "evict"} <= kinds and hm.drain_events() == []
    est = hm.stats()["a"]
    assert est["prefill_s_per_token"] >= 0 and est["resident"] in (0.0, 1.0)
    assert set(hm.stats()) == {"a", "b", "p"} and all(s["step_s"] > 0 for s in hm.stats().values())
    assert hm.round_s > 0  # measured: how long a model waits through the others' turns

    hm.add_request("a", "late", prompt, GREEDY)
    hm.unload("a")
    assert "a" not in hm and set(hm.kinds["llm"].engines) == {"b"}
    hm.unload("b")
    hm.unload("p")
    assert hm.kinds == {} and hm.names() == [] and not hm.busy()
    assert not (Path("/dev/shm") / f"tokenpool-{ns}").exists()  # the host copies are gone with the last holder


def test_plan_ahead_follows_the_gpu_settings(make_tiny):
    """`gpus.plan_ahead` reaches the pooled engine a worker builds: unset, the default (on: early plans run); false,
    off (none is made); the tokens are the same either way."""
    from controller.config import ServerConfig
    from gpu_pool.arena import MiB

    assert ServerConfig.model_validate({"gpus": {"plan_ahead": False}}).gpus.plan_ahead is False
    assert ServerConfig.model_validate({}).gpus.plan_ahead is None  # None: $TOKENPOOL_PLAN_AHEAD, on by default
    path = make_tiny("qwen2")
    prompt = [5, 9, 13, 17]
    outs = []
    for setting, on in ((None, True), (False, False)):
        ns = f"test-{uuid.uuid4().hex[:10]}"
        hm = HostedModels("cpu", GpuSettings.from_dict({"budget_bytes": 4 * MiB, "kv_cache_gb": 64 * 16 * 512 / 1e9,
                                                        "namespace": ns, "plan_ahead": setting}))
        hm.prepare(str(path), EngineOptions())
        hm.host("a", str(path), EngineOptions(max_num_seqs=4), ModelSLO(ttft_s=5.0, tpot_s=0.5))
        for i in range(2):
            hm.add_request("a", f"a{i}", prompt, GREEDY)
        done = {}
        while hm.busy():
            done.update({o.request_id: o.outputs[0].token_ids for o in hm.step()[0] if o.finished})
        mm = hm.kinds["llm"]
        assert mm.plan_ahead is on and (mm.snapshot()["counters"]["ahead_used"] > 0) is on
        outs.append(done)
        hm.unload("a")
    assert outs[0] == outs[1] and len(outs[0]) == 2


def test_policy_options_reach_the_pooled_engine_and_bad_ones_are_refused(make_tiny, monkeypatch):
    """`gpus.policy_options` (else $TOKENPOOL_POLICY_OPTIONS) are the pooled engine's policy knobs; an unknown option
    or one of the wrong type is a configuration error naming it, and the baselines take none."""
    import pytest
    from pydantic import ValidationError

    from controller.config import ServerConfig
    from gpu_pool.arena import MiB

    ok = ServerConfig.model_validate({"gpus": {"policy_options": {"need_margin_s": 2.0, "hop": False}}})
    assert ok.gpus.policy_options == {"need_margin_s": 2.0, "hop": False}
    for bad, says in (({"nope": 1.0}, "no option 'nope'"), ({"need_margin_s": "x"}, "must be a float"),
                      ({"hop": 1}, "must be a bool"), ({"need_rule": "sometimes"}, "must be one of pressure, always")):
        with pytest.raises(ValidationError, match=says):
            ServerConfig.model_validate({"gpus": {"policy_options": bad}})
    with pytest.raises(ValidationError, match="no option 'headroom'"):
        ServerConfig.model_validate({"gpus": {"policy": "request", "policy_options": {"headroom": 1.0}}})

    path = make_tiny("qwen2")
    monkeypatch.setenv("TOKENPOOL_POLICY_OPTIONS", '{"need_margin_s": 1.5, "max_round_s": 3.0}')
    for options, margin, rounds in ((None, 1.5, 3.0), ({"need_margin_s": 6.0}, 6.0, 4.0)):  # config over the env
        ns = f"test-{uuid.uuid4().hex[:10]}"
        hm = HostedModels("cpu", GpuSettings.from_dict({"budget_bytes": 4 * MiB, "kv_cache_gb": 64 * 16 * 512 / 1e9,
                                                        "namespace": ns, "policy_options": options}))
        hm.prepare(str(path), EngineOptions())
        hm.host("a", str(path), EngineOptions(max_num_seqs=4), ModelSLO(ttft_s=5.0, tpot_s=0.5))
        cfg = hm.kinds["llm"].policy.cfg
        assert (cfg.need_margin_s, cfg.max_round_s) == (margin, rounds)
        hm.add_request("a", "r", [5, 9, 13], GREEDY)
        while hm.busy():
            hm.step()
        hm.unload("a")
    monkeypatch.setenv("TOKENPOOL_POLICY_OPTIONS", "[1, 2]")
    hm = HostedModels("cpu", GpuSettings.from_dict({"budget_bytes": 4 * MiB, "namespace": f"t-{uuid.uuid4().hex[:8]}"}))
    with pytest.raises(ValueError, match="must be a JSON object"):
        hm.prepare(str(path), EngineOptions())
        hm.host("a", str(path), EngineOptions(max_num_seqs=4), ModelSLO(ttft_s=5.0, tpot_s=0.5))


def test_the_cpu_workers_default_arena_follows_the_machines_memory(monkeypatch, tmp_path):
    """The CPU worker's arena by default was 8 GiB whatever the machine: on a 7.5 GB one the arena and the host cache's
    copies (each model in both) could outgrow its memory, the OOM killer ending the worker where Ollama refuses the
    load. Now 8 GB or a quarter of the memory, the smaller -- the cgroup's limit counting where it is lower (a
    container). A GPU's default is unchanged (its free memory less a margin)."""
    from controller import hosting
    from gpu_pool import inventory

    monkeypatch.setattr(inventory, "CGROUP_ROOT", str(tmp_path))
    monkeypatch.setattr(inventory, "PROC_CGROUP", str(tmp_path / "self_cgroup"))
    (tmp_path / "self_cgroup").write_text("")  # no cgroup (whatever the machine running this test has)
    for total, want in ((int(7.5e9), int(7.5e9 / 4)), (64 << 30, 8 * 10**9)):
        monkeypatch.setattr(inventory, "meminfo", lambda total=total: {"MemTotal": total})
        assert hosting.default_budget("cpu", 0) == want
    monkeypatch.setattr(inventory, "meminfo", lambda: {"MemTotal": 64 << 30})
    (tmp_path / "memory.max").write_text("4000000000\n")  # a container's cgroup (v2, its own namespace)
    (tmp_path / "self_cgroup").write_text("0::/\n")
    assert hosting.default_budget("cpu", 0) == 10**9
    assert hosting.default_budget("cuda:0", 80 << 30) == (80 << 30) - int(0.05 * (80 << 30))


def test_a_model_with_a_far_larger_kv_token_loads_after_a_small_one(make_tiny, request):
    """The pooled engine's KV pages were 16 tokens of the first model registered: a model registered after it whose
    one token of KV is larger than that page could never load ("one token of KV (46080 B) is larger than a page (8192
    B)": `tokenpool serve TINY SMOLLM2` failed SmolLM2's load for ever; on GPUs a 0.5B then a 32B). The controller now
    sends the largest KV token of the models it serves (GpuSettings.kv_elems_per_token) and a page holds a few of
    them: the larger model loads, and answers token for token as alone."""
    from controller.hosting import MIN_PAGE_TOKENS
    from tokenpool.models import kv_elems_per_token

    small, large = make_tiny("qwen2"), make_tiny("qwen3", size="small")
    assert kv_elems_per_token(large) > 16 * kv_elems_per_token(small)  # (past one page of the small model's tokens)
    opts = EngineOptions(max_num_seqs=2, max_model_len=64)
    for elems in (0, kv_elems_per_token(large)):
        ns = f"test-{uuid.uuid4().hex[:10]}"
        hm = HostedModels("cpu", GpuSettings(budget_bytes=256 * 2**20, kv_cache_gb=0.02, namespace=ns,
                                             kv_elems_per_token=elems))
        request.addfinalizer(hm.close)
        for name, path in (("s", small), ("l", large)):
            hm.prepare(str(path), opts)
            if name == "l" and not elems:
                with pytest.raises(ValueError, match="larger than a page"):
                    hm.host(name, str(path), opts, ModelSLO(ttft_s=5.0, tpot_s=0.5))
                break
            hm.host(name, str(path), opts, ModelSLO(ttft_s=5.0, tpot_s=0.5))
        if not elems:
            hm.close()
            continue
        assert hm.kinds["llm"].memory.page_bytes >= MIN_PAGE_TOKENS * elems * 4
        prompt = [5, 9, 13, 17]
        hm.add_request("l", "l0", prompt, GREEDY)
        done = {}
        while hm.busy():
            outs, _ = hm.step()
            done.update({o.request_id: o.outputs[0].token_ids for o in outs if o.finished})
        assert done["l0"] == _alone(large, prompt)
