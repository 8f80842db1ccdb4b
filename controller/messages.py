"""The controller <-> engine-worker protocol: typed dataclasses, one encoder, one decoder.

Frame: 4-byte big-endian length, then a JSON object ``{"msg": <class name>, ...fields}``. It runs over TCP, so a
worker may live on another host. New requests carry their full data; running ones only what changed (deltas).
Direction: W->C = worker to controller, C->W = controller to worker. Options travel typed: a request's
`SamplingParams`, a model's `EngineOptions` and `ModelSLO` go as the fields that differ from their defaults and
come back as the same types (`_TYPED`), so the worker never reads a dict of options.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Union

from controller.config import EngineOptions
from token_scheduler.policies.slo import ModelSLO
from token_scheduler.request import SamplingParams

MAX_FRAME = 64 << 20
_LEN = struct.Struct(">I")


@dataclass
class Register:  # W->C, first frame of a connection
    host: str
    pid: int
    device: str  # "cpu" | "cuda:0" ...
    memory_bytes: int  # what the controller may fill with model weights on this device
    slot: int | None = None  # local workers: the slot the controller started them for
    join_token: str | None = None  # remote workers, when the controller requires one
    loaded: list[str] = field(default_factory=list)
    free_bytes: int = 0  # device memory free at start (the default arena is this less a margin)
    settings: dict[str, Any] = field(default_factory=dict)  # the worker's own GPU settings (its flags), if any


@dataclass
class Registered:  # C->W
    worker_id: str
    heartbeat_s: float
    settings: dict[str, Any] = field(default_factory=dict)  # controller.hosting.GpuSettings fields


@dataclass
class Rejected:  # C->W, then the controller closes the connection
    reason: str


@dataclass
class LoadModel:  # C->W
    model: str
    path: str | None
    engine: EngineOptions
    slo: ModelSLO | None = None  # what the worker's multi-model policy weighs the model by
    pinned: bool = False  # keep its weights in VRAM once registered
    keep_alive_s: float | None = None  # evict its weights once idle this long (None: when the memory is needed)
    preload: bool = False  # bring its weights into VRAM at registration, before any request
    loras: dict[str, str] = field(default_factory=dict)  # LoRA adapters served over it: name -> adapter directory


@dataclass
class SetLoras:  # C->W: host exactly these LoRA adapters over a registered model (name -> directory)
    model: str
    loras: dict[str, str]


@dataclass
class PinModel:  # C->W: keep a registered model's weights in VRAM (or stop)
    model: str
    pinned: bool


@dataclass
class RetuneModel:  # C->W: a registered model's SLO (the policy's weights) and keep_alive, changed in place
    model: str
    slo: ModelSLO
    keep_alive_s: float | None = None  # None: its weights stay until the memory is needed


@dataclass
class UnloadModel:  # C->W
    model: str


@dataclass
class EvictModel:  # C->W: free a registered model's VRAM once it is idle (it stays registered; host copy kept)
    model: str


@dataclass
class ModelLoaded:  # W->C, answer to LoadModel (ok or not)
    model: str
    ok: bool
    error: str | None = None
    max_model_len: int = 0
    max_num_seqs: int = 0
    load_s: float = 0.0


@dataclass
class NewRequest:  # C->W
    request_id: str
    model: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class Abort:  # C->W
    request_ids: list[str]


@dataclass
class Delta:
    """What one request produced in one step (not a message of its own; carried by Outputs)."""

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[list[list[float]]] | None = None  # per token: [[token_id, logprob], ...] sampled first
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int = 0
    error: str | None = None  # set when the engine refused or failed the request
    error_kind: str | None = None  # "invalid" (client's fault: 400) | "engine" (503)
    # (prompt_logprobs asked; with the first tokens) each prompt token's after the first, as `logprobs`
    prompt_logprobs: list[list[list[float]]] | None = None
    embedding: list[float] | None = None  # (SamplingParams.embed; finished) the last prompt token's final hidden state
    num_cached_tokens: int = 0  # (first and last delta) prompt tokens whose KV its start found in the prefix cache
    stop_reason: int | str | None = None  # (finished "stop") the stop string or stop token id that ended it
    load_s: float = 0.0  # (its first delta) seconds it waited for its model's weights to load on the engine


@dataclass
class Outputs:  # W->C, one batch per engine step
    deltas: list[Delta]


@dataclass
class Heartbeat:  # both ways
    t: float


@dataclass
class Stats:  # W->C, every heartbeat
    models: dict[str, dict[str, float]]  # per loaded model: engine.stats() (num_running, kv_blocks_used, ...)
    step_s: float  # EWMA of a round: how long a busy model waits from one of its steps to its next
    steps: int
    tokens: int  # generated so far
    gpu: dict[str, float] = field(default_factory=dict)
    # the pooled engine's state (controller/hosting.py `HostedModels.snapshot`): active model, resident and
    # prefetching models, switches, VRAM split, per-model queue/KV, the step timeline; and the worker's own
    # (worker.py `_snapshot`): `evicts`, the EvictModel messages it applied per model on this connection (the
    # controller takes its view of a model it evicted again once they count every evict it sent: pool.py
    # `_keep_gone`), `kv_page_bytes`, `loop` (its step loop's times). /admin/engines shows it (its `pool`)
    pool: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)  # the events since the last Stats


@dataclass
class Shutdown:  # C->W
    reason: str = ""


Message = Union[
    Register, Registered, Rejected, LoadModel, PinModel, RetuneModel, UnloadModel, EvictModel, SetLoras, ModelLoaded,
    NewRequest, Abort, Outputs, Heartbeat, Stats, Shutdown,
]
_TYPES: dict[str, type] = {
    c.__name__: c
    for c in (Register, Registered, Rejected, LoadModel, PinModel, RetuneModel, UnloadModel, EvictModel, SetLoras,
              ModelLoaded, NewRequest, Abort, Outputs, Heartbeat, Stats, Shutdown)
}


class ProtocolError(Exception):
    pass


# Outputs is the hot path (one per engine step, a delta per running request): each Delta goes as the list of
# its field values in declaration order, trailing defaults dropped -- ["cmpl-1-0", "Hi", [13]] -- which
# encodes and decodes ~2x faster than a dict per delta (no keys, no asdict deep copies).
def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default  # MISSING (request_id) never equals a value


_DELTA_DEFAULTS = tuple(_default(f) for f in dataclasses.fields(Delta))


def _delta_values(d: Delta) -> list[Any]:
    v = list(vars(d).values())
    n = len(v)
    while n > 1 and v[n - 1] == _DELTA_DEFAULTS[n - 1]:
        n -= 1
    del v[n:]
    return v


def _changed(obj: Any) -> dict[str, Any]:
    """A dataclass's fields that differ from a default instance's: the wire stays as short as the dict was."""
    base = _BASE[type(obj)]
    return {k: v for k, v in ((f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)) if v != base[k]}


_BASE = {t: {f.name: getattr(t(), f.name) for f in dataclasses.fields(t)} for t in (SamplingParams, ModelSLO)}
# (message, field) -> (to the wire, from it) for the typed options; every other field is plain JSON
_TYPED: dict[tuple[type, str], tuple[Callable[[Any], Any], Callable[[Any], Any]]] = {
    (NewRequest, "params"): (_changed, lambda d: SamplingParams(**d)),
    (LoadModel, "slo"): (_changed, lambda d: ModelSLO(**d)),
    (RetuneModel, "slo"): (_changed, lambda d: ModelSLO(**d)),
    (LoadModel, "engine"): (lambda o: o.model_dump(exclude_defaults=True), EngineOptions.model_validate),
}


def encode(msg: Message) -> bytes:
    cls = type(msg)
    d: dict[str, Any] = {"msg": cls.__name__}
    if cls is Outputs:
        d["deltas"] = [_delta_values(x) for x in msg.deltas]
    else:
        for f in dataclasses.fields(msg):
            v = getattr(msg, f.name)
            codec = _TYPED.get((cls, f.name))
            d[f.name] = codec[0](v) if codec is not None and v is not None else v
    body = json.dumps(d, separators=(",", ":")).encode()
    return _LEN.pack(len(body)) + body


def decode(body: bytes) -> Message:
    try:
        d = json.loads(body)
        cls = _TYPES[d.pop("msg")]
        if cls is Outputs:
            return Outputs(deltas=[Delta(*x) for x in d["deltas"]])
        for k, v in d.items():
            codec = _TYPED.get((cls, k))
            if codec is not None and v is not None:
                d[k] = codec[1](v)
        return cls(**d)
    except (ValueError, KeyError, TypeError) as e:  # pydantic's ValidationError is a ValueError
        raise ProtocolError(f"bad frame: {e}") from e


async def read_message(reader: asyncio.StreamReader) -> Message:
    """Next message; raises asyncio.IncompleteReadError at EOF, ProtocolError on garbage."""
    (n,) = _LEN.unpack(await reader.readexactly(4))
    if n > MAX_FRAME:
        raise ProtocolError(f"frame of {n} bytes exceeds {MAX_FRAME}")
    return decode(await reader.readexactly(n))


def write_message(writer: asyncio.StreamWriter, msg: Message) -> None:
    """Queue a frame (callers await writer.drain() where back-pressure matters)."""
    writer.write(encode(msg))
