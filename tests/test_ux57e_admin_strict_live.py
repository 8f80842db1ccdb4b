"""Found by user testing of the admin API, /metrics and the error shapes (ux57e), against one live server (paced models):

- a JSON key given twice in an admin body (`{"name": "d1", "name": "d2"}`) was taken, the last one winning, where the
  configuration file refuses a key given twice: now a 400 naming the key;
- admin bodies' numbers and switches were coerced (`"max_concurrent": "2"` was 2, `"priority": true` was 1) and a
  priority of 1e20 was refused as an "input string": now JSON's types only (as the configuration file takes them), a
  400 naming the field, the type or range expected and what was sent;
- `PATCH /admin/tenants/X {"key_hashes": []}` left the tenant without a key, unsaid: now a 400 (a tenant is never
  without a key: POST makes one where none is given, the operator revokes a Tenant whose Secret holds none);
- a 413 (a body too large) on an admin route was counted in tokenpool_requests_total{model="-",tenant="-"}, where no
  other admin answer is: admin routes are not counted;
- the metadata routes that name a model (/tokenize, /detokenize, /api/show, /api/pull, /v1/models/{id},
  /v1/messages/count_tokens, /v1/responses/input_tokens) counted no refusal but their 401s: now each is counted as the
  generating routes count theirs, under the model when one has the name ("-" for any other: no label value from a
  client's text);
- /v1/chat/completions (any OpenAI route) sent with an `anthropic-version` header answered its errors in Anthropic's
  shape: the OpenAI routes always answer OpenAI's (the Messages API, the Models API to the anthropic client and paths
  no route serves keep Anthropic's).
"""

from __future__ import annotations

import json
import uuid

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from controller.config import load_config
from controller.keys import hash_key
from tests import ports

ADMIN, KEY, KEY2 = "admin-ux57e-token", "key-alice-ux57e-0123", "key-alice-ux57e-4567"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("ux57e")
    cfg = {"admin_token_hash": hash_key(ADMIN), "tenants_file": "tenants.yaml", "max_request_bytes": 1024,
           "tenants": [{"name": "alice", "key_hashes": [hash_key(KEY)]}],
           "workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "models": [{"name": "fast", "aliases": ["f"], "slo": {"ttft_s": 30},
                       "engine": {"kind": "pace", "pace_s_per_token": 0.002}}]}
    with ports.live_server_on(range(18850, 18900), cfg, work) as srv:
        yield srv


def client(srv, key: str = ADMIN, **headers) -> httpx.Client:
    return httpx.Client(base_url=srv.url, timeout=30, headers={"Authorization": f"Bearer {key}", **headers})


def fresh(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def raw(c: httpx.Client, method: str, path: str, body: str) -> httpx.Response:
    return c.request(method, path, content=body, headers={"content-type": "application/json"})


def requests_total(srv) -> dict[tuple[str, str, str], float]:
    with client(srv) as a:
        text = a.get("/metrics").text
    return {(s.labels["model"], s.labels["tenant"], s.labels["status"]): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == "tokenpool_requests_total"}


def delta(before: dict, after: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


# --- 1. a key given twice ---
def test_an_admin_body_giving_a_key_twice_is_a_400_naming_it(server):
    d1, d2 = fresh("d1"), fresh("d2")
    with client(server) as a:
        r = raw(a, "POST", "/admin/tenants", f'{{"name": "{d1}", "name": "{d2}"}}')
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "name" and "'name' twice" in err["message"], err
        assert a.get(f"/admin/tenants/{d1}").status_code == 404 and a.get(f"/admin/tenants/{d2}").status_code == 404
        # nested, and on PATCH (tenants and models alike)
        r = raw(a, "POST", "/admin/tenants", f'{{"name": "{d1}", "rate": {{"requests_per_s": 1, "requests_per_s": 9}}}}')
        assert r.status_code == 400 and r.json()["error"]["param"] == "requests_per_s", r.text
        assert a.post("/admin/tenants", json={"name": d1}).status_code == 201
        r = raw(a, "PATCH", f"/admin/tenants/{d1}", '{"priority": 1, "priority": 2}')
        assert r.status_code == 400 and r.json()["error"]["param"] == "priority", r.text
        assert a.get(f"/admin/tenants/{d1}").json()["priority"] == 0
        r = raw(a, "PATCH", "/admin/models/fast", '{"slo": {"ttft_s": 30, "ttft_s": 1}}')
        assert r.status_code == 400 and r.json()["error"]["param"] == "ttft_s", r.text
        assert a.get("/admin/models").json()[0]["slo"]["ttft_s"] == 30
        # (the same key in two objects is no repeat)
        r = raw(a, "PATCH", "/admin/models/fast", '{"slo": {"ttft_s": 30}, "replicas": {"min": 1, "max": 4}}')
        assert r.status_code == 200, r.text
    # the admin token first: a caller without one hears 401, whatever its body holds
    r = raw(httpx.Client(base_url=server.url, timeout=10), "POST", "/admin/tenants", '{"name": "a", "name": "b"}')
    assert r.status_code == 401, r.text


def test_the_configuration_file_refuses_a_key_twice_too(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("tenants:\n  - name: a\n    name: b\n")
    with pytest.raises(yaml.YAMLError, match="found key 'name' twice"):
        load_config(p)


# --- 2. JSON's types only ---
STRICT_BODIES = [
    ({"max_concurrent": "2"}, "max_concurrent", "valid integer", '(got "2")'),
    ({"priority": True}, "priority", "valid integer", "(got true)"),
    ({"priority": 1e20}, "priority", "valid integer", "(got 1e+20)"),
    ({"priority": 2.5}, "priority", "valid integer", "(got 2.5)"),
    ({"priority": 2 ** 40}, "priority", "less than or equal to 2147483647", ""),
    ({"rate": {"requests_per_s": "5"}}, "rate.requests_per_s", "valid number", '(got "5")'),
    ({"rate": {"tokens_per_min": False}}, "rate.tokens_per_min", "valid number", "(got false)"),
]


@pytest.mark.parametrize("body,param,expected,got", STRICT_BODIES)
def test_tenant_numbers_are_json_numbers(server, body, param, expected, got):
    name = fresh("strict")
    with client(server) as a:
        r = a.post("/admin/tenants", json={"name": name, **body})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and expected in err["message"] and got in err["message"], err
        assert a.get(f"/admin/tenants/{name}").status_code == 404
        assert a.post("/admin/tenants", json={"name": name}).status_code == 201
        r = a.patch(f"/admin/tenants/{name}", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        t = a.get(f"/admin/tenants/{name}").json()
        assert (t["priority"], t["max_concurrent"], t["rate"]["requests_per_s"]) == (0, None, None), t


def test_json_numbers_still_take_ints_for_floats_and_the_bounds(server):
    name = fresh("ok")
    with client(server) as a:
        r = a.post("/admin/tenants", json={"name": name, "priority": -(2 ** 31), "max_concurrent": 3,
                                           "rate": {"requests_per_s": 5, "burst": 2.5}})
        assert r.status_code == 201, r.text
        assert (r.json()["priority"], r.json()["rate"]["requests_per_s"]) == (-(2 ** 31), 5.0)


@pytest.mark.parametrize("body,param,got", [({"priority": "1"}, "priority", '(got "1")'),
                                            ({"slo": {"ttft_s": "5"}}, "slo.ttft_s", '(got "5")'),
                                            ({"replicas": {"max": True}}, "replicas.max", "(got true)")])
def test_model_patch_numbers_are_json_numbers(server, body, param, got):
    with client(server) as a:
        r = a.patch("/admin/models/fast", json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param and got in r.json()["error"]["message"], r.text
        m = a.get("/admin/models").json()[0]
        assert (m["priority"], m["slo"]["ttft_s"], m["replicas"]["max"]) == (0, 30, 4), m


@pytest.mark.parametrize("snippet,field", [("    max_concurrent: '2'\n", "max_concurrent"),
                                           ("    priority: true\n", "priority"),
                                           ("    rate: {requests_per_s: '5'}\n", "requests_per_s")])
def test_the_configuration_file_agrees(tmp_path, snippet, field):
    p = tmp_path / "c.yaml"
    p.write_text("tenants:\n  - name: a\n" + snippet)
    with pytest.raises(ValidationError, match=field):
        load_config(p)


# --- 3. a tenant keeps a key ---
def test_patch_to_no_key_is_refused_and_the_key_keeps_working(server):
    with client(server) as a:
        r = a.post("/admin/tenants", json={"name": (name := fresh("keyed")), "key_hashes": [hash_key(KEY2)]})
        assert r.status_code == 201, r.text
        r = a.patch(f"/admin/tenants/{name}", json={"key_hashes": []})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "key_hashes" and "at least one key" in err["message"] and "DELETE" in err["message"]
    with client(server, KEY2) as c:
        assert c.get("/v1/models").status_code == 200


# --- 4. admin routes are not counted ---
def test_a_413_on_an_admin_route_is_not_counted_but_on_a_serving_route_is(server):
    big = json.dumps({"name": "x" * 2000})
    before = requests_total(server)
    with client(server) as a:
        assert raw(a, "POST", "/admin/tenants", big).status_code == 413
        # chunked (no content-length): refused as it grows
        r = a.post("/admin/tenants", content=iter([big.encode()[:600], big.encode()[600:]]),
                   headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
    assert delta(before, requests_total(server)) == {}
    with client(server, KEY) as c:
        assert raw(c, "POST", "/v1/chat/completions", big).status_code == 413
    assert delta(before, requests_total(server)) == {("-", "-", "413"): 1}


# --- 5. metadata routes count their refusals ---
def test_metadata_routes_count_their_refusals_without_a_label_of_the_name_sent(server):
    nosuch = fresh("nosuch")
    msgs = [{"role": "user", "content": "hi"}]
    calls = [("POST", "/tokenize", {"model": nosuch, "prompt": "hi"}),
             ("POST", "/detokenize", {"model": nosuch, "tokens": [1]}),
             ("POST", "/v1/messages/count_tokens", {"model": nosuch, "messages": msgs}),
             ("POST", "/v1/responses/input_tokens", {"model": nosuch, "input": "hi"}),
             ("GET", f"/v1/models/{nosuch}", None),
             ("POST", "/api/show", {"model": nosuch}),
             ("POST", "/api/pull", {"model": nosuch, "stream": False})]
    before = requests_total(server)
    with client(server, KEY) as c:
        for method, path, body in calls:
            r = c.request(method, path, json=body)
            assert r.status_code == 404, (path, r.text)
        # a model that is served: its refusals under its own name (by an alias too)
        r = c.post("/detokenize", json={"model": "f", "tokens": [10 ** 9]})
        assert r.status_code == 400, r.text
        r = c.post("/tokenize", json={"model": "fast", "prompt": 5})  # (a body refused before the route ran)
        assert r.status_code == 400, r.text
        assert c.post("/tokenize", json={"model": "fast", "prompt": "hi"}).status_code == 200
    after = requests_total(server)
    assert delta(before, after) == {("-", "alice", "404"): len(calls), ("fast", "alice", "400"): 2}, delta(before, after)
    assert not any(nosuch in k[0] for k in after)


# --- 6. OpenAI routes answer OpenAI's error shape ---
def test_openai_routes_answer_openai_errors_to_an_anthropic_version_header(server):
    hdr = {"anthropic-version": "2023-06-01"}
    with client(server, KEY, **hdr) as c:
        for path, body in (("/v1/chat/completions", {"model": "nosuch", "messages": [{"role": "user", "content": "x"}]}),
                           ("/v1/chat/completions", {"model": "fast", "messages": "x"}),
                           ("/v1/completions", {"model": "fast", "prompt": "x", "max_tokens": -1}),
                           ("/v1/embeddings", {"model": "nosuch", "input": "x"})):
            r = c.post(path, json=body)
            assert r.status_code in (400, 404), r.text
            err = r.json()["error"]
            assert "type" not in r.json() and set(err) == {"message", "type", "param", "code"}, (path, r.text)
        # the Messages API, the Models API and a path no route serves keep Anthropic's
        r = c.post("/v1/messages", json={"model": "nosuch", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 404 and r.json()["type"] == "error", r.text
        r = c.get("/v1/models/nosuch")
        assert r.status_code == 404 and r.json()["type"] == "error", r.text
        r = c.get("/v1/files")
        assert r.status_code == 404 and r.json()["type"] == "error", r.text
    oa = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, default_headers=hdr, max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        oa.chat.completions.create(model="nosuch", messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "model_not_found" and "nosuch" in e.value.message, e.value.body
