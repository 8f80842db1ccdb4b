"""The HTTP API as a user from vLLM or OpenAI meets it (helper ux67a), through the official client, on one live server
of a tiny model:

- OpenAI's deprecated `functions` and `function_call` (the `openai` client still sends them) were ignored unsaid: a
  request forcing `function_call={"name": "f"}` got plain text and no call. Now a 400 naming the field and saying
  to send `tools` and `tool_choice` (a `function` message was refused already);
- vLLM's `truncate_prompt_tokens` past the model's context on /v1/embeddings (and /rerank, /score) was taken as the
  context, unsaid, where /v1/completions refused it: now the same 400 naming the field, as vLLM answers both;
- a name copied from /api/tags (`tiny:latest`) or written as Ollama matches it (`TINY`) is a 404 on the OpenAI routes,
  which keep vLLM's exact names, and said only that the model does not exist: now the 404 names the served model it
  means, as the Ollama routes read it.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.ports import live_server_on, one_model_cfg

PORTS = range(29800, 29850)
CTX = 128
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
FUNCTION = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


@pytest.fixture(scope="module")
def server(make_tiny, tmp_path_factory):
    cfg = one_model_cfg(make_tiny("qwen2"), CTX)
    with live_server_on(PORTS, cfg, tmp_path_factory.mktemp("ux67a")) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


@pytest.mark.parametrize("legacy", [{"functions": [FUNCTION]},
                                    {"functions": [FUNCTION], "function_call": {"name": "get_weather"}},
                                    {"function_call": "auto"}],
                         ids=["functions", "forced", "function_call-alone"])
def test_deprecated_functions_are_refused_naming_the_field(client, legacy):
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="tiny", messages=ASK, max_tokens=4, **legacy)
    err = ei.value.body
    assert err["param"] == next(iter(legacy)), err
    assert "deprecated" in err["message"] and "send tools" in err["message"] and "tool_choice" in err["message"]
    assert ei.value.type == "invalid_request_error"


def test_the_same_request_with_tools_calls_the_function(client):
    """What the refusal says to send works: the call held to the function's schema."""
    r = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=40, temperature=0,
                                       tools=[{"type": "function", "function": FUNCTION}],
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and r.choices[0].finish_reason in ("stop", "length")


def test_truncate_prompt_tokens_past_the_context_is_refused_on_embeddings(server, client):
    """/v1/embeddings, /rerank and /score refuse it as /v1/completions does; the context itself, or -1, still cuts a
    longer input to the context."""
    long = " ".join(["w"] * (CTX + 40))
    for call in (lambda: client.completions.create(model="tiny", prompt=long, max_tokens=1,
                                                   extra_body={"truncate_prompt_tokens": CTX + 1}),
                 lambda: client.embeddings.create(model="tiny", input=long,
                                                  extra_body={"truncate_prompt_tokens": CTX + 1})):
        with pytest.raises(openai.BadRequestError) as ei:
            call()
        assert ei.value.body["param"] == "truncate_prompt_tokens", ei.value.body
        assert ei.value.body["message"] == (f"truncate_prompt_tokens ({CTX + 1}) is greater than the model's maximum "
                                            f"context length ({CTX})")
    for path, body in (("/rerank", {"query": "q", "documents": [long]}), ("/score", {"text_1": "q", "text_2": long})):
        r = httpx.post(server.url + path, json={"model": "tiny", "truncate_prompt_tokens": CTX + 1, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == "truncate_prompt_tokens", (path, r.text)
    for keep in (CTX, -1):
        got = client.embeddings.create(model="tiny", input=long, extra_body={"truncate_prompt_tokens": keep})
        assert got.usage.prompt_tokens == CTX


@pytest.mark.parametrize("name", ["tiny:latest", "TINY", "library/tiny"])
def test_an_ollama_name_is_told_the_served_name(server, client, name):
    tags = httpx.get(server.url + "/api/tags").json()["models"]
    assert [m["name"] for m in tags] == ["tiny:latest"]
    with pytest.raises(openai.NotFoundError) as ei:
        client.chat.completions.create(model=name, messages=ASK, max_tokens=1)
    assert ei.value.body["message"] == (f"The model `{name}` does not exist. Did you mean `tiny`? (Ollama's routes "
                                        f"read `{name}` as that model; this API takes the names /v1/models lists.)")
    assert ei.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError, match="Did you mean `tiny`"):
        client.embeddings.create(model=name, input="x")


def test_a_name_that_means_no_model_is_told_only_that(client):
    with pytest.raises(openai.NotFoundError) as ei:
        client.models.retrieve("tinyx:latest")
    assert ei.value.body["message"] == "The model `tinyx:latest` does not exist."
