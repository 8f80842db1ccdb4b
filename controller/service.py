"""The controller: models, tenants, engines, and the path of one request from admission to its last delta.

It owns the live state (on `app.state.controller`), builds snapshots for the pure router/autoscaler/admission
logic and carries out their decisions through the EnginePool.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import json
import logging
import math
import os
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from controller import messages as m
from controller.admission import decide, expected_tokens
from controller.autoscaler import Autoscaler, ModelLoad
from controller.config import SLO, LoraModule, ModelSpec, ServerConfig
from controller.dashboard.activity import Activity
from controller.dashboard.views import CANCELLED, asked_model
from controller.errors import ServingError
from controller.events import EventBus
from controller.heap import collect_all, freeze_long_lived
from controller.metrics import Metrics
from controller.pool import EngineHandle, EnginePool, Replica, Sub, local_devices
from controller.prefix_index import PrefixIndex, prompt_hashes
from controller.router import (
    EngineView,
    ModelInfo,
    ReplicaView,
    pin_blocked,
    pins_on,
    place,
    route,
    starved_by_pins,
    with_registration,
)
from controller.tenants import KEY_USED, Tenant, TenantRegistry
from token_scheduler.block_manager import hash_extra
from token_scheduler.policies.slo import ModelSLO
from token_scheduler.request import SamplingParams
from tokenpool.models import (
    adapter_fit_problem,
    dtype_bytes,
    generation_config_problem,
    kv_elems_per_token,
    model_dir_problem,
)

log = logging.getLogger("tokenpool.controller")


def _ready_on(model: str, engines) -> bool:
    """Whether `model` is registered and ready on one of `engines`."""
    return any(model in e.replicas and e.replicas[model].state == "ready" for e in engines)
LOAD_TIMEOUT_S = 600.0
STARTUP_WAIT_S = 120.0  # how long a request waits for the local workers of a server that is starting
FAILED_AVOID_S = 120.0  # a model shed from an engine (or failing to load there again and again) is placed elsewhere
LOAD_RETRY_S = 10.0  # a model whose registration failed on an engine is tried there again after this, doubled at each
# failure in a row (10, 20, 40, 80, then every FAILED_AVOID_S); meanwhile its requests hear why, and when (a 503)
RETRY_WAIT_S = 15.0  # how long a request whose engine failed waits for another to take it
PLACE_SLICE = 32  # a request's engine requests placed between two yields to the event loop (Controller.generate)
MAX_ATTEMPTS = 3  # engines one engine request is sent to, at most, when each fails it (dies) in turn
CRASH_ATTEMPTS = 2  # ... when its engine's step crashed: the request itself may be what crashes it (each crash ends
# every stream of that worker), so it is sent to one more engine only
RESTART = None  # (in a Generation's sink, for a delta) this choice runs again from its start: drop what it made
# A deleted tenant's requests in flight end this long after the DELETE, unless a namesake made meanwhile holds every
# key it had (the operator's update: DELETE then POST); its keys stop working at once.
REVOKE_GRACE_S = 1.0
_FIRSTS = object()  # (Controller.go_on's grammar left out: the first engine request's)
REVOKED = "the API key was revoked"


def _answers_to(entry: Tenant, t: Tenant) -> bool:
    """Whether a request admitted under tenant entry `entry` answers to entry `t`: `t` is `entry` or one of the
    entries that replaced it since (`Tenant.successor`)."""
    e: Tenant | None = entry
    while e is not None:
        if e is t:
            return True
        e = e.successor
    return False


def _holds(entry: Tenant, key_hash: str | None) -> bool:
    """Whether the tenant a request was admitted under (`entry`) still holds the key it was admitted with (a
    replacement may have dropped it: a rotation); a key not known, whether it kept every key (as `_revoke` judges)."""
    latest = entry.latest()
    if latest is entry:
        return True
    keep = set(latest.spec.key_hashes)
    return key_hash in keep if key_hash is not None else set(entry.spec.key_hashes) <= keep


class Ended(ServingError):
    """A request ended on purpose (an operator's cancel): the answer tells clients not to send it again (OpenAI's and
    Anthropic's clients retry a 503 unless `x-should-retry: false`; a cancelled request came back on its own)."""

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "x-should-retry": "false"}


def _failure(error: str, kind: str | None) -> ServingError:
    """What a request's client is told of an engine request of it that ended with `error` of `kind` (Delta's
    error_kind; Controller.end_requests' kinds among them)."""
    if kind == "revoked":  # its tenant was deleted (Controller.tenant_deleted)
        return ServingError(401, error, code="invalid_api_key")
    if kind == "cancelled":  # an operator's cancel (Controller.cancel)
        return Ended(503, error, code="request_cancelled")
    if kind == "removed":  # its model removed (Controller.remove_model)
        return Ended(503, error, code="model_removed")
    if kind == "shutdown":  # the server's drain ended it: the code a new request gets meanwhile
        return ServingError(503, error, code="shutting_down")
    status = 400 if kind == "invalid" else 503
    return ServingError(status, error if status == 400 else f"engine failure: {error}")


@dataclasses.dataclass
class ModelEntry:
    spec: ModelSpec
    info: ModelInfo
    tokenizer: Any
    max_model_len: int
    hidden_size: int | None = None  # (config.json) the length of its embeddings
    architecture: str | None = None  # (config.json's model_type) llama, qwen2, ...
    outcomes: deque = dataclasses.field(default_factory=lambda: deque(maxlen=200))  # within SLO?
    used_fraction: float | None = None  # EWMA of completion tokens / max_tokens
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    pinned: bool = False  # an operator keeps its weights in VRAM (controller.set_pinned)
    draining: bool = False  # an operator stopped admitting its requests (before removing it, say)
    source: str = "admin"  # "config": from the configuration at start; "admin": registered over the admin API
    kv_elems: int = 0  # KV cache elements one token of it takes (config.json; 0: unknown, or no KV cache)
    last_used: float | None = None  # (monotonic) when a request of it last began or ended: its keep_alive's start
    # The keep_alive an Ollama request of it asked for (seconds; inf: for ever; 0: unload), which replaces its
    # configured one, as Ollama's does for the model's load: requests that send none leave it, and it ends with the
    # first use after it ran out (a new load: the configured one again) or an operator's keep_alive (PATCH). None:
    # the configured one (`keep_alive`)
    asked_keep_alive: float | None = None

    @property
    def keep_alive(self) -> float | None:
        """How long after its last use it is held (its weights resident; a `replicas.min: 0` model's last
        registration kept): the request's keep_alive (`asked_keep_alive`), else its configured one. None: not held
        for a time (its weights stay until the memory is needed); inf: for ever (a configured negative one too)."""
        keep = self.spec.keep_alive if self.asked_keep_alive is None else self.asked_keep_alive
        return math.inf if keep is not None and keep < 0 else keep

    @property
    def engine_keep_alive(self) -> float | None:
        """`keep_alive` as its engines take it: for ever is their None (until the memory is needed)."""
        keep = self.keep_alive
        return None if keep == math.inf else keep

    @property
    def default_step_s(self) -> float:
        return self.spec.engine.first_step_s

    def attainment(self) -> float | None:
        return sum(self.outcomes) / len(self.outcomes) if len(self.outcomes) >= 10 else None


# The request ids an API request's handler generated under (generate), for its response's x-request-id header: the
# id the dashboard, the events and POST /admin/requests/{id}/cancel know it by (app.RequestIds sets it per request)
REQUEST_IDS: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("REQUEST_IDS", default=None)

# ModelSpec fields a registered model changes in place (update_model); any other needs it registered again
UPDATABLE = frozenset({"slo", "priority", "replicas", "keep_alive", "aliases"})


def _policy_slo(spec: ModelSpec) -> ModelSLO:
    """What the worker's multi-model policy weighs a model by: its SLO, priority as a weight (as admission scales
    slack)."""
    return ModelSLO(spec.slo.ttft_s, spec.slo.tpot_s, priority=2.0 ** max(-2, min(2, spec.priority)))


def weights_bytes(spec: ModelSpec) -> int:
    if spec.memory_gb is not None:
        return int(spec.memory_gb * (1 << 30))
    if spec.path is None:
        return 0
    p = Path(spec.path)
    return sum(f.stat().st_size for pat in ("*.safetensors", "*.bin", "*.pt") for f in p.glob(pat))


def _hf_config(spec: ModelSpec) -> dict[str, Any]:
    """The model folder's config.json ({} when there is none to read)."""
    if spec.path is not None:
        try:
            cfg = json.loads((Path(spec.path) / "config.json").read_text())
            return cfg if isinstance(cfg, dict) else {}
        except (OSError, ValueError):
            pass
    return {}


def context_len(spec: ModelSpec, cfg: dict[str, Any]) -> int:
    """The model's context: the configured one, else its config.json's (`cfg`, `_hf_config`), else 4096."""
    if spec.engine.max_model_len:
        return spec.engine.max_model_len
    return int(cfg.get("max_position_embeddings") or 4096)


def _kv_elems(spec: ModelSpec) -> int:
    """KV cache elements one token of `spec`'s model takes (its config.json; 0 when it does not say)."""
    return kv_elems_per_token(spec.path) if spec.path else 0


def hidden_size(cfg: dict[str, Any]) -> int | None:
    """The width of the model's hidden states (its embeddings'), when its config says."""
    v = cfg.get("hidden_size")
    return v if isinstance(v, int) else None


def architecture(cfg: dict[str, Any]) -> str | None:
    """The model's architecture as its config names it (model_type: llama, qwen2, ...), when it does."""
    v = cfg.get("model_type")
    return v if isinstance(v, str) and v else None


class Generation:
    """The engine requests (choices) behind one API request; iterate `events()` for (index, Delta)."""

    def __init__(self, ctl: Controller, entry: ModelEntry, tenant: Tenant, slo: SLO, charged: int,
                 prompt_tokens: int, sink: asyncio.Queue):
        self.ctl, self.entry, self.tenant, self.slo = ctl, entry, tenant, slo
        self.charged, self.prompt_tokens = charged, prompt_tokens
        self.sink = sink
        self.subs: list[Sub] = []
        self.completion_tokens = 0
        self.per_prompt = 1  # choices per prompt (n)
        self._cached: dict[int, int] = {}  # prompt -> its prompt tokens found in the prefix cache (the most of its n)
        self.t_arrival = time.monotonic()
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.closed = False
        self.request_id = ""  # the API request's id (set by Activity.started)
        self.t_wall = time.time()
        self.key_hash = KEY_USED.get()  # the hash of the key it was admitted with (None: none, or not known)
        # Not streamed (Controller.generate's `stream`): each choice's deltas are held until it ends, so a choice
        # whose engine fails mid-generation runs again from its start elsewhere (Sub.restartable): nothing of it has
        # reached the client, and what the failed run made is dropped (RESTART), never joined to the new run's.
        self.buffered = False
        self._held: dict[int, list[m.Delta]] = {}  # (buffered) choice -> its deltas so far
        self.load = False  # only a model's load (Controller.generate's `load`): neither charged nor counted in usage
        # its choice may go on in a further engine request (Controller.generate's `whole`, `go_on`): while none runs
        # between the two, an end (an operator's cancel, a revoked key) is kept here, (error, kind), for that one
        self.goes_on = False
        self.ended: tuple[str, str] | None = None
        self.whole: int | None = None  # (`whole`) each choice's max_tokens, where its first engine request's is less

    async def events(self) -> AsyncIterator[tuple[int, m.Delta]]:
        """Deltas as they come (buffered: each choice's all at once, when it ends); raises ServingError if a choice
        fails (the others are aborted)."""
        open_ = len(self.subs)
        while open_:
            sub, d = await self.sink.get()
            if d is RESTART:
                self.completion_tokens -= sum(len(x.token_ids) for x in self._held.pop(sub.index, ()))
                continue
            if d.error is not None:
                self.ctl.pool.abort(self.subs)
                raise _failure(d.error, d.error_kind)
            if d.load_s:  # (the engine waited for the model's weights before its first token)
                sub.load_s += d.load_s
            if d.token_ids or d.embedding is not None:
                now = time.monotonic()
                self.t_first = self.t_first or now
                self.t_last = now
                self.completion_tokens += len(d.token_ids)
            if self.buffered:
                held = self._held.setdefault(sub.index, [])
                held.append(d)
                if not d.finished:
                    continue
                del self._held[sub.index]
            if d.num_cached_tokens and not sub.follows:  # (the first delta and the last say it; a continuation's
                # prompt, the request's own and what it made, is no prompt of the request's)
                p = sub.index // self.per_prompt
                self._cached[p] = max(self._cached.get(p, 0), d.num_cached_tokens)
            if d.finished:
                open_ -= 1
            if self.buffered:
                for x in held:
                    yield sub.index, x
            else:
                yield sub.index, d

    @property
    def load_s(self) -> float:
        """Seconds it waited for its model to be loaded (registered on its engine, its weights brought into VRAM):
        its longest choice's wait."""
        return max((s.load_s for s in self.subs), default=0.0)

    def held(self, index: int = 0) -> list[m.Delta]:
        """(buffered) Choice `index`'s deltas made so far and not yet given by `events()`: what a request whose client
        left had made (the Responses API keeps it, incomplete)."""
        return list(self._held.get(index, ()))

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens whose KV was found in the prefix cache (each prompt's once, whatever its n)."""
        return sum(self._cached.values())

    def pending(self) -> bool:
        """Whether `events()` has a delta ready without waiting."""
        return not self.sink.empty()

    def close(self, status: int) -> None:
        """Abort what is still running, release the tenant's reservation, record metrics. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.ctl.pool.abort(self.subs)
        self.ctl.finished(self, status)


class Controller:
    def __init__(self, cfg: ServerConfig, tenants: TenantRegistry | None = None):
        self.cfg = cfg
        # new at each start (/health's `instance`): the operator sees a restarted controller, which has lost the
        # models and tenants made through its admin API, and registers them again at once
        self.instance = os.urandom(8).hex()
        self.metrics = Metrics()
        # (`tenants`: as `tokenpool serve` read them to check them: the file is read once)
        self.tenants = tenants if tenants is not None else TenantRegistry(cfg.tenants, cfg.auth_enabled,
                                                                          cfg.tenants_file)
        self.prefix = PrefixIndex()  # the prompt blocks sent to each engine: prefix-cache-aware routing
        self.models: dict[str, ModelEntry] = {}
        self._claims: dict[str, set[str]] = {}  # model being registered -> the names it will answer to (add_model)
        self.autoscaler = Autoscaler(cfg.autoscaler)
        self._was_ready = False  # ready() once: start-up is over (see ready)
        self._starting = False  # start() is registering the configured models (no placement, not ready, before)
        self._workers_started = False  # start_workers() ran
        self._pins_checked = False  # the first placement was checked against the pins (_check_pins)
        self._pin_blocked: set[tuple[str, str]] = set()  # (model, engine) placement passed over for pins, told of
        # Why this configuration cannot be served, found once the engines joined (start-up is refused: nothing more
        # is placed, and `on_fatal`, which `tokenpool serve` sets, stops the server with exit status 2); or None
        self.fatal: str | None = None
        self.on_fatal: Callable[[], None] | None = None
        # model -> engine id -> until when (monotonic) it is not placed there: its registration failed there (tried
        # again after LOAD_RETRY_S, doubling), or it was shed from there (FAILED_AVOID_S)
        self._failures: dict[str, dict[str, float]] = {}
        self._fail_counts: dict[tuple[str, str], int] = {}  # (model, engine id) -> registrations failed in a row
        self._load_errors: dict[str, str] = {}  # model -> why its last registration failed (until one succeeds)
        self._moving: dict[str, str] = {}  # model -> the engine it is moving from (until the new registration is up)
        # (engine id, model) -> why: a registration draining before it is unregistered (a moved model's old one,
        # one the autoscaler sheds)
        self._leaving: dict[tuple[str, str], str] = {}
        self.events = EventBus()
        self.activity = Activity()  # the admin views' rolling window (controller/dashboard/activity.py)
        self.pool = EnginePool(cfg.workers, cfg.gpus, on_registered=self._registered, on_dead=self._dead,
                               on_loaded=self._loaded, on_stats=self._stats, on_events=self._events,
                               on_failed=self._failed, on_stopping=self._stopping)
        self.pool._on_pruned = self._pruned
        # a signalled local worker serves on until this controller lets it go, at most this long: past the drain of a
        # stop of the whole server (shutdown_grace_s, then the ended streams' flush and the connections' close) and a
        # signalled worker's own grace (the same), with room to spare; the worker's own default is 60 s
        self.pool.stop_wait_s = cfg.shutdown_grace_s + 30.0
        self._tasks: list[asyncio.Task] = []

    # --- lifecycle ---
    async def start_workers(self, hold_joins: bool = False) -> None:
        """The first part of `start`, which a caller may run ahead of it (`tokenpool serve`: before its app's
        imports): listen for workers, and spawn the local ones (each slot's supervisor spawns its worker in its first
        step, run here). `hold_joins`: they register only once `start(models)` has the models made. Once."""
        if self._workers_started:
            return
        self._workers_started = True
        self._starting = self.pool.starting = True
        if not hold_joins:  # (else once the models are made: `start`)
            self.pool.kv_elems_per_token = self._kv_elems()
        devices = await asyncio.to_thread(local_devices, self.cfg.workers.local)
        await self.pool.start(devices, hold_joins=hold_joins)
        await asyncio.sleep(0)  # (the supervisors' first step: the spawns)

    def _kv_elems(self) -> int:
        """The configured models' largest KV token, known before any worker joins (read at the start, not at
        construction: the default's models are made after the bind, `tokenpool serve`'s start-up)."""
        return max((_kv_elems(s) for s in self.cfg.models), default=0)

    async def start(self, models: Awaitable[None] | None = None) -> None:
        """Start the local workers (`start_workers`, unless the caller did), then register the configured models.
        `models`: their folders being made (`tokenpool serve`'s start-up: the default's models, a GGUF file's
        conversion, each in a child process waited for on a thread), awaited here; its error is this one's."""
        # The local workers first: their start-up (imports; on a GPU the device measured) runs beside the reading of
        # the configured models' tokenizers, which took ~4 s of a 2-core host's time to ready before they started --
        # and beside the making of the models (the conversion runs on one core: a first run's ready came ~2.5 s
        # later when the workers started after it); they join once it is done (held by the pool until then).
        await self.start_workers(hold_joins=models is not None)
        if models is not None:
            await models
            self.pool.kv_elems_per_token = self._kv_elems()
            self.pool.open_joins()
        try:
            for spec in self.cfg.models:
                await self.add_model(spec, source="config")
        finally:
            self._starting = False
        for e in list(self.pool.engines.values()):  # (those that joined meanwhile)
            if e.alive:
                self._adopt(e)
        self.tick()  # (the first loads: the standbys start once they are done, pool._supervise)
        self.pool.starting = False
        self._tasks.append(asyncio.create_task(self._autoscale_loop()))
        freeze_long_lived(collect=True)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await self.pool.stop()

    def load_errors(self) -> dict[str, str]:
        """Models whose last registration failed and that are ready on no live engine: model -> why (for /health,
        which otherwise only says "starting" while a model every replica of which fails keeps it from ready)."""
        alive = [e for e in self.pool.engines.values() if e.alive]
        out = {n: self.load_error(n) or "" for n in self._load_errors if not _ready_on(n, alive)}
        if self.pool.local_joined():  # (a model larger than every GPU, waiting for a larger one: _check_fits)
            views = self.views()
            for n, me in self.models.items():
                if n not in out and me.spec.replicas.min > 0 and (why := self._fits_nowhere(me.info, views)):
                    out[n] = f"waiting for a GPU its weights fit: {why}"
        return out

    @property
    def was_ready(self) -> bool:
        """Whether the server has been ready once (its start-up is over)."""
        return self._was_ready

    def unready_models(self) -> list[str]:
        """The models with a minimum (replicas.min > 0) ready on no live engine, by name."""
        alive = [e for e in self.pool.engines.values() if e.alive]
        return sorted(n for n, me in self.models.items() if me.spec.replicas.min > 0 and not _ready_on(n, alive))

    def ready(self) -> bool:
        """Every model with a minimum is ready on a live engine. At start-up also: every local worker has joined
        and placement has evened the registrations out (no move pending), so the first requests do not meet
        models moving between GPUs; once ready, only the first condition counts."""
        if self.fatal is not None or self._starting:
            return False
        alive = [e for e in self.pool.engines.values() if e.alive]
        ok = bool(alive) and not self.unready_models()
        if ok and not self._was_ready:
            views = self.views()  # the moves a tick would plan now, from the same inputs (pins, failures, moves)
            ok = (self.pool.local_joined() and not self._moving
                  and not self.autoscaler.moves(self._loads(views), views, self._moving))
            self._was_ready = ok
        return ok

    # --- models ---
    async def add_model(self, spec: ModelSpec, source: str = "admin", dry_run: bool = False,
                        replacing: str | None = None) -> ModelEntry | None:
        """Register `spec`. `dry_run`: every check of a registration, for `spec` replacing model `replacing` (default:
        the model of its name) where there is one (that model's names free), and nothing registered: None (POST
        /admin/models?dry_run=true; the Kubernetes operator asks before it drains a model to register it anew, so a
        change refused here leaves the model serving: a wrong path took it down)."""
        from token_scheduler.tokenizer import load_tokenizer

        replaced = self.models.get(replacing or spec.name) if dry_run else None
        if spec.name in self.models and self.models[spec.name] is not replaced:
            raise ServingError(409, f"model {spec.name!r} is already registered", param="name", code="model_exists")
        if spec.name in self._claims:
            raise ServingError(409, f"model {spec.name!r} is being registered by another request", param="name",
                               code="model_exists")
        if spec.path is not None and (why := model_dir_problem(spec.path)) is not None:
            raise ServingError(400, why, param="path")
        if (why := generation_config_problem(spec.generation_config)) is not None:
            raise ServingError(400, why, param="generation_config")
        served = self.served_names(besides=replaced)
        if taken := [n for n in (spec.name, *spec.aliases, *spec.lora_names) if n in served]:
            field = "name" if spec.name in taken else "aliases" if set(spec.aliases) & set(taken) else "lora_modules"
            raise ServingError(409, f"already served under these names (a model, an alias or an adapter): "
                               f"{', '.join(taken)}", param=field, code="model_exists")
        for lm in spec.lora_modules:
            if (why := adapter_fit_problem(lm.path, spec.path, spec.engine.max_lora_rank)) is not None:
                raise ServingError(400, why, param="lora_modules")
        # (none at start-up: a worker that joins while the configuration's models are registered is not judged
        # against yet; placement judges them, as it does when no GPU has joined before them)
        budgets = [e.memory_bytes for e in self.pool.engines.values() if e.alive] if source != "config" else []
        info = ModelInfo(spec.name, weights_bytes(spec), spec.priority)
        if budgets and info.slot_bytes > max(budgets):
            raise ServingError(400, f"model {spec.name!r} needs {_weights(info, max(budgets))} for weights; the largest GPU's weight "
                               f"space is {_gb(max(budgets))}", param="memory_gb")
        # Placement follows the pins (`router.pin_blocked`): registered while they leave it no GPU, the model would
        # be placed nowhere, and every request to it refused for good. Refused here instead, as a pin that would
        # starve a model is (409 pin_would_starve); at start-up no GPU is known yet (_check_pins judges then).
        def pins_allow() -> None:
            why = self._pins_block(info, spec.pin) if budgets else None
            if why is not None:
                raise ServingError(409, f"model {spec.name!r} cannot be placed on any GPU its weights fit: {why}; "
                                   "unpin a model or remove one first", code="pin_would_starve")

        pins_allow()
        if source != "config" and (why := self._kv_page_problem(spec)) is not None:
            raise ServingError(400, why, param="path", code="kv_page_too_small")
        # Its names are claimed while its tokenizer loads (another thread's time): two registrations of one name, or
        # an alias, sent at once both passed the checks above and both answered 201, the later one replacing the
        # earlier unsaid, or two models answering to one alias (and so a PATCH of aliases meanwhile)
        if not dry_run:
            self._claims[spec.name] = {spec.name, *spec.aliases, *spec.lora_names}
        try:
            tok = await asyncio.to_thread(load_tokenizer, spec.path)
        except Exception as e:  # noqa: BLE001 - any unreadable tokenizer is the caller's error
            raise ServingError(400, f"cannot load the tokenizer from {spec.path}: {e}", param="path") from e
        finally:
            if not dry_run:
                del self._claims[spec.name]
        # and again, now: a registration or a pin made while the tokenizer loaded counts too (three pinned models
        # registered at once were each judged beside the pins of before, and together they starved a fourth)
        pins_allow()
        cfg = _hf_config(spec)  # (read once for the three)
        entry = ModelEntry(spec, info, tok, context_len(spec, cfg), hidden_size(cfg), architecture(cfg),
                           pinned=spec.pin, source=source, kv_elems=_kv_elems(spec))
        if dry_run:
            return None
        self.models[spec.name] = entry
        # (workers that join from now on size their KV pages for it too: hosting.min_page_bytes)
        self.pool.kv_elems_per_token = max(self.pool.kv_elems_per_token, entry.kv_elems)
        freeze_long_lived()  # the tokenizer (and what loading it imported) lives as long as the model
        self.events.publish("register", model=spec.name)
        self.tick()
        return entry

    def _kv_short(self, elems: int, dtype: str) -> tuple[dict[str, tuple[int, int]], bool]:
        """Live engines whose KV page is smaller than one token of a model's KV (`elems` elements in `dtype`): engine
        id -> (page bytes, the token's bytes); and whether every live engine has said its page (one that has not
        carved its pages yet may carve them for this model). A worker carves its pages once, at its first
        registration, for the largest KV token of the models configured then (hosting.min_page_bytes)."""
        short, known = {}, True
        if not elems:
            return short, known
        for e in self.pool.engines.values():
            if not e.alive:
                continue
            page = e.pool.get("kv_page_bytes")
            if not isinstance(page, int) or page <= 0:
                known = False
            elif (need := elems * dtype_bytes(dtype, e.device)) > page:
                short[e.id] = (page, need)
        return short, known

    def _kv_page_problem(self, spec: ModelSpec) -> str | None:
        """Why `spec`'s model cannot load on any live engine: one token of its KV is larger than every engine's KV
        page (a model added later with a larger one failed every load, the why only in /health). None when it fits
        an engine's pages, or one has not said its page."""
        if spec.engine.kind != "llm":
            return None
        elems = _kv_elems(spec)
        short, known = self._kv_short(elems, spec.engine.dtype)
        if not short or not known or len(short) < sum(e.alive for e in self.pool.engines.values()):
            return None
        page, need = max(short.values())
        return (f"model {spec.name!r} cannot load on the running workers: one token of its KV cache takes {need} "
                f"bytes ({elems} elements), more than a KV page of theirs ({page} bytes; the pages were sized when the "
                f"workers started, for the models configured then). Add it to the server's configuration (or "
                f"its command line) and restart the server: the workers then size their pages for it")

    def _avoid(self, model: str) -> frozenset[str]:
        """Engines placement leaves out for `model`: where its registration failed lately (`_failed_on`), and where
        one token of its KV would not fit a KV page (a load there could only fail; `_kv_short`)."""
        me = self.models.get(model)
        short = {}
        if me is not None and me.spec.engine.kind == "llm":
            short = self._kv_short(me.kv_elems, me.spec.engine.dtype)[0]
        return self._failed_on(model) | frozenset(short)

    def update_model(self, name: str, changes: dict[str, Any]) -> ModelEntry:
        """Change a registered model's SLO, priority, replica bounds, keep_alive or aliases in place (PATCH
        /admin/models, the Kubernetes operator's scaling): its registrations, weights and requests in flight stay (those already
        admitted keep the SLO they came under). `changes`: validated ModelSpec fields by name."""
        entry = self.models.get(name)
        if entry is None:
            raise ServingError(404, f"no model {name!r}", code="model_not_found")
        unknown = set(changes) - UPDATABLE
        if unknown:
            raise ServingError(400, f"not changeable in place: {', '.join(sorted(unknown))} (remove the model and "
                               "register it again)", param=sorted(unknown)[0])
        if "aliases" in changes:  # (resolved by the controller alone: the engines know a model by its name)
            others = self.served_names(besides=entry)
            if taken := sorted(others & set(changes["aliases"]) | {name} & set(changes["aliases"])):
                raise ServingError(409, f"already served under these names (a model, an alias or an adapter): "
                                   f"{', '.join(taken)}", param="aliases", code="model_exists")
            if clash := set(changes["aliases"]) & set(entry.spec.lora_names):
                raise ServingError(409, f"its LoRA adapters are named {', '.join(sorted(clash))}", param="aliases",
                                   code="model_exists")
        entry.spec = entry.spec.model_copy(update=changes)
        entry.info = dataclasses.replace(entry.info, priority=entry.spec.priority)
        if "keep_alive" in changes:  # (the operator's word replaces a request's)
            entry.asked_keep_alive = None
        self._retune(entry)
        self.events.publish("update", model=name, fields=sorted(changes))
        self.tick()  # (replica bounds: the autoscaler acts on them)
        return entry

    def _retune(self, entry: ModelEntry) -> None:
        """Tell `entry`'s engines its SLO and keep_alive (in place)."""
        slo = _policy_slo(entry.spec)
        for e in self.pool.engines.values():
            if e.alive:
                self.pool.retune(e, entry.spec.name, slo, entry.engine_keep_alive)

    def _in_use(self, entry: ModelEntry) -> bool:
        """A request of `entry` is admitted and not yet finished (placed or waiting for its registration)."""
        return any(g.entry is entry for g in self.activity.live.values())

    def ask_keep_alive(self, name: str, seconds: float) -> None:
        """An Ollama request's keep_alive for model `name` (seconds; negative: for ever; 0: unload now, `evict`):
        it holds the model that long after its last use, instead of its configured keep_alive (`ModelEntry.
        asked_keep_alive`), for its weights on its engines and for its last registration (the autoscaler's
        `ModelLoad.kept_alive`)."""
        entry = self.models.get(name)
        if entry is None:
            return
        if seconds == 0:
            self.evict(name)
            return
        before = entry.engine_keep_alive
        entry.asked_keep_alive = math.inf if seconds < 0 else seconds
        if entry.engine_keep_alive != before:
            self._retune(entry)

    def remove_model(self, name: str) -> bool:
        entry = self.models.pop(name, None)
        if entry is None:
            return False
        self._failures.pop(name, None)
        self._load_errors.pop(name, None)
        for k in [k for k in self._fail_counts if k[0] == name]:
            del self._fail_counts[k]
        for e in self.pool.engines.values():
            subs = [s for s in e.subs.values() if s.model == name]
            for s in subs:
                # (said as what it is: "engine failure: model was unregistered", a 503 the OpenAI client sent again,
                # to a 404)
                s.sink.put_nowait((s, m.Delta(s.rid, finished=True, finish_reason="error",
                                              error=f"model {name!r} was removed by an operator", error_kind="removed")))
            self.pool.abort(subs)
            self._unregister(e, name, "model removed")
        self.autoscaler.forget(name)
        self.metrics.forget_model(name)  # (its gauges said 1 replica, and its last attainment, after it was gone)
        self.events.publish("unregister", model=name)
        del entry
        collect_all()  # its tokenizer was frozen with the long-lived heap
        return True

    # --- tenants ---
    def tenant_deleted(self, t: Tenant) -> None:
        """`t` was deleted through the admin API (its keys authenticate no new request): its requests in flight end
        after REVOKE_GRACE_S (`_revoke`)."""
        asyncio.get_running_loop().call_later(REVOKE_GRACE_S, self._revoke, t)

    def _revoke(self, t: Tenant) -> None:
        """End the requests of deleted tenant `t` (streams: an error event in OpenAI's shape, then [DONE]; the engines
        abort them and free their KV), and admit none still on their way, unless the namesake made since keeps some
        of `t`'s keys (the operator's update, or a rotation that drops some keys): then only the requests admitted
        with a key it dropped end (a request whose key is not known too); the others belong to that one now."""
        if t.successor is not None:  # (Tenant.succeed)
            dropped = set(t.spec.key_hashes) - set(t.latest().spec.key_hashes)
            if not dropped:
                return
            what = f"lost {len(dropped)} key(s)"
            match = lambda g: _answers_to(g.tenant, t) and (g.key_hash is None or g.key_hash in dropped)  # noqa: E731
        else:
            t.revoked = True
            what = "deleted"
            match = lambda g: g.tenant.latest() is t  # noqa: E731
        n = self.end_requests(match, REVOKED, "revoked")
        if n:
            log.info("tenant %r %s: %d request(s) in flight on them ended", t.name, what, n)
            self.events.publish("tenant_requests_ended", tenant=t.name, requests=n)

    def cancel(self, request_id: str) -> tuple[str, str, int] | None:
        """An operator ends request `request_id` (POST /admin/requests/{id}/cancel): its stream gets an error event, a
        request not streamed a 503 its client is told not to retry, the engines abort it. (model, tenant, choices
        ended), or None when the controller holds no such request with a choice still running."""
        gen = self.activity.live.get(request_id)
        if gen is None or not gen.subs:
            return None
        model = gen.subs[0].model
        n = self._end(gen, CANCELLED, "cancelled")
        return (model, gen.tenant.name, n) if n else None

    def end_requests(self, match: Callable[[Generation], bool], error: str, kind: str) -> int:
        """End the requests in flight that `match`, as an operator's cancel does (`_end`). How many ended."""
        return sum(bool(self._end(gen, error, kind)) for gen in list(self.activity.live.values())
                   if not gen.closed and match(gen))

    def _end(self, gen: Generation, error: str, kind: str) -> int:
        """End request `gen`: each choice's stream gets `error`, its engine request is aborted (a choice still waiting
        for its model is never submitted). One between an engine request and its continuation (`go_on`) ends as that
        one starts, or, where none follows, there (`go_on`'s None): it ends either way, as the caller is told. How
        many of its choices ended: 0 where it is closed, or none of them runs and none goes on (it is over)."""
        if gen.closed:
            return 0
        running = [s for s in gen.subs if not s.done]
        if running:
            self.pool.end(running, error, kind)
            return len(running)
        if gen.goes_on:
            gen.ended = (error, kind)
            return len(gen.subs)
        return 0

    def slo_for(self, entry: ModelEntry, tenant: Tenant) -> SLO:
        c = tenant.spec.slo_class
        return self.cfg.slo_classes[c] if c is not None and c in self.cfg.slo_classes else entry.spec.slo

    # --- requests ---
    def new_id(self, kind: str) -> str:
        """A request's id, random: a count (this server's requests, every tenant's) read off two ids was another
        tenant's traffic told to each tenant."""
        return f"{kind}-{secrets.token_hex(10)}"

    async def generate(self, entry: ModelEntry, tenant: Tenant, prompts: list[list[int]], params: SamplingParams,
                       n: int, request_id: str, stream: bool = True, load: bool = False,
                       whole: int | None = None) -> Generation:
        """Admit and place the n * len(prompts) engine requests of one API request (ServingError if refused).
        `stream=False` (the answer is sent once whole): its choices are buffered, and one whose engine fails
        mid-generation is run again from its start (Generation.buffered). `load`: a request that only brings its
        model's weights in (Ollama's load request, whose reply is dropped): nothing of it is charged to the tenant
        nor counted in its usage (`TenantRegistry.acquire`'s `charge`, `finished`). `whole`: the request's own
        max_tokens where `params.max_tokens` is only its first part's (a thinking budget: thinking.Budgeted), the
        rest to follow in a continuation (`go_on`): the tenant's tokens/min reservation is of the whole."""
        if (made := REQUEST_IDS.get()) is not None:  # (the response's x-request-id: app.RequestIds)
            made.append(request_id)
        ctx = entry.max_model_len
        budgets = []
        for i, ids in enumerate(prompts):
            room = ctx - len(ids)
            if room < 0 or (room == 0 and not params.embed):  # (an embedding's prompt may fill the context)
                raise ServingError(400, f"This model's maximum context length is {ctx} tokens; the prompt"
                                   f"{f' {i}' if len(prompts) > 1 else ''} has {len(ids)} tokens.",
                                   param="messages" if request_id.startswith("chat") else "prompt",
                                   code="context_length_exceeded")
            mt = params.max_tokens
            if mt is not None and mt > room and not params.embed:  # (an embedding's one token is dropped)
                raise ServingError(400, f"This model's maximum context length is {ctx} tokens. However, you "
                                   f"requested {len(ids) + mt} tokens ({len(ids)} in the prompt, {mt} for the "
                                   "completion). Please reduce the prompt or max_tokens.",
                                   param="max_tokens", code="context_length_exceeded")
            budgets.append(mt if mt is not None else max(room, 1))
        prompt_tokens = sum(len(p) for p in prompts)
        charged = 0 if load else prompt_tokens + n * sum(max(b, whole or 0) for b in budgets)
        refused = TenantRegistry.acquire(tenant, charged, charge=not load)
        if refused is not None:
            self.metrics.rejected.labels(entry.spec.name, "tenant_limit").inc()
            raise ServingError(429, refused[1], retry_after=refused[0])
        slo = self.slo_for(entry, tenant)
        gen = Generation(self, entry, tenant, slo, charged, prompt_tokens, asyncio.Queue())
        gen.load = load
        gen.goes_on = whole is not None
        gen.whole = whole
        gen.per_prompt = n
        gen.buffered = not stream
        now = time.monotonic()
        if (entry.asked_keep_alive is not None and not self._in_use(entry)
                and (entry.last_used is None or now - entry.last_used >= entry.asked_keep_alive)):
            entry.asked_keep_alive = None  # (ran out: a new load, held for its configured keep_alive)
            self._retune(entry)
        entry.last_used = now
        if not self.tenants.single_user:  # (a tenant's prompts neither use nor time another's cached KV)
            params = dataclasses.replace(params, cache_salt=f"{tenant.owner}\0{params.cache_salt or ''}")
        self.activity.started(gen, request_id)
        try:
            for p, ids in enumerate(prompts):
                for i in range(n):
                    sp = dataclasses.replace(params, n=1, seed=None if params.seed is None else params.seed + i)
                    sub = Sub(f"{request_id}-{p * n + i}", entry.spec.name, p * n + i, ids, sp, budgets[p], gen.sink,
                              restartable=gen.buffered)
                    if i:  # (the prompt's block hashes, made for its first choice)
                        sub.prefix_hashes = gen.subs[-1].prefix_hashes
                    if tenant.latest().revoked or not _holds(tenant, gen.key_hash):
                        # deleted while this request was on its way, or replaced without its key (see _revoke)
                        raise ServingError(401, REVOKED, code="invalid_api_key")
                    gen.subs.append(sub)
                    # Admission judges the request by its first engine request: the others of the same request
                    # (its n, its prompt list) queued behind that one's siblings, so a request of more of them than
                    # an engine runs at once was refused on an idle server, by its own load, at every retry
                    await self._place(sub, entry, slo, tenant.spec.priority, admission=len(gen.subs) == 1)
                    if len(gen.subs) % PLACE_SLICE == 0:  # (each placement reads every engine request: 2,048
                        await asyncio.sleep(0)  # inputs to embed held the loop, every tenant's streams, 1.5 s)
            # under the name it asked for: a LoRA adapter's (the model serving it beside it, as base_model). Not a
            # load (Ollama's load request): it is no request of the tenant's, as its usage and the window say
            if not load:
                self.events.publish("admit", **asked_model(entry.spec.name, params.lora), tenant=tenant.name,
                                    request_id=request_id, prompt_tokens=prompt_tokens)
        except BaseException as e:
            if isinstance(e, ServingError):
                status = e.status
            elif isinstance(e, (asyncio.CancelledError, GeneratorExit)):
                status = 499
            else:  # a bug is a 500, counted as one
                status = 500
            gen.close(status)
            e.counted = True  # type: ignore[attr-defined]  # the serving layer must not count it again
            raise
        return gen

    async def go_on(self, gen: Generation, index: int, prompt: list[int] | None, max_tokens: int = 0,
                    grammar=_FIRSTS) -> None:
        """Choice `index` of admitted request `gen` (Controller.generate's `whole`), its engine request ended, goes on
        from `prompt` (the request's prompt, what the choice made, and what its caller adds: thinking.Budgeted's
        closing tag) in a new engine request in that one's place, part of the same API request: not admitted, nor
        charged to the tenant again (its rates, its usage's requests: the request counts once, its tokens all), under
        the same request id (the admin API's list and cancel, the metrics: one request, its time to first token the
        first engine request's, its latency to the continuation's end). Its deltas come from `gen.events()` again.
        Sampled as the first (its params, `max_tokens` the continuation's, a seed its own, `grammar` where given: the
        first's held a think block the continuation starts after). `prompt` None: it does not go on (an end kept
        meanwhile, `gen.ended`, is raised)."""
        if prompt is None:
            gen.goes_on = False
            if gen.ended is not None and not gen.closed:  # (ended in the instant between the two: the cancel was
                # answered as ending it, so it ends here, made whole or not, as one whose continuation started would)
                raise _failure(*gen.ended)
            return
        old = gen.subs[index]
        # A seeded engine request draws from a generator of its own, seeded at its start with its params' seed
        # (token_scheduler/sampler.py; choice i of n gets seed + i: generate). Under the first's seed the continuation
        # would draw the first's draws again from their start (reproducible, but its k-th token sampled with the
        # noise the first's k-th was: tied to it). Right would be the first's stream taken on where it stopped, as
        # one engine request draws; the engine cannot start a generator there, so the continuation takes a seed no
        # engine request of the request has (each continuation its choices' count past the one before): the same
        # seed still gives the same reply. (The Messages API, the one caller today, takes no seed.)
        seed = old.params.seed if old.params.seed is None else old.params.seed + len(gen.subs)
        # (its engine request id the first's, marked: the request's id before its last '-', as the views read it)
        sub = Sub(f"{old.rid}.next", old.model, index, prompt,
                  dataclasses.replace(old.params, max_tokens=max_tokens, seed=seed,
                                      **({} if grammar is _FIRSTS else {"grammar": grammar})),
                  max_tokens, gen.sink, restartable=gen.buffered, follows=True, earlier=old.earlier + old.generated)
        gen.subs[index] = sub  # (in its place: the admin API's view and cancel, close's abort find it)
        gen.goes_on = False
        if gen.closed or gen.ended is not None:  # (ended between its engine requests: its events say how; a revoked
            # key's request in flight ends after its grace, by end_requests, as any)
            self.pool.end([sub], *(gen.ended or (CANCELLED, "cancelled")))
            return
        await self._place(sub, gen.entry, gen.slo, gen.tenant.spec.priority, admission=False)

    async def _place(self, sub: Sub, entry: ModelEntry, slo: SLO, priority: int, admission: bool,
                     avoid: EngineHandle | None = None, tries: int = 1) -> None:
        """Send one engine request to the registered engine with the lowest estimated TTFT (admission first).
        A model with no usable registration (its engine died, say) is registered on the best engine first.
        `avoid`: an engine that failed this request and may not be dead yet (a crashed step's worker exits a moment
        after it said so), left out (its replacement, a new handle under the same id, is not)."""
        name = entry.spec.name

        def _views() -> list[EngineView]:
            return [v for v in self.views() if avoid is None or self.pool.engines.get(v.engine_id) is not avoid]

        views = _views()
        hashes, cached = [], None
        if entry.spec.engine.kind == "llm" and entry.spec.engine.enable_prefix_caching:
            if sub.prefix_hashes is None:
                sp = sub.params
                sub.prefix_hashes = prompt_hashes(sub.prompt_ids, hash_extra(sp.lora, sp.cache_salt))
            hashes = sub.prefix_hashes
            cached = lambda eid: self.prefix.cached_tokens(name, eid, hashes)  # noqa: E731
        waited_until = None
        self._still_registered(entry)
        while (rt := route(entry.info, views, len(sub.prompt_ids), cached)) is None:
            # not where its registration failed lately: requests do not load a failing model again and again
            pl = place(entry.info, views, self.infos(), exclude=self._avoid(name), pinned=self.pinned())
            if pl is None and self._failed_on(name) and name in self._load_errors:
                raise self._load_failed(name)
            if pl is not None:
                self._register(self.pool.engines[pl.engine_id], entry)
                rt = route(entry.info, _views(), len(sub.prompt_ids), cached)
                if rt is None:
                    raise ServingError(503, f"no engine can serve model {name!r} now", retry_after=5)
                break
            # A server started a moment ago, its local workers not all joined yet (a GPU worker takes seconds), or a
            # local worker being replaced (it died, or was signalled to stop): the request waits for them rather than
            # hearing 503 (it did for ~0.3 s after "listening" on a CPU, and while a lone worker restarted).
            waited_until = waited_until or time.monotonic() + STARTUP_WAIT_S
            if (self.pool.local_joined() and not self.pool.replacing()) or time.monotonic() > waited_until:
                why = self._pins_block(entry.info, entry.pinned) or self._fits_nowhere(entry.info)
                raise ServingError(503, f"no engine can serve model {name!r} now{f': {why}' if why else ''}",
                                   retry_after=5)
            await asyncio.sleep(0.05)
            self._still_registered(entry)
            views = _views()
        if admission and self.cfg.admission.enabled:
            slack = self.cfg.admission.slack * 2.0 ** max(-2, min(2, priority))
            # A prompt whose prefill alone misses the SLO is refused only while its engine has other requests (it
            # would hold them up): on an idle engine it runs, late, else it could never be served (a single user's
            # long prompt on a slow CPU was a 429 at every retry).
            d = decide(rt.est_ttft_s, rt.queued, slo.ttft_s, slack, rt.queue_len,
                       self.cfg.admission.max_queue_per_engine, prefill_s=rt.prefill_s if rt.engine_busy else 0.0)
            if not d.admit:
                self.metrics.rejected.labels(name, "slo").inc()
                self.events.publish("reject", **asked_model(name, getattr(sub.params, "lora", None)), request_id=sub.rid,
                                    reason=d.reason)
                raise ServingError(429, f"model {name!r} is overloaded: {d.reason}", retry_after=d.retry_after_s)
        e = self.pool.engines[rt.engine_id]
        for _ in range(3):  # the autoscaler may drop a registration while this request waits for it: again
            self._still_registered(entry)
            r = e.replicas.get(name) or self._register(e, entry)
            if not r.ready.is_set():
                t_wait = time.monotonic()
                deadline = t_wait + LOAD_TIMEOUT_S
                # (ended while it waits -- an operator's cancel, the end of a shutdown's grace -- it stops waiting:
                # its client then hears the error at once, where it heard it after the load, or, at shutdown, a
                # plain-text 500 once uvicorn cancelled it)
                ready = asyncio.ensure_future(r.ready.wait())
                try:
                    while not ready.done() and not sub.done:
                        if time.monotonic() > deadline:
                            raise ServingError(503, f"model {name!r} is still being registered", retry_after=10)
                        await asyncio.wait({ready}, timeout=0.1)
                finally:
                    ready.cancel()
                    sub.load_s += time.monotonic() - t_wait  # (its model's registration: Ollama's load_duration)
                if sub.done:
                    return
            if e.replicas.get(name) is r or r.state not in ("ready", "dropped"):  # (dropped: register it again)
                break
        self._still_registered(entry)
        if not e.alive and tries < MAX_ATTEMPTS and not sub.done:
            # its engine died while the model loaded there: placed again (another engine, or its successor), as a
            # request whose engine died before its first token is (nothing was sent)
            return await self._place(sub, entry, slo, priority, False, avoid, tries + 1)
        if r.state == "failed" and e.alive and name in self._load_errors:
            raise self._load_failed(name)
        if r.state != "ready" or not e.alive:
            raise ServingError(503, f"model {name!r} could not be registered on engine {e.id}: {r.error}",
                               retry_after=5)
        if sub.done:  # aborted while the model was being registered
            return
        self.pool.submit(e, sub)
        self.prefix.sent(name, e.id, hashes)

    def _load_failed(self, name: str) -> ServingError:
        """The 503 of a request for a model whose registration failed where it could go: why, and when it is tried
        again (Retry-After then)."""
        return ServingError(503, f"model {name!r} could not be registered (its load failed): {self.load_error(name)}",
                            retry_after=max(1, math.ceil(self._retry_in(name))), code="model_load_failed")

    def _still_registered(self, entry: ModelEntry) -> None:
        """A request whose model was removed (or removed and added again) while it waited (tokenizing, a load): a
        404, before anything registers that entry on an engine again (a worker then hosted a model the controller
        no longer listed, and a re-added name was served with the old settings)."""
        if self.models.get(entry.spec.name) is not entry:
            raise ServingError(404, f"model {entry.spec.name!r} was unregistered", param="model",
                               code="model_not_found")

    def finished(self, gen: Generation, status: int) -> None:
        self.activity.finished(gen, status)
        gen.entry.last_used = time.monotonic()
        name, tname = gen.entry.spec.name, gen.tenant.name
        mt = self.metrics
        mt.request_finished(name, tname, status, gen.load)  # (a load that succeeded is no served request)
        if gen.load:  # (Ollama's load request: nothing was made for the caller, and its time is the model's load:
            # no tokens, no usage, no latency or SLO sample; only its concurrency slot comes back)
            TenantRegistry.release(gen.tenant.latest(), 0, 0, 0, served=False)
            return
        # Served (answered, or made tokens before it failed or the client left): its tokens count, in the metrics and
        # the tenant's usage. Refused before any token (admission's 429, a load that failed): nothing of it is
        # charged (the tenant's tokens/min reservation comes back whole), only its status above.
        served = status == 200 or gen.t_first is not None
        prompt = gen.prompt_tokens if served else 0
        mt.prompt_tokens.labels(name, tname).inc(prompt)
        mt.generation_tokens.labels(name, tname).inc(gen.completion_tokens)
        if gen.subs and (lora := gen.subs[0].params.lora) is not None:
            mt.lora_requests.labels(name, lora, str(status)).inc()
            mt.lora_generation_tokens.labels(name, lora).inc(gen.completion_tokens)
        # (under the entry that replaced the one it began under with the same keys, if one did: the tenant's now)
        TenantRegistry.release(gen.tenant.latest(), gen.charged, prompt, gen.completion_tokens, served=served)
        if status != 200 or gen.t_first is None:
            return
        now = time.monotonic()
        ttft = gen.t_first - gen.t_arrival
        per_choice = gen.completion_tokens / max(1, len(gen.subs))
        tpot = (gen.t_last - gen.t_first) / (per_choice - 1) if per_choice > 1 and gen.t_last else None
        mt.ttft.labels(name).observe(ttft)
        mt.e2e.labels(name).observe(now - gen.t_arrival)
        if tpot is not None:
            mt.tpot.labels(name).observe(tpot)
        e = gen.entry
        e.outcomes.append(ttft <= gen.slo.ttft_s and (tpot is None or tpot <= gen.slo.tpot_s))
        # (of each choice's whole max_tokens: a budgeted reply's subs hold its first engine request's, or, gone on,
        # its continuation's rest, while per_choice counts the tokens of both)
        budget = sum(max(s.max_tokens, gen.whole or 0) for s in gen.subs) / max(1, len(gen.subs))
        frac = min(1.0, per_choice / max(1, budget))
        e.used_fraction = frac if e.used_fraction is None else 0.9 * e.used_fraction + 0.1 * frac
        att = e.attainment()
        if att is not None:
            mt.slo_attainment.labels(name).set(att)

    def resolve(self, name: str | None, adapters: bool = True) -> ModelEntry | None:
        """The model a request names: by its own name, one of its aliases or (`adapters`) one of its LoRA adapters'."""
        if not name:
            return None
        me = self.models.get(name)
        if me is None:
            me = next((e for e in self.models.values()
                       if name in e.spec.aliases or (adapters and name in e.spec.lora_names)), None)
        return me

    def count_refusal(self, model: str | None, tenant: str, status: int) -> None:
        """A request refused before it became a Generation, under its model's own name ("-": none or unknown)."""
        me = self.resolve(model)
        self.metrics.requests.labels(me.spec.name if me is not None else "-", tenant, str(status)).inc()

    # --- snapshots for the pure logic ---
    def infos(self) -> dict[str, ModelInfo]:
        return {n: me.info for n, me in self.models.items()}

    def pinned(self) -> set[str]:
        """The models pinned now (configuration or admin API)."""
        return {n for n, me in self.models.items() if me.pinned}

    def views(self) -> list[EngineView]:
        out = []
        for e in self.pool.engines.values():
            if not e.alive:
                continue
            run: dict[str, list[int]] = {}
            wait: dict[str, list[int]] = {}
            queued_prompt: dict[str, int] = {}
            for s in e.subs.values():
                me = self.models.get(s.model)
                left = expected_tokens(s.max_tokens, s.generated, me.used_fraction if me else None)
                (run if s.generated else wait).setdefault(s.model, []).append(left)
                if not s.generated:
                    queued_prompt[s.model] = queued_prompt.get(s.model, 0) + len(s.prompt_ids)
            reps = {}
            step = e.step_s
            # a remote worker signalled to stop has no successor (a local one's standby takes its slot): its
            # registrations count for none, so the autoscaler registers its models elsewhere meanwhile (replicas.min)
            leaving = e.retiring and e.slot is None
            for name, r in e.replicas.items():
                me = self.models.get(name)
                if me is None:
                    continue
                step = step or me.default_step_s
                st = e.stats.get(name, {})
                mstep = st.get("step_s", 0.0) or me.default_step_s
                reps[name] = ReplicaView(name, r.state == "ready", r.max_num_seqs or me.spec.engine.max_num_seqs,
                                         tuple(run.get(name, ())), tuple(wait.get(name, ())), r.draining or leaving,
                                         mstep,
                                         st.get("prefill_s_per_token", 0.0), st.get("load_s", 0.0),
                                         queued_prompt.get(name, 0))
            out.append(EngineView(e.id, e.memory_bytes, reps, step or 0.05, e.alive, e.draining))
        return out

    # --- placement ---
    def _register(self, e: EngineHandle, entry: ModelEntry) -> Replica:
        """Register a model on an engine: its host copy is loaded there and its requests may go there; VRAM
        is the engine's pooled policy's to give (nothing else on the engine is unloaded)."""
        log.info("registering %s on %s", entry.spec.name, e.id)
        spec = entry.spec
        return self.pool.load(e, spec.name, spec.path, spec.engine, _policy_slo(spec), pinned=entry.pinned,
                              keep_alive_s=entry.engine_keep_alive, preload=spec.preload, loras=spec.lora_paths())

    # --- LoRA adapters ---
    def names_taken(self, names: list[str]) -> list[str]:
        """Which of `names` a registered model already answers to (its name, an alias or a LoRA adapter)."""
        taken = self.served_names()
        return [n for n in names if n in taken]

    def served_names(self, besides: ModelEntry | None = None) -> set[str]:
        """Every name a registered model (but `besides`) answers to: its own, its aliases, its LoRA adapters'; and
        those of the models being registered (`add_model`'s claims)."""
        return {n for me in self.models.values() if me is not besides
                for n in (me.spec.name, *me.spec.aliases, *me.spec.lora_names)}.union(*self._claims.values())

    def load_lora(self, base: str | None, name: str, path: str) -> str:
        """Serve a LoRA adapter over model `base` (its name or an alias; None: the one model with weights) under
        `name` (vLLM's /v1/load_lora_adapter): checked here against the model's shapes, then hosted by every engine
        the model is registered on (and any it goes to later). Returns the model's name."""
        if base is None:
            weighted = [me for me in self.models.values() if me.spec.path is not None]
            if len(weighted) != 1:
                raise ServingError(400, f"base_model_name is required: {len(weighted)} models could take it",
                                   param="base_model_name")
            entry = weighted[0]
        else:
            entry = self.resolve(base, adapters=False)
        if entry is None:
            raise ServingError(404, f"no model {base!r}", param="base_model_name", code="model_not_found")
        if self.names_taken([name]):
            raise ServingError(400, f"the name {name!r} is already served (a model, an alias or an adapter)",
                               param="lora_name")
        if entry.spec.engine.kind == "pace" or entry.spec.path is None:
            raise ServingError(400, f"model {base!r} has no weights for LoRA adapters", param="base_model_name")
        try:
            lm = LoraModule(name=name, path=path)
        except ValueError as e:  # (pydantic's ValidationError is one)
            why = next((x["msg"].removeprefix("Value error, ") for x in getattr(e, "errors", list)()
                        if x["type"] == "value_error"),
                       f"bad LoRA adapter name {name!r}: 1-128 characters of A-Z a-z 0-9 . _ : / -")
            raise ServingError(400, why, param="lora_name") from e
        if (why := adapter_fit_problem(path, entry.spec.path, entry.spec.engine.max_lora_rank)) is not None:
            raise ServingError(400, why, param="lora_path")
        entry.spec.lora_modules.append(lm)
        self._send_loras(entry)
        self.events.publish("lora_load", model=entry.spec.name, lora=name)
        return entry.spec.name

    def unload_lora(self, name: str) -> str:
        """Stop serving a LoRA adapter (its requests in flight finish with it); the model it was served over."""
        entry = next((me for me in self.models.values() if name in me.spec.lora_names), None)
        if entry is None:
            raise ServingError(404, f"no LoRA adapter {name!r}", param="lora_name", code="model_not_found")
        entry.spec.lora_modules[:] = [lm for lm in entry.spec.lora_modules if lm.name != name]
        self._send_loras(entry)
        self.events.publish("lora_unload", model=entry.spec.name, lora=name)
        return entry.spec.name

    def _send_loras(self, entry: ModelEntry) -> None:
        for e in self.pool.engines.values():
            if e.alive:
                self.pool.set_loras(e, entry.spec.name, entry.spec.lora_paths())

    def set_pinned(self, name: str, pinned: bool) -> None:
        """Keep a model's weights in VRAM on every GPU it is registered on (an operator's pin), or stop."""
        entry = self.models[name]
        entry.pinned = pinned
        for e in self.pool.engines.values():
            if e.alive:
                self.pool.pin(e, name, pinned)

    def evict(self, name: str) -> int:
        """Free a model's VRAM on every engine it is registered on, once its requests there finish (it stays served:
        the next request brings its weights back); how many engines were told."""
        n = 0
        entry = self.models.get(name)
        if entry is not None and entry.keep_alive != 0:  # (its hold ends: its last registration goes once cold)
            entry.asked_keep_alive = 0.0
            self._retune(entry)
        # (the pool view says so at once where its weights do go: not a pinned model's, nor a paced one's, which has
        # none to free)
        view = entry is not None and not entry.pinned and entry.spec.engine.kind != "pace"
        for e in self.pool.engines.values():
            if e.alive and name in e.replicas:
                self.pool.evict(e, name, view)
                n += 1
        return n

    def _fits_nowhere(self, info: ModelInfo, engines: list[EngineView] | None = None) -> str | None:
        """Why `info`'s weights can load on no usable engine (each one's weight space is smaller), in words; None when
        one is large enough, or none is usable (placement waits for one)."""
        usable = [v for v in (self.views() if engines is None else engines) if v.usable]
        if not usable or any(info.slot_bytes <= v.memory_bytes for v in usable):
            return None
        big = max(usable, key=lambda v: v.memory_bytes)
        e = self.pool.engines.get(big.engine_id)
        return (f"its weights ({_weights(info, big.memory_bytes)}) fit no GPU's weight space (the largest: {_gb(big.memory_bytes)} "
                f"on {big.engine_id}{f' ({e.device})' if e is not None else ''})")

    def _check_fits(self, engines: list[EngineView]) -> str | None:
        """The first placement of a server with local workers: why a configured model could never load on any of
        them (its weights larger than every GPU's weight space), or None. It kept the server "starting" for good,
        every request a 503. Only where no remote worker can join (workers.join_token_hash unset): else a larger
        GPU may join later, and placement waits for it (said in /health, `load_errors`)."""
        if self.cfg.workers.join_token_hash is not None:
            return None
        for name, me in self.models.items():
            if (why := self._fits_nowhere(me.info, engines)) is not None:
                e = self.pool.engines.get(min(v.engine_id for v in engines if v.usable))
                budget = "gpus.cpu_budget_gb" if e is not None and e.device == "cpu" else "gpus.budget_gb"
                return (f"model {name!r} could never load: {why}. Give the GPUs more weight space ({budget}, a smaller "
                        "gpus.kv_cache_gb) or serve the model elsewhere")
        return None

    def _check_pins(self, engines: list[EngineView], actions: list) -> str | None:
        """The first placement of a server with local workers (all joined, so each GPU's weight space is known)
        against the configuration's pins (`pin: true`; a pin made since through the admin API counts too): why a
        model's weights could never load where it is registered, or None. The rule is the admin API's
        (`router.pin_blocks`, 409 pin_would_starve), a GPU's pins taken together; a model placed later
        (`replicas.min: 0`) is starved only when every GPU its weights fit is so short. Without local workers
        (remote ones join when they join) nothing is checked: placement may still spread the models."""
        for a in actions:
            if a.kind in ("load", "move"):
                engines = with_registration(engines, a.engine_id, a.model)
        infos = self.infos()
        bad = starved_by_pins(engines, infos, self.pinned())
        if bad is None:
            return None
        eid, pins, other = bad
        e = self.pool.engines.get(eid)
        space = next(v.memory_bytes for v in engines if v.engine_id == eid)
        return (f"{self.pins_leave(eid, pins, other, space, infos)}. Unpin a model (pin: false), give the GPU more "
                f"weight space (gpus.{'cpu_' if e is not None and e.device == 'cpu' else ''}budget_gb, "
                "gpus.kv_cache_gb) or serve fewer models there")

    def pins_leave(self, eid: str, pins: list[str] | tuple[str, ...], other: str, space: int,
                    infos: dict[str, ModelInfo]) -> str:
        """A starvation by pins (`router.pins_starve`) in words: the pins and their sizes, the model, the GPU."""
        e = self.pool.engines.get(eid)
        sized = ", ".join(f"{p!r} ({infos[p].size_bytes / 1e9:.2f} GB)" for p in pins)
        return (f"pinned model{'s' if len(pins) > 1 else ''} {sized} would leave {other!r} "
                f"({infos[other].size_bytes / 1e9:.2f} GB) too little of the {space / 1e9:.2f} GB weight space of "
                f"{eid}{f' ({e.device})' if e is not None else ''}: {other!r} could never load there")

    def _pins_block(self, info: ModelInfo, pin: bool) -> str | None:
        """Why no GPU can take a registration of `info` (pinned, if `pin`): on every usable one its weights fit, the
        pins would starve it, or it would starve a model there (`router.pin_blocked`, placement's rule); None when
        one can, or none is usable (placement waits for one)."""
        views = self.views()
        infos = {**self.infos(), info.name: info}
        pinned = self.pinned() | ({info.name} if pin else set())
        fits = [v for v in views if v.usable and info.name not in v.replicas and info.slot_bytes <= v.memory_bytes]
        blocked = pin_blocked(info, fits, infos, pinned)
        if not fits or len(blocked) < len(fits):
            return None
        return "; ".join(self.pins_leave(v.engine_id, pins_on(v, pinned, info.name), blocked[v.engine_id],
                                          v.memory_bytes, infos) for v in fits)

    def _refuse(self, why: str) -> None:
        """The configuration cannot be served (found at start-up): said once, nothing more placed, server stopped."""
        self.fatal = why
        log.error("cannot start: %s", why)
        if self.on_fatal is not None:
            self.on_fatal()

    def _unregister(self, e: EngineHandle, name: str, why: str) -> None:
        log.info("unregistering %s from %s (%s)", name, e.id, why)
        self.pool.unload(e, name)
        self.prefix.forget(name, e.id)
        self.metrics.forget_engine_model(e.id, name)

    def tick(self) -> None:
        """One autoscaler round: measure, plan, act; also finishes drains."""
        for name, src in list(self._moving.items()):  # a move whose new registration died or was removed: over
            if name not in self.models or not any(e.alive and e.id != src and e.replicas.get(name) is not None
                                                  and e.replicas[name].state == "loading"
                                                  for e in self.pool.engines.values()):
                del self._moving[name]
        if self.fatal is not None or self._starting:  # (starting: placed once every configured model is registered)
            return
        engines = self.views()
        # At start-up placement waits (JOIN_GRACE_S at most) for every local GPU's worker: placed with all of them
        # in view, the models spread by `router.place` exactly; placed on the first to join, they would have to
        # be moved off it again, and `rebalance`'s greedy moves even the shares out less finely.
        waiting = not self._was_ready and not self.pool.local_joined()
        actions = [] if waiting else self.autoscaler.plan(self._loads(engines), engines, self._moving)
        if not self.cfg.autoscaler.enabled:  # placement only: minimum registrations, and evening out
            actions = [a for a in actions if a.kind in ("load", "move")]
        if not waiting:
            self._tell_pin_blocked(engines)
        if not waiting and not self._pins_checked and self.pool.local_slots and any(e.usable for e in engines):
            self._pins_checked = True
            why = self._check_fits(engines) or self._check_pins(engines, actions)
            if why is not None:
                self._refuse(why)
                return
        for a in actions:
            e = self.pool.engines.get(a.engine_id)
            if e is None or not e.alive:
                continue
            if a.kind == "load" and a.model in self.models:
                self._register(e, self.models[a.model])
            elif a.kind == "unload" and not any(s.model == a.model for s in e.subs.values()) \
                    and not (a.model in self.models and self.models[a.model].pinned):
                self._unregister(e, a.model, "autoscaler: an extra registration went cold")
            elif (a.kind == "shed" and a.model in e.replicas and (e.id, a.model) not in self._leaving
                  and not (a.model in self.models and self.models[a.model].pinned)):
                e.replicas[a.model].draining = True  # new requests go to its other registrations
                self._leaving[(e.id, a.model)] = "autoscaler: served elsewhere, and this GPU misses another model's SLO"
                # not placed back there for FAILED_AVOID_S (that GPU recovering would otherwise invite it again)
                self._failures.setdefault(a.model, {})[e.id] = time.monotonic() + FAILED_AVOID_S
            elif a.kind == "move" and a.model in self.models and a.model not in self._moving:
                # make before break: the source keeps serving it until the new registration is ready (_loaded)
                self._moving[a.model] = a.source
                self._register(e, self.models[a.model])
        self._finish_moves()
        for e in self.pool.engines.values():
            if e.alive and e.draining and not e.retiring and not e.subs:  # (a stopping one's, its successor's)
                for name in list(e.replicas):
                    self._unregister(e, name, "engine drained")
        states = {"alive": 0, "draining": 0, "dead": 0}
        for e in self.pool.engines.values():
            states["dead" if not e.alive else "draining" if e.draining else "alive"] += 1
        for k, v in states.items():
            self.metrics.engines.labels(k).set(v)
        for name in self.models:  # (after this round's actions, as GET /admin/models lists a model's engines)
            self.metrics.replicas.labels(name).set(sum(1 for e in self.pool.engines.values()
                                                       if e.alive and name in e.replicas))
        if not self._was_ready:  # start-up ends when ready, asked or not: a fault after it is no start-up again
            self.ready()  # (only /health asked: a worker killed before any probe made it "starting", placement wait)

    def _tell_pin_blocked(self, engines: list[EngineView]) -> None:
        """Log, and publish as `pin_blocked` events, the engines this tick's placements passed over because the pins
        there would starve the model (or it them): once while it stays so, not every tick a hot model asks again."""
        infos, space = self.infos(), {v.engine_id: v.memory_bytes for v in engines}
        for (name, eid), (other, pins) in self.autoscaler.pin_blocked.items():
            if (name, eid) not in self._pin_blocked and name in infos and eid in space:
                why = self.pins_leave(eid, pins, other, space[eid], infos)
                log.warning("not placing %s on %s: %s", name, eid, why)
                self.events.publish("pin_blocked", model=name, engine=eid, starved=other, pins=list(pins), reason=why)
        self._pin_blocked = set(self.autoscaler.pin_blocked)

    async def _autoscale_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.autoscaler.interval_s)
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - a planning bug must not stop serving
                log.exception("autoscaler tick failed")

    def drain(self, engine_id: str, on: bool = True) -> EngineHandle:
        e = self.pool.engines.get(engine_id)
        if e is None:
            raise ServingError(404, f"no engine {engine_id!r}", code="engine_not_found")
        e.draining = on
        self.tick()
        return e

    # --- pool callbacks ---
    def _registered(self, e: EngineHandle, previous: EngineHandle | None) -> None:
        if previous is not None:  # a restarted worker gets back what its predecessor held
            self.metrics.engine_restarts.inc()
            e.draining = previous.draining and not previous.retiring  # (an operator's drain stays; a stop does not)
            for name in previous.replicas:
                if name in self.models:
                    self._register(e, self.models[name])
        if not self._starting:  # (else once the configured models are known: `start`)
            self._adopt(e)
        self.events.publish("worker_join", engine=e.id, device=e.device, host=e.host, pid=e.pid)
        self.tick()

    def _adopt(self, e: EngineHandle) -> None:
        """A remote worker that joins again keeps its pool (Register.loaded): what this controller serves and has not
        registered there is registered at once (nothing to load), the rest unloaded. A restarted controller ignored
        them: their weights, KV and host copy stayed, in no view, until the worker exited."""
        held, e.held = e.held, []
        for name in held:
            if name in e.replicas:
                continue
            if name in self.models:
                self._register(e, self.models[name])
            else:
                e.send(m.UnloadModel(name))

    def _dead(self, e: EngineHandle, orphans: list[Sub]) -> None:
        self.events.publish("worker_death", engine=e.id, orphans=len(orphans))
        self.prefix.forget(engine_id=e.id)  # (its KV went with it)
        for s in orphans:
            self._recover(e, s, f"engine {e.id} died")
        for name in e.replicas:
            self.metrics.forget_engine_model(e.id, name)

    def _stopping(self, e: EngineHandle) -> None:
        """Engine `e`'s worker was signalled to stop (one SIGTERM to it, or to the whole server): no new request goes
        there, and the pool stops it once those it has are done (EnginePool.release_if_idle), shutdown_grace_s at
        most (a remote worker: the grace its event asked for, its pod's): then they are handed off (_hand_off). Its
        slot's standby takes over as it exits; until then a request for a model only it had waits for that one
        (EnginePool.replacing). A remote worker has no standby: its models are registered on other engines at once
        (`views`: its registrations count for none), where they fit."""
        # (a remote worker's own grace where it says one: a worker pod's terminationGracePeriodSeconds bounds it)
        grace = self.cfg.shutdown_grace_s if e.stop_grace_s is None else e.stop_grace_s
        n = len(e.subs)
        # (a stop of the whole server signals its workers too: expected then, not worth a warning)
        (log.info if self.pool.quiet else log.warning)(
            "engine %s (pid %d) was signalled to stop: %s", e.id, e.pid,
            f"no new requests go there; its {n} request(s) in flight get {grace:.0f} s to finish" if n else
            "it has no request: stopped now")
        self.events.publish("worker_stopping", engine=e.id, requests=len(e.subs))
        e.draining = True
        if e.subs:
            asyncio.get_running_loop().call_later(grace, self._hand_off, e)
        if e.slot is None:
            self.tick()  # (its models placed elsewhere now, not at the next autoscaler round)

    def _hand_off(self, e: EngineHandle) -> None:
        """A signalled engine's grace is over: what it still runs is aborted there and sent to another engine where
        that is safe (_recover), else ended with the error; then it is told to stop."""
        if not e.alive or not e.subs:
            return
        subs = list(e.subs.values())
        log.warning("engine %s: %d request(s) still running after the grace: handed off or ended", e.id, len(subs))
        e.subs.clear()
        e.send(m.Abort([s.rid for s in subs]))
        for s in subs:
            self._recover(e, s, f"engine {e.id} was stopped (signalled) before the request finished")
        self.pool.release_if_idle(e)

    def _failed(self, e: EngineHandle, s: Sub, why: str) -> None:
        """Engine `e` ended request `s` with an engine-side error (its step crashed, its model was gone): as a death,
        but tried on CRASH_ATTEMPTS engines at most."""
        self._recover(e, s, f"engine {e.id}: {why}", CRASH_ATTEMPTS)

    def _recover(self, e: EngineHandle, s: Sub, why: str, attempts: int = MAX_ATTEMPTS) -> None:
        """An engine request whose engine `e` failed it (`why`): sent again, from its start, where that is safe -- nothing
        of it reached the client (no token yet, or its request is not streamed: `Sub.restartable`) -- and it has
        been tried on fewer than `attempts` engines; else its choice ends with the error."""
        if s.done:
            return
        if (s.generated == 0 or s.restartable) and s.attempts < attempts and s.model in self.models:
            if s.restartable:
                s.sink.put_nowait((s, RESTART))  # (after every delta of the failed run: dropped, not joined)
            s.generated = 0
            asyncio.get_running_loop().create_task(self._retry(s, e, why))
            return
        s.done = True
        tried = f" (tried on {s.attempts} engines)" if s.attempts > 1 else ""
        s.sink.put_nowait((s, m.Delta(s.rid, finished=True, finish_reason="error", error=f"{why}{tried}",
                                      error_kind="engine")))

    async def _retry(self, s: Sub, failed: EngineHandle, why: str) -> None:
        """Re-place a request whose engine (`failed`) failed it where nothing of it was sent (see _recover): safe to
        redo."""
        deadline = time.monotonic() + RETRY_WAIT_S
        err = "no engine"
        log.warning("%s: sending request %s again (attempt %d of %d)", why, s.rid, s.attempts + 1, MAX_ATTEMPTS)
        while time.monotonic() < deadline and not s.done and s.model in self.models:
            entry = self.models[s.model]
            try:
                await self._place(s, entry, entry.spec.slo, 0, admission=False, avoid=failed)
                return
            except ServingError as ex:
                err = ex.message
                await asyncio.sleep(0.2)
        if not s.done:
            s.done = True
            s.sink.put_nowait((s, m.Delta(s.rid, finished=True, finish_reason="error",
                                          error=f"{why}, and no other engine could take the request: {err}",
                                          error_kind="engine")))

    def _loaded(self, e: EngineHandle, r: Replica, load_s: float) -> None:
        """A registration finished (its host copy is loaded on that engine's node)."""
        me = self.models.get(r.model)
        src = self.pool.engines.get(self._moving.pop(r.model, ""))  # a placement move's source, if this ends one
        if r.state != "ready":
            n = self._fail_counts[(r.model, e.id)] = self._fail_counts.get((r.model, e.id), 0) + 1
            wait = min(FAILED_AVOID_S, LOAD_RETRY_S * 2 ** (n - 1))
            log.error("registering %s on %s failed (%d in a row; tried there again in %.0f s): %s", r.model, e.id, n,
                      wait, r.error)
            self._failures.setdefault(r.model, {})[e.id] = time.monotonic() + wait
            if r.model in self.models:
                self._load_errors[r.model] = f"engine {e.id}: {r.error}"
            return
        self._load_errors.pop(r.model, None)
        self._fail_counts.pop((r.model, e.id), None)
        if src is not None and src.alive and r.model in src.replicas and src is not e:
            src.replicas[r.model].draining = True  # new requests go to the new one; its own finish there
            self._leaving[(src.id, r.model)] = "placement: moved to another engine (the engines' shares even out)"
            self._finish_moves()
        if me is not None:
            me.info = dataclasses.replace(me.info, load_s=max(0.1, 0.5 * me.info.load_s + 0.5 * load_s))
            if r.max_model_len:
                me.max_model_len = min(me.max_model_len, r.max_model_len)

    def _loads(self, engines: list[EngineView]) -> list[ModelLoad]:
        """What the autoscaler plans from: each model's load, minimum and maximum, pin and failed engines."""
        loads, now = [], time.monotonic()
        # (a request not yet on an engine, waiting for its model's registration, or one whose stream is still being
        # sent, is a use too: its keep_alive counts from its end)
        open_ = {g.entry.spec.name for g in self.activity.live.values()}
        for name, me in self.models.items():
            inflight = sum(r.inflight for ev in engines for n, r in ev.replicas.items() if n == name)
            rs = me.spec.replicas
            idle = 0.0 if inflight or name in open_ else None if me.last_used is None else now - me.last_used
            loads.append(ModelLoad(me.info, rs.min, rs.max, inflight, me.spec.engine.max_num_seqs, me.attainment(),
                                   me.pinned, self._avoid(name), me.keep_alive, idle))
        return loads

    def _finish_moves(self) -> None:
        """Unregister draining registrations (moved, shed) once no request of theirs is left there."""
        for (eid, name), why in list(self._leaving.items()):
            e = self.pool.engines.get(eid)
            if e is None or not e.alive or name not in e.replicas:
                del self._leaving[(eid, name)]
            elif not any(s.model == name for s in e.subs.values()):
                del self._leaving[(eid, name)]
                self._unregister(e, name, why)

    def _failed_on(self, model: str) -> frozenset[str]:
        """Engines where `model`'s registration failed lately (LOAD_RETRY_S, growing) or whence it was shed
        (FAILED_AVOID_S): placement tries others first, and does not try the same failing engine every tick, nor for
        every request."""
        now, seen = time.monotonic(), self._failures.get(model)
        if not seen:
            return frozenset()
        for eid in [k for k, until in seen.items() if now >= until]:
            del seen[eid]
        return frozenset(seen)

    def _retry_in(self, model: str) -> float:
        """Seconds until placement may try `model` again on an engine where its registration failed (0: it may now)."""
        if not self._failed_on(model):
            return 0.0
        return max(0.0, min(self._failures[model].values()) - time.monotonic())

    def load_error(self, model: str) -> str | None:
        """Why `model`'s last registration failed, and when it is tried again (None: it did not fail)."""
        why = self._load_errors.get(model)
        if why is None:
            return None
        wait = self._retry_in(model)
        return f"{why} (tried again in {math.ceil(wait)} s)" if wait else f"{why} (being tried again)"

    def _pruned(self, e: EngineHandle) -> None:
        """A dead engine left the pool for good: its series leave /metrics."""
        self.metrics.forget_engine(e.id, list(e.replicas))
        self.events.publish("worker_pruned", engine=e.id)

    def _events(self, e: EngineHandle, events: list[dict]) -> None:
        """The worker's pooled-engine events (switches, weight loads and evictions): metrics and the bus."""
        mt = self.metrics
        for ev in events:
            kind = ev.get("kind", "?")
            if kind == "switch":
                mt.switches.labels(e.id).inc()
            elif kind == "load":
                mt.swap_total.labels(e.id).inc()
                mt.swap_latency.labels(e.id).observe(float(ev.get("stall_s", 0.0)))
            fields = {k: v for k, v in ev.items() if k not in ("kind", "t")}
            # `at`: when it happened on the engine (its wall clock); the bus's `t` is when the controller heard of it,
            # a stats message later (turn lengths come from `at`: bench serve's `turns`)
            self.events.publish(kind, engine=e.id, at=ev.get("t"), **fields)

    def _stats(self, e: EngineHandle) -> None:
        self.activity.stats(e)
        self.metrics.step.labels(e.id).set(e.step_s)
        for name, s in e.stats.items():
            self.metrics.engine_stats(e.id, name, s)


def _gb(n: int) -> str:
    """Bytes in GB, with the digits a small model's size needs (52.4 MB reads 0.0524 GB, not 0.05)."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e9:.3g} GB"


def _weights(info: ModelInfo, space: int) -> str:
    """A model's weights in GB, and the slot they take (`ModelInfo.slot_bytes`) where that, not their bytes, is what
    `space` cannot hold."""
    return _gb(info.size_bytes) + (f", a slot of {_gb(info.slot_bytes)}" if info.size_bytes <= space else "")
