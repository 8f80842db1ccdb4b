"""Every API tells the controller whether its reply is streamed (Controller.generate's `stream`): a request not
streamed is held whole, so one whose engine fails mid-generation runs again elsewhere (tests/
test_worker_death_retry.py); a streamed one must not be held. Each API built its chat request without it (Messages,
Responses and Ollama requests say `stream` their own way), so every request was generated as streamed. An app
without workers whose Controller.generate records the flag and refuses."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient

from controller.app import build_app
from controller.config import ModelSpec, ServerConfig
from controller.errors import ServingError


@pytest.fixture(scope="module")
def app(tiny_model):
    app = build_app(ServerConfig(models=[]))  # (no lifespan: no workers start; no tenants: no keys)
    asyncio.run(app.state.controller.add_model(ModelSpec(name="tiny", path=str(tiny_model))))
    return app


CHAT = [{"role": "user", "content": "hi"}]
CALLS = [  # (path, body without its stream flag, how that API says "streamed")
    ("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "max_tokens": 2}, {"stream": True}),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2}, {"stream": True}),
    ("/v1/messages", {"model": "tiny", "messages": CHAT, "max_tokens": 2}, {"stream": True}),
    ("/v1/responses", {"model": "tiny", "input": "hi", "max_output_tokens": 2}, {"stream": True}),
    ("/api/chat", {"model": "tiny", "messages": CHAT}, {}),  # (Ollama's default: streamed)
    ("/api/generate", {"model": "tiny", "prompt": "hi"}, {}),
    ("/api/generate", {"model": "tiny", "prompt": "hi", "raw": True}, {}),  # (the raw prompt's own path)
]


@pytest.fixture
def seen(app, monkeypatch) -> list[bool]:
    """The `stream` flag of each Controller.generate call, which then refuses (a 503)."""
    flags: list[bool] = []

    async def generate(entry, tenant, prompts, params, n, request_id, stream=True, load=False):
        flags.append(stream)
        raise ServingError(503, "recorded", retry_after=1)

    monkeypatch.setattr(app.state.controller, "generate", generate)
    return flags


@pytest.mark.parametrize("path,body,streamed", CALLS, ids=[f"{c[0]}{'-raw' if 'raw' in c[1] else ''}" for c in CALLS])
def test_each_api_says_whether_it_streams(app, seen, path, body, streamed):
    c = TestClient(app)
    not_streamed = {**body, "stream": False}
    for b in ({**body, **streamed}, not_streamed):
        assert c.post(path, json=b).status_code == 503
    assert seen == [True, False]


def test_embeddings_are_not_streamed(app, seen):
    c = TestClient(app)
    assert c.post("/v1/embeddings", json={"model": "tiny", "input": "hi"}).status_code == 503
    assert c.post("/api/embed", json={"model": "tiny", "input": "hi"}).status_code == 503
    assert seen == [False, False]
