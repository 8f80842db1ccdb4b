"""Found by a pass over the admin API under concurrent use (ux68g): a pin made while the only engine was drained
(`POST /admin/engines/w0/drain`, its registrations given back) was taken, though it left another model too little
weight space there: after the resume that model was placed nowhere, every request to it a 503
`engine_unavailable`, until the pin went. The pin's check judged only usable engines, and there were none. Now a
drained engine counts as it will be once resumed: such a pin is a 409 `pin_would_starve`, as it is undrained."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from controller.keys import hash_key
from tests.ports import live_server_on

PORTS = range(30480, 30490)
ADMIN = "admin-ux68g-pin-token"
H = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, make_tiny):
    # a 10 MB arena: 5.8 MB of weight space, where the qwen2's 2 MiB slot and the llama's 4 MiB do not fit together
    cfg = {"admin_token_hash": hash_key(ADMIN), "gpus": {"cpu_budget_gb": 0.010},
           "workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "models": [{"name": "q", "path": str(make_tiny("qwen2"))}, {"name": "l", "path": str(make_tiny("llama"))}]}
    with live_server_on(PORTS, cfg, tmp_path_factory.mktemp("ux68g-pin")) as srv:
        yield srv


def _registered(url: str) -> list[str]:
    return [m["model"] for m in httpx.get(url + "/admin/engines", headers=H, timeout=30).json()[0]["models"]]


def test_a_pin_made_while_the_engine_drains_is_judged_as_if_it_were_back(server):
    with httpx.Client(base_url=server.url, headers=H, timeout=30) as a:
        assert a.post("/admin/models/q/pin").status_code == 409  # (undrained: refused, the rule)
        assert a.post("/admin/engines/w0/drain").status_code == 200
        deadline = time.monotonic() + 10
        while _registered(server.url):  # (idle: its registrations are given back)
            assert time.monotonic() < deadline
            time.sleep(0.1)
        r = a.post("/admin/models/q/pin")
        assert r.status_code == 409 and r.json()["error"]["code"] == "pin_would_starve", r.text
        assert a.post("/admin/engines/w0/resume").status_code == 200
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=30)
    for model in ("l", "q"):
        assert client.completions.create(model=model, prompt="hi", max_tokens=2).usage.completion_tokens == 2
