"""A tenant allowed a model only by one of its aliases (`models: [nick]`) may use it by that name, so /v1/models
lists it under that name (as vLLM and OpenAI list what the key may use; it was missing), GET /v1/models/{alias}
answers, and the model's own name, which the tenant may not use, is neither listed nor served."""

from __future__ import annotations

import asyncio

from fastapi.testclient import TestClient

from controller.app import build_app
from controller.config import ModelSpec, ServerConfig, TenantSpec
from controller.keys import hash_key

NICK, ALL, OTHER = "key-alias-only-abcdefgh", "key-alias-all-abcdefghi", "key-alias-other-abcdefg"


def make() -> TestClient:
    cfg = ServerConfig(admin_token_hash=hash_key("admin-alias-models"), models=[], tenants=[
        TenantSpec(name="nick-only", key_hashes=[hash_key(NICK)], models=["nick", "nick-*"]),
        TenantSpec(name="everything", key_hashes=[hash_key(ALL)]),
        TenantSpec(name="other", key_hashes=[hash_key(OTHER)], models=["plain"])])
    app = build_app(cfg)  # (no lifespan: no workers start)
    for spec in (ModelSpec(name="real-name", path=None, engine={"kind": "pace"}, aliases=["nick", "nick-2", "x"]),
                 ModelSpec(name="plain", path=None, engine={"kind": "pace"})):
        asyncio.run(app.state.controller.add_model(spec))
    return TestClient(app)


def _ids(c: TestClient, key: str) -> list[str]:
    r = c.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return [m["id"] for m in r.json()["data"]]


def test_a_model_allowed_by_its_alias_is_listed_under_it():
    c = make()
    assert _ids(c, NICK) == ["nick", "nick-2"]  # the names it may use (the patterns name no other)
    h = {"Authorization": f"Bearer {NICK}"}
    card = c.get("/v1/models/nick", headers=h)
    assert card.status_code == 200 and card.json()["id"] == "nick", card.text
    for name in ("real-name", "x", "plain"):  # not its to use: not listed, and a 404 as any unknown name
        assert c.get(f"/v1/models/{name}", headers=h).status_code == 404
    # a tenant allowed the model by its name may use every alias too: each is listed, as vLLM lists served names
    assert _ids(c, ALL) == ["real-name", "nick", "nick-2", "x", "plain"]
    assert _ids(c, OTHER) == ["plain"]
