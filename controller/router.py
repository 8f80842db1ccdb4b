"""Placement and routing: which engines hold which models, and which engine serves a request. Pure logic.

Views are snapshots the controller builds from its live state; functions return decisions, never act.
Routing prefers an engine that holds the model (lowest estimated TTFT); failing that, one that can load it
into free memory, then one that can by evicting idle models of lower or equal priority (cold models share).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from controller.admission import estimate_ttft


@dataclass(frozen=True)
class ReplicaView:
    model: str
    ready: bool  # False while loading
    max_num_seqs: int
    running_remaining: tuple[int, ...] = ()  # expected remaining steps of requests holding slots
    waiting_tokens: tuple[int, ...] = ()  # expected steps of queued requests, FIFO
    draining: bool = False  # being removed by the autoscaler: no new requests
    step_s: float = 0.0  # measured step time of this model's engine alone (0: unknown)

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


@dataclass(frozen=True)
class Route:
    engine_id: str
    est_ttft_s: float
    queued: bool  # the request would wait for a slot
    queue_len: int
    load: bool = False  # the model must be loaded there first
    evict: tuple[str, ...] = ()  # models to unload first to make room


def used_bytes(e: EngineView, models: dict[str, ModelInfo]) -> int:
    return sum(models[m].size_bytes for m in e.replicas if m in models)


def estimate_on(e: EngineView, r: ReplicaView, load_s: float = 0.0) -> tuple[float, bool]:
    queued = r.inflight >= r.max_num_seqs
    step = max(e.step_s, r.step_s)  # models on one engine are stepped in turn: a round is at least either
    return estimate_ttft(r.running_remaining, r.waiting_tokens, r.max_num_seqs, step, load_s=load_s), queued


def evictable(e: EngineView, need: int, models: dict[str, ModelInfo], priority: int) -> tuple[str, ...] | None:
    """Idle models on `e` (lowest priority first) whose removal frees `need` bytes, or None."""
    free = e.memory_bytes - used_bytes(e, models)
    if free >= need:
        return ()
    idle = sorted((m for m, r in e.replicas.items() if r.inflight == 0 and m in models
                   and models[m].priority <= priority), key=lambda m: (models[m].priority, -models[m].size_bytes))
    out = []
    for m in idle:
        out.append(m)
        free += models[m].size_bytes
        if free >= need:
            return tuple(out)
    return None


def route(model: ModelInfo, engines: list[EngineView], models: dict[str, ModelInfo]) -> Route | None:
    """The engine for one request of `model`, or None when no engine can take it."""
    best: Route | None = None
    for e in engines:
        r = e.replicas.get(model.name)
        if not e.usable or r is None or r.draining:
            continue
        est, queued = estimate_on(e, r, 0.0 if r.ready else model.load_s)
        if best is None or est < best.est_ttft_s:
            best = Route(e.engine_id, est, queued, r.inflight)
    if best is not None:
        return best
    return place(model, engines, models)


def place(model: ModelInfo, engines: list[EngineView], models: dict[str, ModelInfo],
          exclude: frozenset[str] = frozenset()) -> Route | None:
    """Where a new replica of `model` goes: least-loaded engine with room, else the cheapest eviction."""
    options = []
    for e in engines:
        if not e.usable or model.name in e.replicas or e.engine_id in exclude:
            continue
        ev = evictable(e, model.size_bytes, models, model.priority)
        if ev is None:
            continue
        options.append((len(ev), e.inflight, -(e.memory_bytes - used_bytes(e, models)), e.engine_id, ev, e.step_s))
    if not options:
        return None
    _, _, _, eid, ev, step_s = min(options)
    return Route(eid, model.load_s + step_s, False, 0, load=True, evict=ev)


def initial_placement(specs: list[tuple[ModelInfo, int]], engines: list[EngineView]) -> list[tuple[str, str]]:
    """(model, engine_id) pairs giving each model its minimum replicas; important and large models first."""
    models = {m.name: m for m, _ in specs}
    state = {e.engine_id: dict(e.replicas) for e in engines}
    out = []
    for m, n in sorted(specs, key=lambda s: (-s[0].priority, -s[0].size_bytes)):
        for _ in range(n):
            views = [EngineView(e.engine_id, e.memory_bytes, state[e.engine_id], e.step_s, e.alive, e.draining)
                     for e in engines]
            rt = place(m, views, models)
            if rt is None or rt.evict:
                break  # does not fit without evicting a model that must stay resident
            state[rt.engine_id][m.name] = ReplicaView(m.name, False, 1)
            out.append((m.name, rt.engine_id))
    return out
