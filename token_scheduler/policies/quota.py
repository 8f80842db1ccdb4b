"""Decode-round arithmetic: how long a round is and how much of it each model's turn gets.

A round visits every model with work once. Model i decodes its batch at d_i seconds per step and must emit a
token every T_i on average (its TPOT SLO), so over a round of length R it needs q_i >= R * d_i / T_i seconds
of turn. The round also pays C (exposed switch time: weight loads not hidden by prefetch) and P (prefill
time granted this round). With headroom h >= 1 (aim at T_i / h) and S = sum_i h d_i / T_i:

    R = C + P + sum_i q_i,  q_i = R h d_i / T_i   =>   R = (C + P) / (1 - S)              (token rule)

R is the *shortest* round that keeps every mean TPOT; shorter rounds mean shorter gaps between a stream's
bursts and earlier prefill slots for new requests. It is then bounded: R >= the PCIe time of the round's
weight loads (the link is serial even when prefetch hides it from compute) and R >= min_round_s; R <= the
smallest banked slack of any running stream (token deadlines, slo.py) and <= max_round_s -- prefill is
shrunk first (it spreads over rounds within TTFT slack). If S >= 1 the GPU cannot keep every TPOT: the
round is max_round_s and quotas are split in proportion to priority x share, so all fall behind alike.

Where these quotas do not fit (S >= 1, or C / (1 - S) over max_round_s: dozens of models, most of them
loading each round), `need_round` gives each model only what its tightest stream needs until its next turn
(the deadline rule, below): streams with banked slack then cost nothing that round.

Aegaeon's rule (decode_scheduler.py, paraphrased): n_i = T / d_i, c0 = the sum of the full switch times of
every model in the round, resident or not; alpha = max(c0 / (min_i n_i * Qmax) + sum_i 1/n_i, 0.5);
q_i = c0 / (n_i (alpha - sum_j 1/n_j)). The round then has mean TPOT_i = alpha * T: alpha is the tightest
target whose largest quota stays <= Qmax (4 s), floored at T/2. It charges switches that prefetch or
residency hide, has no prefill term (its prefill runs on other GPUs) and one TPOT for all models.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TurnDemand:
    model: str
    decode_step_s: float  # d_i: predicted time of one decode step of the model's batch (0: no decodes)
    tpot_s: float  # T_i
    switch_s: float = 0.0  # exposed (compute-blocking) switch time if the model runs this round
    load_s: float = 0.0  # PCIe time of its weight load this round (0 if resident)
    prefill_s: float = 0.0  # prefill time wanted this round
    weight: float = 1.0  # priority
    # what the deadline rule (need_round) reads: seconds until the next token of the model's tightest running
    # stream is due, and until the first token of its oldest waiting request is due, less its prefill (inf: none)
    run_slack_s: float = float("inf")
    wait_slack_s: float = float("inf")


@dataclass(frozen=True, slots=True)
class RoundPlan:
    length_s: float
    quota_s: dict  # model -> decode time of its turn
    prefill_s: dict  # model -> prefill time of its turn
    share: float  # S
    overloaded: bool
    # need_round only: model -> seconds after the round's start that its streams' next deadlines must reach by
    # the end of its turn (its next turn's expected start, plus a margin); the turn runs until they do
    target_s: dict | None = None

    def turn_s(self, model: str) -> float:
        return self.quota_s.get(model, 0.0) + self.prefill_s.get(model, 0.0)


def token_round(demands: list[TurnDemand], headroom: float = 1.1, min_round_s: float = 0.0,
                max_round_s: float = 4.0) -> RoundPlan:
    shares = {d.model: headroom * d.decode_step_s / d.tpot_s for d in demands}
    S = sum(shares.values())
    C = sum(d.switch_s for d in demands)
    link = sum(d.load_s for d in demands)
    P = sum(d.prefill_s for d in demands)
    if S < 1.0:
        # Where the switches alone pass the cap (C > max_round_s (1 - S)) nothing bounds R = C / (1 - S): served on the
        # H200 a 36-model run's first 15 s planned rounds of 2,496 s on average (513cb95,
        # serve_h200_models36_seed1_513cb95_timed.json), each turn then running until its model drained. Treating
        # such a round as overloaded (max_round_s split by share) lost in the simulator past capacity (10 models at
        # 1.6 req/s/model: up to -6 points; at 1.44 with copies 20% slower, 91.8 -> 82.5% on seed 0): turns that
        # run until their model drains batch better than capped ones. Kept uncapped (session 28 notes).
        R = (C + P) / (1.0 - S)
        scale = 1.0
        if R > max_round_s and P > 0:
            P2 = max(0.0, max_round_s * (1.0 - S) - C)
            scale = P2 / P
            R = (C + P2) / (1.0 - S)
        R = max(R, min_round_s, link)
        quota = {m: R * s for m, s in shares.items()}
        prefill = {d.model: d.prefill_s * scale for d in demands}
        # Time R leaves over (R was raised to a floor) goes to prefill, which can use it, else to decode.
        spare = R - C - sum(quota.values()) - sum(prefill.values())
        if spare > 1e-12 and P > 0:
            prefill = {m: p + spare * (d.prefill_s / P) for (m, p), d in zip(prefill.items(), demands, strict=True)}
        return RoundPlan(R, quota, prefill, S, False)
    R = max(max_round_s, C)
    avail = max(0.0, R - C)
    wsum = sum(d.weight * shares[d.model] for d in demands)
    frac = 0.9 if P > 0 else 1.0  # overloaded: prefill still gets a tenth, so TTFTs do not grow without bound
    quota = {d.model: avail * frac * d.weight * shares[d.model] / wsum for d in demands}
    prefill = {d.model: (avail * (1.0 - frac) * d.prefill_s / P if P > 0 else 0.0) for d in demands}
    return RoundPlan(R, quota, prefill, S, True)


def aegaeon_round(demands: list[TurnDemand], max_quota_s: float = 4.0, alpha_floor: float = 0.5) -> RoundPlan:
    """Aegaeon's quota rule, re-derived (see module docstring); `switch_s` must be the full switch time."""
    dec = [d for d in demands if d.decode_step_s > 0]
    if not dec:
        return RoundPlan(0.0, {d.model: 0.0 for d in demands}, {d.model: d.prefill_s for d in demands}, 0.0, False)
    inv_n = {d.model: d.decode_step_s / d.tpot_s for d in dec}  # 1 / n_i
    S = sum(inv_n.values())
    c0 = sum(d.switch_s for d in demands)
    max_inv = max(inv_n.values())  # 1 / min n
    alpha = max(c0 * max_inv / max_quota_s + S, alpha_floor)
    if alpha - S <= 1e-12:  # c0 == 0 and S >= floor: one step each
        quota = {m: 0.0 for m in inv_n}
    else:
        quota = {m: c0 * x / (alpha - S) for m, x in inv_n.items()}
    quota.update({d.model: 0.0 for d in demands if d.model not in quota})
    R = c0 + sum(quota.values()) + sum(d.prefill_s for d in demands)
    return RoundPlan(R, quota, {d.model: d.prefill_s for d in demands}, S, alpha > 1.0)


def need_round(demands: list[TurnDemand], floor_s: float = 0.0, cap_s: float = 4.0, margin_s: float = 3.0,
               iters: int = 8, keep_turns: bool = False) -> RoundPlan:
    """The deadline rule, for when pace quotas do not fit (`token_round` over its cap): each model gets the
    decode steps its tightest stream needs to stay on time until its next turn and a margin beyond, no more;
    a model that needs none this round (all its streams and its waiting requests have the slack) sits it out.

    `demands` come in turn order. A model whose turn starts o seconds into a round of length R next runs
    about R later, so its streams must be covered until o + R + margin: n = (o + R + margin - slack) / T
    steps, each of d seconds; a waiting request whose first token is due before that is admitted (its
    prefill is charged; n covers its tokens too), and a model that runs anyway prefills what waits (the
    requests ride along: batching them costs ~nothing). R is the least fixed point of R = the sum of the
    turns (switch + prefill + n d) found by iterating upwards from `floor_s` -- R grows with slope
    sum(d / T) over the models that run, so it converges while they fit.

    The margin is slack banked against bursts (arrivals are Poisson: a busy minute needs what a quiet one
    put by). It is the largest of margin_s, margin_s / 2, / 4, / 8, 0 whose round fits under `cap_s`: a full
    margin while the GPU has the time, none when it has not -- a fixed large margin asks every model for more
    exactly when nothing is left, and the pool tips over. Over `cap_s` even without a margin, the round is
    overloaded (each model still asks for its need; the turns at the end of the round run late). Time left
    over under the floor (the PCIe rotation) banks slack too: it goes to the models that run, in proportion
    to d / T.

    `keep_turns` (TokenConfig.need_keep_turns): a margin so small that no model needs a turn is not a round that
    fits -- it is no round. Where a larger margin had turns (its round over the cap) and the next one has none,
    the larger margin's round is kept. Without it the caller (TokenPolicy._need_plan) plans pace quotas instead,
    whose round (C + P) / (1 - S) nothing caps once prefill is shrunk to none: with S near 1 (simulated, 4 x 7B
    + 6 x 1.5B at 1.3 req/s/model, copy_slowdown 0.2) a round of 31 s against the tightest stream's 2 s of
    slack, each model then waiting up to 28 s for its next turn.
    """
    over = None  # the last margin's fixed point whose round went over the cap
    for k in (1.0, 0.5, 0.25, 0.125, 0.0):
        R, turns = _need_fixed_point(demands, floor_s, cap_s, k * margin_s, iters)
        if turns[0] <= cap_s + 1e-9:
            if keep_turns and not turns[1] and over is not None:
                R, turns = over
            break
        over = R, turns
    t, quota, prefill, target, share = turns
    left = R - t
    if left > 1e-12 and share > 0:
        for d in demands:
            if d.model in quota:
                quota[d.model] += left * (d.decode_step_s / d.tpot_s) / share
    return RoundPlan(max(R, t), quota, prefill, share, t > cap_s + 1e-9, target)


def _need_fixed_point(demands: list[TurnDemand], floor_s: float, cap_s: float, margin_s: float, iters: int):
    R = floor_s
    for _ in range(iters):
        turns = _need_turns(demands, R, margin_s)
        R_next = min(cap_s, max(floor_s, turns[0]))
        if abs(R_next - R) <= 1e-3 * max(R, 1e-3):
            break
        R = R_next
    return R, turns


def _need_turns(demands: list[TurnDemand], R: float, margin_s: float):
    """One pass over the round for a guess R: (its length, quota, prefill, target per model, sum of d / T)."""
    t, quota, prefill, target, share = 0.0, {}, {}, {}, 0.0
    for d in demands:
        o = t + d.switch_s
        horizon = o + R + margin_s
        n = (horizon - d.run_slack_s) / d.tpot_s if d.decode_step_s > 0 else 0.0
        urgent = d.wait_slack_s < horizon
        if n <= 0 and not urgent:
            continue
        if urgent:
            n = max(n, (horizon - d.wait_slack_s) / d.tpot_s)
        q = max(0.0, n) * d.decode_step_s
        pf = d.prefill_s if d.wait_slack_s < float("inf") else 0.0
        quota[d.model], prefill[d.model], target[d.model] = q, pf, horizon
        share += d.decode_step_s / d.tpot_s
        t = o + pf + q
    return t, quota, prefill, target, share
