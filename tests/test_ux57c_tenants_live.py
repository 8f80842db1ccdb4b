"""Found by an operator's pass over tenants, keys and the admin API (ux57c), against one live server (paced models):

- a tenants file edited by hand while the server ran (adding a tenant) was overwritten, without a word, by the next
  change made through the admin API: it is read only at start; now the edited file is kept aside and the admin API's
  answer (and the log) says where;
- a rate of Infinity (Python's JSON reads it) was taken: the admin API showed the tenant's rate as null (no limit) and
  the tenants file kept `.inf`; now a 400 naming the field;
- a tenant made afresh under a deleted tenant's name (a name given to another team) read the deleted one's stored
  responses (GET /v1/responses/{id}, previous_response_id) and found its prompts in the prefix cache (cached_tokens:
  what it had sent): both were kept by the name alone. Now by the name and a lineage that a change in place (a key
  rotation too) and the operator's DELETE-then-POST keeping a key carry over, and a fresh tenant does not.

Found fine, and pinned: an admin route without the admin token, with a wrong one or with a tenant's key is a 401 in
OpenAI's error JSON; a tenant's 429s (concurrency, requests/s) carry Retry-After and count under the tenant and model;
an unknown model's name in a 404 adds no label value to /metrics.
"""

from __future__ import annotations

import threading
import time
import uuid

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from controller.keys import hash_key
from load_tests.live_server import LiveServer

ADMIN, KEY = "admin-ux57c-token", "key-alice-ux57c-0123"


@pytest.fixture(scope="module")
def server(tmp_path_factory, make_varied):
    work = tmp_path_factory.mktemp("ux57c")
    cfg = {"admin_token_hash": hash_key(ADMIN), "tenants_file": "tenants.yaml",
           "tenants": [{"name": "alice", "key_hashes": [hash_key(KEY)], "max_concurrent": 2,
                        "rate": {"requests_per_s": 50, "burst": 50}}],
           "workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "models": [{"name": "tiny", "path": str(make_varied("qwen2")), "engine": {"max_num_seqs": 8}},
                      {"name": "fast", "aliases": ["f"], "slo": {"ttft_s": 30},
                       "engine": {"kind": "pace", "pace_s_per_token": 0.005}}]}
    with LiveServer(cfg, work) as srv:
        yield srv


def client(srv, key: str = ADMIN) -> httpx.Client:
    return httpx.Client(base_url=srv.url, timeout=30, headers={"Authorization": f"Bearer {key}"})


def fresh(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_a_hand_edit_of_the_tenants_file_is_kept_aside_and_said(server):
    """The file is read only at start: a tenant added to it by hand is not loaded, and the next change through the
    admin API rewrote the file without it (the edit lost, unsaid). Now the edited file is moved aside first and the
    API's answer names it; a change with no edit in between says nothing."""
    path = server.workdir / "tenants.yaml"
    with client(server) as a:
        assert a.post("/admin/tenants", json={"name": fresh("first")}).status_code == 201
        hand = fresh("hand")
        raw = yaml.safe_load(path.read_text())
        raw.append({"name": hand, "key_hashes": [hash_key("key-" + hand)], "models": ["*"]})
        path.write_text(yaml.safe_dump(raw))
        made = a.post("/admin/tenants", json={"name": fresh("api")})
        assert made.status_code == 201, made.text
        warning = made.json()["warning"]
        assert warning and "changed on disk" in warning and "read only at start" in warning, warning
        kept = [p for p in server.workdir.glob("tenants.yaml.edited-*") if hand in p.read_text()]
        assert len(kept) == 1 and str(kept[0]) in warning, (warning, list(server.workdir.iterdir()))
        assert hand not in path.read_text()  # (as the server has it: the edit is not in effect, as the warning says)
        assert made.json()["name"] in path.read_text()
        with client(server, "key-" + hand) as h:
            assert h.get("/v1/models").status_code == 401
        # no edit since: no warning, from POST, PATCH and DELETE alike
        name = fresh("quiet")
        r = a.post("/admin/tenants", json={"name": name})
        assert r.status_code == 201 and r.json()["warning"] is None, r.text
        r = a.patch(f"/admin/tenants/{name}", json={"max_concurrent": 3})
        assert r.status_code == 200 and r.json()["warning"] is None, r.text
        # an edit before a DELETE is said there too
        path.write_text(path.read_text() + "\n# a comment\n")
        r = a.delete(f"/admin/tenants/{name}")
        assert r.status_code == 200 and "changed on disk" in r.json().get("warning", ""), r.text


@pytest.mark.parametrize("rate", [{"requests_per_s": "Infinity"}, {"tokens_per_min": "Infinity"},
                                  {"requests_per_s": 1, "burst": "Infinity"}])
def test_a_rate_of_infinity_is_a_400_naming_the_field(server, rate):
    field = next(k for k, v in rate.items() if v == "Infinity")
    body = "{" + ", ".join(f'"{k}": {v}' for k, v in rate.items()) + "}"
    name = fresh("inf")
    with client(server) as a:
        r = a.post("/admin/tenants", content=f'{{"name": "{name}", "rate": {body}}}',
                   headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == f"rate.{field}", r.text
        assert "finite" in r.json()["error"]["message"]
        assert a.get(f"/admin/tenants/{name}").status_code == 404
        assert a.post("/admin/tenants", json={"name": name}).status_code == 201
        r = a.patch(f"/admin/tenants/{name}", content=f'{{"rate": {body}}}', headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == f"rate.{field}", r.text


def test_admin_routes_refuse_a_missing_wrong_or_tenant_key(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {KEY}"}, {"x-api-key": KEY}):
        for method, path in (("GET", "/admin/tenants"), ("GET", "/admin/requests"), ("DELETE", "/admin/tenants/alice"),
                             ("POST", "/admin/requests/x/cancel"), ("GET", "/metrics")):
            r = httpx.request(method, server.url + path, headers=headers, timeout=10)
            assert r.status_code == 401, (headers, path, r.text)
            assert r.json()["error"]["type"] == "authentication_error", r.text
    with client(server) as a:
        assert a.get("/admin/tenants/alice").status_code == 200  # (still there)


def requests_total(srv) -> dict[tuple[str, str, str], float]:
    with client(srv) as a:
        text = a.get("/metrics").text
    return {(s.labels["model"], s.labels["tenant"], s.labels["status"]): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == "tokenpool_requests_total"}


def test_a_tenants_concurrency_429_has_retry_after_and_counts_and_unknown_models_add_no_label(server):
    before = requests_total(server)
    out: list[httpx.Response] = []
    with client(server, KEY) as c:
        def hold() -> None:
            out.append(c.post("/v1/completions", json={"model": "fast", "prompt": "x", "max_tokens": 100,
                                                        "ignore_eos": True}))
        ts = [threading.Thread(target=hold) for _ in range(2)]
        for t in ts:
            t.start()
        deadline = time.monotonic() + 5
        with client(server) as a:
            while a.get("/admin/tenants/alice").json()["inflight"] < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
        r = c.post("/v1/completions", json={"model": "f", "prompt": "x", "max_tokens": 1})
        for t in ts:
            t.join()
        for _ in range(3):
            assert c.post("/v1/completions", json={"model": fresh("nosuch"), "prompt": "x"}).status_code == 404
    assert [x.status_code for x in out] == [200, 200]
    assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
    assert r.json()["error"]["code"] == "rate_limit_exceeded" and "limit 2" in r.json()["error"]["message"]
    after = requests_total(server)
    assert after[("fast", "alice", "429")] - before.get(("fast", "alice", "429"), 0) == 1
    assert after[("-", "alice", "404")] - before.get(("-", "alice", "404"), 0) == 3
    assert not [k for k in after if "nosuch" in k[0]], after


def oai(srv, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=30)


def test_a_tenant_made_under_a_deleted_ones_name_gets_none_of_its_stored_responses_or_cached_prompts(server):
    name = fresh("team")
    prompt = "You are a careful assistant. " * 12 + "The launch code is 0000."
    greedy = dict(max_tokens=2, temperature=0, extra_body={"ignore_eos": True})
    with client(server) as a:
        first = a.post("/admin/tenants", json={"name": name}).json()["api_key"]
        stored = oai(server, first).responses.create(model="fast", input="my secret plan", max_output_tokens=2)
        oai(server, first).completions.create(model="tiny", prompt=prompt, **greedy)
        # a rotation in place (every key replaced) is the same tenant: its responses and cache stay its own
        rotated = "key-" + fresh("rotated")
        rotated_hash = hash_key(rotated)
        assert a.patch(f"/admin/tenants/{name}", json={"key_hashes": [rotated_hash]}).status_code == 200
        assert oai(server, rotated).responses.retrieve(stored.id).id == stored.id
        again = oai(server, rotated).completions.create(model="tiny", prompt=prompt, **greedy)
        assert again.usage.prompt_tokens_details.cached_tokens > 0
        # the operator's update (DELETE, then POST keeping a key) too
        assert a.delete(f"/admin/tenants/{name}").status_code == 200
        assert a.post("/admin/tenants", json={"name": name, "key_hashes": [rotated_hash]}).status_code == 201
        assert oai(server, rotated).responses.retrieve(stored.id).id == stored.id
        # deleted for good, and the name given to someone else: nothing of the first one's
        assert a.delete(f"/admin/tenants/{name}").status_code == 200
        stranger = a.post("/admin/tenants", json={"name": name}).json()["api_key"]
    other = oai(server, stranger)
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(stored.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.create(model="fast", input="go on", previous_response_id=stored.id, max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(stored.id)
    theirs = other.completions.create(model="tiny", prompt=prompt, **greedy)
    assert theirs.usage.prompt_tokens_details.cached_tokens == 0
    assert other.completions.create(model="tiny", prompt=prompt, **greedy).usage.prompt_tokens_details.cached_tokens > 0
