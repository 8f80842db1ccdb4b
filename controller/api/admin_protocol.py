"""Admin API request/response models."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from controller.config import (
    SLO,
    STRICT,
    ModelSpec,
    Priority,
    RateLimit,
    Replicas,
    parse_duration,
    usable_name,
)
from controller.keys import is_key_hash

# (an empty list is kept, not refused: the operator's Tenant sends `models: []` for a tenant of no model, its Ready
# reason NoModels)
MODELS_DOC = ("the models the tenant's keys may use: names, aliases or globs (fnmatch); left out, every model (\"*\"); "
              "[]: no model (every request is refused; the answer's `warning` says so)")


class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", **STRICT)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    models: list[str] = Field(default_factory=lambda: ["*"], description=MODELS_DOC)
    rate: RateLimit = RateLimit()
    max_concurrent: int | None = Field(None, ge=1)
    priority: Priority = 0
    slo_class: str | None = None
    # Hashes of keys the caller holds (the Kubernetes operator's Tenant Secret); given, no key is made here.
    key_hashes: list[str] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _usable_name(cls, v: str) -> str:
        return usable_name(v, "tenant")

    @field_validator("key_hashes")
    @classmethod
    def _hashed(cls, v: list[str]) -> list[str]:
        if not all(is_key_hash(h) for h in v):
            raise ValueError("key_hashes must hold sha256$salt$digest hashes (tokenpool keys hash KEY)")
        return v


class TenantPatch(BaseModel):
    """PATCH /admin/tenants/{name}: what a tenant changes in place (its keys keep working; its usage, requests in
    flight and buckets carry over). Fields left out stay as they are; max_concurrent and slo_class null: none.
    key_hashes: the tenant's keys from now on (a rotation in place: a key kept never stops working; the requests in
    flight on a key dropped end a moment later)."""
    model_config = ConfigDict(extra="forbid", **STRICT)
    key_hashes: list[str] | None = None
    models: list[str] | None = Field(None, description=MODELS_DOC)
    rate: RateLimit | None = None
    max_concurrent: int | None = Field(None, ge=1)
    priority: Priority | None = None
    slo_class: str | None = None

    @field_validator("key_hashes")
    @classmethod
    def _hashed(cls, v: list[str] | None) -> list[str] | None:
        if v == []:  # (a tenant no key can reach: POST makes a key where none is given, the operator revokes one whose
            # Secret holds none, the dashboard's New key replaces one; this left the tenant keyless, unsaid)
            raise ValueError("a tenant keeps at least one key: give the hashes of its keys from now on (tokenpool keys "
                             "hash KEY); to revoke the tenant, DELETE /admin/tenants/{name}")
        return v if v is None else TenantCreate._hashed(v)

    @model_validator(mode="after")
    def _not_null(self) -> TenantPatch:
        nulls = [f for f in ("key_hashes", "models", "rate", "priority")
                 if f in self.model_fields_set and getattr(self, f) is None]
        if nulls:
            raise ValueError(f"{', '.join(nulls)} cannot be null (leave a field out to keep it)")
        return self

    def changes(self) -> dict[str, Any]:
        """The fields the body named."""
        return {f: getattr(self, f) for f in self.model_fields_set}


class TenantOut(BaseModel):
    name: str
    models: list[str]
    rate: RateLimit
    max_concurrent: int | None
    priority: int
    slo_class: str | None
    inflight: int = Field(description="its admitted requests in flight now (what max_concurrent limits)")
    usage: dict[str, int] = Field(description="its served requests' totals since the server started: requests, "
                                  "prompt_tokens, completion_tokens")
    source: Literal["config", "admin"] = Field("admin", description="from the configuration at start, or over the "
                                               "admin API")
    enforced: bool = Field(True, description="whether the server asks callers for a key (authentication on); false: "
                           "every caller is the anonymous tenant, and this tenant's keys, models and limits apply to "
                           "no one")


class TenantCreated(TenantOut):
    api_key: str | None = Field(description="shown once; only its hash is kept (null when key_hashes were given)")
    warning: str | None = Field(None, description="set when the tenant has no effect (authentication is off) or names "
                                  "models no model answers to now")


class TenantUpdated(TenantOut):
    warning: str | None = Field(None, description="set when its changed `models` name models no model answers to now")


class ReplicaOut(BaseModel):
    model: str
    state: str
    inflight: int


# An engine's fields that /admin/engines (EngineOut) and /admin/pool (EnginePoolOut) both give, described once
EngineAlive = Annotated[bool, Field(description="whether its worker is up (false: it stopped or stopped answering)")]
EngineDraining = Annotated[bool, Field(description="drained: it takes no new request "
                                                   "(POST /admin/engines/{id}/resume)")]
EngineStepS = Annotated[float, Field(description="its smoothed step time, in seconds")]
EngineInflight = Annotated[int, Field(description="engine requests on it now (one a choice of an API request)")]


class EngineOut(BaseModel):
    id: str
    device: str
    host: str
    pid: int = Field(description="its worker's process id, on its host")
    alive: EngineAlive
    draining: EngineDraining
    memory_bytes: int = Field(description="the memory the controller may fill with model weights on its device, in "
                              "bytes")
    used_bytes: int = Field(description="the weights' size of the models registered on it, in bytes")
    step_s: EngineStepS
    inflight: EngineInflight
    models: list[ReplicaOut]
    stats: dict[str, dict[str, float]] = Field(description="per model, its engine's latest counters")
    pool: dict[str, Any] = Field({}, description="the worker's pooled engine's state (controller/messages.py "
                                 "Stats.pool; empty: none)")


class ModelOut(BaseModel):
    name: str
    path: str | None
    aliases: list[str] = []
    lora_modules: list[dict] = Field([], description='LoRA adapters served over it: {"name", "path"}')
    keep_alive: float | None = Field(None, description="seconds its weights stay in GPU memory after its last "
                                     "request (null: until the memory is needed; -1: for ever, a replicas.min 0 model's registration held)")
    keep_alive_asked: float | None = Field(None, description="the keep_alive its latest Ollama request asked for, in "
                                           "seconds (-1: for ever), which holds it instead of keep_alive until it runs "
                                           "out and the model is used again, or keep_alive is changed (null: none)")
    pin: bool = Field(False, description="pinned now (the registration's pin, or what POST .../pin or .../unpin set "
                      "since)")
    last_used: float | None = Field(None, description="unix time of the latest request for it (through any alias)")
    slo: dict = Field(description="its SLO: ttft_s and tpot_s, in seconds")
    priority: int
    replicas: dict = Field(description="its replicas' bounds: min and max engines")
    engines: list[str] = Field(description="the live engines it is registered on")
    max_model_len: int = Field(description="the longest sequence it serves (prompt and output), in tokens")
    size_bytes: int = Field(description="its weights' size, in bytes")
    slo_attainment: float | None = Field(description="the fraction of its last 200 requests within its SLO, 0 to 1 "
                                         "(null: fewer than 10)")
    load_error: str | None = Field(None, description="why its last registration failed, while it is ready on no "
                                   "engine")
    source: Literal["config", "admin"] = Field("admin", description="from the configuration at start, or over the "
                                               "admin API")


class DryRunOut(BaseModel):
    """POST /admin/models?dry_run=true: the model would be registered (replacing the one of its name, if any)."""
    dry_run: Literal[True] = True
    name: str


class ModelPatch(BaseModel):
    """PATCH /admin/models/{name}: what a registered model changes in place (its weights, registrations and
    requests in flight stay). Fields left out stay as they are; keep_alive null: until the memory is needed."""
    model_config = ConfigDict(extra="forbid", **STRICT)
    slo: SLO | None = None
    priority: Priority | None = None
    replicas: Replicas | None = None
    keep_alive: float | None = None
    aliases: list[str] | None = None  # the names clients may use besides its own, all of them from now on

    @field_validator("aliases")
    @classmethod
    def _aliases(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError("an alias is given twice")
        return v if v is None else ModelSpec._alias_names(v)

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _duration(cls, v: object) -> float | None:
        return parse_duration(v)

    @model_validator(mode="after")
    def _not_null(self) -> ModelPatch:
        nulls = [f for f in ("slo", "priority", "replicas", "aliases")
                 if f in self.model_fields_set and getattr(self, f) is None]
        if nulls:
            raise ValueError(f"{', '.join(nulls)} cannot be null (leave a field out to keep it)")
        return self

    def changes(self) -> dict[str, Any]:
        """The fields the body named (keep_alive may be named null: until the memory is needed)."""
        return {f: getattr(self, f) for f in self.model_fields_set}


class GPUOut(BaseModel):
    devices: list[dict] = Field(description="this host's GPUs, as its inventory lists them (empty without a driver)")
    engines: dict[str, list[str]] = Field(description="host/device -> the ids of the live engines on it")


# --- what is happening (GET /admin/pool, /admin/requests): the dashboard's data ---
class VramOut(BaseModel):
    budget_bytes: int = Field(0, description="the GPU memory the engine's pool may use, in bytes")
    weights_bytes: int = Field(0, description="of it, held by model weights now")
    kv_bytes: int = Field(0, description="of it, held by the KV cache (every model's: the pool's)")
    free_bytes: int = Field(0, description="of it, neither weights nor KV cache")
    kv_pages_total: int = Field(0, description="KV cache pages (blocks), all models' together")
    kv_pages_used: int = Field(0, description="of them, in use now")


class EnginePoolOut(BaseModel):
    id: str = Field(description="the engine's id (POST /admin/engines/{id}/drain)")
    device: str = Field(description="the device its worker runs on (cuda:0, cpu)")
    host: str = Field(description="the host its worker runs on")
    alive: EngineAlive
    draining: EngineDraining
    pooled: bool = Field(description="the worker reports the pooled engine's state; else figures come from "
                                     "per-model stats and fields the pool alone knows are null")
    inflight: EngineInflight
    step_s: EngineStepS
    active: str | None = Field(description="the model running now")
    registered: list[str] = Field(description="the models registered on it")
    resident: list[str] = Field(description="of them, those whose weights are in its GPU memory")
    prefetching: list[str] = Field(description="of them, those whose weights are on their way there")
    switches: int | None = Field(description="steps whose model differs from the previous step's, since the server "
                                 "started (null: not a pooled engine)")
    switch_stall_s: float | None = Field(description="mean stall per model switch, in seconds (waiting for weights)")
    steps: int | None = Field(description="steps its pooled engine has run (since that engine was made; null: not a "
                              "pooled engine)")
    vram: VramOut | None = Field(description="its GPU memory (null: its worker is not alive)")
    host_cache_bytes: int | None = Field(description="bytes of weights its worker keeps in host memory (the copies "
                                         "a model's load reads; null: not a pooled engine)")
    kv_page_bytes: int | None = Field(None, description="the KV page the worker carved, in bytes (null until then): a "
                                      "model one token of whose KV is larger cannot load there")
    timeline: list[tuple[float, str, int, float]] = Field(
        description="runs of consecutive steps of one model: [wall-clock start, model, steps, seconds]; "
                    "compacted to the model that ran most of each resolution_s (GET /admin/pool)")


class ModelPoolOut(BaseModel):
    name: str = Field(description="the model's name")
    engines: list[str] = Field(description="engines the model is registered on")
    state: str = Field(description="resident | loading | host | unplaced (the best over its engines) | failed "
                                   "(placed nowhere, its last registration failed: load_error says why)")
    load_error: str | None = Field(None, description="why its last registration failed, while it is ready nowhere")
    pinned: bool = Field(description="its weights are kept in GPU memory on every engine it is registered on "
                         "(POST /admin/models/{name}/pin, /unpin)")
    loras: list[str] = Field(default_factory=list, description="the LoRA adapters served over it, by name")
    cache_hit_frac: float | None = Field(None, description="of its finished requests' prompt tokens, those found in "
                                         "the prefix cache (since the server started; None before any)")
    size_bytes: int = Field(description="its weights' size, in bytes")
    load_s: float = Field(description="the controller's estimate of one load (switch) of this model, in seconds")
    loads: int = Field(description="weight loads among the recent events (the event ring)")
    load_stall_s: float | None = Field(description="mean stall of those loads (the switch latency), in seconds")
    waiting: int = Field(description="its requests waiting on its engines for their turn (not those queued at the "
                         "controller)")
    oldest_wait_s: float | None = Field(description="how long the oldest of them has waited, in seconds (null: none "
                                        "waits, or its engines do not say)")
    running: int = Field(description="its requests running on its engines")
    kv_pages_used: int = Field(description="KV cache pages its running requests hold")
    kv_swapped: int = Field(description="KV pages its swapped-out requests hold in host memory")
    tokens_per_s: float = Field(description="tokens generated per second over the last ~10 s, those of requests in "
                                "flight included")
    requests: int = Field(description="requests finished in the window")
    ttft_p50: float | None = Field(description="median time to first token of the window's requests, in seconds "
                                   "(null: none)")
    ttft_p99: float | None = Field(description="99th percentile of the same, in seconds")
    tpot_p50: float | None = Field(description="median time per output token after the first, of the window's "
                                   "requests, in seconds (null: none)")
    tpot_p99: float | None = Field(description="99th percentile of the same, in seconds")
    attainment: float | None = Field(description="SLO attainment over the window, 0 to 1: the fraction of finished "
                                     "requests within its ttft_s and tpot_s (where finished requests feed none, "
                                     "latency_window false: over its recent requests; null: none)")
    rejected_total: int = Field(description="its requests refused by admission control since the server started")
    slo: dict = Field(description="its SLO: ttft_s and tpot_s, in seconds")


class TenantPoolOut(BaseModel):
    name: str = Field(description="the tenant's name")
    requests_per_s: float = Field(description="its requests arriving per second over the last ~10 s: each counted "
                                  "once from its arrival, those in flight and those ended, 429s included (an Ollama "
                                  "load only if it failed); what its rate.requests_per_s limits")
    tokens_per_min: float = Field(description="its prompt and generated tokens per minute over the last 60 s, those "
                                  "of requests in flight included")
    concurrency: int = Field(description="its admitted requests in flight now; what max_concurrent limits")
    max_concurrent: int | None = Field(description="its limit on concurrency (null: none)")
    rejected_total: int = Field(description="its requests refused with a 429 since the server started")
    rejected_per_min: float = Field(description="of them, per minute over the last 60 s")
    requests: int = Field(description="requests finished in the window")
    attainment: float | None = Field(description="SLO attainment of its requests finished in the window, 0 to 1 "
                                     "(null: none)")


class PoolOut(BaseModel):
    t: float = Field(description="server wall-clock time")
    window_s: float = Field(description="the window's length, in seconds: requests, TTFT/TPOT and attainment are its "
                            "finished requests'")
    latency_window: bool = Field(description="whether finished requests feed the window (TTFT/TPOT, attainment)")
    auth: bool = Field(True, description="whether requests must carry a tenant's key; false: every caller is the "
                       "`anonymous` tenant, which `tenants` then lists last")
    engines: list[EnginePoolOut] = Field(description="every engine, alive or not")
    models: list[ModelPoolOut] = Field(description="every registered model")
    tenants: list[TenantPoolOut] = Field(description="every tenant")
    events: dict[str, int] = Field(description="events published since start, by kind")
    event_subscribers: int = Field(description="event streams open now (GET /admin/events: dashboards among them)")


class RequestOut(BaseModel):
    id: str = Field(description="the request's id (POST /admin/requests/{id}/cancel)")
    model: str = Field(description="the model the request asked for: a LoRA adapter's name where it named one")
    base_model: str | None = Field(None, description="the model serving a LoRA adapter's request (else null)")
    tenant: str | None = Field(description="its tenant (null: an engine's request the controller no longer tracks)")
    engines: list[str] = Field(description="the engines it is on now (none while queued at the controller)")
    state: str = Field(description="queued (at the controller) | prefill (on its engine, no token yet) | running")
    age_s: float = Field(description="seconds since it arrived")
    tokens: int = Field(description="tokens generated so far, every choice's")
    tokens_per_s: float = Field(description="tokens per second since its first token")
    choices: int = Field(description="its choices still running")


class CancelOut(BaseModel):
    id: str = Field(description="the request's id")
    model: str = Field(description="the model serving it")
    cancelled: int = Field(description="engine requests (choices) ended")


class PinOut(BaseModel):
    name: str
    pinned: bool


class EvictOut(BaseModel):
    name: str = Field(description="the model's name")
    engines: int = Field(description="engines told to free its VRAM (once its requests there finish)")
    resident: int = Field(0, description="of them, those where its weights were in VRAM (or on their way there) "
                          "when told")


class DrainOut(BaseModel):
    name: str = Field(description="the model's name")
    draining: bool = Field(description="whether its new requests are refused (503 with Retry-After) while those in "
                           "flight finish (POST .../drain; .../resume: false)")
    inflight: int = Field(description="its engine requests (choices) still running (a drain waits for these to reach "
                          "0)")
