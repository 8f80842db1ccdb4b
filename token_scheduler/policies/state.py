"""What a multi-model policy sees (a snapshot the mechanism keeps current) and what it returns (a plan).

Contract: the mechanism (simulator, MultiModelEngine) owns and mutates `PoolState`; a policy only reads it and
returns a `StepPlan`. Requests are duck-typed `token_scheduler.request.Request`s: a policy reads
`request_id, arrival_time, num_prompt_tokens, num_tokens, num_computed_tokens, status, priority` and never
writes them. KV location is the request's status: WAITING = no KV yet, RUNNING = KV in VRAM (possibly a
partial prefill), SWAPPED = KV in host memory. KV is never dropped: a request leaves `running` only finished.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from token_scheduler.cost_model import CostModel, ModelSpec
from token_scheduler.policies.slo import ModelSLO


class Residency(enum.IntEnum):
    HOST = 0  # weights only in host memory
    LOADING = 1  # host -> VRAM copy in flight (VRAM already reserved)
    RESIDENT = 2


@dataclass(slots=True)
class ModelState:
    spec: ModelSpec
    slo: ModelSLO
    # Not started (no KV), arrival order. The mechanism appends new requests here.
    waiting: deque = field(default_factory=deque)
    # Started and unfinished (KV in VRAM or host), arrival order. The mechanism moves a request here from
    # `waiting` the first time a plan computes tokens for it, and removes it when it finishes.
    running: list = field(default_factory=list)
    residency: Residency = Residency.HOST
    ready_at: float = 0.0  # LOADING: when the copy is expected to finish
    kv_gpu_tokens: int = 0  # sum of num_computed_tokens over RUNNING requests (mechanism keeps it)
    pinned: bool = False  # an operator keeps its weights in VRAM: no policy evicts them

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def has_work(self) -> bool:
        return bool(self.waiting) or bool(self.running)

    @property
    def kv_gpu_bytes(self) -> int:
        return self.kv_gpu_tokens * self.spec.kv_bytes_per_token


@dataclass(slots=True)
class PoolState:
    """One GPU's view: its models, its VRAM budget, the clock, the cost model."""

    models: dict[str, ModelState]
    capacity_bytes: int
    cost: CostModel
    now: float = 0.0
    active: str | None = None  # model of the last step (its weights are surely resident)

    def weight_bytes_used(self) -> int:
        return sum(m.spec.weight_bytes for m in self.models.values() if m.residency != Residency.HOST)

    def kv_bytes_used(self) -> int:
        return sum(m.kv_gpu_bytes for m in self.models.values())

    def free_bytes(self) -> int:
        return self.capacity_bytes - self.weight_bytes_used() - self.kv_bytes_used()


@dataclass(slots=True)
class StepPlan:
    """One step: run one model's batch, after/while moving weights and KV as listed.

    Order of execution (the mechanism's contract): drop `evict` weights (host copy stays) -> start
    `swap_out` copies (VRAM -> host, async) -> make `model` resident (blocking if not already) -> `swap_in`
    copies (the step waits for them) -> start `prefetch` (async; must not delay this step) -> run `batch`.
    If `wait_swap_out`, the step (and the loads) wait for the swap-outs: their VRAM is needed now.
    """

    model: str | None = None  # None: nothing to run now
    batch: list = field(default_factory=list)  # [(request, num_tokens)], decode entries have 1 token
    evict: list[str] = field(default_factory=list)
    swap_out: list = field(default_factory=list)  # requests
    swap_in: list = field(default_factory=list)  # requests (all in `batch`)
    prefetch: str | None = None
    # When free bytes suffice but no contiguous range does (the mechanism's arena; gpu_pool/placement.py):
    # the models that may go for `model`'s load / for the prefetch, preferred victim first. None: the
    # mechanism's fallback (a load evicts its least recently used models until it fits; a prefetch is skipped).
    load_order: list[str] | None = None
    prefetch_order: list[str] | None = None
    wait_swap_out: bool = False
    expected_s: float = 0.0  # predicted step time (cost model), for metrics
    why: str = ""

    @property
    def idle(self) -> bool:
        return self.model is None or not self.batch

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.batch)
