"""The admin API's live views (/admin/pool, /admin/requests, cancel, pin) over controller state built by hand.

The app is built without its lifespan (no workers start): engines are EngineHandles placed in the pool as a
worker's registration would, carrying the pooled engine's `pool` state (controller/messages.py Stats.pool).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import deque

import pytest
from fastapi.testclient import TestClient

from controller.app import build_app
from controller.config import SLO, ModelSpec, ServerConfig, TenantSpec
from controller.dashboard.activity import Activity, Outcome, percentile
from controller.dashboard.views import _load_stalls
from controller.events import EventBus
from controller.keys import hash_key
from controller.pool import EngineHandle, Replica, Sub
from controller.service import Generation

ADMIN = "admin-unit-token"
H = {"Authorization": f"Bearer {ADMIN}"}


class ClosedWriter:
    """A worker connection already closed: EngineHandle.send writes nothing."""

    def is_closing(self) -> bool:
        return True


def pace(name: str) -> ModelSpec:
    return ModelSpec(name=name, path=None, engine={"kind": "pace", "pace_s_per_token": 0.02},
                     slo=SLO(ttft_s=1.0, tpot_s=0.1))


@pytest.fixture
def app():
    cfg = ServerConfig(admin_token_hash=hash_key(ADMIN), models=[], tenants=[TenantSpec(name="team-a")])
    app = build_app(cfg)
    ctl = app.state.controller
    for name in ("alpha", "beta", "gamma"):
        asyncio.run(ctl.add_model(pace(name)))
    return app


def engine(eid: str, models: dict[str, str], **kw) -> EngineHandle:
    e = EngineHandle(eid, 0, "cuda:0", "node1", 1234, 80 << 30, ClosedWriter(), **kw)
    for n, state in models.items():
        e.replicas[n] = Replica(n, state=state)
    return e


POOL = {
    "device": "cuda:0", "active": "alpha", "registered": ["alpha", "beta", "gamma"], "resident": ["alpha", "beta"],
    "prefetching": ["gamma"], "switches": 42, "switch_stall_s": 0.012, "steps": 900,
    "vram": {"budget_bytes": 60 << 30, "weights_bytes": 30 << 30, "kv_bytes": 20 << 30, "free_bytes": 10 << 30,
             "kv_pages_total": 1000, "kv_pages_used": 640},
    "host_cache_bytes": 90 << 30, "kv_page_bytes": 8192,
    "models": {
        "alpha": {"state": "resident", "waiting": 3, "running": 5, "oldest_wait_s": 0.7, "kv_pages_used": 400,
                  "kv_swapped": 2, "steps": 600, "tokens": 3000},
        "beta": {"state": "resident", "waiting": 0, "running": 1, "oldest_wait_s": 0.0, "kv_pages_used": 240,
                 "kv_swapped": 0, "steps": 300, "tokens": 300},
        "gamma": {"state": "loading", "waiting": 4, "running": 0, "oldest_wait_s": 2.5, "kv_pages_used": 0,
                  "kv_swapped": 7, "steps": 0, "tokens": 0},
    },
    "timeline": [[1000.0, "alpha", 10, 0.2], [1000.2, "beta", 5, 0.1], [1000.3, "alpha", 8, 0.16]],
}


def test_pool_shows_the_pooled_engine_state(app):
    ctl = app.state.controller
    e = engine("w0", {"alpha": "ready", "beta": "ready", "gamma": "loading"})
    t0 = (time.time() - 3) // 0.25 * 0.25  # runs in separate 0.25 s cells of the compacted timeline
    e.pool = dict(POOL, timeline=[[t0, "alpha", 10, 0.2], [t0 + 0.25, "beta", 5, 0.1]])
    ctl.pool.engines["w0"] = e
    c = TestClient(app)
    p = c.get("/admin/pool", headers=H).json()
    (w0,) = p["engines"]
    assert w0["pooled"] is True and w0["active"] == "alpha"
    assert w0["resident"] == ["alpha", "beta"] and w0["prefetching"] == ["gamma"]
    assert (w0["switches"], w0["switch_stall_s"], w0["steps"]) == (42, 0.012, 900)
    assert w0["vram"]["kv_bytes"] == 20 << 30 and w0["vram"]["kv_pages_used"] == 640
    assert w0["host_cache_bytes"] == 90 << 30 and w0["kv_page_bytes"] == 8192
    assert [r[1] for r in w0["timeline"]] == ["alpha", "beta"]
    # the next Stats brings more runs: they are appended, the ones already kept are not repeated
    e.pool = dict(POOL, timeline=[[t0 + 0.25, "beta", 5, 0.1], [t0 + 0.5, "alpha", 3, 0.05]])
    p = c.get("/admin/pool?resolution_s=0", headers=H).json()  # the runs as reported
    assert [r[1] for r in p["engines"][0]["timeline"]] == ["alpha", "beta", "alpha"]
    assert c.get("/admin/pool?timeline_s=1", headers=H).json()["engines"][0]["timeline"] == []  # older
    models = {mo["name"]: mo for mo in p["models"]}
    assert models["alpha"]["state"] == "resident" and models["gamma"]["state"] == "loading"
    assert (models["alpha"]["waiting"], models["alpha"]["running"], models["alpha"]["oldest_wait_s"]) == (3, 5, 0.7)
    assert (models["gamma"]["kv_swapped"], models["alpha"]["kv_pages_used"]) == (7, 400)
    assert models["alpha"]["engines"] == ["w0"]
    # the switch latency per model: the stalls of its weight loads among the recent events
    for stall in (0.010, 0.030):
        ctl.events.publish("load", engine="w0", model="gamma", prefetched=False, stall_s=stall)
    ctl.events.publish("load", engine="w0", model="beta", prefetched=True, stall_s=0.0)
    models = {mo["name"]: mo for mo in c.get("/admin/pool", headers=H).json()["models"]}
    assert (models["gamma"]["loads"], models["gamma"]["load_stall_s"]) == (2, pytest.approx(0.02))
    assert (models["beta"]["loads"], models["beta"]["load_stall_s"]) == (1, 0.0)
    assert (models["alpha"]["loads"], models["alpha"]["load_stall_s"]) == (0, None)


def test_model_state_is_the_best_over_engines_and_unplaced_when_nowhere(app):
    ctl = app.state.controller
    a = engine("w0", {"alpha": "ready"})
    a.pool = {"models": {"alpha": dict(POOL["models"]["alpha"], state="host")}}
    b = engine("w1", {"alpha": "ready"})
    b.pool = {"models": {"alpha": dict(POOL["models"]["alpha"], state="loading", waiting=2, oldest_wait_s=1.5)}}
    ctl.pool.engines.update(w0=a, w1=b)
    models = {mo["name"]: mo for mo in TestClient(app).get("/admin/pool", headers=H).json()["models"]}
    assert models["alpha"]["state"] == "loading" and models["alpha"]["engines"] == ["w0", "w1"]
    assert models["alpha"]["waiting"] == 5 and models["alpha"]["oldest_wait_s"] == 1.5
    assert models["beta"]["state"] == "unplaced" and models["beta"]["engines"] == []


def test_pool_without_the_pooled_state_uses_the_per_model_stats(app):
    ctl = app.state.controller
    e = engine("w0", {"alpha": "ready", "beta": "loading"})
    e.stats = {"alpha": {"num_waiting": 2, "num_running": 3, "kv_blocks_used": 17, "num_swapped": 1,
                         "kv_blocks_swapped": 5}}
    ctl.pool.engines["w0"] = e
    p = TestClient(app).get("/admin/pool", headers=H).json()
    (w0,) = p["engines"]
    assert w0["pooled"] is False and w0["active"] is None and w0["switches"] is None
    assert w0["registered"] == ["alpha", "beta"] and w0["resident"] == ["alpha"]
    assert w0["vram"]["budget_bytes"] == 80 << 30
    models = {mo["name"]: mo for mo in p["models"]}
    assert (models["alpha"]["waiting"], models["alpha"]["running"], models["alpha"]["kv_pages_used"]) == (2, 3, 17)
    assert models["alpha"]["kv_swapped"] == 5  # pages in host memory, as a pooled engine's (not 1 request)
    assert models["beta"]["state"] == "loading"


def test_pin_and_unpin(app):
    c = TestClient(app)
    assert c.post("/admin/models/beta/pin", headers=H).json() == {"name": "beta", "pinned": True}
    assert app.state.controller.models["beta"].pinned is True
    models = {mo["name"]: mo for mo in c.get("/admin/pool", headers=H).json()["models"]}
    assert models["beta"]["pinned"] and not models["alpha"]["pinned"]
    assert c.post("/admin/models/beta/unpin", headers=H).json()["pinned"] is False
    r = c.post("/admin/models/nope/pin", headers=H)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    pins = [(e["kind"], e["model"]) for e in app.state.controller.events.recent if e["kind"] in ("pin", "unpin")]
    assert pins == [("pin", "beta"), ("unpin", "beta")]


@pytest.mark.parametrize("gamma_on_w0", [True, False], ids=["registered", "registered-nowhere"])
def test_a_pin_that_would_starve_a_model_is_refused(app, gamma_on_w0):
    """w0 has 20 GB of weight space for alpha (8 GB), beta (8 GB) and gamma (10 GB; registered there, or nowhere yet:
    replicas.min 0, and w0 the only GPU it fits). Pinning alpha leaves 12 GB: fine. Pinning beta too would leave 4 GB,
    and gamma's weights could never load there: 409, nothing pinned."""
    ctl = app.state.controller
    sized(ctl, alpha=8, beta=8, gamma=10)
    e = engine("w0", {"alpha": "ready", "beta": "ready", **({"gamma": "ready"} if gamma_on_w0 else {})})
    e.memory_bytes = 20 * 10**9
    ctl.pool.engines["w0"] = e
    c = TestClient(app)
    assert c.post("/admin/models/alpha/pin", headers=H).json()["pinned"] is True
    r = c.post("/admin/models/beta/pin", headers=H)
    assert r.status_code == 409 and r.json()["error"]["code"] == "pin_would_starve"
    if gamma_on_w0:
        assert "'gamma' could never load" in r.json()["error"]["message"]
    else:  # start-up's rule and words
        assert r.json()["error"]["message"].startswith(
            "pinning 'beta': pinned models 'alpha' (8.00 GB), 'beta' (8.00 GB) would leave 'gamma' (10.00 GB) too little")
    assert ctl.models["beta"].pinned is False and ctl.models["alpha"].pinned is True
    assert c.post("/admin/models/alpha/pin", headers=H).status_code == 200  # pinned already: nothing changes
    assert c.post("/admin/models/alpha/unpin", headers=H).json()["pinned"] is False
    assert c.post("/admin/models/beta/pin", headers=H).json()["pinned"] is True  # alpha's room is back


def configured(models: list[tuple[str, float, bool]], gpus: int = 1, **spec) -> object:
    """A controller whose configuration holds paced models (name, memory_gb, pin), registered as `start` does, and
    `gpus` local worker slots; no worker has joined yet (`joins` stands for one)."""
    cfg = ServerConfig(admin_token_hash=hash_key(ADMIN), models=[
        ModelSpec(name=n, path=None, engine={"kind": "pace"}, memory_gb=gb, pin=pin, **spec) for n, gb, pin in models])
    ctl = build_app(cfg).state.controller
    for m in cfg.models:
        asyncio.run(ctl.add_model(m))
    ctl.pool.local_slots = gpus  # (pool.start sets it, with the workers it starts)
    return ctl


def joins(ctl, eid: str, slot: int, weight_space: int) -> EngineHandle:
    e = EngineHandle(eid, slot, f"cuda:{slot}", "node1", 1234, weight_space, ClosedWriter())
    ctl.pool.engines[eid] = e
    ctl._registered(e, None)  # what the pool calls once the worker registered: the first placement, every slot in
    return e


@pytest.mark.parametrize("gamma_min", [1, 0])
def test_config_pins_that_would_starve_a_model_refuse_start_up(gamma_min):
    """alpha (8 GiB) and beta (8 GiB) pinned in the configuration, gamma (10 GiB) beside them on a GPU of 20 GB of
    weight space: gamma's weights could never load there (the admin API's pin_would_starve, from the config). Start-up
    is refused once the worker joins -- the message names the models, their sizes and the GPU; nothing is placed;
    `tokenpool serve` stops (on_fatal) -- also when gamma would only be placed later (replicas.min 0)."""
    ctl = configured([("alpha", 8, True), ("beta", 8, True)])
    asyncio.run(ctl.add_model(ModelSpec(name="gamma", path=None, engine={"kind": "pace"}, memory_gb=10,
                                        replicas={"min": gamma_min})))
    stopped = []
    ctl.on_fatal = lambda: stopped.append(True)
    e = joins(ctl, "w0", 0, 20 * 10**9)
    assert stopped == [True] and not ctl.ready()
    assert ctl.fatal.startswith("pinned models 'alpha' (8.59 GB), 'beta' (8.59 GB) would leave 'gamma' (10.74 GB) "
                                "too little of the 20.00 GB weight space of w0 (cuda:0): 'gamma' could never load")
    assert e.replicas == {}
    ctl.tick()  # nor later
    assert e.replicas == {}


def test_a_configured_model_larger_than_every_gpu_refuses_start_up():
    """gamma (30 GiB of weights) beside alpha in the configuration, two GPUs of 20 GB of weight space: gamma could
    never load on either. It kept the server "starting" for good, every request to gamma a 503 that did not say why;
    now start-up is refused once the workers have joined, naming the model, its size and the largest weight space,
    and nothing is placed (the pins' rule: `tokenpool serve` exits 2)."""
    ctl = configured([("alpha", 4, False), ("gamma", 30, False)], gpus=2)
    stopped = []
    ctl.on_fatal = lambda: stopped.append(True)
    w0 = EngineHandle("w0", 0, "cuda:0", "node1", 1234, 20 * 10**9, ClosedWriter())
    ctl.pool.engines["w0"] = w0
    w1 = joins(ctl, "w1", 1, 18 * 10**9)
    assert stopped == [True] and not ctl.ready()
    assert ctl.fatal == ("model 'gamma' could never load: its weights (32.21 GB) fit no GPU's weight space (the "
                         "largest: 20.00 GB on w0 (cuda:0)). Give the GPUs more weight space (gpus.budget_gb, a "
                         "smaller gpus.kv_cache_gb) or serve the model elsewhere")
    assert w0.replicas == {} and w1.replicas == {}


def test_a_model_larger_than_every_gpu_waits_for_a_remote_one_and_says_why():
    """The same configuration where remote workers may join (workers.join_token_hash set): a larger GPU may still
    come, so the start goes on -- alpha is placed -- and /health's model errors say why gamma is not ready; a request
    for it hears the same in its 503 rather than only "no engine can serve model 'gamma' now"."""
    ctl = configured([("alpha", 4, False), ("gamma", 30, False)])
    ctl.cfg.workers = ctl.cfg.workers.model_copy(update={"join_token_hash": hash_key("tpjoin-x")})
    e = joins(ctl, "w0", 0, 20 * 10**9)
    assert ctl.fatal is None and list(e.replicas) == ["alpha"]
    assert ctl.load_errors() == {"gamma": "waiting for a GPU its weights fit: its weights (32.21 GB) fit no GPU's "
                                          "weight space (the largest: 20.00 GB on w0 (cuda:0))"}
    assert ctl._fits_nowhere(ctl.models["alpha"].info) is None
    e.replicas["alpha"].state = "ready"
    ctl.remove_model("gamma")  # (only gamma kept it from ready)
    assert ctl.load_errors() == {} and ctl.ready()


def test_config_pins_placed_after_the_model_they_would_starve_refuse_start_up():
    """Placement follows the pins: gamma placed first, then alpha beside it, beta's pin would starve gamma, so beta
    is placed nowhere. Start-up is refused all the same (a pinned model no GPU can take), in the same words."""
    ctl = configured([("gamma", 10, False), ("alpha", 8, True), ("beta", 8, True)])
    e = joins(ctl, "w0", 0, 20 * 10**9)
    assert ctl.fatal.startswith("pinned models 'alpha' (8.59 GB), 'beta' (8.59 GB) would leave 'gamma' (10.74 GB) "
                                "too little of the 20.00 GB weight space of w0 (cuda:0): 'gamma' could never load")
    assert e.replicas == {}


def test_config_pins_that_fit_start():
    """The same GPU with pins that leave gamma room: every model is placed. Two GPUs, pins together too big for one:
    placement puts alpha and beta on different GPUs, and gamma fits beside either: not refused either (the check is
    of the placement made, not of every model on one GPU)."""
    ctl = configured([("alpha", 8, True), ("beta", 4, True), ("gamma", 6, False)])
    e = joins(ctl, "w0", 0, 20 * 10**9)
    assert ctl.fatal is None and sorted(e.replicas) == ["alpha", "beta", "gamma"]
    ctl = configured([("alpha", 12, True), ("beta", 12, True), ("gamma", 6, False)], gpus=2)
    w0 = EngineHandle("w0", 0, "cuda:0", "node1", 1234, 20 * 10**9, ClosedWriter())
    ctl.pool.engines["w0"] = w0  # (joined first: placement waits for the second)
    w1 = joins(ctl, "w1", 1, 20 * 10**9)
    assert ctl.fatal is None
    assert {"alpha", "beta"} <= set(w0.replicas) | set(w1.replicas) and not {"alpha", "beta"} <= set(w0.replicas)
    assert "gamma" in set(w0.replicas) | set(w1.replicas)


def sized(ctl, **gb: float) -> None:
    for n, g in gb.items():
        ctl.models[n].info = dataclasses.replace(ctl.models[n].info, size_bytes=int(g * 10**9))


def test_a_model_added_where_pins_leave_it_no_room_goes_elsewhere_or_is_refused(app):
    """w0 (20 GB of weight space) holds alpha and beta, both pinned (8 GB each): 4 GB left beside them. w1 (12 GB)
    holds gamma (11 GB): fuller by share, so placement by shares alone picks w0. A 10 GiB model added through the
    admin API goes to w1, where it fits (w0 passed over: a pin_blocked event). A 15 GiB model fits only w0's space,
    where it could never load: 409 pin_would_starve naming it, the pins, the sizes and the GPU; nothing registered."""
    ctl = app.state.controller
    sized(ctl, alpha=8, beta=8, gamma=11)
    ctl.models["alpha"].pinned = ctl.models["beta"].pinned = True
    w0, w1 = engine("w0", {"alpha": "ready", "beta": "ready"}), engine("w1", {"gamma": "ready"})
    w0.memory_bytes, w1.memory_bytes = 20 * 10**9, 12 * 10**9
    ctl.pool.engines.update(w0=w0, w1=w1)
    c = TestClient(app)
    r = c.post("/admin/models", headers=H, json={"name": "delta", "engine": {"kind": "pace"}, "memory_gb": 10})
    assert r.status_code == 201, r.text
    assert "delta" in w1.replicas and "delta" not in w0.replicas
    told = [(e["model"], e["engine"], e["starved"], e["pins"]) for e in ctl.events.recent if e["kind"] == "pin_blocked"]
    assert told == [("delta", "w0", "delta", ["alpha", "beta"])]
    r = c.post("/admin/models", headers=H, json={"name": "eps", "engine": {"kind": "pace"}, "memory_gb": 15})
    assert r.status_code == 409 and r.json()["error"]["code"] == "pin_would_starve"
    assert r.json()["error"]["message"] == (
        "model 'eps' cannot be placed on any GPU its weights fit: pinned models 'alpha' (8.00 GB), 'beta' (8.00 GB) "
        "would leave 'eps' (16.11 GB) too little of the 20.00 GB weight space of w0 (cuda:0): 'eps' could never "
        "load there; unpin a model or remove one first")
    assert "eps" not in ctl.models and "eps" not in w0.replicas and "eps" not in w1.replicas
    # pinned itself, no unpinned model is short -- but 8 + 8 + 16.1 GB of pins overfill w0's 20 GB: one pin could
    # never be resident
    r = c.post("/admin/models", headers=H, json={"name": "zeta", "engine": {"kind": "pace"}, "memory_gb": 15,
                                                 "pin": True})
    assert r.status_code == 409 and r.json()["error"]["code"] == "pin_would_starve"
    assert "zeta" not in ctl.models and "zeta" not in w0.replicas
    r = c.post("/admin/models", headers=H, json={"name": "zeta", "engine": {"kind": "pace"}, "memory_gb": 3,
                                                 "pin": True})  # 19.2 GB of pins in 20: fits
    assert r.status_code == 201 and "zeta" in w0.replicas


def test_the_autoscaler_gives_a_hot_model_no_replica_where_pins_would_starve_it(app):
    """beta (8 GB) is hot on w0. w1 (20 GB) is the emptiest by share, but alpha (14 GB) is pinned there: beta could
    never load beside it. Ticks place beta nowhere and tell it once (a log line, one pin_blocked event), not every
    tick. Once w2 joins, beta's second registration goes there."""
    ctl = app.state.controller
    ctl.cfg.autoscaler.up_ticks = 1
    sized(ctl, alpha=14, beta=8, gamma=10)
    ctl.models["alpha"].pinned = True
    w0, w1, w2 = engine("w0", {"beta": "ready", "gamma": "ready"}), engine("w1", {"alpha": "ready"}), engine("w2", {})
    w0.memory_bytes, w1.memory_bytes, w2.memory_bytes = 20 * 10**9, 20 * 10**9, 12 * 10**9
    for i in range(ctl.models["beta"].spec.engine.max_num_seqs):
        ctl.pool.submit(w0, Sub(f"cmpl-{i}-0", "beta", 0, [1, 2, 3], {}, 32, asyncio.Queue()))
    ctl.pool.engines.update(w0=w0, w1=w1)
    for _ in range(3):
        ctl.tick()
    assert sorted(w1.replicas) == ["alpha"] and not ctl._moving
    told = [(e["model"], e["engine"], e["starved"], e["pins"]) for e in ctl.events.recent if e["kind"] == "pin_blocked"]
    assert told == [("beta", "w1", "beta", ["alpha"])]
    ctl.pool.engines["w2"] = w2
    ctl.tick()
    assert sorted(w2.replicas) == ["beta"] and sorted(w1.replicas) == ["alpha"]


def test_rebalance_moves_no_model_where_pins_would_starve_it(app):
    """w0 (12 GB) carries beta, gamma and delta (11 GB each), w1 (20 GB) only alpha (10 GB): the shares call for a
    move to w1. Pinned, alpha leaves 10 GB there, too little for any of them: the tick moves nothing. Unpinned,
    one moves."""
    ctl = app.state.controller
    asyncio.run(ctl.add_model(pace("delta")))
    sized(ctl, alpha=10, beta=11, gamma=11, delta=11)
    ctl.models["alpha"].pinned = True
    w0, w1 = engine("w0", {"beta": "ready", "gamma": "ready", "delta": "ready"}), engine("w1", {"alpha": "ready"})
    w0.memory_bytes, w1.memory_bytes = 12 * 10**9, 20 * 10**9
    ctl.pool.engines.update(w0=w0, w1=w1)
    ctl.tick()
    assert sorted(w1.replicas) == ["alpha"] and not ctl._moving
    ctl.models["alpha"].pinned = False
    ctl.tick()
    assert len(w1.replicas) == 2 and len(ctl._moving) == 1


def test_admin_views_need_the_admin_token(app):
    c = TestClient(app)
    for path in ("/admin/pool", "/admin/requests"):
        assert c.get(path).status_code == 401
        assert c.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.post("/admin/requests/x/cancel").status_code == 401
    assert c.post("/admin/models/alpha/pin").status_code == 401


def test_a_tenant_made_where_authentication_is_off_says_it_has_no_effect(app):
    """POST /admin/tenants on a server without authentication (the embedded default): made, with a warning that no
    request is asked for its key (the dashboard showed a key whose limits applied to no one); none with auth on."""
    body = {"name": "team-b", "rate": {"requests_per_s": 0.5}}
    on = TestClient(app).post("/admin/tenants", headers=H, json=body)
    assert on.status_code == 201 and on.json()["warning"] is None
    off = TestClient(build_app(ServerConfig(admin_token_hash=hash_key(ADMIN), models=[], auth=False)))
    r = off.post("/admin/tenants", headers=H, json=body)
    assert r.status_code == 201 and r.json()["api_key"] and "authentication is off" in r.json()["warning"]


def gen_for(ctl, model: str, tenant_name: str, rid: str, n: int = 1) -> Generation:
    entry, tenant = ctl.models[model], ctl.tenants.get(tenant_name)
    gen = Generation(ctl, entry, tenant, entry.spec.slo, 100, 4, asyncio.Queue())
    gen.subs = [Sub(f"{rid}-{i}", model, i, [1, 2, 3, 4], {}, 32, gen.sink) for i in range(n)]
    return gen


def test_a_request_on_its_engine_before_its_first_token_is_prefill_not_queued(app):
    """The Requests view said "queued" until a request's first token, also while its engine prefilled it: one
    waiting at the controller (for an engine, a model load) is "queued", one on its engine with no token yet
    "prefill", one with tokens "running". A request whose engine died waits at the controller again to be sent
    elsewhere (its Sub still names the dead engine): "queued", on no engine."""
    ctl = app.state.controller
    act = ctl.activity = Activity()
    w0, w1 = engine("w0", {"alpha": "ready"}), engine("w1", {"alpha": "ready"})
    ctl.pool.engines.update(w0=w0, w1=w1)
    gens = {rid: gen_for(ctl, "alpha", "team-a", rid) for rid in ("waiting", "sent", "going", "orphan")}
    for rid, g in gens.items():
        act.started(g, rid)
    ctl.pool.submit(w0, gens["sent"].subs[0])
    ctl.pool.submit(w0, gens["going"].subs[0])
    gens["going"].subs[0].generated = 3
    ctl.pool.submit(w1, gens["orphan"].subs[0])
    w1.alive = False  # (as EnginePool._dead leaves it: its requests given back to the controller to place again)
    w1.subs.clear()
    rs = {r["id"]: r for r in TestClient(app).get("/admin/requests", headers=H).json()}
    assert {rid: (r["state"], r["engines"]) for rid, r in rs.items()} == {
        "waiting": ("queued", []), "sent": ("prefill", ["w0"]), "going": ("running", ["w0"]),
        "orphan": ("queued", [])}


def test_requests_list_and_cancel_ends_the_stream(app):
    ctl = app.state.controller
    act = ctl.activity = Activity()
    e = engine("w0", {"alpha": "ready", "beta": "ready"})
    ctl.pool.engines["w0"] = e
    g1 = gen_for(ctl, "alpha", "team-a", "cmpl-1", n=2)
    act.started(g1, "cmpl-1")
    g1.t_wall -= 2.0
    for s in g1.subs:
        ctl.pool.submit(e, s)
    g1.subs[0].generated, g1.subs[1].generated = 10, 6
    t_ask = time.monotonic()
    g1.t_first = t_ask - 1.0
    # one the controller did not report (no hook): found on the engine, its tenant unknown
    lone = Sub("chat-9-0", "beta", 0, [1], {}, 16, asyncio.Queue())
    ctl.pool.submit(e, lone)
    c = TestClient(app)
    rs = {r["id"]: r for r in c.get("/admin/requests", headers=H).json()}
    took = time.monotonic() - t_ask  # (on a loaded CI machine, seconds: the answer read its clock in there)
    assert set(rs) == {"cmpl-1", "chat-9"}
    r = rs["cmpl-1"]
    assert (r["model"], r["tenant"], r["engines"], r["state"], r["tokens"], r["choices"]) == \
        ("alpha", "team-a", ["w0"], "running", 16, 2)
    # 16 tokens since the first token, which came 1 s (and the time until the answer) ago
    assert 1.9 < r["age_s"] < 2.1 + took and 16 / (1.0 + took) <= r["tokens_per_s"] <= 16
    assert rs["chat-9"]["tenant"] is None and rs["chat-9"]["state"] == "prefill"  # on its engine, no token yet

    out = c.post("/admin/requests/cmpl-1/cancel", headers=H).json()
    assert out == {"id": "cmpl-1", "model": "alpha", "cancelled": 2}
    got = [g1.sink.get_nowait() for _ in range(2)]
    assert all(d.finished and d.error == "cancelled by an operator" and d.finish_reason == "error" for _, d in got)
    assert {s.rid for s, _ in got} == {"cmpl-1-0", "cmpl-1-1"}
    assert all(s.done for s in g1.subs) and set(e.subs) == {"chat-9-0"}  # the pool forgot them (aborted)
    ev = ctl.events.recent[-1]
    assert (ev["kind"], ev["request_id"], ev["model"], ev["tenant"]) == ("cancel", "cmpl-1", "alpha", "team-a")
    assert [r["id"] for r in c.get("/admin/requests", headers=H).json()] == ["chat-9"]
    r = c.post("/admin/requests/cmpl-1/cancel", headers=H)
    assert r.status_code == 404 and r.json()["error"]["code"] == "request_not_found"


def test_cancel_before_the_model_is_placed_keeps_it_from_being_submitted(app):
    ctl = app.state.controller
    act = ctl.activity = Activity()
    g = gen_for(ctl, "gamma", "team-a", "cmpl-7")
    act.started(g, "cmpl-7")  # no engine yet: waiting for its model to load
    assert TestClient(app).post("/admin/requests/cmpl-7/cancel", headers=H).json()["cancelled"] == 1
    assert g.subs[0].done and g.sink.get_nowait()[1].error == "cancelled by an operator"


def finished(act, ctl, model, tenant, ttft, tpot, tokens=11, status=200):
    g = gen_for(ctl, model, tenant, f"cmpl-{model}-{ttft}-{tpot}")
    act.started(g, g.subs[0].rid[:-2])
    now = time.monotonic()
    g.t_arrival, g.t_first = now - ttft - tpot * (tokens - 1), now - tpot * (tokens - 1)
    g.t_last, g.completion_tokens = now, tokens
    act.finished(g, status)


def test_latency_window_and_attainment_by_model_and_tenant(app):
    ctl = app.state.controller
    act = ctl.activity = Activity(window_s=30)
    ctl.tenants.create(TenantSpec(name="team-b"))
    # alpha's SLO: TTFT 1 s, TPOT 0.1 s
    for ttft in (0.1, 0.2, 0.3, 0.4, 2.0):
        finished(act, ctl, "alpha", "team-a", ttft, 0.05)
    finished(act, ctl, "alpha", "team-b", 0.2, 0.3)  # TPOT miss
    finished(act, ctl, "beta", "team-b", 0.5, 0.01, status=503)  # failed: not judged
    act.done.appendleft(Outcome(time.monotonic() - 31, "beta", "team-b", 200, 9.0, 0.1, 5, False))  # out of window
    assert not act.live  # finished requests leave the in-flight set
    p = TestClient(app).get("/admin/pool", headers=H).json()
    assert p["latency_window"] is True and p["window_s"] == 30
    models = {mo["name"]: mo for mo in p["models"]}
    a = models["alpha"]
    assert a["requests"] == 6 and a["ttft_p50"] == pytest.approx(0.2) and a["ttft_p99"] == pytest.approx(2.0)
    assert a["tpot_p50"] == pytest.approx(0.05) and a["tpot_p99"] == pytest.approx(0.3)
    assert a["attainment"] == pytest.approx(4 / 6)
    assert models["beta"]["requests"] == 1 and models["beta"]["attainment"] is None  # the old one is out
    tenants = {t["name"]: t for t in p["tenants"]}
    assert tenants["team-a"]["attainment"] == pytest.approx(4 / 5)
    assert tenants["team-b"]["attainment"] == pytest.approx(0.0) and tenants["team-b"]["requests"] == 2


def test_attainment_is_the_windows_while_finished_requests_feed_it(app):
    """A model idle for longer than the window showed the attainment of its last 200 requests (30%, from an hour
    ago) under the Models view's heading "latency and SLO over the last 60 s", and in the Worst SLO attainment tile,
    where its latency said "—" and a tenant's SLO said "—". The window's, as the heading says; the recent requests'
    only where nothing feeds the window."""
    ctl = app.state.controller
    ctl.models["alpha"].outcomes.extend([True] * 3 + [False] * 7)
    ctl.activity = Activity(window_s=30)  # fed (the Controller's), nothing finished in the window
    p = TestClient(app).get("/admin/pool", headers=H).json()
    a = next(m for m in p["models"] if m["name"] == "alpha")
    assert p["latency_window"] is True and a["requests"] == 0 and a["ttft_p50"] is None
    assert a["attainment"] is None
    finished(ctl.activity, ctl, "alpha", "team-a", 0.1, 0.05)
    a = next(m for m in TestClient(app).get("/admin/pool", headers=H).json()["models"] if m["name"] == "alpha")
    assert a["attainment"] == 1.0  # the window's one request, not the recent 3 of 10
    ctl.activity = Activity(window_s=30, hooked=False)  # nothing feeds the window: the recent requests'
    p = TestClient(app).get("/admin/pool", headers=H).json()
    assert p["latency_window"] is False
    assert next(m for m in p["models"] if m["name"] == "alpha")["attainment"] == pytest.approx(0.3)


def test_percentile_nearest_rank():
    assert percentile([], 0.5) is None
    xs = [float(i) for i in range(1, 101)]
    assert percentile(xs, 0.5) == 50.0 and percentile(xs, 0.99) == 99.0 and percentile(xs, 1.0) == 100.0
    assert percentile([3.0], 0.99) == 3.0


def test_load_stalls_are_the_loads_still_in_the_ring_read_once():
    bus, act = EventBus(ring=4), Activity()
    bus.publish("load", engine="w0", model="a", stall_s=0.5)
    bus.publish("admit", model="a")
    assert _load_stalls(act, bus) == {"a": [0.5]}
    bus.publish("load", engine="w0", model="b", stall_s=None)  # (a prefetched load reports no stall)
    assert _load_stalls(act, bus) == {"a": [0.5], "b": [0.0]}  # the new events added, the old not twice
    for _ in range(3):
        bus.publish("admit", model="a")
    assert _load_stalls(act, bus) == {"b": [0.0]}  # a's load left the ring (of 4 events)
    for _ in range(10):  # more events between two reads than the ring holds
        bus.publish("admit", model="a")
    bus.publish("load", engine="w0", model="c", stall_s=1.0)
    assert _load_stalls(act, bus) == {"c": [1.0]}


def test_rates_from_cumulative_counts(app):
    act = Activity()
    assert act.rate("x", {"a": 0.0}, 100.0) == {"a": 0.0}
    assert act.rate("x", {"a": 50.0}, 102.0) == {"a": 25.0}
    assert act.rate("x", {"a": 250.0, "b": 10.0}, 110.0) == {"a": 25.0, "b": 1.0}
    # the oldest sample ages out after the span (10 s): the rate follows the recent slope
    assert act.rate("x", {"a": 250.0, "b": 10.0}, 121.0)["a"] == pytest.approx(0.0)
    # a restarted engine's counter goes down: no negative rate
    assert act.rate("y", {"a": 100.0}, 0.0) == {"a": 0.0}
    assert act.rate("y", {"a": 10.0}, 1.0) == {"a": 0.0}


def test_stats_hook_keeps_a_bounded_timeline():
    act = Activity()
    now = time.time()

    class E:
        id = "w0"
        pool = {"timeline": [[now - 1000, "old", 1, 0.1], [now - 1, "a", 3, 0.5]]}

    act.stats(E)
    act.stats(E)  # the same Stats seen twice (hook and a read): kept once
    assert [r[1] for r in act.timelines["w0"]] == ["a"]  # older than TIMELINE_S: dropped


def test_tokens_per_s_and_tenant_rates_from_the_controllers_counters(app):
    ctl = app.state.controller
    c = TestClient(app)
    t0 = time.monotonic()
    c.get("/admin/pool", headers=H)
    time.sleep(0.6)
    ctl.metrics.generation_tokens.labels("alpha", "team-a").inc(120)
    ctl.metrics.prompt_tokens.labels("alpha", "team-a").inc(30)
    ctl.metrics.requests.labels("alpha", "team-a", "200").inc(3)
    ctl.metrics.requests.labels("alpha", "team-a", "429").inc(2)
    p = c.get("/admin/pool", headers=H).json()
    span = time.monotonic() - t0  # the longest the two answers' clock reads can be apart
    a = {mo["name"]: mo for mo in p["models"]}["alpha"]
    t = {x["name"]: x for x in p["tenants"]}["team-a"]
    assert 120 / span < a["tokens_per_s"] <= 200  # 120 tokens over ~0.6 s (longer on a loaded machine)
    assert 5 / span < t["requests_per_s"] <= 8.4 and t["rejected_total"] == 2
    assert 60 * 150 / 5 < t["tokens_per_min"] <= 60 * 150 / 0.6


def test_a_subs_delta_shape_matches_what_the_serving_layer_raises_on(app):
    # Generation.events turns an error delta into a ServingError: what the client's stream ends with
    ctl = app.state.controller
    ctl.activity = Activity()
    e = engine("w0", {"alpha": "ready"})
    ctl.pool.engines["w0"] = e
    g = gen_for(ctl, "alpha", "team-a", "cmpl-5")
    ctl.activity.started(g, "cmpl-5")
    ctl.pool.submit(e, g.subs[0])
    TestClient(app).post("/admin/requests/cmpl-5/cancel", headers=H)

    async def drain():
        async for _ in g.events():
            pass

    from controller.errors import ServingError

    with pytest.raises(ServingError, match="cancelled by an operator"):
        asyncio.run(drain())


def test_timeline_compaction_bounds_its_size_and_keeps_who_ran():
    act = Activity()
    now = 10_000.0
    # 20 s of a switch every 5 ms between a and b, a getting 4 ms of each 5, then 1 s of c alone, then idle
    runs, t = [], now - 30
    for _ in range(4000):
        runs += [[t, "a", 2, 0.004], [t + 0.004, "b", 1, 0.001]]
        t += 0.005
    runs.append([now - 10, "c", 40, 1.0])
    act.timelines["w0"] = deque(runs)  # (add_runs would drop these: older than 300 s by the wall clock)
    raw = act.timeline("w0", now, 60, 0)
    assert len(raw) == 8001
    out = act.timeline("w0", now, 60, 0.25)
    assert [r[1] for r in out] == ["a", "c"]  # a ran most of every cell; then c: two runs, merged across cells
    a, c = out
    assert a[0] == pytest.approx(now - 30) and a[3] == pytest.approx(20.0) and a[2] == 8000
    assert c == [now - 10, "c", 40, 1.0]
    # a shorter span cuts the start; a coarse resolution still says who ran
    assert act.timeline("w0", now, 15, 0.25) == [[pytest.approx(now - 15), "a", 2000, pytest.approx(5.0, abs=1e-6)],
                                                 c]  # (the steps are those of the model shown: b's not counted)


def test_evict_takes_an_alias_and_duplicate_model_names_are_named():
    """POST /admin/models/ALIAS/evict evicts the model the alias names (`tokenpool stop ALIAS`, Ollama's stop by
    the name it used), as the serving routes resolve it; it was a 404. A configuration naming a model twice says
    which."""
    import pydantic

    spec = ModelSpec(name="real-name", path=None, engine={"kind": "pace"}, aliases=["nick"])
    app = build_app(ServerConfig(admin_token_hash=hash_key(ADMIN), models=[], auth=False))
    asyncio.run(app.state.controller.add_model(spec))
    r = TestClient(app).post("/admin/models/nick/evict", headers=H)
    assert r.status_code == 200 and r.json()["name"] == "real-name", r.text
    assert TestClient(app).post("/admin/models/nope/evict", headers=H).status_code == 404
    with pytest.raises(pydantic.ValidationError, match="model names must be unique: twice more than once"):
        ServerConfig.model_validate({"models": [{"name": n, "engine": {"kind": "pace"}} for n in ("twice", "twice", "x")]})


def test_a_request_waiting_for_a_registration_the_autoscaler_drops_registers_it_again(app):
    """The autoscaler drops beta's registration on w0 while a request waits for it to load: the request registers
    beta there again and goes to it once it is loaded (it got a 503 'could not be registered')."""
    ctl = app.state.controller
    w0 = engine("w0", {"beta": "loading"})
    ctl.pool.engines["w0"] = w0
    entry = ctl.models["beta"]
    sub = Sub("cmpl-drop-0", "beta", 0, [1, 2, 3], {}, 8, asyncio.Queue())

    async def main():
        task = asyncio.create_task(ctl._place(sub, entry, entry.spec.slo, 0, False))
        first = w0.replicas["beta"]
        for _ in range(100):  # until the request waits for the load
            await asyncio.sleep(0.01)
        assert not task.done()
        ctl._unregister(w0, "beta", "autoscaler: an extra registration went cold")
        assert first.state == "dropped"
        for _ in range(100):
            await asyncio.sleep(0.01)
            if task.done() or w0.replicas.get("beta") not in (None, first):
                break
        again = w0.replicas.get("beta")
        assert again is not None and again is not first, task.exception() if task.done() else "not registered"
        again.state = "ready"
        again.ready.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(main())
    assert sub.engine_id == "w0" and "cmpl-drop-0" in w0.subs


def test_a_worker_that_joins_while_start_registers_the_models_waits_for_all_of_them():
    """`start` starts the local workers before it reads the configured models' tokenizers (their start-ups overlap):
    a worker that joins in between is judged against the pins of every configured model, and is not ready, only
    once they are all registered. Placed at its join, the pins were checked with no model, and never again."""
    cfg = ServerConfig(admin_token_hash=hash_key(ADMIN), models=[
        ModelSpec(name=n, path=None, engine={"kind": "pace"}, memory_gb=gb, pin=True) for n, gb in
        (("alpha", 8), ("beta", 8), ("gamma", 10))])
    ctl = build_app(cfg).state.controller
    stopped, seen = [], []
    ctl.on_fatal = lambda: stopped.append(True)

    async def pool_start(devices, hold_joins=False):  # the worker joins at once, before any model is registered
        ctl.pool.local_slots = 1
        seen.append(joins(ctl, "w0", 0, 20 * 10**9))
        seen.append(ctl.ready())

    ctl.pool.start = pool_start
    asyncio.run(ctl.start())
    for t in ctl._tasks:
        t.cancel()
    assert seen[1] is False and stopped == [True] and seen[0].replicas == {}
    assert "'gamma' could never load" in ctl.fatal
