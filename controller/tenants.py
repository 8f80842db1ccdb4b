"""Tenants: who a bearer key belongs to, what it may use, and how fast.

Keys are kept only as salted hashes (controller.keys); a new key is shown once, when the tenant is made.
Limits are token buckets (requests/s with a burst, tokens/min charged at admission as prompt + max_tokens and
refunded for what was not generated) and a cap on concurrent requests.
"""

from __future__ import annotations

import fnmatch
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from controller.config import TenantSpec
from controller.keys import hash_key, new_key, verify_key


class TokenBucket:
    def __init__(self, rate: float, capacity: float, now: float | None = None):
        self.rate, self.capacity = rate, capacity
        self.level = capacity
        self.t = time.monotonic() if now is None else now

    def _fill(self, now: float) -> None:
        if now > self.t:
            self.level = min(self.capacity, self.level + (now - self.t) * self.rate)
            self.t = now

    def take(self, n: float, now: float | None = None) -> float:
        """Take n; returns 0.0 when granted, else the seconds until n would be available (nothing taken)."""
        now = time.monotonic() if now is None else now
        self._fill(now)
        want = min(n, self.capacity)  # a request larger than the bucket waits for a full bucket
        if self.level >= want:
            self.level -= n
            return 0.0
        return (want - self.level) / self.rate

    def give_back(self, n: float) -> None:
        self.level = min(self.capacity, self.level + n)


@dataclass
class Tenant:
    spec: TenantSpec
    from_file: bool = False
    inflight: int = 0
    rps: TokenBucket | None = None
    tpm: TokenBucket | None = None
    usage: dict[str, int] = field(default_factory=lambda: {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0})

    def __post_init__(self) -> None:
        r = self.spec.rate
        if r.requests_per_s:
            self.rps = TokenBucket(r.requests_per_s, r.burst or max(1.0, r.requests_per_s))
        if r.tokens_per_min:
            self.tpm = TokenBucket(r.tokens_per_min / 60.0, r.tokens_per_min)

    @property
    def name(self) -> str:
        return self.spec.name

    def may_use(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, p) for p in self.spec.models)


ANONYMOUS = TenantSpec(name="anonymous")


class TenantRegistry:
    def __init__(self, specs: list[TenantSpec], auth: bool, tenants_file: str | None = None):
        self.auth = auth
        self.file = Path(tenants_file) if tenants_file else None
        self._t: dict[str, Tenant] = {s.name: Tenant(s) for s in specs}
        if self.file is not None and self.file.exists():
            for d in yaml.safe_load(self.file.read_text()) or []:
                s = TenantSpec.model_validate(d)
                self._t[s.name] = Tenant(s, from_file=True)
        self._anon = Tenant(ANONYMOUS)

    @property
    def single_user(self) -> bool:
        """No auth, or one tenant (vLLM's --api-key): nobody else's requests share the models."""
        return not self.auth or len(self._t) <= 1

    def authenticate(self, key: str | None) -> Tenant | None:
        """The tenant a key belongs to (every hash is checked, in constant time each), or None."""
        if not self.auth:
            return self._anon
        if not key:
            return None
        found = None
        for t in self._t.values():
            for h in t.spec.key_hashes:
                if verify_key(key, h) and found is None:
                    found = t
        return found

    def get(self, name: str) -> Tenant | None:
        return self._t.get(name)

    def all(self) -> list[Tenant]:
        return list(self._t.values())

    def create(self, spec: TenantSpec, issue_key: bool = True) -> tuple[Tenant, str | None]:
        """Make a tenant, with a fresh key unless `issue_key` is off; the key is returned here and never stored."""
        if spec.name in self._t:
            raise KeyError(spec.name)
        key = new_key() if issue_key else None
        if key is not None:
            spec = spec.model_copy(update={"key_hashes": [*spec.key_hashes, hash_key(key)]})
        t = self._t[spec.name] = Tenant(spec, from_file=True)
        self._save()
        return t, key

    def delete(self, name: str) -> bool:
        t = self._t.pop(name, None)
        if t is not None and t.from_file:
            self._save()
        return t is not None

    def _save(self) -> None:
        if self.file is None:
            return
        data = [t.spec.model_dump(mode="json") for t in self._t.values() if t.from_file]
        tmp = self.file.with_suffix(".tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))
        tmp.chmod(0o600)
        tmp.replace(self.file)

    # --- limits ---
    @staticmethod
    def acquire(t: Tenant, tokens: int, now: float | None = None) -> tuple[int, str] | None:
        """Reserve one request of `tokens`; None when granted, else (retry-after seconds, reason)."""
        if t.spec.max_concurrent is not None and t.inflight >= t.spec.max_concurrent:
            return 1, f"tenant has {t.inflight} requests in flight (limit {t.spec.max_concurrent})"
        if t.rps is not None:
            wait = t.rps.take(1, now)
            if wait > 0:
                return max(1, math.ceil(wait)), "request rate limit reached"
        if t.tpm is not None:
            wait = t.tpm.take(tokens, now)
            if wait > 0:
                if t.rps is not None:
                    t.rps.give_back(1)
                return max(1, math.ceil(wait)), "token rate limit reached"
        t.inflight += 1
        return None

    @staticmethod
    def release(t: Tenant, charged: int, prompt_tokens: int, completion_tokens: int) -> None:
        t.inflight -= 1
        if t.tpm is not None:
            t.tpm.give_back(max(0, charged - prompt_tokens - completion_tokens))
        t.usage["requests"] += 1
        t.usage["prompt_tokens"] += prompt_tokens
        t.usage["completion_tokens"] += completion_tokens
