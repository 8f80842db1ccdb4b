"""Anthropic's Messages API through the live server with the official `anthropic` client: the same tokens as the chat
endpoint for the same conversation, streamed and not; stop sequences, max_tokens, tool use (a named tool held to its
schema; tool results fed back), count_tokens, the prefix cache in the usage, and errors in Anthropic's shape."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

from controller.keys import hash_key
from load_tests.live_server import LiveServer

ALICE, BOB = "key-alice-anth-0123", "key-bob-anth-0123"
SYSTEM = "You are a careful assistant who answers briefly. " * 8
GREEDY = {"temperature": 0}  # (the client's create() no longer takes sampling fields; the API still does)


@pytest.fixture(scope="module")
def server(make_varied, tmp_path_factory):
    cfg = {
        "workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
        "tenants": [{"name": "alice", "key_hashes": [hash_key(ALICE)]},
                    {"name": "bob", "key_hashes": [hash_key(BOB)], "models": ["tiny-b"]}],
        "models": [{"name": "tiny-a", "path": str(make_varied("qwen2")), "engine": {"max_num_seqs": 8}},
                   {"name": "tiny-b", "path": str(make_varied("llama")), "engine": {"max_num_seqs": 8},
                    "tool_call_parser": "hermes"}],
    }
    with LiveServer(cfg, tmp_path_factory.mktemp("anthropic")) as srv:
        yield srv


def ac(srv, key=ALICE) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=srv.url, api_key=key, max_retries=0, timeout=60)


def oc(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=ALICE, max_retries=0, timeout=60)


def test_messages_equal_chat_completions(server):
    """A system prompt and a two-turn conversation: the reply's text and token counts are the chat endpoint's (greedy),
    streamed or not; max_tokens cuts with stop_reason max_tokens; the second request reads the system prompt's KV
    from the prefix cache (cache_read_input_tokens), input_tokens being the rest."""
    msgs = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi!"},
            {"role": "user", "content": [{"type": "text", "text": "Tell me"}, {"type": "text", "text": "a story."}]}]
    chat = [{"role": "system", "content": SYSTEM}, msgs[0], msgs[1], {"role": "user", "content": "Tell me\na story."}]
    want = oc(server).chat.completions.create(model="tiny-a", messages=chat, max_tokens=12, temperature=0)
    r = ac(server).messages.create(model="tiny-a", system=SYSTEM, messages=msgs, max_tokens=12, extra_body=GREEDY)
    assert r.type == "message" and r.role == "assistant" and r.model == "tiny-a" and r.id.startswith("msg_")
    assert [b.type for b in r.content] == ["text"] and r.content[0].text == want.choices[0].message.content
    assert r.stop_reason == ("max_tokens" if want.choices[0].finish_reason == "length" else "end_turn")
    u = r.usage
    assert u.input_tokens + u.cache_read_input_tokens == want.usage.prompt_tokens
    assert u.output_tokens == want.usage.completion_tokens and u.cache_read_input_tokens > 0
    with ac(server).messages.stream(model="tiny-a", system=SYSTEM, messages=msgs, max_tokens=12,
                                    extra_body=GREEDY) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == r.content[0].text and final.content[0].text == text and final.stop_reason == r.stop_reason
    assert final.usage.output_tokens == u.output_tokens
    n = ac(server).messages.count_tokens(model="tiny-a", system=SYSTEM, messages=msgs)
    assert n.input_tokens == want.usage.prompt_tokens


def test_stop_sequences(server):
    """A stop sequence in the reply ends it there, stop_reason stop_sequence naming it (streamed too)."""
    c = ac(server)
    free = c.messages.create(model="tiny-a", messages=[{"role": "user", "content": "Count: 1 2 3"}], max_tokens=20,
                             extra_body=GREEDY).content[0].text
    stop = free.strip().split()[1] if len(free.split()) > 1 else free.strip()[:2]
    r = c.messages.create(model="tiny-a", messages=[{"role": "user", "content": "Count: 1 2 3"}], max_tokens=20,
                          extra_body=GREEDY, stop_sequences=[stop])
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == stop and stop not in r.content[0].text
    assert free.startswith(r.content[0].text)
    with c.messages.stream(model="tiny-a", messages=[{"role": "user", "content": "Count: 1 2 3"}], max_tokens=20,
                           extra_body=GREEDY, stop_sequences=[stop]) as s:
        final = s.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == stop


def test_tool_use_and_results(server):
    """tool_choice naming a tool: a tool_use block whose input holds to the tool's input_schema (streamed as
    input_json_delta too), stop_reason tool_use; the call and its tool_result fed back give the chat endpoint's reply."""
    c = ac(server, BOB)
    tool = {"name": "get_weather", "description": "Weather in a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                             "required": ["city"], "additionalProperties": False}}
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    r = c.messages.create(model="tiny-b", messages=msgs, max_tokens=40, extra_body=GREEDY, tools=[tool],
                          tool_choice={"type": "tool", "name": "get_weather"})
    assert r.stop_reason == "tool_use" and [b.type for b in r.content] == ["tool_use"]
    call = r.content[0]
    assert call.name == "get_weather" and set(call.input) == {"city"} and isinstance(call.input["city"], str)
    with c.messages.stream(model="tiny-b", messages=msgs, max_tokens=40, extra_body=GREEDY, tools=[tool],
                           tool_choice={"type": "tool", "name": "get_weather"}) as s:
        final = s.get_final_message()
    assert final.content[0].type == "tool_use" and final.content[0].input == call.input
    turn2 = [*msgs, {"role": "assistant", "content": [{"type": "tool_use", "id": call.id, "name": call.name,
                                                       "input": call.input}]},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}]}]
    r2 = c.messages.create(model="tiny-b", messages=turn2, max_tokens=8, extra_body=GREEDY)
    import json

    chat = [*msgs, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": json.dumps(call.input)}}]},
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    want = openai.OpenAI(base_url=server.url + "/v1", api_key=BOB, max_retries=0).chat.completions.create(
        model="tiny-b", messages=chat, max_tokens=8, temperature=0)
    assert r2.content[0].text == want.choices[0].message.content


def test_errors_in_anthropic_shape(server):
    """Refusals as the Messages API writes them (the client raises its own error classes): an unknown model, a
    model the key may not use, no key, an image block, max_tokens missing, extended thinking, a temperature past
    Anthropic's 1, a tool_choice that asks for a call with no tools (or is no choice at all), a text block without
    its text."""
    c = ac(server)
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(anthropic.NotFoundError):
        c.messages.create(model="nope", messages=msgs, max_tokens=4)
    with pytest.raises(anthropic.NotFoundError):
        ac(server, BOB).messages.create(model="tiny-a", messages=msgs, max_tokens=4)
    with pytest.raises(anthropic.AuthenticationError):
        ac(server, "wrong").messages.create(model="tiny-a", messages=msgs, max_tokens=4)
    img = [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                     "data": "AAAA"}}]}]
    with pytest.raises(anthropic.BadRequestError) as ei:
        c.messages.create(model="tiny-a", messages=img, max_tokens=4)
    assert "image blocks are not supported" in str(ei.value)
    for body, words in (({"model": "tiny-a", "messages": msgs}, "max_tokens"),
                        ({"model": "tiny-a", "messages": msgs, "max_tokens": 4,
                          "thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
                        ({"model": "tiny-a", "messages": msgs, "max_tokens": 4,
                          "tool_choice": {"type": "tool", "name": "get_weather"}}, "tool_choice 'tool' needs tools"),
                        ({"model": "tiny-a", "messages": msgs, "max_tokens": 4, "tool_choice": {"type": "any"}},
                         "tool_choice 'any' needs tools"),
                        ({"model": "tiny-a", "messages": msgs, "max_tokens": 4, "tool_choice": {"type": "bogus"}},
                         "not one of auto, any, tool, none"),
                        ({"model": "tiny-a", "messages": msgs, "max_tokens": 4, "temperature": 1.5},
                         "temperature: Input should be less than or equal to 1"),
                        ({"model": "tiny-a", "max_tokens": 4, "messages": [
                            {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text"}]}]},
                         "messages.0.content.1.text")):
        r = httpx.post(server.url + "/v1/messages", json=body, headers={"x-api-key": ALICE})
        assert r.status_code == 400 and r.json()["type"] == "error", r.text
        assert r.json()["error"]["type"] == "invalid_request_error" and words in r.json()["error"]["message"]
    for path in ("/v1/messages", "/v1/models"):  # no key: the header an Anthropic client sends it in is named
        r = httpx.request("POST" if path == "/v1/messages" else "GET", server.url + path,
                          headers={"anthropic-version": "2023-06-01"}, json={"model": "tiny-a"})
        assert r.status_code == 401 and "x-api-key" in r.json()["error"]["message"], r.text
    r = httpx.get(server.url + "/v1/messages", headers={"x-api-key": ALICE})  # (the client's mistake, not the API's)
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error", r.text


def test_tools_without_the_call_syntax_refused_in_anthropic_terms(server):
    """Tools with tool_choice auto (the default) on a model without a tool-call parser: a 400 on tool_choice naming
    the Messages API's choices (any, tool, none), not the chat path's (required, function), from create() and
    count_tokens() alike; tool_choice any then gives the call."""
    c = ac(server)
    tool = {"name": "get_weather", "description": "Weather in a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                             "required": ["city"], "additionalProperties": False}}
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    for call in (lambda: c.messages.create(model="tiny-a", messages=msgs, max_tokens=8, tools=[tool]),
                 lambda: c.messages.count_tokens(model="tiny-a", messages=msgs, tools=[tool],
                                                 tool_choice={"type": "auto"})):
        with pytest.raises(anthropic.BadRequestError) as ei:
            call()
        err = ei.value.body["error"]
        assert err["type"] == "invalid_request_error" and '{"type": "any"}' in err["message"], err
        assert "tokenpool serve MODEL_DIR --tool-call-parser hermes" in err["message"], err
        assert "required" not in err["message"] and "function" not in err["message"], err
    r = c.messages.create(model="tiny-a", messages=msgs, max_tokens=60, tools=[tool],
                          tool_choice={"type": "any", "disable_parallel_tool_use": True},
                          extra_body=GREEDY)
    assert r.stop_reason == "tool_use" and r.content[0].name == "get_weather"


def test_assistant_prefill_is_continued(server):
    """A last assistant message is a prefill: the reply continues it (the chat endpoint's continue_final_message),
    not a new turn after it; the usage and count_tokens count that prompt; streamed alike."""
    msgs = [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once upon a time"}]
    want = oc(server).chat.completions.create(model="tiny-a", messages=msgs, max_tokens=8, temperature=0, extra_body={
        "continue_final_message": True, "add_generation_prompt": False})
    new_turn = oc(server).chat.completions.create(model="tiny-a", messages=msgs, max_tokens=8, temperature=0)
    assert new_turn.usage.prompt_tokens > want.usage.prompt_tokens  # (the closed turn and the next one's header)
    r = ac(server).messages.create(model="tiny-a", messages=msgs, max_tokens=8, extra_body=GREEDY)
    assert r.content[0].text == want.choices[0].message.content
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == want.usage.prompt_tokens
    assert ac(server).messages.count_tokens(model="tiny-a", messages=msgs).input_tokens == want.usage.prompt_tokens
    with ac(server).messages.stream(model="tiny-a", messages=msgs, max_tokens=8, extra_body=GREEDY) as s:
        assert "".join(s.text_stream) == r.content[0].text


def test_the_anthropic_clients_models_api(server):
    """`client.models.list()/retrieve()` of the `anthropic` client (it sends anthropic-version): Anthropic's Models
    API shapes, paged, the key's models only, its errors in Anthropic's shape; the openai client's list is
    unchanged (OpenAI's shape)."""
    served = [m.id for m in oc(server).models.list()]
    c = ac(server)
    listed = list(c.models.list())
    assert [m.id for m in listed] == served and all(m.type == "model" and m.display_name == m.id for m in listed)
    assert all(m.created_at.year >= 2026 for m in listed)
    first = c.models.list(limit=1)
    assert [m.id for m in first.data] == served[:1] and first.has_more and first.last_id == served[0]
    assert [m.id for m in c.models.list(limit=1, after_id=served[0]).data] == served[1:2]
    assert [m.id for m in c.models.list(before_id=served[-1]).data] == served[:-1]
    assert c.models.retrieve(served[0]).id == served[0]
    with pytest.raises(anthropic.NotFoundError) as ei:
        c.models.retrieve("nope")
    assert ei.value.body["type"] == "error" and ei.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError):
        c.models.list(limit=0)
    assert [m.id for m in ac(server, BOB).models.list()] == ["tiny-b"]  # what the key may use
    assert oc(server).models.retrieve(served[0]).object == "model"


def _events(srv, body: dict) -> list[dict]:
    """A streamed /v1/messages' events' data, in order."""
    import json

    r = httpx.post(srv.url + "/v1/messages", json={**body, "stream": True}, headers={"x-api-key": ALICE}, timeout=60)
    assert r.status_code == 200, r.text
    return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]


def test_message_start_carries_the_prompts_usage(server):
    """As Anthropic's stream: message_start's usage is the prompt's, the part the prefix cache held as
    cache_read_input_tokens (it said 0, counting them in input_tokens: it went out before the engine had started the
    request); message_delta's is the whole cumulative usage. A one-token reply and a longer one, whose first delta
    tells the cache's part too (it came with the last only, so a longer reply's message_start counted it in
    input_tokens)."""
    body = {"model": "tiny-a", "system": SYSTEM + "Usage.", "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 1, **GREEDY}
    _events(server, body)  # (the system prompt's blocks, cached)
    n = ac(server).messages.count_tokens(model="tiny-a", system=body["system"], messages=body["messages"]).input_tokens
    for new in (1, 4):
        # (no ignore_eos: the Messages API never took it, and now refuses it as Anthropic's does: test_ux58b_api_gaps)
        ev = _events(server, {**body, "max_tokens": new})
        assert [e["type"] for e in ev][:2] == ["message_start", "content_block_start"]
        assert ev[-1]["type"] == "message_stop"
        start, delta = ev[0]["message"]["usage"], ev[-2]["usage"]
        assert start["cache_read_input_tokens"] > 0 and start["input_tokens"] + start["cache_read_input_tokens"] == n
        assert start["output_tokens"] == 0 and delta["output_tokens"] == new
        assert {k: delta[k] for k in ("input_tokens", "cache_read_input_tokens")} == \
            {k: start[k] for k in ("input_tokens", "cache_read_input_tokens")}, (new, start, delta)
    # a longer reply: the client's accumulated message has the whole usage, as create() gives it
    body = {**body, "max_tokens": 3}
    r = ac(server).messages.create(**{k: v for k, v in body.items() if k != "temperature"}, extra_body=GREEDY)
    with ac(server).messages.stream(**{k: v for k, v in body.items() if k != "temperature"}, extra_body=GREEDY) as s:
        final = s.get_final_message()
    assert final.usage.model_dump() == r.usage.model_dump() and r.usage.cache_read_input_tokens > 0
