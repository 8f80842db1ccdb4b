"""Placement and routing: which engines have which models registered, and which engine serves a request.
Pure logic: views are snapshots the controller builds from its live state; functions return decisions.

A model registered on an engine lives in that engine's pooled, token-level engine: its weights are in the
node's host cache and come into VRAM as that engine's policy plans, so registrations are not bounded by VRAM
(more model bytes than VRAM is the normal case) -- only each model's own weights must fit the engine's
weight space. Placement spreads registrations so every engine carries a similar share of bytes and load;
routing sends a request to the registered engine with the lowest estimated time to first token, by the
pool's own numbers (its round, the model's queue, prefill seconds per prompt token, the load when the
weights are not in VRAM). Nothing is loaded or evicted per request. When engines join after models were
placed (GPU workers start one by one), `rebalance` moves registrations to even the shares out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from controller.admission import estimate_ttft
from gpu_pool.placement import align_up


@dataclass(frozen=True)
class ReplicaView:
    model: str
    ready: bool  # False while loading
    max_num_seqs: int
    running_remaining: tuple[int, ...] = ()  # expected remaining steps of requests holding slots
    waiting_tokens: tuple[int, ...] = ()  # expected steps of queued requests, FIFO
    draining: bool = False  # being removed by the autoscaler: no new requests
    step_s: float = 0.0  # measured step time of this model's engine alone (0: unknown)
    prefill_s_per_token: float = 0.0  # the pool's fit of one prompt token's prefill
    load_s: float = 0.0  # time to bring its weights into VRAM now (0: resident or landing)
    queued_prompt_tokens: int = 0  # prompt tokens of its requests that have not started yet

    @property
    def inflight(self) -> int:
        return len(self.running_remaining) + len(self.waiting_tokens)


@dataclass(frozen=True)
class EngineView:
    engine_id: str
    memory_bytes: int  # budget for model weights
    replicas: dict[str, ReplicaView] = field(default_factory=dict)
    step_s: float = 0.05
    alive: bool = True
    draining: bool = False

    @property
    def usable(self) -> bool:
        return self.alive and not self.draining

    @property
    def inflight(self) -> int:
        return sum(r.inflight for r in self.replicas.values())


@dataclass(frozen=True)
class ModelInfo:
    name: str
    size_bytes: int
    priority: int = 0
    load_s: float = 1.0  # measured or guessed time to load it onto an engine

    @property
    def slot_bytes(self) -> int:
        """What its weights take of a pooled engine's weight space (`EngineView.memory_bytes`): a slot, its bytes
        rounded up to the arena's alignment. A model fits an engine by this, as its worker judges it: by its bytes,
        one within the alignment of the weight space was placed there, and its registration failed."""
        return align_up(self.size_bytes)


@dataclass(frozen=True)
class Route:
    engine_id: str
    est_ttft_s: float
    queued: bool  # the request would wait for a slot
    queue_len: int
    load: bool = False  # a new registration: the model is registered there first
    prefill_s: float = 0.0  # the request's own prefill there, by the pool's fit (admission refuses what alone misses)
    cached_tokens: int = 0  # of its prompt, the tokens that engine likely has cached (controller.prefix_index)
    engine_busy: bool = True  # the engine has requests in flight (of any model): a long prefill would hold them up


# What a decode step costs beyond reading its weights, in weight bytes (H200, bench engine at batch 1: a 1.5B
# step is 0.54 ms over its 0.72 ms floor, a 7B 0.40 ms over 3.56 ms; ~2 GB at 4.25 TB/s). Placement weighs a
# registration by its bytes plus this, so a GPU given many small models is not counted as lightly loaded:
# pooled engines step their models in turn, and each model's turn pays it.
STEP_OVERHEAD_BYTES = 2 * 10**9


def weight(info: ModelInfo) -> int:
    """A registration's share of an engine for placement: the bytes its decode steps read, plus a step's fixed
    cost (`STEP_OVERHEAD_BYTES`)."""
    return info.size_bytes + STEP_OVERHEAD_BYTES


def pin_blocks(name: str, registered: list[str], models: dict[str, ModelInfo], pinned: set[str],
               memory_bytes: int) -> str | None:
    """Whether pinning `name` on an engine of `memory_bytes` of weight space, where `registered` models are hosted
    and `pinned` ones already pinned, leaves too little room for another registered model: that model's weights
    could then never load, and its requests would wait forever. The first such model, or None; `name` itself when
    the pins alone (its own included) overfill the weight space."""
    def slot(n: str) -> int:
        return models[n].slot_bytes if n in models else 0

    held = sum(slot(n) for n in set(registered) & (pinned | {name}))
    if held > memory_bytes:  # the pins alone overfill the weight space: not all of them can ever be resident
        return name
    return next((n for n in registered if n != name and n not in pinned and slot(n) > memory_bytes - held), None)


def pins_starve(registered: list[str], memory_bytes: int, models: dict[str, ModelInfo],
                pinned: set[str] | frozenset[str]) -> str | None:
    """`pin_blocks` for an engine's pins taken together: the model among `registered` (in that order: a caller asking
    about a registration it would add puts that model first) that the pinned ones leave too little of
    `memory_bytes` of weight space, or None. The one rule start-up, the admin API and placement share."""
    p = [n for n in registered if n in pinned]
    return pin_blocks(p[0], registered, models, set(p[1:]), memory_bytes) if p else None


def pins_on(e: EngineView, pinned: set[str] | frozenset[str], adding: str | None = None) -> list[str]:
    """The pinned models registered on `e` (and `adding`, a registration being weighed, if pinned), in its order."""
    return [n for n in [*e.replicas, *([adding] if adding is not None else [])] if n in pinned]


def pin_blocked(model: ModelInfo, engines: list[EngineView], models: dict[str, ModelInfo],
                pinned: set[str] | frozenset[str]) -> dict[str, str]:
    """The usable engines whose weight space fits `model` but where a new registration of it would be starved by the
    pins there, or (pinned itself) would starve a model registered there (`pins_starve`): engine id -> that model.
    Placement passes them over: the registration would be made, but its weights (or the other model's) could never
    load, and requests to it would wait until they time out."""
    out, models = {}, {**models, model.name: model}
    for e in engines:
        if e.usable and model.name not in e.replicas and model.slot_bytes <= e.memory_bytes:
            other = pins_starve([model.name, *e.replicas], e.memory_bytes, models, pinned)
            if other is not None:
                out[e.engine_id] = other
    return out


def starved_by_pins(engines: list[EngineView], models: dict[str, ModelInfo],
                    pinned: set[str]) -> tuple[str, list[str], str] | None:
    """A model the pinned models would leave too little weight space (`pins_starve`, an engine's pins taken
    together): (the engine, the pinned models registered there, the model), the first found; None when none.
    A model registered on an engine is judged there; one registered nowhere (yet: replicas.min 0, or placement
    found no engine: `pin_blocked`), against every usable engine its weights fit -- starved only when on each of
    them it would be starved, or (pinned itself) would starve a model registered there."""
    usable = [e for e in engines if e.usable]
    for e in usable:
        other = pins_starve(list(e.replicas), e.memory_bytes, models, pinned)
        if other is not None:
            return e.engine_id, pins_on(e, pinned), other
    placed = {n for e in usable for n in e.replicas}
    for name, info in models.items():
        if name in placed:
            continue
        fits = [e for e in usable if info.slot_bytes <= e.memory_bytes]
        blocked = pin_blocked(info, fits, models, pinned)
        if fits and len(blocked) == len(fits):
            e = fits[0]
            return e.engine_id, pins_on(e, pinned, name), blocked[e.engine_id]
    return None


def used_weight(e: EngineView, models: dict[str, ModelInfo]) -> int:
    """The placement weight of the models registered on `e` (host-cache bytes and more: it may exceed VRAM)."""
    return sum(weight(models[m]) for m in e.replicas if m in models)


def estimate_on(e: EngineView, r: ReplicaView, prompt_tokens: int = 0) -> tuple[float, bool]:
    """Estimated TTFT of a new request of `r.model` with `prompt_tokens` on `e`, and whether it queues: for a slot,
    or behind prompts not yet prefilled (admission judges it by the estimate then; with a slot free it was always
    admitted, and a burst on a CPU's 64 slots had its TTFTs reach 27 s against a 5 s SLO)."""
    queued = r.inflight >= r.max_num_seqs or r.queued_prompt_tokens > 0
    # models on one engine are stepped in turn: a round (the engine's measured figure) is at least either step. But
    # while the engine's other models have no work, the model's own step is its round: the engine's figure keeps the
    # slowest model's step, and a fast model beside an idle slow one was judged at the slow one's pace (a paced
    # model beside an LLM: 98 s estimated for 40 tokens, a 429 on an idle server).
    others = [o for n, o in e.replicas.items() if n != r.model]
    idle_beside = others and not any(o.inflight for o in others) and r.step_s > 0
    step = r.step_s if idle_beside else max(e.step_s, r.step_s)
    prefill = (r.queued_prompt_tokens + prompt_tokens) * r.prefill_s_per_token
    return estimate_ttft(r.running_remaining, r.waiting_tokens, r.max_num_seqs, step, load_s=r.load_s,
                         prefill_s=prefill), queued


def route(model: ModelInfo, engines: list[EngineView], prompt_tokens: int = 0,
          cached: Callable[[str], int] | None = None) -> Route | None:
    """The registered engine with the lowest estimated TTFT for one request, or None if no usable engine has
    the model registered (the caller places a registration: `place`). `cached(engine_id)`: the prompt tokens that
    engine likely has in its prefix cache (they cost no prefill there: prefix-cache-aware routing)."""
    best: Route | None = None
    for e in engines:
        r = e.replicas.get(model.name)
        if not e.usable or r is None or r.draining:
            continue
        hit = min(cached(e.engine_id), prompt_tokens) if cached is not None else 0
        est, queued = estimate_on(e, r, prompt_tokens - hit)
        if not r.ready:
            est += model.load_s  # its registration (host copy) is still being loaded
        if best is None or est < best.est_ttft_s:
            best = Route(e.engine_id, est, queued, r.inflight, prefill_s=(prompt_tokens - hit) * r.prefill_s_per_token,
                         cached_tokens=hit, engine_busy=any(x.inflight for x in e.replicas.values()))
    return best


def place(model: ModelInfo, engines: list[EngineView], models: dict[str, ModelInfo],
          exclude: frozenset[str] = frozenset(), pinned: set[str] | frozenset[str] = frozenset(),
          blocked: dict[str, str] | None = None) -> Route | None:
    """Which engine a new registration of `model` goes to: one whose weight space fits the model beside the
    `pinned` models there (`pin_blocked`), the one with the smallest registered weight per byte of weight space,
    then the least busy. No evictions: a registration takes host memory, and VRAM is the pooled engine's to share.
    None if no engine can ever run it. Shares count each registration's `weight` (bytes plus a step's fixed cost).
    `blocked`: `pin_blocked`'s answer, where the caller has it already."""
    if blocked is None:
        blocked = pin_blocked(model, engines, models, pinned) if pinned else {}
    options = []
    for e in engines:
        if (not e.usable or model.name in e.replicas or e.engine_id in exclude or model.slot_bytes > e.memory_bytes
                or e.engine_id in blocked):
            continue
        share = used_weight(e, models) / max(1, e.memory_bytes)
        options.append((share, e.inflight, e.engine_id, e.step_s))
    if not options:
        return None
    _, _, eid, step_s = min(options)
    return Route(eid, model.load_s + step_s, False, 0, load=True)


def with_registration(engines: list[EngineView], engine_id: str, model: str) -> list[EngineView]:
    """`engines` with a (not yet ready) registration of `model` on `engine_id`: what a planned load will make, so
    the next placement of the same tick sees it."""
    return [replace(e, replicas={**e.replicas, model: ReplicaView(model, False, 1)}) if e.engine_id == engine_id
            else e for e in engines]


def rebalance(engines: list[EngineView], models: dict[str, ModelInfo], fixed: frozenset[str] = frozenset(),
              avoid: dict[str, frozenset[str]] | None = None, moving: dict[str, str] | None = None,
              pinned: set[str] | frozenset[str] = frozenset()) -> list[tuple[str, str, str]]:
    """Moves (model, from engine, to engine) that even out the registered `weight` per byte of weight space, e.g.
    when a GPU's worker joins after every model was placed on the first one. A model moves only when its one
    registration is ready, it is not `fixed` (pinned), fits the target and its registration did not fail there
    lately (`avoid`: model -> engines), and the `pinned` models there leave it room (`pins_starve`, the moves
    planned before counted); and only while the gap between the fullest engine and the one it moves to is at least
    what the move itself shifts -- so the move back is never due (no ping-pong). The emptiest engine is tried
    first, then the next emptiest. The largest such model
    goes first, an idle one before a busy one of its size. A busy model moves too: the move is make-before-break
    (its requests in flight finish where they are), and under steady load no model is ever idle, so waiting for
    idleness left a late GPU nearly empty (2 x H200, 20 models at 0.7 req/s each: one GPU did the work). A move
    under way (`moving`: model -> the engine it leaves) counts on its new engine only."""
    live = {e.engine_id: e for e in engines if e.usable}
    if len(live) < 2:
        return []
    count: dict[str, int] = {}
    for e in engines:
        if e.alive:
            for name, r in e.replicas.items():
                count[name] = count.get(name, 0) + (not r.draining)
    # what each engine keeps: a draining registration (a moved model's old one, its last requests) is leaving
    regs = {eid: {n for n, r in e.replicas.items() if not r.draining} for eid, e in live.items()}
    used = {eid: sum(weight(models[n]) for n in regs[eid] if n in models) for eid in live}
    for name, src in (moving or {}).items():
        if src in regs and name in regs[src] and name in models:
            regs[src].discard(name)
            used[src] -= weight(models[name])
    cap = {eid: max(1, e.memory_bytes) for eid, e in live.items()}
    moves: list[tuple[str, str, str]] = []

    def pick(src: str, dst: str) -> ModelInfo | None:
        gap = used[src] / cap[src] - used[dst] / cap[dst]
        best, best_key = None, None
        for name, r in live[src].replicas.items():
            info = models.get(name)
            if (info is None or info.size_bytes <= 0 or name not in regs[src] or name in regs[dst] or name in fixed
                    or count.get(name) != 1 or not r.ready or info.slot_bytes > live[dst].memory_bytes
                    or dst in (avoid or {}).get(name, ())  # (a draining registration is not in regs)
                    or pins_starve([name, *sorted(regs[dst])], live[dst].memory_bytes, models, pinned) is not None):
                continue
            w = weight(info)
            key = (w, not r.inflight, name)
            if w / cap[src] + w / cap[dst] <= gap * (1 + 1e-9) and (best_key is None or key > best_key):
                best, best_key = info, key
        return best

    while True:
        # from the fullest engine to the emptiest that takes one of its models (pins, fit or a failed
        # registration there may rule the emptiest out: the next emptiest is tried, and so on). Each move
        # lowers the sum of squared shares, so the loop ends.
        order = sorted(live, key=lambda k: (used[k] / cap[k], k))
        src, best = order[-1], None
        for dst in order[:-1]:
            best = pick(src, dst)
            if best is not None:
                break
        if best is None:
            return moves
        regs[src].discard(best.name)
        regs[dst].add(best.name)
        used[src] -= weight(best)
        used[dst] += weight(best)
        moves.append((best.name, src, dst))
