"""Admin routes (admin bearer token): models, engines, tenants. Thin: they call the controller."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
from pathlib import Path

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.routing import APIRoute
from starlette.routing import Match

from controller.api import admin_protocol as ap
from controller.api import auth
from controller.config import ModelSpec, TenantSpec
from controller.dashboard import stream, views
from controller.errors import ServingError
from controller.pool import EngineHandle
from controller.router import EngineView, pin_blocks, place, starved_by_pins, with_registration
from controller.service import Controller
from controller.tenants import ANONYMOUS, KeyInUse, Tenant


def _no_twice(pairs: list[tuple[str, object]]) -> dict:
    seen: set[str] = set()
    for k, _ in pairs:
        if k in seen:
            raise ServingError(400, f"the request body gives key {k!r} twice in one object; give it once",
                               param=k, code="duplicate_key")
        seen.add(k)
    return dict(pairs)


class _AdminRoute(APIRoute):
    """An admin route whose JSON body may not give a key twice in one object, as the configuration file may not
    (Python's JSON keeps the last: `{"name": "d1", "name": "d2"}` made tenant d2, unsaid). Checked after the admin
    token (a caller without one hears 401 whatever its body holds); a body that is not JSON is left to the route's
    own parsing, which says so."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def checked(request: Request):
            if request.method in ("POST", "PUT", "PATCH") and (raw := await request.body()):
                try:
                    json.loads(raw, object_pairs_hook=_no_twice)
                except ServingError:
                    auth.admin(request)
                    raise
                except (ValueError, RecursionError):
                    pass
            return await handler(request)

        return checked


router = APIRouter(prefix="/admin", dependencies=[Depends(auth.admin)], route_class=_AdminRoute)


def _ctl(request: Request) -> Controller:
    return request.app.state.controller


def _engine_out(ctl: Controller, e: EngineHandle) -> ap.EngineOut:
    infos = ctl.infos()
    reps = [ap.ReplicaOut(model=n, state=r.state, inflight=sum(1 for s in e.subs.values() if s.model == n))
            for n, r in e.replicas.items()]
    return ap.EngineOut(id=e.id, device=e.device, host=e.host, pid=e.pid, alive=e.alive, draining=e.draining,
                        memory_bytes=e.memory_bytes, used_bytes=sum(infos[n].size_bytes for n in e.replicas if n in infos),
                        step_s=e.step_s, inflight=len(e.subs), models=reps, stats=e.stats, pool=e.pool)


def _tenant_out(t: Tenant, enforced: bool) -> dict:
    s = t.spec
    return dict(name=s.name, models=s.models, rate=s.rate, max_concurrent=s.max_concurrent, priority=s.priority,
                slo_class=s.slo_class, inflight=t.inflight, usage=dict(t.usage),
                source="admin" if t.from_file else "config", enforced=enforced)


@router.get("/engines", response_model=list[ap.EngineOut])
async def engines(request: Request):
    ctl = _ctl(request)
    return [_engine_out(ctl, e) for e in ctl.pool.engines.values()]


@router.post("/engines/{engine_id}/drain", response_model=ap.EngineOut)
@router.post("/engines/{engine_id}/resume", response_model=ap.EngineOut)
async def drain(engine_id: str, request: Request):
    """drain: send the engine no new requests and give its registrations back once idle; resume: undo."""
    ctl = _ctl(request)
    on = request.url.path.endswith("/drain")
    out = _engine_out(ctl, ctl.drain(engine_id, on))
    views.events(ctl).publish("drain" if on else "resume", engine=engine_id)
    return out


@router.get("/gpus", response_model=ap.GPUOut)
async def gpus(request: Request):
    try:
        from gpu_pool.inventory import list_devices

        devices = [d if isinstance(d, dict) else dict(vars(d)) for d in list_devices()]
    except Exception:  # noqa: BLE001 - inventory missing or no driver
        devices = []
    by_dev: dict[str, list[str]] = {}
    for e in _ctl(request).pool.engines.values():
        if e.alive:
            by_dev.setdefault(f"{e.host}/{e.device}", []).append(e.id)
    return ap.GPUOut(devices=devices, engines=by_dev)


def _model_out(ctl: Controller, name: str, last_used: dict[str, float]) -> ap.ModelOut:
    me = ctl.models[name]
    s = me.spec
    asked = me.asked_keep_alive
    return ap.ModelOut(name=name, path=s.path, aliases=s.aliases, keep_alive=s.keep_alive, pin=me.pinned,
                       keep_alive_asked=-1.0 if asked == math.inf else asked,
                       lora_modules=[lm.model_dump() for lm in s.lora_modules],
                       last_used=last_used.get(name),
                       slo=s.slo.model_dump(), priority=s.priority,
                       replicas=s.replicas.model_dump(), max_model_len=me.max_model_len, size_bytes=me.info.size_bytes,
                       engines=[e.id for e in ctl.pool.engines.values() if e.alive and name in e.replicas],
                       slo_attainment=me.attainment(), load_error=ctl.load_errors().get(name), source=me.source)


@router.get("/models", response_model=list[ap.ModelOut])
async def models(request: Request):
    ctl = _ctl(request)
    return [_model_out(ctl, n, request.app.state.serving.last_used) for n in ctl.models]


@router.post("/models", response_model=ap.ModelOut | ap.DryRunOut, status_code=201)
async def register_model(spec: ModelSpec, request: Request, response: Response, dry_run: bool = False,
                         replacing: str | None = None):
    """Register a model. `?dry_run=true`: checked as its registration would be, replacing the model of its name
    (`&replacing=NAME`: that model, by its name or an alias; a 404 when none) if there is one, and nothing registered
    (200, or the refusal the registration would get)."""
    ctl = _ctl(request)
    # `~` is the home directory and a relative path the server's working directory, as a configuration's paths are
    # its file's: "~/models/x" (the dashboard's Add form) was refused as a path that "does not exist", and a relative
    # one was kept as given, for each worker to read from its own working directory
    if spec.path is not None:
        spec.path = str(Path(spec.path).expanduser().absolute())
        spec.bound_context()
    for lm in spec.lora_modules:
        lm.path = str(Path(lm.path).expanduser().absolute())
    if dry_run:
        if replacing is not None:  # (a model by its name or an alias; a name of none is a 404, not a plain check)
            replacing = _model_named(ctl, replacing)
        await ctl.add_model(spec, dry_run=True, replacing=replacing)
        response.status_code = 200
        return ap.DryRunOut(name=spec.name)
    await ctl.add_model(spec)
    return _model_out(ctl, spec.name, request.app.state.serving.last_used)


def _model_named(ctl: Controller, name: str, adapters: bool = False) -> str:
    """The registered model `name` names: by its own name or one of its aliases (as requests name it); with
    `adapters`, also by one of its LoRA adapters' names (evict: `tokenpool stop` takes any name a request used). An
    adapter's name is not its model's for a change or a removal (DELETE by an adapter's name would remove the model
    under it). 404 in OpenAI's shape when none."""
    me = ctl.resolve(name, adapters)
    if me is None:
        raise ServingError(404, f"no model {name!r}", code="model_not_found")
    return me.spec.name


@router.patch("/models/{name:path}", response_model=ap.ModelOut)
async def update_model(name: str, patch: ap.ModelPatch, request: Request):
    """Change a model's SLO, priority, replica bounds or keep_alive without unloading it (by its name or an alias)."""
    ctl = _ctl(request)
    name = _model_named(ctl, name)
    ctl.update_model(name, patch.changes())
    return _model_out(ctl, name, request.app.state.serving.last_used)


@router.delete("/models/{name:path}")
async def unregister_model(name: str, request: Request) -> dict:
    """Unregister a model (by its name or an alias): its requests in flight end."""
    ctl = _ctl(request)
    name = _model_named(ctl, name)
    if not ctl.remove_model(name):
        raise ServingError(404, f"no model {name!r}", code="model_not_found")
    return {"deleted": name}


@router.get("/tenants", response_model=list[ap.TenantOut])
async def tenants(request: Request):
    reg = _ctl(request).tenants
    return [_tenant_out(t, reg.auth) for t in reg.all()]


@router.get("/tenants/{name}", response_model=ap.TenantOut)
async def tenant(name: str, request: Request):
    """One tenant, as GET /admin/tenants lists it (its keys are never shown: only their hashes are kept)."""
    reg = _ctl(request).tenants
    t = reg.get(name)
    if t is None:
        raise ServingError(404, f"no tenant {name!r}", code="tenant_not_found")
    return _tenant_out(t, reg.auth)


@router.post("/tenants", response_model=ap.TenantCreated, status_code=201)
async def create_tenant(body: ap.TenantCreate, request: Request):
    ctl = _ctl(request)
    if body.slo_class is not None and body.slo_class not in ctl.cfg.slo_classes:
        raise ServingError(400, f"unknown slo_class {body.slo_class!r}", param="slo_class")
    if body.name == ANONYMOUS.name:  # (without authentication, a second tenant of that name beside every caller's)
        raise ServingError(400, f"tenant name {body.name!r} is reserved: it is the tenant every caller is when the "
                           "server runs without authentication; choose another name", param="name",
                           code="tenant_name_reserved")
    try:
        t, key = ctl.tenants.create(TenantSpec(**body.model_dump()), issue_key=not body.key_hashes)
    except KeyError:
        raise ServingError(409, f"tenant {body.name!r} exists", param="name", code="tenant_exists") from None
    except KeyInUse as e:
        raise ServingError(409, str(e), param="key_hashes", code="key_in_use") from None
    views.events(ctl).publish("tenant_created", tenant=t.name)
    warnings = [] if ctl.tenants.auth else [
        "authentication is off on this server (auth: false, or no tenant configured at start): requests are not "
        "asked for a key, so this tenant's limits and model list apply to no one; restart with auth on"]
    if unmatched := _unmatched(ctl, t.spec.models):
        warnings.append(unmatched)
    if ctl.tenants.warning:  # (the tenants file was edited by hand meanwhile: kept aside, not loaded)
        warnings.append(ctl.tenants.warning)
    return {**_tenant_out(t, ctl.tenants.auth), "api_key": key, "warning": "; ".join(warnings) or None}


NO_MODELS = ("models is empty: this tenant's keys may use no model (every request for one is refused, a 404), as "
             "asked; to allow every model leave models out, or send [\"*\"]")


def _unmatched(ctl: Controller, models: list[str]) -> str | None:
    """A name or glob no model answers to now is kept (a PooledModel may come after its Tenant), and said: a typo
    would otherwise show only as the tenant's 404s. An empty list is no model (as the operator's Tenant has it,
    reason NoModels; left out, `models` is every model): kept too, and said."""
    if not models:
        return NO_MODELS
    served = ctl.served_names()
    if unmatched := [p for p in models if not any(fnmatch.fnmatchcase(n, p) for n in served)]:
        return f"models {unmatched} match no model served now; this tenant can use them once they are added"
    return None


@router.patch("/tenants/{name}", response_model=ap.TenantUpdated)
async def update_tenant(name: str, patch: ap.TenantPatch, request: Request):
    """Change a tenant's keys, models, limits, priority or SLO class in place: the keys it keeps keep working (no
    DELETE then POST, whose gap answered them 401), its usage, requests in flight and buckets carry over; requests
    on a key it drops end a moment later."""
    ctl = _ctl(request)
    changes = patch.changes()
    if changes.get("slo_class") is not None and changes["slo_class"] not in ctl.cfg.slo_classes:
        raise ServingError(400, f"unknown slo_class {changes['slo_class']!r}", param="slo_class")
    try:
        old = ctl.tenants.get(name)
        t = ctl.tenants.update(name, changes)
    except KeyError:
        raise ServingError(404, f"no tenant {name!r}", code="tenant_not_found") from None
    except KeyInUse as e:
        raise ServingError(409, str(e), param="key_hashes", code="key_in_use") from None
    except ValueError:
        raise ServingError(409, f"tenant {name!r} is from the configuration file: change it there (a change made here "
                           "would be undone at the next start)", code="tenant_from_config") from None
    if "key_hashes" in changes and old is not None:
        ctl.tenant_deleted(old)  # (succeeded by `t`: only the requests on the keys it dropped end)
    views.events(ctl).publish("tenant_updated", tenant=name, fields=sorted(changes))
    # (as POST says it: the dashboard's Edit with a typo in a model's name took the tenant's access away unsaid)
    warnings = [w for w in (_unmatched(ctl, t.spec.models) if changes.get("models") is not None else None,
                            ctl.tenants.warning) if w]
    return {**_tenant_out(t, ctl.tenants.auth), "warning": "; ".join(warnings) or None}


@router.delete("/tenants/{name}")
async def delete_tenant(name: str, request: Request) -> dict:
    """Revoke a tenant: its keys get 401 from now on; its requests in flight end a moment later (a stream gets an
    error event, its KV is freed) unless it is re-created meanwhile with every key it had (a limits change)."""
    ctl = _ctl(request)
    t = ctl.tenants.get(name)
    if t is None or not ctl.tenants.delete(name):
        raise ServingError(404, f"no tenant {name!r}", code="tenant_not_found")
    ctl.tenant_deleted(t)
    views.events(ctl).publish("tenant_revoked", tenant=name)
    # (the tenants file was edited by hand meanwhile: kept aside, not loaded)
    return {"deleted": name, **({"warning": w} if (w := ctl.tenants.warning) else {})}


# --- what is happening: the dashboard's data ---
@router.get("/pool", response_model=ap.PoolOut)
async def pool(request: Request, timeline_s: float = Query(60.0, ge=0, le=300),
               resolution_s: float = Query(0.25, ge=0, le=60)):
    """Per engine, model, tenant: what runs, what waits, how fast, and SLO attainment over a window. Each
    engine's timeline covers the last timeline_s, one run per resolution_s (0: the runs as reported)."""
    return views.pool_view(_ctl(request), timeline_s, resolution_s)


@router.get("/requests", response_model=list[ap.RequestOut])
async def requests(request: Request):
    """The requests in flight, oldest first."""
    return views.requests_view(_ctl(request))


@router.post("/requests/{request_id}/cancel", response_model=ap.CancelOut)
async def cancel(request_id: str, request: Request):
    """End a request: its stream gets an error event ("cancelled by an operator"; not streamed: a 503 with
    `x-should-retry: false`, so the client does not send it again), the engines abort it."""
    ctl = _ctl(request)
    done = ctl.cancel(request_id)
    if done is None:  # (engine requests the controller holds no request of: the views find and end them)
        return views.cancel(ctl, request_id)
    model, tenant, n = done
    views.events(ctl).publish("cancel", request_id=request_id, model=model, tenant=tenant)
    return ap.CancelOut(id=request_id, model=model, cancelled=n)


# Each switch is one route pair on one handler: the last path segment says which way.
@router.post("/models/{name:path}/pin", response_model=ap.PinOut)
@router.post("/models/{name:path}/unpin", response_model=ap.PinOut)
async def pin(name: str, request: Request):
    """pin: keep the model's weights resident on every GPU it is registered on; unpin: stop. By its name or an
    alias."""
    return _pin(_ctl(request), name, request.url.path.endswith("/pin"))


@router.post("/models/{name:path}/evict", response_model=ap.EvictOut)
async def evict(name: str, request: Request):
    """Free the model's VRAM on every engine, once its requests there finish (Ollama's `stop`); it stays served and
    the next request brings its weights back from the host cache. A pinned model's are kept: 409."""
    ctl = _ctl(request)
    name = _model_named(ctl, name, adapters=True)  # (by any name a request used, as `tokenpool stop` and Ollama's)
    if ctl.models[name].pinned:
        raise ServingError(409, f"{name!r} is pinned: unpin it first (POST /admin/models/{name}/unpin)",
                           code="model_pinned")
    held = sum(e.alive and views.engine_models(e).get(name, {}).get("state") in ("resident", "loading")
               for e in ctl.pool.engines.values())  # (read before the evict takes it out of the view)
    n = ctl.evict(name)
    views.events(ctl).publish("evict", model=name, engines=n)
    return ap.EvictOut(name=name, engines=n, resident=held)


@router.post("/models/{name:path}/drain", response_model=ap.DrainOut)
@router.post("/models/{name:path}/resume", response_model=ap.DrainOut)
async def drain_model(name: str, request: Request):
    """drain: stop admitting requests for the model (503 + Retry-After), those in flight finish (before a
    removal); resume: admit again. By its name or an alias."""
    return _drain_model(_ctl(request), name, request.url.path.endswith("/drain"))


def _drain_model(ctl: Controller, name: str, on: bool) -> ap.DrainOut:
    name = _model_named(ctl, name)
    ctl.models[name].draining = on
    views.events(ctl).publish("drain" if on else "resume", model=name)
    n = sum(1 for e in ctl.pool.engines.values() for s in e.subs.values() if s.model == name)
    return ap.DrainOut(name=name, draining=on, inflight=n)


def _as_placed(ctl: Controller, pinned: set[str]) -> list[EngineView]:
    """The engines as placement will leave them with `pinned`: a drained one as it is once resumed, and the models
    with a minimum registered nowhere (a drain gave them back) placed as placement would. Judged as they are, a pin
    made while the only GPU drained was taken, and the model it starved was placed nowhere after the resume."""
    infos = ctl.infos()
    views_ = [dataclasses.replace(v, draining=False) for v in ctl.views()]
    for n, me in ctl.models.items():
        if me.spec.replicas.min > 0 and not any(n in v.replicas for v in views_):
            if (pl := place(me.info, views_, infos, pinned=pinned)) is not None:
                views_ = with_registration(views_, pl.engine_id, n)
    return views_


def _pin(ctl: Controller, name: str, on: bool) -> ap.PinOut:
    name = _model_named(ctl, name)
    me = ctl.models[name]
    if on and not me.pinned:  # a pin that leaves a registered model no room would starve it for good: refused
        infos, pinned = ctl.infos(), ctl.pinned()
        for e in ctl.pool.engines.values():
            if e.alive and name in e.replicas:
                other = pin_blocks(name, list(e.replicas), infos, pinned, e.memory_bytes)
                if other is not None:
                    raise ServingError(409, f"pinning {name!r} would leave {e.id} less weight space than "
                                       f"{other!r} needs ({infos[other].size_bytes / 1e9:.2f} GB of "
                                       f"{e.memory_bytes / 1e9:.2f} GB): {other!r} could never load there; "
                                       "unpin another model or move one first", code="pin_would_starve")
        # and a model registered nowhere yet (replicas.min: 0, or given back by a drained GPU): starved if the pin
        # leaves every GPU it fits too short (start-up's rule, `starved_by_pins`: only what this pin newly causes is
        # refused)
        if starved_by_pins(_as_placed(ctl, pinned), infos, pinned) is None:
            views_ = _as_placed(ctl, pinned | {name})
            bad = starved_by_pins(views_, infos, pinned | {name})
            if bad is not None:
                eid, pins, other = bad
                space = next(v.memory_bytes for v in views_ if v.engine_id == eid)
                raise ServingError(409, f"pinning {name!r}: {ctl.pins_leave(eid, pins, other, space, infos)}; "
                                   "unpin another model or move one first", code="pin_would_starve")
    ctl.set_pinned(name, on)
    views.events(ctl).publish("pin" if on else "unpin", model=name)
    return ap.PinOut(name=name, pinned=on)


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.get("/events", include_in_schema=False)  # an endless text/event-stream: no OpenAPI response to describe
async def events(request: Request, since: int | None = None, snapshots: bool = False):
    """Server-sent events from the controller's event bus (`id:` is the event's seq). A reconnecting client
    sends Last-Event-ID (or ?since=SEQ) and gets what it missed that the ring still holds. With
    ?snapshots=true the stream also carries `event: pool` and `event: requests` frames (the bodies of
    GET /admin/pool and /admin/requests), once a second: the dashboard's gauges, without polling."""
    last = request.headers.get("last-event-id", "")
    if last.isdigit():
        since = int(last)
    ctl, st = _ctl(request), request.app.state
    if getattr(st, "event_hub", None) is None:  # one for every connection (controller.dashboard.stream)
        st.event_hub = stream.Hub(views.events(ctl), lambda: views.snapshot(ctl),
                                  on_cpu=ctl.metrics.event_stream_cpu.inc)
    return stream.EventStream(st.event_hub, since, snapshots, headers=SSE_HEADERS)


class _SentWithSlash(_AdminRoute):
    """Matches only a path sent with its trailing slash. Starlette's redirect_slashes asks the routes about a path
    no route serves with a slash added (`raw_path` stays as sent): this route's yes made every unknown admin path
    (`POST /admin/tenants/bob/keys`) a bare 307 to itself plus a slash, without the admin token's check."""

    def matches(self, scope):
        raw = scope.get("raw_path")
        if raw is not None and not raw.endswith(b"/"):
            return Match.NONE, {}
        return super().matches(scope)


# Last of the admin routes: a path with a trailing slash that none of them takes. Starlette's redirect_slashes answered
# some with a bare 307 to the path without it (which clients do not follow for a DELETE or a POST: `DELETE
# /admin/tenants/` with an empty name looked like a success to a script) and others with a 405; now a 404 that says so.
async def trailing_slash(rest: str, request: Request):
    path, bare = request.url.path, request.url.path.rstrip("/")
    scope = dict(request.scope, path=bare)
    route = any(r.matches(scope)[0] == Match.FULL for r in request.app.router.routes)
    raise ServingError(404, f"no route {request.method} {path}: admin paths take no trailing slash"
                       + (f" ({request.method} {bare})" if route else ""), code="not_found")


router.add_api_route("/{rest:path}/", trailing_slash, methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                     include_in_schema=False, route_class_override=_SentWithSlash)
