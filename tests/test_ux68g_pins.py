"""Found by a pass over the admin API under concurrent use (ux68g), against a live server whose arena leaves room for
one pinned 2 MiB model beside the 4 MiB llama, not two:

- pinned models registered at once (`POST /admin/models` with `pin: true` from three scripts) were each judged
  beside the pins of before their tokenizer loaded, so all three were taken (201) and together left the llama too
  little weight space: it could never load. Now the pins are judged again once the tokenizer is loaded: one 201, the
  others 409 `pin_would_starve`;
- a pin made while the only engine was drained (`POST /admin/engines/w0/drain`, its registrations given back) was
  taken though it starved a model there: after the resume that model was placed nowhere, every request to it a 503
  `engine_unavailable`, until the unpin. The pin's check judged only usable engines, and there were none. Now a
  drained engine counts as it will be once resumed: 409 `pin_would_starve`, as undrained."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from controller.keys import hash_key
from tests.ports import live_server_on

PORTS = range(30480, 30490)
ADMIN = "admin-ux68g-pins-token"
H = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, make_tiny):
    # a 12 MB arena: 7.4 MiB of weight space; the qwen2s take a 2 MiB slot each, the llama 4 MiB
    qwen2 = str(make_tiny("qwen2"))
    cfg = {"admin_token_hash": hash_key(ADMIN), "gpus": {"cpu_budget_gb": 0.012},
           "workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "models": [{"name": "q", "path": qwen2}, {"name": "q2", "path": qwen2},
                      {"name": "l", "path": str(make_tiny("llama"))}]}
    with live_server_on(PORTS, cfg, tmp_path_factory.mktemp("ux68g-pins")) as srv:
        srv.qwen2 = qwen2
        yield srv


def _served(url: str) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)
    for model in ("l", "q", "q2"):
        assert client.completions.create(model=model, prompt="hi", max_tokens=2).usage.completion_tokens == 2


def test_pinned_models_registered_at_once_are_judged_together(server):
    async def at_once() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, headers=H, timeout=60) as c:
            return await asyncio.gather(*(c.post("/admin/models", json={"name": f"p{k}", "path": server.qwen2,
                                                                         "pin": True}) for k in range(3)))

    rs = asyncio.run(at_once())
    assert sorted(r.status_code for r in rs) == [201, 409, 409], [r.text for r in rs]
    assert all(r.json()["error"]["code"] == "pin_would_starve" for r in rs if r.status_code == 409)
    winner = next(r.json()["name"] for r in rs if r.status_code == 201)
    with httpx.Client(base_url=server.url, headers=H, timeout=30) as a:
        assert [m["name"] for m in a.get("/admin/models").json() if m["pin"]] == [winner]
        for k in range(3):
            a.delete(f"/admin/models/p{k}")
    _served(server.url)


def test_a_pin_made_while_the_engine_drains_is_judged_as_if_it_were_back(server):
    with httpx.Client(base_url=server.url, headers=H, timeout=30) as a:
        assert a.post("/admin/models/q/pin").status_code == 200  # (one pinned beside the llama: room for it)
        assert a.post("/admin/models/q2/pin").status_code == 409  # (undrained, a second: refused, the rule)
        assert a.post("/admin/engines/w0/drain").status_code == 200
        deadline = time.monotonic() + 10
        while a.get("/admin/engines").json()[0]["models"]:  # (idle: its registrations are given back)
            assert time.monotonic() < deadline
            time.sleep(0.1)
        r = a.post("/admin/models/q2/pin")
        assert r.status_code == 409 and r.json()["error"]["code"] == "pin_would_starve", r.text
        assert a.post("/admin/engines/w0/resume").status_code == 200
        assert a.post("/admin/models/q/unpin").status_code == 200
        assert [m["name"] for m in a.get("/admin/models").json() if m["pin"]] == []
    _served(server.url)
