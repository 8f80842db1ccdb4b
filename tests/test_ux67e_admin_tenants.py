"""Found by an operator's pass over tenants, keys, the admin API and /metrics (ux67e), against one live server:

- an admin path no route serves (`POST /admin/tenants/NAME/keys`, `GET /admin/engines/w0`) was a bare 307 to the
  same path plus a slash, with no body and without the admin token's check (the trailing-slash route answered
  Starlette's redirect probe); now OpenAI's 404 JSON, naming the admin API;
- a tenant could be named `-`, the label /metrics gives the requests no tenant's key sent (401s), so that tenant's
  series held other callers' refusals and disagreed with GET /admin/tenants; and `.` or `..`, which clients resolve
  out of a URL (`DELETE /admin/tenants/..` is sent as `DELETE /admin`): a tenant the admin API could not reach. Now
  refused by the admin API and the configuration alike, and so are such names of models, aliases and LoRA adapters
  (a model named `a/../b` could not be deleted; one named `-` merged with the refusals naming no model);
- `tokenpool serve` with a tenants file it cannot hold (edited by hand) ended in a traceback, where `tokenpool config
  check` names the problem in a line (exit 2): now `serve` says the same line, exit 2, before it binds;
- two tenants could hold the same key hash (the configuration, POST or PATCH /admin/tenants with `key_hashes`: a
  hash copied from another tenant's entry): the key was the first tenant's, its models and limits, unsaid, and its
  requests counted as that tenant's. Now refused (a 409 `key_in_use`, a configuration error); a key hashed twice
  (other salts, so other hashes) for two tenants is said in the log at its first request;
- a 429 for tokens_per_min said a request with `n` choices reserved "prompt + max_tokens" where it reserves
  max_tokens for each choice (611 tokens for max_tokens 200, n=3): now it says so.
"""

from __future__ import annotations

import subprocess
import sys

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from controller.config import ServerConfig
from controller.keys import hash_key
from tests.ports import free_port, live_server_on

PORTS = range(29950, 30000)
ADMIN, KEY = "admin-ux67e-token", "key-team-ux67e-0123"
TEAM_HASH = hash_key(KEY)
PACE = {"kind": "pace", "pace_s_per_token": 0.001}


@pytest.fixture(scope="module")
def server(tmp_path_factory, make_tiny):
    cfg = {"admin_token_hash": hash_key(ADMIN), "tenants_file": "tenants.yaml",
           "tenants": [{"name": "team", "key_hashes": [TEAM_HASH], "models": ["fast"]}],
           "workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "models": [{"name": "fast", "engine": PACE}, {"name": "other", "engine": PACE},
                      {"name": "tiny", "path": str(make_tiny("qwen2"))}]}
    with live_server_on(PORTS, cfg, tmp_path_factory.mktemp("ux67e")) as srv:
        yield srv


def admin(srv, token: str | None = ADMIN) -> httpx.Client:
    return httpx.Client(base_url=srv.url, timeout=30, follow_redirects=False,
                        headers={"Authorization": f"Bearer {token}"} if token else {})


@pytest.mark.parametrize("token", [ADMIN, None], ids=["admin-token", "no-token"])
def test_an_admin_path_no_route_serves_is_a_404_not_a_redirect(server, token):
    with admin(server, token) as a:
        for method, path in [("POST", "/admin/tenants/team/keys"), ("GET", "/admin/engines/w0"),
                             ("DELETE", "/admin/requests/x"), ("GET", "/admin/nothing")]:
            r = a.request(method, path, json={} if method == "POST" else None)
            assert r.status_code == 404, (method, path, r.status_code, r.headers.get("location"))
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["code"] == "not_found", err
            assert f"({method} {path})" in err["message"] and "admin API has no such route" in err["message"], err
        # what was there stays: a trailing slash names the route without it, a wrong method is a 405
        r = a.delete("/admin/tenants/team/")  # (the admin token first)
        assert (r.status_code, "trailing slash" in r.text) == ((404, True) if token else (401, False)), r.text
        r = a.put("/admin/tenants")
        assert r.status_code == 405 and r.headers["allow"] == "GET", r.text
    with admin(server) as a:
        assert a.get("/admin/tenants/team").status_code == 200  # nothing was done to it


@pytest.mark.parametrize("name", ["-", ".", ".."])
def test_a_tenant_name_metrics_or_urls_cannot_tell_apart_is_refused(server, name):
    with admin(server) as a:
        r = a.post("/admin/tenants", json={"name": name})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "name" and f"{name!r} is not a tenant name" in err["message"], err
        assert name not in [t["name"] for t in a.get("/admin/tenants").json()]
    tenant = {"name": name, "key_hashes": [hash_key(KEY)]}
    with pytest.raises(ValueError, match="is not a tenant name"):
        ServerConfig.model_validate({"tenants": [tenant], "models": []})
    # names that only hold these characters stay names
    ServerConfig.model_validate({"tenants": [dict(tenant, name=f"{name}x")], "models": []})


@pytest.mark.parametrize("method, path, body, param", [
    ("POST", "/admin/models", {"name": "-", "engine": PACE}, "name"),
    ("POST", "/admin/models", {"name": "org/../name", "engine": PACE}, "name"),
    ("POST", "/admin/models", {"name": "fine", "aliases": [".."], "engine": PACE}, "aliases"),
    ("PATCH", "/admin/models/fast", {"aliases": ["f", "-"]}, "aliases"),
    ("POST", "/v1/load_lora_adapter", {"lora_name": "-", "lora_path": "/nowhere", "base_model_name": "tiny"},
     "lora_name")], ids=["model-dash", "model-dots", "alias-dots", "patched-alias", "lora"])
def test_a_model_name_metrics_or_urls_cannot_tell_apart_is_refused(server, method, path, body, param):
    with admin(server) as a:
        r = a.request(method, path, json=body)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and "is not a model name" in err["message"], err
        served = {n for m in a.get("/admin/models").json() for n in [m["name"], *m["aliases"], *m["lora_modules"]]}
    assert served.isdisjoint({"-", "..", "org/../name"}), served
    with pytest.raises(ValueError, match="is not a model name"):
        ServerConfig.model_validate({"models": [{"name": "-", "engine": PACE}]})


def test_serve_says_a_served_name_it_refuses_in_a_line(make_tiny, tmp_path):
    """`tokenpool serve DIR --served-model-name -` printed pydantic's four-line error."""
    r = subprocess.run([sys.executable, "-m", "controller.cli", "serve", str(make_tiny("qwen2")), "--served-model-name",
                        "-", "--port", str(free_port(PORTS))], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "tokenpool serve: --served-model-name: '-' is not a model name: /metrics counts the requests naming no model "
        "served under model=\"-\""], r.stderr


def test_the_metrics_tenant_series_agree_with_the_admin_api(server):
    """What the refused name protects: refusals no tenant's key sent go under tenant "-", a tenant's own requests
    under its name, as GET /admin/tenants counts them."""
    with admin(server) as a:
        made = a.post("/admin/tenants", json={"name": "metered"}).json()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=made["api_key"], max_retries=0)
        r = client.chat.completions.create(model="fast", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="not-a-key", max_retries=0).models.list()
        families = {f.name: f for f in text_string_to_metric_families(a.get("/metrics").text)}
        usage = a.get("/admin/tenants/metered").json()["usage"]
    by_tenant: dict[str, float] = {}
    for s in families["tokenpool_requests"].samples:
        if s.name == "tokenpool_requests_total":
            by_tenant[s.labels["tenant"]] = by_tenant.get(s.labels["tenant"], 0) + s.value
    assert by_tenant["metered"] == usage["requests"] == 1 and by_tenant["-"] >= 1, by_tenant
    gen = {s.labels["tenant"]: s.value for s in families["tokenpool_generation_tokens"].samples
           if s.name == "tokenpool_generation_tokens_total"}
    assert gen["metered"] == usage["completion_tokens"] == r.usage.completion_tokens, (gen, usage)


def test_a_key_hash_another_tenant_holds_is_refused(server):
    with admin(server) as a:
        for r in (a.post("/admin/tenants", json={"name": "copycat", "key_hashes": [TEAM_HASH]}),
                  a.post("/admin/tenants", json={"name": "copycat", "key_hashes": [hash_key("k-1234567890"),
                                                                                    TEAM_HASH]})):
            assert r.status_code == 409, r.text
            err = r.json()["error"]
            assert (err["code"], err["param"]) == ("key_in_use", "key_hashes"), err
            assert "tenant 'team' and tenant 'copycat'" in err["message"], err
        assert a.get("/admin/tenants/copycat").status_code == 404
        made = a.post("/admin/tenants", json={"name": "rotator", "models": ["other"]}).json()
        r = a.patch("/admin/tenants/rotator", json={"key_hashes": [TEAM_HASH]})
        assert r.status_code == 409 and r.json()["error"]["code"] == "key_in_use", r.text
    # the refused rotation changed nothing: each key is its own tenant's, with its own models
    for key, models in ((KEY, ["fast"]), (made["api_key"], ["other"])):
        listed = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0).models.list()
        assert [m.id for m in listed] == models
    with pytest.raises(ValueError, match="a key hash is given to both tenant 'a' and tenant 'b'"):
        ServerConfig.model_validate({"models": [], "tenants": [{"name": "a", "key_hashes": [TEAM_HASH]},
                                                               {"name": "b", "key_hashes": [TEAM_HASH]}]})


def test_one_key_hashed_for_two_tenants_is_said_at_its_first_request(server):
    """Hashed twice (each hash its own salt) the two hashes differ, so nothing refuses them; the key goes to the
    first tenant, and the log says so, once."""
    twice = "key-hashed-twice-0123"
    with admin(server) as a:
        for name in ("first", "second"):
            assert a.post("/admin/tenants", json={"name": name, "key_hashes": [hash_key(twice)]}).status_code == 201
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=twice, max_retries=0)
        for _ in range(2):
            client.chat.completions.create(model="fast", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert a.get("/admin/tenants/first").json()["usage"]["requests"] == 2
    said = [ln for ln in server.log_path.read_text().splitlines() if "matches a key hash of tenant" in ln]
    assert len(said) == 1 and "tenant 'first' and one of tenant 'second'" in said[0], said


def test_a_token_rate_429_says_each_choice_reserves_max_tokens(server):
    with admin(server) as a:
        key = a.post("/admin/tenants", json={"name": "choosy", "rate": {"tokens_per_min": 100}}).json()["api_key"]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    ask = [{"role": "user", "content": "hi"}]
    prompt = client.chat.completions.create(model="fast", messages=ask, max_tokens=2).usage.prompt_tokens
    with pytest.raises(openai.RateLimitError) as ei:
        client.chat.completions.create(model="fast", messages=ask, max_tokens=40, n=3)
    msg = ei.value.body["message"]
    assert f"reserves {prompt + 3 * 40} tokens (prompt + max_tokens for each choice; refunded" in msg
    assert int(ei.value.response.headers["retry-after"]) >= 1


@pytest.mark.parametrize("entry, why", [
    ({"name": "x", "key_hashes": [hash_key(KEY)], "max_concurrent": 0},
     "max_concurrent: Input should be greater than or equal to 1"),
    ({"name": "x", "key_hashes": [TEAM_HASH]}, "a key hash is given to both tenant 'team' and tenant 'x'")],
    ids=["bad-value", "shared-key"])
def test_serve_says_a_tenants_file_it_cannot_hold_in_a_line(tmp_path, entry, why):
    """Hand-edited into an entry the tenants' rules refuse: `serve` said it in a traceback (exit 1), or, for a key
    hash the configuration's tenant holds, started with the key the configured tenant's."""
    (tmp_path / "tenants.yaml").write_text(yaml.safe_dump([entry]))
    port = free_port(PORTS)
    cfg = {"listen": {"host": "127.0.0.1", "port": port}, "tenants_file": "tenants.yaml",
           "tenants": [{"name": "team", "key_hashes": [TEAM_HASH]}],
           "workers": {"local": "none"}, "models": [{"name": "fast", "engine": PACE}]}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    check = subprocess.run([sys.executable, "-m", "controller.cli", "config", "check", "config.yaml"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=30)
    serve = subprocess.run([sys.executable, "-m", "controller.cli", "serve", "--config", "config.yaml"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert check.returncode == serve.returncode == 2, (check.stderr, serve.stderr[-2000:])
    assert "Traceback" not in serve.stderr, serve.stderr[-2000:]
    said = [ln for ln in serve.stderr.splitlines() if "ERROR" in ln]
    assert len(said) == 1 and f"tenants_file {tmp_path / 'tenants.yaml'}: {why}" in said[0], serve.stderr[-2000:]
    assert check.stderr.strip().endswith(said[0].split(" ERROR ")[1]), check.stderr  # the same line
