"""Admission control: estimate a new request's time to first token on one engine; refuse what cannot meet its SLO.

Pure functions over numbers the controller measures (decode step time, each in-flight request's expected
remaining tokens). The model: an engine runs at most `max_num_seqs` requests at once, one token per step each;
a queued request takes the first slot that frees, so its start is found by replaying the queue over the slots.
A request that would start at once (a slot free, no prompt ahead of it to prefill) is always admitted (an SLO the
hardware cannot meet even when idle must not black-hole the model); one that would queue is admitted only if its
estimate is within slack * SLO.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    admit: bool
    est_ttft_s: float
    retry_after_s: int = 0
    reason: str = ""


def estimate_ttft(running_remaining: Iterable[int], waiting_tokens: Iterable[int], max_num_seqs: int, step_s: float,
                  load_s: float = 0.0, prefill_s: float = 0.0) -> float:
    """Seconds until a request arriving now gets its first token.

    running_remaining: decode steps each request holding a slot still needs.
    waiting_tokens: total decode steps of each request queued ahead of ours, in FIFO order.
    load_s: time until the model is resident (0 when it is); prefill_s: our prompt's prefill time.
    """
    slots = sorted(r * step_s for r in running_remaining)[:max_num_seqs]
    slots += [0.0] * (max_num_seqs - len(slots))
    heapq.heapify(slots)
    for w in waiting_tokens:
        t = heapq.heappop(slots)
        heapq.heappush(slots, t + w * step_s)
    start = heapq.heappop(slots)
    return load_s + start + prefill_s + step_s


# A step (or a round, or a gap between a worker's outputs) sample is counted as at most this many times the estimate
# it updates: a worker paused mid-step (SIGSTOP, swap, a long GC) took its whole pause as one step, and with the model
# idle after it no step came to wash it out (a 4 s pause made a 1.4 ms step 0.2 s until the next requests ran, and
# those that queued were refused: `bench/results/stall_estimate_cpu.json`). Clamped, not dropped: a real slowdown
# (larger batches, a long prompt's prefill) still raises the estimate, by 1 + weight * (STALL_FACTOR - 1) a sample.
STALL_FACTOR = 4.0


def ewma(prev: float, sample: float, weight: float) -> float:
    """The estimate `prev` (0: none yet, `sample` is taken as it is) moved `weight` of the way toward `sample`,
    the sample clamped at STALL_FACTOR x `prev`."""
    if prev <= 0.0:
        return sample
    return (1.0 - weight) * prev + weight * min(sample, STALL_FACTOR * prev)


def decide(est_ttft_s: float, queued: bool, slo_ttft_s: float, slack: float, queue_len: int,
           max_queue: int, prefill_s: float = 0.0) -> Decision:
    """Admit or refuse; a refusal says when retrying is worth it (HTTP Retry-After, whole seconds).
    `prefill_s`: the request's own prefill time; if that alone misses the SLO, it is refused whatever the queue
    (its prompt would hold the GPU from every other model's requests for longer than the SLO allows). The caller
    gives 0 where the engine has no other request (the prompt holds up no one, and would otherwise never run)."""
    if prefill_s > slack * slo_ttft_s:
        return Decision(False, est_ttft_s, max(1, math.ceil(prefill_s)),
                        f"its prompt alone takes an estimated {prefill_s:.2f}s to prefill, over the "
                        f"{slo_ttft_s:g}s time-to-first-token SLO")
    if queue_len >= max_queue:
        return Decision(False, est_ttft_s, max(1, math.ceil(est_ttft_s)), f"engine queue is full ({queue_len})")
    if not queued or est_ttft_s <= slack * slo_ttft_s:
        return Decision(True, est_ttft_s)
    wait = est_ttft_s - slack * slo_ttft_s
    return Decision(False, est_ttft_s, max(1, math.ceil(wait)),
                    f"estimated time to first token {est_ttft_s:.2f}s exceeds the {slo_ttft_s:g}s SLO")


def expected_tokens(max_tokens: int, generated: int, used_fraction: float | None) -> int:
    """Decode steps a request still needs: its budget, scaled by the fraction of budgets this model's requests
    have used so far (EOS and stop strings end many early); at least one."""
    budget = max_tokens if used_fraction is None else math.ceil(max_tokens * used_fraction)
    return max(budget - generated, 1)
