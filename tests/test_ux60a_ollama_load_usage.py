"""Ollama's load request (an empty prompt to /api/generate, no messages to /api/chat) generates nothing for its caller:
against a live server with tenants, through the official `ollama` client, it is neither charged to the tenant nor
counted in its usage (the admin API's), and takes nothing from its rate limits. It used to count as a request of 2
tokens (its one-token prompt and the token run to bring the weights in) and to use up the tenant's requests/s.

A tenant over its rate limit may not load (a 429, as its generations get): a load moves models in and out of the VRAM
the tenants share, and one whose next request is refused anyway would load for nothing."""

from __future__ import annotations

import httpx
import pytest

from controller.keys import hash_key
from tests.ports import live_server_on

PORTS = range(25400, 25420)
ADMIN = "admin-ux60a-load-usage"
ADM = {"Authorization": f"Bearer {ADMIN}"}
KEY = "key-ux60a-load-usage-abcdef"


@pytest.fixture(scope="module")
def server(make_tiny, tmp_path_factory):
    tiny = str(make_tiny("qwen2"))
    cfg = {"admin_token_hash": hash_key(ADMIN),
           # dead_after_s past the 5 s beat: at its 3 s default the worker was declared dead (and killed) 3 s after each
           # registration, again and again (~15 s of the setup) until one lived through its warm-up
           "workers": {"local": "cpu", "standby": False, "heartbeat_s": 5.0, "dead_after_s": 30},
           "models": [{"name": m, "path": tiny, "engine": {"max_num_seqs": 4, "max_model_len": 128}}
                      for m in ("ga", "ch")],
           # two requests at once, then one every 200 s: the test's generations use up the burst, its loads nothing
           "tenants": [{"name": "lim", "key_hashes": [hash_key(KEY)],
                        "rate": {"requests_per_s": 0.005, "burst": 2, "tokens_per_min": 100000}}]}
    with live_server_on(PORTS, cfg, tmp_path_factory.mktemp("ux60a_load_usage")) as srv:
        yield srv


def usage(server) -> dict[str, int]:
    r = httpx.get(server.url + "/admin/tenants/lim", headers=ADM, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["inflight"] == 0, r.json()
    return r.json()["usage"]


def test_a_load_is_not_charged_nor_counted_and_a_tenant_over_its_limit_may_not_load(server):
    import ollama

    oc = ollama.Client(host=server.url, headers={"Authorization": f"Bearer {KEY}"})
    zero = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
    assert usage(server) == zero
    for _ in range(3):  # (more loads than the tenant's burst of requests)
        assert oc.generate(model="ga", prompt="").done_reason == "load"
        assert oc.chat(model="ch", messages=[]).done_reason == "load"
    assert [x.done_reason for x in oc.generate(model="ga", prompt="", stream=True)] == ["load"]
    assert usage(server) == zero
    # the loads took nothing of the requests/s burst: both of its requests are still there
    for model in ("ga", "ch"):
        r = oc.generate(model=model, prompt="Hi", options={"num_predict": 2, "temperature": 0})
        assert r.done and r.eval_count >= 1
    u = usage(server)
    assert u["requests"] == 2 and u["prompt_tokens"] > 0 and 2 <= u["completion_tokens"] <= 4, u
    # over its limit now: its generations and its loads are refused, and nothing more is counted
    with pytest.raises(ollama.ResponseError) as ei:
        oc.generate(model="ga", prompt="Hi", options={"num_predict": 1})
    assert ei.value.status_code == 429
    with pytest.raises(ollama.ResponseError) as ei:
        oc.generate(model="ga", prompt="")
    assert ei.value.status_code == 429 and "load" in str(ei.value), str(ei.value)
    with pytest.raises(ollama.ResponseError) as ei:
        oc.chat(model="ch", messages=[])
    assert ei.value.status_code == 429
    assert usage(server) == u


def test_acquire_of_a_load_takes_nothing_and_is_refused_over_a_limit():
    """TenantRegistry.acquire with charge=False (a load): a tenant without limits is let in; one with limits keeps its
    buckets whole; one over either limit gets a 429 that says a load takes none of it."""
    from controller.config import TenantSpec
    from controller.tenants import Tenant, TenantRegistry

    free = Tenant(TenantSpec(name="free"))
    assert TenantRegistry.acquire(free, 0, charge=False) is None and free.inflight == 1
    t = Tenant(TenantSpec(name="t", rate={"requests_per_s": 1, "burst": 1, "tokens_per_min": 60}))
    t0 = max(t.rps.t, t.tpm.t)  # (the buckets' clock: monotonic)
    for _ in range(3):
        assert TenantRegistry.acquire(t, 0, now=t0, charge=False) is None
        TenantRegistry.release(t, 0, 0, 0, served=False)
    assert t.rps.level == 1 and t.tpm.level == 60 and t.usage["requests"] == 0 and t.inflight == 0
    assert TenantRegistry.acquire(t, 61, now=t0) is None  # (a generation: the request, a token past the minute's)
    wait, why = TenantRegistry.acquire(t, 0, now=t0, charge=False)
    assert wait == 1 and "request rate limit" in why and "load takes none" in why
    wait, why = TenantRegistry.acquire(t, 0, now=t0 + 1.0, charge=False)  # (its request back, its tokens one by one)
    assert wait == 1 and "token rate limit" in why and "60 tokens/min" in why
    assert TenantRegistry.acquire(t, 0, now=t0 + 2.0, charge=False) is None
