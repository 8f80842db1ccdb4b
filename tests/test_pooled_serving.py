"""`tokenpool serve` runs the pooled, token-level engine: three tiny models whose weights exceed the worker's
budget (one fits at a time) served concurrently through the OpenAI API, token for token what each model makes
alone; steps of different models interleave; no model is unloaded; a model removed mid-stream ends its own
streams with an error and disturbs nothing else; nothing leaks."""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path

import httpx
import openai
import pytest

from controller.keys import hash_key
from load_tests.live_server import LiveServer
from token_scheduler import LLM, SamplingParams

ADMIN = "admin-pooled-token"
MiB = 1 << 20
PAGE = 16 * 512  # 16 tokens of fp32 KV of the tiny qwen2/qwen3 models


@pytest.fixture(scope="module")
def models(make_tiny):
    return {"qa": make_tiny("qwen2"), "qb": make_tiny("qwen3"), "qc": make_tiny("qwen2", seed=1)}


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    ns = f"test-{uuid.uuid4().hex[:10]}"
    cfg = {
        "admin_token_hash": hash_key(ADMIN),
        "metrics_public": True,
        "workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.2},
        "autoscaler": {"interval_s": 0.3},
        # a 4 MiB arena: a 2 MiB KV region and ONE 2 MiB weight slot, for three 2 MiB models; the policy plans each
        # step beside the one before (gpus.plan_ahead: the same tokens, checked below)
        "gpus": {"cpu_budget_gb": 4 * MiB / 1e9, "kv_cache_gb": 128 * PAGE / 1e9, "host_cache_namespace": ns,
                 "plan_ahead": True},
        "models": [{"name": n, "path": str(p), "slo": {"ttft_s": 30, "tpot_s": 5}} for n, p in models.items()],
    }
    with LiveServer(cfg, tmp_path_factory.mktemp("pooled")) as srv:
        srv.namespace = ns
        yield srv
    assert not (Path("/dev/shm") / f"tokenpool-{ns}").exists(), "host copies left in /dev/shm"


def _client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)


def _admin(srv, method: str, path: str):
    r = httpx.request(method, srv.url + path, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    return r


def _engine(srv) -> dict:
    (e,) = [e for e in _admin(srv, "GET", "/admin/engines").json() if e["alive"]]
    return e


def _wait_pool(srv, cond, timeout=30.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        e = _engine(srv)
        if e["pool"] and cond(e):
            return e
        time.sleep(0.1)
    raise AssertionError(f"pool state never satisfied the condition: {_engine(srv)}")


PROMPTS = {"qa": "Once upon a time", "qb": "The pool of GPUs", "qc": "Hello there"}
SAMPLED = dict(temperature=1.0, top_p=0.9, seed=11)


def _alone(path, prompt: str, n: int, **kw) -> str:
    llm = LLM(str(path), device="cpu")
    return llm.generate(prompt, SamplingParams(max_tokens=n, ignore_eos=True, **kw))[0].outputs[0].text


def _stream(client, model, prompt, n, out, key, **kw):
    text, finish = [], None
    for ch in client.completions.create(model=model, prompt=prompt, max_tokens=n, stream=True,
                                        extra_body={"ignore_eos": True}, **kw):
        if ch.choices:
            text.append(ch.choices[0].text)
            finish = ch.choices[0].finish_reason or finish
    out[key] = ("".join(text), finish)


def test_concurrent_streams_to_three_models_over_budget_equal_each_model_alone(server, models):
    c = _client(server)
    out: dict = {}
    threads = []
    for name in models:
        for kind, kw in (("greedy", {"temperature": 0}), ("sampled", SAMPLED)):
            t = threading.Thread(target=_stream, args=(c, name, PROMPTS[name], 24, out, (name, kind)), kwargs=kw)
            threads.append(t)
            t.start()
    for t in threads:
        t.join(180)
    assert len(out) == 6
    for name, path in models.items():
        assert out[(name, "greedy")] == (_alone(path, PROMPTS[name], 24, temperature=0.0), "length")
        assert out[(name, "sampled")] == (_alone(path, PROMPTS[name], 24, **SAMPLED), "length")
    # the worker's stats lag its steps by a heartbeat or two: wait for the report that shows the switches
    # (none ever: the wait fails after 30 s)
    e = _wait_pool(server, lambda e: e["pool"]["switches"] > 0)
    pool = e["pool"]
    assert pool["registered"] == sorted(models) and pool["switches"] > 0  # steps of different models interleaved
    assert pool["counters"]["ahead_used"] > 0  # plans made beside the step before ran (gpus.plan_ahead)
    assert pool["vram"]["budget_bytes"] == 4 * MiB and len(pool["resident"]) + len(pool["prefetching"]) <= 1
    assert {m["state"] for m in pool["models"].values()} <= {"resident", "loading", "host"}
    assert all(r["state"] == "ready" for r in e["models"])
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    switches = [line for line in metrics.splitlines() if line.startswith("tokenpool_model_switches_total")]
    assert switches and float(switches[0].split()[-1]) > 0
    # no whole-model unload ever happened: registrations stay, VRAM came and went with the policy
    assert "unregistering" not in server.log()


def test_remove_a_model_mid_stream_ends_only_its_streams_and_leaks_nothing(server, models):
    c = _client(server)
    pid = _engine(server)["pid"]
    out: dict = {}
    errors: dict = {}

    def victim():
        try:
            _stream(c, "qc", PROMPTS["qc"], 1500, out, "qc")  # long enough to be mid-stream at the removal
        except openai.APIError as e:  # the error event of a stream that already started
            errors["qc"] = e

    t_v = threading.Thread(target=victim)
    t_v.start()
    others = [threading.Thread(target=_stream, args=(c, n, PROMPTS[n], 24, out, n), kwargs={"temperature": 0})
              for n in ("qa", "qb")]
    _wait_pool(server, lambda e: e["pool"]["models"].get("qc", {}).get("running", 0) > 0, timeout=60)
    for t in others:
        t.start()
    r = _admin(server, "DELETE", "/admin/models/qc")
    assert r.status_code == 200, r.text
    t_v.join(60)
    for t in others:
        t.join(180)
    assert "qc" not in out, "the victim's stream finished before the removal: nothing was tested"
    assert "qc" in errors and "removed by an operator" in str(errors["qc"])
    for n in ("qa", "qb"):
        assert out[n] == (_alone(models[n], PROMPTS[n], 24, temperature=0.0), "length")
    e = _wait_pool(server, lambda e: "qc" not in e["pool"]["registered"] and e["pool"]["vram"]["kv_pages_used"] == 0)
    assert e["pid"] == pid and e["alive"]  # the worker stayed up
    assert e["pool"]["registered"] == ["qa", "qb"] and sum(m["running"] for m in e["pool"]["models"].values()) == 0
    # the host cache holds exactly the two remaining checkpoints (qc's own copy is gone)
    index = json.loads((Path("/dev/shm") / f"tokenpool-{server.namespace}" / "index.json").read_text())
    assert len(index["entries"]) == 2
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="qc", prompt="hi", max_tokens=2)
    r = c.completions.create(model="qa", prompt=PROMPTS["qa"], max_tokens=8, temperature=0,
                             extra_body={"ignore_eos": True})
    assert r.choices[0].text == _alone(models["qa"], PROMPTS["qa"], 8, temperature=0.0)


def test_a_model_changed_in_place_keeps_its_registration_and_its_stream(server, models):
    """PATCH /admin/models/{name} (the operator's scaling, an SLO change): the model's stream in flight goes on to
    the same tokens, the worker's policy weighs it by the new SLO and keep_alive, and it is never registered again."""
    c = _client(server)
    out: dict = {}
    t = threading.Thread(target=_stream, args=(c, "qb", PROMPTS["qb"], 600, out, "qb"), kwargs={"temperature": 0})
    t.start()
    _wait_pool(server, lambda e: e["pool"]["models"].get("qb", {}).get("running", 0) > 0, timeout=60)
    body = {"slo": {"ttft_s": 20, "tpot_s": 2}, "priority": 1, "replicas": {"min": 1, "max": 2}, "keep_alive": "5m"}
    r = httpx.patch(server.url + "/admin/models/qb", json=body, headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200, r.text
    m = r.json()
    assert (m["slo"], m["priority"], m["replicas"], m["keep_alive"]) == (
        {"ttft_s": 20.0, "tpot_s": 2.0}, 1, {"min": 1, "max": 2}, 300.0)
    assert "qb" not in out, "the stream finished before the change: nothing was tested"
    # the worker's policy has it (priority 1 weighs 2x), while the stream still runs
    e = _wait_pool(server, lambda e: e["pool"]["models"]["qb"]["slo"]["tpot_s"] == 2.0)
    assert e["pool"]["models"]["qb"]["slo"] == {"ttft_s": 20.0, "tpot_s": 2.0, "priority": 2.0}
    assert e["pool"]["models"]["qb"]["keep_alive_s"] == 300.0
    t.join(180)
    assert out["qb"] == (_alone(models["qb"], PROMPTS["qb"], 600, temperature=0.0), "length")
    listed = {x["name"]: x for x in _admin(server, "GET", "/admin/models").json()}
    assert listed["qb"]["slo"] == {"ttft_s": 20.0, "tpot_s": 2.0} and listed["qb"]["engines"]
    assert server.log().count("registering qb on") == 1  # never unregistered and registered again
    # keep_alive null: until the memory is needed (a field left out stays)
    r = httpx.patch(server.url + "/admin/models/qb", json={"keep_alive": None}, headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200 and r.json()["keep_alive"] is None and r.json()["priority"] == 1
    _wait_pool(server, lambda e: e["pool"]["models"]["qb"]["keep_alive_s"] is None)
    # what cannot change in place, nulls, bad bounds, a missing model, no token
    for body, status, param in (({"path": "/x"}, 400, "path"), ({"slo": None}, 400, None),
                                ({"replicas": {"min": 3, "max": 2}}, 400, None), ({"priority": "high"}, 400, "priority")):
        r = httpx.patch(server.url + "/admin/models/qb", json=body, headers={"Authorization": f"Bearer {ADMIN}"})
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and (param is None or err["param"] == param), (body, err)
    r = httpx.patch(server.url + "/admin/models/nope", json={"priority": 1}, headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert httpx.patch(server.url + "/admin/models/qb", json={"priority": 1}).status_code == 401
