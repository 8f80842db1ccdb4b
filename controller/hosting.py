"""The models one engine worker hosts, and its step: one pooled, token-level engine per GPU.

Every model the controller registers on this worker lives in one `MultiModelEngine` in pooled mode: an arena
of the GPU budget (a KV region shared by every model, plus weight slots), weights in the node-shared pinned
host cache (one host copy per checkpoint per node, whichever worker of the node loaded it first), and the
token-level policy choosing each step's model. Hosting a model means *registering* it: its host copy is
loaded, no VRAM is taken; weights come into a slot and go as the policy plans (prefetch while another model
decodes), and KV of idle models is swapped to host pages, never dropped. More model bytes than VRAM is the
normal case. On CPU the same pooled engine runs over host memory (so CI exercises the served path).

PaceEngine models (the load test's, no weights) cannot live in it and are stepped beside it.

Threading contract (the worker's): `host`, `step` and `unload` run between steps, never two at once --
`host` and `step` on the step thread, `unload`, `add_request` and `abort` on the event loop while no step
runs. A registration reads the host copy first on the load thread (`prepare`: seconds for a large model from
disk, once per node), so the step thread only attaches it and the other models keep stepping.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # token_scheduler imports torch: only when a model with weights is hosted
    from token_scheduler.request import RequestOutput, SamplingParams

GiB = 1 << 30
GPU_MARGIN_BYTES = 4 * GiB  # left outside the arena: activations, CUDA graphs' pools, the CUDA context
GPU_MARGIN_FRAC = 0.05


@dataclass(frozen=True)
class PoolSettings:
    """How a worker builds its pooled engine (sent by the controller in `Registered.settings`)."""

    budget_bytes: int | None = None  # the arena (weights + KV); None: free device memory less a margin
    kv_cache_gb: float | None = None  # the KV region inside it; None: 10% of the budget, 1..16 GB (CPU 0.5)
    host_cache_gb: float | None = None  # node-wide pinned host cache; None: 60% of the node's memory
    namespace: str = "tokenpool"  # workers of a node with the same namespace share host copies
    policy: str = "token"

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> PoolSettings:
        return cls(**{k: v for k, v in (d or {}).items() if k in cls.__dataclass_fields__})


def default_budget(device: str, free_bytes: int) -> int:
    """The arena when none is configured: the device's free memory less a safety margin."""
    if device.startswith("cuda"):
        return max(GiB, int(free_bytes - max(GPU_MARGIN_BYTES, GPU_MARGIN_FRAC * free_bytes)))
    return 8 * GiB  # CPU: virtual until touched (torch.empty); weights and KV touch what they use


def default_kv_gb(device: str, budget: int) -> float:
    if not device.startswith("cuda"):
        return min(0.5, budget / 4e9)
    return min(16.0, max(1.0, 0.1 * budget / 1e9))


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
    def __init__(self, device: str, settings: PoolSettings | None = None, free_bytes: int = 0):
        self.device = device
        self.settings = settings or PoolSettings()
        self.free_bytes = free_bytes
        self.multi = None  # the pooled MultiModelEngine, made with the first model that has weights
        self.paced: dict[str, Any] = {}
        self.engines: dict[str, Any] = {}  # every hosted model -> its own engine (limits, stats)
        self.step_s: dict[str, float] = {}  # EWMA of one step of each model
        # EWMA of the time from one step of a model to its next while it has work: the round it waits through
        # while the others take their turns (the controller's TTFT estimate needs it; one step is not a round)
        self.round_s = 0.0
        self._waiting_since: dict[str, float] = {}  # model -> start of its last step, while it has work
        self.events: list[dict] = []  # since the last drain (paced models' registrations; the pool's own)

    def __contains__(self, name: str) -> bool:
        return name in self.engines

    def names(self) -> list[str]:
        return sorted(self.engines)

    @property
    def budget_bytes(self) -> int:
        s = self.settings
        return s.budget_bytes or default_budget(self.device, self.free_bytes)

    @property
    def weight_capacity(self) -> int:
        """Bytes of the arena the weight slots may use: what one model's weights must fit."""
        if self.multi is not None and self.multi.pool is not None:
            return self.multi.pool.weight_capacity
        b = self.budget_bytes
        return b - int(self._kv_gb(b) * 1e9)

    def _kv_gb(self, budget: int) -> float:
        s = self.settings
        return s.kv_cache_gb if s.kv_cache_gb is not None else default_kv_gb(self.device, budget)

    def _make_multi(self):
        from token_scheduler.multi_engine import MultiModelEngine

        s, b = self.settings, self.budget_bytes
        host = f"{s.host_cache_gb}GB" if s.host_cache_gb else 0.6
        return MultiModelEngine({}, policy=s.policy, device=self.device, gpu_budget=b, kv_cache_gb=self._kv_gb(b),
                                host_budget=host, host_namespace=s.namespace)

    # --- models ---
    def prepare(self, path: str | None, opts: dict[str, Any]) -> None:
        """Load (or attach) the model's host copy off the step thread, so registering it does not hold the
        other models' steps. Thread-safe: the host cache has its own lock; the engine is only made here when
        it does not exist yet (nothing steps it then)."""
        if path is None:
            return
        if self.multi is None:
            self.multi = self._make_multi()
        cfg = engine_config(path, opts, self.device)
        self.multi.pool.cache.get(cfg.model, cfg.torch_dtype)

    def host(self, name: str, path: str | None, opts: dict[str, Any], slo: dict[str, float] | None):
        """Register a model with weights in the pooled engine (step thread, between steps): its host copy is
        loaded (or attached, when another worker of the node has it); no VRAM is taken until the policy
        plans a step of it."""
        if self.multi is None:
            self.multi = self._make_multi()
        self.multi.add_model(name, engine_config(path, opts, self.device), model_slo(slo))
        self.engines[name] = eng = self.multi.engines[name]
        return eng

    def set_pinned(self, name: str, pinned: bool) -> None:
        if self.multi is not None and name in self.multi.engines:
            self.multi.set_pinned(name, pinned)

    def tick(self) -> None:
        """Between steps while idle (step thread): time-based residency (keep_alive)."""
        if self.multi is not None:
            self.multi.expire()

    def residency(self, name: str, pinned: bool = False, keep_alive_s: float | None = None,
                  preload: bool = False) -> None:
        """A registered model's residency hints: pinned (never evicted), keep_alive (evicted once idle that long),
        preload (weights brought in now, when there is room)."""
        mm = self.multi
        if mm is None or name not in mm.engines:
            return
        mm.set_keep_alive(name, keep_alive_s)
        if pinned:
            mm.set_pinned(name, True)
        elif preload:
            mm.preload(name)

    def add_paced(self, name: str, eng: Any) -> None:
        self.paced[name] = self.engines[name] = eng
        self.events.append({"kind": "register", "model": name, "t": time.time()})

    def unload(self, name: str) -> None:
        """Stop hosting `name` (its unfinished requests are dropped: the caller answers them). Its slot, KV
        pages and (when no other registration shares it) its host copy are given back."""
        if self.engines.pop(name, None) is None:
            return
        self.step_s.pop(name, None)
        self._waiting_since.pop(name, None)
        if self.paced.pop(name, None) is not None:
            self.events.append({"kind": "unregister", "model": name, "t": time.time()})
            return
        self.multi.remove_model(name)
        if not self.multi.engines:  # the removed requests' final outputs are the caller's to answer
            self.events += self.multi.events
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
        """One pooled step (the policy's pick) and one step of each busy paced model.

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

    # --- what the controller sees ---
    def stats(self) -> dict[str, dict[str, float]]:
        """Per model: the engine's counters, its measured step, and the pool's own numbers for the controller's
        TTFT estimate: seconds per prompt token of prefill, and the load time when its weights are not in VRAM."""
        out = {}
        mm = self.multi
        for k, e in self.engines.items():
            d = dict(e.stats(), step_s=self.step_s.get(k, 0.0))
            if mm is not None and k in mm.engines:
                d.update(mm.estimate(k))
            elif k in self.paced:
                d.update(prefill_s_per_token=e.prefill_s_per_token, load_s=0.0, resident=1.0)
            out[k] = d
        return out

    def pool_state(self) -> dict[str, Any]:
        """The pooled engine's state for the admin API (see controller/messages.py Stats.pool)."""
        mm = self.multi
        if mm is not None:
            st = mm.pool_state()
            st["timeline"] = list(mm.timeline)
            mm.timeline.clear()
        else:
            b = self.budget_bytes
            st = {"device": self.device, "active": None, "registered": [], "resident": [], "prefetching": [],
                  "switches": 0, "switch_stall_s": 0.0, "steps": 0, "kv_swapped_out": 0,
                  "vram": {"budget_bytes": b, "weights_bytes": 0, "kv_bytes": 0, "free_bytes": b,
                           "kv_pages_total": 0, "kv_pages_used": 0},
                  "host_cache_bytes": 0, "models": {}, "timeline": []}
        for name, e in self.paced.items():
            s = e.stats()
            st["registered"] = sorted([*st["registered"], name])
            st["resident"] = sorted([*st["resident"], name])
            st["models"][name] = {"state": "resident", "waiting": s["num_waiting"], "running": s["num_running"],
                                  "swapped": 0, "oldest_wait_s": 0.0, "kv_pages_used": s["kv_blocks_used"],
                                  "kv_swapped": 0, "steps": 0}
        st["weight_capacity_bytes"] = self.weight_capacity
        return st

    def close(self) -> None:
        """Give everything back (worker exit): the arena, host KV pages, the host copies no process holds."""
        self.paced.clear()
        self.engines.clear()
        if self.multi is not None:
            self.multi.close()
            self.multi = None

    def drain_events(self) -> list[dict]:
        out, self.events = self.events, []
        if self.multi is not None:
            out += self.multi.events
            self.multi.events.clear()
        return out
