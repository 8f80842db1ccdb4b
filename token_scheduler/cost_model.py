"""Online cost model: what a step, a weight switch and a KV swap cost, learned from measurements.

Policies ask it three questions -- how long will this batch of model m take, how long does moving N bytes of
weights take, how long does moving N bytes of KV take -- and the mechanism (engine or simulator) reports
every measurement back. Nothing here is a hard-coded profile: a fit starts from a prior (a `HardwareProfile`
roofline, or zeros) and recursive least squares pulls it to what was measured.

Step time is linear in the step's shape (see `StepShape.features`): a fixed launch cost plus the weights read
once, a per-sequence cost, a per-new-token cost (GEMM FLOPs + KV writes), a per-context-token cost (KV
reads), a per-(query, key)-pair cost (prefill attention) and a fixed cost of a step that prefills (one that runs
eagerly, not a decode graph: its launches). The roofline below has exactly this form, which is why a simulator
driven by it is fitted exactly and a real GPU is fitted well.

`H100_PCIE53` is derived from physical numbers only -- 2.9 TB/s achieved HBM read bandwidth (the decode
weights-read floor), 0.6 x 989 dense bf16 TFLOP/s for GEMMs, 53 GB/s pinned PCIe Gen5 x16 per direction --
and is what the simulator uses both as ground truth and as the prior; it is not a measured profile. `H200_PCIE54`
is the H200's, the floor under fits measured there (`roofline_for`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from itertools import repeat
from operator import add, mul, sub, truediv

_FEATURE_SCALES = (1.0, 64.0, 1024.0, 65536.0, 1.0e6, 1.0)  # keep the RLS well conditioned
STEP_COEF_KEYS = ("base_s", "per_seq_s", "per_new_token_s", "per_ctx_token_s", "per_attn_pair_s", "per_prefill_step_s")


@dataclass(frozen=True, slots=True)
class StepShape:
    """What a step computes: sequences, new tokens (KV written), context tokens read, attention pairs; a step with
    more new tokens than sequences prefills (some sequence gets several)."""

    num_seqs: int
    new_tokens: int
    ctx_tokens: int  # KV tokens read, summed over sequences (decode: ~sum of lengths)
    attn_pairs: int = 0  # sum over sequences of new_tokens * context length (prefill's quadratic part)

    @property
    def prefills(self) -> bool:
        return self.new_tokens > self.num_seqs

    def features(self) -> tuple[float, float, float, float, float, float]:
        # The last one: whether the step prefills. Its fixed cost is of another kind than a decode's: an eager
        # forward's ~250 launches, where a decode replays a graph (H200, 35 models served: ~20 ms of host time a
        # prefill step, serve_h200_models35_seed7_ec5e4d7_profiled.json). Without it the fit can only spread that
        # over its per-sequence, per-token and per-pair terms (tests/test_cost_model.py: a 256-token prefill priced
        # at 12.7 ms for 22.6); the served fits there carried 0.44 ms a sequence where a decode's costs ~0.08 ms.
        s = _FEATURE_SCALES
        return (1.0, self.num_seqs / s[1], self.new_tokens / s[2], self.ctx_tokens / s[3], self.attn_pairs / s[4],
                1.0 if self.prefills else 0.0)


# Kinds of step for the books of where a served step's time went (`MultiModelEngine._phases`): decodes by batch
# size, steps with a prefill chunk (one kind), and decodes queued before the step in flight was read (one kind)
PHASE_KINDS = ("d1", "d2", "d3", "d4", "d5_8", "d9_16", "d17", "prefill", "pipelined")
PHASE_KEYS = tuple(f"ph_{k}_{x}" for k in PHASE_KINDS
                   for x in ("steps", "seqs", "pre_s", "pre_cpu_s", "wait_s", "wait_cpu_s", "post_s", "post_cpu_s",
                             "dev_s", "dev_n"))


def phase_kind(shape: StepShape) -> str:
    if shape.prefills:
        return "prefill"
    n = shape.num_seqs
    return f"d{n}" if n <= 4 else "d5_8" if n <= 8 else "d9_16" if n <= 16 else "d17"


def step_phases(d: dict) -> dict:
    """Per kind of step that ran unpipelined (decodes by batch size, steps with a prefill: the pooled engine's
    `ph_*` counters, over a point): how many, their mean sequences, and ms per step before the device work was
    queued, from then to the tokens on the host, and after; each with the step thread's CPU ms beside it; and
    with TOKENPOOL_TIME_STEPS, `dev_ms`: the device's time a step (CUDA events)."""
    out = {}
    for kind in PHASE_KINDS:
        n = d.get(f"ph_{kind}_steps", 0)
        if n:
            row = {"steps": int(n), "seqs": d.get(f"ph_{kind}_seqs", 0) / n}
            for ph in ("pre", "wait", "post"):
                row[f"{ph}_ms"] = 1e3 * d.get(f"ph_{kind}_{ph}_s", 0) / n
                row[f"{ph}_cpu_ms"] = 1e3 * d.get(f"ph_{kind}_{ph}_cpu_s", 0) / n
            if d.get(f"ph_{kind}_dev_n"):  # (TOKENPOOL_TIME_STEPS) the device's own ms a step, by CUDA events
                row["dev_ms"] = 1e3 * d[f"ph_{kind}_dev_s"] / d[f"ph_{kind}_dev_n"]
            out[kind] = row
    return out


@dataclass(frozen=True, slots=True)
class ModelSize:
    """The sizes of one model that matter to scheduling (bytes moved, FLOPs done)."""

    name: str
    weight_bytes: int
    kv_bytes_per_token: int
    flops_per_token: float  # 2 x matmul parameters
    attn_flops_per_pair: float  # 4 x layers x q width (QK^T and PV)
    max_context: int = 32768

    @staticmethod
    def from_config(name: str, cfg, dtype_bytes: int = 2) -> ModelSize:
        """From a `model_swapper.model_config.ModelConfig` (weight layout = `weight_numel`)."""
        from model_swapper.weights import weight_numel

        numel = weight_numel(cfg)
        lookup = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size  # embedding rows, no GEMM
        return ModelSize(
            name=name,
            weight_bytes=numel * dtype_bytes,
            kv_bytes_per_token=2 * cfg.num_layers * cfg.kv_size * dtype_bytes,
            flops_per_token=2.0 * (numel - lookup),
            attn_flops_per_pair=4.0 * cfg.num_layers * cfg.q_size,
            max_context=cfg.max_position_embeddings,
        )


@dataclass(frozen=True, slots=True)
class HardwareProfile:
    """Physical numbers of one GPU + host link; a prior for the cost model and the simulator's ground truth."""

    name: str
    hbm_bytes_per_s: float
    gemm_flops_per_s: float
    attn_flops_per_s: float
    pcie_bytes_per_s: float  # pinned host <-> device, per direction
    step_overhead_s: float  # launches, sampling, host bookkeeping per step
    per_seq_overhead_s: float
    switch_overhead_s: float  # per weight load: allocation, remap, sync
    swap_overhead_s: float  # per KV swap batch
    prefill_overhead_s: float = 0.0  # per step that prefills (an eager forward's launches), beyond step_overhead_s

    def step_time(self, spec: ModelSize, shape: StepShape) -> float:
        """Roofline without overlap (sum of memory and compute times): linear in `StepShape.features`."""
        return float(sum(a * x for a, x in zip(self.step_coefficients(spec), shape.features(), strict=True)))

    def step_coefficients(self, spec: ModelSize) -> tuple[float, ...]:
        s, kv = _FEATURE_SCALES, spec.kv_bytes_per_token
        return (
            self.step_overhead_s + spec.weight_bytes / self.hbm_bytes_per_s,
            s[1] * self.per_seq_overhead_s,
            s[2] * (spec.flops_per_token / self.gemm_flops_per_s + kv / self.hbm_bytes_per_s),
            s[3] * kv / self.hbm_bytes_per_s,
            s[4] * spec.attn_flops_per_pair / self.attn_flops_per_s,
            s[5] * self.prefill_overhead_s,
        )

    def load_time(self, nbytes: float) -> float:
        return self.switch_overhead_s + nbytes / self.pcie_bytes_per_s

    def swap_time(self, nbytes: float) -> float:
        return self.swap_overhead_s + nbytes / self.pcie_bytes_per_s


@dataclass(frozen=True, slots=True)
class MeasuredProfile(HardwareProfile):
    """What a running engine measured (a `CostModel.to_dict()`), as a simulator's ground truth and prior: the
    simulator then replays a real run with the step, load and swap costs that run saw, so the gap left between
    simulated and real attainment is the scheduling dynamics, not the cost guesses. Per model, step time is
    the measured linear fit, never below the base profile's physical roofline (a fit can carry negative terms
    outside the range it saw); a model it has no fit for gets the base profile's roofline."""

    step_coef: dict = field(default_factory=dict)  # model -> per-unit coefficients (STEP_COEF_KEYS' order)

    @staticmethod
    def from_cost_dict(d: dict, base: HardwareProfile) -> MeasuredProfile:
        # (a fit saved before the prefill term has none: 0)
        coef = {m: tuple(float(v["coef"].get(k, 0.0)) for k in STEP_COEF_KEYS) for m, v in d.get("step", {}).items()}
        load, swap = d.get("load", {}), d.get("swap", {})
        fields = {f: getattr(base, f) for f in HardwareProfile.__dataclass_fields__}
        fields["name"] = f"measured ({d.get('prior') or 'no prior'}, then fitted while running)"
        fields["pcie_bytes_per_s"] = float(load.get("bytes_per_s") or base.pcie_bytes_per_s)
        fields["switch_overhead_s"] = max(0.0, float(load.get("overhead_s", base.switch_overhead_s)))
        fields["swap_overhead_s"] = max(0.0, float(swap.get("overhead_s", base.swap_overhead_s)))
        return MeasuredProfile(**fields, step_coef=coef)

    def step_time(self, spec: ModelSize, shape: StepShape) -> float:
        if spec.name not in self.step_coef:
            return HardwareProfile.step_time(self, spec, shape)
        x = shape.features()
        fit = sum(a * v for a, v in zip(self.step_coefficients(spec), x, strict=True))
        return max(fit, sum(a * v for a, v in zip(self.physical_coefficients(spec), x, strict=True)))

    def physical_coefficients(self, spec: ModelSize) -> tuple[float, ...]:
        """The base profile's roofline less its guessed host overheads (per step, sequence and prefill): bytes
        over HBM and FLOPs over compute, what no measured step can beat. With the overheads in (1 ms a step)
        this floor sat above the H200's measured decodes -- a 1.5B's 1.2 ms priced 1.75 ms, a 7B's 3.8 ms 4.7 --
        so a simulator replaying the H200's fits ran 30% slow and saturated at 40 models (67% on seed 1 where
        the served run met 91-94%)."""
        s = _FEATURE_SCALES
        c = HardwareProfile.step_coefficients(self, spec)
        return (c[0] - self.step_overhead_s, c[1] - s[1] * self.per_seq_overhead_s, c[2], c[3], c[4],
                c[5] - s[5] * self.prefill_overhead_s)

    def step_coefficients(self, spec: ModelSize) -> tuple[float, ...]:
        c = self.step_coef.get(spec.name)
        if c is None:
            return HardwareProfile.step_coefficients(self, spec)
        return tuple(x * s for x, s in zip(c, _FEATURE_SCALES, strict=True))


H100_PCIE53 = HardwareProfile(
    name="H100-SXM (physical roofline, 53 GB/s pinned PCIe)",
    hbm_bytes_per_s=2.9e12,
    gemm_flops_per_s=0.6 * 989e12,
    attn_flops_per_s=0.4 * 989e12,
    pcie_bytes_per_s=53e9,
    step_overhead_s=1.0e-3,
    per_seq_overhead_s=10e-6,
    switch_overhead_s=5e-3,
    swap_overhead_s=0.5e-3,
)

# The H200 the same way: HBM read at 4.1 TB/s (its copy bandwidth measured 4.25 TB/s, parity_qwen2_1.5b_h200.json;
# H100_PCIE53's 2.9 is 96% of the 3.02 measured on the H100), the same compute, the 53.8 GB/s pinned link measured
# there. A measured H200 profile floors its fits here: on H100_PCIE53's floor a 7B step never went below 6.3 ms
# where the H200 ran it in 4.1-4.8 ms (bench pool --real's fits) -- the simulator's 7B decode was 30% too slow.
H200_PCIE54 = replace(H100_PCIE53, name="H200 (physical roofline, 53.8 GB/s pinned PCIe)", hbm_bytes_per_s=4.1e12,
                      pcie_bytes_per_s=53.8e9)


def roofline_for(device: str | None) -> HardwareProfile:
    """The physical floor of the GPU a measurement came from (by its name): H200_PCIE54 or H100_PCIE53."""
    return H200_PCIE54 if device and "H200" in device else H100_PCIE53


def shape_key(spec: ModelSize) -> tuple:
    """What a model's step time depends on: its sizes, not its name (aliases of one checkpoint, or models of
    one architecture and size, share a key)."""
    return spec.weight_bytes, spec.kv_bytes_per_token, spec.flops_per_token, spec.attn_flops_per_pair


CLIP_AFTER = 20  # measurements before robust clipping starts (the prior may be far off until then)


class OnlineLinearFit:
    """Recursive least squares with forgetting: y ~ theta . x, updated one measurement at a time (O(n^2)).

    A pooled engine updates a fit after most steps (a step within 0.5% of its prediction is rare) and predicts
    several times per plan, so both run as C-level maps over flat lists -- P is one row-major list -- rather
    than index loops (5 features then, 6 now: an update 8.0 -> 5.8 us, a prediction 0.6 -> 0.2 us; keeping P
    symmetric, see `update`, costs ~0.5 us more). P's update is the symmetric form P - h h^T (h = P x / sqrt(denom)), so P
    stays symmetric to the bit over any number of updates; a P that stops being a covariance anyway is reset
    to the prior's confidence * I, theta kept."""

    __slots__ = ("theta", "P", "lam", "n", "cap", "clip", "conf", "resid", "seen")

    def __init__(self, prior: tuple[float, ...], confidence: float = 100.0, forgetting: float = 0.999,
                 clip: float | None = None):
        self.theta = list(prior)
        # P0 = confidence * I is the prior's variance per (scaled) coefficient; against step times of
        # milliseconds, 100 s^2 is weak: a few dozen measurements override a wrong prior.
        self.conf = confidence
        self.P = self._prior_P()  # k x k, row-major
        self.lam = forgetting
        self.cap = 10.0 * confidence  # per direction: forgetting inflates P along directions never varied
        self.n = 0
        # Robust updates: once CLIP_AFTER measurements are in, an error beyond `clip` x the prediction counts
        # only up to that. A one-off stall (a CUDA-graph capture, a JIT compile, a GC pause: 100x a step) would
        # otherwise dominate a squared-error fit for its whole memory (~1/(1 - forgetting) steps) and bend
        # every coefficient towards explaining it; a real change still moves the fit, step by step.
        # The limit is `clip` x the larger of the prediction and 3 x the recent size of the (clipped) errors, `resid`
        # (an EWMA over ~20 updates): a one-off stall moves `resid` by a twentieth of a step, while an error that
        # persists widens the limit threefold every ~20 steps until the fit can follow it. Against the prediction
        # alone, a fit that came to price a shape near zero could never climb back (each correction capped at
        # that near-zero price) -- seen served (H200, 10 models at 1.3 req/s/model, seed 1): a 1.5B priced at
        # 0-1.5 ms for decodes measured at 2.4-3.3 ms, for a minute.
        # `resid` is kept per kind of measurement (`update`'s `kind`: the step fits' decodes and prefills), and each
        # kind is clipped only after CLIP_AFTER of its own: with one scale, the decodes (~25 a prefill, errors ~0.1
        # ms) held it at a decode's size, and prefills priced under zero by terms a quiet spell had left wild stayed
        # so (served, H200, 10 models at 1.44 req/s/model after a point at 0.1: steps ran 1.17x their price, a
        # 1.5B's attention pairs at -0.48 us each, 79% attainment against 100% from a cold start).
        self.clip = clip
        self.resid = [0.0, 0.0]
        self.seen = [0, 0]

    def predict(self, x) -> float:
        return sum(map(mul, self.theta, x))

    def update(self, x, y: float, tol: float = 0.0, kind: int = 0) -> bool:
        """Fold in one measurement; skipped (returns False) when already predicted within `tol` (relative). `kind`
        (0 or 1): which recent error size clips it (see `resid`)."""
        pred = self.predict(x)
        err = y - pred
        self.n += 1
        if abs(err) <= tol * abs(y):
            return False
        self.seen[kind] += 1
        if self.clip is not None and self.seen[kind] > CLIP_AFTER:
            res = self.resid
            lim = self.clip * max(pred, 3.0 * res[kind])
            err = max(-lim, min(lim, err))
            res[kind] += 0.05 * (abs(err) - res[kind])
        lam, P, k = self.lam, self.P, len(self.theta)
        Px = [sum(map(mul, P[i:i + k], x)) for i in range(0, k * k, k)]  # P x
        denom = lam + sum(map(mul, x, Px))
        if not denom > 0.0:  # P lost positive definiteness (round-off): restart its memory, keep theta
            P = self._prior_P()
            Px = [self.conf * v for v in x]
            denom = lam + sum(map(mul, x, Px))
        gain = [p / denom for p in Px]
        self.theta = list(map(add, self.theta, map(mul, gain, repeat(err))))
        # P - (P x)(P x)^T / denom as h h^T with h = P x / sqrt(denom): h_i h_j == h_j h_i to the bit, so P stays
        # exactly symmetric. The textbook gain (P x)^T form rounds g_i Px_j and g_j Px_i apart, and since that
        # subtraction leaves P's antisymmetric part as it is, the division by lam below grew it by e every 1000
        # updates: from round-off to O(1) after ~40k updates, then P (and the fit) diverged.
        r = denom ** -0.5
        h = [p * r for p in Px]
        P = list(map(sub, P, map(mul, [a for a in h for _ in range(k)], h * k)))
        diag = P[::k + 1]
        if min(diag) <= 0.0:  # not positive definite any more: restart P's memory, keep theta
            self.P = self._prior_P()
        elif max(diag) < self.cap:
            self.P = list(map(truediv, P, repeat(lam)))
        else:
            # Forgetting inflates P along directions the measurements never vary, without bound: so each
            # direction forgets only while its variance is under the cap (P -> D P D, D diagonal: still a
            # symmetric covariance). Capping the trace instead stopped all forgetting once a never-varied
            # direction filled it -- with one model stepping at batch 1 for 30k steps, a 30% change in its step
            # time was still 19% off 5000 steps later; this way 2.8% after 1000 and 0.1% after 3000.
            d = [lam ** -0.5 if v < self.cap else 1.0 for v in diag]
            self.P = list(map(mul, P, [a * b for a in d for b in d]))
        return True

    def _prior_P(self) -> list[float]:
        k = len(self.theta)
        return [(self.conf if i == j else 0.0) for i in range(k) for j in range(k)]


STEP_CLIP = 1.0  # a step measured at more than twice its prediction counts as twice (see OnlineLinearFit)


class CostModel:
    """Step-time fits (one per model shape, shared by the models of that shape), one weight-load fit and one
    KV-swap fit (time = overhead + bytes / bandwidth).

    `hidden_load_fraction` is measured too: the share of a weight load's time that overlapped compute
    (prefetch). Policies use it to charge only the exposed part of a switch.
    """

    def __init__(self, profile: HardwareProfile | None = None, specs: list[ModelSize] | tuple = ()):
        self.profile = profile
        # One step fit per model *shape* (`shape_key`), shared by every hosted model of that shape: the same
        # sizes run the same kernels, so a step's time is the shape's, not the name's. With a fit per name, each
        # model learned from its own few batch sizes only. Served on the H200 (35 models of two shapes, 3 minutes,
        # ~1,000 steps each, mostly at batch 1-3; serve_h200_models35_seed7_5d81aa7_pipeline.json), the 14 7Bs'
        # fits priced a batch-8 decode from 3.6 to 19.3 ms and the 21 1.5Bs' from 1.8 to 11.7 ms, where `bench
        # engine` measures 4.7 and 1.8: each alias was priced on its own extrapolation.
        self._step: dict[str, OnlineLinearFit] = {}  # model -> its shape's fit (shared objects)
        self._coef: dict[tuple, tuple[float, ...]] = {}  # shape -> per-unit coefficients, refreshed when it moves
        self._key: dict[str, tuple] = {}  # model -> shape_key (read at every prediction)
        self._floor: dict[str, float] = {}
        bw = profile.pcie_bytes_per_s if profile else 25e9  # unseeded: a modest PCIe guess, refitted at once
        ovh = profile.switch_overhead_s if profile else 0.0
        conf = 100.0 if profile else 1e4  # no prior: trust the first measurements entirely
        self._conf = conf
        self._load = OnlineLinearFit((ovh, 1e9 / bw), conf)
        swap_ovh = profile.swap_overhead_s if profile else 0.0
        self._swap = OnlineLinearFit((swap_ovh, 1e9 / bw), conf)
        self.hidden_load_fraction = 0.0
        self._n_hidden = 0
        for s in specs:
            self.register(s)

    def register(self, spec: ModelSize) -> None:
        """Host `spec`: it joins the step fit of the models of its shape, or starts one from the prior."""
        self.forget(spec.name)  # (registered again, perhaps with another shape: a fresh start for a new shape)
        key = shape_key(spec)
        fit = next((self._step[m] for m, k in self._key.items() if k == key), None)
        if fit is None:
            prior = self.profile.step_coefficients(spec) if self.profile else (0.0,) * len(_FEATURE_SCALES)
            fit = OnlineLinearFit(prior, self._conf, clip=STEP_CLIP)
        self._key[spec.name], self._step[spec.name] = key, fit
        # no step is priced under its weights read once at the profile's HBM rate. (Coefficients may be negative:
        # with decodes costing far less per token than prefill, the fit says so with a negative s/seq.)
        self._floor[spec.name] = spec.weight_bytes / self.profile.hbm_bytes_per_s if self.profile else 0.0

    def forget(self, model: str) -> None:
        """A model is no longer hosted: it leaves its shape's step fit, which goes with the last model of that
        shape (the link fits are the device's, they stay)."""
        self._step.pop(model, None)
        self._floor.pop(model, None)
        key = self._key.pop(model, None)
        if key is not None and key not in self._key.values():
            self._coef.pop(key, None)

    # -- predictions (cheap; called by policies every step) --
    def step_time(self, model: str, shape: StepShape) -> float:
        return max(self._floor[model], self._step[model].predict(shape.features()))

    def prefill_fixed_s(self, model: str) -> float:
        """What a step that prefills costs beyond its tokens and pairs (its eager launches): the fit's prefill term,
        never below 0 (a fit can carry negative terms outside the range it saw)."""
        return max(0.0, self.step_coefficients(model)[5])

    def step_coefficients(self, model: str) -> tuple[float, ...]:
        """Fitted coefficients in per-unit terms: (base s, s/seq, s/new token, s/ctx token, s/attn pair, s/prefill
        step)."""
        key = self._key[model]
        c = self._coef.get(key)
        if c is None:
            c = self._coef[key] = tuple(t / s for t, s in zip(self._step[model].theta, _FEATURE_SCALES, strict=True))
        return c

    def load_time(self, nbytes: float) -> float:
        return max(0.0, self._load.predict((1.0, nbytes / 1e9)))

    def swap_time(self, nbytes: float) -> float:
        return max(0.0, self._swap.predict((1.0, nbytes / 1e9))) if nbytes > 0 else 0.0

    def exposed_load_time(self, nbytes: float) -> float:
        return self.load_time(nbytes) * (1.0 - self.hidden_load_fraction)

    # -- measurements (reported by the mechanism) --
    def observe_step(self, model: str, shape: StepShape, seconds: float) -> None:
        # Within 0.5% already: skip the O(n^2) update (most steps once the fit has converged).
        if self._step[model].update(shape.features(), seconds, tol=0.005, kind=int(shape.prefills)):
            self._coef.pop(self._key[model], None)

    def observe_load(self, nbytes: float, seconds: float, hidden_s: float = 0.0) -> None:
        self._load.update((1.0, nbytes / 1e9), seconds)
        if seconds > 0:
            self._n_hidden += 1
            a = max(0.05, 1.0 / self._n_hidden)  # running mean, then an EWMA
            self.hidden_load_fraction += a * (min(1.0, hidden_s / seconds) - self.hidden_load_fraction)

    def observe_swap(self, nbytes: float, seconds: float) -> None:
        if nbytes > 0:
            self._swap.update((1.0, nbytes / 1e9), seconds)

    def to_dict(self) -> dict:
        def bw(fit: OnlineLinearFit) -> float:
            return 1e9 / fit.theta[1] if fit.theta[1] > 0 else float("inf")

        return {
            "prior": self.profile.name if self.profile else None,
            "load": {"overhead_s": self._load.theta[0], "bytes_per_s": bw(self._load), "samples": self._load.n},
            "swap": {"overhead_s": self._swap.theta[0], "bytes_per_s": bw(self._swap), "samples": self._swap.n},
            "hidden_load_fraction": self.hidden_load_fraction,
            "step": {
                m: {"coef": dict(zip(STEP_COEF_KEYS, self.step_coefficients(m), strict=True)), "samples": f.n}
                for m, f in self._step.items()
            },
        }
