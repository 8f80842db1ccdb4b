"""Ollama's options.num_ctx (helper ux66a), on tiny models whose context is 128 tokens:

- /api/chat held to a num_ctx below the model's context rendered its chat template twice: once to count its prompt
  (the reply's room is what it leaves of num_ctx), then again to feed it. Now once, and fed the same ids with the same
  room (with tools, with `think` either way), the greedy reply the same tokens as the OpenAI route's;
- /api/embed and /api/embeddings ignored num_ctx: an input past it is now cut to its first num_ctx tokens (`truncate`,
  Ollama's default; the older endpoint always) or a 400 naming num_ctx (`truncate: false`), as one past the model's
  context is; a num_ctx past the model's context is capped at it.
"""

from __future__ import annotations

import asyncio

import httpx
import ollama
import pytest
from fastapi.testclient import TestClient

from controller.app import build_app
from controller.config import EngineOptions, ModelSpec, ServerConfig
from controller.errors import ServingError
from tests.ports import live_server_on, one_model_cfg
from tests.test_ux61i_agents import THINKING_TEMPLATE, templated

PORTS = range(29600, 29650)
CTX = 128
# the thinking template, writing the tools' names where a request has tools (as a tool-calling template declares them)
TEMPLATE = ("{%- if tools %}{{- '<|im_start|>system\\nTools: ' + (tools | map(attribute='function') | "
            "map(attribute='name') | join(', ')) + '<|im_end|>\\n' }}{%- endif %}" + THINKING_TEMPLATE)
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def app(make_tiny, tmp_path_factory):
    """An app without workers (no lifespan) serving the tiny model with TEMPLATE and hermes tool calls."""
    path = templated(make_tiny("qwen2"), tmp_path_factory.mktemp("ux66a") / "tiny", TEMPLATE)
    app = build_app(ServerConfig(models=[]))
    asyncio.run(app.state.controller.add_model(ModelSpec(name="tiny", path=str(path), tool_call_parser="hermes",
                                                         engine=EngineOptions(max_model_len=CTX))))
    return app


@pytest.fixture
def fed(app, monkeypatch) -> list[tuple[list[int], int | None]]:
    """The prompt ids and max_tokens of each generation the app asks of its controller, which then refuses (503)."""
    got: list[tuple[list[int], int | None]] = []

    async def generate(entry, tenant, prompts, params, n, request_id, stream=True, load=False, whole=None):
        got.append((prompts[0], params.max_tokens))
        raise ServingError(503, "recorded", retry_after=1)

    monkeypatch.setattr(app.state.controller, "generate", generate)
    return got


@pytest.fixture
def renders(app, monkeypatch) -> list[int]:
    """One item for each time the model's (real) tokenizer renders its chat template."""
    tok = app.state.controller.resolve("tiny").tokenizer
    real, seen = tok.apply_chat_template, []

    def counted(*args, **kwargs):
        seen.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(tok, "apply_chat_template", counted)
    return seen


@pytest.mark.parametrize("extra", [{}, {"tools": [TOOL]}, {"think": False}, {"think": True}],
                         ids=["plain", "tools", "think-off", "think-on"])
def test_a_chat_held_to_num_ctx_renders_its_prompt_once(app, fed, renders, extra):
    """Fed the ids the OpenAI route feeds for the same messages (tools, template switch), with the room num_ctx leaves
    as max_tokens; the template rendered once (it was twice)."""
    c = TestClient(app)
    kwargs = {"chat_template_kwargs": {"enable_thinking": extra["think"]}} if "think" in extra else {}
    tools = {"tools": extra["tools"]} if "tools" in extra else {}
    assert c.post("/v1/chat/completions", json={"model": "tiny", "messages": ASK, "max_tokens": 1, **tools,
                                                **kwargs}).status_code == 503
    ids = fed[-1][0]
    renders.clear()
    r = c.post("/api/chat", json={"model": "tiny", "messages": ASK, "stream": False, **extra,
                                  "options": {"num_ctx": len(ids) + 10, "temperature": 0}})
    assert r.status_code == 503, r.text
    assert fed[-1] == (ids, 10) and len(renders) == 1, (fed[-1], len(ids), len(renders))


def test_a_chat_past_num_ctx_renders_once_a_try(app, fed, renders):
    """Its last message alone past num_ctx: rendered to find it too long, then once to feed it cut (three times
    before); with `truncate: false`, the 400 after the one rendering."""
    c = TestClient(app)
    long = [{"role": "user", "content": " ".join(f"word{i}" for i in range(40))}]
    body = {"model": "tiny", "messages": long, "stream": False, "options": {"num_ctx": 32, "num_predict": 5}}
    assert c.post("/api/chat", json=body).status_code == 503
    assert len(fed[-1][0]) == 32 - 5 and fed[-1][1] == 5 and len(renders) == 2, (fed[-1], len(renders))
    renders.clear()
    r = c.post("/api/chat", json={**body, "truncate": False})
    assert r.status_code == 400 and r.json()["error"].startswith("The context is 32 tokens (options.num_ctx"), r.text
    assert len(renders) == 1


@pytest.fixture(scope="module")
def server(make_varied, tmp_path_factory):
    cfg = one_model_cfg(make_varied("qwen2"), CTX)
    with live_server_on(PORTS, cfg, tmp_path_factory.mktemp("ux66a-live")) as srv:
        yield srv


@pytest.fixture(scope="module")
def oc(server) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=60)


def test_a_chat_held_to_num_ctx_replies_as_the_openai_route(server, oc):
    """Greedy, the reply to a chat held to num_ctx is the OpenAI route's with max_tokens the room num_ctx leaves,
    token for token."""
    r = httpx.post(server.url + "/tokenize", json={"model": "tiny", "messages": ASK})
    n = len(r.json()["tokens"])
    ref = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": ASK, "max_tokens": 12, "temperature": 0, "logprobs": True}).json()
    got = oc.chat(model="tiny", messages=ASK, logprobs=True, options={"num_ctx": n + 12, "temperature": 0})
    want = [t["token"] for t in ref["choices"][0]["logprobs"]["content"]]
    assert [lp.token for lp in got.logprobs] == want and len(set(want)) > 1, (got, want)
    assert got.message.content == ref["choices"][0]["message"]["content"]
    assert got.prompt_eval_count == n and got.eval_count == 12 and got.done_reason == "length"


def ids_of(server, text: str) -> list[int]:
    r = httpx.post(server.url + "/tokenize", json={"model": "tiny", "prompt": text})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def unit_of(server, ids: list[int]) -> list[float]:
    """The L2-normalized embedding of the token ids `ids` (OpenAI's route, which takes ids)."""
    r = httpx.post(server.url + "/v1/embeddings", json={"model": "tiny", "input": ids}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["data"][0]["embedding"]


def close(a: list[float], b: list[float], tol: float = 1e-5) -> bool:
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < tol


def test_embed_cuts_an_input_to_num_ctx(server, oc):
    """An input past num_ctx (not past the model's context) keeps its first num_ctx tokens, as one past the model's
    context keeps its first max_model_len (`truncate`, Ollama's default); one within it is embedded whole."""
    text = " ".join(f"word{i}" for i in range(30))
    ids = ids_of(server, text)
    assert 24 < len(ids) < CTX
    r = oc.embed(model="tiny", input=[text, "word1 word2"], options={"num_ctx": 24})
    assert r.prompt_eval_count == 24 + len(ids_of(server, "word1 word2")), r.prompt_eval_count
    assert close(r.embeddings[0], unit_of(server, ids[:24])) and close(r.embeddings[1], unit_of(
        server, ids_of(server, "word1 word2")))
    whole = oc.embed(model="tiny", input=text, options={"num_ctx": len(ids)})  # (an input may fill the context)
    assert whole.prompt_eval_count == len(ids) and close(whole.embeddings[0], unit_of(server, ids))
    long = " ".join(f"word{i}" for i in range(200))
    capped = oc.embed(model="tiny", input=long, options={"num_ctx": 4096})  # (capped at the model's)
    assert capped.prompt_eval_count == CTX and close(capped.embeddings[0], unit_of(server, ids_of(server, long)[:CTX]))
    legacy = oc.embeddings(model="tiny", prompt=text, options={"num_ctx": 24}).embedding
    norm = sum(v * v for v in legacy) ** 0.5
    assert close([v / norm for v in legacy], unit_of(server, ids[:24]))


def test_embed_with_truncate_false_is_a_400_past_num_ctx(server, oc):
    """`truncate: false`: an input past num_ctx is a 400 naming it, as one past the model's context is a 400."""
    text = " ".join(f"word{i}" for i in range(30))
    n = len(ids_of(server, text))
    with pytest.raises(ollama.ResponseError) as ei:
        oc.embed(model="tiny", input=["word1", text], truncate=False, options={"num_ctx": 24})
    assert ei.value.status_code == 400
    assert ei.value.error == (f"The context is 24 tokens (options.num_ctx; the model's is {CTX}); input 1 has {n} "
                              "tokens."), ei.value.error
    assert oc.embed(model="tiny", input=text, truncate=False, options={"num_ctx": n}).prompt_eval_count == n
    with pytest.raises(ollama.ResponseError) as ei:
        oc.embed(model="tiny", input=" ".join(f"word{i}" for i in range(200)), truncate=False)
    assert ei.value.status_code == 400 and ei.value.error.startswith(f"This model's maximum context length is {CTX}")
