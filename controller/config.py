"""The server's one configuration object: a YAML file validated by pydantic, built once at start-up.

Environment variables are read here and nowhere else (TOKENPOOL_CACHE).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from controller.keys import is_key_hash

MAX_GB = 1e6  # sizes in GB are bounded so byte counts stay finite integers (1e308 GB is a 500, not a model)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SLO(_Strict):
    ttft_s: float = Field(5.0, gt=0, description="time to first token target")
    tpot_s: float = Field(0.25, gt=0, description="time per output token target")


class Replicas(_Strict):
    min: int = Field(1, ge=0)
    max: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _order(self) -> Replicas:
        if self.min > self.max:
            raise ValueError(f"replicas.min ({self.min}) > replicas.max ({self.max})")
        return self


class EngineOptions(_Strict):
    """Passed to the engine a worker builds for one model (token_scheduler.EngineConfig, or PaceEngine)."""

    kind: Literal["llm", "pace"] = "llm"
    dtype: str = "auto"
    block_size: int | None = None
    num_kv_blocks: int | None = None
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    kv_cache_memory_gb: float | None = Field(None, gt=0, le=MAX_GB)  # set it when several models share a GPU
    cuda_graphs: bool | None = None
    seed: int = 0
    # PaceEngine only: seconds per decode step / per prompt token, and a tokenizer-less byte vocabulary.
    pace_s_per_token: float = Field(0.02, ge=0)
    pace_prefill_s_per_token: float = Field(0.0, ge=0)
    pace_stamp: bool = False  # token text = emission wall-clock time (API-overhead benchmark)


class ModelSpec(_Strict):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:/-]+$")
    path: str | None = None  # HF-format directory; None only for PaceEngine with its byte tokenizer
    slo: SLO = SLO()
    priority: int = 0  # higher is more important (placement order, admission slack)
    replicas: Replicas = Replicas()
    engine: EngineOptions = EngineOptions()
    memory_gb: float | None = Field(None, ge=0, le=MAX_GB)  # override of the size estimated from the weights

    @model_validator(mode="after")
    def _path(self) -> ModelSpec:
        if self.path is None and self.engine.kind != "pace":
            raise ValueError(f"model {self.name!r}: path is required unless engine.kind is 'pace'")
        return self


class RateLimit(_Strict):
    requests_per_s: float | None = Field(None, gt=0)
    burst: float | None = Field(None, gt=0)  # default: max(1, requests_per_s)
    tokens_per_min: float | None = Field(None, gt=0)


class TenantSpec(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    key_hashes: list[str] = Field(default_factory=list)  # controller.keys.hash_key(...) output, never the key
    models: list[str] = Field(default_factory=lambda: ["*"])
    rate: RateLimit = RateLimit()
    max_concurrent: int | None = Field(None, ge=1)
    priority: int = 0
    slo_class: str | None = None

    @field_validator("key_hashes")
    @classmethod
    def _hashed(cls, v: list[str]) -> list[str]:
        for h in v:
            if not is_key_hash(h):
                raise ValueError("key_hashes must hold sha256$salt$digest hashes (python -m controller.keys KEY)")
        return v


class Listen(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)


class WorkerSettings(_Strict):
    listen: Listen = Listen(host="127.0.0.1", port=0)  # TCP port the workers connect to (0: any free)
    join_token_hash: str | None = None  # required of remote workers when set
    local: Literal["auto", "cpu", "none"] | list[int] = "auto"  # auto: one per GPU, else one CPU worker
    heartbeat_s: float = Field(0.5, gt=0)
    dead_after_s: float = Field(3.0, gt=0)
    restart: bool = True


class GPUSettings(_Strict):
    budget_gb: float | None = Field(None, gt=0, le=MAX_GB)  # per device, for model weights; None: the device's memory * 0.8
    cpu_budget_gb: float = Field(16.0, gt=0, le=MAX_GB)


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


class ServerConfig(_Strict):
    listen: Listen = Listen()
    admin_token_hash: str | None = None
    metrics_public: bool = False  # /metrics carries per-tenant usage: admin token needed unless public
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
    # SIGTERM: new requests get 503 + Retry-After; in-flight ones get this long to finish, then an error event
    shutdown_grace_s: float = Field(30.0, ge=0, le=86400)
    admin_token_file: str | None = None  # where a generated admin token is written (mode 0600); default: cache dir
    is_default: bool = False  # the embedded demo configuration

    @model_validator(mode="after")
    def _consistent(self) -> ServerConfig:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError("model names must be unique")
        tnames = [t.name for t in self.tenants]
        if len(set(tnames)) != len(tnames):
            raise ValueError("tenant names must be unique")
        for t in self.tenants:
            if t.slo_class is not None and t.slo_class not in self.slo_classes:
                raise ValueError(f"tenant {t.name!r}: unknown slo_class {t.slo_class!r}")
        for h in (self.admin_token_hash, self.workers.join_token_hash):
            if h is not None and not is_key_hash(h):
                raise ValueError("token hashes must be sha256$salt$digest (python -m controller.keys TOKEN)")
        return self

    @property
    def auth_enabled(self) -> bool:
        if self.auth is None:
            return bool(self.tenants) or bool(self.tenants_file)
        return self.auth


def cache_dir() -> Path:
    return Path(os.environ.get("TOKENPOOL_CACHE") or Path.home() / ".cache" / "tokenpool" / "models")


def load_config(path: Path | None) -> ServerConfig:
    if path is None:
        return default_config()
    data = yaml.safe_load(Path(path).read_text()) or {}
    cfg = ServerConfig.model_validate(data)
    base = Path(path).resolve().parent  # relative model paths are relative to the file
    for m in cfg.models:
        if m.path is not None and not Path(m.path).is_absolute():
            m.path = str(base / m.path)
    if cfg.tenants_file and not Path(cfg.tenants_file).is_absolute():
        cfg.tenants_file = str(base / cfg.tenants_file)
    return cfg


DEMO_MODELS = (("demo-qwen2-a", 0), ("demo-qwen2-b", 1))


def default_config() -> ServerConfig:
    """Two small random-weight qwen2 demo models, made on first run, no auth, loopback only."""
    models = [
        ModelSpec(name=name, path=str(cache_dir() / f"qwen2-small-seed{seed}"), replicas=Replicas(min=1, max=2))
        for name, seed in DEMO_MODELS
    ]
    return ServerConfig(models=models, auth=False, is_default=True)


def ensure_demo_models(cfg: ServerConfig) -> None:
    """Make the demo models on first run (weights drawn by the model factory, then cached)."""
    if not cfg.is_default:
        return
    from controller.model_factory import make_model

    for m, (_, seed) in zip(cfg.models, DEMO_MODELS):
        out = Path(m.path)  # type: ignore[arg-type]
        if not (out / "config.json").exists():
            make_model(arch="qwen2", size="small", out=out, seed=seed, dtype="fp32", device=None, progress=True)
