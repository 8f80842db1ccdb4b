"""What a multi-model policy sees (a snapshot the mechanism keeps current) and what it returns (a plan).

Contract: the mechanism (simulator, MultiModelEngine) owns and mutates `PoolState`; a policy only reads it and
returns a `StepPlan`. Requests are duck-typed `token_scheduler.request.Request`s: a policy reads
`request_id, arrival_time, num_prompt_tokens, num_tokens, num_computed_tokens, status, priority` and never
writes them. KV location is the request's status: WAITING = no KV yet, RUNNING = KV in VRAM (possibly a
partial prefill), SWAPPED = KV in host memory. A planned swap-out moves KV to host memory; only where the host
has no room (`ModelState.host_kv_free`) does the mechanism drop it instead (the request waits again with its tokens
and is recomputed).

Where KV lives, so that a plan's batch fits as planned (the mechanism runs it as is, it does not re-plan):
- by default KV and weights share `PoolState.capacity_bytes` (the simulator without an arena);
- `PoolState.kv_capacity_bytes`: one KV region shared by the models, apart from the weight space (a pooled
  engine's pages, `residency.ModelPool`); KV swap-outs free it, weight evictions do not;
- `ModelState.own_kv_bytes`: the model's own KV cache (an engine with every model resident); only its own
  preemptions free it.
KV is allocated in blocks (`kv_block_tokens` tokens, `kv_block_bytes` bytes each): `ModelState.kv_bytes(n)`
is what a request of n computed tokens holds, and `kv_gpu_tokens` counts whole blocks.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from token_scheduler.cost_model import CostModel, ModelSize
from token_scheduler.policies.slo import ModelSLO


class Residency(enum.IntEnum):
    HOST = 0  # weights only in host memory
    LOADING = 1  # host -> VRAM copy in flight (VRAM already reserved)
    RESIDENT = 2


_HOST = Residency.HOST


def blocks(tokens: int, block_tokens: int) -> int:
    """Whole KV blocks holding `tokens` tokens (the mechanism allocates whole blocks)."""
    return -(-tokens // block_tokens)


@dataclass(slots=True)
class ModelState:
    spec: ModelSize
    slo: ModelSLO
    # Not started (no KV), arrival order. The mechanism appends new requests here.
    waiting: deque = field(default_factory=deque)
    # Started and unfinished (KV in VRAM or host), arrival order. The mechanism moves a request here from
    # `waiting` the first time a plan computes tokens for it, and removes it when it finishes.
    running: list = field(default_factory=list)
    residency: Residency = Residency.HOST
    ready_at: float = 0.0  # LOADING: when the copy is expected to finish
    kv_gpu_tokens: int = 0  # KV tokens in VRAM of RUNNING requests, in whole blocks (mechanism keeps it)
    pinned: bool = False  # an operator keeps its weights in VRAM: no policy evicts them
    kv_block_tokens: int = 1  # the mechanism allocates KV in blocks of this many tokens
    kv_block_bytes: int = 0  # bytes of one block; 0: kv_block_tokens x spec.kv_bytes_per_token
    own_kv_bytes: int | None = None  # a KV cache of this model's own (None: KV from the shared region/capacity)
    # Host pages (blocks) left for its preempted KV, as the mechanism reports them: its own swap space's free ones,
    # or the pool's shared ones (pages freed as swapped requests resume). A victim whose KV does not fit is dropped
    # and recomputed, so victims are chosen counting them (batching.pick_victim). None: not counted (always room).
    host_kv_free: int | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def has_work(self) -> bool:
        return bool(self.waiting) or bool(self.running)

    @property
    def block_bytes(self) -> int:
        return self.kv_block_bytes or self.kv_block_tokens * self.spec.kv_bytes_per_token

    def kv_bytes(self, tokens: int) -> int:
        """VRAM one request holding KV of `tokens` tokens takes: whole blocks, as the mechanism allocates."""
        return blocks(tokens, self.kv_block_tokens) * self.block_bytes

    @property
    def kv_gpu_bytes(self) -> int:
        return self.kv_bytes(self.kv_gpu_tokens)


@dataclass(slots=True)
class PoolState:
    """One GPU's view: its models, its VRAM budget, the clock, the cost model (KV: module docstring)."""

    models: dict[str, ModelState]
    capacity_bytes: int  # weights, and KV unless it has a region or pools of its own
    cost: CostModel
    now: float = 0.0
    active: str | None = None  # model of the last step (its weights are surely resident)
    kv_capacity_bytes: int | None = None  # a KV region apart from the weights, shared by the models
    # An arena's weight space: its largest free contiguous range (the mechanism keeps it current). A slot needs
    # one range, so free bytes scattered in smaller ones do not hold it (`slot_room`). None: bytes are all.
    weight_free_run: int | None = None
    # Whether the mechanism's blocking load of a model would find it a range, evicting what a load may (every landed
    # slot but the pinned ones). Asked only where evicting every victim frees less than a slot's worth beside pinned
    # weights or a load in flight: those may split the arena, or not -- the free bytes cannot say. None: not known.
    can_load: Callable[[str], bool] | None = None

    # The two sums below run on every schedule() over every model (dozens per GPU): plain loops that skip what
    # adds nothing (models in host memory, models holding no KV), no generator, no property call per model
    # (35 models, 16 resident: the weight sum went from 4.0 to 0.8 us).
    def weight_bytes_used(self) -> int:
        n = 0
        for m in self.models.values():
            if m.residency != _HOST:
                n += m.spec.weight_bytes
        return n

    def kv_bytes_used(self) -> int:
        """KV in the shared region (or, without one, in `capacity_bytes`); models' own KV caches not counted."""
        n = 0
        for m in self.models.values():
            if m.kv_gpu_tokens and m.own_kv_bytes is None:
                n += m.kv_gpu_bytes
        return n

    def free_bytes(self) -> int:
        """Free bytes of `capacity_bytes`: the weight space (and KV's, when they share it)."""
        kv = self.kv_bytes_used() if self.kv_capacity_bytes is None else 0
        return self.capacity_bytes - self.weight_bytes_used() - kv

    def slot_room(self, nbytes: int) -> int:
        """Free bytes a plan may count toward a slot of `nbytes`: all of them when one free range holds it,
        none when none does (room must then come from evictions: a victim of the slot's size leaves exactly
        the range needed; smaller ones scattered over the arena rarely join up)."""
        run = self.weight_free_run
        return self.free_bytes() if run is None or run >= nbytes else 0

    def kv_free_bytes(self, m: ModelState) -> int:
        """Bytes `m`'s KV may still grow by: its own cache's free part, the region's, or the shared capacity's."""
        if m.own_kv_bytes is not None:
            return m.own_kv_bytes - m.kv_gpu_bytes
        if self.kv_capacity_bytes is not None:
            return self.kv_capacity_bytes - self.kv_bytes_used()
        return self.free_bytes()

    def kv_with_weights(self, m: ModelState) -> bool:
        """`m`'s KV takes from the same bytes as weights (so evicting weights makes KV room, and the reverse)."""
        return m.own_kv_bytes is None and self.kv_capacity_bytes is None

    def kv_neighbours(self, m: ModelState) -> set[str]:
        """The other models whose KV swap-outs free room for `m`'s KV (those sharing its region)."""
        if m.own_kv_bytes is not None:
            return set()
        return {n for n, o in self.models.items() if o is not m and o.own_kv_bytes is None}


@dataclass(slots=True)
class StepPlan:
    """One step: run one model's batch, after/while moving weights and KV as listed.

    Order of execution (the mechanism's contract): drop `evict` weights (host copy stays) -> start
    `swap_out` copies (VRAM -> host, async) -> make `model` resident (blocking if not already) -> `swap_in`
    copies (the step waits for them) -> start `prefetch` (async; must not delay this step) -> run `batch`.
    If `wait_swap_out`, the step (and the loads) wait for the swap-outs: their VRAM is needed now.
    `batch` runs exactly as planned (the mechanism builds no batch of its own), so it must fit the state's KV
    (`policies.batching.build_batch` over `PoolState.kv_free_bytes`, after the plan's swap-outs).
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
