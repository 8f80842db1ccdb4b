"""OpenAI's Responses API (/v1/responses) with the official `openai` client against a live server: the same tokens
as the chat completion the request means, streamed and not; tools and text.format held to their schemas; stored
responses continued with previous_response_id, retrieved and deleted, per tenant; clear errors."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from controller.keys import hash_key
from load_tests.live_server import LiveServer

ALICE, BOB = "key-alice-resp-0123", "key-bob-resp-0123"
GREEDY = {"temperature": 0}
SCHEMA = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {
    "type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city", "days"], "additionalProperties": False}
WEATHER = {"type": "function", "name": "get_weather", "description": "the forecast", "parameters": SCHEMA}


@pytest.fixture(scope="module")
def server(make_varied, tmp_path_factory):
    cfg = {
        "workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
        "tenants": [{"name": "alice", "key_hashes": [hash_key(ALICE)]},
                    {"name": "bob", "key_hashes": [hash_key(BOB)]}],
        "models": [{"name": "tiny-a", "path": str(make_varied("qwen2")), "engine": {"max_num_seqs": 8}}],
    }
    with LiveServer(cfg, tmp_path_factory.mktemp("responses")) as srv:
        yield srv


def client(srv, key=ALICE) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=60)


def _status(fn) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as ei:
        fn()
    return ei.value


def test_text_response_is_the_chat_completion(server):
    """A string input with instructions gives the chat completion's text (system + user messages) and usage; cut by
    max_output_tokens it is incomplete; streamed, the deltas join to the same text, the events in order with
    increasing sequence numbers, ending with the same Response."""
    c = client(server)
    ref = c.chat.completions.create(model="tiny-a", messages=[{"role": "system", "content": "Be brief."},
                                                                {"role": "user", "content": "Hello there"}],
                                    max_completion_tokens=12, **GREEDY)
    r = c.responses.create(model="tiny-a", instructions="Be brief.", input="Hello there", max_output_tokens=12,
                           **GREEDY)
    assert r.object == "response" and r.id.startswith("resp") and r.model == "tiny-a"
    assert r.output_text == ref.choices[0].message.content
    assert [o.type for o in r.output] == ["message"] and r.output[0].role == "assistant"
    assert (r.usage.input_tokens, r.usage.output_tokens) == (ref.usage.prompt_tokens, ref.usage.completion_tokens)
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    want = ("incomplete", "max_output_tokens") if ref.choices[0].finish_reason == "length" else ("completed", None)
    assert (r.status, r.incomplete_details and r.incomplete_details.reason) == want
    parts = [{"role": "user", "content": [{"type": "input_text", "text": "Hello"},
                                          {"type": "input_text", "text": "there"}]}]  # (a line apart, as chat's parts)
    same = c.responses.create(model="tiny-a", instructions="Be brief.", input=parts, max_output_tokens=12, **GREEDY)
    lines = c.responses.create(model="tiny-a", instructions="Be brief.", input="Hello\nthere", max_output_tokens=12,
                               **GREEDY)
    assert same.output_text == lines.output_text and same.usage.input_tokens == lines.usage.input_tokens
    events = list(c.responses.create(model="tiny-a", instructions="Be brief.", input="Hello there",
                                     max_output_tokens=12, stream=True, **GREEDY))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          f"response.{r.status}"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == r.output_text
    assert events[-1].response.output_text == r.output_text and events[-1].response.usage.output_tokens == 12


def test_tools_and_text_format(server):
    """A named function tool gives one function_call whose arguments are an instance of its schema (streamed: the
    same item, its arguments in parts as written); its output sent back continues the conversation; text.format json_schema gives an
    instance of the schema."""
    c = client(server)
    r = c.responses.create(model="tiny-a", input="Weather in Paris?", tools=[WEATHER],
                           tool_choice={"type": "function", "name": "get_weather"}, temperature=1.0, extra_body={"seed": 3})
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_weather" and r.status == "completed"
    jsonschema.validate(json.loads(call.arguments), SCHEMA)
    events = list(c.responses.create(model="tiny-a", input="Weather in Paris?", tools=[WEATHER], stream=True,
                                     tool_choice={"type": "function", "name": "get_weather"}, temperature=1.0, extra_body={"seed": 3}))
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert len(done) == 1 and done[0].arguments == call.arguments
    assert [e.arguments for e in events if e.type == "response.function_call_arguments.done"] == [call.arguments]
    follow = c.responses.create(model="tiny-a", tools=[WEATHER], max_output_tokens=8, **GREEDY, input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}], tool_choice="none")
    assert follow.output[0].type == "message" and follow.usage.input_tokens > r.usage.input_tokens
    fmt = c.responses.create(model="tiny-a", input="Weather?", temperature=1.0, extra_body={"seed": 1}, max_output_tokens=60,
                             text={"format": {"type": "json_schema", "name": "w", "schema": SCHEMA, "strict": True}})
    jsonschema.validate(json.loads(fmt.output_text), SCHEMA)


def test_previous_response_id_retrieve_and_delete(server):
    """A stored response continues with previous_response_id: the second turn is the chat completion over both turns;
    retrieve gives the stored object, another tenant gets 404, delete forgets it; store false keeps nothing."""
    c = client(server)
    first = c.responses.create(model="tiny-a", input="Hello there", max_output_tokens=6, **GREEDY)
    second = c.responses.create(model="tiny-a", input="And then?", previous_response_id=first.id,
                                max_output_tokens=6, **GREEDY)
    ref = c.chat.completions.create(model="tiny-a", max_completion_tokens=6, **GREEDY, messages=[
        {"role": "user", "content": "Hello there"}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And then?"}])
    assert second.output_text == ref.choices[0].message.content
    assert second.usage.input_tokens == ref.usage.prompt_tokens and second.previous_response_id == first.id
    got = c.responses.retrieve(first.id)
    assert got.id == first.id and got.output_text == first.output_text
    items = c.responses.input_items.list(second.id)  # (this request's input only, as OpenAI lists it)
    assert [(i.type, i.role, [p.text for p in i.content]) for i in items.data] == [("message", "user", ["And then?"])]
    three = c.responses.create(model="tiny-a", max_output_tokens=2, input=[
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}])
    asc = c.responses.input_items.list(three.id, order="asc", limit=2)
    assert [i.content[0].text for i in asc.data] == ["a", "b"] and asc.has_more
    assert [i.content[0].type for i in asc.data] == ["input_text", "output_text"]
    rest = c.responses.input_items.list(three.id, order="asc", after=asc.last_id)
    assert [i.content[0].text for i in rest.data] == ["c"] and not rest.has_more
    assert [i.content[0].text for i in c.responses.input_items.list(three.id).data] == ["c", "b", "a"]
    for bad in ("x", "0", "101"):  # (the query's limit named as the client sent it, not "query.limit")
        e = _status(lambda b=bad: c.responses.input_items.list(three.id, limit=b))
        assert e.status_code == 400 and e.body["param"] == "limit", e.body
    e = _status(lambda: client(server, BOB).responses.retrieve(first.id))
    assert e.status_code == 404
    e = _status(lambda: client(server, BOB).responses.create(model="tiny-a", input="x",
                                                             previous_response_id=first.id))
    assert e.status_code == 404 and e.body["param"] == "previous_response_id"
    c.responses.delete(first.id)
    e = _status(lambda: c.responses.retrieve(first.id))
    assert e.status_code == 404
    unstored = c.responses.create(model="tiny-a", input="x", max_output_tokens=2, store=False)
    assert _status(lambda: c.responses.retrieve(unstored.id)).status_code == 404


def test_responses_errors(server):
    """Inputs the server cannot honour are 400s naming the field: an image part, a built-in tool, an unknown item
    type, background; an unknown model 404; no key 401."""
    c = client(server)
    for kw, param, words in (
            (dict(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]),
             "input[0].content", "only text parts"),
            (dict(input="x", tools=[{"type": "web_search"}]), "tools", "only function tools"),
            (dict(input=[{"type": "computer_call", "id": "1"}]), "input[0]", "not supported"),
            (dict(input="x", background=True), "background", "not supported"),
            (dict(input=[{"role": "wizard", "content": "x"}]), "input[0].role", "role"),
            (dict(instructions="x", input=[{"role": "user", "content": "x"}, {"role": "tool", "content": "x"}]),
             "input[1].role", "'tool'"),
            (dict(input=[{"type": "function_call_output", "call_id": "c1"}]), "input[0]", "output"),
            (dict(input="x", tool_choice="required"), "tool_choice", "needs tools"),
            (dict(input="x", text={"format": {"type": "xml"}}), "text.format.type", "text.format type")):
        e = _status(lambda kw=kw: c.responses.create(model="tiny-a", **kw))
        assert e.status_code == 400 and e.body["param"] == param and words in e.body["message"], (kw, e.body)
    assert _status(lambda: c.responses.create(model="nope", input="x")).status_code == 404
    assert _status(lambda: client(server, "wrong").responses.create(model="tiny-a", input="x")).status_code == 401


def test_text_config_without_format_echoes_the_text_format(server):
    """`text` without `format` (only verbosity, say) is plain text: the Response's text.format says so, as it does
    when `text` is left out (it was missing, so `response.text.format.type` failed)."""
    r = client(server).responses.create(model="tiny-a", input="x", max_output_tokens=2, text={"verbosity": "low"})
    assert r.text.format is not None and r.text.format.type == "text" and r.text.verbosity == "low"


def test_errors_name_the_responses_fields(server):
    """An error the chat path finds names the field the Responses request sent, in its param and its message, not
    the chat request's it became (messages, max_tokens, response_format, tool_choice.function, tools.0.function)."""
    c = client(server)
    mml = c.models.retrieve("tiny-a").model_extra["max_model_len"]
    for kw, param, words in (
            (dict(input="x", max_output_tokens=1 << 20), "max_output_tokens", "reduce the prompt or max_output_tokens"),
            (dict(input="hi " * mml), "input", "maximum context length"),
            (dict(input="x", text={"format": {"type": "json_schema", "name": "w"}}), "text.format.schema",
             "needs text.format.schema"),
            (dict(input="x", tools=[WEATHER], tool_choice={"type": "function", "name": "nope"}), "tool_choice.name",
             "'nope'"),
            (dict(input="x", tools=[WEATHER]), "tool_choice", "{'type': 'function', 'name': ...}"),
            (dict(input="x", tools=[{"type": "function", "parameters": SCHEMA}], tool_choice="required"),
             "tools[0].name", "tools[0].name")):
        e = _status(lambda kw=kw: c.responses.create(model="tiny-a", **kw))
        msg = e.body["message"]
        assert e.status_code == 400 and e.body["param"] == param and words in msg, (kw, e.body)
        assert not any(w in msg for w in ("messages", "max_tokens", "response_format", "json_schema.", "'function': {")), msg


def test_truncation_input_tokens_cancel_and_the_fields_it_cannot_honour(server):
    """truncation "auto" drops the oldest turns of a conversation too long for the context (it was ignored: a 400),
    "disabled" keeps the 400; input_tokens counts the input as it would be fed (it was a 405); cancel of a stored
    response is a 400 (no background responses), of an unknown one a 404; conversation and prompt are 400s naming
    them; truncation and reasoning are echoed."""
    c = client(server)
    mml = c.models.retrieve("tiny-a").model_extra["max_model_len"]
    long_turn = {"role": "user", "content": "hi " * mml}  # (past the context alone)
    convo = [long_turn, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "and then?"}]
    e = _status(lambda: c.responses.create(model="tiny-a", input=convo, max_output_tokens=4))
    assert e.status_code == 400 and "maximum context length" in e.body["message"]
    r = c.responses.create(model="tiny-a", input=convo, max_output_tokens=4, truncation="auto",
                           reasoning={"effort": "low"})
    assert r.status == "incomplete" and r.truncation == "auto" and r.reasoning.effort == "low"
    alone = c.responses.create(model="tiny-a", input=convo[1:], max_output_tokens=4, temperature=0)  # (oldest gone)
    again = c.responses.create(model="tiny-a", input=convo, max_output_tokens=4, truncation="auto", temperature=0)
    assert again.output_text == alone.output_text and again.usage.input_tokens == alone.usage.input_tokens
    assert c.responses.create(model="tiny-a", input="x", max_output_tokens=1).truncation == "disabled"
    # input_tokens: what the Response's usage says the same input was
    counted = c.responses.input_tokens.count(model="tiny-a", input=convo[2:], instructions="be brief")
    done = c.responses.create(model="tiny-a", input=convo[2:], instructions="be brief", max_output_tokens=1)
    assert counted.input_tokens == done.usage.input_tokens and counted.object == "response.input_tokens"
    e = _status(lambda: c.responses.input_tokens.count(model="tiny-a", input="x", previous_response_id="resp-nope"))
    assert e.status_code == 404
    e = _status(lambda: c.responses.cancel(done.id))
    assert e.status_code == 400 and "background" in e.body["message"]
    assert _status(lambda: c.responses.cancel("resp-nope")).status_code == 404
    for kw, param in ((dict(conversation="conv_123"), "conversation"), (dict(prompt={"id": "pmpt_1"}), "prompt")):
        e = _status(lambda kw=kw: c.responses.create(model="tiny-a", input="x", **kw))
        assert e.status_code == 400 and e.body["param"] == param, e.body


def test_output_text_logprobs_equal_the_chat_completions(server):
    """include message.output_text.logprobs with top_logprobs: the output text's tokens with their logprobs and
    alternatives, as the chat completion of the same input gives them (they were always []), streamed too."""
    c = client(server)
    o = c.chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": "Hello"}], max_tokens=5,
                                  temperature=0, logprobs=True, top_logprobs=3)
    want = [(t.token, round(t.logprob, 4), [(a.token, round(a.logprob, 4)) for a in t.top_logprobs])
            for t in o.choices[0].logprobs.content]
    r = c.responses.create(model="tiny-a", input="Hello", max_output_tokens=5, temperature=0, top_logprobs=3,
                           include=["message.output_text.logprobs"])
    got = r.output[0].content[0].logprobs
    assert [(t.token, round(t.logprob, 4), [(a.token, round(a.logprob, 4)) for a in t.top_logprobs]) for t in got] \
        == want and len(want) == 5
    deltas = [e for e in c.responses.create(model="tiny-a", input="Hello", max_output_tokens=5, temperature=0,
                                            top_logprobs=3, include=["message.output_text.logprobs"], stream=True)
              if e.type == "response.output_text.delta"]
    assert [t.token for e in deltas for t in e.logprobs] == [t[0] for t in want]
    plain = c.responses.create(model="tiny-a", input="Hello", max_output_tokens=2, temperature=0)
    assert plain.output[0].content[0].logprobs == []


def test_response_store_is_bounded_and_per_tenant():
    """The store keeps at most its entries and bytes (the oldest go first); a tenant sees only its own; delete
    gives the bytes back."""
    from controller.api.responses import ResponseStore

    st = ResponseStore(entries=3, max_bytes=10_000)
    for i in range(5):
        st.put(f"r{i}", "alice", [{"role": "user", "content": "x" * 100}], {"id": f"r{i}"})
    assert [r for r in ("r0", "r1", "r2", "r3", "r4") if st.get(r, "alice")] == ["r2", "r3", "r4"]
    assert st.get("r4", "bob") is None and not st.delete("r4", "bob") and st.get("r4", "alice")
    st.put("big", "alice", [{"role": "user", "content": "y" * 9_000}], {"id": "big"})
    assert st.get("big", "alice") and st.bytes <= 10_000 and len([r for r in ("r2", "r3", "r4")
                                                                   if st.get(r, "alice")]) < 3
    before = st.bytes
    assert st.delete("big", "alice") and st.get("big", "alice") is None and st.bytes < before
    assert st.bytes == sum(v.size for v in st._items.values())


def test_every_response_and_event_is_a_valid_openai_object(server):
    """Each streamed event (text, a function call, logprobs) and the Response, as JSON on the wire, validates as
    the `openai` client's own types, every required field there (`usage.input_tokens_details.cache_write_tokens`
    was missing: a typed client read None where the type says an int); ids are OpenAI's `resp_...`."""
    import httpx
    import pydantic
    from openai.types.responses import Response, ResponseStreamEvent

    events = pydantic.TypeAdapter(ResponseStreamEvent)
    h = {"Authorization": f"Bearer {ALICE}"}
    base = {"model": "tiny-a", "input": "Weather in Paris?", "max_output_tokens": 4, **GREEDY}
    for extra in ({}, {"tools": [WEATHER], "tool_choice": "required", "max_output_tokens": 40},
                  {"include": ["message.output_text.logprobs"], "top_logprobs": 1}):
        r = httpx.post(server.url + "/v1/responses", json={**base, **extra, "stream": True}, headers=h, timeout=60)
        got = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
        assert got and got[-1]["type"] in ("response.completed", "response.incomplete"), r.text[-300:]
        for e in got:
            events.validate_python(e)
    r = Response.model_validate(httpx.post(server.url + "/v1/responses", json=base, headers=h, timeout=60).json())
    assert r.usage.input_tokens_details.cache_write_tokens == 0 and r.id.startswith("resp_")  # (OpenAI's ids)
