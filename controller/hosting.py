"""The models one engine worker hosts, and its step: one pooled, token-level engine per GPU.

Every model the controller registers on this worker lives in one `MultiModelEngine` in pooled mode: an arena
of the GPU budget (a KV region shared by every model, plus weight slots), weights in the node-shared pinned
host cache (one host copy per checkpoint per node, whichever worker of the node loaded it first), and the
token-level policy choosing each step's model. Hosting a model means *registering* it: its host copy is
loaded, no VRAM is taken; weights come into a slot and go as the policy plans (prefetch while another model
decodes), and KV of idle models is swapped to host pages (dropped and recomputed only where those are full). More model bytes than VRAM is the
normal case. On CPU the same pooled engine runs over host memory (so CI exercises the served path).

Each engine kind (`KINDS`: "llm", the pooled engine above; "pace", token_scheduler/pace.py's paced models
without weights) has one multi-model engine per worker with `MultiModelEngine`'s surface, made with the
kind's first model; everything here goes through that surface, whatever the kind.

Threading contract (the worker's): `host`, `step` and `unload` run between steps, never two at once --
`host` and `step`/`step_tokens` on the step thread; `unload`, `add_request`, `abort` and `stop_requests` on
the event loop while no step runs, nor the worker's snapshot (`stats`, `snapshot`: on the step thread, between
steps). `outputs` (the text of a step's token ids) reads only requests, not the engines' queues: the event loop
runs it while the next step runs. A registration reads the host copy first on
the load thread (`prepare`: seconds for a large model from disk, once per node), so the step thread only
attaches it and the other models keep stepping.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from controller.admission import ewma
from controller.config import EngineOptions, env_policy_options
from gpu_pool.inventory import host_memory_bytes  # MemTotal, or a container's cgroup limit (torch-free)
from gpu_pool.placement import kv_region_bytes
from tokenpool import imports
from tokenpool.models import dtype_bytes, run_dtype

if TYPE_CHECKING:  # token_scheduler's engines import torch: only when a model with weights is hosted
    from token_scheduler.policies.slo import ModelSLO
    from token_scheduler.request import RequestOutput, SamplingParams

GiB = 1 << 30
GPU_MARGIN_BYTES = 4 * GiB  # left outside the arena: activations, CUDA graphs' pools, the CUDA contexts (the
# worker's, and its standby's: controller/pool.py)
GPU_MARGIN_FRAC = 0.05
CPU_ARENA_MAX_BYTES = 8 * 10**9  # the CPU worker's arena by default: this, or CPU_ARENA_FRAC of the memory if less
CPU_ARENA_FRAC = 0.25


@dataclass(frozen=True)
class GpuSettings:
    """How a worker uses its GPU: its pooled engine's arena, host cache and policy (the configuration's `gpus:`,
    sent by the controller in `Registered.settings`)."""

    budget_bytes: int | None = None  # the arena (weights + KV); None: free device memory less a margin
    kv_cache_gb: float | None = None  # the KV region inside it; None: 10% of the budget, 1..16 GB (CPU 0.5)
    host_cache_gb: float | None = None  # node-wide pinned host cache; None: 60% of the node's memory (a container's limit where lower)
    namespace: str = "tokenpool"  # workers of a node with the same namespace share host copies
    policy: str = "token"
    plan_ahead: bool | None = None  # the policy plans step N+1 beside step N; None: $TOKENPOOL_PLAN_AHEAD (on)
    policy_options: dict | None = None  # the policy's knobs; None: $TOKENPOOL_POLICY_OPTIONS (JSON), else defaults
    kv_elems_per_token: int = 0  # the largest KV elements a token of the models the controller serves (min_page_bytes)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> GpuSettings:
        return cls(**{k: v for k, v in (d or {}).items() if k in cls.__dataclass_fields__})


def default_budget(device: str, free_bytes: int) -> int:
    """The arena when none is configured: the device's free memory less a safety margin."""
    if device.startswith("cuda"):
        return max(GiB, int(free_bytes - max(GPU_MARGIN_BYTES, GPU_MARGIN_FRAC * free_bytes)))
    # CPU: virtual until touched (torch.empty), but weights and KV touch what they use, beside the host cache's own
    # copy (60% of RAM at most): 8 GB on a machine under 20 GB let the arena and the host copies outgrow its
    # memory (the OOM killer, not an eviction), where Ollama refuses a load past the memory available
    return min(CPU_ARENA_MAX_BYTES, int(CPU_ARENA_FRAC * host_memory_bytes()))


def default_kv_gb(device: str, budget: int) -> float:
    if not device.startswith("cuda"):
        return min(0.5, budget / 4e9)
    return min(16.0, max(1.0, 0.1 * budget / 1e9))


def engine_config(path: str | None, opts: EngineOptions, device: str):
    """token_scheduler.EngineConfig from the controller's EngineOptions (kind "llm")."""
    from token_scheduler import EngineConfig

    dtype = run_dtype(opts.dtype, device)
    # (no KV size or block size of a model's own: its KV is the pool's, carved by the worker; EngineOptions refuses them)
    unset_is_engines = dict(max_num_batched_tokens=opts.max_num_batched_tokens, max_model_len=opts.max_model_len,
                            cuda_graphs=opts.cuda_graphs, max_loras=opts.max_loras)
    return EngineConfig(model=path, device=device, dtype=dtype, max_num_seqs=opts.max_num_seqs, seed=opts.seed,
                        enable_prefix_caching=opts.enable_prefix_caching, max_lora_rank=opts.max_lora_rank,
                        **{k: v for k, v in unset_is_engines.items() if v is not None})


def pace_config(path: str | None, opts: EngineOptions, device: str):
    """token_scheduler.pace.PaceConfig from the controller's EngineOptions (kind "pace")."""
    from token_scheduler.pace import PaceConfig

    return PaceConfig(path, s_per_token=opts.pace_s_per_token, prefill_s_per_token=opts.pace_prefill_s_per_token,
                      max_num_seqs=opts.max_num_seqs, max_model_len=opts.max_model_len or PaceConfig.max_model_len,
                      stamp=opts.pace_stamp)


# A worker's first imports of torch and of what is built on it: one thread at a time (tokenpool.imports, whose lock
# this is: transformers' names are resolved under it too). The warm-up imports them on its own thread while the
# worker's other threads start (the event loop measuring the device, the step and load threads binding it).
_IMPORTS = imports.LOCK
_torch: Any = None
_engine_imported = False


def import_torch() -> Any:
    """torch, imported whole before it is returned: the first caller imports it (under `_IMPORTS`), any other thread
    meanwhile waits for that import. Every first use of torch on a worker's threads goes through here."""
    global _torch
    if _torch is None:
        with _IMPORTS:
            if _torch is None:
                import torch

                _torch = torch
    return _torch


def import_engine() -> None:
    """torch and the modules hosting any kind imports with it (the tokenizer's library, the engines), imported once,
    on one thread at a time (`import_torch`); transformers' lazy module imported on two threads at once came back half
    made ("cannot import name 'AutoConfig'")."""
    global _engine_imported
    if _engine_imported:
        return
    import_torch()
    with _IMPORTS:
        if not _engine_imported:
            # (No architecture's config class: llama's module imports transformers' activations and with them
            # torch.distributed.tensor, ~0.9 s of a core, which a saved checkpoint's config.json is read without:
            # `ModelConfig.from_json`.)
            imports.transformers("AutoTokenizer")
            import token_scheduler.multi_engine  # noqa: F401
            import token_scheduler.pace  # noqa: F401

            _engine_imported = True


def warm_up(device: str) -> None:
    """A worker's start-up before its first registration, done ahead by a standby (controller/pool.py): the
    imports hosting any kind needs (torch, the engine, the tokenizer's library, on CUDA the Triton kernels'
    module: `import_engine`, one thread at a time) and, on CUDA, the context and cuBLAS (loaded on the first
    matmul). No device memory beyond the context and a few MB is taken: the arena is made at the first
    registration."""
    torch = import_torch()
    import_engine()

    if not device.startswith("cuda"):
        return
    from token_scheduler.runner import triton_available

    triton_available()
    dev = torch.device(device)
    torch.cuda.set_device(dev)
    torch.cuda.mem_get_info(dev)  # creates the context
    x = torch.ones(8, 8, device=dev)
    (x @ x).sum().item()
    del x
    torch.cuda.empty_cache()


def _pooled(hm: HostedModels):
    from token_scheduler.multi_engine import MultiModelEngine

    s, b = hm.settings, hm.budget_bytes
    host = f"{s.host_cache_gb}GB" if s.host_cache_gb else 0.6
    return MultiModelEngine({}, policy=s.policy, device=hm.device, gpu_budget=b, kv_cache_gb=hm.kv_gb(b),
                            host_budget=host, host_namespace=s.namespace, plan_ahead=s.plan_ahead,
                            policy_kw=_policy_kw(s), min_page_bytes=min_page_bytes(s, hm.device))


# A KV page holds at least this many tokens of the largest model the controller serves (`min_page_bytes`).
MIN_PAGE_TOKENS = 8


def min_page_bytes(s: GpuSettings, device: str) -> int:
    """The pooled engine's smallest KV page: MIN_PAGE_TOKENS tokens of the largest model served, at the dtype a model
    runs in by default here (fp32 on the CPU, bf16 on a GPU). Pages are sized by the first model registered (16 of its
    tokens): a 0.5B first left a 32B, whose token of KV is 21 times the 0.5B's, no page it fits, never loading."""
    return MIN_PAGE_TOKENS * s.kv_elems_per_token * dtype_bytes("auto", device)


def _policy_kw(s: GpuSettings) -> dict:
    """The pooled engine's policy options: the configuration's, else $TOKENPOOL_POLICY_OPTIONS, checked."""
    from token_scheduler.policies import policy_options

    opts = s.policy_options if s.policy_options is not None else env_policy_options()
    return policy_options(s.policy, opts)


def _read_host_copy(mm, cfg) -> None:
    mm.memory.cache.get(cfg.model, cfg.torch_dtype)
    mm.tokenizer(cfg.model)


def _paced(hm: HostedModels):
    from token_scheduler.pace import PacedModels

    return PacedModels(hm.device)


@dataclass(frozen=True)
class EngineKind:
    """How a worker hosts one kind of engine (EngineOptions.kind)."""

    make: Callable[[HostedModels], Any]  # the kind's multi-model engine (MultiModelEngine's surface)
    config: Callable[[str | None, EngineOptions, str], Any]  # one model's config for it: (path, options, device)
    prepare: Callable[[Any, Any], None]  # (engine, config), off the step thread: what registering reads (host copy,
    # tokenizer)


KINDS = {"llm": EngineKind(_pooled, engine_config, _read_host_copy),
         "pace": EngineKind(_paced, pace_config, lambda eng, cfg: eng.prepare(cfg))}


class HostedModels:
    def __init__(self, device: str, settings: GpuSettings | None = None, free_bytes: int = 0):
        self.device = device
        self.settings = settings or GpuSettings()
        self.free_bytes = free_bytes
        self.kinds: dict[str, Any] = {}  # engine kind -> its multi-model engine, while it hosts a model
        self.engines: dict[str, Any] = {}  # every hosted model -> its own engine (limits, stats)
        self._kind: dict[str, str] = {}  # every hosted model -> its kind
        self.step_s: dict[str, float] = {}  # EWMA of one step of each model
        # EWMA of the time from one step of a model to its next while it has work: the round it waits through
        # while the others take their turns (the controller's TTFT estimate needs it; one step is not a round)
        self.round_s = 0.0
        self._waiting_since: dict[str, float] = {}  # model -> start of its last step, while it has work
        self.events: list[dict] = []  # since the last drain (those of kinds' engines closed since)

    def __contains__(self, name: str) -> bool:
        return name in self.engines

    def names(self) -> list[str]:
        return sorted(self.engines)

    @property
    def budget_bytes(self) -> int:
        s = self.settings
        return s.budget_bytes or default_budget(self.device, self.free_bytes)

    @property
    def arena_engine(self):
        """The kind's engine whose models have weights (it holds the arena), if one is made."""
        return next((e for e in list(self.kinds.values()) if e.memory is not None), None)

    @property
    def weight_capacity(self) -> int:
        """Bytes of the arena the weight slots may use: what one model's weights must fit. Before the arena is made,
        the arena's own arithmetic with the KV page not known yet (the first model registered fixes it): the most the
        KV region can take, so the estimate is never more than the arena then has (`budget - kv bytes` was up to 2 MiB
        more, and start-up's check passed a model the worker refused)."""
        if self.arena_engine is not None:
            return self.arena_engine.memory.weight_capacity
        b = self.budget_bytes
        return b - kv_region_bytes(int(self.kv_gb(b) * 1e9))

    def kv_gb(self, budget: int) -> float:
        s = self.settings
        return s.kv_cache_gb if s.kv_cache_gb is not None else default_kv_gb(self.device, budget)

    def _engine(self, kind: str):
        if kind not in KINDS:
            raise ValueError(f"unknown engine kind {kind!r}; known: {sorted(KINDS)}")
        if kind not in self.kinds:
            self.kinds[kind] = KINDS[kind].make(self)
        return self.kinds[kind]

    # --- models ---
    def prepare(self, path: str | None, opts: EngineOptions) -> dict[str, float]:
        """Read what registering the model needs (its host copy, its tokenizer) off the step thread, so
        registering it does not hold the other models' steps. Thread-safe: the host cache has its own lock; a
        kind's engine is only made here when it does not exist yet (nothing steps it then). Returns the seconds
        of its phases: the kind's engine (the arena, on the first registration) and the reads."""
        kind = KINDS[opts.kind]
        t0 = time.perf_counter()
        mm = self._engine(opts.kind)
        t1 = time.perf_counter()
        kind.prepare(mm, kind.config(path, opts, self.device))
        return {"make_engine_s": t1 - t0, "read_s": time.perf_counter() - t1}

    def host(self, name: str, path: str | None, opts: EngineOptions, slo: ModelSLO | None,
             loras: dict[str, str] | None = None):
        """Register a model in its kind's engine (step thread, between steps). A model with weights has its host
        copy loaded (or attached, when another worker of the node has it); no VRAM is taken until the policy
        plans a step of it. The phases' seconds are in `add_s[name]` afterwards (kinds that measure them).
        `loras`: LoRA adapters served over it (name -> directory; kind "llm")."""
        mm = self._engine(opts.kind)
        cfg = KINDS[opts.kind].config(path, opts, self.device)
        if loras:
            cfg = dataclasses.replace(cfg, lora_modules=dict(loras))
        mm.add_model(name, cfg, slo)
        self._kind[name] = opts.kind
        self.engines[name] = eng = mm.engines[name]
        return eng

    def add_s(self, name: str) -> dict[str, float]:
        """Seconds of the phases of `name`'s registration in its kind's engine ({} for a kind that does not say)."""
        kind = self._kind.get(name)  # unloaded again already: nothing to say
        return dict(getattr(self.kinds[kind], "add_s", {}).get(name, {})) if kind is not None else {}

    def _of(self, name: str):
        """The engine of the kind hosting `name`."""
        return self.kinds[self._kind[name]]

    def set_pinned(self, name: str, pinned: bool) -> None:
        if name in self.engines:
            self._of(name).set_pinned(name, pinned)

    def retune(self, name: str, slo: ModelSLO, keep_alive_s: float | None) -> None:
        """A hosted model's SLO (what its kind's policy weighs it by) and keep_alive, changed in place: its weights,
        KV and requests stay (requests already admitted keep the SLO they came under)."""
        if name in self.engines:
            mm = self._of(name)
            mm.set_slo(name, slo)
            mm.set_keep_alive(name, keep_alive_s)

    def set_loras(self, name: str, loras: dict[str, str]) -> list[str]:
        """Host exactly these LoRA adapters over `name` (LLMEngine.set_loras); the errors of any not read."""
        if name not in self.engines:
            return []
        if self._kind[name] != "llm":
            return [f"a {self._kind[name]} model has no weights for LoRA adapters"]
        return self.engines[name].set_loras(loras)

    def evict_when_idle(self, name: str) -> None:
        """Evict `name`'s weights once it has no request (its engine kind's rule); not hosted here: nothing."""
        if name in self.engines:
            mm = self._of(name)
            mm.evict_when_idle(name)
            mm.expire()  # (idle now: at once; between steps, as the worker applies its messages)

    def evicting(self) -> set[str]:
        """The models whose `evict_when_idle` has not happened yet (each kind's)."""
        return set().union(*(mm.evicting() for mm in list(self.kinds.values())))

    def tick(self) -> None:
        """Between steps while idle (step thread): loads that landed, and time-based residency (keep_alive)."""
        for mm in list(self.kinds.values()):
            mm.tick()

    def residency(self, name: str, pinned: bool = False, keep_alive_s: float | None = None,
                  preload: bool = False) -> None:
        """A registered model's residency hints: pinned (never evicted), keep_alive (evicted once idle that long),
        preload (weights brought in now, when there is room)."""
        if name not in self.engines:
            return
        mm = self._of(name)
        mm.set_keep_alive(name, keep_alive_s)
        if pinned:
            mm.set_pinned(name, True)
        elif preload:
            mm.preload(name)

    def unload(self, name: str) -> None:
        """Stop hosting `name` (its unfinished requests are dropped: the caller answers them). Its slot, KV
        pages and (when no other registration shares it) its host copy are given back."""
        if self.engines.pop(name, None) is None:
            return
        self.step_s.pop(name, None)
        self._waiting_since.pop(name, None)
        kind = self._kind.pop(name)
        mm = self.kinds[kind]
        mm.remove_model(name)
        if not mm.engines:  # the removed requests' final outputs are the caller's to answer
            self.events += mm.events
            mm.close()
            del self.kinds[kind]

    # --- requests ---
    def add_request(self, name: str, rid: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self._of(name).add_request(rid, prompt_ids, params, model=name)

    def abort(self, name: str, rid: str) -> None:
        if name in self.engines:
            self._of(name).abort_request(rid)

    # --- the step ---
    def busy(self) -> bool:
        return any(mm.has_unfinished_requests() for mm in list(self.kinds.values()))

    def step(self) -> tuple[list[RequestOutput], bool]:
        """One step of each busy kind's engine, detokenized inline (`step_tokens`, `outputs`, `stop_requests`)."""
        stepped, ran = self.step_tokens()
        outs, stops = self.outputs(stepped)
        self.stop_requests(stops)
        return outs, ran

    def step_tokens(self, on_launch: Callable[[], None] | None = None) -> tuple[list[tuple[Any, list]], bool]:
        """One step of each busy kind's engine (the pooled one's: its policy's pick): token ids, no text.

        Returns [(kind's engine, its step's outputs)], for `outputs` (the worker makes the text while the next
        step runs), and whether anything ran: the policy may plan an idle step (no room for any batch by its
        estimate), and the caller should not spin on those. `on_launch`: called when a step's device work is
        queued, before the host waits for it (the worker then makes the previous step's text).
        """
        stepped: list[tuple[Any, list]] = []
        ran = False
        for mm in list(self.kinds.values()):
            if not mm.has_unfinished_requests():
                continue
            n, t0 = mm.timing["steps"], time.perf_counter()
            outs = mm.step_tokens(on_launch)
            if mm.timing["steps"] > n:
                ran = True
                self._observe(mm.trace[-1], t0, time.perf_counter() - t0)
            if outs:
                stepped.append((mm, outs))
        return stepped, ran or bool(stepped)

    @staticmethod
    def outputs(stepped: list[tuple[Any, list]]) -> tuple[list[RequestOutput], list]:
        """The RequestOutputs of `step_tokens`'s outputs (text, stop strings), and the stops to pass to
        `stop_requests` at a step boundary. Reads only the requests (not the engines' queues): it may run while a
        step runs."""
        outs: list[RequestOutput] = []
        stops: list = []
        for mm, raw in stepped:
            o, s = mm.detokenize(raw)
            outs += o
            stops += s
        return outs, stops

    def stop_requests(self, stops: list) -> None:
        """Between steps: finish the requests `outputs` found a stop string in (of models still hosted)."""
        for req, stop in stops:
            if req.model in self.engines:
                self._of(req.model).stop_requests([(req, stop)])

    @property
    def round_estimate_s(self) -> float:
        """For the router: how long a model waits from one of its steps to its next (before any model has waited
        a round, the slowest model's own step is the best guess)."""
        return max(self.round_s, max(self.step_s.values(), default=0.0))

    def _observe(self, name: str, t0: float, dt: float) -> None:
        # (a sample far over the estimate, a pause mid-step, counts as STALL_FACTOR x it: `ewma`)
        self.step_s[name] = ewma(self.step_s.get(name, 0.0), dt, 0.2)
        last = self._waiting_since.pop(name, None)
        if last is not None:
            self.round_s = ewma(self.round_s, t0 - last, 0.1)
        if self.engines[name].has_unfinished_requests():
            self._waiting_since[name] = t0

    # --- what the controller sees ---
    def stats(self) -> dict[str, dict[str, float]]:
        """Per model: the engine's counters, its measured step, and the engine's own numbers for the controller's
        TTFT estimate: seconds per prompt token of prefill, and the load time when its weights are not in VRAM."""
        return {k: dict(e.stats(), step_s=self.step_s.get(k, 0.0), **self._of(k).estimate(k))
                for k, e in self.engines.items()}

    def snapshot(self) -> dict[str, Any]:
        """The worker's state for the admin API (see controller/messages.py Stats.pool): the arena's figures from
        the engine that holds weights, and the models of every kind."""
        wp = self.arena_engine
        if wp is not None:
            st = wp.snapshot()
        else:
            b = self.budget_bytes
            st = {"device": self.device, "active": None, "registered": [], "resident": [], "prefetching": [],
                  "switches": 0, "switch_stall_s": 0.0, "steps": 0, "kv_swapped_out": 0,
                  "vram": {"budget_bytes": b, "weights_bytes": 0, "kv_bytes": 0, "free_bytes": b,
                           "kv_pages_total": 0, "kv_pages_used": 0},
                  "host_cache_bytes": 0, "models": {}}
        st["timeline"] = []
        for mm in list(self.kinds.values()):
            if mm is not wp:
                other = mm.snapshot()
                for k in ("registered", "resident", "prefetching"):
                    st[k] = sorted([*st[k], *other[k]])
                st["models"].update(other["models"])
            st["timeline"] += mm.timeline
            mm.timeline.clear()
        st["weight_capacity_bytes"] = self.weight_capacity
        return st

    def close(self) -> None:
        """Give everything back (worker exit): the arena, host KV pages, the host copies no process holds."""
        self.engines.clear()
        self._kind.clear()
        for mm in self.kinds.values():
            mm.close()
        self.kinds.clear()

    def drain_events(self) -> list[dict]:
        out, self.events = self.events, []
        for mm in list(self.kinds.values()):
            out += mm.events
            mm.events.clear()
        return out
