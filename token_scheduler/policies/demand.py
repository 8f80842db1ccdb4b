"""What one model asks of a round, read off its queues: pure functions of `PoolState` (no tensors, no clocks of
their own). The round planners (quota.py) turn these into time; the token policy (token.py) asks them.

Requests are Request-like (state.py): a decode is a running request with at most one token left to compute;
a prefill is what its prompt (or a waiting request's) has left.
"""

from __future__ import annotations

from itertools import islice

from token_scheduler.cost_model import StepShape
from token_scheduler.policies.batching import BatchLimits
from token_scheduler.policies.state import ModelState, PoolState, Residency


def decode_step_s(st: PoolState, m: ModelState, limits: BatchLimits) -> float:
    """One step of `m`'s running decodes (0: none)."""
    n = ctx = 0
    for r in m.running:
        if r.num_tokens - r.num_computed_tokens <= 1:
            n += 1
            ctx += r.num_computed_tokens + 1
    if n == 0:
        return 0.0
    n = min(n, limits.max_seqs)
    return st.cost.step_time(m.name, StepShape(n, n, ctx))


def need_step_s(st: PoolState, m: ModelState, limits: BatchLimits) -> float:
    """One decode step of every running request of `m` and its next waiting group (the batch once they join)."""
    n = min(len(m.running) + min(len(m.waiting), limits.group_size), limits.max_seqs)
    if n == 0:
        return 0.0
    ctx = sum(r.num_tokens for r in m.running) + sum(r.num_prompt_tokens for r in islice(m.waiting, n))
    return st.cost.step_time(m.name, StepShape(n, n, ctx))


def prefill_s(st: PoolState, m: ModelState, limits: BatchLimits) -> float:
    """Prefill left of `m`'s running prompts and of its next waiting group (linear and attention terms, and a
    prefilling step's fixed cost)."""
    tokens = pairs = 0
    for r in m.running:
        left = r.num_prompt_tokens - r.num_computed_tokens
        if left > 0:
            tokens += left
            pairs += left * r.num_prompt_tokens
    for r in islice(m.waiting, limits.group_size):
        tokens += r.num_prompt_tokens
        pairs += r.num_prompt_tokens * r.num_prompt_tokens
    if tokens == 0:
        return 0.0
    c = st.cost.step_coefficients(m.name)
    # Never under zero: served fits price prefill steps, row graphs' and eager ones alike, with a negative term a
    # token against a positive one a pair (H200, 40 models, 98caf51, a 1.5B: -0.068 ms a token, 74 ns a pair, 37 ms
    # fixed: three 256-token prompts at -0.5 ms)
    return max(0.0, tokens * c[2] + pairs * c[4] + st.cost.prefill_fixed_s(m.name))


def exposed_switch_s(st: PoolState, m: ModelState) -> float:
    """The stall a turn of `m` expects for its weights: none when resident, what is left of a load in flight,
    the part of a load the measured prefetch overlap does not hide when in host memory."""
    if m.residency == Residency.RESIDENT:
        return 0.0
    if m.residency == Residency.LOADING:
        return max(0.0, m.ready_at - st.now)
    return st.cost.exposed_load_time(m.spec.weight_bytes)


def covered(m: ModelState, target: float, shift: dict | None = None) -> bool:
    """Every running stream of `m` has its next token due after `target`, and no waiting one is due before it.
    `shift`: request id -> seconds its deadlines were moved on (TokenConfig.late_rule "pace")."""
    slo = m.slo
    if m.waiting and slo.deadline(m.waiting[0].arrival_time, 0) < target:
        return False
    sh = shift or {}
    return all(slo.deadline(r.arrival_time, r.num_tokens - r.num_prompt_tokens) + sh.get(r.request_id, 0.0) >= target
               for r in m.running)
