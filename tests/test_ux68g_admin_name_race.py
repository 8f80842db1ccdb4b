"""Found by a pass over the admin API under concurrent use (ux68g), against a live server: two registrations of one
name sent at once (`POST /admin/models` from two scripts, or the operator beside a script) both answered 201: each
passed the name checks before either was registered (the tokenizer loads on a thread between them), and the later
one replaced the earlier unsaid (its client told 201 with a path the server did not serve). So did two models
claiming one alias at once, or a registration and a PATCH of another model's aliases: both 201/200, two models
answering to one name. Now the names of a registration in progress are claimed: the others get 409
`model_exists`."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from controller.keys import hash_key
from tests.ports import live_server_on

PORTS = range(30450, 30470)
ADMIN = "admin-ux68g-race-token"
H = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, make_tiny):
    cfg = {"admin_token_hash": hash_key(ADMIN),
           "workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "models": [{"name": "pace", "engine": {"kind": "pace", "pace_s_per_token": 0.001}}]}
    with live_server_on(PORTS, cfg, tmp_path_factory.mktemp("ux68g-race")) as srv:
        srv.tiny = str(make_tiny("qwen2"))
        yield srv


async def _at_once(url: str, *calls: tuple[str, str, dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, headers=H, timeout=60) as c:
        return await asyncio.gather(*(c.request(method, path, json=body) for method, path, body in calls))


def _models(url: str) -> dict[str, list[str]]:
    return {m["name"]: m["aliases"] for m in httpx.get(url + "/admin/models", headers=H, timeout=30).json()}


def test_one_name_registered_from_two_clients_at_once_is_one_201_and_409s(server):
    for i in range(3):
        name = f"dup{i}"
        rs = asyncio.run(_at_once(server.url, *[("POST", "/admin/models", {"name": name, "path": server.tiny})] * 3))
        codes = sorted(r.status_code for r in rs)
        assert codes == [201, 409, 409], [r.text for r in rs]
        assert all(r.json()["error"]["code"] == "model_exists" for r in rs if r.status_code == 409)
        assert name in _models(server.url)
        assert httpx.delete(f"{server.url}/admin/models/{name}", headers=H, timeout=30).status_code == 200


def test_one_alias_claimed_at_once_goes_to_one_model(server):
    for i in range(3):
        alias = f"shared{i}"
        rs = asyncio.run(_at_once(server.url,
                                  ("POST", "/admin/models", {"name": f"x{i}", "path": server.tiny, "aliases": [alias]}),
                                  ("POST", "/admin/models", {"name": f"y{i}", "path": server.tiny, "aliases": [alias]}),
                                  ("PATCH", "/admin/models/pace", {"aliases": [alias]})))
        assert sorted(r.status_code for r in rs) in ([200, 409, 409], [201, 409, 409]), [r.text for r in rs]
        owners = [n for n, aliases in _models(server.url).items() if alias in aliases]
        assert len(owners) == 1, owners
        for n in (f"x{i}", f"y{i}"):
            httpx.delete(f"{server.url}/admin/models/{n}", headers=H, timeout=30)
        httpx.patch(f"{server.url}/admin/models/pace", headers=H, json={"aliases": []}, timeout=30)
