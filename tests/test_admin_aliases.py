"""Every admin route on one model takes the model's name or one of its aliases, as POST /admin/models/{name}/evict
and the serving routes do (pin, unpin, drain, resume, PATCH and DELETE answered 404 for an alias); an unknown name
is a 404 in OpenAI's error shape."""

from __future__ import annotations

import asyncio

from fastapi.testclient import TestClient

from controller.app import build_app
from controller.config import ModelSpec, ServerConfig
from controller.keys import hash_key

ADMIN = "admin-aliases-token"
H = {"Authorization": f"Bearer {ADMIN}"}


def make() -> tuple[TestClient, object]:
    app = build_app(ServerConfig(admin_token_hash=hash_key(ADMIN), models=[], auth=False))  # (no workers start)
    ctl = app.state.controller
    asyncio.run(ctl.add_model(ModelSpec(name="real-name", path=None, engine={"kind": "pace"}, aliases=["nick"])))
    return TestClient(app), ctl


def _not_found(r, name: str) -> None:
    assert r.status_code == 404, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == "model_not_found", err
    assert repr(name) in err["message"], err


def test_switches_take_an_alias():
    c, ctl = make()
    me = ctl.models["real-name"]
    r = c.post("/admin/models/nick/pin", headers=H)
    assert r.status_code == 200 and r.json() == {"name": "real-name", "pinned": True}, r.text
    assert me.pinned
    r = c.post("/admin/models/nick/unpin", headers=H)
    assert r.status_code == 200 and r.json() == {"name": "real-name", "pinned": False}, r.text
    assert not me.pinned
    r = c.post("/admin/models/nick/drain", headers=H)
    assert r.status_code == 200 and r.json()["name"] == "real-name" and r.json()["draining"] is True, r.text
    assert me.draining
    r = c.post("/admin/models/nick/resume", headers=H)
    assert r.status_code == 200 and r.json()["name"] == "real-name" and r.json()["draining"] is False, r.text
    assert not me.draining


def test_patch_and_delete_take_an_alias():
    c, ctl = make()
    r = c.patch("/admin/models/nick", headers=H, json={"priority": 3})
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "real-name" and r.json()["priority"] == 3
    assert ctl.models["real-name"].spec.priority == 3
    r = c.delete("/admin/models/nick", headers=H)
    assert r.status_code == 200 and r.json() == {"deleted": "real-name"}, r.text
    assert "real-name" not in ctl.models


def test_an_unknown_name_is_a_404_everywhere():
    c, ctl = make()
    for path in ("pin", "unpin", "drain", "resume", "evict"):
        _not_found(c.post(f"/admin/models/nope/{path}", headers=H), "nope")
    _not_found(c.patch("/admin/models/nope", headers=H, json={"priority": 1}), "nope")
    _not_found(c.delete("/admin/models/nope", headers=H), "nope")
    assert list(ctl.models) == ["real-name"] and not ctl.models["real-name"].pinned


def test_the_listing_shows_the_pin_of_now():
    """GET /admin/models shows whether a model is pinned now (what /pin and /unpin set), not its registration's
    `pin`: the Kubernetes operator compares it with a PooledModel's pin (it showed the registration's, so a pin
    made or undone through the admin API was invisible)."""
    c, ctl = make()
    c.post("/admin/models", headers=H, json={"name": "pinned", "engine": {"kind": "pace"}, "pin": True})

    def pins() -> dict[str, bool]:
        return {m["name"]: m["pin"] for m in c.get("/admin/models", headers=H).json()}

    assert pins() == {"real-name": False, "pinned": True}
    assert c.post("/admin/models/nick/pin", headers=H).status_code == 200
    assert c.post("/admin/models/pinned/unpin", headers=H).status_code == 200
    assert pins() == {"real-name": True, "pinned": False}
    r = c.patch("/admin/models/real-name", headers=H, json={"priority": 1})
    assert r.status_code == 200 and r.json()["pin"] is True


def test_aliases_change_in_place():
    """PATCH aliases: a registered model's other names from now on (llama-swap users edit them in its config; the
    admin API had no way but a DELETE, which ends the model's requests, and a POST). The old alias is a 404, the new
    one resolves; a name another model (or this one) answers to is a 409; bad names and null are 400s."""
    c, ctl = make()
    asyncio.run(ctl.add_model(ModelSpec(name="other", path=None, engine={"kind": "pace"}, aliases=["o"])))
    r = c.patch("/admin/models/nick", headers=H, json={"aliases": ["nick2", "n2"]})
    assert r.status_code == 200 and r.json()["aliases"] == ["nick2", "n2"], r.text
    assert ctl.resolve("nick") is None and ctl.resolve("n2") is ctl.models["real-name"]
    _not_found(c.post("/admin/models/nick/pin", headers=H), "nick")
    assert [m["name"] for m in c.get("/admin/models", headers=H).json()] == ["real-name", "other"]
    r = c.post("/v1/completions", json={"model": "nick", "prompt": "x", "max_tokens": 1})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    for taken in (["o"], ["other"], ["real-name"]):
        r = c.patch("/admin/models/real-name", headers=H, json={"aliases": taken})
        assert r.status_code == 409 and r.json()["error"]["code"] == "model_exists", r.text
    for bad in (["has space"], ["a", "a"], None):
        assert c.patch("/admin/models/real-name", headers=H, json={"aliases": bad}).status_code == 400
    assert ctl.models["real-name"].spec.aliases == ["nick2", "n2"]
    assert c.patch("/admin/models/real-name", headers=H, json={"aliases": []}).json()["aliases"] == []
