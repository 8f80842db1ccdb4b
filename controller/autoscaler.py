"""Autoscaling: a hot model gets registered on another GPU, a cold one gives extra registrations back. Pure
logic with hysteresis. A model is never left with fewer registrations than its minimum (a registration is
its host copy and a place in a GPU's pooled engine, not VRAM: the engine's policy decides residency).

Every tick the controller hands in each model's measured load (in-flight requests per replica slot) and SLO
attainment over a recent window; a model must be hot for `up_ticks` ticks in a row to grow by one replica and
cold for `down_ticks` to shrink by one (down_ticks >> up_ticks: scaling up is cheap to undo, thrashing is not).
Between the two thresholds nothing moves. After acting, the model's counter restarts (a cooldown). A model's last
registration (`replicas.min: 0`) also stays while the model was used within its keep_alive (`ModelLoad.kept_alive`).
A cold model's only ready registration is not the one given back while its others still load (make before break).

A GPU that misses a model's SLO ("struggling") gets no extra registration, and gives back, after `up_ticks`, a
registration whose model is also served on a healthy GPU (`sheds`: drained, then unregistered): a pooled GPU
steps its models in turn, so an extra model there takes turns from the ones it fails.

Placement is part of each tick too: a model below its minimum is registered where `router.place` says (the
loads planned earlier in the tick count, so models placed together spread), and `router.rebalance` moves
registrations off an engine that carries more than its share (an engine that joined late starts empty).
Neither puts a model on an engine whose pinned models would leave it (or, pinned itself, would leave a model
there) too little weight space: registered there, its weights could never load (`router.pin_blocked`).
"""

from __future__ import annotations

from dataclasses import dataclass

from controller.config import AutoscalerSettings
from controller.router import (
    EngineView,
    ModelInfo,
    Route,
    pin_blocked,
    pins_on,
    place,
    rebalance,
    with_registration,
)


@dataclass(frozen=True)
class ModelLoad:
    info: ModelInfo
    min_replicas: int
    max_replicas: int
    inflight: int
    capacity: int  # max_num_seqs of one replica
    slo_attainment: float | None = None  # fraction of recent requests within SLO; None: too few to tell
    pinned: bool = False  # an operator's pin: its registrations stay where they are
    avoid: frozenset[str] = frozenset()  # engines where its registration failed lately: not placed there again yet
    # Its keep_alive in force (an Ollama request's, else models[].keep_alive: ModelEntry.keep_alive; inf: for ever;
    # None: unset) and the seconds since it was last used (0 while a request of it runs; None: never). Its last
    # registration is not given back while it has been idle less than its keep_alive: a `replicas.min: 0` model with
    # keep_alive 15m was unregistered, its weights freed, once down_ticks passed
    keep_alive_s: float | None = None
    idle_s: float | None = None

    @property
    def kept_alive(self) -> bool:
        """Its keep_alive still holds it (used within it): it is not scaled to zero yet."""
        return self.keep_alive_s is not None and self.idle_s is not None and self.idle_s < self.keep_alive_s


def _hosts(name: str, engines: list[EngineView]) -> list[EngineView]:
    """The live engines where `name` is registered and not draining."""
    return [e for e in engines if e.alive and name in e.replicas and not e.replicas[name].draining]


@dataclass(frozen=True)
class Action:
    # "load" | "unload" | "move" (load on engine_id, then unload from source: placement's evening out) | "shed"
    # (drain the registration on engine_id, then unload it: the engine misses another model's SLO)
    kind: str
    model: str
    engine_id: str
    source: str | None = None


class Autoscaler:
    def __init__(self, settings: AutoscalerSettings):
        self.s = settings
        self._hot: dict[str, int] = {}
        self._cold: dict[str, int] = {}
        self._shed: dict[tuple[str, str], int] = {}  # (model, engine): ticks in a row its registration there could go
        # (model, engine) -> (the model the pins there would starve, those pins): engines this tick's placements
        # passed over for pins. The controller tells of them: a hot model placed elsewhere, or nowhere, is otherwise
        # a silent difference from what its load asked for
        self.pin_blocked: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = {}

    def plan(self, loads: list[ModelLoad], engines: list[EngineView],
             moving: dict[str, str] | None = None) -> list[Action]:
        """This tick's actions. `moving`: models whose placement move is under way (model -> the engine it
        leaves once the new registration is ready); they count on their new engine only, and nothing else is done
        to them."""
        models = {ml.info.name: ml.info for ml in loads}
        pinned = frozenset(ml.info.name for ml in loads if ml.pinned)
        actions: list[Action] = []
        struggling = self.struggling(loads, engines)
        self.pin_blocked = {}
        for ml in sorted(loads, key=lambda x: -x.info.priority):
            name = ml.info.name
            hosts = _hosts(name, engines)
            n = len(hosts)
            exclude = ml.avoid | {a.engine_id for a in actions if a.model == name}
            if n < ml.min_replicas:
                rt = self._place(ml.info, engines, models, exclude, pinned)
                if rt is not None:
                    actions.append(Action("load", name, rt.engine_id))
                    engines = with_registration(engines, rt.engine_id, name)
                continue
            load = ml.inflight / max(1, n * ml.capacity) if n else (1.0 if ml.inflight else 0.0)
            missing_slo = ml.slo_attainment is not None and ml.slo_attainment < self.s.slo_target
            hot = load > self.s.up_load or (missing_slo and ml.inflight > 0)
            # cold counts only the ticks at which the model has a registration to give back: a `replicas.min: 0`
            # model counted those on no engine, so the registration its first request made was given back at the
            # next tick that found no request on it (the first one done, its follow-ups not yet sent; or still waiting
            # for the model's load, which was then made again)
            cold = load < self.s.down_load and not missing_slo and n > max(ml.min_replicas, 0)
            self._hot[name] = self._hot.get(name, 0) + 1 if hot else 0
            self._cold[name] = self._cold.get(name, 0) + 1 if cold else 0
            if self._hot[name] >= self.s.up_ticks and 0 < n < ml.max_replicas:
                rt = self._place(ml.info, engines, models, exclude | struggling, pinned)
                if rt is not None:
                    actions.append(Action("load", name, rt.engine_id))
                    self._hot[name] = 0
            elif self._cold[name] >= self.s.down_ticks and n > max(ml.min_replicas, 0) and n > 0:
                if n == 1 and (ml.inflight > 0 or ml.kept_alive):
                    continue  # (still cold: it goes at the first tick past its keep_alive)
                idle = [e for e in hosts if e.replicas[name].inflight == 0]
                ready = [e for e in hosts if e.replicas[name].ready]
                if len(ready) == 1 < n:  # make before break: the one that serves stays while the others still load
                    idle = [e for e in idle if e is not ready[0]]
                if idle:  # the replica whose engine is busiest with other models goes first
                    victim = max(idle, key=lambda e: (e.inflight, e.engine_id))
                    actions.append(Action("unload", name, victim.engine_id))
                    self._cold[name] = 0
        actions += self.sheds(loads, engines, struggling, acted=frozenset(a.model for a in actions) | set(moving or ()))
        return actions + self.moves(loads, engines, moving, acted=frozenset(a.model for a in actions),
                                    struggling=struggling)

    def _place(self, info: ModelInfo, engines: list[EngineView], models: dict[str, ModelInfo],
               exclude: frozenset[str], pinned: frozenset[str]) -> Route | None:
        """`router.place`, noting the engines it passed over for pins (`pin_blocked`)."""
        blocked = pin_blocked(info, engines, models, pinned)
        for e in engines:
            if e.engine_id in blocked:
                self.pin_blocked[(info.name, e.engine_id)] = blocked[e.engine_id], tuple(pins_on(e, pinned, info.name))
        return place(info, engines, models, exclude=exclude, pinned=pinned, blocked=blocked)

    def sheds(self, loads: list[ModelLoad], engines: list[EngineView], struggling: frozenset[str],
              acted: frozenset[str] = frozenset()) -> list[Action]:
        """Registrations to drain off a `struggling` engine: a model registered there and also on an engine that is
        not struggling gives the first one back (its requests there finish, new ones go to the other), so its turns
        return to the models that engine fails -- the undoing of a second replica placed before its engine fell
        behind. After `up_ticks` ticks in a row; one per model and one per engine a tick; never below the model's
        minimum, never a pinned model."""
        out: list[Action] = []
        counts: dict[tuple[str, str], int] = {}
        emptied: set[str] = set()
        for ml in loads:
            name = ml.info.name
            if ml.pinned or name in acted:
                continue
            hosts = {e.engine_id: e.replicas[name] for e in _hosts(name, engines)}
            if len(hosts) <= max(1, ml.min_replicas) or not any(r.ready and h not in struggling
                                                                 for h, r in hosts.items()):
                continue  # (a registration elsewhere still loading does not serve yet)
            for h in sorted(h for h in hosts if h in struggling):
                k = (name, h)
                counts[k] = self._shed.get(k, 0) + 1
                if counts[k] >= self.s.up_ticks and h not in emptied and not any(a.model == name for a in out):
                    out.append(Action("shed", name, h))
                    emptied.add(h)
                    counts[k] = 0
        self._shed = counts  # a pair not seen this tick starts again
        return out

    def struggling(self, loads: list[ModelLoad], engines: list[EngineView]) -> frozenset[str]:
        """Engines that host a model missing its SLO: they get no extra registration (a second replica, a move).
        A pooled GPU steps its models in turn, so a registration added there takes turns from the models it
        already fails; more weights to rotate make it worse (2 x H200, 20 models at 0.7 req/s each: a 7B
        replica placed on a GPU whose 1.5B models were falling behind coincided with every late episode)."""
        missing = {ml.info.name for ml in loads
                   if ml.slo_attainment is not None and ml.slo_attainment < self.s.slo_target}
        return frozenset(e.engine_id for e in engines
                         if any(m in missing and not r.draining for m, r in e.replicas.items()))

    def moves(self, loads: list[ModelLoad], engines: list[EngineView], moving: dict[str, str] | None = None,
              acted: frozenset[str] = frozenset(), struggling: frozenset[str] | None = None) -> list[Action]:
        """Placement's evening out (`router.rebalance`): pinned models, models moving or `acted` on this tick stay;
        none goes where its registration just failed, nor where the pins leave it too little weight space, nor to a
        struggling engine (`struggling`, derived from the same inputs unless the caller has it)."""
        if struggling is None:
            struggling = self.struggling(loads, engines)
        models = {ml.info.name: ml.info for ml in loads}
        pinned = frozenset(ml.info.name for ml in loads if ml.pinned)
        fixed = acted | set(moving or ()) | pinned
        avoid = {ml.info.name: ml.avoid | struggling for ml in loads if ml.avoid or struggling}
        return [Action("move", name, dst, src)
                for name, src, dst in rebalance(engines, models, fixed, avoid, moving, pinned)]

    def forget(self, model: str) -> None:
        self._hot.pop(model, None)
        self._cold.pop(model, None)
        self._shed = {k: v for k, v in self._shed.items() if k[0] != model}
