"""Admin API request/response models."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from controller.config import SLO, STRICT, ModelSpec, Priority, RateLimit, Replicas, parse_duration
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
    inflight: int
    usage: dict[str, int]
    source: Literal["config", "admin"] = "admin"  # from the configuration at start, or over the admin API
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


class EngineOut(BaseModel):
    id: str
    device: str
    host: str
    pid: int
    alive: bool
    draining: bool
    memory_bytes: int
    used_bytes: int
    step_s: float
    inflight: int
    models: list[ReplicaOut]
    stats: dict[str, dict[str, float]]
    pool: dict[str, Any] = {}  # the worker's pooled engine (controller/messages.py Stats.pool)


class ModelOut(BaseModel):
    name: str
    path: str | None
    aliases: list[str] = []
    lora_modules: list[dict] = []  # LoRA adapters served over it: {"name", "path"}
    keep_alive: float | None = None
    pin: bool = False  # pinned now (the registration's pin, or what POST .../pin or .../unpin set since)
    last_used: float | None = None  # unix time of the latest request for it (through any alias)
    slo: dict
    priority: int
    replicas: dict
    engines: list[str]
    max_model_len: int
    size_bytes: int
    slo_attainment: float | None
    load_error: str | None = None  # why its last registration failed, while it is ready on no engine
    source: Literal["config", "admin"] = "admin"  # from the configuration at start, or over the admin API


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
    devices: list[dict]
    engines: dict[str, list[str]]  # device -> engine ids


# --- what is happening (GET /admin/pool, /admin/requests): the dashboard's data ---
class VramOut(BaseModel):
    budget_bytes: int = 0
    weights_bytes: int = 0
    kv_bytes: int = 0
    free_bytes: int = 0
    kv_pages_total: int = 0
    kv_pages_used: int = 0


class EnginePoolOut(BaseModel):
    id: str
    device: str
    host: str
    alive: bool
    draining: bool
    pooled: bool = Field(description="the worker reports the pooled engine's state; else figures come from "
                                     "per-model stats and fields the pool alone knows are null")
    inflight: int
    step_s: float
    active: str | None = Field(description="the model running now")
    registered: list[str]
    resident: list[str]
    prefetching: list[str]
    switches: int | None
    switch_stall_s: float | None = Field(description="mean stall per model switch")
    steps: int | None
    vram: VramOut | None
    host_cache_bytes: int | None
    kv_page_bytes: int | None = Field(None, description="the KV page the worker carved, in bytes (null until then): a "
                                      "model one token of whose KV is larger cannot load there")
    timeline: list[tuple[float, str, int, float]] = Field(
        description="runs of consecutive steps of one model: [wall-clock start, model, steps, seconds]; "
                    "compacted to the model that ran most of each resolution_s (GET /admin/pool)")


class ModelPoolOut(BaseModel):
    name: str
    engines: list[str] = Field(description="engines the model is registered on")
    state: str = Field(description="resident | loading | host | unplaced (the best over its engines) | failed "
                                   "(placed nowhere, its last registration failed: load_error says why)")
    load_error: str | None = Field(None, description="why its last registration failed, while it is ready nowhere")
    pinned: bool
    loras: list[str] = Field(default_factory=list, description="the LoRA adapters served over it, by name")
    cache_hit_frac: float | None = Field(None, description="of its finished requests' prompt tokens, those found in "
                                         "the prefix cache (since the server started; None before any)")
    size_bytes: int
    load_s: float = Field(description="the controller's estimate of one load (switch) of this model")
    loads: int = Field(description="weight loads among the recent events (the event ring)")
    load_stall_s: float | None = Field(description="mean stall of those loads (the switch latency)")
    waiting: int
    oldest_wait_s: float | None
    running: int
    kv_pages_used: int
    kv_swapped: int
    tokens_per_s: float
    requests: int = Field(description="requests finished in the window")
    ttft_p50: float | None
    ttft_p99: float | None
    tpot_p50: float | None
    tpot_p99: float | None
    attainment: float | None = Field(description="SLO attainment over the window (where finished requests "
                                        "feed none, latency_window false: over its recent requests)")
    rejected_total: int
    slo: dict


class TenantPoolOut(BaseModel):
    name: str
    requests_per_s: float
    tokens_per_min: float
    concurrency: int
    max_concurrent: int | None
    rejected_total: int = Field(description="429s since start")
    rejected_per_min: float
    requests: int = Field(description="requests finished in the window")
    attainment: float | None


class PoolOut(BaseModel):
    t: float = Field(description="server wall-clock time")
    window_s: float
    latency_window: bool = Field(description="whether finished requests feed the window (TTFT/TPOT, attainment)")
    auth: bool = Field(True, description="whether requests must carry a tenant's key; false: every caller is the "
                       "`anonymous` tenant, which `tenants` then lists last")
    engines: list[EnginePoolOut]
    models: list[ModelPoolOut]
    tenants: list[TenantPoolOut]
    events: dict[str, int] = Field(description="events published since start, by kind")
    event_subscribers: int


class RequestOut(BaseModel):
    id: str
    model: str = Field(description="the model the request asked for: a LoRA adapter's name where it named one")
    base_model: str | None = Field(None, description="the model serving a LoRA adapter's request (else null)")
    tenant: str | None
    engines: list[str]
    state: str = Field(description="queued (at the controller) | prefill (on its engine, no token yet) | running")
    age_s: float
    tokens: int
    tokens_per_s: float
    choices: int


class CancelOut(BaseModel):
    id: str
    model: str
    cancelled: int = Field(description="engine requests (choices) ended")


class PinOut(BaseModel):
    name: str
    pinned: bool


class EvictOut(BaseModel):
    name: str
    engines: int  # engines told to free its VRAM (once its requests there finish)
    resident: int = 0  # of them, those where its weights were in VRAM (or on their way there) when told


class DrainOut(BaseModel):
    name: str
    draining: bool
    inflight: int  # its requests still running (a drain waits for these to reach 0)
