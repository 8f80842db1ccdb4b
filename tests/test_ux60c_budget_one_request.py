"""A Messages request whose thinking budget (`budget_tokens`) is held to by budget forcing -- a first engine request of
at most budget_tokens, then, the think block still open, a continuation from the prompt, that thinking and
`</think>` for the rest of max_tokens -- is one request everywhere a user or an operator sees it: the tenant's usage
counts it once (its tokens all), its requests/s limit is taken from once (a tenant allowed one request gets its reply
whole, where the continuation was refused a 429 halfway through the stream), the metrics and the admin views count
one request, and an operator's cancel by its id (the response's x-request-id) ends it in either part, as a client
that goes away does, leaving nothing in flight.

Live, through a paced model (token_scheduler/pace.py: plain words at a fixed pace, never `</think>`) with a tiny
model's tokenizer and a template that opens the think block in the prompt: every budget below max_tokens cuts the
thinking, and the continuation runs long enough to be cancelled.
"""

from __future__ import annotations

import json
import shutil
import time

import httpx
import pytest

from controller.keys import hash_key
from tests.ports import live_server_on
from tests.test_ux60b_thinking_budget import HI, THINKING_TEMPLATE

PORTS = range(25600, 25620)
ADMIN = "admin-ux60c-budget"
ADM = {"Authorization": f"Bearer {ADMIN}"}
KEYS = {t: f"key-ux60c-{t}-abcdefghijkl" for t in ("use", "one", "can", "gone")}
PACE_S = 0.02  # a token every 20 ms: a continuation of 400 tokens runs ~8 s


@pytest.fixture(scope="module")
def server(make_tiny, tmp_path_factory):
    work = tmp_path_factory.mktemp("ux60c")
    think = work / "think"
    shutil.copytree(make_tiny("qwen2"), think)
    (think / "chat_template.jinja").write_text(THINKING_TEMPLATE)
    lots = {"tokens_per_min": 10_000_000}
    cfg = {"admin_token_hash": hash_key(ADMIN),
           "workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "models": [{"name": "think", "path": str(think),
                       "engine": {"kind": "pace", "pace_s_per_token": PACE_S, "max_model_len": 2048}}],
           "tenants": [{"name": "use", "key_hashes": [hash_key(KEYS["use"])]},
                       # one request, then one every 1000 s
                       {"name": "one", "key_hashes": [hash_key(KEYS["one"])],
                        "rate": {"requests_per_s": 0.001, "burst": 1, **lots}},
                       {"name": "can", "key_hashes": [hash_key(KEYS["can"])]},
                       {"name": "gone", "key_hashes": [hash_key(KEYS["gone"])]}]}
    with live_server_on(PORTS, cfg, work) as srv:
        yield srv


def head(tenant: str) -> dict[str, str]:
    return {"anthropic-version": "2023-06-01", "x-api-key": KEYS[tenant]}


def body(max_tokens: int, budget: int, stream: bool = False) -> dict:
    return {"model": "think", "messages": HI, "max_tokens": max_tokens, "stream": stream,
            "thinking": {"type": "enabled", "budget_tokens": budget}}


def tenant(srv, name: str) -> dict:
    r = httpx.get(srv.url + f"/admin/tenants/{name}", headers=ADM, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def metric(srv, name: str, **labels: str) -> float:
    """A sample's value in /metrics (0 where it has none)."""
    text = httpx.get(srv.url + "/metrics", headers=ADM, timeout=30).text
    for line in text.splitlines():
        if line.startswith(f"{name}{{"):
            got = dict(kv.split("=", 1) for kv in line.split("{", 1)[1].split("}", 1)[0].split(","))
            if got == {k: f'"{v}"' for k, v in labels.items()}:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def in_flight(srv) -> list[dict]:
    r = httpx.get(srv.url + "/admin/requests", headers=ADM, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def settled(srv, name: str) -> dict:
    """Tenant `name` once nothing of it is in flight (a request's end reaches the controller a moment after its
    client's): its admin view."""
    deadline = time.monotonic() + 20
    while True:
        t = tenant(srv, name)
        reqs = [r for r in in_flight(srv) if r["tenant"] == name]
        if (t["inflight"] == 0 and not reqs) or time.monotonic() > deadline:
            assert not reqs, reqs
            assert t["inflight"] == 0, t
            return t
        time.sleep(0.1)


def sse(lines) -> dict | None:
    """The next event's data of an SSE line iterator (None at its end)."""
    for line in lines:
        if line.startswith("data: "):
            return json.loads(line[6:])
    return None


def test_a_cut_budget_is_one_request_in_the_usage_the_metrics_and_the_admin_views(server):
    """budget_tokens 4 of max_tokens 12, cut (the paced model never closes its thinking): a thinking block and a text
    block, output_tokens 12; the tenant's usage counts one request of 12 completion tokens and the prompt's tokens
    once; tokenpool_requests_total, the latency histograms and the admin API's window count one request."""
    e2e = metric(server, "tokenpool_e2e_request_latency_seconds_count", model="think")
    ttft = metric(server, "tokenpool_time_to_first_token_seconds_count", model="think")
    r = httpx.post(server.url + "/v1/messages", headers=head("use"), json=body(12, 4), timeout=60)
    assert r.status_code == 200, r.text
    got = r.json()
    assert [b["type"] for b in got["content"]] == ["thinking", "text"], got
    assert got["stop_reason"] == "max_tokens" and got["usage"]["output_tokens"] == 12, got
    prompt = got["usage"]["input_tokens"] + got["usage"]["cache_read_input_tokens"]
    assert settled(server, "use")["usage"] == {"requests": 1, "prompt_tokens": prompt, "completion_tokens": 12}
    assert metric(server, "tokenpool_requests_total", model="think", tenant="use", status="200") == 1
    assert metric(server, "tokenpool_generation_tokens_total", model="think", tenant="use") == 12
    assert metric(server, "tokenpool_e2e_request_latency_seconds_count", model="think") == e2e + 1
    assert metric(server, "tokenpool_time_to_first_token_seconds_count", model="think") == ttft + 1
    pool = httpx.get(server.url + "/admin/pool", headers=ADM, timeout=30).json()
    assert next(t for t in pool["tenants"] if t["name"] == "use")["requests"] == 1, pool["tenants"]


def test_a_tenant_allowed_one_request_gets_its_budgeted_reply_whole(server):
    """A tenant whose requests/s allows one request (burst 1): its streamed, budgeted request runs to its end (the
    continuation takes nothing of the limit: no 429 error event halfway), and the limit holds for the next one."""
    with httpx.stream("POST", server.url + "/v1/messages", headers=head("one"), json=body(16, 5, stream=True),
                      timeout=60) as r:
        assert r.status_code == 200, r.read()
        events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: ")]
    kinds = [e["type"] for e in events]
    assert "error" not in kinds and kinds[-1] == "message_stop", events
    blocks = [e["content_block"]["type"] for e in events if e["type"] == "content_block_start"]
    assert blocks == ["thinking", "text"], events
    end = next(e for e in events if e["type"] == "message_delta")
    assert end["delta"]["stop_reason"] == "max_tokens" and end["usage"]["output_tokens"] == 16, end
    assert settled(server, "one")["usage"]["requests"] == 1
    r = httpx.post(server.url + "/v1/messages", headers=head("one"), json=body(16, 5), timeout=60)
    assert r.status_code == 429, r.text


def test_an_operator_cancels_the_continuation_by_the_requests_id(server):
    """Cancelled by its id (x-request-id) while the continuation runs (its text streaming): the stream ends with an
    error event at once, /admin/requests lists nothing left of it, the tenant has nothing in flight, and its usage
    counts one request of the tokens made."""
    t0 = time.monotonic()
    with httpx.stream("POST", server.url + "/v1/messages", headers=head("can"), json=body(400, 3, stream=True),
                      timeout=60) as r:
        assert r.status_code == 200, r.read()
        rid = r.headers["x-request-id"]
        lines = r.iter_lines()
        while (e := sse(lines)) is not None and not (e["type"] == "content_block_delta"
                                                      and e["delta"]["type"] == "text_delta"):
            pass
        assert e is not None, "the reply never reached its answer"
        flying = in_flight(server)
        listed = [x["id"] for x in flying]
        assert listed == [rid], listed  # (one request, under its one id, in either part)
        # its tokens: the thinking's 3, then the answer's so far (the answer's alone were shown: 1 or 2 here)
        assert flying[0]["tokens"] >= 3 + 1, flying
        c = httpx.post(server.url + f"/admin/requests/{rid}/cancel", headers=ADM, timeout=30)
        assert c.status_code == 200, c.text
        assert c.json()["id"] == rid and c.json()["cancelled"] == 1, c.json()
        rest = [e for e in iter(lambda: sse(lines), None)]
    assert rest and rest[-1]["type"] == "error", rest[-3:]
    assert "cancel" in json.dumps(rest[-1]), rest[-1]
    assert time.monotonic() - t0 < 400 * PACE_S * 0.75, "the continuation ran on past the cancel"
    usage = settled(server, "can")["usage"]
    assert usage["requests"] == 1 and 3 < usage["completion_tokens"] < 400, usage
    assert in_flight(server) == []


def test_a_client_gone_during_the_continuation_ends_it(server):
    """The client leaves while the continuation streams: it ends (nothing in flight, the tenant's slot back, once),
    counted as one request."""
    with httpx.stream("POST", server.url + "/v1/messages", headers=head("gone"), json=body(400, 3, stream=True),
                      timeout=60) as r:
        assert r.status_code == 200, r.read()
        lines = r.iter_lines()
        while (e := sse(lines)) is not None and not (e["type"] == "content_block_delta"
                                                      and e["delta"]["type"] == "text_delta"):
            pass
        assert e is not None
    t = time.monotonic()
    usage = settled(server, "gone")["usage"]
    assert time.monotonic() - t < 400 * PACE_S * 0.5, "the continuation ran on without its client"
    assert usage["requests"] == 1 and 3 < usage["completion_tokens"] < 400, usage
