"""kopf handlers: thin. Each reads the object, asks `builders` what the controller and the cluster should hold,
compares with what they hold, changes only the difference, and writes status conditions.

Level-triggered: create/update/resume and a periodic timer all run the same reconcile, so after an operator
or controller restart (a controller loses API-made models when it restarts) everything converges again. A
controller restart is seen within RESTART_CHECK_S (its /health's `instance` changes: `ControllerWatch`), and each
PooledModel, Tenant and GPUPool is reconciled at once, not at the next timer round (up to RESYNC_S later: meanwhile
every tenant key was a 401 and every model a 404, while their statuses said Ready). The same check reconciles a
GPUPool when the controller's engines come or go (/health's `engines`: `enginesReady`), and a Tenant naming models
when the operator registered or removed a model since its last round (`ModelsUnmatched` said or cleared).
Idempotent: a reconcile that finds nothing to change calls no admin-API mutation and writes no status.
Handlers are sync (kopf runs them in threads); one lock per object keeps its timer and its change handlers apart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fnmatch
import hashlib
import json
import logging
import os
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from controller.operator import GROUP, VERSION
from controller.operator import builders as b
from controller.operator.admin import AdminClient, AdminError, AdminUnauthorized, AdminUnavailable
from tokenpool import env

log = logging.getLogger("tokenpool.operator")


@dataclass(frozen=True)
class OperatorConfig:
    controller_url: str
    admin_token: str
    resync_s: float = 30.0
    kubeconfig: str | None = None  # used outside a cluster; the first file of a KUBECONFIG list

    @staticmethod
    def resync_from_env() -> float:
        return env.OPERATOR_RESYNC_S.number()

    @classmethod
    def from_env(cls) -> OperatorConfig:
        """The one place the operator reads its environment (set by the Deployment from a Secret)."""
        url = env.CONTROLLER_URL.get()
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RuntimeError(f"{env.CONTROLLER_URL.name} {url!r} is not an http(s) URL of the controller's API "
                               f"(e.g. {env.CONTROLLER_URL.default})")
        token = env.ADMIN_TOKEN.get()
        if not token and (path := env.ADMIN_TOKEN_FILE.get()):
            try:
                with open(path) as f:
                    token = f.read().strip()
            except OSError as e:  # (a RuntimeError: said in one line, where it was a traceback)
                raise RuntimeError(f"cannot read {env.ADMIN_TOKEN_FILE.name} {path}: {e.strerror or e}") from None
        if not token:
            raise RuntimeError("set TOKENPOOL_ADMIN_TOKEN (or TOKENPOOL_ADMIN_TOKEN_FILE): the controller's admin token")
        kubeconfig = (env.KUBECONFIG.get() or "").split(os.pathsep)[0] or None
        return cls(url, token, cls.resync_from_env(), kubeconfig)


RESYNC_S = OperatorConfig.resync_from_env()
FINALIZER = f"{GROUP}/finalizer"  # kopf's, on PooledModels and Tenants (their delete handlers); not on GPUPools
PLURALS = ("pooledmodels", "tenants", "gpupools")
# How often kopf looks again whether a deleted object's timer has exited. A timer round runs in a thread and cannot
# be stopped: an object deleted during one keeps its finalizer until kopf sees the round gone, and kopf's default
# (60 s) left the object Terminating a minute after its delete handler had finished. A round takes well under a
# second; each look that finds it still running costs one annotation patch.
TIMER_EXIT_POLL_S = 1.0
# How often the operator looks whether the controller restarted (one GET /health, whichever object's check asks
# first); each PooledModel and Tenant checks the answer this often (no call of its own).
RESTART_CHECK_S = 1.0
WATCH_TIMEOUT_S = 600  # the longest a watch request lasts (the API server's timeoutSeconds)


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    from controller.operator.kube import Kube

    cfg = OperatorConfig.from_env()
    memo.admin = AdminClient(cfg.controller_url, cfg.admin_token)
    memo.watch = ControllerWatch(memo.admin)
    memo.seen = {}  # uid -> the controller instance its restart check last saw (`_controller_restarted`)
    memo.models_version = [0]  # how many times the operator changed the controller's models (`_models_changed`)
    memo.tenant_models_seen = {}  # Tenant uid -> models_version when its last round read the models
    memo.pool_engines_seen = {}  # GPUPool uid -> the controller's engine count (/health) at its last round
    memo.kube = Kube(cfg.kubeconfig)
    # uid -> (generation, digest) last applied by this process: status may lag behind a duplicate event, and a
    # timer's snapshot of the object may be older than what an update handler just applied.
    memo.applied = {}
    # uid -> the name a PooledModel was registered under by this process: a rename reads the old name from
    # status.served, which lags when the spec changes before the create's status patch landed
    memo.served = {}
    memo.locks, memo.locks_guard = {}, threading.Lock()
    # Tenant uid -> the keys it asks for (fingerprints) and who it is: a key two Tenants ask for is the older one's
    # (`_claim_keys`). Made here: kopf hands each object a shallow copy of this memo, so only what exists now is shared.
    memo.key_claims = {}
    settings.persistence.finalizer = FINALIZER
    # Keep kopf's bookkeeping in annotations: the CRDs' status schemas hold only tokenpool's fields.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    # Warning events: a resource turning Degraded (_write_status) and kopf's own warnings and errors (a handler that
    # failed); kopf posts none of its log messages unless told to. (A resource turning Ready is a Normal event, which
    # _write_status posts itself: this level keeps kopf's own INFO lines, a handler's every success, off the objects.)
    settings.posting.level = logging.WARNING
    settings.posting.loggers = True
    for f in (_unposted_retries, _quiet_rounds):
        logging.getLogger("kopf.objects").addFilter(f)  # (once: a logger keeps a filter once)
    settings.background.cancellation_polling = TIMER_EXIT_POLL_S
    # A watch stream ends and reconnects (from the resourceVersion it reached) at least every 10 minutes: one that a
    # network device dropped silently left the operator blind to every change until it restarted (nolar/kopf#585;
    # kopf releases before its bookmark-based inactivity timeout, which pyproject's kopf>=1.38 allows).
    settings.watching.server_timeout = WATCH_TIMEOUT_S
    settings.watching.client_timeout = WATCH_TIMEOUT_S + 60
    settings.watching.connect_timeout = 30
    # Watch the given namespaces and the resources found at start: no cluster-wide CRD or namespace watching,
    # so the operator needs no ClusterRole (a newly installed CRD needs an operator restart).
    settings.scanning.disabled = True


class ControllerWatch:
    """The controller's /health of now (AdminClient.health: its instance, its engine count), asked RESTART_CHECK_S
    apart at most, whichever object's restart check asks (one thread asks; the others meanwhile take the answer
    before)."""

    def __init__(self, admin: AdminClient) -> None:
        self.admin, self.value, self.at = admin, None, -RESTART_CHECK_S
        self._asking = threading.Lock()

    def health(self) -> dict | None:
        if time.monotonic() - self.at >= RESTART_CHECK_S and self._asking.acquire(blocking=False):
            try:
                self.value = self.admin.health()
                self.at = time.monotonic()
            finally:
                self._asking.release()
        return self.value

    def instance(self) -> str | None:
        v = (self.health() or {}).get("instance")
        return v if isinstance(v, str) and v else None

    def engines(self) -> int | None:
        """The controller's live engines (/health's `engines`); None when it does not say."""
        n = (self.health() or {}).get("engines")
        return n if isinstance(n, int) and not isinstance(n, bool) else None


def _controller_restarted(memo: kopf.Memo, meta: dict) -> str | None:
    """The controller's new instance when it is not the one this object's check saw last (a restarted controller:
    it lost what the admin API made); None when it is (or the controller does not answer, or does not say). The
    first look only notes it (the resume handler reconciled the object at the operator's start)."""
    watch = getattr(memo, "watch", None)
    now = watch.instance() if watch is not None else None
    if now is None:
        return None
    with memo.locks_guard:
        if _deleted(meta["uid"]):  # (a round of a pool deleted while it asked: it notes nothing)
            return None
        before = memo.seen.setdefault(meta["uid"], now)
    return now if before != now else None


def _after_restart(round_: Any, what: str, meta: dict, memo: kopf.Memo, **kw: Any) -> bool:
    """Reconcile the object at once if the controller restarted since its check looked last; noted as seen only
    once the round went through (a controller that does not answer yet raises: looked at again). Whether it did."""
    now = _controller_restarted(memo, meta)
    if now is None:
        return False
    log.info("the controller restarted (instance %s): reconciling %s %s again", now, what, kw.get("name"))
    round_(meta=meta, memo=memo, **kw)
    with memo.locks_guard:
        if not _deleted(meta["uid"]):
            memo.seen[meta["uid"]] = now
    return True


def _models_version(memo: kopf.Memo) -> list[int]:
    """[how many times this operator added, removed or changed a model of the controller] (shared by every object's
    copy of the memo: made by `startup`, here for a memo made otherwise, as tests do)."""
    with memo.locks_guard:
        return memo.setdefault("models_version", [0])


def _models_changed(memo: kopf.Memo) -> None:
    """A model of the controller was added, removed or changed (its aliases): a Tenant naming models looks again
    whether they match (`tenant_after_restart`), within RESTART_CHECK_S, not at its next timer round."""
    v = _models_version(memo)
    with memo.locks_guard:
        v[0] += 1


def _note(memo: kopf.Memo, table: str, uid: str, value: Any) -> None:
    with memo.locks_guard:
        if not _deleted(uid):
            memo.setdefault(table, {})[uid] = value


def _noted(memo: kopf.Memo, table: str, uid: str) -> Any:
    with memo.locks_guard:
        return memo.setdefault(table, {}).get(uid)


# What the retries the handlers ask for wait on (kopf.TemporaryError's message begins so). kopf logs every retry
# ("Handler 'x' failed temporarily: ...") at ERROR, which settings.posting makes a Kubernetes event, and kopf does not
# aggregate events: `kubectl describe` showed one a second while a model drained, and one every 5 s per object while
# the controller was down. What they wait on is in the object's status already (and, Degraded, in the one Warning
# event _write_status posts): these retries stay in the operator's log only.
_RETRIES_REPORTED = ("controller unavailable: ", "controller refused: ", "applying the worker DaemonSet: ", "draining ")


def _unposted_retries(record: logging.LogRecord) -> bool:
    """A filter of kopf's object logger: a retry of `_RETRIES_REPORTED` is not posted as an event (kopf's
    `k8s_skip`, which its own local-only messages carry); every record is still logged."""
    msg = record.getMessage()
    if any(f" failed temporarily: {p}" in msg for p in _RETRIES_REPORTED):
        record.k8s_skip = True
    return True


def _quiet_rounds(record: logging.LogRecord) -> bool:
    """A filter of kopf's object logger: its line for every timer round that went well ("Timer 'resync_model'
    succeeded.", every 30 s for each object) is DEBUG, not INFO: a converged operator's log stays quiet (as its admin
    calls do), and `--verbose` still shows them. So is `pool_event`'s, invoked for every event of every pool."""
    msg = record.getMessage()
    if record.levelno == logging.INFO and msg.endswith("succeeded.") and ("Timer '" in msg or "'pool_event'" in msg):
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
    return True


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """The pod's service account, else the KUBECONFIG of now (kopf's default login goes through the client
    library, which fixed its kubeconfig path when first imported)."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


def _lock(memo: kopf.Memo, uid: str) -> threading.Lock:
    """One lock per object: its timer and its change handlers run in different threads. (A deleted pool's round
    gets one of its own, kept nowhere: `_deleted`.)"""
    with memo.locks_guard:
        return memo.locks.setdefault(uid, threading.Lock()) if not _deleted(uid) else threading.Lock()


# What this process keeps per object (by uid), in the memo's tables
_PER_OBJECT = ("applied", "served", "seen", "key_claims", "tenant_models_seen", "pool_engines_seen", "locks")


# A GPUPool's uid once its DELETED event came, and when (monotonic): a round of it still under way then (rounds run in
# threads: one waiting on its lock, or past it, writing its restart check's `seen` after it) must not note it again,
# which `_forget` had dropped: a memo entry per deleted pool kept for good. Remembered DELETED_KEEP_S (far longer
# than a round: its admin calls time out); uids are never reused.
DELETED_KEEP_S = 3600.0
_DELETED: dict[str, float] = {}
_DELETED_LOCK = threading.Lock()  # (innermost: taken under memo.locks_guard and _WARNED_LOCK, nothing under it)


def _deleted(uid: str | None) -> bool:
    """Whether `uid` is a pool deleted (`pool_event`): nothing is noted of it any more."""
    with _DELETED_LOCK:
        return uid in _DELETED


def _mark_deleted(uid: str) -> None:
    now = time.monotonic()
    with _DELETED_LOCK:
        for u in [u for u, t in _DELETED.items() if now - t > DELETED_KEEP_S]:
            del _DELETED[u]
        _DELETED[uid] = now


def _forget(memo: kopf.Memo, uid: str) -> None:
    """Drop what this process keeps of an object that is gone (its lock too: the caller may hold it, and a round
    that waits on it holds its own reference), its events' memory (`_WARNED`, `_TOLD_READY`, `_POSTED`, `_UNTOLD`)
    and the status it last wrote (`_STATUS`). They were kept for ever: a small leak per object deleted, GPUPools' for
    good (they have no delete handler)."""
    with memo.locks_guard:
        for table in _PER_OBJECT:
            t = memo.get(table)
            if isinstance(t, dict):
                t.pop(uid, None)
    with _WARNED_LOCK:
        _WARNED.pop(uid, None)
        _TOLD_READY.discard(uid)
        _POSTED.pop(uid, None)
        _UNTOLD.pop(uid, None)
        _STATUS.pop(uid, None)


def _stale(memo: kopf.Memo, meta: dict) -> bool:
    """Whether this invocation's object is older than one already applied (a timer that waited on the lock)."""
    last = memo.applied.get(meta["uid"])
    gen = meta.get("generation")
    return last is not None and last[0] is not None and gen is not None and gen < last[0]


def _applied(memo: kopf.Memo, meta: dict) -> str | None:
    last = memo.applied.get(meta["uid"])
    return last[1] if last else None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _admin_failed(body: Any, patch, status, gen, e: Exception, fields: dict | None = None) -> None:
    """The controller refused a change (Degraded, Rejected: the next change of the object tries again), refused the
    operator's admin token (Degraded, Unauthorized: the timer tries again) or could not be reached (Degraded,
    ControllerUnavailable: raised for kopf to retry). `fields`: what the round saw all the same (of the cluster)."""
    if isinstance(e, AdminUnavailable):
        _write_status(body, patch, status, fields or {}, "Degraded", "ControllerUnavailable", str(e), gen)
        raise _unavailable(e) from e
    _write_status(body, patch, status, fields or {}, "Degraded", _refusal(e), str(e), gen)


def _refusal(e: Exception) -> str:
    """The reason of a status condition for the controller refusing a call."""
    return "Unauthorized" if isinstance(e, AdminUnauthorized) else "Rejected"


_WARNED: dict[str | None, str] = {}  # uid -> the reason of the Warning event posted for it while it stays Degraded
_TOLD_READY: set[str | None] = set()  # uids whose last status written here was Ready (its Normal event posted)
_WARNED_LOCK = threading.Lock()
# An event about a resource that repeats one of the same type, reason and message posted for it less than
# EVENT_REPEAT_S ago is not posted: counted, and said by the next one posted ("(5 more times since the last such
# event, not posted)"), or, where the resource stays in the state that event told, by its first round past the window.
# kopf.event creates an Event object each time (kopf aggregates none, and the operator's Role may only create events:
# it cannot bump an Event's count), where client-go's recorder counts a repeat on the event before it (`kubectl
# describe`: "x12 over 10m"): a model flapping between Progressing and Ready (evicted and loaded again) showed a
# "Normal Serving" line per return, and one whose controller came and went a Warning and a Normal per flip. The first
# of each is posted (the first Degraded, the first recovery from it), and the state it stays in is told within the
# window (a flapping resource left Degraded showed a recovery as its last event). Its status conditions follow every
# flip. 10 minutes: client-go's window for similar events (its EventAggregator's).
EVENT_REPEAT_S = 600.0
# uid -> {(type, reason, message): [when last posted (monotonic), repeats since, not posted]}
_POSTED: dict[str | None, dict[tuple[str, str, str], list]] = {}
# uid -> (its state and reason now, the event that told its turn to them) where that event was not posted
_UNTOLD: dict[str | None, tuple[tuple[str, str], tuple[str, str, str]]] = {}

# What a round observes of the controller and the cluster, in the status of each kind (PooledModel, GPUPool, Tenant:
# distinct names). A Degraded round that did not observe one clears it (null: removed): a model whose controller went
# away still said `ready: true` on 2 replicas (the scale subresource's, which an HPA reads), a pool its old engine
# count, a tenant its keys, as long as it stayed Degraded. Removed, not false or 0: unknown is what the round knows
# (`ready: false`, `replicas: 0` would tell an HPA and `kubectl get` an empty model that may well still serve, as after
# an InvalidSpec edit); the condition says why. Kept: the operator's own bookkeeping (served, appliedDigest,
# selector) and what the round saw all the same (a pool's nodes and GPUs, of its DaemonSet).
OBSERVED = ("registered", "engines", "replicas", "ready", "attainment", "nodes", "gpus", "enginesReady", "keys")
# uid -> the status as this process last wrote it (the snapshot it wrote on, its patch merged). A round's `status` is
# the object as the watch last showed it, which can be older than this process's last write: kopf applies a round's
# patch after its handler returned (the object's lock released), and its watch event comes later still, so the round
# that took the lock next decided on the status from before. It cleared only the observed fields that old snapshot
# held (a model turned Degraded just after Serving kept `ready: true`, its engines and replicas), or wrote nothing
# where its Degraded equalled the snapshot's (the object stayed Ready, Serving), until a later round. A round writes
# whatever differs from either (a patch that did not land is written again), and builds its conditions on this.
_STATUS: dict[str, dict] = {}


def _write_status(body: Any, patch: kopf.Patch, status: dict, fields: dict, state: str, reason: str, message: str,
                  generation: int | None) -> None:
    """Patch status only where it differs (a converged object gets no write). Turning Degraded (or Degraded for
    another reason) is also a Warning event on the object `body` (what `kubectl describe` shows), with the
    condition's reason: once, not again while it stays so. Turning Ready (the first time, or back from Degraded or
    Progressing) is a Normal event, once: not per round while it stays Ready, nor at an operator's restart (its
    status said Ready already). Either is held back where it repeats one posted within EVENT_REPEAT_S (a resource
    flapping: `_tell`)."""
    was = next(((c.get("type"), c.get("reason")) for c in status.get("conditions") or [] if c.get("status") == "True"),
               None)
    uid = (body or {}).get("metadata", {}).get("uid")
    with _WARNED_LOCK:  # (and not again for a snapshot whose status lags: a timer's, a replayed event's)
        told = _WARNED.pop(uid, None)
        told_ready = uid in _TOLD_READY
        _TOLD_READY.discard(uid)
        if not _deleted(uid):  # (a deleted pool's round: nothing kept of it)
            if state == "Degraded":
                _WARNED[uid] = reason
            elif state == "Ready":
                _TOLD_READY.add(uid)
    kind, name = (body or {}).get("kind", "?"), (body or {}).get("metadata", {}).get("name")
    event = None  # (type, reason, message): what tells this round's turn, if it is one
    if state == "Degraded" and was != (state, reason) and told != reason:
        log.warning("%s/%s: %s: %s", kind, name, reason, message)
        event = ("Warning", reason, message)
    # (Degraded here last: told, also where the snapshot's status lags and still says Ready)
    if state == "Ready" and not told_ready and ((was or ("",))[0] != "Ready" or told is not None):
        before = told or (was[1] if was and was[0] == "Degraded" else None)
        said = f"{message} (no longer Degraded: {before})" if before else message
        log.info("%s/%s: Ready: %s: %s", kind, name, reason, said)
        event = ("Normal", reason, said)
    _tell(body, uid, (state, reason), event)
    with _WARNED_LOCK:
        wrote = _STATUS.get(uid)
    last = wrote if wrote is not None else status  # (an operator's first write: the snapshot is all it knows)
    if state == "Degraded":
        fields = dict.fromkeys((k for k in OBSERVED if k in status or k in last), None) | fields
    new = dict(fields, conditions=b.build_conditions(state, reason, message, generation, last.get("conditions"),
                                                     _now()))
    if generation is not None:  # this generation was seen, also when it could not be applied (InvalidSpec...):
        new.setdefault("observedGeneration", generation)  # kstatus (Argo CD, Flux) holds a lagging one in progress
    for k, v in new.items():
        if status.get(k) != v or last.get(k) != v:
            patch.status[k] = v
    with _WARNED_LOCK:
        if uid is not None and not _deleted(uid):  # (a deleted pool's round: nothing kept of it; no body: no object)
            _STATUS[uid] = {k: v for k, v in {**last, **patch.status}.items() if v is not None}


def _tell(body: Any, uid: str | None, state: tuple[str, str], event: tuple[str, str, str] | None) -> None:
    """Post `event` (type, reason, message), the turn of the resource `body` to `state` (its state and reason), unless
    it repeats one posted less than EVENT_REPEAT_S ago (counted: said by the next one posted). With no event (a round
    that turned nothing), the one held back of its turn to `state`, once the window has passed: it stayed so."""
    now = time.monotonic()
    with _WARNED_LOCK:
        untold = _UNTOLD.pop(uid, None)
        turn = event is not None
        if not turn:
            if untold is None or untold[0] != state:  # (none held back, or it told another state: dropped)
                return
            event = untold[1]
        posted = _POSTED.setdefault(uid, {}) if not _deleted(uid) else {}  # (a deleted pool's round: nothing kept)
        last = posted.get(event)
        if last is not None and now - last[0] < EVENT_REPEAT_S:
            if turn:  # (counted once: not again by each round after it, while it stays so)
                last[1] += 1
            if not _deleted(uid):
                _UNTOLD[uid] = (state, event)
            return
        repeats = last[1] if last is not None else 0
        for k in [k for k, (at, n) in posted.items() if not n and now - at >= EVENT_REPEAT_S]:
            del posted[k]  # (past the window, nothing to say: as if never posted)
        posted[event] = [now, 0]
    kind, reason, message = event
    if repeats:
        message = f"{message} ({repeats} more times since the last such event, not posted)"
    if body is not None:
        with contextlib.suppress(LookupError):  # (LookupError: called outside kopf, as tests do)
            if kind == "Warning":
                kopf.warn(body, reason=reason, message=message)
            else:  # (kopf.event: kopf.info posts nothing under `startup`'s level)
                kopf.event(body, type=kind, reason=reason, message=message)


def _api_message(e: ApiException) -> str:
    """The message of the Status object a refused Kubernetes API call answers with (else its body)."""
    try:
        return str(json.loads(e.body)["message"])
    except (TypeError, ValueError, KeyError):
        return str(e.body or "")[:300]


# How long a round or a change handler that could not reach the controller waits before kopf runs it again (a
# timer's next round too: its interval does not apply until a round went through).
UNAVAILABLE_RETRY_S = 5.0


def _unavailable(e: AdminUnavailable) -> kopf.TemporaryError:
    return kopf.TemporaryError(f"controller unavailable: {e}", delay=UNAVAILABLE_RETRY_S)


# --- GPUPool ---
def _without_finalizer(fn: Any) -> Any:
    """A timer of `fn` (registered by @kopf.timer below this) that puts no finalizer on its objects. kopf puts one on
    every object with a timer (`requires_finalizer=True`, fixed in @kopf.timer; its maintainer declined an option,
    nolar/kopf#896, #1183) so that it can stop the timer before the object is gone. A GPUPool has nothing to clean
    up (its DaemonSet goes by its owner reference), so its delete must not wait on the operator, nor stay
    Terminating while the operator is down. kopf itself then removes the finalizer an older operator put on a pool.
    The timer is stopped instead when the pool's DELETED event comes (`_pool_kept`); a round never touches a pool
    that is gone (`resync_pool`). Through kopf's registry (not public API): where a kopf release changed it, the
    pools keep kopf's finalizer (tests/test_k8s52_pool_finalizer.py fails)."""
    try:
        spawning = kopf.get_default_registry()._spawning
        spawning._handlers[:] = [dataclasses.replace(h, requires_finalizer=False) if h.fn is fn else h
                                 for h in spawning._handlers]
    except (AttributeError, TypeError) as e:
        log.warning("GPUPools keep kopf's finalizer (this kopf's registry is not as expected: %r)", e)
    return fn


def _pool_kept(meta: dict, pool_names: Any = None, **_: Any) -> bool:
    """The pool timer's filter: false once the pool's DELETED event came, which takes it out of kopf's index of the
    pools before kopf matches the timers of that event (and kopf stops a timer whose filter stops matching)."""
    return any(c[3] == meta.get("uid") for c in (pool_names or {}).get(meta.get("name")) or [])


@_without_finalizer
@kopf.timer(GROUP, VERSION, "gpupools", interval=RESYNC_S, initial_delay=RESYNC_S, when=_pool_kept)
def resync_pool(name: str, namespace: str, meta: dict, memo: kopf.Memo, **kw: Any) -> None:
    """The pool's periodic round: only while it still exists (a DELETED event that a watch's restart lost would
    leave the timer running: it must not make the workers of a deleted pool again)."""
    current = memo.kube.pool(namespace, name)
    if current is None or (current.get("metadata") or {}).get("uid") != meta["uid"]:
        return
    reconcile_pool(name=name, namespace=namespace, meta=meta, memo=memo, **kw)


@_without_finalizer
@kopf.timer(GROUP, VERSION, "gpupools", interval=RESTART_CHECK_S, initial_delay=RESTART_CHECK_S, when=_pool_kept)
def pool_after_restart(meta: dict, memo: kopf.Memo, **kw: Any) -> None:
    """The pool's status (`enginesReady`, Ready) follows the controller's engines within RESTART_CHECK_S: a round at
    once when the controller restarted (its engines are gone; the workers join it again), or when its engine count
    (/health's `engines`, asked by the restart check anyway) is not the one the pool's last round saw (a worker joined
    or left). It was refreshed only at the next timer round, up to RESYNC_S later."""
    if _after_restart(resync_pool, "GPUPool", meta=meta, memo=memo, **kw):
        return
    watch = getattr(memo, "watch", None)
    now = watch.engines() if watch is not None else None
    before = _noted(memo, "pool_engines_seen", meta["uid"])
    if now is not None and before is not None and now != before:
        resync_pool(meta=meta, memo=memo, **kw)


@kopf.on.event(GROUP, VERSION, "gpupools")
def pool_event(event: dict, meta: dict, memo: kopf.Memo, **_: Any) -> None:
    """A GPUPool's DELETED event: what this process kept of it goes (`_forget`), after any round of it under way
    (its lock). A pool has no delete handler (`_without_finalizer`), and its memo stayed for good. (A watching
    handler: kopf puts no finalizer on its objects.)"""
    uid = meta.get("uid")
    if event.get("type") != "DELETED" or not uid:
        return
    with _lock(memo, uid):
        _mark_deleted(uid)  # (before the forget: a round under way, past its lock or waiting on it, notes nothing)
        _forget(memo, uid)


@kopf.on.resume(GROUP, VERSION, "gpupools")
@kopf.on.create(GROUP, VERSION, "gpupools")
@kopf.on.update(GROUP, VERSION, "gpupools", field="spec")
def reconcile_pool(name: str, namespace: str, spec: dict, status: dict, meta: dict, body: kopf.Body,
                   patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    gen = meta.get("generation")
    with _lock(memo, meta["uid"]):
        if _stale(memo, meta) or _deleted(meta["uid"]):  # (deleted: a round that waited on the delete's forget)
            return
        watch = getattr(memo, "watch", None)  # (the engine count the restart check compares with: read before the
        seen = watch.engines() if watch is not None else None  # engines are, noted once they were)
        ds = b.build_worker_daemonset(name, namespace, dict(spec))
        kopf.adopt(ds, owner=body)  # deleting the pool deletes its workers
        try:
            current = memo.kube.apply_daemonset(ds)
        except ApiException as e:
            why = f"{e.status} {e.reason}: {_api_message(e)}"  # the API server's why (422: which field, and why)
            _write_status(body, patch, status, {}, "Degraded", "WorkersNotApplied", f"DaemonSet: {why}", gen)
            raise kopf.TemporaryError(f"applying the worker DaemonSet: {why}", delay=10) from e
        memo.applied[meta["uid"]] = (gen, ds["metadata"]["annotations"][b.ANNOTATION_DIGEST])
        # The workers' join token comes from a Secret: without it (or its key) a worker pod cannot start
        # (CreateContainerConfigError), which the pool would otherwise show only as "no engine has joined yet".
        tok = b.with_defaults(dict(spec), b.POOL_DEFAULTS)["joinTokenSecretRef"]
        token = memo.kube.secret_data(namespace, tok["name"])
        no_token = (f"no Secret {tok['name']!r}" if token is None else
                    f"Secret {tok['name']!r} has no key {tok['key']!r}" if tok["key"] not in token else None)
        try:
            engines = memo.admin.engines()
        except (AdminError, AdminUnavailable) as e:  # (its nodes, of the DaemonSet, are seen all the same)
            seen_nodes = b.build_pool_status([], current, dict(spec), gen)
            _admin_failed(body, patch, status, gen, e, {k: seen_nodes[k] for k in ("nodes", "gpus")})
            return
        if seen is not None:
            _note(memo, "pool_engines_seen", meta["uid"], seen)
        st = b.build_pool_status(engines, current, dict(spec), gen)
        if no_token:
            _write_status(body, patch, status, st, "Degraded", "JoinTokenNotFound", f"{no_token}: worker pods cannot "
                          "start (joinTokenSecretRef)", gen)
        elif st["enginesReady"]:
            _write_status(body, patch, status, st, "Ready", "EnginesReady", f"{st['enginesReady']} engine(s) ready", gen)
        else:
            # (its worker pods say why they are not ready, when the DaemonSet counts some that are not)
            pods = memo.kube.worker_pods(namespace, name) if b.workers_not_ready(current) else None
            _write_status(body, patch, status, st, *b.pool_waiting(current, dict(spec), pods), gen)


# --- PooledModel ---
def _drain_wait(admin: AdminClient, served: str, spec: dict, runtime: datetime.timedelta | None) -> int:
    """Requests of the model still running, 0 when it may go now: none left, or the drain timeout passed."""
    n = admin.inflight(served)
    timeout = b.with_defaults(spec, b.MODEL_DEFAULTS)["drainTimeoutSeconds"]
    if n and runtime is not None and runtime.total_seconds() >= timeout:
        log.warning("model %s: drain timeout (%ss) passed with %d requests in flight; removing it", served, timeout, n)
        return 0
    return n


@kopf.index(GROUP, VERSION, "pooledmodels")
def served_names(name: str, namespace: str, spec: dict, meta: dict, **_: Any) -> dict:
    """Which PooledModels ask for each served name. The controller has one namespace of model names, across all
    the namespaces the operator watches: the oldest PooledModel that asks for a name has it; the others are
    Degraded (NameConflict) and never touch it, neither while they exist nor when they are deleted."""
    return {b.served_name(name, dict(spec)): (meta.get("creationTimestamp") or "", namespace or "", name, meta["uid"])}


@kopf.index(GROUP, VERSION, "pooledmodels")
def model_names(name: str, namespace: str, spec: dict, meta: dict, **_: Any) -> dict:
    """Which PooledModels ask for each name a model answers to (a served name, an alias, a LoRA adapter's): the
    oldest has it (`_older_claim`), as for served names, whichever was registered first. Two PooledModels created
    at once, one's alias the other's name, were both registered by rounds that each saw the controller without the
    other: the one refused (409) said Rejected with the controller's words, and the name was whichever's won."""
    claim = (meta.get("creationTimestamp") or "", namespace or "", name, meta["uid"])
    served = b.served_name(name, dict(spec or {}))
    return {n: (*claim, what, served) for n, what in reversed(_asked_names(name, spec))}  # (its served name: kept)


def _asked_names(name: str, spec: dict) -> list[tuple[str, str]]:
    """(name, what it is) for each name the PooledModel asks to answer to, as its spec gives them (valid or not)."""
    spec = spec or {}
    return [(b.served_name(name, dict(spec)), "model name"),
            *((a, "alias") for a in spec.get("aliases") or [] if isinstance(a, str)),
            *((lm.get("name"), "LoRA adapter name") for lm in spec.get("loraAdapters") or []
              if isinstance(lm, dict) and isinstance(lm.get("name"), str))]


_THEIRS = {"model name": "the name", "alias": "an alias", "LoRA adapter name": "the name of a LoRA adapter"}
_NAME_FIX = {"model name": "set another servedName", "alias": "set other aliases",
             "LoRA adapter name": "rename the adapter"}


def _older_claim(model_names: Any, name: str, spec: dict, meta: dict) -> str | None:
    """Why a name the PooledModel asks for is another's: an older PooledModel asks for it too (`model_names`)."""
    me = (meta.get("creationTimestamp") or "", meta.get("namespace") or "", name, meta["uid"])
    for n, what in _asked_names(name, spec):
        claims = [c for c in (model_names or {}).get(n) or [] if c[3] != meta["uid"] and c[:4] < me]
        if claims:
            owner = min(claims)
            return (f"{what} {n!r} is already {_THEIRS[owner[4]]} of model {owner[5]!r} (PooledModel "
                    f"{owner[1]}/{owner[2]}); {_NAME_FIX[what]}")  # (as `_names_clash` says it)
    return None


def _name_owner(served_names: Any, served: str) -> tuple | None:
    """(creationTimestamp, namespace, name, uid) of the PooledModel that has `served`; None when none asks."""
    claims = list((served_names or {}).get(served) or [])
    return min(claims) if claims else None


@kopf.on.resume(GROUP, VERSION, "pooledmodels")
@kopf.on.create(GROUP, VERSION, "pooledmodels")
@kopf.on.update(GROUP, VERSION, "pooledmodels", field="spec")
def reconcile_model(runtime: datetime.timedelta, **kw: Any) -> None:
    _reconcile_model(runtime=runtime, **kw)


@kopf.timer(GROUP, VERSION, "pooledmodels", interval=RESYNC_S, initial_delay=RESYNC_S)
def resync_model(runtime: datetime.timedelta, **kw: Any) -> None:
    _reconcile_model(runtime=None, **kw)  # a timer round never waits for a drain: the change handler does


@kopf.timer(GROUP, VERSION, "pooledmodels", interval=RESTART_CHECK_S, initial_delay=RESTART_CHECK_S)
def model_after_restart(runtime: datetime.timedelta, **kw: Any) -> None:
    """A restarted controller gets the model back at once; and a model waiting for its pool (PoolNotFound) is
    reconciled within RESTART_CHECK_S of the pool's appearing (in kopf's index of the pools), not at its next timer
    round: a PooledModel applied before its GPUPool (another file, another Argo CD wave) said PoolNotFound, and was
    served nowhere, up to RESYNC_S after the pool was there. So is one waiting for a newer PooledModel to let a name
    go (WaitingForName), and one an older PooledModel asks a name of (`_older_claim`) that does not say NameConflict
    yet: it lets the name go (two created at once: each one's first round may have run before the other was seen)."""
    if _after_restart(_reconcile_model, "PooledModel", runtime=None, **kw):
        return
    spec, status = kw.get("spec") or {}, kw.get("status") or {}
    reason = next((c.get("reason") for c in status.get("conditions") or [] if c.get("status") == "True"), None)
    if (_pool_arrived(spec, status, kw.get("namespace"), kw.get("pool_names")) or reason == "WaitingForName"
            or (reason != "NameConflict" and _older_claim(kw.get("model_names"), kw["name"], spec, kw["meta"]))):
        _reconcile_model(runtime=None, **kw)


def _pool_arrived(spec: dict, status: dict, namespace: str | None, pool_names: Any) -> bool:
    """Whether the model's status says PoolNotFound while kopf's index of the pools (`pool_names`) has that pool
    in its namespace now. (No I/O: asked every RESTART_CHECK_S.)"""
    waiting = any(c.get("status") == "True" and c.get("reason") == "PoolNotFound"
                  for c in status.get("conditions") or [])
    pool = b.with_defaults(dict(spec), b.MODEL_DEFAULTS)["poolRef"]
    return waiting and any(c[1] == (namespace or "") for c in (pool_names or {}).get(pool) or [])


def _reconcile_model(name: str, namespace: str, spec: dict, status: dict, meta: dict, patch: kopf.Patch,
                     memo: kopf.Memo, runtime: datetime.timedelta | None, served_names: Any = None,
                     model_names: Any = None, body: Any = None, **_: Any) -> None:
    gen, spec = meta.get("generation"), dict(spec)
    with _lock(memo, meta["uid"]):
        if meta.get("deletionTimestamp") or _stale(memo, meta):
            return  # a timer round racing the finalizer or an update must not undo what they did
        try:
            desired = b.build_model_spec(name, spec)
        except ValueError as e:
            _write_status(body, patch, status, {}, "Degraded", "InvalidSpec", str(e), gen)
            return  # nothing to retry until the spec changes
        owner = _name_owner(served_names, desired["name"])
        if owner is not None and owner[3] != meta["uid"]:
            _write_status(body, patch, status, {}, "Degraded", "NameConflict", f"model name {desired['name']!r} is "
                          f"PooledModel {owner[1]}/{owner[2]}'s (older); set another servedName", gen)
            return  # the timer looks again (the other one may go)
        if taken := _older_claim(model_names, name, spec, meta):
            try:  # (registered by a round that did not see the older one yet: it lets the name go)
                if _let_go(memo, name, spec, status, meta, served_names, runtime, body, patch, gen):
                    return
            except (AdminError, AdminUnavailable) as e:
                _admin_failed(body, patch, status, gen, e)
                return
            _write_status(body, patch, status, {}, "Degraded", "NameConflict", taken, gen)
            return  # the timer looks again (the other one may go)
        pool = b.with_defaults(spec, b.MODEL_DEFAULTS)["poolRef"]
        if memo.kube.pool(namespace, pool) is None:
            _write_status(body, patch, status, {}, "Degraded", "PoolNotFound", f"no GPUPool {pool!r} in {namespace}",
                          gen)
            return  # the timer looks again
        want = b.reload_digest(desired)  # (what a PATCH changes in place is compared as the controller shows it)
        try:
            models = memo.admin.models.by_name()  # the one read of the controller's models this round
            if desired["name"] in _config_models(models):
                _write_status(body, patch, status, {}, "Degraded", "NameConflict", f"model name {desired['name']!r} is "
                              "served by the controller's own configuration; set another servedName", gen)
                return  # never replaced or removed by a PooledModel (the timer looks again)
            old = memo.served.get(meta["uid"]) or status.get("served")
            old_owner = _name_owner(served_names, old) if old else None
            mine = {desired["name"]} | ({old} if old and (old_owner is None or old_owner[3] == meta["uid"]) else set())
            if clash := _names_clash(desired, models, mine, served_names, model_names):
                _clash_status(body, patch, status, gen, clash)
                return  # the controller would refuse it (409: Rejected, not naming the other); the timer looks again
            if (old and old != desired["name"] and (old_owner is None or old_owner[3] == meta["uid"])
                    and old in models):  # renamed (servedName changed); not to another's name
                if _refused(memo, desired, old, models[old], body, patch, status, spec, gen):
                    return
                n = _drain_wait(memo.admin, old, spec, runtime)
                if n:
                    _write_status(body, patch, status, {}, "Progressing", "Draining",
                                  f"{n} requests in flight on {old!r}", gen)
                    if runtime is None:
                        return
                    raise kopf.TemporaryError(f"draining {n} requests of {old!r} before the rename", delay=1)
                memo.admin.models.remove(old)
                _models_changed(memo)
            actual = models.get(desired["name"])  # (removing `old` leaves another name's entry as it was)
            known = _applied(memo, meta) or status.get("appliedDigest")
            if actual is not None and (b.model_reloads(desired, actual) or not b.same_registration(desired, known)):
                # Not changeable in place (path, engine options, adapters): re-register, after the requests in
                # flight finish. (The pin is: below.)
                if _refused(memo, desired, desired["name"], actual, body, patch, status, spec, gen):
                    return
                n = _drain_wait(memo.admin, desired["name"], spec, runtime)
                if n:
                    _write_status(body, patch, status, {}, "Progressing", "Draining",
                                  f"{n} requests in flight before the change", gen)
                    if runtime is None:
                        return
                    raise kopf.TemporaryError(f"draining {n} requests before re-registering", delay=1)
                memo.admin.models.remove(desired["name"])
                _models_changed(memo)
                actual = None
            if actual is None:
                try:
                    actual = memo.admin.models.add(desired)
                except AdminError as e:  # (another PooledModel's round took a name since the read: said as such)
                    if isinstance(e, AdminUnauthorized) or not (clash := _clash_since(memo, desired, mine, served_names,
                                                                                       model_names)):
                        raise
                    _clash_status(body, patch, status, gen, clash)
                    return
                _models_changed(memo)
            else:  # the pin, SLO, priority, replica bounds: changed in place, nothing unloaded
                if b.pin_differs(desired, actual):
                    memo.admin.set_pin(desired["name"], desired["pin"])
                    actual = dict(actual, pin=desired["pin"])
                if not b.model_matches(desired, actual):
                    actual = memo.admin.models.update(desired["name"], b.live_fields(desired))
                    _models_changed(memo)  # (its aliases)
            memo.applied[meta["uid"]] = (gen, want)
            memo.served[meta["uid"]] = desired["name"]
        except (AdminError, AdminUnavailable) as e:
            _admin_failed(body, patch, status, gen, e)
            return
        st = dict(b.build_model_status(actual, spec, gen), appliedDigest=want, served=desired["name"])
        if st["ready"] and not st["replicas"]:  # replicas.min 0: the next request places it (KServe's minReplicas 0)
            _write_status(body, patch, status, st, "Ready", "ScaledToZero", "registered, on no engine: the next "
                          "request loads it", gen)
        elif st["ready"]:
            _write_status(body, patch, status, st, "Ready", "Serving", f"on {st['replicas']} engine(s)", gen)
        elif actual.get("load_error"):  # no engine could load it (a wrong path, too big...): it waits in vain
            _write_status(body, patch, status, st, "Degraded", "LoadFailed", f"registered, but its last load failed: "
                          f"{actual['load_error']}", gen)
        else:
            _write_status(body, patch, status, st, "Progressing", "Loading", "registered; waiting for an engine", gen)


def _let_go(memo: kopf.Memo, name: str, spec: dict, status: dict, meta: dict, served_names: Any,
            runtime: datetime.timedelta | None, body: Any, patch: kopf.Patch, gen: int | None) -> bool:
    """Remove the model this PooledModel registered (a name of it an older PooledModel asks for: that one has it),
    after its requests in flight, as a rename does. Whether it is still draining (said in its status)."""
    models = memo.admin.models.by_name()
    registered = {status.get("served"), memo.served.get(meta["uid"])} - {None} - _config_models(models)
    for served in sorted(n for n in _model_names(name, spec, status, meta, memo, served_names) & registered
                         if n in models):
        n = _drain_wait(memo.admin, served, dict(spec), runtime)
        if n:
            _write_status(body, patch, status, {}, "Progressing", "Draining", f"{n} requests in flight on {served!r}, "
                          "which lets its names go to an older PooledModel", gen)
            if runtime is None:
                return True
            raise kopf.TemporaryError(f"draining {n} requests of {served!r} before it lets its names go", delay=1)
        memo.admin.models.remove(served)
        _models_changed(memo)
    return False


def _clash_since(memo: kopf.Memo, desired: dict, mine: set[str], served_names: Any,
                 model_names: Any) -> tuple[str, bool] | None:
    """Why the controller refused to register `desired` where the round's read saw its names free: a round of
    another PooledModel, which did not see this one yet, registered one of them since (`_names_clash`; its own
    served name: this one, the older, takes it over, as it does a model registered under it before)."""
    models = memo.admin.models.by_name()
    if desired["name"] in models:
        return (f"model name {desired['name']!r} was registered meanwhile (by a round of a newer PooledModel that had "
                "not seen this one yet); taking it over", True)
    return _names_clash(desired, models, mine, served_names, model_names)


def _clash_status(body: Any, patch: kopf.Patch, status: dict, gen: int | None, clash: tuple[str, bool]) -> None:
    """A name clash (`_names_clash`): NameConflict, or, where a newer PooledModel has the name and lets it go,
    Progressing WaitingForName (`model_after_restart` looks again each RESTART_CHECK_S)."""
    message, yields = clash
    if yields:
        _write_status(body, patch, status, {}, "Progressing", "WaitingForName", message, gen)
    else:
        _write_status(body, patch, status, {}, "Degraded", "NameConflict", message, gen)


def _refused(memo: kopf.Memo, desired: dict, old: str, actual: dict, body: Any, patch: kopf.Patch, status: dict,
             spec: dict, gen: int | None) -> bool:
    """Whether the controller would refuse `desired` in place of model `old` (`actual`, its entry), asked before the
    operator drains and removes `old` for it: then the PooledModel is Degraded (Rejected) and `old` serves on, as it
    is observed. A change it refused (a wrong path) was found only once `old` was gone: the model was down until its
    spec was fixed."""
    try:
        memo.admin.models.check(desired, old)
    except AdminError as e:
        if isinstance(e, AdminUnauthorized):
            raise
        _write_status(body, patch, status, b.build_model_status(actual, spec, gen), "Degraded", "Rejected",
                      f"{e}; still serving its last applied spec", gen)
        return True  # the next change, or a timer round, asks again (the path may appear)
    return False


def _names_clash(desired: dict, models: dict[str, dict], mine: set[str], served_names: Any,
                 model_names: Any = None) -> tuple[str, bool] | None:
    """Why the controller would refuse the names `desired` answers to (its name, aliases and LoRA adapters'): one is
    already another model's (its name, an alias or an adapter's), saying which model has it; None when none is.
    `models`: what `GET /admin/models` answered (by name); `mine`: this PooledModel's own entries there. With it,
    whether that model lets the name go: a newer PooledModel's (in `model_names`), which an older one asking for the
    name makes give it up (`_older_claim`; the caller checked that none older asks for these names). A clash with a
    model that keeps the name is said first."""
    ours = [(desired["name"], "model name"), *((a, "alias") for a in desired.get("aliases") or []),
            *((lm["name"], "LoRA adapter name") for lm in desired.get("lora_modules") or [])]
    found = []
    for other, m in sorted(models.items()):
        if other in mine:
            continue
        theirs = {other: "the name", **{a: "an alias" for a in m.get("aliases") or []},
                  **{lm.get("name"): "the name of a LoRA adapter" for lm in m.get("lora_modules") or []}}
        for n, what in ours:
            if n in theirs:
                owner = _name_owner(served_names, other)
                whose = (f"PooledModel {owner[1]}/{owner[2]}" if owner is not None else "the controller's own "
                         "configuration" if m.get("source") == "config" else "registered through the admin API")
                yields = owner is not None and any(c[3] == owner[3] for c in (model_names or {}).get(other) or [])
                # ("alias 'a' is already the name of model 'a' (PooledModel ns/a)": it said "model 'a''s")
                found.append((yields, f"{what} {n!r} is already {theirs[n]} of model {other!r} ({whose}"
                                      + (", newer: it lets the name go)" if yields else f"); {_NAME_FIX[what]}")))
    return next(((msg, y) for y, msg in found if not y), (found[0][1], True)) if found else None


def _config_models(models: dict[str, dict]) -> set[str]:
    """The controller's models from its own configuration (not the operator's to replace or remove), of what
    `GET /admin/models` answered (by name)."""
    return {n for n, m in models.items() if m.get("source") == "config"}


@kopf.on.delete(GROUP, VERSION, "pooledmodels")
def delete_model(name: str, spec: dict, status: dict, meta: dict, patch: kopf.Patch, memo: kopf.Memo,
                 runtime: datetime.timedelta, served_names: Any = None, body: Any = None, **_: Any) -> None:
    """The finalizer: drain the model (no new requests), let those in flight finish (up to
    spec.drainTimeoutSeconds), then remove it. Only names it has: not one an older PooledModel asks for."""
    names = _model_names(name, spec, status, meta, memo, served_names)
    with _lock(memo, meta["uid"]):
        try:
            # (a model of the controller's configuration is never this one's)
            names -= _config_models(memo.admin.models.by_name())
            for served in names:
                memo.admin.drain_model(served)  # idempotent: a retried finalizer drains again, harmlessly
            n = sum(_drain_wait(memo.admin, served, dict(spec), runtime) for served in names)
            if n:
                _write_status(body, patch, status, {}, "Progressing", "Draining", f"{n} requests in flight before removal",
                              meta.get("generation"))
                raise kopf.TemporaryError(f"draining {n} requests before removal", delay=1)
            for served in names:
                memo.admin.models.remove(served)
                _models_changed(memo)
            _forget(memo, meta["uid"])
        except (AdminError, AdminUnavailable) as e:
            _removal_failed(body, patch, status, meta, memo, e)


def _model_names(name: str, spec: dict, status: dict, meta: dict, memo: kopf.Memo, served_names: Any) -> set[str]:
    """The served names a PooledModel being deleted has in the controller (two, mid-rename); not one an older
    PooledModel asks for."""
    names = {b.served_name(name, dict(spec)), status.get("served"), memo.served.get(meta["uid"])} - {None}
    return {n for n in names if (owner := _name_owner(served_names, n)) is None or owner[3] == meta["uid"]}


# --- Tenant ---
@kopf.index(GROUP, VERSION, "tenants")
def tenant_names(name: str, namespace: str, meta: dict, **_: Any) -> dict:
    """Which Tenants ask for each tenant name: the controller has one namespace of tenant names across the
    namespaces the operator watches; the oldest Tenant of a name has it, the others are Degraded (NameConflict)."""
    return {name: (meta.get("creationTimestamp") or "", namespace or "", name, meta["uid"])}


def _tenant_conflict(tenants: dict[str, dict], name: str, meta: dict, tenant_names: Any) -> str | None:
    """Why a Tenant may not have its name in the controller (another, older Tenant has it, or the controller's own
    configuration does), or None. `tenants`: what `GET /admin/tenants` answered, by name."""
    owner = _name_owner(tenant_names, name)
    if owner is not None and owner[3] != meta["uid"]:
        return f"tenant name {name!r} is Tenant {owner[1]}/{owner[2]}'s (older); rename this one"
    if (tenants.get(name) or {}).get("source") == "config":
        return f"tenant {name!r} is the controller's own (its configuration); rename this one"
    return None


@kopf.on.resume(GROUP, VERSION, "tenants")
@kopf.on.create(GROUP, VERSION, "tenants")
@kopf.on.update(GROUP, VERSION, "tenants", field="spec")
@kopf.timer(GROUP, VERSION, "tenants", interval=RESYNC_S, initial_delay=RESYNC_S)
def reconcile_tenant(name: str, namespace: str, spec: dict, status: dict, meta: dict, patch: kopf.Patch,
                     memo: kopf.Memo, tenant_names: Any = None, body: Any = None, **_: Any) -> None:
    gen, spec = meta.get("generation"), dict(spec)
    with _lock(memo, meta["uid"]):
        if meta.get("deletionTimestamp") or _stale(memo, meta):
            return
        try:
            tenants = memo.admin.tenants.by_name()  # the one read of the controller's tenants this round
            conflict = _tenant_conflict(tenants, name, meta, tenant_names)
        except (AdminError, AdminUnavailable) as e:
            _admin_failed(body, patch, status, gen, e)
            return
        if conflict is not None:  # never added, replaced or revoked by this one (the timer looks again)
            _write_status(body, patch, status, {"keys": 0}, "Degraded", "NameConflict", conflict, gen)
            return
        ref = spec.get("keysSecretRef") or {}
        secret = ref.get("name", "")

        def revoke(reason: str, message: str) -> None:
            """No keys to be had: a tenant already made loses the ones it had (fail closed); the timer looks again."""
            try:
                if memo.admin.tenants.remove(name):
                    memo.applied.pop(meta["uid"], None)
            except (AdminError, AdminUnavailable) as e:
                _admin_failed(body, patch, status, gen, e)
                return
            _write_status(body, patch, status, {"keys": 0}, "Degraded", reason, message, gen)

        data = memo.kube.secret_data(namespace, secret)
        if data is None:
            _claim_keys(memo, meta, namespace, name, [])
            revoke("SecretNotFound", f"no Secret {secret!r}")
            return
        try:
            keys = b.secret_keys(data, ref.get("keys"))
            hashes = b.tenant_key_hashes(name, keys)
        except (KeyError, ValueError) as e:  # a data key it names is gone (a revoked key), or a value is not text
            _claim_keys(memo, meta, namespace, name, [])
            revoke("InvalidSecret", f"Secret {secret!r}: {e.args[0] if isinstance(e, KeyError) else e}")
            return
        # A key another (older) Tenant has too: the controller gives a request on it to whichever of the two it made
        # first, and the other's models and limits never apply to it. Not applied to this one.
        shared = _claim_keys(memo, meta, namespace, name, keys)
        conflict = None
        if shared:
            owners = sorted({f"{o[1]}/{o[2]}" for o in shared.values()})
            conflict = (f"{len(shared)} key(s) of Secret {secret!r} are also Tenant {', '.join(owners)}'s (older): not "
                        "applied to this one (a request on such a key would be that tenant's); give it keys of its own")
            hashes = b.tenant_key_hashes(name, [k for k in keys if _fingerprint(k) not in shared])
        if not hashes:  # (the controller would make a key of its own, which nobody is shown)
            if conflict:
                revoke("KeyConflict", conflict)
            else:
                revoke("NoKeys", f"Secret {secret!r} holds no key")
            return
        try:
            desired = b.build_tenant_create(name, spec, hashes)
        except ValueError as e:
            _write_status(body, patch, status, {}, "Degraded", "InvalidSpec", str(e), gen)
            return
        want = b.digest(desired)  # covers the key hashes, which the admin API does not show back
        _note(memo, "tenant_models_seen", meta["uid"], _models_version(memo)[0])  # (before the read)
        try:
            unmatched = _unmatched_models(memo.admin.models.by_name(), desired["models"])
            actual = tenants.get(name)
            known = _applied(memo, meta) or status.get("appliedDigest")
            if actual is not None and (not b.tenant_matches(desired, actual) or known != want):
                live = b.tenant_live_fields(desired)  # changed in place: its usage and requests in flight carry over
                if not b.tenant_keys_unchanged(desired, actual, known):  # a rotation in place: the keys kept keep
                    live["key_hashes"] = desired["key_hashes"]  # working, a dropped key's requests end
                memo.admin.tenants.update(name, live)
            if actual is None:
                actual = memo.admin.tenants.add(desired)
            memo.applied[meta["uid"]] = (gen, want)
            memo.served[meta["uid"]] = desired["name"]
        except (AdminError, AdminUnavailable) as e:
            _admin_failed(body, patch, status, gen, e)
            return
        # Its keys work either way; a pattern that matches no model (a typo, or a PooledModel not registered yet) is
        # said where `kubectl get tenants` shows it (it showed Applied, and the tenant's requests for it were 404s).
        reason, message = "Applied", f"{len(hashes)} key(s)"
        fields = {"observedGeneration": gen, "keys": len(hashes), "appliedDigest": want}
        if not actual.get("enforced", True):  # (a controller from before the field: enforced)
            # Applied, to no effect: without authentication every caller is the controller's anonymous tenant. It was
            # Ready/Applied, and the keys, model list and limits it was made for protected nothing.
            _write_status(body, patch, status, fields, "Degraded", "AuthenticationOff", "applied, to no effect: the "
                          "controller runs without authentication (auth: false in its configuration, or no tenant "
                          "configured at its start), so every caller is its anonymous tenant and this Tenant's keys, "
                          "models and limits apply to no one; set auth: true in the controller's configuration", gen)
            return
        if conflict:
            _write_status(body, patch, status, fields, "Degraded", "KeyConflict", f"{message} applied; {conflict}", gen)
            return
        if not desired["models"]:  # (an empty list is no model, not every model: leaving it out is ["*"])
            reason, message = "NoModels", (f"{message}; spec.models is empty: its keys may use no model, every request "
                                           "is refused (leave spec.models out for every model)")
        elif unmatched:
            reason, message = "ModelsUnmatched", (f"{message}; spec.models {unmatched} match no model the controller "
                                                  "serves now (its name, an alias or a LoRA adapter's): requests for "
                                                  "them are refused until one does")
        _write_status(body, patch, status, fields, "Ready", reason, message, gen)


@kopf.timer(GROUP, VERSION, "tenants", interval=RESTART_CHECK_S, initial_delay=RESTART_CHECK_S)
def tenant_after_restart(spec: dict, meta: dict, memo: kopf.Memo, **kw: Any) -> None:
    """A restarted controller gets the tenant back at once; and a tenant naming models (not only "*") is looked at
    again once the operator registered or removed a model since its last round read them, so ModelsUnmatched is said
    or cleared within RESTART_CHECK_S. After a restart the tenant's round may run before its models' (each object's
    check runs on its own): it said ModelsUnmatched until the next timer round, up to RESYNC_S later."""
    if _after_restart(reconcile_tenant, "Tenant", spec=spec, meta=meta, memo=memo, **kw):
        return
    seen = _noted(memo, "tenant_models_seen", meta["uid"])
    patterns = b.with_defaults(dict(spec), b.TENANT_DEFAULTS)["models"]
    if seen is not None and seen != _models_version(memo)[0] and any(p != "*" for p in patterns or []):
        reconcile_tenant(spec=spec, meta=meta, memo=memo, **kw)


def _fingerprint(key: str) -> str:
    """What tells two Secrets' keys (or given hashes) the same (kept in the operator's memory only)."""
    return hashlib.sha256(key.strip().encode()).hexdigest()


def _claim_keys(memo: kopf.Memo, meta: dict, namespace: str, name: str, keys: list[str]) -> dict[str, tuple]:
    """Record the keys Tenant `meta` asks for now (none: `keys` empty) and answer those an older Tenant asks for
    too: fingerprint -> that Tenant's (creationTimestamp, namespace, name, uid). Older as for names (`_name_owner`).
    Each Tenant's claims are what its last round read (its delete drops them)."""
    me = (meta.get("creationTimestamp") or "", namespace or "", name, meta["uid"])
    mine = {_fingerprint(k) for k in keys if k.strip()}
    with memo.locks_guard:
        claims = memo.setdefault("key_claims", {})  # (set by `startup`; a memo made otherwise, as tests do, here)
        claims[meta["uid"]] = (me, mine)
        oldest: dict[str, tuple] = {}  # (of several older holders, the oldest: the key is its; the claims' order named
        for uid, (owner, fps) in claims.items():  # whichever had claimed last, and a status could name either)
            if uid != meta["uid"] and owner < me:
                for fp in fps & mine:
                    if fp not in oldest or owner < oldest[fp]:
                        oldest[fp] = owner
        return oldest


def _unmatched_models(models: dict[str, dict], patterns: list[str]) -> list[str]:
    """The tenant's model patterns that no name the controller serves matches (`models`: what `GET /admin/models`
    answered, by name). "*" is never one: it asks for no model in particular (and matches none while none is
    registered, before the PooledModels are)."""
    served = {n for name, m in models.items()
              for n in (name, *(m.get("aliases") or []), *(lm.get("name") for lm in m.get("lora_modules") or []))}
    return [p for p in patterns if p != "*" and not any(fnmatch.fnmatchcase(n, p) for n in served if n)]


@kopf.on.delete(GROUP, VERSION, "tenants")
def delete_tenant(name: str, status: dict, meta: dict, patch: kopf.Patch, memo: kopf.Memo, tenant_names: Any = None,
                  body: Any = None, **_: Any) -> None:
    """The finalizer: the tenant's keys stop working before the resource is gone (not another's of its name)."""
    with _lock(memo, meta["uid"]):
        try:
            if _tenant_conflict(memo.admin.tenants.by_name(), name, meta, tenant_names) is None:
                memo.admin.tenants.remove(name)
            _forget(memo, meta["uid"])  # (its key claims too: its keys are free for another)
        except (AdminError, AdminUnavailable) as e:
            _removal_failed(body, patch, status, meta, memo, e)


def _removal_failed(body: Any, patch: kopf.Patch, status: dict, meta: dict, memo: kopf.Memo,
                    e: AdminError | AdminUnavailable) -> None:
    """A finalizer that could not reach the controller, or that the controller refused (its admin token, say): the
    object stays (Terminating) until it can, and says why (it showed Ready until then); raised for kopf to retry.
    Except in a namespace being deleted (an uninstall: `kubectl delete -k`, `kubectl delete namespace`), whose
    controller goes with it: there the finalizer lets go, or the object, and so the namespace, would stay
    Terminating for good."""
    namespace = meta.get("namespace")
    if namespace and _leaving(memo, namespace):
        log.warning("%s/%s: the controller is unreachable or refuses (%s) and namespace %s is being deleted: letting "
                    "it go", (body or {}).get("kind", "?"), meta.get("name"), e, namespace)
        return
    unavailable = isinstance(e, AdminUnavailable)
    _write_status(body, patch, status, {}, "Degraded", "ControllerUnavailable" if unavailable else _refusal(e),
                  f"removing it from the controller: {e}", meta.get("generation"))
    if unavailable:
        raise _unavailable(e) from e
    raise kopf.TemporaryError(f"controller refused: {e}", delay=10) from e


def _leaving(memo: kopf.Memo, namespace: str) -> bool:
    """Whether `namespace` is being deleted; False when that cannot be read (the finalizer keeps holding on)."""
    try:
        return memo.kube.namespace_leaving(namespace)
    except ApiException as e:
        log.warning("reading namespace %s: %s %s", namespace, e.status, e.reason)
        return False


@kopf.index(GROUP, VERSION, "gpupools")
def pool_names(name: str, namespace: str, meta: dict, **_: Any) -> dict:
    """The GPUPools by name (what `cleanup` needs of them: their namespaces)."""
    return {name: (meta.get("creationTimestamp") or "", namespace or "", name, meta["uid"])}


@kopf.on.cleanup()
def cleanup(memo: kopf.Memo, served_names: Any = None, tenant_names: Any = None, pool_names: Any = None,
            **_: Any) -> None:
    """The operator exiting. In a namespace being deleted (an uninstall) its objects lose this operator's finalizer,
    those not deleted yet too (the namespace's deletion may reach them only after the operator's pod is gone): the
    operator is going, and nothing else would ever remove it (the objects, their CRDs and the namespace would stay
    Terminating). Each is first removed from the controller if it still answers (its requests in flight are not
    waited for: the controller is going as well)."""
    kube = getattr(memo, "kube", None)
    if kube is None:  # the startup never finished
        return
    namespaces = {c[1] for index in (served_names, tenant_names, pool_names) for claims in (index or {}).values()
                  for c in claims}
    admin = dataclasses.replace(memo.admin, timeout_s=3.0)  # (the pod's grace period is short)
    for namespace in sorted(namespaces):
        try:
            _release_all(kube, admin, memo, namespace, served_names, tenant_names)
        except Exception as e:  # noqa: BLE001 - never raised: kopf would retry a failed cleanup until the pod is killed
            log.warning("namespace %s: finalizers not released on the way out: %r", namespace, e)


def _release_all(kube: Any, admin: AdminClient, memo: kopf.Memo, namespace: str, served_names: Any,
                 tenant_names: Any) -> None:
    """`cleanup` in one namespace: nothing unless it is being deleted."""
    if not _leaving(memo, namespace):
        return  # a restart (a rollout): the next operator runs the finalizers
    reachable = True
    for plural in PLURALS:
        try:
            objs = kube.objects(namespace, plural)
        except ApiException as e:
            log.warning("listing %s in %s: %s %s", plural, namespace, e.status, e.reason)
            continue
        for obj in objs:
            meta = obj["metadata"]
            if FINALIZER not in (meta.get("finalizers") or []):
                continue
            if reachable:
                try:
                    _remove_now(admin, memo, plural, obj, served_names, tenant_names)
                except (AdminError, AdminUnavailable) as e:  # one try: the controller is likely gone
                    log.warning("%s/%s/%s: not removed from the controller: %s", namespace, plural,
                                meta["name"], e)
                    reachable = not isinstance(e, AdminUnavailable)
            try:
                kube.release(obj, plural, FINALIZER)
            except ApiException as e:
                log.warning("%s/%s/%s: finalizer not removed: %s %s", namespace, plural, meta["name"], e.status,
                            e.reason)
                continue
            log.warning("%s/%s/%s: namespace being deleted: finalizer %s removed on the way out", namespace,
                        plural, meta["name"], FINALIZER)


def _remove_now(admin: AdminClient, memo: kopf.Memo, plural: str, obj: dict, served_names: Any,
                tenant_names: Any) -> None:
    """What the finalizer of `obj` removes from the controller, at once (no drain)."""
    meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
    if plural == "pooledmodels":
        names = _model_names(meta["name"], spec, status, meta, memo, served_names)
        for served in names - _config_models(admin.models.by_name()):
            admin.models.remove(served)
    elif plural == "tenants":
        if _tenant_conflict(admin.tenants.by_name(), meta["name"], meta, tenant_names) is None:
            admin.tenants.remove(meta["name"])
