"""Token-level multi-model policy: rounds of weighted round-robin turns, one model per step.

A round visits every model with work once, in slack order (the model whose weights are already active
first, then least banked slack first -- token deadlines, slo.py). Each turn gets a time quota from the round
arithmetic in quota.py; a turn's steps decode the model's running batch and prefill its next FCFS group in
chunks (batching.py). VRAM is managed explicitly (memory.py): before a step, KV of models used furthest in the
future is swapped out, then their weights dropped, until the step fits; KV is dropped (recomputed later) only
where the host pages are full, and victims are chosen counting them (batching.pick_victim).

Beyond Aegaeon (configurable, so the `aegaeon` preset in __init__.py turns them off for comparison):
- turns are ordered by banked slack (least first), the active model first -- Aegaeon keeps a fixed order;
  in simulation this matters most (4 req/s/model, 10 models: 99.6% vs 70% attainment with a fixed order);
- switch time is charged only for weights not already resident (resident: 0; loading: what is left; from
  host: the fitted load time), and the round is long enough that weights which cannot all stay resident
  rotate with PCIe at most `link_util` busy (the link is serial even when prefetch hides a load);
- prefetch targets the next *non-resident* model of the round, not just the next turn, so a load overlaps
  every turn before it;
- a turn whose quota ran out keeps stepping while the next model's weights are still in flight (free work
  instead of a stall);
- a non-resident model whose streams all have slack for two more rounds may sit one round out (one switch
  saved); when it runs next its quota covers the rounds it skipped;
- prefill time is part of the round, and the round is capped by the smallest banked slack of any stream;
- a fragmented arena (free bytes suffice, no contiguous range) evicts by this policy's victim order, the
  cheapest contiguous window (gpu_pool/placement.py), for a prefetch too -- instead of the pool's LRU loop
  for loads and a skipped prefetch, which left blocking loads behind (simulated at 0.4 req/s/model, the real
  engine's arena: 79 blocking loads and 23.7 s of stall with the LRU loop, 2 and 2.9 s with the window).

For many models per GPU (issue 14: dozens of models, every turn of most of them a weight load, the GPU the
bottleneck), also beyond Aegaeon:
- under pressure -- pace quotas do not fit under max_round_s -- the deadline rule (quota.need_round): a
  model's turn covers its tightest stream until its next turn plus a margin banked against bursts (as large
  as the round still fits), models whose streams have that slack sit the round out, and a turn runs until
  its streams are covered (`_Turn.target`), not just for its planned time. Pace quotas give every model with
  a stream 11 steps a second whatever it has banked, and the round R = C / (1 - S) grew past max_round_s
  (23 s seen) as S neared 1: new requests waited whole rounds for a first token;
- plans count an arena's free bytes only where one free range holds the slot (`PoolState.weight_free_run`),
  else they free a whole slot's worth, a victim of the incoming slot's size first: the arena stays in slot
  classes instead of fragmenting (36,530 skipped prefetches and 238 blocking loads at 30 models before);
- a resident model queued after one whose weights are still landing takes its turn first when that turn
  fits in the wait (`hop`) -- useful work instead of a stall or an overlong turn;
- optionally (`late_rule: "pace"`), a stream already late -- its request missed under the deadline rule -- is
  re-anchored due now and paced from there instead of caught up to its lost deadlines. Simulated on the served
  H200's costs: 40 models over 300 s 58.8 -> 70.6% (seed 0) and 65.4 -> 76.4% (seed 1), 10 models at 1.8 req/s/model
  83.4 -> 88.4%, the mean rule no worse, no change where nothing runs late (sim_late_rule_served_profile.json).
  Off until measured served.
Simulated (load_tests/models_per_gpu.py, the measured H200 costs, 120 GB, pooled arena, 0.1 req/s/model, 300 s):
the most models at >= 95% went from 26 to 33 (seeds 7 and 0); the lazy bound -- every model stepping only
when a deadline forces it, everything arrived riding along -- needs the whole GPU at about 35.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from itertools import islice

from token_scheduler.policies.batching import BatchLimits, build_batch, kv_demand, prefill_budget
from token_scheduler.policies.demand import covered, decode_step_s, exposed_switch_s, need_step_s, prefill_s
from token_scheduler.policies.memory import Room, fit_step, make_room
from token_scheduler.policies.quota import RoundPlan, TurnDemand, aegaeon_round, need_round, token_round
from token_scheduler.policies.slo import next_token_slack
from token_scheduler.policies.state import ModelState, PoolState, Residency, StepPlan
from tokenpool import env

# TokenPolicy.round_terms, summed over the rounds formed: models in the round, the PCIe seconds of their weight loads,
# the round's cap (max_round_s, lowered to the least banked run slack: token rule), then one count per round of what
# set its length: `token_round`'s (C + P) / (1 - S), the loads' PCIe time, the PCIe rotation floor, overloaded
# (S >= 1: max_round_s), or the deadline rule (quota.need_round)
ROUND_TERMS = ("models", "link_s", "cap_s", "formula", "link", "floor", "overloaded", "need")
# Why turns ended (TokenPolicy.turn_ends): the model ran out of work; its time quota was spent with its streams'
# need met; or it was cut at twice its quota (+ 0.1 s) with a stream still short of its target or its pace steps
TURN_ENDS = ("drained", "quota", "limit")


# The values each string option of TokenConfig takes (a server's gpus.policy_options are checked against them)
TOKEN_CHOICES = {"quota_rule": ("token", "aegaeon"), "order": ("slack", "fixed"),
                 "prefetch": ("next_host", "next", "off"), "switch_charge": ("exposed", "host", "all"),
                 "placement": ("window", "lru"), "need_rule": ("pressure", "always", "off"),
                 "sized_victims": ("tiers", "all", "off"),
                 "late_rule": ("catch_up", "pace")}


@dataclass(frozen=True)
class TokenConfig:
    limits: BatchLimits = field(default_factory=BatchLimits)
    quota_rule: str = "token"  # "token" | "aegaeon"
    headroom: float = 1.1
    min_round_s: float = 0.0
    max_round_s: float = 4.0  # also Aegaeon's max quota
    order: str = "slack"  # "slack" | "fixed" (by name, Aegaeon's stable order)
    prefetch: str = "next_host"  # "next_host" | "next" | "off"
    switch_charge: str = "host"  # what a round pays per switch: "exposed" | "host" | "all" (Aegaeon)
    extend_on_load: bool = True
    skip_on_slack: bool = True
    max_skip: int = 1
    link_util: float = 0.5  # rounds long enough that rotating weights keep PCIe at most this busy
    # Fragmented arena (free bytes suffice, no contiguous range): "window" hands the mechanism this policy's
    # victim order (StepPlan.load_order / prefetch_order) so it evicts the cheapest contiguous window, for a
    # prefetch too; "lru": no order, the mechanism's fallback (LRU until it fits; prefetch skipped).
    placement: str = "lru"  # window measured worse under load (H200, token 0.35: 65.5% vs 100% for lru)
    # The deadline rule (quota.need_round) instead of pace quotas: "pressure" where pace quotas do not fit
    # under max_round_s (S >= 1, or the switches alone would stretch the round past it), "always", or "off".
    need_rule: str = "pressure"
    need_margin_s: float = 4.0  # a stream leaves its turn covered until its next turn plus up to this (need_round)
    sized_victims: str = "tiers"  # "tiers" | "all" | "off": victims of the incoming model's slot size first
    # An arena's free bytes count toward a load or a prefetch only where one free range holds the slot
    # (PoolState.weight_free_run); else a whole slot's worth is evicted (a victim of its size first). Blind to
    # ranges, a plan counted scattered bytes as room: simulated at 30 models on 120 GB, 36,530 prefetches
    # skipped and 238 blocking loads (60 s of stall, 73% attainment) vs 29 and 49 (13.6 s, 94%).
    see_ranges: bool = True
    # A queued model whose weights are still on the way lets a resident model queued after it take its turn
    # first, when that turn fits before the weights can land (instead of a stall, or its predecessor's turn
    # running on while it loads).
    hop: bool = True
    # Under pressure, a deadline-rule round whose margin shrank until no model needs a turn keeps the last margin
    # that had turns (quota.need_round's keep_turns) instead of falling back to pace quotas, whose round
    # (C + P) / (1 - S) is uncapped once prefill is shrunk to none: 31 s rounds were seen against 2 s of slack.
    # Default from TOKENPOOL_NEED_KEEP_TURNS (off: the plans as before).
    need_keep_turns: bool = field(default_factory=env.NEED_KEEP_TURNS.on)
    # A pace turn runs at least the decode steps its time quota was planned to buy (quota / predicted step), up to
    # twice its quota + 0.1 s: a model whose steps the cost model underprices keeps its pace instead of losing
    # tokens turn after turn (the round stretches a little for everyone instead).
    pace_steps: bool = True
    # A running stream already late (a token past its deadline: under the deadline rule its request has missed):
    # "catch_up" plans its turns to bring it back to its original deadlines, however far behind; "pace" re-anchors it
    # where it is -- due now, then a token every TPOT -- so an overloaded GPU stops spending turns on a request that
    # cannot attain its SLO any more, at the expense of the requests that still can. (The late request's tokens still
    # come at its TPOT; only the catching up is not planned.)
    late_rule: str = "catch_up"
    # Paired turns: while a turn runs, the next model in the round whose weights are resident and whose requests all
    # decode (nothing waiting, nothing to prefill) starts its turn beside it, and the two step in alternation, each on
    # its own quota and clock -- so a mechanism that runs two models' steps at once (MultiModelEngine's co-stepping,
    # TOKENPOOL_CO_STEP) has another model's step to launch beside every step in flight, not only at a switch (turns
    # of ~10 steps at 40 models on the H200: co-stepping alone changed nothing served). When the turn ends its mate
    # carries on as the turn. Default from TOKENPOOL_CO_STEP.
    pair_turns: bool = field(default_factory=env.CO_STEP.on)


@dataclass(slots=True)
class _Turn:
    model: str
    quota_s: float
    start: float | None = None  # quota clock starts after the first step (its switch stall is charged in C)
    first_s: float = 0.0
    steps: int = 0
    target: float | None = None  # deadline rule: run until every stream's next deadline is past this (state clock)
    steps_min: float = 0.0  # pace rule: the decode steps its quota was planned to buy (quota / predicted step)


class TokenPolicy:
    name = "token"

    def __init__(self, cfg: TokenConfig | None = None, name: str | None = None):
        self.cfg = cfg or TokenConfig()
        if name:
            self.name = name
        self._queue: deque[str] = deque()
        self._plan: RoundPlan | None = None
        self._turn: _Turn | None = None
        self._mate: _Turn | None = None  # (pair_turns) the turn stepping in alternation with `_turn`
        self._flip = False  # (pair_turns) the mate's step next
        self._skipped: dict[str, int] = {}
        self._bonus: dict[str, int] = {}
        self._steps: dict[str, float] = {}  # pace rounds: model -> decode steps its quota buys (`_Turn.steps_min`)
        # late_rule "pace": request id -> seconds its deadlines were moved on when it was found late (replaced, never
        # changed in place: a checkpoint keeps it by reference)
        self._shift: dict[str, float] = {}
        self.rounds = 0
        self.last_round_s = 0.0  # the last round's planned length
        self.last_round_wall_s = 0.0  # how long the round before it actually took (state clock)
        self._round_started: float | None = None
        # Rounds that ran a step, their planned and wall seconds summed, and those that took over 1.5x their plan:
        # whether rounds take what they were planned to (steps slower than priced, load stalls, the host's time
        # between steps). A tuple, replaced: a checkpoint keeps it as it is.
        self.round_books: tuple[int, float, float, int] = (0, 0.0, 0.0, 0)
        self._round_ran = False  # the round in progress planned a step
        # Rounds formed, summed (ROUND_TERMS): their models, the PCIe time of their loads, the cap the least banked
        # slack put on them, and what set each one's length -- whether rounds come out short because few models
        # join, few of them load, a stream's slack caps them, or the deadline rule planned them. A tuple, as
        # round_books.
        self.round_terms: tuple = (0,) * len(ROUND_TERMS)
        self.turn_ends: tuple = (0,) * len(TURN_ENDS)  # turns that ended, by why (TURN_ENDS); a tuple, as above
        self.skips = 0
        self.need_rounds = 0  # rounds planned by the deadline rule
        self.hops = 0  # turns taken ahead of a queued model whose weights were still landing
        self.mates = 0  # (pair_turns) turns started beside another
        # per model: turns started, and turns that planned nothing (no room for the weights, or no request fit)
        self.turns: dict[str, int] = {}
        self.empty_turns: dict[str, int] = {}

    # -- the one entry point --
    def schedule(self, st: PoolState) -> StepPlan:
        if self.cfg.pair_turns:
            plan = self._mate_step(st)
            if plan is not None:
                self._round_ran = True
                return plan
        for _ in range(2):  # the turn in progress, then (pair_turns) its mate carrying on as the turn
            t = self._turn
            if t is not None and self._continue(st, t):
                plan = self._step(st, t)
                if not plan.idle:
                    self._round_ran = True
                    return plan
            if self._mate is None:
                break
            self._turn, self._mate = self._mate, None
        for _ in range(2):  # the rest of this round, then a fresh one
            while self._queue:
                name = self._pop_next(st)
                m = st.models.get(name)
                if m is None or not m.has_work:
                    continue
                self._turn = self._new_turn(name)
                plan = self._step(st, self._turn)
                if not plan.idle:
                    self._round_ran = True
                    return plan
                self.empty_turns[name] = self.empty_turns.get(name, 0) + 1
            self._form_round(st)
            if not self._queue:
                break
        self._turn = self._mate = None
        return StepPlan(why="idle")

    def _mate_step(self, st: PoolState) -> StepPlan | None:
        """(pair_turns) Every other call while a turn runs: its mate's step -- the mate found first when there is
        none (`_find_mate`) -- or None (the turn's step, as without pairing). A mate whose step would move memory
        (evict, swap KV) or whose turn ended is dropped: its model waits for its turn in the round as usual (an ended
        mate's model has had its turn)."""
        self._flip = not self._flip
        t = self._turn
        if not self._flip or t is None:
            return None
        mate = self._mate
        if mate is not None and (st.models.get(mate.model) is None or not self._continue(st, mate)):
            mate = self._mate = None
        if mate is None:
            mate = self._mate = self._find_mate(st)
            if mate is None:
                return None
        plan = self._step(st, mate)
        if plan.idle or plan.evict or plan.swap_out or plan.swap_in:
            self._mate = None
            if not plan.idle and mate.steps == 1:  # (its first step: back to the head of the round, unstarted)
                self._queue.appendleft(mate.model)
            return None
        return plan

    def _find_mate(self, st: PoolState) -> _Turn | None:
        """(pair_turns) A turn to run beside the turn in progress: the first model queued in this round whose weights
        are resident and whose requests all decode (nothing waiting, no prompt left to prefill), taken out of the
        queue with the quota and target its own turn would have had."""
        for i, name in enumerate(self._queue):
            m = st.models.get(name)
            if (m is None or m.waiting or not m.running or m.residency != Residency.RESIDENT
                    or any(r.num_tokens - r.num_computed_tokens > 1 for r in m.running)):
                continue
            del self._queue[i]
            self.mates += 1
            return self._new_turn(name)
        return None

    def _new_turn(self, name: str) -> _Turn:
        """`name`'s turn of this round, counted: its quota (with the rounds it sat out), its deadline-rule target and
        its pace steps."""
        more = 1 + self._bonus.pop(name, 0)
        quota = self._plan.turn_s(name) * more if self._plan else 0.0
        tgt = self._plan.target_s.get(name) if self._plan and self._plan.target_s else None
        self.turns[name] = self.turns.get(name, 0) + 1
        return _Turn(name, quota, target=None if tgt is None else self._round_started + tgt,
                     steps_min=self._steps.get(name, 0.0) * more)

    def set_limits(self, max_seqs: int, max_tokens: int) -> None:
        """The engines' own batch limits (EngineConfig), so a planned batch is one the engine runs."""
        self.cfg = replace(self.cfg, limits=replace(self.cfg.limits, max_seqs=max_seqs, max_tokens=max_tokens))

    def forget(self, name: str) -> None:
        """`name` is no longer hosted: drop it from the round, the turn in progress and every counter."""
        if name in self._queue:
            self._queue = deque(n for n in self._queue if n != name)
        if self._turn is not None and self._turn.model == name:
            self._turn = None
        if self._mate is not None and self._mate.model == name:
            self._mate = None
        for d in (self._skipped, self._bonus, self.turns, self.empty_turns):
            d.pop(name, None)
        self._steps = {k: v for k, v in self._steps.items() if k != name}  # (replaced: a checkpoint may hold it)

    def checkpoint(self) -> tuple:
        """Everything `schedule` changes (the round, its queue, the turn in progress, the skip/bonus books and the
        counters), copied: `restore` puts it back. `schedule` advances this state on every call (a turn's steps,
        the queue's pops, a new round), so a plan made ahead of its step (MultiModelEngine, plan-ahead) and then
        not used is undone with these before the step plans again -- one schedule call's effects per step."""
        t, mate = self._turn, self._mate
        return (deque(self._queue), self._plan, self._steps, None if t is None else replace(t), dict(self._skipped),
                dict(self._bonus), self.rounds, self.last_round_s, self.last_round_wall_s, self._round_started,
                self.skips, self.need_rounds, self.hops, dict(self.turns), dict(self.empty_turns), self.round_books,
                self._round_ran, self.round_terms, self.turn_ends, self._shift,
                None if mate is None else replace(mate), self._flip, self.mates)

    def restore(self, cp: tuple) -> None:
        """Back to a `checkpoint` (the round plan is never changed in place: it is kept by reference)."""
        (self._queue, self._plan, self._steps, self._turn, self._skipped, self._bonus, self.rounds, self.last_round_s,
         self.last_round_wall_s, self._round_started, self.skips, self.need_rounds, self.hops, self.turns,
         self.empty_turns, self.round_books, self._round_ran, self.round_terms, self.turn_ends, self._shift,
         self._mate, self._flip, self.mates) = cp

    def reset_counters(self) -> None:
        """Zero what round_info counts (rounds, skips, turns); the schedule state is kept."""
        self.rounds = self.skips = self.need_rounds = self.hops = self.mates = 0
        self.turns, self.empty_turns = {}, {}
        self.round_books = (0, 0.0, 0.0, 0)
        self.round_terms = (0,) * len(ROUND_TERMS)
        self.turn_ends = (0,) * len(TURN_ENDS)

    def round_info(self) -> dict:
        p = self._plan
        return {"rounds": self.rounds, "last_round_s": self.last_round_s, "last_round_wall_s": self.last_round_wall_s,
                "skips": self.skips, "need_rounds": self.need_rounds, "hops": self.hops, "mates": self.mates,
                "round_books": dict(zip(("rounds", "planned_s", "wall_s", "over_1_5x"), self.round_books)),
                "turns": dict(sorted(self.turns.items())),
                "empty_turns": dict(sorted(self.empty_turns.items())),
                "share": p.share if p else 0.0, "overloaded": p.overloaded if p else False}

    # -- turns --
    def _continue(self, st: PoolState, t: _Turn) -> bool:
        m = st.models[t.model]
        if not m.has_work:
            return self._ended(0)
        if t.steps == 0:
            return True
        if t.start is None:
            t.start = st.now - t.first_s
        if st.now - t.start < t.quota_s:
            return True
        if t.target is not None and st.now - t.start < 2.0 * t.quota_s + 0.1 and not covered(m, t.target, self._shift):
            return True  # steps ran slower than planned: the need, not the time, ends a deadline-rule turn
        if t.steps < t.steps_min and st.now - t.start < 2.0 * t.quota_s + 0.1:
            # the same for a pace turn: its streams need the tokens, not the seconds. A time quota alone hands a
            # model whose steps the cost model underprices fewer tokens than its pace, turn after turn (served:
            # a 1.5B priced at ~0 ms got one step a turn, its lateness growing ~1 s a second)
            return True
        if self.cfg.extend_on_load and m.running and self._queue:
            nxt = st.models[self._queue[0]]
            if nxt.residency == Residency.LOADING and nxt.ready_at > st.now + t.first_s and self._hop(st) is None:
                return True
        # its time spent: with its need met (quota), or cut at twice its quota with streams still short (limit)
        short = (t.target is not None and not covered(m, t.target, self._shift)) or t.steps < t.steps_min
        return self._ended(2 if short else 1)

    def _ended(self, why: int) -> bool:
        """Book why a turn ended (TURN_ENDS' index) and say so (False: it does not continue)."""
        e = list(self.turn_ends)
        e[why] += 1
        self.turn_ends = tuple(e)
        return False

    def _pop_next(self, st: PoolState) -> str:
        """The next turn's model: the queue's head, or (`hop`) a resident model queued after it whose turn fits
        in the time the head's weights still need to land -- useful work instead of a stall."""
        i = self._hop(st) if self.cfg.hop else None
        if i is None:
            return self._queue.popleft()
        name = self._queue[i]
        del self._queue[i]
        self.hops += 1
        return name

    def _hop(self, st: PoolState) -> int | None:
        """Index in the queue of the first resident model with work whose planned turn fits before the head's
        weights can land (the head cannot start before then anyway); None: no such model, or no wait."""
        q, plan = self._queue, self._plan
        head = st.models.get(q[0]) if q else None
        if plan is None or head is None or not head.has_work or head.residency == Residency.RESIDENT:
            return None
        if head.residency == Residency.LOADING:
            gap = head.ready_at - st.now
        else:
            gap = st.cost.load_time(head.spec.weight_bytes)
        for i in range(1, len(q)):
            m = st.models.get(q[i])
            if (m is not None and m.has_work and m.residency == Residency.RESIDENT
                    and plan.turn_s(q[i]) <= gap):
                return i
        return None

    def _step(self, st: PoolState, t: _Turn) -> StepPlan:
        cfg, m = self.cfg, st.models[t.model]
        first_group = sum(r.num_prompt_tokens for r in islice(m.waiting, cfg.limits.group_size)) if m.waiting else 0
        # The prefill budget bounds only prompt tokens: a step with nothing to prefill (most steps: decodes only)
        # builds the same batch without it and skips its two cost-model calls.
        if m.waiting or any(r.num_tokens - r.num_computed_tokens > 1 for r in m.running):
            chunk = prefill_budget(st.cost, m, cfg.limits, len(m.running), m.kv_gpu_tokens)
        else:
            chunk = 0
        order = _once(lambda: self._victims(st, m.name))  # only when room is short or an order is handed on
        fit = fit_step(st, m, kv_demand(m, min(first_group, chunk)), order, ranges=cfg.see_ranges)
        if fit is None:
            return StepPlan(why=f"no room for {m.name}")
        room = fit.room
        batch = build_batch(st.cost, m, cfg.limits, fit.kv_free, max_prefill_tokens=chunk, host_used=room.host_used)
        if not batch.entries:
            return StepPlan(why=f"{m.name}: nothing fits")
        plan = StepPlan(
            model=m.name, batch=batch.entries, evict=list(room.evict), swap_out=room.swap_out + batch.swap_out,
            swap_in=batch.swap_in, wait_swap_out=bool(room.swap_out or batch.swap_out),
            expected_s=st.cost.step_time(m.name, batch.shape), why=f"turn {t.model} q={t.quota_s:.3f}",
        )
        if m.residency == Residency.HOST and cfg.placement == "window":
            plan.load_order = _resident(st, order())
        free_after = fit.weight_free - (batch.kv_growth_bytes if st.kv_with_weights(m) else 0)
        self._plan_prefetch(st, plan, room, free_after)
        if t.steps == 0:
            t.first_s = plan.expected_s
        t.steps += 1
        return plan

    def _victims(self, st: PoolState, keep: str) -> list[str]:
        """Eviction order to make room for `keep`: idle models, then models already served this round, then the
        queue back to front. With `sized_victims`, models of `keep`'s slot size go first among the idle and
        served ones (and among the queued): their slot is exactly the range `keep` needs, so rotating models
        through slots of their own size keeps the arena from fragmenting -- room freed as several smaller
        slots is rarely contiguous, and then a prefetch is skipped or a load evicts beyond the plan."""
        # Asked by any step or prefetch short of room (on every step where loads are quick and the next prefetch
        # always finds the arena full): one pass each over the models and the queue, sizes read once (35 models,
        # a queue of 13: 8.1 -> 3.3 us), the order exactly the rule's above.
        mode, models = self.cfg.sized_victims, st.models
        queued = set(self._queue)
        idle, done = [], []
        for n, m in models.items():
            if n == keep:
                continue
            if not (m.waiting or m.running):  # m.has_work, inlined
                idle.append(n)
            elif n not in queued:
                done.append(n)
        back = [n for n in reversed(self._queue) if n != keep]
        if mode == "off":
            return idle + done + back
        size = models[keep].spec.weight_bytes
        if mode == "all":
            return _by_size(idle + done + back, models, size)
        return _by_size(idle + done, models, size) + _by_size(back, models, size)

    def _plan_prefetch(self, st: PoolState, plan: StepPlan, room: Room, free_after: int) -> None:
        mode = self.cfg.prefetch
        if mode == "off" or not self._queue:
            return
        target, upto = None, 0
        for i, n in enumerate(self._queue):
            m = st.models[n]
            if m.residency == Residency.LOADING:
                return  # one load at a time on the link; the next one is already coming
            if m.residency == Residency.HOST and m.has_work:
                target, upto = m, i
                break
            if mode == "next":
                return
        if target is None:
            return
        need = target.spec.weight_bytes - free_after
        run = st.weight_free_run if self.cfg.see_ranges else None
        if run is not None:
            w = st.models[plan.model].spec.weight_bytes
            if st.models[plan.model].residency == Residency.HOST and run >= w:
                run -= w  # this step's own load may take the largest range
            if run < target.spec.weight_bytes:  # no range holds it: a whole slot's worth must go
                need = max(need, target.spec.weight_bytes - max(0, free_after - st.free_bytes()))
        if need > 0 or self.cfg.placement == "window":
            protect = set(list(self._queue)[: upto + 1]) | {plan.model}
            victims = [v for v in self._victims(st, target.name) if v not in protect and v != plan.model]
        if need > 0:
            seeded = Room(list(room.evict), list(room.swap_out), 0, room.host_used)
            # KV swap-outs make weight room only where KV and weights share the bytes
            r2 = make_room(st, need, victims, room=seeded, kv=st.kv_with_weights(target))
            if r2.freed < need:
                return
            plan.evict += r2.evict[len(room.evict):]
            plan.swap_out += r2.swap_out[len(room.swap_out):]
        if self.cfg.placement == "window":
            plan.prefetch_order = _resident(st, victims)
        plan.prefetch = target.name

    # -- rounds --
    def _form_round(self, st: PoolState) -> None:
        cfg, cost, now = self.cfg, st.cost, st.now
        if self._round_started is not None:
            self.last_round_wall_s = wall = now - self._round_started
            planned = self._plan.length_s if self._plan is not None else 0.0
            if self._round_ran and planned > 0.0:
                n, p, w, over = self.round_books
                self.round_books = (n + 1, p + planned, w + wall, over + (wall > 1.5 * planned))
        self._round_started = now
        self._round_ran = False
        self._steps = {}  # (replaced, never changed in place: a checkpoint keeps it by reference)
        cands = [m for m in st.models.values() if m.has_work]
        self._queue.clear()
        if not cands:
            self._plan = None
            return
        demands, slack, run_slack, wait_slack = [], {}, {}, {}
        due = {r.request_id: next_token_slack(r, m.slo, now) for m in cands for r in m.running}
        if cfg.late_rule == "pace":
            self._reanchor(cands, due)
        footprint = 0  # weights + all KV of every model with work: what exceeds VRAM rotates every round
        for m in cands:
            footprint += m.spec.weight_bytes
            if st.kv_with_weights(m):
                footprint += sum(m.kv_bytes(r.num_computed_tokens) for r in m.running)
            d = decode_step_s(st, m, cfg.limits)
            pf = prefill_s(st, m, cfg.limits)
            load = cost.load_time(m.spec.weight_bytes) if m.residency == Residency.HOST else 0.0
            sw = self._switch_charge(st, m, load)
            demands.append(TurnDemand(m.name, d, m.slo.tpot_s, sw, load, pf, m.slo.priority))
            sh = self._shift
            rs = min((due[r.request_id] + sh.get(r.request_id, 0.0) for r in m.running), default=float("inf"))
            ws = m.slo.deadline(m.waiting[0].arrival_time, 0) - now if m.waiting else float("inf")
            run_slack[m.name], slack[m.name] = rs, min(rs, ws)
            wait_slack[m.name] = ws - pf
        if cfg.quota_rule == "token" and self._need_rule(demands):
            order = sorted(demands, key=lambda d: (d.model != st.active, slack[d.model]))
            plan = self._need_plan(st, order, run_slack, wait_slack, footprint)
            if plan is not None:
                self._plan = plan
                self._queue.extend(d.model for d in order if d.model in plan.quota_s)
                self._book_terms(len(self._queue), sum(d.load_s for d in order if d.model in plan.quota_s),
                                 cfg.max_round_s, "need")
                self.rounds += 1
                self.need_rounds += 1
                self.last_round_s = plan.length_s
                return
        if cfg.skip_on_slack and cfg.quota_rule == "token" and len(cands) > 1:
            demands = self._apply_skips(st, demands, run_slack)
        names = [d.model for d in demands]
        if cfg.order == "fixed":
            names.sort()
        else:
            names.sort(key=lambda n: (n != st.active, slack[n]))
        link = sum(d.load_s for d in demands)
        if cfg.quota_rule == "aegaeon":
            plan = aegaeon_round(demands, max_quota_s=cfg.max_round_s)
            self._book_terms(len(names), link, cfg.max_round_s, "formula")
        else:
            floor = sum(d.decode_step_s + d.switch_s for d in demands)
            cap = min(cfg.max_round_s, max(min(run_slack[n] for n in names), floor))
            rotate = max(0, footprint - st.capacity_bytes)
            r_min = min(cap, max(cfg.min_round_s, cost.load_time(rotate) / cfg.link_util if rotate else 0.0))
            plan = token_round(demands, cfg.headroom, r_min, cap)
            R = plan.length_s
            self._book_terms(len(names), link, cap, "overloaded" if plan.overloaded else
                             "link" if link > 0.0 and R <= link + 1e-9 else
                             "floor" if r_min > 0.0 and R <= r_min + 1e-9 else "formula")
            if cfg.pace_steps:
                self._steps = {d.model: plan.quota_s[d.model] / d.decode_step_s for d in demands
                               if d.decode_step_s > 0.0}
        self._plan = plan
        self._queue.extend(names)
        self.rounds += 1
        self.last_round_s = plan.length_s

    def _reanchor(self, cands: list[ModelState], due: dict[str, float]) -> None:
        """late_rule "pace": a running stream found late (`due`: each stream's next-token slack, unshifted) has its
        deadlines moved on so its next token is due now (`_shift`, a new dict: the old one may be a checkpoint's);
        streams no longer running are dropped from it."""
        old, new = self._shift, {}
        for m in cands:
            for r in m.running:
                sh = old.get(r.request_id, 0.0)
                late = -(due[r.request_id] + sh)
                if late > 0.0 or sh:
                    new[r.request_id] = sh + max(0.0, late)
        self._shift = new

    def _book_terms(self, models: int, link_s: float, cap_s: float, bound: str) -> None:
        """Add a round formed to `round_terms` (ROUND_TERMS' order; a new tuple, as a checkpoint keeps the old)."""
        t = list(self.round_terms)
        t[0] += models
        t[1] += link_s
        t[2] += cap_s
        t[ROUND_TERMS.index(bound)] += 1
        self.round_terms = tuple(t)

    def _need_rule(self, demands: list[TurnDemand]) -> bool:
        """Whether this round takes the deadline rule: always, or where pace quotas cannot fit under
        max_round_s (the decode shares alone reach 1, or the switches they must pay for stretch it past)."""
        mode = self.cfg.need_rule
        if mode != "pressure":
            return mode == "always"
        S = sum(self.cfg.headroom * d.decode_step_s / d.tpot_s for d in demands)
        C = sum(d.switch_s for d in demands)
        return S >= 1.0 or C > self.cfg.max_round_s * (1.0 - S)

    def _need_plan(self, st: PoolState, order: list[TurnDemand], run_slack: dict, wait_slack: dict,
                   footprint: int) -> RoundPlan | None:
        """quota.need_round over `order`: per model the step time of its batch once its waiting group joins,
        the switch stall prefetch does not hide, its slacks. None: no model needs a turn (the caller plans
        pace quotas instead, so that spare time still banks slack)."""
        cfg, cost = self.cfg, st.cost
        needs = []
        for d in order:
            m = st.models[d.model]
            needs.append(replace(d, decode_step_s=need_step_s(st, m, cfg.limits), switch_s=exposed_switch_s(st, m),
                                 run_slack_s=run_slack[d.model], wait_slack_s=wait_slack[d.model]))
        rotate = max(0, footprint - st.capacity_bytes)
        floor = min(cfg.max_round_s, cost.load_time(rotate) / cfg.link_util if rotate else 0.0)
        plan = need_round(needs, max(cfg.min_round_s, floor), cfg.max_round_s, cfg.need_margin_s,
                          keep_turns=cfg.need_keep_turns)
        return plan if plan.quota_s else None

    def _switch_charge(self, st: PoolState, m: ModelState, load_s: float) -> float:
        """Seconds of a round charged to bringing `m`'s weights in.

        "all": every model's full load time, resident or not (Aegaeon). "host": the full load time only for
        weights in host memory, what is left of a load in flight, nothing for resident weights. "exposed":
        like "host" but only the part the measured prefetch overlap does not hide -- the shortest rounds;
        it loses at high load, where short rounds mean more loads competing with KV swaps on the link.
        """
        mode = self.cfg.switch_charge
        if mode == "all":
            return st.cost.load_time(m.spec.weight_bytes)
        if mode == "exposed" or m.residency != Residency.HOST:
            return exposed_switch_s(st, m)
        return load_s

    def _apply_skips(self, st: PoolState, demands: list[TurnDemand], run_slack: dict) -> list[TurnDemand]:
        # A skipped model waits about two rounds: judge that by the longer of what rounds are planned to take
        # and what the last one took (steps slower than predicted, load stalls stretch real rounds)
        r_est = max(self.last_round_s, self.last_round_wall_s)
        keep = []
        for d in demands:
            m = st.models[d.model]
            n = self._skipped.get(d.model, 0)
            can = (m.residency == Residency.HOST and not m.waiting and n < self.cfg.max_skip
                   and run_slack[d.model] > 2.0 * r_est + d.load_s + d.decode_step_s)
            if can:
                self._skipped[d.model] = n + 1
                self.skips += 1
            else:
                if n:
                    self._bonus[d.model] = n
                self._skipped[d.model] = 0
                keep.append(d)
        return keep or demands


def _once(f):
    """`f`, called at most once, when first asked (built every step: 0.15 us, functools.cache 1 us)."""
    box = []

    def get():
        if not box:
            box.append(f())
        return box[0]
    return get


def _by_size(names: list[str], models: dict[str, ModelState], size: int) -> list[str]:
    """`names` with the models of weight size `size` first, each part in its order."""
    same, other = [], []
    for n in names:
        (same if models[n].spec.weight_bytes == size else other).append(n)
    return same + other


def _resident(st: PoolState, names: list[str]) -> list[str]:
    """The models of `names` whose weights have landed (a load in flight is not touched: already paid for)."""
    return [n for n in names if st.models[n].residency == Residency.RESIDENT]

