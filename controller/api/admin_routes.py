"""Admin routes (admin bearer token): models, engines, tenants. Thin: they call the controller."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from controller.api import admin_protocol as ap
from controller.api import auth
from controller.config import ModelSpec, TenantSpec
from controller.errors import ServingError
from controller.pool import EngineHandle
from controller.service import Controller
from controller.tenants import Tenant

router = APIRouter(prefix="/admin", dependencies=[Depends(auth.admin)])


def _ctl(request: Request) -> Controller:
    return request.app.state.controller


def _engine_out(ctl: Controller, e: EngineHandle) -> ap.EngineOut:
    infos = ctl.infos()
    reps = [ap.ReplicaOut(model=n, state=r.state, inflight=sum(1 for s in e.subs.values() if s.model == n))
            for n, r in e.replicas.items()]
    return ap.EngineOut(id=e.id, device=e.device, host=e.host, pid=e.pid, alive=e.alive, draining=e.draining,
                        memory_bytes=e.memory_bytes, used_bytes=sum(infos[n].size_bytes for n in e.replicas if n in infos),
                        step_s=e.step_s, inflight=len(e.subs), models=reps, stats=e.stats)


def _tenant_out(t: Tenant) -> dict:
    s = t.spec
    return dict(name=s.name, models=s.models, rate=s.rate, max_concurrent=s.max_concurrent, priority=s.priority,
                slo_class=s.slo_class, inflight=t.inflight, usage=dict(t.usage))


@router.get("/engines", response_model=list[ap.EngineOut])
async def engines(request: Request):
    ctl = _ctl(request)
    return [_engine_out(ctl, e) for e in ctl.pool.engines.values()]


@router.post("/engines/{engine_id}/drain", response_model=ap.EngineOut)
async def drain(engine_id: str, request: Request):
    ctl = _ctl(request)
    return _engine_out(ctl, ctl.drain(engine_id, True))


@router.post("/engines/{engine_id}/resume", response_model=ap.EngineOut)
async def resume(engine_id: str, request: Request):
    ctl = _ctl(request)
    return _engine_out(ctl, ctl.drain(engine_id, False))


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
    return ap.ModelOut(name=name, path=s.path, aliases=s.aliases, keep_alive=s.keep_alive, pin=s.pin,
                       last_used=last_used.get(name),
                       slo=s.slo.model_dump(), priority=s.priority,
                       replicas=s.replicas.model_dump(), max_model_len=me.max_model_len, size_bytes=me.info.size_bytes,
                       engines=[e.id for e in ctl.pool.engines.values() if e.alive and name in e.replicas],
                       slo_attainment=me.attainment())


@router.get("/models", response_model=list[ap.ModelOut])
async def models(request: Request):
    ctl = _ctl(request)
    return [_model_out(ctl, n, request.app.state.serving.last_used) for n in ctl.models]


@router.post("/models", response_model=ap.ModelOut, status_code=201)
async def register_model(spec: ModelSpec, request: Request):
    ctl = _ctl(request)
    await ctl.add_model(spec)
    return _model_out(ctl, spec.name, request.app.state.serving.last_used)


@router.delete("/models/{name:path}")
async def unregister_model(name: str, request: Request) -> dict:
    if not _ctl(request).remove_model(name):
        raise ServingError(404, f"no model {name!r}", code="model_not_found")
    return {"deleted": name}


@router.get("/tenants", response_model=list[ap.TenantOut])
async def tenants(request: Request):
    return [_tenant_out(t) for t in _ctl(request).tenants.all()]


@router.post("/tenants", response_model=ap.TenantCreated, status_code=201)
async def create_tenant(body: ap.TenantCreate, request: Request):
    ctl = _ctl(request)
    if body.slo_class is not None and body.slo_class not in ctl.cfg.slo_classes:
        raise ServingError(400, f"unknown slo_class {body.slo_class!r}", param="slo_class")
    try:
        t, key = ctl.tenants.create(TenantSpec(**body.model_dump()))
    except KeyError:
        raise ServingError(400, f"tenant {body.name!r} exists", param="name") from None
    return {**_tenant_out(t), "api_key": key}


@router.delete("/tenants/{name}")
async def delete_tenant(name: str, request: Request) -> dict:
    if not _ctl(request).tenants.delete(name):
        raise ServingError(404, f"no tenant {name!r}", code="tenant_not_found")
    return {"deleted": name}
