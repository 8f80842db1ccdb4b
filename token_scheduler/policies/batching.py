"""One model's step batch: the one batch builder and the one preemption rule (every policy, and the
single-model scheduler, build with `select_batch`; mechanisms run its result as is).

Prefill, chunked prefill and decode are one rule (request.py): a request computes some of its uncomputed
tokens. Order inside a model, vLLM-style: RUNNING requests (KV in VRAM) first, oldest first; if their growth
does not fit, RUNNING requests not yet scheduled are preempted (their KV swapped out to host memory; dropped and
recomputed only where the host has no room -- the mechanism's `BatchScheduler._preempt`), the cheapest first
(`pick_victim`): the newest whose KV fits the host pages left, else the one with the fewest tokens to recompute. Then SWAPPED
requests resume oldest first while they fit (FCFS: the first that does not fit stops the rest). New requests
are admitted only when nothing is swapped and no running request was left without room, as one FCFS group of
at most `group_size`, their prompts chunked so the step stays near `chunk_target_s` and decodes of the same
model keep their TPOT. KV is counted as the mechanism allocates it, in whole blocks (`kv_bytes`).

Limits: one engine's `EngineConfig.max_num_seqs` / `max_num_batched_tokens` (`BatchLimits.of`); the defaults
here are EngineConfig's, so nothing plans with numbers the engine does not run.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from token_scheduler.cost_model import CostModel, StepShape
from token_scheduler.policies.state import ModelState, blocks
from token_scheduler.request import RequestStatus

_RUNNING, _SWAPPED = RequestStatus.RUNNING, RequestStatus.SWAPPED

MAX_NUM_SEQS = 256  # EngineConfig.max_num_seqs's default
MAX_NUM_BATCHED_TOKENS = 2048  # EngineConfig.max_num_batched_tokens's default


@dataclass(frozen=True, slots=True)
class BatchLimits:
    max_seqs: int = MAX_NUM_SEQS  # sequences holding KV in VRAM (scheduled this step or not)
    max_tokens: int = MAX_NUM_BATCHED_TOKENS  # tokens computed per step
    group_size: int = 8  # grouped FCFS: new requests admitted per group
    chunk_frac_tpot: float = 0.5  # a prefill-carrying step targets this fraction of the model's TPOT SLO
    min_chunk: int = 64

    @staticmethod
    def of(cfg, **kw) -> BatchLimits:
        """The limits of an engine config (`EngineConfig` or anything with its two fields)."""
        return BatchLimits(cfg.max_num_seqs, cfg.max_num_batched_tokens, **kw)


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
    base += cost.prefill_fixed_s(m.name)  # a step with a prefill chunk runs eagerly: its fixed cost
    return max(limits.min_chunk, min(limits.max_tokens, int((target - base) / per_token)))


def build_batch(cost: CostModel, m: ModelState, limits: BatchLimits, free_bytes: int, admit: bool = True,
                max_prefill_tokens: int | None = None, host_used: int = 0) -> Batch:
    """Pick `m`'s requests for one step given `free_bytes` of VRAM for its KV growth (weights already paid);
    `host_used`: host pages the plan's other swap-outs take first (`Room.host_used`)."""
    on_gpu = [r for r in m.running if r.status == _RUNNING]
    swapped = [r for r in m.running if r.status == _SWAPPED]
    pf = max_prefill_tokens if max_prefill_tokens is not None else prefill_budget(
        cost, m, limits, len(on_gpu), sum(r.num_computed_tokens for r in on_gpu))
    bt = m.kv_block_tokens
    host = None if m.host_kv_free is None else max(0, m.host_kv_free - host_used)
    return select_batch(on_gpu, swapped, m.waiting, bt, m.kv_block_bytes or bt * m.spec.kv_bytes_per_token, limits,
                        free_bytes, pf, admit, host)


def pick_victim(cands: Sequence, lo: int, host_free: int | None, block_tokens: int) -> int:
    """The index in `cands[lo:]` (RUNNING requests, oldest first) of the one to preempt: the newest whose KV fits
    `host_free` host blocks (swapped out: it comes back by a copy), else -- all would be dropped -- the one with
    the fewest tokens to recompute (`kv_tokens_recomputed`: its computed tokens less those in blocks the prefix
    cache holds), the newest of those. `host_free` None: host room not counted (the newest, vLLM's rule)."""
    last = len(cands) - 1
    if host_free is None:
        return last
    best, least = last, None
    for j in range(last, lo - 1, -1):
        if blocks(cands[j].num_computed_tokens, block_tokens) <= host_free:
            return j
        c = cands[j].kv_tokens_recomputed
        if least is None or c < least:
            best, least = j, c
    return best


def select_batch(on_gpu: Sequence, swapped: Sequence, waiting: Iterable, block_tokens: int, block_bytes: int,
                 limits: BatchLimits, free: int, pf_left: int, admit: bool = True,
                 host_free: int | None = None) -> Batch:
    """The rule (module docstring) over one model's queues, oldest first each: `on_gpu` RUNNING, `swapped`,
    `waiting`. KV is held in blocks of `block_tokens` tokens and `block_bytes` bytes (ModelState.kv_bytes);
    `free`: KV bytes free for the step; `pf_left`: prefill tokens this step may compute; `host_free`: host
    blocks a preempted request's KV may be swapped to (None: not counted, as if always room)."""
    bt = block_tokens

    def kv_bytes(tokens: int) -> int:
        return -(-tokens // bt) * block_bytes

    entries: list = []
    swap_in: list = []
    swap_out: list = []
    free0 = free
    tokens = 0
    held = len(on_gpu)  # sequence slots held: RUNNING requests, scheduled this step or not
    max_tokens = limits.max_tokens
    stuck = False  # a running request had no room: nothing swaps in or starts behind it

    # 1. RUNNING, oldest first; on shortage preempt the cheapest of those not yet scheduled (pick_victim).
    run = on_gpu  # those still in line: a copy once a victim leaves it
    i = 0
    while i < len(run) and len(entries) < limits.max_seqs:
        r = run[i]
        i += 1
        c = r.num_computed_tokens
        left = r.num_tokens - c
        n = min(left, pf_left if left > 1 else 1, max_tokens - tokens)
        if n <= 0:
            continue
        grow = ((-c) // bt - (-c - n) // bt) * block_bytes  # kv_bytes(c + n) - kv_bytes(c), inline: the hot line
        while grow > free and len(run) > i:
            if run is on_gpu:
                run = list(on_gpu)
            victim = run.pop(pick_victim(run, i, host_free, bt))
            held -= 1
            swap_out.append(victim)
            free += kv_bytes(victim.kv_tokens_freed)
            if host_free is not None and (h := blocks(victim.num_computed_tokens, bt)) <= host_free:
                host_free -= h
        if grow > free:
            stuck = True  # even alone it does not fit: nothing more this step
            break
        free -= grow
        entries.append((r, n))
        tokens += n
        if n > 1:
            pf_left -= n
    # 2. SWAPPED, oldest first, while they fit (never while we are preempting).
    if not swap_out and not stuck:
        for r in swapped:
            if held >= limits.max_seqs:
                break
            c = r.num_computed_tokens
            left = r.num_tokens - c
            n = min(left, pf_left if left > 1 else 1, max_tokens - tokens)
            need = kv_bytes(c + max(n, 0))
            if n <= 0 or need > free:
                break
            free -= need
            entries.append((r, n))
            swap_in.append(r)
            held += 1
            tokens += n
            if n > 1:
                pf_left -= n
    # 3. New requests: one FCFS group, only when nothing of this model waits in host memory.
    if admit and not swap_out and not stuck and len(swap_in) == len(swapped):
        for k, r in enumerate(waiting):
            if k >= limits.group_size or held >= limits.max_seqs or pf_left <= 0 or tokens >= max_tokens:
                break
            n = min(r.num_tokens, pf_left, max_tokens - tokens)
            need = kv_bytes(n)
            if need > free:
                break
            free -= need
            entries.append((r, n))
            held += 1
            tokens += n
            pf_left -= n
    # the shape from the entries (one accounting, shape_of's): computed tokens are not advanced until the step runs
    return Batch(entries, swap_in, swap_out, shape_of(entries), free0 - free)


def kv_demand(m: ModelState, prefill_tokens: int) -> int:
    """KV bytes `m`'s next step may add: every running request's next token, the swapped ones back in VRAM,
    and `prefill_tokens` of new prompts (what a policy makes room for before it builds the batch)."""
    bt = m.kv_block_tokens
    d = 0  # in blocks, priced once (every step, every running request)
    for r in m.running:
        c = r.num_computed_tokens
        d += blocks(c + 1, bt) - (blocks(c, bt) if r.status == _RUNNING else 0)
    return d * m.block_bytes + m.kv_bytes(prefill_tokens)
