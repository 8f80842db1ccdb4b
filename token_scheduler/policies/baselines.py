"""The two baselines, in the same plan language as the token policy so one mechanism runs all three.

`request` -- request-level auto-scaling (ServerlessLLM, llama-swap): one model holds the GPU until its running
requests finish. While another model has requests waiting, the holder admits nothing new; once drained, the
GPU goes to the model of the oldest waiting request. Weights of earlier models stay cached in VRAM while they
fit (least recently used are evicted first, as a keep-alive cache does); loads are blocking, no prefetch.

`static` -- static multiplexing (MuxServe-like): the models that fit (smallest first, leaving
`kv_reserve_frac` of VRAM for KV) are loaded once and never evicted; they take one step each in round-robin
order. Requests for any other model are never served (each one counts as an SLO miss).
"""

from __future__ import annotations

from dataclasses import replace

from token_scheduler.policies.batching import BatchLimits, build_batch, kv_demand
from token_scheduler.policies.memory import fit_step
from token_scheduler.policies.state import PoolState, StepPlan


def _plan(st: PoolState, name: str, limits: BatchLimits, admit: bool, victims: list[str], why: str,
          evict: bool = True) -> StepPlan:
    m = st.models[name]
    fit = fit_step(st, m, kv_demand(m, limits.max_tokens // 4), lambda: victims, evict)
    if fit is None:
        return StepPlan(why=f"no room for {name}")
    batch = build_batch(st.cost, m, limits, fit.kv_free, admit=admit, host_used=fit.room.host_used)
    if not batch.entries:
        return StepPlan(why=f"{name}: nothing fits")
    swap_out = fit.room.swap_out + batch.swap_out
    return StepPlan(model=name, batch=batch.entries, evict=fit.room.evict, swap_out=swap_out,
                    swap_in=batch.swap_in, wait_swap_out=bool(swap_out),
                    expected_s=st.cost.step_time(name, batch.shape), why=why)


class RequestPolicy:
    name = "request"

    def __init__(self, limits: BatchLimits | None = None):
        self.limits = limits or BatchLimits()
        self._holder: str | None = None
        self._last_used: dict[str, float] = {}

    def reset_counters(self) -> None:
        pass

    def set_limits(self, max_seqs: int, max_tokens: int) -> None:
        self.limits = replace(self.limits, max_seqs=max_seqs, max_tokens=max_tokens)

    def forget(self, name: str) -> None:
        if self._holder == name:
            self._holder = None
        self._last_used.pop(name, None)

    def schedule(self, st: PoolState) -> StepPlan:
        h = self._holder
        others = [m for n, m in st.models.items() if n != h and m.waiting]
        if h is None or not st.models[h].running and (others or not st.models[h].waiting):
            if not others and not (h and st.models[h].waiting):
                self._holder = None
                return StepPlan(why="idle")
            if others:
                h = min(others, key=lambda m: m.waiting[0].arrival_time).name
                others = [m for n, m in st.models.items() if n != h and m.waiting]
            self._holder = h
        self._last_used[h] = st.now
        victims = sorted((n for n in st.models if n != h), key=lambda n: self._last_used.get(n, -1.0))
        # A fresh holder admits its queue; a busy one stops admitting while other models wait (drains).
        admit = not others or not st.models[h].running
        return _plan(st, h, self.limits, admit=admit, victims=victims, why=f"holder {h}")


class StaticPolicy:
    name = "static"

    def __init__(self, limits: BatchLimits | None = None, kv_reserve_frac: float = 0.1):
        self.limits = limits or BatchLimits()
        self.kv_reserve_frac = kv_reserve_frac
        self.resident: list[str] | None = None
        self._rr = 0

    def choose_resident(self, st: PoolState) -> list[str]:
        budget = st.capacity_bytes * (1.0 - self.kv_reserve_frac)
        chosen, used = [], 0
        for m in sorted(st.models.values(), key=lambda m: (m.spec.weight_bytes, m.name)):
            if used + m.spec.weight_bytes <= budget:
                chosen.append(m.name)
                used += m.spec.weight_bytes
        return sorted(chosen)

    def reset_counters(self) -> None:
        pass

    def set_limits(self, max_seqs: int, max_tokens: int) -> None:
        self.limits = replace(self.limits, max_seqs=max_seqs, max_tokens=max_tokens)

    def forget(self, name: str) -> None:
        self.resident = None  # chosen again from the models hosted now

    def schedule(self, st: PoolState) -> StepPlan:
        if self.resident is None or any(n not in st.models for n in self.resident):
            self.resident = self.choose_resident(st)
        n = len(self.resident)
        for k in range(n):
            name = self.resident[(self._rr + k) % n]
            if st.models[name].has_work:
                # KV room may come from the other placed models' KV (the one next in turn last); their
                # weights stay placed
                others = [self.resident[(self._rr + k + j) % n] for j in range(n - 1, 0, -1)]
                plan = _plan(st, name, self.limits, admit=True, victims=others, why=f"static {name}", evict=False)
                if not plan.idle:
                    self._rr = (self._rr + k + 1) % n
                    return plan
        return StepPlan(why="idle")
