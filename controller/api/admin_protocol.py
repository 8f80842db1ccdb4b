"""Admin API request/response models."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from controller.config import RateLimit


class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    models: list[str] = Field(default_factory=lambda: ["*"])
    rate: RateLimit = RateLimit()
    max_concurrent: int | None = Field(None, ge=1)
    priority: int = 0
    slo_class: str | None = None


class TenantOut(BaseModel):
    name: str
    models: list[str]
    rate: RateLimit
    max_concurrent: int | None
    priority: int
    slo_class: str | None
    inflight: int
    usage: dict[str, int]


class TenantCreated(TenantOut):
    api_key: str = Field(description="shown once; only its hash is kept")


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


class ModelOut(BaseModel):
    name: str
    path: str | None
    aliases: list[str] = []
    keep_alive: float | None = None
    pin: bool = False
    last_used: float | None = None  # unix time of the latest request for it (through any alias)
    slo: dict
    priority: int
    replicas: dict
    engines: list[str]
    max_model_len: int
    size_bytes: int
    slo_attainment: float | None


class GPUOut(BaseModel):
    devices: list[dict]
    engines: dict[str, list[str]]  # device -> engine ids
