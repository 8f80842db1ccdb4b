"""Multi-model scheduling policies: given a `PoolState`, decide the next `StepPlan` (one model's batch).

Selectable by name: `token` (ours), `aegaeon` (the same machinery with Aegaeon's quota rule, fixed order,
next-turn prefetch and none of our additions -- for comparison), `request` and `static` (baselines.py).
"""

from __future__ import annotations

from typing import Protocol

from token_scheduler.policies.baselines import RequestPolicy, StaticPolicy
from token_scheduler.policies.batching import BatchLimits
from token_scheduler.policies.slo import ModelSLO
from token_scheduler.policies.state import ModelState, PoolState, Residency, StepPlan
from token_scheduler.policies.token import TOKEN_CHOICES, TokenConfig, TokenPolicy

POLICY_NAMES = ("token", "aegaeon", "request", "static")


class MultiModelPolicy(Protocol):
    """What `MultiModelEngine` asks of a policy: the next step's plan, and to forget a removed model."""

    name: str

    def schedule(self, st: PoolState) -> StepPlan: ...

    def forget(self, name: str) -> None: ...

    def set_limits(self, max_seqs: int, max_tokens: int) -> None: ...

    def reset_counters(self) -> None: ...

AEGAEON_PRESET = dict(quota_rule="aegaeon", order="fixed", prefetch="next", switch_charge="all",
                      extend_on_load=False, skip_on_slack=False, placement="lru", need_rule="off",
                      sized_victims="off", see_ranges=False, pair_turns=False)


_OPTION_TYPES = {"float": (int, float), "int": (int,), "bool": (bool,), "str": (str,)}


def policy_options(name: str, options: dict | None) -> dict:
    """`options` checked as knobs of policy `name` (a server's `gpus.policy_options`): the token policy's (and
    aegaeon's) `TokenConfig` fields of a plain type -- need_margin_s, headroom, max_round_s, ...; the baselines take
    none. Raises ValueError naming what is wrong and what is allowed."""
    import dataclasses

    options = dict(options or {})
    if name not in POLICY_NAMES:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICY_NAMES)}")
    allowed = {}
    if name in ("token", "aegaeon"):
        allowed = {f.name: f.type for f in dataclasses.fields(TokenConfig) if f.type in _OPTION_TYPES}
    for k, v in options.items():
        if k not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise ValueError(f"policy {name!r} has no option {k!r} (its options: {known})")
        want = _OPTION_TYPES[allowed[k]]
        if not isinstance(v, want) or (isinstance(v, bool) and bool not in want):
            raise ValueError(f"policy option {k!r} must be a {allowed[k]}, got {v!r}")
        if k in TOKEN_CHOICES and v not in TOKEN_CHOICES[k]:
            raise ValueError(f"policy option {k!r} must be one of {', '.join(TOKEN_CHOICES[k])}, got {v!r}")
    return options


def make_policy(name: str, limits: BatchLimits | None = None, **kw) -> MultiModelPolicy:
    limits = limits or BatchLimits()
    if name == "token":
        return TokenPolicy(TokenConfig(limits=limits, **kw))
    if name == "aegaeon":
        return TokenPolicy(TokenConfig(limits=limits, **{**AEGAEON_PRESET, **kw}), name="aegaeon")
    if name == "request":
        return RequestPolicy(limits, **kw)
    if name == "static":
        return StaticPolicy(limits, **kw)
    raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICY_NAMES)}")


__all__ = [
    "POLICY_NAMES", "BatchLimits", "MultiModelPolicy", "ModelSLO", "ModelState", "PoolState", "Residency", "StepPlan",
    "TokenConfig", "TokenPolicy", "RequestPolicy", "StaticPolicy", "make_policy", "policy_options",
]
