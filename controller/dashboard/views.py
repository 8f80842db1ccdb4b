"""What the admin API shows of the live controller: builders from its state to the admin protocol models.

They read `ctl.pool.engines` (each engine's `pool` dict, the pooled engine's state from its worker's Stats,
when the worker sends one; else the per-model `stats`), `ctl.models`, `ctl.tenants`, the Prometheus counters
the controller keeps, and the rolling window of `controller.dashboard.activity`. Nothing here changes serving
state except `cancel`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from pydantic_core import to_json

from controller.api import admin_protocol as ap
from controller.dashboard.activity import RES_S, SPAN_S, WINDOW_S, Activity
from controller.dashboard.stream import after, last_seq, snapshot_frame
from controller.errors import ServingError
from controller.events import EventBus

CANCELLED = "cancelled by an operator"
SNAPSHOT_REQUESTS = 500  # the oldest in flight, in each snapshot
STATE_ORDER = ("resident", "loading", "host")  # a model's state is the best of its engines'


def activity(ctl: Any) -> Activity:
    """The controller's Activity (Controller.__init__ makes it; made here when it does not yet)."""
    act = getattr(ctl, "activity", None)
    if act is None:
        act = ctl.activity = Activity(hooked=False)
    return act


def events(ctl: Any) -> EventBus:
    bus = getattr(ctl, "events", None)
    if bus is None:
        bus = ctl.events = EventBus()
    return bus


def request_id_of(engine_rid: str) -> str:
    """An API request's id from one of its engine requests' ids (f"{request_id}-{choice}")."""
    return engine_rid.rsplit("-", 1)[0]


def _counts(counter: Any, *labels: str) -> dict[tuple[str, ...], float]:
    """A Prometheus counter's totals summed over the labels not named."""
    out: dict[tuple[str, ...], float] = {}
    for fam in counter.collect():
        for s in fam.samples:
            if s.name.endswith("_total"):
                k = tuple(s.labels[x] for x in labels)
                out[k] = out.get(k, 0.0) + s.value
    return out


def resident_models(engines: Any) -> set[str]:
    """The models whose weights are in VRAM now on some live engine of `engines` (an EnginePool's)."""
    return {n for e in engines if e.alive for n, m in engine_models(e).items() if m["state"] == "resident"}


def engine_models(e: Any) -> dict[str, dict[str, Any]]:
    """Per registered model on one engine: state, waiting, running, oldest_wait_s, kv_pages_used, kv_swapped."""
    pool = getattr(e, "pool", None) or {}
    if pool.get("models") is not None:  # (an engine reports oldest_wait_s 0.0 with none waiting: no wait, None)
        return {n: dict(state=pm.get("state", "host"), waiting=int(pm.get("waiting", 0)),
                        running=int(pm.get("running", 0)),
                        oldest_wait_s=pm.get("oldest_wait_s") if int(pm.get("waiting", 0)) else None,
                        kv_pages_used=int(pm.get("kv_pages_used", 0)), kv_swapped=int(pm.get("kv_swapped", 0)))
                for n, pm in pool["models"].items()}
    out = {}
    for n, r in e.replicas.items():
        s = e.stats.get(n, {})
        out[n] = dict(state={"ready": "resident"}.get(r.state, r.state), waiting=int(s.get("num_waiting", 0)),
                      running=int(s.get("num_running", 0)), oldest_wait_s=None,
                      kv_pages_used=int(s.get("kv_blocks_used", 0)),
                      kv_swapped=int(s.get("kv_blocks_swapped", 0)))  # (pages, as a pooled engine's: not requests)
    return out


def engine_active(e: Any, models: dict[str, dict[str, Any]]) -> str | None:
    """The model running now on engine `e` (`models`: engine_models(e)): the pooled engine's active one while it has
    requests running there, else the one with the most running. A model of another kind (a pace engine) runs beside
    the pooled engine's turns, and the pool's `active` went on naming the model of its last turn: the dashboard said
    it ran while only the pace model did. Idle: the model of the last turn. None for an engine that reports no pool
    (its models run side by side: none is the one running)."""
    pool = getattr(e, "pool", None)
    if not pool:
        return None
    active = pool.get("active")
    busy = {n: m["running"] for n, m in models.items() if m["running"]}
    return max(busy, key=busy.__getitem__) if busy and active not in busy else active


def _engine_out(ctl: Any, act: Activity, e: Any, now: float, span_s: float, res_s: float,
                switched: dict[str, float] | None = None) -> ap.EnginePoolOut:
    """`switched`: each engine's model switches since the server started (tokenpool_model_switches_total). The
    worker's own count starts again at 0 whenever its pooled engine is made anew (its last model unregistered: a
    drain and resume, every model removed; a worker replaced), which left the card and the Switches tile at 0 beside
    /metrics' hundreds."""
    pool = getattr(e, "pool", None) or {}
    models = engine_models(e)
    if "timeline" in pool:
        act.stats(e)  # idempotent: Controller._stats does the same on every Stats once it calls act.stats
    elif e.alive:
        busy = max(models.items(), key=lambda kv: kv[1]["running"], default=(None, {"running": 0}))
        act.sample_timeline(e.id, busy[0] if busy[1]["running"] else None, now)
    if pool:
        vram = ap.VramOut(**pool["vram"]) if pool.get("vram") else None
        registered = list(pool.get("registered", models))
    else:
        infos = {n: me.info.size_bytes for n, me in ctl.models.items()}
        weights = sum(infos.get(n, 0) for n, r in e.replicas.items() if r.state == "ready")
        vram = ap.VramOut(budget_bytes=e.memory_bytes, weights_bytes=weights,
                          free_bytes=max(0, e.memory_bytes - weights))
        registered = list(e.replicas)
    resident = list(pool.get("resident", [n for n, pm in models.items() if pm["state"] == "resident"]))
    prefetching = list(pool.get("prefetching", []))
    if not e.alive:
        # a dead worker holds nothing: its last report's models and memory stayed on its card until it was pruned
        # (30 s for a remote worker), "resident" beside the models' new engines
        registered, resident, prefetching, vram = [], [], [], None
    return ap.EnginePoolOut(
        id=e.id, device=e.device, host=e.host, alive=e.alive, draining=e.draining, pooled=bool(pool),
        inflight=len(e.subs), step_s=e.step_s, active=engine_active(e, models), registered=registered,
        resident=resident, prefetching=prefetching,
        switches=None if pool.get("switches") is None else int(max(pool["switches"], (switched or {}).get(e.id, 0))),
        switch_stall_s=pool.get("switch_stall_s"), steps=pool.get("steps"), vram=vram,
        host_cache_bytes=pool.get("host_cache_bytes"), kv_page_bytes=pool.get("kv_page_bytes"),
        timeline=[tuple(r) for r in act.timeline(e.id, now, span_s, res_s)])


def _load_stalls(act: Activity, bus: EventBus) -> dict[str, list[float]]:
    """Per model, the stall of each engine weight load whose event the bus's ring still holds. Only the events
    published since the last read are looked at: walking the whole ring (2048 events, cold in the cache under
    load) each tick was a quarter of the dashboard snapshot's CPU."""
    new = after(bus, act.loads_seq)
    act.loads.extend((e["seq"], e["model"], float(e.get("stall_s") or 0.0)) for e in new
                     if e["kind"] == "load" and e.get("model") is not None)
    act.loads_seq = last_seq(bus)
    while act.loads and act.loads[0][0] < bus.recent[0]["seq"]:  # gone from the ring
        act.loads.popleft()
    stalls: dict[str, list[float]] = {}
    for _, model, stall in act.loads:
        stalls.setdefault(model, []).append(stall)
    return stalls


def pool_view(ctl: Any, timeline_s: float = SPAN_S, resolution_s: float = RES_S) -> ap.PoolOut:
    act = activity(ctl)
    now, mono = time.time(), time.monotonic()
    alive = [e for e in ctl.pool.engines.values() if e.alive]
    switched = {k[0]: v for k, v in _counts(ctl.metrics.switches, "engine").items()}
    engines = [_engine_out(ctl, act, e, now, timeline_s, resolution_s, switched) for e in ctl.pool.engines.values()]
    per_engine = {e.id: engine_models(e) for e in alive}

    tps = act.rate("model_tokens", model_tokens(ctl, act), mono)
    rejected = {k[0]: v for k, v in _counts(ctl.metrics.rejected, "model").items()}
    asked = {k[0]: v for k, v in _counts(ctl.metrics.cache_queries, "model").items()}
    found = {k[0]: v for k, v in _counts(ctl.metrics.cache_hits, "model").items()}
    win = act.by_model(mono)
    stalls = _load_stalls(act, events(ctl))
    failed = ctl.load_errors()
    models = []
    for name, me in ctl.models.items():
        pms = {eid: pm[name] for eid, pm in per_engine.items() if name in pm}
        states = {pm["state"] for pm in pms.values()}
        state = next((s for s in STATE_ORDER if s in states), "failed" if name in failed else "unplaced")
        w = win.get(name, {})
        waits = [pm["oldest_wait_s"] for pm in pms.values() if pm["oldest_wait_s"] is not None]
        models.append(ap.ModelPoolOut(
            name=name, engines=sorted(pms), state=state, load_error=failed.get(name),
            pinned=bool(getattr(me, "pinned", False)), loras=me.spec.lora_names, size_bytes=me.info.size_bytes,
            cache_hit_frac=found.get(name, 0.0) / asked[name] if asked.get(name) else None,
            load_s=me.info.load_s,
            loads=len(stalls.get(name, ())),
            load_stall_s=sum(stalls[name]) / len(stalls[name]) if stalls.get(name) else None,
            waiting=sum(pm["waiting"] for pm in pms.values()), oldest_wait_s=max(waits) if waits else None,
            running=sum(pm["running"] for pm in pms.values()),
            kv_pages_used=sum(pm["kv_pages_used"] for pm in pms.values()),
            kv_swapped=sum(pm["kv_swapped"] for pm in pms.values()),
            tokens_per_s=tps.get(name, 0.0), requests=w.get("requests", 0),
            ttft_p50=w.get("ttft_p50"), ttft_p99=w.get("ttft_p99"), tpot_p50=w.get("tpot_p50"),
            tpot_p99=w.get("tpot_p99"),
            # the window's, as the page's heading says ("over the last 60 s"; a model idle that long has none, as a
            # tenant has none); the last 200 requests' (its SLO gauge in /metrics) only where nothing feeds the window
            attainment=w.get("attainment") if act.hooked else me.attainment(),
            rejected_total=int(rejected.get(name, 0)), slo=me.spec.slo.model_dump()))

    reqs = _counts(ctl.metrics.requests, "tenant", "status")
    per_tenant = tenant_requests(act)
    r429: dict[str, float] = {}
    for (tname, status), v in reqs.items():
        per_tenant[tname] = per_tenant.get(tname, 0.0) + v
        if status == "429":
            r429[tname] = r429.get(tname, 0.0) + v
    toks = tenant_tokens(ctl, act)
    rps = act.rate("tenant_requests", per_tenant, mono)
    tpm = act.rate("tenant_tokens", toks, mono, WINDOW_S)
    rpm = act.rate("tenant_429", r429, mono, WINDOW_S)
    twin = act.by_tenant(mono)
    tenants = list(ctl.tenants.all())
    if not ctl.tenants.auth:
        tenants.append(ctl.tenants.authenticate(None))  # the anonymous tenant everyone is, without auth
    tout = [ap.TenantPoolOut(
        name=t.name, requests_per_s=rps.get(t.name, 0.0), tokens_per_min=60.0 * tpm.get(t.name, 0.0),
        concurrency=t.inflight, max_concurrent=t.spec.max_concurrent, rejected_total=int(r429.get(t.name, 0)),
        rejected_per_min=60.0 * rpm.get(t.name, 0.0), requests=twin.get(t.name, {}).get("requests", 0),
        attainment=twin.get(t.name, {}).get("attainment")) for t in tenants]
    bus = events(ctl)
    return ap.PoolOut(t=now, window_s=act.window_s, latency_window=act.hooked, auth=bool(ctl.tenants.auth),
                      engines=engines, models=models,
                      tenants=tout, events=dict(bus.counts), event_subscribers=bus.subscribers)


def model_tokens(ctl: Any, act: Activity) -> dict[str, float]:
    """Tokens made so far per model (the pool view's tokens/s is their rate): ended requests' (the Prometheus counter,
    counted as a request ends) and those of the requests in flight, every choice's (one already done too: a request
    of n > 1 dipped the rate as each of its choices left its engine) and a continuation's earlier ones
    (Controller.go_on); never an Ollama load's (no tokens metric counts its one token)."""
    tokens = {k[0]: v for k, v in _counts(ctl.metrics.generation_tokens, "model").items()}
    for gen, subs in _in_flight(ctl, act).values():
        if gen is None or not getattr(gen, "load", False):
            for s in subs:
                tokens[s.model] = tokens.get(s.model, 0.0) + s.generated + s.earlier
    return tokens


def tenant_tokens(ctl: Any, act: Activity) -> dict[str, float]:
    """Tokens (prompt and generated) so far per tenant (the Tenants view's tokens/min is their rate): ended requests'
    (the Prometheus counters, counted as a request ends) and those of its requests in flight, as Controller.finished
    will count them (its prompt once a token came, every token made so far). Only the counters' left a tenant's
    long streams out until each ended: 0 tokens/min while it streamed, beside its model's tokens/s, then a spike."""
    toks = {k[0]: v for k, v in _counts(ctl.metrics.generation_tokens, "tenant").items()}
    for k, v in _counts(ctl.metrics.prompt_tokens, "tenant").items():
        toks[k[0]] = toks.get(k[0], 0.0) + v
    for gen in _tenants_live(act):
        made = getattr(gen, "completion_tokens", 0) + (getattr(gen, "prompt_tokens", 0) if gen.t_first is not None else 0)
        toks[gen.tenant.name] = toks.get(gen.tenant.name, 0.0) + made
    return toks


def tenant_requests(act: Activity) -> dict[str, float]:
    """Requests in flight per tenant, from the moment they arrive (Activity.started: before admission), to be added
    to the ended ones (the Prometheus counter, counted as a request ends, a refusal's at once): the sum is every
    request that arrived, each counted once (Controller.finished moves one from the first to the second), and the
    Tenants view's requests/s is its rate: requests arriving per second, what an operator reads beside the tenant's
    req/s limit. The ended ones alone counted a request only at its end: a tenant's long streams showed 0 requests/s
    while they ran, then a spike. Not an Ollama load's (counted among the requests only when it fails)."""
    out: dict[str, float] = {}
    for gen in _tenants_live(act):
        out[gen.tenant.name] = out.get(gen.tenant.name, 0.0) + 1
    return out


def _tenants_live(act: Activity) -> Iterator[Any]:
    """A tenant's requests in flight, each as Controller.finished will count it: not an Ollama load (no tokens, and
    among the requests only when it fails)."""
    return (g for g in act.live.values() if not getattr(g, "load", False) and getattr(g, "tenant", None) is not None)


def _in_flight(ctl: Any, act: Activity) -> dict[str, tuple[Any, list[Any]]]:
    """request id -> (its Generation when the controller reports it, else None; its engine requests)."""
    out: dict[str, tuple[Any, list[Any]]] = {rid: (g, list(g.subs)) for rid, g in act.live.items()}
    for e in ctl.pool.engines.values():
        for s in e.subs.values():
            rid = request_id_of(s.rid)
            if rid not in out:
                out[rid] = (None, [])
            if out[rid][0] is None:
                out[rid][1].append(s)
    return out


def asked_model(model: str, lora: str | None) -> dict[str, str]:
    """A request's model as an event or the dashboard names it: the name it asked for (a LoRA adapter's), and the
    model serving it as base_model where that differs."""
    return {"model": lora, "base_model": model} if lora is not None and lora != model else {"model": model}


def on_engine(ctl: Any, s: Any) -> bool:
    """Engine request `s` is on an engine now: sent there, and not since given back (its engine failed and it waits
    to be sent again: its `engine_id` still names the failed one)."""
    e = ctl.pool.engines.get(s.engine_id) if s.engine_id else None
    return e is not None and e.subs.get(s.rid) is s


def requests_view(ctl: Any) -> list[dict[str, Any]]:
    """The requests in flight, oldest first: ap.RequestOut's fields, as dicts (the route validates them; the
    snapshot, which builds them every tick, need not: even model_construct was 60% of this function's CPU).
    Its state: "queued" at the controller (waiting for an engine, or its model's load there), "prefill" on an
    engine before its first token (waiting there, for its turn or its weights' load into VRAM, or prefilling its
    prompt: vLLM's WAITING and its first RUNNING step), "running" once a token came."""
    act = activity(ctl)
    now, mono = time.time(), time.monotonic()
    flying = _in_flight(ctl, act)
    for rid in [r for r in act.first_seen if r not in flying]:
        del act.first_seen[rid]
    out = []
    for rid, (gen, every) in flying.items():
        subs = [s for s in every if not s.done]
        if not subs:
            continue
        # every choice's tokens, those of a choice already done too (n > 1: the count went down as each ended, and
        # its tokens/s with it), and a continuation's earlier ones (Controller.go_on)
        tokens = sum(s.generated + s.earlier for s in every)
        if gen is not None:
            age = now - gen.t_wall
            run = mono - gen.t_first if gen.t_first is not None else 0.0
            tenant = gen.tenant.name
        else:
            age = run = now - act.first_seen.setdefault(rid, now)
            tenant = None
        engines = sorted({s.engine_id for s in subs if on_engine(ctl, s)})
        # the model it asked for (a LoRA adapter's name), and the model serving it (base_model) where that differs
        named = asked_model(subs[0].model, getattr(subs[0].params, "lora", None))
        out.append(dict(id=rid, model=named["model"], base_model=named.get("base_model"), tenant=tenant, engines=engines,
                        state="running" if tokens else "prefill" if engines else "queued", age_s=max(0.0, age),
                        tokens=tokens,
                        tokens_per_s=tokens / run if run > 0 else 0.0, choices=len(subs)))
    out.sort(key=lambda r: -r["age_s"])
    return out


def snapshot(ctl: Any, max_requests: int = SNAPSHOT_REQUESTS) -> bytes:
    """The dashboard's gauges as SSE frames, built once a second for every open dashboard
    (controller.dashboard.stream.Hub): `event: pool` (GET /admin/pool's body), `event: inflight` (how many requests
    are in flight) and `event: requests` (GET /admin/requests' body, its oldest `max_requests`: past them the
    page's count said max_requests however many more there were)."""
    reqs = requests_view(ctl)
    return (snapshot_frame("pool", pool_view(ctl).model_dump_json())
            + snapshot_frame("inflight", str(len(reqs)))
            + snapshot_frame("requests", to_json(reqs[:max_requests])))


def cancel(ctl: Any, request_id: str) -> ap.CancelOut:
    """End an in-flight request: its stream gets an error event, its engine requests are aborted."""
    gen, subs = _in_flight(ctl, activity(ctl)).get(request_id, (None, []))
    subs = [s for s in subs if not s.done]
    if not subs:
        raise ServingError(404, f"no request {request_id!r} in flight", code="request_not_found")
    ctl.pool.end(subs, CANCELLED, "engine")
    tenant = gen.tenant.name if gen is not None else None
    events(ctl).publish("cancel", request_id=request_id, **asked_model(subs[0].model, getattr(subs[0].params, "lora", None)),
                        tenant=tenant)
    return ap.CancelOut(id=request_id, model=subs[0].model, cancelled=len(subs))
