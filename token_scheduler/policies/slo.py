"""SLOs and the one definition of "on time" shared by the policies (slack) and the metrics (attainment).

Token deadlines, as in Aegaeon's evaluation: output token k (k = 0 is the first) of a request that arrived at
`a` is due at `a + ttft + k * tpot`. A stream may run ahead and bank slack that a later gap (another model's
turn, a weight switch) spends; a client that buffers sees no stall as long as no deadline is missed.

A request *attains* its SLO iff every one of its tokens meets its deadline ("deadline" attainment; k = 0
makes it imply TTFT <= ttft). Aegaeon's own script reports a time-weighted ratio over these same deadlines;
we report the stricter all-tokens-on-time fraction of requests, plus the fraction of on-time tokens, plus the
common "TTFT <= ttft and mean TPOT <= tpot" rule ("mean" attainment) for comparison.
A request that never finishes (static multiplexing never serves non-resident models) is a miss.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ModelSLO:
    ttft_s: float = 10.0
    tpot_s: float = 0.1
    priority: float = 1.0  # weight when the GPU is overloaded and someone must fall behind

    def deadline(self, arrival: float, k: int) -> float:
        return arrival + self.ttft_s + k * self.tpot_s


def next_token_slack(req, slo: ModelSLO, now: float) -> float:
    """Seconds until `req`'s next token is due (negative: already late). `req` is Request-like."""
    k = req.num_tokens - req.num_prompt_tokens
    return slo.deadline(req.arrival_time, k) - now


@dataclass(slots=True)
class RequestRecord:
    """Per-request timing, updated token by token, O(1) memory (no per-token list)."""

    request_id: str
    model: str
    arrival: float
    prompt_len: int
    output_len: int
    slo: ModelSLO
    first_token: float | None = None
    last_token: float | None = None
    n_tokens: int = 0
    late_tokens: int = 0
    max_gap: float = 0.0
    tokens: list | None = None  # every token time, only when asked for (tests, small traces)

    def on_token(self, t: float) -> None:
        if self.tokens is not None:
            self.tokens.append(t)
        if t > self.slo.deadline(self.arrival, self.n_tokens) + 1e-9:
            self.late_tokens += 1
        if self.first_token is None:
            self.first_token = t
        else:
            self.max_gap = max(self.max_gap, t - self.last_token)  # type: ignore[operator]
        self.last_token = t
        self.n_tokens += 1

    @property
    def finished(self) -> bool:
        return self.n_tokens >= self.output_len

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        if self.n_tokens < 2:
            return None
        return (self.last_token - self.first_token) / (self.n_tokens - 1)  # type: ignore[operator]

    def attained(self, rule: str = "deadline") -> bool:
        if not self.finished:
            return False
        if rule == "deadline":
            return self.late_tokens == 0
        if rule == "mean":
            tpot = self.tpot
            return self.ttft <= self.slo.ttft_s + 1e-9 and (tpot is None or tpot <= self.slo.tpot_s + 1e-9)
        raise ValueError(f"unknown attainment rule {rule!r}")


def _pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, int(round(p / 100.0 * (len(xs) - 1)))))
    return xs[i]


@dataclass
class SloSummary:
    requests: int
    attainment: float  # deadline rule
    attainment_mean_rule: float
    token_attainment: float
    finished: int
    ttft_p50: float | None
    ttft_p99: float | None
    tpot_p50: float | None
    tpot_p99: float | None
    max_gap_p99: float | None
    per_model: dict[str, float] = field(default_factory=dict)
    # per model: requests, missed, first token late (TTFT), p99 TTFT and p99 longest inter-token gap -- where
    # a model's misses come from (queueing for prefill vs waiting for its decode turns)
    per_model_detail: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def summarize(records: list[RequestRecord]) -> SloSummary:
    n = len(records)
    if n == 0:
        return SloSummary(0, 1.0, 1.0, 1.0, 0, None, None, None, None, None)
    ok = sum(r.attained("deadline") for r in records)
    ok_mean = sum(r.attained("mean") for r in records)
    tokens = sum(r.output_len for r in records)
    on_time = sum(r.n_tokens - r.late_tokens for r in records)
    ttfts = [r.ttft for r in records if r.ttft is not None]
    tpots = [r.tpot for r in records if r.tpot is not None]
    gaps = [r.max_gap for r in records if r.n_tokens > 1]
    per: dict[str, list[int]] = {}
    by_model: dict[str, list[RequestRecord]] = {}
    for r in records:
        c = per.setdefault(r.model, [0, 0])
        c[0] += r.attained("deadline")
        c[1] += 1
        by_model.setdefault(r.model, []).append(r)
    detail = {}
    for m, rs in sorted(by_model.items()):
        detail[m] = {
            "requests": len(rs), "missed": sum(not r.attained("deadline") for r in rs),
            "ttft_late": sum(r.ttft is None or r.ttft > r.slo.ttft_s + 1e-9 for r in rs),
            "ttft_p99": _pct([r.ttft for r in rs if r.ttft is not None], 99),
            "max_gap_p99": _pct([r.max_gap for r in rs if r.n_tokens > 1], 99)}
    return SloSummary(
        requests=n,
        attainment=ok / n,
        attainment_mean_rule=ok_mean / n,
        token_attainment=on_time / tokens if tokens else 1.0,
        finished=sum(r.finished for r in records),
        ttft_p50=_pct(ttfts, 50), ttft_p99=_pct(ttfts, 99),
        tpot_p50=_pct(tpots, 50), tpot_p99=_pct(tpots, 99),
        max_gap_p99=_pct(gaps, 99),
        per_model={m: a / b for m, (a, b) in sorted(per.items())},
        per_model_detail=detail,
    )
