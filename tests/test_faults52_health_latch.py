"""/health's "starting" is for start-up only: once the server has been ready, a model lost later (its worker killed
mid-stream, its loads failing) leaves it "degraded" (200), never "starting" again -- whether or not anything had
asked /health before the fault."""

from __future__ import annotations

import asyncio

from fastapi.testclient import TestClient

from controller.app import build_app
from controller.config import ModelSpec, ServerConfig
from controller.pool import EngineHandle, Replica


class _Closed:
    def is_closing(self) -> bool:
        return True


def test_ready_unprobed_then_a_lost_model_is_degraded_not_starting():
    """`tokenpool serve` (no probe: a laptop, or a Kubernetes readiness probe not yet run) served both models; its
    worker was killed mid-stream and the standby loads them again. /health said 503 "starting" then, and the
    control loop's placement waited as at start-up, because "been ready" was only noted when /health was asked.
    The control loop notes it now."""
    cfg = ServerConfig(models=[ModelSpec(name=n, path=None, engine={"kind": "pace"}, memory_gb=1)
                               for n in ("alpha", "beta")])
    app = build_app(cfg)  # (no lifespan: no workers start; the loop's tick is run by hand)
    ctl = app.state.controller
    for spec in cfg.models:
        asyncio.run(ctl.add_model(spec))
    e = EngineHandle("w0", None, "cuda:0", "node1", 1234, 20 * 10**9, _Closed())
    e.replicas = {n: Replica(n, state="ready") for n in ("alpha", "beta")}
    ctl.pool.engines["w0"] = e
    ctl.tick()  # the control loop runs while the models serve; nobody asks /health
    e.replicas["beta"].state = "loading"  # the worker died; the standby loads beta again
    r = TestClient(app).get("/health")
    assert r.status_code == 200 and r.json()["status"] == "degraded", r.text
    assert r.json()["unready_models"] == ["beta"]
