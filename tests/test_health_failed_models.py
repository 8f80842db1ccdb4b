"""/health answers anyone (probes send no key). Where a model's load keeps failing it says which and why (the
worker's error: paths, exception text) only to whoever may change what is served; to others, on a server with
tenants, only how many models fail."""

from __future__ import annotations

import asyncio

from fastapi.testclient import TestClient

from controller.app import build_app
from controller.config import ModelSpec, ServerConfig, TenantSpec
from controller.keys import hash_key
from controller.pool import EngineHandle, Replica

ADMIN, TENANT = "health-admin-token", "health-tenant-key"


def _failing(cfg: ServerConfig) -> TestClient:
    app = build_app(cfg)  # (no lifespan: no workers start, so the server is not ready)
    ctl = app.state.controller
    ctl._load_errors["broken"] = "engine w0: cannot read /srv/models/broken/model.safetensors"
    return TestClient(app)


def test_a_failing_models_reason_goes_only_to_an_operator():
    c = _failing(ServerConfig(admin_token_hash=hash_key(ADMIN), models=[],
                              tenants=[TenantSpec(name="a", key_hashes=[hash_key(TENANT)]),
                                       TenantSpec(name="b")]))
    said = {}
    for who, headers in (("probe", {}), ("tenant", {"Authorization": f"Bearer {TENANT}"}),
                         ("admin", {"Authorization": f"Bearer {ADMIN}"})):
        r = c.get("/health", headers=headers)
        assert r.status_code == 503 and r.json()["status"] == "starting", r.text
        said[who] = r.json()["failed_models"]
    assert said["probe"] == said["tenant"] == 1
    assert list(said["admin"]) == ["broken"]
    assert said["admin"]["broken"].startswith("engine w0: cannot read /srv/models/broken/model.safetensors")


def test_without_auth_health_names_the_failing_model():
    r = _failing(ServerConfig(models=[])).get("/health")
    assert r.status_code == 503 and list(r.json()["failed_models"]) == ["broken"], r.text


def _serving(tenants: list[TenantSpec]) -> tuple[TestClient, object, EngineHandle]:
    """A server serving alpha and beta (both replicas.min 1) on one engine, nothing asked of it yet."""
    cfg = ServerConfig(admin_token_hash=hash_key(ADMIN), tenants=tenants, models=[
        ModelSpec(name=n, path=None, engine={"kind": "pace"}, memory_gb=1) for n in ("alpha", "beta")])
    app = build_app(cfg)  # (no lifespan: no workers start; the control loop's tick is run by hand)
    ctl = app.state.controller
    for spec in cfg.models:
        asyncio.run(ctl.add_model(spec))
    e = EngineHandle("w0", None, "cuda:0", "node1", 1234, 20 * 10**9, _Closed())
    e.replicas = {n: Replica(n, state="ready") for n in ("alpha", "beta")}
    ctl.pool.engines["w0"] = e
    return TestClient(app), ctl, e


def _once_ready(tenants: list[TenantSpec]) -> tuple[TestClient, object, EngineHandle]:
    """`_serving`, and ready once."""
    c, ctl, e = _serving(tenants)
    assert ctl.ready()
    return c, ctl, e


class _Closed:
    def is_closing(self) -> bool:
        return True


def test_a_model_lost_after_start_up_leaves_the_server_degraded_not_starting():
    """Once ready, a model that is not (its worker died and it loads again, or its loads fail) made /health a 503
    "starting": a load balancer (a Kubernetes Service without publishNotReadyAddresses, a compose healthcheck) then
    took the whole server out for one model. Now 200 "degraded", naming the model to an operator (a count to a
    tenant); with no live engine at all a 503 "unavailable"; "starting" only before the first ready."""
    c, ctl, e = _once_ready([TenantSpec(name="a", key_hashes=[hash_key(TENANT)]), TenantSpec(name="b")])
    assert c.get("/health").json()["status"] == "ok"
    e.replicas["beta"].state = "loading"
    ctl._load_errors["beta"] = "engine w0: cannot read /srv/models/beta/model.safetensors"
    r = c.get("/health", headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200 and r.json()["status"] == "degraded", r.text
    assert r.json()["unready_models"] == ["beta"] and list(r.json()["failed_models"]) == ["beta"]
    r = c.get("/health", headers={"Authorization": f"Bearer {TENANT}"})
    assert r.status_code == 200 and r.json()["unready_models"] == 1 and r.json()["failed_models"] == 1, r.text
    e.alive = False
    r = c.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "unavailable" and r.json()["engines"] == 0, r.text
    e.alive, e.replicas["beta"].state = True, "ready"
    assert c.get("/health").json()["status"] == "ok"


def test_ready_unprobed_then_a_lost_model_is_degraded_not_starting():
    """`tokenpool serve` (no probe: a laptop, or a Kubernetes readiness probe not yet run) served both models; its
    worker was killed mid-stream and the standby loads them again. /health said 503 "starting" then, and the
    control loop's placement waited as at start-up, because "been ready" was only noted when /health was asked.
    The control loop notes it now."""
    c, ctl, e = _serving([])
    ctl.tick()  # the control loop runs while the models serve; nobody asks /health
    e.replicas["beta"].state = "loading"  # the worker died; the standby loads beta again
    r = c.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "degraded", r.text
    assert r.json()["unready_models"] == ["beta"]
