"""One model's step batch under a token budget and a VRAM budget (shared by every policy).

Prefill, chunked prefill and decode are one rule (request.py): a request computes some of its uncomputed
tokens. Order inside a model, vLLM-style: RUNNING requests (KV in VRAM) first, oldest first; if their growth
does not fit, the *newest* RUNNING requests are preempted (KV swapped out, never dropped). Then SWAPPED
requests resume oldest first while they fit (FCFS: the first that does not fit stops the rest). New requests
are admitted only when nothing is swapped, as one FCFS group of at most `group_size`, their prompts chunked
so the step stays near `chunk_target_s` and decodes of the same model keep their TPOT.
"""

from __future__ import annotations

from dataclasses import dataclass

from token_scheduler.cost_model import CostModel, StepShape
from token_scheduler.policies.state import ModelState
from token_scheduler.request import RequestStatus

_RUNNING, _SWAPPED = RequestStatus.RUNNING, RequestStatus.SWAPPED


@dataclass(frozen=True, slots=True)
class BatchLimits:
    max_seqs: int = 256
    max_tokens: int = 8192  # tokens computed per step
    group_size: int = 8  # grouped FCFS: new requests admitted per group
    chunk_frac_tpot: float = 0.5  # a prefill-carrying step targets this fraction of the model's TPOT SLO
    min_chunk: int = 64


@dataclass(slots=True)
class Batch:
    entries: list  # [(request, num_tokens)]
    swap_in: list
    swap_out: list  # own requests preempted to make room
    shape: StepShape
    kv_growth_bytes: int  # VRAM the step adds (new tokens + swapped-in KV - preempted KV)


def shape_of(entries) -> StepShape:
    """The step shape of [(request, n)] before the step runs (same accounting as `build_batch`)."""
    seqs = tokens = ctx = pairs = 0
    for r, n in entries:
        c = r.num_computed_tokens
        seqs += 1
        tokens += n
        ctx += c + n
        if n > 1:
            pairs += n * (c + n)
    return StepShape(seqs, tokens, ctx, pairs)


def prefill_budget(cost: CostModel, m: ModelState, limits: BatchLimits, decode_seqs: int, decode_ctx: int) -> int:
    """Prefill tokens that keep the step near chunk_frac_tpot * TPOT, by inverting the linear step fit."""
    target = limits.chunk_frac_tpot * m.slo.tpot_s
    base = cost.step_time(m.name, StepShape(decode_seqs, decode_seqs, decode_ctx))
    per_token = cost.step_coefficients(m.name)[2]
    if per_token <= 0:
        return limits.max_tokens
    return max(limits.min_chunk, min(limits.max_tokens, int((target - base) / per_token)))


def build_batch(cost: CostModel, m: ModelState, limits: BatchLimits, free_bytes: int, admit: bool = True,
                max_prefill_tokens: int | None = None) -> Batch:
    """Pick `m`'s requests for one step given `free_bytes` of VRAM for its KV growth (weights already paid)."""
    bpt = m.spec.kv_bytes_per_token
    entries: list = []
    swap_in: list = []
    swap_out: list = []
    on_gpu = [r for r in m.running if r.status == _RUNNING]
    swapped = [r for r in m.running if r.status == _SWAPPED]
    free = free_bytes
    seqs = tokens = ctx = pairs = 0
    decode_ctx = sum(r.num_computed_tokens for r in on_gpu)
    pf_left = max_prefill_tokens if max_prefill_tokens is not None else prefill_budget(
        cost, m, limits, len(on_gpu), decode_ctx)
    preempted = set()

    def want(r) -> int:
        n = r.num_tokens - r.num_computed_tokens
        return 1 if n <= 1 else min(n, pf_left, limits.max_tokens - tokens)

    # 1. RUNNING, oldest first; preempt newest on shortage.
    i_last = len(on_gpu) - 1
    for i, r in enumerate(on_gpu):
        if i > i_last:
            break
        if seqs >= limits.max_seqs:
            break
        n = want(r)
        if n <= 0:
            continue
        while n * bpt > free and i_last > i:
            victim = on_gpu[i_last]
            i_last -= 1
            preempted.add(id(victim))
            swap_out.append(victim)
            free += victim.num_computed_tokens * bpt
        if n * bpt > free:
            break  # even alone it does not fit: nothing more this step
        free -= n * bpt
        entries.append((r, n))
        seqs += 1
        tokens += n
        ctx += r.num_computed_tokens + n
        if n > 1:
            pf_left -= n
            pairs += n * (r.num_computed_tokens + n)
    # 2. SWAPPED, oldest first, while they fit (never while we are preempting).
    if not swap_out:
        for r in swapped:
            if seqs >= limits.max_seqs:
                break
            n = want(r)
            need = (r.num_computed_tokens + max(n, 0)) * bpt
            if n <= 0 or need > free:
                break
            free -= need
            entries.append((r, n))
            swap_in.append(r)
            seqs += 1
            tokens += n
            ctx += r.num_computed_tokens + n
            if n > 1:
                pf_left -= n
                pairs += n * (r.num_computed_tokens + n)
    # 3. New requests: one FCFS group, only when nothing of this model waits in host memory.
    if admit and not swap_out and len(swap_in) == len(swapped):
        for k, r in enumerate(m.waiting):
            if k >= limits.group_size or seqs >= limits.max_seqs or pf_left <= 0 or tokens >= limits.max_tokens:
                break
            n = min(r.num_tokens, pf_left, limits.max_tokens - tokens)
            if n * bpt > free:
                break
            free -= n * bpt
            entries.append((r, n))
            seqs += 1
            tokens += n
            ctx += n
            pf_left -= n
            if n > 1:
                pairs += n * n
    shape = StepShape(seqs, tokens, ctx, pairs)
    return Batch(entries, swap_in, swap_out, shape, free_bytes - free)
