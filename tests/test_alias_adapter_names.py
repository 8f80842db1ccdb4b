"""A tenant allowed a model only by an alias (`models: [nick, sql]`), or one of its LoRA adapters alone (`models:
[sql]`), never hears the model's own name: not as an adapter's `parent` in /v1/models (it showed the real name),
not in /api/tags or /api/show, and not in the errors the controller words with it ("no engine can serve model
'NAME' now", "model 'NAME' is overloaded") through any API. An app without workers: every generation is refused
with such a 503 at once."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient

from controller.app import build_app
from controller.config import LoraModule, ModelSpec, ServerConfig, TenantSpec
from controller.errors import ServingError
from controller.keys import hash_key
from controller.model_factory import make_lora

REAL = "hidden-base-model"
NICK, ADAPTER_ONLY, ALL = "key-nick-names-abcdefgh", "key-adapter-names-abcdefg", "key-all-names-abcdefghij"


@pytest.fixture(scope="module")
def client(tiny_model, tmp_path_factory):
    sql = make_lora(tiny_model, tmp_path_factory.mktemp("alias-lora") / "sql", rank=2)
    cfg = ServerConfig(admin_token_hash=hash_key("admin-alias-names"), models=[], tenants=[
        TenantSpec(name="nick", key_hashes=[hash_key(NICK)], models=["nick", "sql"]),
        TenantSpec(name="adapter-only", key_hashes=[hash_key(ADAPTER_ONLY)], models=["sql"]),
        TenantSpec(name="all", key_hashes=[hash_key(ALL)])])
    app = build_app(cfg)  # (no lifespan: no workers start)
    asyncio.run(app.state.controller.add_model(ModelSpec(
        name=REAL, path=str(tiny_model), aliases=["nick"], lora_modules=[LoraModule(name="sql", path=str(sql))])))
    return TestClient(app)


def _h(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_an_adapters_parent_is_the_name_the_tenant_knows(client):
    r = client.get("/v1/models", headers=_h(NICK))
    assert REAL not in r.text, r.text
    assert [(m["id"], m.get("parent")) for m in r.json()["data"]] == [("nick", None), ("sql", "nick")]
    assert client.get("/v1/models/sql", headers=_h(NICK)).json()["parent"] == "nick"
    only = client.get("/v1/models", headers=_h(ADAPTER_ONLY))
    assert REAL not in only.text and [m["id"] for m in only.json()["data"]] == ["sql"]
    assert client.get("/v1/models/sql", headers=_h(ADAPTER_ONLY)).json().get("parent") is None
    # a tenant allowed the model by its own name sees that name (and its alias, its own card), as before
    every = client.get("/v1/models", headers=_h(ALL)).json()["data"]
    assert [(m["id"], m.get("parent")) for m in every] == [(REAL, None), ("nick", None), ("sql", REAL)]
    tags = client.get("/api/tags", headers=_h(NICK))
    assert tags.status_code == 200 and REAL not in tags.text
    assert [m["name"] for m in tags.json()["models"]] == ["nick:latest", "sql:latest"]
    assert all(m["size"] > 0 for m in tags.json()["models"])
    for key in (NICK, ADAPTER_ONLY):
        show = client.post("/api/show", json={"model": "sql"}, headers=_h(key))
        assert show.status_code == 200 and REAL not in show.text


def test_ollama_ps_lists_a_resident_model_under_its_alias(client, monkeypatch):
    """/api/ps lists a model in VRAM under the name the key uses it by (an alias-only tenant saw nothing)."""
    import controller.api.ollama as ollama

    monkeypatch.setattr(ollama, "resident_models", lambda engines: {REAL})
    got = client.get("/api/ps", headers=_h(NICK))
    assert [m["name"] for m in got.json()["models"]] == ["nick:latest"] and REAL not in got.text


@pytest.mark.parametrize("key,model", [(NICK, "nick"), (NICK, "sql"), (ADAPTER_ONLY, "sql")])
def test_refusals_name_the_model_as_asked(client, key, model):
    """The controller's 503 (no engine) reaches each API naming the model as the request did."""
    chat = [{"role": "user", "content": "hi"}]
    calls = [("/v1/chat/completions", {"model": model, "messages": chat, "max_tokens": 2}),
             ("/v1/chat/completions", {"model": model, "messages": chat, "max_tokens": 2, "stream": True}),
             ("/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 2}),
             ("/v1/embeddings", {"model": model, "input": "hi"}),
             ("/v1/messages", {"model": model, "messages": chat, "max_tokens": 2}),
             ("/v1/responses", {"model": model, "input": "hi", "max_output_tokens": 2}),
             ("/api/chat", {"model": model, "messages": chat, "stream": False}),
             ("/api/generate", {"model": model, "prompt": "hi", "raw": True, "stream": False})]
    for path, body in calls:
        r = client.post(path, json=body, headers=_h(key))
        assert r.status_code == 503, (path, r.status_code, r.text)
        assert REAL not in r.text and f"'{model}'" in r.text, (path, r.text)


def test_as_asked_replaces_the_name_whole():
    """The model's name is replaced where it stands whole (quoted, bare, ending a sentence), never inside a longer
    name."""
    from controller.api.serving import as_asked

    def said(m: str) -> str:
        return as_asked(ServingError(503, m), "q2.5", "nick").message

    assert said("model 'q2.5' is overloaded") == "model 'nick' is overloaded"
    assert said("engine failure: model q2.5 is not loaded here") == "engine failure: model nick is not loaded here"
    assert said("no model q2.5.") == "no model nick."
    for other in ("q2.5-instruct and q2.5x", "x.q2.5", "q2.5.1"):
        assert said(other) == other


def test_a_failed_loads_reason_is_the_operators(client, monkeypatch):
    """On a server of several tenants, a request for a model whose load failed hears that it failed and when it is
    tried again (503, Retry-After), not the worker's exception, which names the server's paths (it did)."""
    ctl = client.app.state.controller

    async def generate(entry, tenant, prompts, params, n, request_id, stream=True, load=False):
        raise ServingError(503, f"model {REAL!r} could not be registered (its load failed): OSError: no file "
                                f"/srv/secret/{REAL}/model.safetensors (tried again in 30 s)", retry_after=30,
                           code="model_load_failed")

    monkeypatch.setattr(ctl, "generate", generate)
    r = client.post("/v1/chat/completions", json={"model": "nick", "messages": [{"role": "user", "content": "hi"}]},
                    headers=_h(NICK))
    assert r.status_code == 503 and r.headers["retry-after"] == "30", r.text
    err = r.json()["error"]
    assert err["code"] == "model_load_failed" and "'nick'" in err["message"] and "30 s" in err["message"]
    assert "/srv" not in r.text and REAL not in r.text
