"""Every API response carries `x-request-id` (OpenAI's and vLLM's header, which the openai SDKs read), and the
Messages API's also Anthropic's `request-id` (the anthropic SDKs'): the id the request was generated under, which
the admin API's requests, the events and POST /admin/requests/{id}/cancel know it by. Neither was sent."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from controller.app import build_app
from controller.config import ModelSpec, ServerConfig
from controller.keys import hash_key

ADMIN = {"Authorization": "Bearer adm"}
CHAT = {"model": "p", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def _client() -> TestClient:
    return TestClient(build_app(ServerConfig(admin_token_hash=hash_key("adm"), auth=False,
                                               models=[ModelSpec(name="p", engine={"kind": "pace"})])))


def test_responses_carry_the_requests_id():
    with _client() as c:
        t0 = time.monotonic()
        while c.get("/health").status_code != 200 and time.monotonic() - t0 < 30:
            time.sleep(0.05)
        r = c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200, r.text
        assert r.headers["x-request-id"] == r.json()["id"]
        assert "request-id" not in r.headers  # (Anthropic's, on its API only)

        r = c.post("/v1/completions", json={"model": "p", "prompt": "x", "max_tokens": 2})
        assert r.headers["x-request-id"] == r.json()["id"]

        with c.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as s:
            first = next(line for line in s.iter_lines() if line.startswith("data: {"))
            assert f'"id":"{s.headers["x-request-id"]}"' in first.replace(" ", "")

        # the Messages API: Anthropic's header, the same id as x-request-id, the one the admin API lists
        with c.stream("POST", "/v1/messages", json={**CHAT, "max_tokens": 200, "stream": True}) as s:
            rid = s.headers["request-id"]
            assert s.headers["x-request-id"] == rid and rid.startswith("msg-")
            listed = [q["id"] for q in c.get("/admin/requests", headers=ADMIN).json()]
            assert rid in listed, (rid, listed)
            assert c.post(f"/admin/requests/{rid}/cancel", headers=ADMIN).status_code == 200

        # refused before any generation: still an id, a fresh one each time
        a, b = (c.post("/v1/messages", json={**CHAT, "model": "nope"}) for _ in range(2))
        assert a.status_code == 404 and a.headers["request-id"].startswith("req-")
        assert a.headers["request-id"] != b.headers["request-id"]
        assert c.post("/v1/chat/completions", json={**CHAT, "model": "nope"}).headers["x-request-id"]
