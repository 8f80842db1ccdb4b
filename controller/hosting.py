"""The models one engine worker hosts, and its step.

Models with weights live in one `MultiModelEngine` with the token-level policy: when the controller places
several models on one worker, the policy picks the model of every step (token-level interleaving under each
model's TTFT/TPOT SLO) instead of the worker stepping one engine per model in turn. PaceEngine models (the
load test's, no weights) cannot live in it and are stepped beside it.

Threading contract (the worker's): `host`, `step` and `unload` run between steps, never two at once --
`host` and `step` on the step thread, `unload`, `add_request` and `abort` on the event loop while no step
runs. `MultiModelEngine` builds each model's `LLMEngine` itself, so a load there holds the step thread:
the other models wait for it (seconds for a large model on a GPU).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # token_scheduler imports torch: only when a model with weights is hosted
    from token_scheduler.request import RequestOutput, SamplingParams

POLICY = "token"


def engine_config(path: str | None, opts: dict[str, Any], device: str):
    """token_scheduler.EngineConfig from the controller's EngineOptions (as a dict)."""
    from token_scheduler import EngineConfig

    dtype = opts.get("dtype") or "auto"
    if dtype == "auto":
        dtype = "fp32" if device == "cpu" else "bf16"
    kw = {k: opts[k] for k in ("block_size", "num_kv_blocks", "max_num_seqs", "max_num_batched_tokens",
                               "max_model_len", "kv_cache_memory_gb", "cuda_graphs", "seed")
          if opts.get(k) is not None}
    return EngineConfig(model=path, device=device, dtype=dtype, **kw)


def pace_engine(path: str | None, opts: dict[str, Any]):
    from load_tests.pace_engine import PaceEngine

    return PaceEngine(path, s_per_token=opts.get("pace_s_per_token", 0.02),
                      prefill_s_per_token=opts.get("pace_prefill_s_per_token", 0.0),
                      max_num_seqs=opts.get("max_num_seqs", 64), max_model_len=opts.get("max_model_len") or 4096,
                      seed=opts.get("seed", 0), stamp=opts.get("pace_stamp", False))


def model_slo(slo: dict[str, float] | None):
    from token_scheduler.policies import ModelSLO

    return ModelSLO(**slo) if slo else ModelSLO()


class HostedModels:
    def __init__(self, device: str):
        self.device = device
        self.multi = None  # MultiModelEngine, made with the first model that has weights
        self.paced: dict[str, Any] = {}
        self.engines: dict[str, Any] = {}  # every hosted model -> its own engine (limits, stats)
        self.step_s: dict[str, float] = {}  # EWMA of one step of each model
        # EWMA of the time from one step of a model to its next while it has work: the round it waits through
        # while the others take their turns (the controller's TTFT estimate needs it; one step is not a round)
        self.round_s = 0.0
        self._waiting_since: dict[str, float] = {}  # model -> start of its last step, while it has work

    def __contains__(self, name: str) -> bool:
        return name in self.engines

    def names(self) -> list[str]:
        return sorted(self.engines)

    # --- models ---
    def host(self, name: str, path: str | None, opts: dict[str, Any], slo: dict[str, float] | None):
        """Load a model with weights into the multi-model engine (step thread, between steps)."""
        from token_scheduler.multi_engine import MultiModelEngine

        cfg = engine_config(path, opts, self.device)
        if self.multi is None:
            self.multi = MultiModelEngine({name: cfg}, policy=POLICY, slos={name: model_slo(slo)}, device=self.device)
        else:
            self.multi.add_model(name, cfg, model_slo(slo))
        self.engines[name] = eng = self.multi.engines[name]
        return eng

    def add_paced(self, name: str, eng: Any) -> None:
        self.paced[name] = self.engines[name] = eng

    def unload(self, name: str) -> None:
        """Stop hosting `name` (its unfinished requests are dropped: the caller answers them)."""
        if self.engines.pop(name, None) is None:
            return
        self.step_s.pop(name, None)
        self._waiting_since.pop(name, None)
        if self.paced.pop(name, None) is not None:
            return
        self.multi.remove_model(name)
        if not self.multi.engines:
            self.multi.close()
            self.multi = None

    # --- requests ---
    def add_request(self, name: str, rid: str, prompt_ids: list[int], params: SamplingParams) -> None:
        if name in self.paced:
            self.paced[name].add_request(rid, prompt_ids, params)
        else:
            self.multi.add_request(rid, prompt_ids, params, model=name)

    def abort(self, name: str, rid: str) -> None:
        if name in self.paced:
            self.paced[name].abort_request(rid)
        elif self.multi is not None and name in self.engines:
            self.multi.abort_request(rid)

    # --- the step ---
    def busy(self) -> bool:
        return (self.multi is not None and self.multi.has_unfinished_requests()) or any(
            e.has_unfinished_requests() for e in self.paced.values())

    def step(self) -> tuple[list[RequestOutput], bool]:
        """One multi-model step (the policy's pick) and one step of each busy paced model.

        Returns the outputs and whether anything ran: the policy may plan an idle step (no room for any batch
        by its estimate), and the caller should not spin on those.
        """
        outs: list[RequestOutput] = []
        ran = False
        mm = self.multi
        if mm is not None and mm.has_unfinished_requests():
            n, t0 = mm.timing["steps"], time.perf_counter()
            outs += mm.step()
            if mm.timing["steps"] > n:
                ran = True
                self._observe(mm.trace[-1], t0, time.perf_counter() - t0)
            mm.trace.clear()  # a list of every step's model: unbounded in a server; only the last one is used
        for name, eng in list(self.paced.items()):
            if eng.has_unfinished_requests():
                t0 = time.perf_counter()
                outs += eng.step()
                self._observe(name, t0, time.perf_counter() - t0)
                ran = True
        return outs, ran or bool(outs)

    def _observe(self, name: str, t0: float, dt: float) -> None:
        prev = self.step_s.get(name)
        self.step_s[name] = dt if prev is None else 0.8 * prev + 0.2 * dt
        last = self._waiting_since.pop(name, None)
        if last is not None:
            gap = t0 - last
            self.round_s = gap if self.round_s == 0.0 else 0.9 * self.round_s + 0.1 * gap
        if self.engines[name].has_unfinished_requests():
            self._waiting_since[name] = t0

    def stats(self) -> dict[str, dict[str, float]]:
        return {k: dict(e.stats(), step_s=self.step_s.get(k, 0.0)) for k, e in self.engines.items()}
