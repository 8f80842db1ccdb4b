"""A worker's Stats count an evict as applied (Stats.pool["evicts"], which the controller's pool view trusts once it
counts every evict it sent: `EnginePool._keep_gone`) only once it happened. An evict waits for its model's requests
(`evict_when_idle`); counted as soon as it arrived, a view taken after the request's last output but before the
evict listed the model resident with every evict counted, and the controller, which had taken the model out of its
view as the request ended, listed it again (`/api/ps` after an Ollama generate with keep_alive 0: test_ux59a failed
so once in CI)."""

from __future__ import annotations

from controller.config import EngineOptions
from tests.test_ctl53_kv_page import cpu_worker
from token_scheduler.policies.slo import ModelSLO
from token_scheduler.request import SamplingParams


def test_an_evict_waiting_for_a_request_is_not_counted_until_it_happened(tiny_model, request):
    w = cpu_worker(tiny_model, request, "ux65i")
    hm = w.models
    opts = EngineOptions(max_num_seqs=2, max_model_len=64)
    hm.prepare(str(tiny_model), opts)
    hm.host("m", str(tiny_model), opts, ModelSLO(ttft_s=5.0, tpot_s=0.5))
    hm.add_request("m", "r1", [1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True))
    while not hm.step()[0]:  # (its weights in, its first output out: the request runs)
        pass
    # the worker applies the controller's EvictModel as its loop does (`Worker._apply_pending`)
    w.models.evict_when_idle("m")
    w._evicts["m"] = w._evicts.get("m", 0) + 1
    stats = w._snapshot().pool
    assert stats["models"]["m"]["state"] == "resident" and stats["evicts"] == {"m": 0}, stats
    while hm.busy():
        hm.step()
    hm.tick()  # (idle: the evict happens)
    stats = w._snapshot().pool
    assert stats["models"]["m"]["state"] != "resident" and stats["evicts"] == {"m": 1}, stats
