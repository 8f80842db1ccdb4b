"""Tenants over HTTP: keys kept only as hashes, admin-made tenants, isolation, rate limits that recover."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from controller.keys import hash_key
from load_tests.live_server import LiveServer

ADMIN = "admin-tenants-token"
RED, BLUE = "key-red-abcdefghijklmnop", "key-blue-abcdefghijklmnop"
PACE = {"kind": "pace", "pace_s_per_token": 0.005, "max_num_seqs": 64}



@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("tenants")
    cfg = {
        "admin_token_hash": hash_key(ADMIN),
        "tenants_file": str(work / "tenants.yaml"),
        "workers": {"local": "cpu", "standby": False},
        "tenants": [
            {"name": "red", "key_hashes": [hash_key(RED)], "models": ["red-*", "shared"]},
            {"name": "blue", "key_hashes": [hash_key(BLUE)], "models": ["blue-*", "shared"],
             "rate": {"tokens_per_min": 600}, "max_concurrent": 2},
        ],
        "models": [{"name": "red-m", "engine": PACE},
                   # 1 ms a token: its rate limit's test asks for 580 tokens, whose time was the test's (~3 s)
                   {"name": "blue-m", "engine": dict(PACE, pace_s_per_token=0.001)}]
                  + [{"name": "shared", "engine": PACE, "aliases": ["common"]}]
                  + [{"name": "blue-slow", "engine": dict(PACE, pace_s_per_token=0.1)},
                     # one request at a time, a 0.2 s TTFT: a second one while the first streams is refused (429)
                     {"name": "red-narrow", "engine": dict(PACE, pace_s_per_token=0.1, max_num_seqs=1),
                      "slo": {"ttft_s": 0.2, "tpot_s": 1.0}}],
    }
    with LiveServer(cfg, work) as srv:
        yield srv


def oai(srv, key):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0)


ADM = {"Authorization": f"Bearer {ADMIN}"}


def test_config_and_tenants_file_hold_no_plain_keys(server):
    text = server.config_path.read_text()
    assert RED not in text and BLUE not in text and ADMIN not in text and "sha256$" in text
    r = httpx.post(server.url + "/admin/tenants", headers=ADM, json={"name": "green", "models": ["shared"]})
    assert r.status_code == 201
    key = r.json()["api_key"]
    stored = (server.workdir / "tenants.yaml").read_text()
    assert key not in stored and "sha256$" in stored
    assert "api_key" not in str(httpx.get(server.url + "/admin/tenants", headers=ADM).json())
    assert [m.id for m in oai(server, key).models.list()] == ["shared", "common"]  # (its alias: a name of its own)
    assert httpx.delete(server.url + "/admin/tenants/green", headers=ADM).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        oai(server, key).models.list()


def test_isolation_of_models_and_usage(server):
    assert {m.id for m in oai(server, RED).models.list()} == {"red-m", "red-narrow", "shared", "common"}
    assert {m.id for m in oai(server, BLUE).models.list()} == {"blue-m", "blue-slow", "shared", "common"}
    with pytest.raises(openai.NotFoundError):  # another tenant's model looks missing (issue 16)
        oai(server, RED).completions.create(model="blue-m", prompt="x", max_tokens=1)
    with pytest.raises(openai.NotFoundError):  # not even its card
        oai(server, RED).models.retrieve("blue-m")
    before = httpx.get(server.url + "/v1/usage", headers={"Authorization": f"Bearer {BLUE}"}).json()
    oai(server, RED).completions.create(model="shared", prompt="hello", max_tokens=3)
    red = httpx.get(server.url + "/v1/usage", headers={"Authorization": f"Bearer {RED}"}).json()
    blue = httpx.get(server.url + "/v1/usage", headers={"Authorization": f"Bearer {BLUE}"}).json()
    assert red["tenant"] == "red" and red["completion_tokens"] >= 3
    assert blue == before


def test_token_rate_limit_429_then_recovers(server):
    c = oai(server, BLUE)
    c.completions.create(model="blue-m", prompt="x", max_tokens=300)  # charged 300 + prompt of 600/min
    with pytest.raises(openai.RateLimitError) as ei:
        c.completions.create(model="blue-m", prompt="x", max_tokens=330)
    wait = int(ei.value.response.headers["Retry-After"])
    assert 1 <= wait <= 3 and "token rate" in ei.value.message
    c.completions.create(model="blue-m", prompt="x", max_tokens=50)  # small ones still fit
    time.sleep(wait + 0.5)
    c.completions.create(model="blue-m", prompt="x", max_tokens=200)


def test_max_concurrent_per_tenant(server):
    c = oai(server, BLUE)
    # 0.5 s streams: the server finishes a stream whether or not the client reads it, so they must outlast
    # the third request even on a loaded machine
    streams = [c.completions.create(model="blue-slow", prompt="x", max_tokens=5, stream=True) for _ in range(2)]
    try:
        with pytest.raises(openai.RateLimitError) as ei:
            c.completions.create(model="blue-m", prompt="x", max_tokens=1)
        assert "in flight" in ei.value.message and ei.value.response.headers["Retry-After"]
    finally:
        for s in streams:
            list(s)
    c.completions.create(model="blue-m", prompt="x", max_tokens=1)


def test_admin_registers_and_unregisters_a_model(server, tmp_path):
    r = httpx.post(server.url + "/admin/models", headers=ADM,
                   json={"name": "red-new", "engine": PACE, "slo": {"ttft_s": 2, "tpot_s": 0.1}, "priority": 1,
                         "replicas": {"min": 1, "max": 2}})
    assert r.status_code == 201, r.text
    assert oai(server, RED).completions.create(model="red-new", prompt="x", max_tokens=2).usage.completion_tokens == 2
    assert "red-new" not in {m.id for m in oai(server, BLUE).models.list()}
    assert httpx.delete(server.url + "/admin/models/red-new", headers=ADM).status_code == 200
    with pytest.raises(openai.NotFoundError):
        oai(server, RED).completions.create(model="red-new", prompt="x", max_tokens=1)
    bad = httpx.post(server.url + "/admin/models", headers=ADM, json={"name": "x", "path": "/does/not/exist"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "path"
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')  # an architecture the engine does not run
    bad = httpx.post(server.url + "/admin/models", headers=ADM, json={"name": "x", "path": str(tmp_path)})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "path"
    assert "architecture 'gpt2' is not supported" in bad.json()["error"]["message"]
    assert "x" not in {m["name"] for m in httpx.get(server.url + "/admin/models", headers=ADM).json()}
    huge = httpx.post(server.url + "/admin/models", headers=ADM, json={"name": "huge", "engine": PACE, "memory_gb": 1e5})
    assert huge.status_code == 400 and huge.json()["error"]["param"] == "memory_gb"  # fits no engine: never ready


def test_single_user_is_no_auth_or_one_tenant():
    """Ollama's keep_alive 0 unloads only where nobody else shares the models: no auth, or one tenant (vLLM's
    --api-key); a second tenant makes it a shared server."""
    from controller.config import TenantSpec
    from controller.tenants import TenantRegistry

    assert TenantRegistry([], auth=False).single_user
    assert TenantRegistry([TenantSpec(name="only")], auth=True).single_user
    assert not TenantRegistry([TenantSpec(name="a"), TenantSpec(name="b")], auth=True).single_user


def test_key_rotation_keeps_the_tenants_limits(server):
    """Rotating a key is delete + create (the admin API has no in-place update; the operator does the same): the
    new entry must not start with no requests in flight and full buckets, or each rotation lifts the limits. The
    old key's stream is ended a moment after the delete (its key is revoked), and its request still used the
    bucket."""
    spec = {"name": "rot", "models": ["blue-slow"], "rate": {"requests_per_s": 0.1, "burst": 1}, "max_concurrent": 1}
    old = httpx.post(server.url + "/admin/tenants", headers=ADM, json=spec).json()["api_key"]
    try:
        stream = oai(server, old).completions.create(model="blue-slow", prompt="x", max_tokens=100, stream=True)
        assert httpx.delete(server.url + "/admin/tenants/rot", headers=ADM).status_code == 200
        r = httpx.post(server.url + "/admin/tenants", headers=ADM, json=spec)
        assert r.status_code == 201 and r.json()["inflight"] == 1  # the old key's stream, still running
        new = r.json()["api_key"]
        with pytest.raises(openai.AuthenticationError):
            oai(server, old).models.list()
        with pytest.raises(openai.RateLimitError) as ei:  # the stream of the old key still counts
            oai(server, new).completions.create(model="blue-slow", prompt="x", max_tokens=1)
        assert "in flight (limit 1)" in ei.value.message
        t0 = time.monotonic()
        with pytest.raises(openai.APIError) as ended:  # the old key's stream (10 s of tokens) ends: revoked
            list(stream)
        assert ended.value.body["code"] == "invalid_api_key" and time.monotonic() - t0 < 5
        with pytest.raises(openai.RateLimitError) as ei:  # and its request used the bucket: 1 per 10 s
            oai(server, new).completions.create(model="blue-slow", prompt="x", max_tokens=1)
        assert "0.1 requests/s" in ei.value.message and 1 <= int(ei.value.response.headers["Retry-After"]) <= 10
        rot = [t for t in httpx.get(server.url + "/admin/tenants", headers=ADM).json() if t["name"] == "rot"]
        assert rot[0]["inflight"] == 0
    finally:
        httpx.delete(server.url + "/admin/tenants/rot", headers=ADM)


def test_revoking_a_configured_tenant_outlasts_a_restart(tmp_path, caplog):
    """DELETE /admin/tenants/NAME of a tenant from the configuration file: after a restart its key must still be
    refused (the registry is rebuilt from the same configuration and tenants file), and the start-up log says so
    (the tenant of the configuration was missing from the dashboard with nothing said why)."""
    from controller.config import TenantSpec
    from controller.tenants import TenantRegistry

    f = str(tmp_path / "tenants.yaml")
    specs = [TenantSpec(name="red", key_hashes=[hash_key(RED)]), TenantSpec(name="blue", key_hashes=[hash_key(BLUE)])]
    reg = TenantRegistry(specs, auth=True, tenants_file=f)
    made, key = reg.create(TenantSpec(name="green"))
    assert reg.delete("red") and reg.authenticate(RED) is None
    caplog.clear()
    again = TenantRegistry(specs, auth=True, tenants_file=f)
    assert again.authenticate(RED) is None and again.get("red") is None
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert said == [f"tenant 'red' of the configuration stays revoked (revoked over the admin API, recorded in {f}: "
                    "remove its entry under `revoked` there to bring it back)"], said
    assert again.authenticate(BLUE).name == "blue" and again.authenticate(key).name == "green"
    assert RED not in (tmp_path / "tenants.yaml").read_text()
    # the configuration gives red a new key: that one works, the revoked one still does not
    fresh = "key-red-rotated-abcdefghijklmnop"
    specs[0] = specs[0].model_copy(update={"key_hashes": [*specs[0].key_hashes, hash_key(fresh)]})
    caplog.clear()
    third = TenantRegistry(specs, auth=True, tenants_file=f)
    assert third.authenticate(fresh).name == "red" and third.authenticate(RED) is None
    assert "tenant 'red' of the configuration: 1 of its keys stay revoked" in caplog.text
    assert third.delete("red")  # and revoking it again revokes the new key too
    assert TenantRegistry(specs, auth=True, tenants_file=f).authenticate(fresh) is None


def test_a_request_refused_before_any_token_is_not_charged(server):
    """SLO admission's 429 (the model's one slot busy for longer than its TTFT allows): the tenant's usage and the
    token counters stay as they were, and its tokens/min reservation comes back; the request still counts in
    requests_total under its status. The served request that held the slot counts in full."""
    from prometheus_client.parser import text_string_to_metric_families

    def usage() -> dict:
        return httpx.get(server.url + "/v1/usage", headers={"Authorization": f"Bearer {RED}"}).json()

    def prompt_tokens() -> float:
        text = httpx.get(server.url + "/metrics", headers=ADM).text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "tokenpool_prompt_tokens_total" and s.labels.get("model") == "red-narrow")

    c = oai(server, RED)
    before, tokens_before = usage(), prompt_tokens()
    stream = c.completions.create(model="red-narrow", prompt="a b c", max_tokens=30, stream=True)
    next(iter(stream))  # it holds the one slot for ~3 s
    with pytest.raises(openai.RateLimitError) as ei:
        c.completions.create(model="red-narrow", prompt="a much longer prompt than the first", max_tokens=5)
    assert "overloaded" in str(ei.value)
    assert usage() == before and prompt_tokens() == tokens_before
    done = [ch for ch in stream]
    assert done and done[-1].choices[0].finish_reason == "length"
    after = usage()
    assert after["requests"] == before["requests"] + 1 and after["completion_tokens"] == before["completion_tokens"] + 30
    assert prompt_tokens() == tokens_before + (after["prompt_tokens"] - before["prompt_tokens"]) > tokens_before


def test_a_refusal_by_alias_counts_under_the_models_name(server):
    """requests_total's model label is the model's own name when a refused request named it by an alias (it was
    "-", as for a model that does not exist)."""
    from prometheus_client.parser import text_string_to_metric_families

    def refused(model: str) -> float:
        text = httpx.get(server.url + "/metrics", headers=ADM).text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "tokenpool_requests_total" and s.labels.get("model") == model
                   and s.labels.get("status") == "400" and s.labels.get("tenant") == "red")

    before = refused("shared")
    with pytest.raises(openai.BadRequestError):
        oai(server, RED).completions.create(model="common", prompt="x", max_tokens=1_000_000)  # past its context
    assert refused("shared") == before + 1


def test_retry_after_of_a_tiny_rate_is_bounded():
    """A rate so small (a tenant made with requests_per_s 1e-320, which validation lets through as > 0) that the wait
    overflows to infinity: a 429 with a bounded Retry-After, not a 500 (math.ceil(inf) raised OverflowError)."""
    from controller.config import TenantSpec
    from controller.tenants import MAX_RETRY_AFTER_S, Tenant, TenantRegistry

    for rate in ({"requests_per_s": 1e-320, "burst": 1}, {"tokens_per_min": 1e-320}, {"requests_per_s": 1e-300},
                 {"tokens_per_min": 5e-324}):  # (per second: 0.0, a ZeroDivisionError)
        t = Tenant(TenantSpec(name="slow", rate=rate))
        assert TenantRegistry.acquire(t, 10, now=0.0) is None  # a full bucket grants the first
        refused = TenantRegistry.acquire(t, 10, now=0.0)
        assert refused is not None and refused[0] == MAX_RETRY_AFTER_S, refused
        assert "try again in" in refused[1] and len(refused[1]) < 400
