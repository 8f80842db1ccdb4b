"""Tenants: who a bearer key belongs to, what it may use, and how fast.

Keys are kept only as salted hashes (controller.keys); a new key is shown once, when the tenant is made.
Limits are token buckets (requests/s with a burst, tokens/min charged at admission as prompt + max_tokens and
refunded for what was not generated) and a cap on concurrent requests. They belong to the tenant's name: a tenant
replaced through the admin API (delete, then create: how keys are rotated) keeps its count of requests in flight and
what is left in its buckets, so a rotation neither doubles its concurrency nor refills its rate limits.

A deleted tenant's keys stop working at once (401), and its requests in flight are ended shortly after
(`Controller.tenant_deleted`: streams get an error event, the engines free their KV), unless a namesake made within
that grace keeps their keys (the Kubernetes operator's update, a DELETE then a POST): a request runs on, counted under
the new entry (`Tenant.successor`), when the key it was admitted with (`KEY_USED`, recorded on its Generation) is one
the namesake holds; those of the keys it dropped (a rotation that removes one key of several) are ended. A change of
limits, models, priority or SLO class is better made in place (`TenantRegistry.update`, PATCH /admin/tenants/{name}):
no moment without the tenant, and its usage carries over.

A tenant of the configuration file deleted through the admin API stays revoked across restarts: its key hashes are
recorded in the tenants file, and on start a configured tenant loses those keys (and is left out when none remain).
"""

from __future__ import annotations

import fnmatch
import logging
import math
import os
import secrets
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from controller.config import TenantSpec, shared_key
from controller.keys import hash_key, new_key, verify_key

log = logging.getLogger("tokenpool.tenants")

# The hash of the key the request being handled authenticated with (`TenantRegistry.identify`, set by the route's
# authentication, controller/api/auth.py): a request records it when admitted, so a rotation ends only the requests
# of the keys it removed. None: no key (authentication off), or not known.
KEY_USED: ContextVar[str | None] = ContextVar("tokenpool_key_used", default=None)

MAX_RETRY_AFTER_S = 86400  # a 429's Retry-After at most (a tiny rate's wait overflowed to infinity: a 500)


def _retry_after(wait: float) -> int:
    """A 429's Retry-After for a bucket's `wait` seconds: whole seconds, 1 at least, at most MAX_RETRY_AFTER_S."""
    return max(1, math.ceil(min(wait, MAX_RETRY_AFTER_S)))


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
        wait = self.wait(n, now)
        if wait == 0.0:
            self.level -= n
        return wait

    def wait(self, n: float, now: float | None = None) -> float:
        """The seconds until n would be available (0.0: now); nothing is taken."""
        now = time.monotonic() if now is None else now
        self._fill(now)
        want = min(n, self.capacity)  # a request larger than the bucket waits for a full bucket
        if self.level >= want:
            return 0.0
        return (want - self.level) / self.rate if self.rate > 0 else math.inf  # (a rate that underflowed to 0)

    def give_back(self, n: float) -> None:
        self.level = min(self.capacity, self.level + n)

    def full(self, now: float | None = None) -> bool:
        self._fill(time.monotonic() if now is None else now)
        return self.level >= self.capacity


class _Flight:
    """Requests in flight under a tenant's name, shared by the entries that replace one another."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


@dataclass
class Tenant:
    spec: TenantSpec
    from_file: bool = False
    rps: TokenBucket | None = None
    tpm: TokenBucket | None = None
    usage: dict[str, int] = field(default_factory=lambda: {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0})
    flight: _Flight = field(default_factory=_Flight, repr=False)
    # Deleted through the admin API: `revoked` once its keys are gone for good (its requests are ended, none is
    # admitted); `successor`, the entry that replaced it keeping some of its keys (its requests belong to that one
    # now; those admitted with a key it dropped are ended: `Controller._revoke`)
    revoked: bool = field(default=False, repr=False)
    successor: Tenant | None = field(default=None, repr=False)
    # Who this entry is, beyond its name: kept by a change in place (PATCH, a key rotation too) and by a namesake made
    # with some of its keys (`succeed`), new for a tenant made afresh under a deleted one's name. What is the tenant's
    # own and must not pass to a stranger given the name later is kept under `owner`: its stored responses (GET
    # /v1/responses/{id}), its prompts' cached KV (a prefix cache hit, `cached_tokens`, told what it had sent)
    lineage: str = field(default_factory=lambda: secrets.token_hex(8), repr=False)

    def __post_init__(self) -> None:
        r = self.spec.rate
        if r.requests_per_s:
            self.rps = TokenBucket(r.requests_per_s, r.burst or max(1.0, r.requests_per_s))
        if r.tokens_per_min:
            self.tpm = TokenBucket(r.tokens_per_min / 60.0, r.tokens_per_min)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def inflight(self) -> int:
        return self.flight.n

    @inflight.setter
    def inflight(self, n: int) -> None:
        self.flight.n = n

    def succeed(self, old: Tenant) -> None:
        """Take over the limits' state of `old`, the entry of this name that was deleted: its requests in flight
        (their ends are counted here too), and its buckets (the same objects when the rate is unchanged, else what
        was left in them, up to the new sizes). Made with any key `old` had (a change of limits, or a rotation that
        keeps some keys), it is `old`'s successor: `old`'s requests of the keys kept run on as this one's (their usage
        is counted here); those of the keys dropped are ended (`Controller._revoke`)."""
        self.flight = old.flight
        keys = set(old.spec.key_hashes)
        if not old.revoked and (not keys or keys & set(self.spec.key_hashes)):
            old.successor = self
            self.lineage = old.lineage  # (the same holders: what was theirs stays theirs)
        if old.spec.rate == self.spec.rate:
            self.rps, self.tpm = old.rps, old.tpm
            return
        for new, prev in ((self.rps, old.rps), (self.tpm, old.tpm)):
            if new is not None and prev is not None:
                prev._fill(new.t)
                new.level = min(new.capacity, prev.level * new.capacity / prev.capacity)

    @property
    def owner(self) -> str:
        """The name and lineage: whose stored responses and cached prompts these are."""
        return f"{self.spec.name}#{self.lineage}"

    def latest(self) -> Tenant:
        """The entry this one's requests answer to now: itself, or the one that replaced it keeping its keys."""
        t = self
        while t.successor is not None:
            t = t.successor
        return t

    def may_use(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, p) for p in self.spec.models)


ANONYMOUS = TenantSpec(name="anonymous")


class KeyInUse(ValueError):
    """A tenant given a key hash another tenant holds (`shared_key`'s words)."""


class TenantRegistry:
    def __init__(self, specs: list[TenantSpec], auth: bool, tenants_file: str | None = None):
        self.auth = auth
        self.file = Path(tenants_file) if tenants_file else None
        self._config = {s.name: s for s in specs}
        self._t: dict[str, Tenant] = {s.name: Tenant(s) for s in specs}
        self._gone: dict[str, Tenant] = {}  # deleted entries whose limits' state a re-created namesake takes over
        # configured tenants deleted through the admin API: {"name", "key_hashes"} (kept in the tenants file)
        self._revoked: list[dict] = []
        entries: list = []
        # The file's text as this server last read or wrote it: it is read only at start, so an edit made while the
        # server runs would be overwritten, unsaid, by the next change made through the admin API (`_save` keeps it)
        self._disk: str | None = None
        # what the last change said of the file (an edit kept aside), for the admin API's answer to it; None: nothing
        self.warning: str | None = None
        if self.file is not None and self.file.exists():
            self._disk = self.file.read_text()
            raw = yaml.safe_load(self._disk)
            if isinstance(raw, dict):  # (a plain list before any configured tenant was revoked)
                entries, self._revoked = raw.get("tenants") or [], raw.get("revoked") or []
            else:
                entries = raw or []
        for r in self._revoked:
            t = self._t.get(r["name"])
            if t is None:
                continue
            keep = [h for h in t.spec.key_hashes if h not in r.get("key_hashes", [])]
            # said at start: the tenant of the configuration was missing (or refused its keys) with nothing said why
            if keep:  # keys the configuration gained since: they are not revoked
                self._t[t.name] = Tenant(t.spec.model_copy(update={"key_hashes": keep}))
                log.warning("tenant %r of the configuration: %d of its keys stay revoked (revoked over the admin API, "
                            "recorded in %s: remove its entry under `revoked` there to bring them back)", t.name,
                            len(t.spec.key_hashes) - len(keep), self.file)
            else:
                del self._t[t.name]
                log.warning("tenant %r of the configuration stays revoked (revoked over the admin API, recorded in %s: "
                            "remove its entry under `revoked` there to bring it back)", t.name, self.file)
        for d in entries:
            s = TenantSpec.model_validate(d)
            self._t[s.name] = Tenant(s, from_file=True)
        if shared := shared_key([t.spec for t in self._t.values()]):
            raise KeyInUse(shared)
        self._anon = Tenant(ANONYMOUS)
        self._shared_said: set[tuple[str, str]] = set()  # tenants whose hashes one key matched, said once

    @property
    def single_user(self) -> bool:
        """No auth, or one tenant (vLLM's --api-key): nobody else's requests share the models."""
        return not self.auth or len(self._t) <= 1

    def authenticate(self, key: str | None) -> Tenant | None:
        """The tenant a key belongs to (every hash is checked, in constant time each), or None."""
        return self.identify(key)[0]

    def identify(self, key: str | None) -> tuple[Tenant | None, str | None]:
        """The tenant a key belongs to and the hash it matched (None, None: none; the anonymous tenant and None
        without authentication)."""
        if not self.auth:
            return self._anon, None
        if not key:
            return None, None
        found: tuple[Tenant | None, str | None] = (None, None)
        for t in self._t.values():
            for h in t.spec.key_hashes:
                if verify_key(key, h):
                    if found[0] is None:
                        found = t, h
                    elif found[0] is not t and (found[0].name, t.name) not in self._shared_said:
                        # the same key hashed twice (other salts: the hashes differ), for two tenants
                        self._shared_said.add((found[0].name, t.name))
                        log.warning("a key sent matches a key hash of tenant %r and one of tenant %r: its requests "
                                    "go to tenant %r; give each tenant its own key (tokenpool keys new)",
                                    found[0].name, t.name, found[0].name)
        return found

    def get(self, name: str) -> Tenant | None:
        return self._t.get(name)

    def all(self) -> list[Tenant]:
        return list(self._t.values())

    def create(self, spec: TenantSpec, issue_key: bool = True) -> tuple[Tenant, str | None]:
        """Make a tenant, with a fresh key unless `issue_key` is off; the key is returned here and never stored."""
        if spec.name in self._t:
            raise KeyError(spec.name)
        if shared := shared_key([*(t.spec for t in self._t.values()), spec]):
            raise KeyInUse(shared)
        key = new_key() if issue_key else None
        if key is not None:
            spec = spec.model_copy(update={"key_hashes": [*spec.key_hashes, hash_key(key)]})
        t = self._t[spec.name] = Tenant(spec, from_file=True)
        prev = self._gone.pop(spec.name, None)
        if prev is not None:
            t.succeed(prev)
        self._save()
        return t, key

    def update(self, name: str, changes: dict) -> Tenant:
        """Change a tenant made through the admin API in place (PATCH /admin/tenants): `changes`, validated TenantSpec
        fields other than name (key_hashes too: the caller ends the dropped keys' requests). The new entry takes the old one's place at once (its keys never stop
        working), with its usage, requests in flight and buckets (`succeed`). KeyError: no such tenant; ValueError:
        one of the configuration file (which would bring it back unchanged at the next start: change it there)."""
        t = self._t[name]
        if not t.from_file:
            raise ValueError(name)
        spec = TenantSpec.model_validate({**t.spec.model_dump(), **changes})
        if shared := shared_key([*(o.spec for o in self._t.values() if o is not t), spec]):
            raise KeyInUse(shared)
        new = Tenant(spec, from_file=True)
        new.succeed(t)
        new.usage = t.usage
        new.lineage = t.lineage  # (changed in place, its keys too: the same tenant)
        self._t[name] = new
        self._save()
        return new

    def delete(self, name: str) -> bool:
        self.warning = None
        t = self._t.pop(name, None)
        if t is None:
            return False
        now = time.monotonic()
        self._gone = {n: g for n, g in self._gone.items()
                      if g.inflight or any(b is not None and not b.full(now) for b in (g.rps, g.tpm))}
        self._gone[name] = t
        cfg = self._config.get(name)
        record = False
        if cfg is not None:  # else the configuration brings it back at the next start
            done = [r for r in self._revoked if r["name"] == name]
            fresh = [h for h in cfg.key_hashes if not any(h in r["key_hashes"] for r in done)]
            record = bool(fresh) or not done
            if record:
                self._revoked.append({"name": name, "key_hashes": fresh})
                if self.file is None:
                    log.warning("tenant %r of the configuration is revoked until the server restarts (no "
                                "tenants_file to record it in): remove it from the configuration", name)
        if t.from_file or record:
            self._save()
        return True

    def _save(self) -> None:
        self.warning = None
        if self.file is None:
            return
        tenants = [t.spec.model_dump(mode="json") for t in self._t.values() if t.from_file]
        data = {"tenants": tenants, "revoked": self._revoked} if self._revoked else tenants
        self._keep_edit()
        text = yaml.safe_dump(data, sort_keys=False)
        tmp = self.file.with_suffix(".tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        # made 0600 from the start: written first and chmod-ed after, the tenants' key hashes were readable by anyone
        # on the machine (umask 022) while it was written. A .tmp left by an earlier run (a crash) goes first: O_CREAT's
        # mode is only a new file's, and O_EXCL follows no link put there
        tmp.unlink(missing_ok=True)
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(text)
        tmp.replace(self.file)
        self._disk = text

    def _keep_edit(self) -> None:
        """The file changed on disk since this server read or wrote it (edited by hand while it runs: it is read
        only at start): moved aside before it is rewritten, and said, rather than lost without a word."""
        try:
            now = self.file.read_text()
        except FileNotFoundError:
            return
        if now == self._disk:
            return
        aside = self.file.with_name(f"{self.file.name}.edited-{time.strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while aside.exists():
            n += 1
            aside = aside.with_name(f"{self.file.name}.edited-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        self.file.replace(aside)
        self.warning = (f"{self.file} was changed on disk while the server ran; it is read only at start, so that "
                        f"edit is not in effect: this change rewrote the file from the server's tenants, and the "
                        f"edited file is kept as {aside} (merge it back and restart to load it)")
        log.warning("%s", self.warning)

    # --- limits ---
    @staticmethod
    def acquire(t: Tenant, tokens: int, now: float | None = None, charge: bool = True) -> tuple[int, str] | None:
        """Reserve one request of `tokens`; None when granted, else (retry-after seconds, reason).

        `charge` False: a request that generates nothing for its caller (Ollama's load request): nothing is taken from
        the tenant's rates, but a tenant over one of them is refused all the same -- a load brings a model into the
        VRAM the tenants share (evicting others'), so a tenant that may not generate now may not move the pool's
        models either (it would load for nothing: its next request is refused too). It holds a concurrency slot
        while it runs (it is an engine request in flight)."""
        r = t.spec.rate
        if t.spec.max_concurrent is not None and t.inflight >= t.spec.max_concurrent:
            return 1, (f"tenant {t.name!r} has {t.inflight} requests in flight (limit {t.spec.max_concurrent}); "
                       "retry when one has finished.")
        if not charge:
            for bucket, limit in ((t.rps, "request rate limit reached for tenant {t}: {v:g} requests/s"),
                                  (t.tpm, "token rate limit reached for tenant {t}: {v:g} tokens/min")):
                wait = bucket.wait(1, now) if bucket is not None else 0.0
                if wait > 0:
                    s = _retry_after(wait)
                    v = r.requests_per_s if bucket is t.rps else r.tokens_per_min
                    return s, (f"{limit.format(t=repr(t.name), v=v)}; a model's load takes none of it, but waits "
                               f"until the tenant is under it: try again in {s}s.")
            t.inflight += 1
            return None
        if t.rps is not None:
            wait = t.rps.take(1, now)
            if wait > 0:
                s = _retry_after(wait)
                return s, (f"request rate limit reached for tenant {t.name!r}: {r.requests_per_s:g} requests/s "
                           f"(burst {t.rps.capacity:g}); try again in {s}s.")
        if t.tpm is not None:
            wait = t.tpm.take(tokens, now)
            if wait > 0:
                if t.rps is not None:
                    t.rps.give_back(1)
                s = _retry_after(wait)
                over = (" (more than a minute's allowance: it waits for a full one; a lower max_tokens reserves "
                        "less)" if tokens > t.tpm.capacity else "")
                return s, (f"token rate limit reached for tenant {t.name!r}: {r.tokens_per_min:g} tokens/min; "
                           f"this request reserves {tokens} tokens (prompt + max_tokens for each choice; refunded for "
                           f"tokens not generated){over}; try again in {s}s.")
        t.inflight += 1
        return None

    @staticmethod
    def release(t: Tenant, charged: int, prompt_tokens: int, completion_tokens: int, served: bool = True) -> None:
        """A request of `t` is done: its concurrency slot and the tokens/min it reserved but did not use come back;
        a served one counts in the usage (one refused before any token does not)."""
        t.inflight -= 1
        if t.tpm is not None:
            t.tpm.give_back(max(0, charged - prompt_tokens - completion_tokens))
        if not served:
            return
        t.usage["requests"] += 1
        t.usage["prompt_tokens"] += prompt_tokens
        t.usage["completion_tokens"] += completion_tokens
