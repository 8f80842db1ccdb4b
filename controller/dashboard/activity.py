"""What the pool did lately, for the admin API and the dashboard: a rolling window the controller feeds.

    act = Activity()
    act.started(gen, request_id)      # Controller.generate, once the Generation exists
    act.finished(gen, status)         # Controller.finished
    act.stats(engine)                 # Controller._stats: keeps the engine's step timeline

Latency percentiles and attainment come from the finished requests of the last `window_s`; rates
(requests/s, tokens/s, tokens/min) from cumulative counters sampled at each read, so they need no hook.
Everything is bounded (deques with a cap); nothing here is on the serving path but the O(1) appends.
The window's sums and sorted latencies are kept per model and per tenant, updated at a read by the requests
that finished or aged out since the one before: a read costs O(new requests), not O(window) (at 50 requests
a second a 60 s window holds 3000, which the dashboard's once-a-second snapshot would otherwise sort again).
"""

from __future__ import annotations

import time
from bisect import bisect_left, insort
from collections import deque
from dataclasses import dataclass, field
from typing import Any

WINDOW_S = 60.0
RATE_S = 10.0  # rates are measured over the last ~10 s of samples
TIMELINE_S = 300.0  # how much of each engine's step timeline is kept
SPAN_S = 60.0  # how much of it the admin API shows by default
RES_S = 0.25  # ... at this resolution (see Activity.timeline)
CAP = 50_000


@dataclass(slots=True)
class Outcome:
    t: float
    model: str
    tenant: str
    status: int
    ttft_s: float | None
    tpot_s: float | None
    tokens: int
    ok: bool | None  # within the SLO; None when it never produced a token (not counted in attainment)


def percentile(xs: list[float], q: float) -> float | None:
    """The q-quantile (0..1) of xs by nearest rank; None for no samples."""
    return ranked(sorted(xs), q)


def ranked(s: list[float], q: float) -> float | None:
    """percentile() of an already sorted list."""
    if not s:
        return None
    return s[min(len(s) - 1, max(0, int(q * len(s) + 0.5) - 1))]


@dataclass(slots=True)
class Group:
    """The window's outcomes of one model or tenant: sums, and the latencies sorted."""
    requests: int = 0
    tokens: int = 0
    judged: int = 0
    ok: int = 0
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)

    def add(self, o: Outcome, sign: int) -> None:
        self.requests += sign
        self.tokens += sign * o.tokens
        if o.ok is not None:
            self.judged += sign
            self.ok += sign * o.ok
        if o.status == 200:
            for xs, x in ((self.ttft, o.ttft_s), (self.tpot, o.tpot_s)):
                if x is None:
                    continue
                if sign > 0:
                    insort(xs, x)
                else:
                    del xs[bisect_left(xs, x)]

    def summary(self) -> dict[str, Any]:
        return dict(requests=self.requests, tokens=self.tokens,
                    ttft_p50=ranked(self.ttft, 0.5), ttft_p99=ranked(self.ttft, 0.99),
                    tpot_p50=ranked(self.tpot, 0.5), tpot_p99=ranked(self.tpot, 0.99),
                    attainment=self.ok / self.judged if self.judged else None)


def outcome(gen: Any, status: int, now: float) -> Outcome:
    """One finished Generation as the window keeps it (the same TTFT/TPOT rule as Controller.finished)."""
    ttft = tpot = ok = None
    if gen.t_first is not None:
        ttft = gen.t_first - gen.t_arrival
        per_choice = gen.completion_tokens / max(1, len(gen.subs))
        if per_choice > 1 and gen.t_last:
            tpot = (gen.t_last - gen.t_first) / (per_choice - 1)
        if status == 200:
            ok = ttft <= gen.slo.ttft_s and (tpot is None or tpot <= gen.slo.tpot_s)
    return Outcome(now, gen.entry.spec.name, gen.tenant.name, status, ttft, tpot, gen.completion_tokens, ok)


class Rate:
    """Per-key rates from cumulative counts sampled over time: add(now, {key: count}) -> {key: per second}."""

    def __init__(self, span_s: float = RATE_S):
        self.span_s = span_s
        self.samples: deque[tuple[float, dict[str, float]]] = deque(maxlen=512)

    def add(self, now: float, counts: dict[str, float]) -> dict[str, float]:
        while len(self.samples) > 1 and now - self.samples[1][0] >= self.span_s:
            self.samples.popleft()
        base = self.samples[0] if self.samples else None
        if base is not None and now - base[0] > 2 * self.span_s:
            # nothing read for longer than the span (no dashboard open): counts that old say nothing of the last span
            # (the first reads after an hour showed an idle model's tokens/s averaged over the hour); measured afresh
            self.samples.popleft()
            base = self.samples[0] if self.samples else None
        if not self.samples or now - self.samples[-1][0] >= 0.2:  # reads closer than 0.2 s share a sample
            self.samples.append((now, counts))
        if base is None or now - base[0] < 0.5:
            return {k: 0.0 for k in counts}
        dt = now - base[0]
        return {k: max(0.0, v - base[1].get(k, 0.0)) / dt for k, v in counts.items()}


class Activity:
    def __init__(self, window_s: float = WINDOW_S, hooked: bool = True):
        self.window_s = window_s
        self.done: deque[Outcome] = deque(maxlen=CAP)  # finished, not yet counted in the window (a read does)
        self.window: deque[Outcome] = deque()  # counted in `groups`, oldest first
        self.groups: dict[tuple[str, str], Group] = {}  # ("model" | "tenant", name) -> the window's outcomes
        self.live: dict[str, Any] = {}  # request id -> Generation, while it runs
        self.timelines: dict[str, deque[list]] = {}  # engine id -> [t_wall_start, model, n_steps, dur_s] runs
        self.first_seen: dict[str, float] = {}  # engine request id -> wall time first seen (age without a hook)
        # whether the controller feeds started/finished: the Controller, which makes its Activity, does from its first
        # request (False until then said "latency window not fed" on every fresh server); views.activity's fallback,
        # for a controller without one, is not fed until a request says otherwise
        self.hooked = hooked
        self.rates: dict[str, Rate] = {}  # by what is counted (see rate())
        self._sampled: dict[str, float] = {}  # engine id -> wall time of the last sampled timeline run
        self.loads: deque[tuple[int, str, float]] = deque()  # (seq, model, stall_s): weight-load events read
        self.loads_seq = 0  # ... from the event bus up to this seq (controller.dashboard.views)

    # --- fed by the controller ---
    def started(self, gen: Any, request_id: str) -> None:
        self.hooked = True
        gen.request_id = request_id
        gen.t_wall = time.time()
        self.live[request_id] = gen

    def finished(self, gen: Any, status: int) -> None:
        self.hooked = True
        self.live.pop(getattr(gen, "request_id", None), None)
        if getattr(gen, "load", False):
            # Ollama's load request (Controller.generate's `load`): nothing was made for its caller, and its time is
            # the model's load, so it is no request of the window (a model's and a tenant's requests, TTFT/TPOT,
            # SLO attainment), as it is no latency or SLO sample in the metrics: a tenant that only loaded showed
            # 100% attainment, and a model the load's TTFT
            return
        self.done.append(outcome(gen, status, time.monotonic()))

    def stats(self, e: Any) -> None:
        """Keep the engine's step timeline (runs arrive with each Stats; a run already kept is skipped)."""
        runs = (getattr(e, "pool", None) or {}).get("timeline") or []
        self.add_runs(e.id, runs)

    def add_runs(self, engine: str, runs: list) -> None:
        tl = self.timelines.setdefault(engine, deque(maxlen=8192))
        last = tl[-1][0] if tl else float("-inf")
        for r in runs:
            if r[0] > last and r[1] is not None:  # (an idle stretch, if reported, is shown as a gap)
                tl.append(list(r))
                last = r[0]
        cut = time.time() - TIMELINE_S
        while tl and tl[0][0] + tl[0][3] < cut:
            tl.popleft()

    def sample_timeline(self, engine: str, model: str | None, now: float) -> None:
        """Without the pooled engine's timeline: note which model was busy since the last read (coarse)."""
        last = self._sampled.get(engine)
        self._sampled[engine] = now
        if model is not None and last is not None:
            self.add_runs(engine, [[last, model, 0, min(now - last, 2.0)]])

    def timeline(self, engine: str, now: float, span_s: float = SPAN_S, res_s: float = RES_S) -> list[list]:
        """The engine's runs of the last span_s, compacted to one run per res_s cell (the model that ran most of
        it; adjacent full cells of one model merged): a bounded size however often the engine switches.
        res_s 0: the runs as reported."""
        cut = now - span_s
        runs = [r for r in self.timelines.get(engine, ()) if r[0] + r[3] >= cut]
        if res_s <= 0:
            return runs
        cells: dict[int, list] = {}  # cell -> [first activity, last activity, {model: [busy s, steps]}]
        for t0, model, n, dur in runs:
            t, end = max(t0, cut), t0 + dur
            first = True
            while True:
                c = int(t // res_s)
                seg_end = min(end, (c + 1) * res_s)
                cell = cells.setdefault(c, [t, seg_end, {}])
                cell[0], cell[1] = min(cell[0], t), max(cell[1], seg_end)
                acc = cell[2].setdefault(model, [0.0, 0])
                acc[0] += seg_end - t
                if first:
                    acc[1] += n
                    first = False
                if seg_end >= end or seg_end <= t:
                    break
                t = seg_end
        out: list[list] = []
        for c in sorted(cells):
            lo, hi, per_model = cells[c]
            model, (_, steps) = max(per_model.items(), key=lambda kv: kv[1][0])
            prev = out[-1] if out else None
            if prev is not None and prev[1] == model and abs(prev[0] + prev[3] - lo) < 1e-6:
                prev[2] += steps  # activity of one model running on across the cell boundary: one run
                prev[3] = hi - prev[0]
            else:
                out.append([lo, model, steps, hi - lo])
        return out

    def rate(self, what: str, counts: dict[str, float], now: float, span_s: float = RATE_S) -> dict[str, float]:
        r = self.rates.get(what)
        if r is None:
            r = self.rates[what] = Rate(span_s)
        return r.add(now, counts)

    # --- read by the admin API ---
    def _advance(self, now: float) -> None:
        """Count the outcomes finished since the last read, uncount those that left the window."""
        cut = now - self.window_s
        while self.done:
            o = self.done.popleft()
            if o.t >= cut:
                self.window.append(o)
                self._count(o, 1)
        while self.window and self.window[0].t < cut:
            self._count(self.window.popleft(), -1)

    def _count(self, o: Outcome, sign: int) -> None:
        for key in (("model", o.model), ("tenant", o.tenant)):
            g = self.groups.get(key)
            if g is None:
                g = self.groups[key] = Group()
            g.add(o, sign)
            if not g.requests:
                del self.groups[key]

    def by_model(self, now: float | None = None) -> dict[str, dict[str, Any]]:
        return self._group(now, "model")

    def by_tenant(self, now: float | None = None) -> dict[str, dict[str, Any]]:
        return self._group(now, "tenant")

    def _group(self, now: float | None, kind: str) -> dict[str, dict[str, Any]]:
        self._advance(time.monotonic() if now is None else now)
        return {name: g.summary() for (k, name), g in self.groups.items() if k == kind}
