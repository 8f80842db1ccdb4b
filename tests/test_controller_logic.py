"""Pure controller logic: admission estimates, routing/placement, autoscaler hysteresis, limits, keys, wire format."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from controller import messages as m
from controller.admission import decide, estimate_ttft, expected_tokens
from controller.autoscaler import Autoscaler, ModelLoad
from controller.config import AutoscalerSettings, EngineOptions, ServerConfig, TenantSpec
from controller.keys import hash_key, is_key_hash, new_key, verify_key
from controller.router import (
    EngineView,
    ModelInfo,
    ReplicaView,
    estimate_on,
    pin_blocks,
    place,
    rebalance,
    route,
    starved_by_pins,
    weight,
    with_registration,
)
from controller.tenants import Tenant, TenantRegistry, TokenBucket
from token_scheduler.policies.slo import ModelSLO
from token_scheduler.request import SamplingParams

GB = 1 << 30


# --- admission ---
def test_idle_engine_first_token_after_one_step():
    assert estimate_ttft([], [], max_num_seqs=4, step_s=0.1) == pytest.approx(0.1)
    assert estimate_ttft([], [], 4, 0.1, load_s=2.0, prefill_s=0.3) == pytest.approx(2.4)


def test_full_engine_waits_for_first_free_slot():
    # two slots busy for 10 and 3 more steps: we start when the second frees
    assert estimate_ttft([10, 3], [], max_num_seqs=2, step_s=0.1) == pytest.approx(0.3 + 0.1)
    # a queued request (5 steps) takes that slot first (0.3 -> 0.8); we get it after, before the 1.0 one
    assert estimate_ttft([10, 3], [5], max_num_seqs=2, step_s=0.1) == pytest.approx(0.8 + 0.1)


@given(st.lists(st.integers(1, 200), max_size=20), st.lists(st.integers(1, 200), max_size=20), st.integers(1, 8))
@settings(max_examples=60, deadline=None)
def test_estimate_is_monotone_in_queue(running, waiting, seqs):
    base = estimate_ttft(running, waiting, seqs, 0.05)
    assert estimate_ttft(running, [*waiting, 7], seqs, 0.05) >= base
    assert base >= 0.05


def test_decide_admits_unqueued_even_if_slo_impossible():
    assert decide(5.0, queued=False, slo_ttft_s=0.1, slack=1.0, queue_len=0, max_queue=10).admit
    d = decide(5.0, queued=True, slo_ttft_s=1.0, slack=1.0, queue_len=3, max_queue=10)
    assert not d.admit and d.retry_after_s == 4
    assert not decide(0.0, False, 1.0, 1.0, queue_len=10, max_queue=10).admit


def test_expected_tokens_uses_observed_mean():
    assert expected_tokens(100, 10, None) == 90
    assert expected_tokens(100, 10, 0.3) == 20
    assert expected_tokens(100, 99, 0.3) == 1


# --- routing / placement ---
def _models(*specs):
    return {n: ModelInfo(n, s * GB, p) for n, s, p in specs}


def test_route_prefers_lower_estimated_ttft():
    models = _models(("a", 1, 0))
    busy = EngineView("e0", 10 * GB, {"a": ReplicaView("a", True, 2, (50, 50), (20,))})
    idle = EngineView("e1", 10 * GB, {"a": ReplicaView("a", True, 2)})
    rt = route(models["a"], [busy, idle])
    assert rt.engine_id == "e1" and not rt.load and not rt.queued


def test_route_counts_prefill_of_the_prompt_and_the_queue_and_a_weight_load():
    """The pool's own estimate: prompt tokens (ours and those queued ahead) times the fitted prefill seconds
    per token, plus the load when the model's weights are not in that GPU's VRAM."""
    models = _models(("a", 1, 0))
    rv = ReplicaView("a", True, 8, step_s=0.01, prefill_s_per_token=0.001, queued_prompt_tokens=2000)
    cold = ReplicaView("a", True, 8, step_s=0.01, prefill_s_per_token=0.001, load_s=0.5)
    e0, e1 = EngineView("e0", 10 * GB, {"a": rv}, step_s=0.01), EngineView("e1", 10 * GB, {"a": cold}, step_s=0.01)
    assert estimate_on(e0, rv, 100)[0] == pytest.approx(2.1 + 0.01)
    assert estimate_on(e1, cold, 100)[0] == pytest.approx(0.5 + 0.1 + 0.01)
    rt = route(models["a"], [e0, e1], 100)
    assert rt.engine_id == "e1" and rt.prefill_s == pytest.approx(0.1)  # a 0.5 s load beats 2 s of queued prompts
    assert route(models["a"], [e0, e1], 0).engine_id == "e1"
    rv2 = ReplicaView("a", True, 8, step_s=0.01, prefill_s_per_token=0.001, queued_prompt_tokens=100)
    e0 = EngineView("e0", 10 * GB, {"a": rv2}, step_s=0.01)
    assert route(models["a"], [e0, e1], 100).engine_id == "e0"


def test_route_never_loads_or_evicts_unregistered_models():
    models = _models(("a", 6, 0), ("hot", 6, 1))
    e0 = EngineView("e0", 10 * GB, {"a": ReplicaView("a", True, 4, (5,))})
    assert route(models["hot"], [e0]) is None  # the caller registers it (place), nothing is evicted


def test_place_registers_beyond_vram_and_balances_bytes():
    """Registrations are host copies in a pooled engine: an engine takes more model bytes than its weight space;
    placement keeps the registered bytes per engine even and only refuses a model bigger than the space."""
    models = _models(("a", 6, 0), ("b", 6, 0), ("c", 6, 0), ("big", 12, 0))
    e0 = EngineView("e0", 10 * GB, {"a": ReplicaView("a", True, 4), "b": ReplicaView("b", True, 4)})
    e1 = EngineView("e1", 10 * GB, {"b": ReplicaView("b", True, 4)})
    rt = place(models["c"], [e0, e1], models)
    assert rt.engine_id == "e1" and rt.load
    assert place(models["c"], [e0], models).engine_id == "e0"  # 18 GB registered on a 10 GB engine
    assert place(models["big"], [e0, e1], models) is None  # its weights can never fit a slot


def test_route_skips_draining_and_dead_engines():
    models = _models(("a", 1, 0))
    views = [EngineView("e0", 10 * GB, {"a": ReplicaView("a", True, 4)}, draining=True),
             EngineView("e1", 10 * GB, {"a": ReplicaView("a", True, 4)}, alive=False)]
    assert route(models["a"], views) is None
    assert place(models["a"], views, models) is None


def test_placement_gives_each_model_its_minimum_and_shares_engines():
    # the live path: each tick the autoscaler places what is below its minimum (one registration per model a tick)
    a = Autoscaler(AutoscalerSettings(enabled=False))
    loads = [ModelLoad(ModelInfo("big", 6 * GB, 1), 2, 2, 0, 4), _load("s1", 0), _load("s2", 0)]
    engines = [EngineView("e0", 10 * GB), EngineView("e1", 10 * GB)]
    for _ in range(3):
        for x in a.plan(loads, engines):
            assert x.kind in ("load", "move")
            engines = with_registration(engines, x.engine_id, x.model)
            if x.kind == "move":  # (its old registration goes once the new one is up)
                engines = [replace(e, replicas={n: r for n, r in e.replicas.items() if n != x.model})
                           if e.engine_id == x.source else e for e in engines]
        engines = [replace(e, replicas={n: replace(r, ready=True) for n, r in e.replicas.items()}) for e in engines]
    on = {e.engine_id: set(e.replicas) for e in engines}
    assert on == {"e0": {"big", "s2"}, "e1": {"big", "s1"}}  # big on both engines, the small ones shared out
    assert a.plan(loads, engines) == []  # every minimum met, the shares even: nothing more


def test_many_models_on_one_engine_exceed_its_vram():
    a = Autoscaler(AutoscalerSettings(enabled=False))
    acts = a.plan([_load(f"m{i}", 0, size=4) for i in range(10)], [EngineView("e0", 10 * GB)])
    assert [(x.kind, x.engine_id) for x in acts] == [("load", "e0")] * 10  # 40 GB registered on 10 GB of VRAM


def test_admission_refuses_a_prompt_whose_prefill_alone_misses_the_ttft_slo():
    d = decide(0.5, queued=False, slo_ttft_s=1.0, slack=1.0, queue_len=0, max_queue=10, prefill_s=1.5)
    assert not d.admit and "prefill" in d.reason and d.retry_after_s >= 1
    assert decide(0.5, False, 1.0, 1.0, 0, 10, prefill_s=0.9).admit


# --- autoscaler ---
def _load(name, inflight, cap=4, lo=1, hi=3, att=None, size=1):
    return ModelLoad(ModelInfo(name, size * GB), lo, hi, inflight, cap, att)


def test_autoscaler_scales_up_after_sustained_heat_only():
    a = Autoscaler(AutoscalerSettings(up_ticks=2, down_ticks=3))
    engines = [EngineView("e0", 10 * GB, {"m": ReplicaView("m", True, 4, (9,) * 4)}), EngineView("e1", 10 * GB)]
    assert a.plan([_load("m", 4)], engines) == []  # one hot tick is not enough
    acts = a.plan([_load("m", 4)], engines)
    assert [(x.kind, x.model, x.engine_id) for x in acts] == [("load", "m", "e1")]
    assert a.plan([_load("m", 4)], engines) == []  # counter restarted (cooldown)


def test_autoscaler_hysteresis_band_and_scale_down():
    a = Autoscaler(AutoscalerSettings(up_ticks=1, down_ticks=3, up_load=0.8, down_load=0.2))
    two = [EngineView("e0", 10 * GB, {"m": ReplicaView("m", True, 4)}),
           EngineView("e1", 10 * GB, {"m": ReplicaView("m", True, 4)})]
    for _ in range(5):  # load 0.5: inside the band, nothing moves
        assert a.plan([_load("m", 4)], two) == []
    assert a.plan([_load("m", 0)], two) == [] and a.plan([_load("m", 0)], two) == []
    acts = a.plan([_load("m", 0)], two)
    assert len(acts) == 1 and acts[0].kind == "unload"


def test_autoscaler_restores_minimum_and_scales_on_slo_misses():
    a = Autoscaler(AutoscalerSettings(up_ticks=1))
    engines = [EngineView("e0", 10 * GB, {"m": ReplicaView("m", True, 64, (1,))}), EngineView("e1", 10 * GB)]
    assert [x.kind for x in a.plan([_load("m", 1, cap=64, att=0.5)], engines)] == ["load"]
    assert [(x.model, x.engine_id) for x in a.plan([_load("z", 0, lo=1)], [EngineView("e0", 10 * GB)])] == [("z", "e0")]
    # cold models share an engine from the first tick
    acts = a.plan([_load("p", 0), _load("q", 0)], [EngineView("e0", 10 * GB)])
    assert sorted((x.model, x.engine_id) for x in acts) == [("p", "e0"), ("q", "e0")]


# --- tenants ---
def test_token_bucket_refill_and_retry_after():
    b = TokenBucket(rate=2.0, capacity=2.0, now=0.0)
    assert b.take(1, now=0.0) == 0 and b.take(1, now=0.0) == 0
    assert b.take(1, now=0.0) == pytest.approx(0.5)
    assert b.take(1, now=0.5) == 0


def test_tenant_limits_and_release():
    t = Tenant(TenantSpec(name="t", rate={"requests_per_s": 1, "tokens_per_min": 120}, max_concurrent=2))
    t0 = t.rps.t
    assert TenantRegistry.acquire(t, 100, now=t0) is None
    retry, why = TenantRegistry.acquire(t, 10, now=t0)
    assert retry >= 1 and "request rate" in why
    retry, why = TenantRegistry.acquire(t, 100, now=t0 + 1)  # a request is due, 100 tokens are not
    assert retry >= 1 and "token rate" in why
    TenantRegistry.release(t, charged=100, prompt_tokens=10, completion_tokens=10)  # refunds 80 tokens
    assert TenantRegistry.acquire(t, 90, now=t0 + 1) is None
    assert t.inflight == 1


def test_keys_are_salted_hashes():
    k = new_key()
    h1, h2 = hash_key(k), hash_key(k)
    assert h1 != h2 and k not in h1 and is_key_hash(h1)
    assert verify_key(k, h1) and verify_key(k, h2) and not verify_key(k + "x", h1)
    assert not verify_key(k, "garbage")


def test_registry_authenticates_and_persists_only_hashes(tmp_path):
    f = tmp_path / "tenants.yaml"
    reg = TenantRegistry([], auth=True, tenants_file=str(f))
    t, key = reg.create(TenantSpec(name="acme", models=["a*"]))
    assert reg.authenticate(key) is t and reg.authenticate("nope") is None and reg.authenticate(None) is None
    assert key not in f.read_text() and "sha256$" in f.read_text()
    again = TenantRegistry([], auth=True, tenants_file=str(f))
    assert again.authenticate(key).name == "acme"
    assert t.may_use("abc") and not t.may_use("b")


# --- config ---
def test_config_validation():
    with pytest.raises(ValidationError):
        ServerConfig.model_validate({"tenants": [{"name": "x", "key_hashes": ["plaintext-key"]}]})
    with pytest.raises(ValidationError):
        ServerConfig.model_validate({"models": [{"name": "m"}]})  # a path is needed for a real engine
    with pytest.raises(ValidationError):
        ServerConfig.model_validate({"models": [{"name": "m", "path": "/x", "replicas": {"min": 3, "max": 1}}]})
    cfg = ServerConfig.model_validate({"tenants": [{"name": "x", "key_hashes": [hash_key("k")]}]})
    assert cfg.auth_enabled and cfg.listen.host == "127.0.0.1"


# --- wire format ---
def test_messages_round_trip():
    msgs = [m.Register("h", 1, "cpu", 10, slot=0, join_token="t"), m.Registered("w0", 0.5), m.Heartbeat(1.5),
            m.NewRequest("r", "m", [1, 2], SamplingParams(max_tokens=3, stop="\n", seed=7)), m.Abort(["r"]),
            m.LoadModel("m", "/x", EngineOptions(kind="pace", max_num_seqs=8), ModelSLO(1.0, 0.1, 2.0)),
            m.LoadModel("m", None, EngineOptions()),
            m.Outputs([m.Delta("r", "hi", [5], [[[5, -0.1], [6, -2.0]]], True, "stop", 2)]),
            m.Stats({"m": {"num_running": 1.0}}, 0.01, 3, 4), m.ModelLoaded("m", True, max_model_len=64),
            m.RetuneModel("m", ModelSLO(2.0, 0.5, 4.0), 300.0), m.RetuneModel("m", ModelSLO())]
    for msg in msgs:
        frame = m.encode(msg)
        assert int.from_bytes(frame[:4], "big") == len(frame) - 4
        assert m.decode(frame[4:]) == msg
    # options go as the fields that differ from the defaults
    assert m.encode(m.NewRequest("r", "m", [1], SamplingParams(max_tokens=3)))[4:] == (
        b'{"msg":"NewRequest","request_id":"r","model":"m","prompt_token_ids":[1],"params":{"max_tokens":3}}')
    with pytest.raises(m.ProtocolError):
        m.decode(b'{"msg": "Nope"}')


def test_a_workers_own_pool_settings_override_the_configuration_within_bounds():
    from controller.pool import worker_settings

    reg = m.Register(host="h", pid=1, device="cuda:0", memory_bytes=80 * 10**9,
                     settings={"budget_gb": 60, "policy": "request", "kv_cache_gb": 4, "host_cache_gb": 100})
    assert worker_settings(reg) == {"budget_bytes": 60 * 10**9, "policy": "request", "kv_cache_gb": 4.0,
                                    "host_cache_gb": 100.0}
    bad = m.Register(host="h", pid=1, device="cuda:0", memory_bytes=80 * 10**9,
                     settings={"budget_gb": 500, "policy": "nope", "kv_cache_gb": -1, "host_cache_gb": "x"})
    assert worker_settings(bad) == {}  # more than the device, unknown policy, nonsense: ignored
    assert worker_settings(m.Register(host="h", pid=1, device="cpu", memory_bytes=1, settings=None)) == {}


def test_models_placed_in_one_tick_spread_over_the_engines():
    # the planned loads of a tick count for the next placement: not every model on the emptiest engine at the start
    a = Autoscaler(AutoscalerSettings())
    loads = [_load(f"big{i}", 0, size=15) for i in range(4)] + [_load(f"small{i}", 0, size=3) for i in range(6)]
    acts = a.plan(loads, [EngineView("e0", 60 * GB), EngineView("e1", 60 * GB)])
    on = {e: sorted(x.model for x in acts if x.engine_id == e) for e in ("e0", "e1")}
    assert [x.kind for x in acts] == ["load"] * 10
    assert sum(m.startswith("big") for m in on["e0"]) == sum(m.startswith("big") for m in on["e1"]) == 2
    assert len(on["e0"]) == len(on["e1"]) == 5


def _ready(*names, busy=()):
    return {n: ReplicaView(n, True, 4, (5,) if n in busy else ()) for n in names}


def test_rebalance_moves_registrations_to_a_late_engine_and_never_back():
    models = {f"m{i}": ModelInfo(f"m{i}", (15 if i < 4 else 3) * GB) for i in range(10)}
    full = EngineView("e0", 60 * GB, _ready(*models, busy=("m0", "m3")))
    moves = rebalance([full, EngineView("e1", 60 * GB)], models, fixed=frozenset({"m1"}))
    assert all(src == "e0" and dst == "e1" for _, src, dst in moves)
    moved = {m for m, _, _ in moves}
    assert "m1" not in moved  # pinned: it stays
    assert moves[0][0] == "m2" and "m3" in moved  # of equal models an idle one first; a busy one moves too
    left = {n for n in models if n not in moved}
    e0 = EngineView("e0", 60 * GB, _ready(*left))
    e1 = EngineView("e1", 60 * GB, _ready(*moved))
    share = [sum(weight(models[n]) for n in e.replicas) for e in (e0, e1)]
    assert abs(share[0] - share[1]) <= weight(models["m0"])  # even to within the largest model
    assert rebalance([e0, e1], models) == [] and rebalance([e1, e0], models) == []  # settled: no ping-pong
    # under steady load no model is ever idle: the late engine still gets its share
    busy = rebalance([EngineView("e0", 60 * GB, _ready(*models, busy=tuple(models))), EngineView("e1", 60 * GB)],
                     models)
    assert len(busy) >= 3
    # one engine, a model registered twice, a registration still loading: nothing moves
    assert rebalance([full], models) == []
    two = EngineView("e1", 60 * GB, {"m5": ReplicaView("m5", True, 4)})
    assert "m5" not in {m for m, _, _ in rebalance([full, two], models)}
    loading = EngineView("e0", 60 * GB, {n: ReplicaView(n, False, 4) for n in models})
    assert rebalance([loading, EngineView("e1", 60 * GB)], models) == []


def test_the_autoscaler_plans_placement_moves():
    a = Autoscaler(AutoscalerSettings(enabled=False))
    loads = [_load(f"m{i}", 0, size=3) for i in range(4)]
    engines = [EngineView("e0", 60 * GB, _ready("m0", "m1", "m2", "m3")), EngineView("e1", 60 * GB)]
    acts = a.plan(loads, engines)
    assert {(x.kind, x.engine_id, x.source) for x in acts} == {("move", "e1", "e0")} and len(acts) == 2


def test_a_failed_registration_is_placed_elsewhere_and_not_moved_back():
    a = Autoscaler(AutoscalerSettings(enabled=False))
    # its registration failed on the empty e1: e0 gets it, and rebalance does not send it back to e1
    load = ModelLoad(ModelInfo("m", 3 * GB), 1, 1, 0, 4, avoid=frozenset({"e1"}))
    acts = a.plan([load], [EngineView("e0", 60 * GB, _ready("x")), EngineView("e1", 60 * GB)])
    assert [(x.kind, x.engine_id) for x in acts] == [("load", "e0")]
    models = {"z": ModelInfo("z", 3 * GB), "a": ModelInfo("a", 3 * GB)}
    full = [EngineView("e0", 60 * GB, _ready("z", "a")), EngineView("e1", 60 * GB)]
    assert rebalance(full, models) == [("z", "e0", "e1")]  # one of two equal models moves: by name, z
    assert rebalance(full, models, avoid={"z": frozenset({"e1"})}) == [("a", "e0", "e1")]


def test_a_move_under_way_counts_on_its_new_engine_and_nothing_moves_twice():
    models = {"a": ModelInfo("a", 15 * GB), **{n: ModelInfo(n, 3 * GB) for n in "bcd"}}
    # "a" is moving from e0 to e1 (registered on both until e1's registration is up): e0 keeps 9 GB, e1 has 15
    e0 = EngineView("e0", 60 * GB, _ready("a", "b", "c", "d"))
    e1 = EngineView("e1", 60 * GB, {"a": ReplicaView("a", False, 4)})
    assert rebalance([e0, e1], models, moving={"a": "e0"}) == []
    # blind to the move, e0 would look like 24 GB against 15 and send "d" after it: one move too many
    assert rebalance([e0, e1], models, fixed=frozenset({"a"})) == [("d", "e0", "e1")]
    # once e1's registration is up the old one drains (its last requests): it no longer counts for e0
    e0d = EngineView("e0", 60 * GB, {**_ready("b", "c", "d"), "a": ReplicaView("a", True, 4, (5,), draining=True)})
    assert rebalance([e0d, EngineView("e1", 60 * GB, _ready("a"))], models) == []
    a = Autoscaler(AutoscalerSettings())
    assert a.plan([_load("a", 0, size=15)] + [_load(n, 0, size=3) for n in "bcd"], [e0, e1],
                  moving={"a": "e0"}) == []  # nothing else is done to the moving model, nothing else moves


def test_no_extra_registration_goes_to_a_gpu_whose_models_miss_their_slo():
    """A pooled GPU steps its models in turn: a replica or a move placed on a GPU that already fails a model
    takes turns from it. The hot model's replica goes to a GPU whose models keep their SLO, or nowhere."""
    a = Autoscaler(AutoscalerSettings(up_ticks=1))
    hot = ReplicaView("m", True, 4, (9,) * 4)
    engines = [EngineView("e0", 10 * GB, {"m": hot}), EngineView("e1", 10 * GB, {"s": ReplicaView("s", True, 4)}),
               EngineView("e2", 10 * GB, {"t": ReplicaView("t", True, 4), "u": ReplicaView("u", True, 4)})]
    # e1 is the emptiest, but its model misses its SLO: the replica goes to e2
    loads = [_load("m", 4, att=0.5), _load("s", 0, att=0.6), _load("t", 1, att=1.0), _load("u", 0)]
    assert a.struggling(loads, engines) == {"e0", "e1"}
    acts = a.plan(loads, engines)
    assert [(x.kind, x.model, x.engine_id) for x in acts] == [("load", "m", "e2")]
    # every other GPU struggles: no replica at all (the minimum is still restored anywhere)
    a = Autoscaler(AutoscalerSettings(up_ticks=1))
    loads = [_load("m", 4, att=0.5), _load("s", 0, att=0.6), _load("t", 0, att=0.5), _load("u", 0)]
    assert [x for x in a.plan(loads, engines) if x.kind == "load"] == []
    lonely = [_load("z", 0, lo=1)]
    assert [x.kind for x in a.plan(lonely + loads, engines) if x.model == "z"] == ["load"]
    # a struggling engine that is also the emptiest gets no move either, and a draining registration of a
    # missing model does not count against its engine
    late = [EngineView("e0", 10 * GB, {n: ReplicaView(n, True, 4) for n in ("a", "b", "c")}),
            EngineView("e1", 10 * GB, {"s": ReplicaView("s", True, 4)})]
    calm = [_load(n, 0) for n in ("a", "b", "c")]
    assert [x.kind for x in Autoscaler(AutoscalerSettings()).plan(calm + [_load("s", 0)], late)] == ["move"]
    assert Autoscaler(AutoscalerSettings()).plan(calm + [_load("s", 1, att=0.5)], late) == []
    leaving = [late[0], EngineView("e1", 10 * GB, {"s": ReplicaView("s", True, 4, draining=True)})]
    assert Autoscaler(AutoscalerSettings()).struggling(calm + [_load("s", 1, att=0.5)], leaving) == frozenset()


def test_a_struggling_gpu_sheds_registrations_served_elsewhere():
    """The undoing of a replica placed before its GPU fell behind: a model registered on a GPU that fails
    another model, and also on a healthy GPU, gives the first registration back after `up_ticks` ticks -- never
    below its minimum, never when pinned, never when all its GPUs struggle (then it is the one missing)."""
    def views(m_on=("e0", "e1")):
        return [EngineView("e0", 10 * GB, {**{n: ReplicaView(n, True, 4) for n in ("a", "b")},
                                          **({"m": ReplicaView("m", True, 4)} if "e0" in m_on else {})}),
                EngineView("e1", 10 * GB, {"c": ReplicaView("c", True, 4),
                                          **({"m": ReplicaView("m", True, 4)} if "e1" in m_on else {})})]
    late_a = [_load("a", 1, att=0.5), _load("b", 1), _load("c", 1)]
    a = Autoscaler(AutoscalerSettings(up_ticks=2))
    assert [x for x in a.plan(late_a + [_load("m", 1)], views()) if x.kind == "shed"] == []  # one tick: not yet
    acts = [(x.kind, x.model, x.engine_id) for x in a.plan(late_a + [_load("m", 1)], views())]
    assert ("shed", "m", "e0") in acts and not [x for x in acts if x[0] == "shed" and x[1] != "m"]
    # a tick where e0 keeps its SLO restarts the count
    a = Autoscaler(AutoscalerSettings(up_ticks=2))
    a.plan(late_a + [_load("m", 1)], views())
    a.plan([_load("a", 1), _load("b", 1), _load("c", 1), _load("m", 1)], views())
    assert [x for x in a.plan(late_a + [_load("m", 1)], views()) if x.kind == "shed"] == []
    # never below the minimum, never pinned, never when its other GPU struggles too
    pinned = ModelLoad(ModelInfo("m", GB), 1, 3, 1, 4, None, pinned=True)
    both_late = [_load("a", 1, att=0.5), _load("b", 1), _load("c", 1, att=0.5)]
    for ml, loads in ((_load("m", 1, lo=2), late_a), (pinned, late_a), (_load("m", 1), both_late)):
        a = Autoscaler(AutoscalerSettings(up_ticks=1))
        assert [x for x in a.plan(loads + [ml], views()) if x.kind == "shed"] == []
    # nor while its registration on the healthy GPU is still loading
    loading = views()
    loading[1].replicas["m"] = ReplicaView("m", False, 4)
    a = Autoscaler(AutoscalerSettings(up_ticks=1))
    assert [x for x in a.plan(late_a + [_load("m", 1)], loading) if x.kind == "shed"] == []
    # a model with one registration stays where it is
    a = Autoscaler(AutoscalerSettings(up_ticks=1))
    assert [x for x in a.plan(late_a + [_load("m", 1)], views(("e0",))) if x.kind == "shed"] == []


def test_a_pin_that_leaves_a_registered_model_no_room_is_found():
    """Two 15.2 GB models and a 3.1 GB one on 60 GB of weight space: pinning both big ones leaves 29.6 GB, room
    for the rest. A 40 GB model beside a 15.2 GB one: on 60 GB the pin leaves 44.8, enough; on 50 GB it leaves
    34.8, and the 40 GB model could never load. Slots are rounded up to 2 MiB, as the arena rounds them."""
    GB = 10**9
    models = {n: ModelInfo(n, int(b * GB)) for n, b in (("a", 15.2), ("b", 15.2), ("c", 3.1), ("big", 40.0))}
    assert pin_blocks("a", ["a", "b", "c"], models, set(), 60 * GB) is None
    assert pin_blocks("b", ["a", "b", "c"], models, {"a"}, 60 * GB) is None
    assert pin_blocks("a", ["a", "big"], models, set(), 60 * GB) is None
    assert pin_blocks("a", ["a", "big"], models, set(), 50 * GB) == "big"
    assert pin_blocks("c", ["c", "big"], models, {"big"}, 44 * GB) is None  # a pinned model needs no more room
    assert pin_blocks("c", ["c", "big"], models, {"big"}, 43 * GB) == "c"  # but the pins (43.1 GB) must fit
    exact = {"x": ModelInfo("x", 4 << 20), "y": ModelInfo("y", (2 << 20) + 1)}  # y's slot: 4 MiB
    assert pin_blocks("x", ["x", "y"], exact, set(), 8 << 20) is None
    assert pin_blocks("x", ["x", "y"], exact, set(), (8 << 20) - 1) == "y"


def test_pins_of_a_gpu_are_judged_together_and_an_unplaced_model_against_every_gpu():
    """`starved_by_pins` (start-up, the configuration's pins): on one 60 GB engine, a and b pinned (15.2 each) leave
    29.6 GB: c (3.1) fits, big (40) does not. A model registered nowhere is starved only when every engine it fits
    is too short for it."""
    G = 10**9
    models = {n: ModelInfo(n, int(b * G)) for n, b in (("a", 15.2), ("b", 15.2), ("c", 3.1), ("big", 40.0))}

    def eng(eid: str, *names: str, mem: int = 60 * G) -> EngineView:
        return EngineView(eid, mem, {n: ReplicaView(n, True, 8) for n in names})

    assert starved_by_pins([eng("e0", "a", "b", "c", "big")], models, {"a", "b"}) == ("e0", ["a", "b"], "big")
    assert starved_by_pins([eng("e0", "a", "b", "c", "big")], models, {"a"}) is None  # one pin leaves 44.8
    small = {n: models[n] for n in ("a", "b", "c")}
    assert starved_by_pins([eng("e0", "a", "b", "c")], small, {"a", "b"}) is None
    assert starved_by_pins([eng("e0", "a", "b")], small, {"a", "b"}) is None  # c, registered nowhere, fits
    # big registered nowhere yet: starved on e0; not when e1 has the room
    one = {n: models[n] for n in ("a", "b", "big")}
    assert starved_by_pins([eng("e0", "a", "b")], one, {"a", "b"}) == ("e0", ["a", "b"], "big")
    assert starved_by_pins([eng("e0", "a", "b"), eng("e1")], one, {"a", "b"}) is None
    assert starved_by_pins([eng("e0", "a", "b"), eng("e1", mem=30 * G)], one, {"a", "b"}) == ("e0", ["a", "b"], "big")
    # a pinned model registered nowhere yet is judged by what its pin would do there: beside c on 20 GB, a and b
    # pinned would leave c (3.1) too little room, wherever a lands (the start-up check of a placement that, following
    # the pins, left a pinned model unplaced)
    nowhere = {n: models[n] for n in ("a", "b", "c")}
    assert starved_by_pins([eng("e0", "b", "c", mem=33 * G)], nowhere, {"a", "b"}) == ("e0", ["b", "a"], "c")
    assert starved_by_pins([eng("e0", "b", "c", mem=33 * G), eng("e1")], nowhere, {"a", "b"}) is None
    # pins that overfill the weight space among themselves: one of them could never load (no unpinned model needed)
    assert starved_by_pins([eng("e0", "a", "b", mem=20 * G)], small, {"a", "b"}) == ("e0", ["a", "b"], "a")
    pair = {n: models[n] for n in ("a", "b")}
    assert starved_by_pins([eng("e0", "a", "b", mem=31 * G)], pair, {"a", "b"}) is None  # 2 x 15.2 fit in 31


def test_placement_passes_over_an_engine_whose_pins_would_starve_the_model():
    """e0: 60 GB of weight space, a and b pinned (15.2 GB each) leave 29.6 GB; e1: 45 GB holding c (40 GB), fuller
    by share. big (40 GB) fits either engine's space, but never beside e0's pins: placement picks e1, and with e1
    gone, nothing. A pinned model is not placed where its pin would starve a model registered there either."""
    G = 10**9
    models = {n: ModelInfo(n, int(b * G)) for n, b in (("a", 15.2), ("b", 15.2), ("c", 40.0), ("big", 40.0),
                                                        ("p", 20.0))}
    e0 = EngineView("e0", 60 * G, _ready("a", "b"))
    e1 = EngineView("e1", 45 * G, _ready("c"))
    assert place(models["big"], [e0, e1], models).engine_id == "e0"  # by share alone
    assert place(models["big"], [e0, e1], models, pinned={"a", "b"}).engine_id == "e1"
    assert place(models["big"], [e0], models, pinned={"a", "b"}) is None
    # p (20 GB), pinned, on e1 would leave c (40 GB) 25 GB: c could never load again
    assert place(models["p"], [e1], models).engine_id == "e1"
    assert place(models["p"], [e1], models, pinned={"p"}) is None


def test_rebalance_tries_the_next_emptiest_engine_when_pins_block_the_emptiest():
    """Three GPUs: e0 overfull with 4 GB models, e1 the emptiest by share but nearly all its space pinned to a,
    e2 next. Unpinned, the first move goes to e1; with a pinned it would starve there, so the move goes to e2
    (before, rebalance tried only the emptiest engine and moved nothing)."""
    G = 10**9
    models = {n: ModelInfo(n, int(b * G)) for n, b in (("a", 17), ("x", 4), ("y", 4), ("z", 4), ("u", 4),
                                                        ("w", 75))}
    engines = [EngineView("e0", 10 * G, _ready("x", "y", "z", "u")), EngineView("e1", 20 * G, _ready("a")),
               EngineView("e2", 80 * G, _ready("w"))]
    assert rebalance(engines, models)[0][2] == "e1"
    moves = rebalance(engines, models, fixed=frozenset({"a"}), pinned={"a"})
    assert moves and all(src == "e0" and dst == "e2" for _, src, dst in moves)
    assert rebalance(engines, models, avoid={n: frozenset({"e1", "e2"}) for n in "xyzu"}) == []


def test_rebalance_moves_no_model_where_pins_would_starve_it():
    """e0 (12 GB) carries three 11 GB models; e1 (20 GB) only a (10 GB). The shares call for a move to e1, and one
    fits its space -- but not beside a pinned: rebalance moves nothing then (nor does the autoscaler's tick)."""
    G = 10**9
    models = {n: ModelInfo(n, int(b * G)) for n, b in (("a", 10), ("x", 11), ("y", 11), ("z", 11))}
    engines = [EngineView("e0", 12 * G, _ready("x", "y", "z")), EngineView("e1", 20 * G, _ready("a"))]
    assert len(rebalance(engines, models)) == 1
    assert rebalance(engines, models, fixed=frozenset({"a"}), pinned={"a"}) == []
    loads = [ModelLoad(models["a"], 1, 1, 0, 4, pinned=True)] + [ModelLoad(models[n], 1, 1, 0, 4) for n in "xyz"]
    assert Autoscaler(AutoscalerSettings()).plan(loads, engines) == []
    loads[0] = replace(loads[0], pinned=False)
    assert [x.kind for x in Autoscaler(AutoscalerSettings()).plan(loads, engines)] == ["move"]


def test_a_hot_model_gets_no_replica_where_pins_would_starve_it():
    """m (8 GB) is hot on e0. e1 (20 GB) is the emptiest by share, but p (14 GB) is pinned there: 6 GB left, m
    could never load. e2 (12 GB, fuller) has room: m's second registration goes there, and the autoscaler notes
    e1 passed over (the controller tells of it). With e2 gone it places nothing (q, which needs e2, left out)."""
    G = 10**9
    hot = ModelLoad(ModelInfo("m", 8 * G), 1, 3, 8, 4)
    loads = [hot, ModelLoad(ModelInfo("p", 14 * G), 1, 1, 0, 4, pinned=True),
             ModelLoad(ModelInfo("q", 10 * G), 1, 1, 0, 4)]
    engines = [EngineView("e0", 20 * G, {"m": ReplicaView("m", True, 4, (9,) * 4, (9,) * 4)}),
               EngineView("e1", 20 * G, _ready("p")), EngineView("e2", 12 * G, _ready("q"))]
    a = Autoscaler(AutoscalerSettings(up_ticks=1))
    assert [(x.kind, x.model, x.engine_id) for x in a.plan(loads, engines)] == [("load", "m", "e2")]
    assert a.pin_blocked == {("m", "e1"): ("m", ("p",))}
    a = Autoscaler(AutoscalerSettings(up_ticks=1))
    assert a.plan(loads[:2], engines[:2]) == [] and a.pin_blocked == {("m", "e1"): ("m", ("p",))}
    assert a.plan([replace(hot, inflight=0), loads[1]], engines[:2]) == [] and a.pin_blocked == {}  # not hot: no ask


def test_prefix_index_remembers_what_each_engine_was_sent():
    """The controller's guess of each engine's prefix cache: the longest run of a prompt's blocks sent there before
    (whole blocks, never the one holding the last token), per model and engine, apart by salt/adapter, bounded
    (least recently sent forgotten first), forgotten with an engine or a model."""
    from controller.prefix_index import BLOCK, PrefixIndex, prompt_hashes

    system = list(range(100, 100 + 4 * BLOCK))
    a, b = system + [1, 2, 3], system + [7, 8, 9, 10]
    ha, hb = prompt_hashes(a), prompt_hashes(b)
    assert len(ha) == 4 and prompt_hashes(a[:BLOCK + 1]) == ha[:1] and prompt_hashes(a[:BLOCK]) == []
    idx = PrefixIndex()
    assert idx.cached_tokens("m", "e0", hb) == 0
    idx.sent("m", "e0", ha)
    assert idx.cached_tokens("m", "e0", hb) == 4 * BLOCK  # the shared system prompt
    assert idx.cached_tokens("m", "e1", hb) == 0 and idx.cached_tokens("other", "e0", hb) == 0
    assert idx.cached_tokens("m", "e0", prompt_hashes(b, b"lora\0")) == 0
    assert idx.cached_tokens("m", "e0", prompt_hashes([5] + b)) == 0  # a prefix, not any shared run
    small = PrefixIndex(max_blocks=4)
    small.sent("m", "e0", ha)
    small.sent("m", "e0", prompt_hashes(list(range(9, 9 + 2 * BLOCK + 1))))
    assert small.cached_tokens("m", "e0", ha) == 0  # its first two blocks went first
    idx.sent("m", "e1", ha)
    idx.forget(engine_id="e0")
    assert idx.cached_tokens("m", "e0", ha) == 0 and idx.cached_tokens("m", "e1", ha) == 4 * BLOCK
    idx.forget(model="m")
    assert idx.cached_tokens("m", "e1", ha) == 0


def test_route_prefers_the_engine_with_the_prompt_cached():
    """Prefix-cache-aware routing: of two engines otherwise alike, the one likely holding the prompt's prefix, whose
    prefill is then only the rest (what admission weighs); a cache does not outweigh a long queue."""
    models = _models(("a", 1, 0))
    rv = ReplicaView("a", True, 8, step_s=0.01, prefill_s_per_token=0.001)
    e0, e1 = EngineView("e0", 10 * GB, {"a": rv}, step_s=0.01), EngineView("e1", 10 * GB, {"a": rv}, step_s=0.01)
    assert route(models["a"], [e0, e1], 1000).engine_id == "e0"  # (a tie: the first)
    rt = route(models["a"], [e0, e1], 1000, lambda e: {"e1": 960}.get(e, 0))
    assert rt.engine_id == "e1" and rt.cached_tokens == 960 and rt.prefill_s == pytest.approx(0.04)
    assert route(models["a"], [e0, e1], 100, lambda e: 5000).cached_tokens == 100  # (never more than the prompt)
    busy = ReplicaView("a", True, 8, step_s=0.01, prefill_s_per_token=0.001, queued_prompt_tokens=3000)
    e1 = EngineView("e1", 10 * GB, {"a": busy}, step_s=0.01)
    assert route(models["a"], [e0, e1], 1000, lambda e: 960 if e == "e1" else 0).engine_id == "e0"


def test_a_long_prompt_is_refused_only_while_its_engine_has_other_requests():
    """The prefill-alone rule protects other requests from a long prompt; on an idle engine nothing is protected and
    the prompt could never run (a single user's long prompt on a slow CPU got a 429 at every retry)."""
    idle = EngineView("e0", 10 * GB, {"a": ReplicaView("a", True, 8, prefill_s_per_token=0.01),
                                      "b": ReplicaView("b", True, 8)})
    rt = route(ModelInfo("a", GB), [idle], prompt_tokens=2000)
    assert rt.prefill_s == pytest.approx(20.0) and not rt.engine_busy
    other = EngineView("e0", 10 * GB, {"a": ReplicaView("a", True, 8, prefill_s_per_token=0.01),
                                       "b": ReplicaView("b", True, 8, running_remaining=(30,))})
    assert route(ModelInfo("a", GB), [other], prompt_tokens=2000).engine_busy
    own = EngineView("e0", 10 * GB, {"a": ReplicaView("a", True, 8, (5,), prefill_s_per_token=0.01)})
    assert route(ModelInfo("a", GB), [own], prompt_tokens=2000).engine_busy
