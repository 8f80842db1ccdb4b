"""Tool calling as an agent framework drives it, found by user testing against one live server (a tiny model whose
matrices are scaled so its outputs vary, with the hermes tool-call parser):

- a non-streamed /v1/responses request whose client left before the answer was not stored: now kept as
  `incomplete` (`interrupted`), what was made until then, as a cut stream is;
- a cut stream of a tool-calling response was stored as a message of the calls' raw JSON: now `function_call`
  items, the whole calls `completed` and the one being written `incomplete` (so is a response max_output_tokens
  cut), and the stored conversation continues with the whole calls' outputs;
- a tool's arguments took keys its schema does not list (`{"tz": "UTC", ",(": [""]}`): a tool's parameters are held
  as vLLM's default backend holds them, objects that list properties closed unless they say otherwise;
- a tool schema the grammar cannot take was a 400 on `tools`: now on the tool's own parameters;
- with tool_choice "auto" a text reply was held to the end on the Responses and Messages streams: it streams as it
  comes, as the chat path's does;
- Messages calls cut by max_tokens were one tool_use block named after the first call: the whole calls are kept.
"""

from __future__ import annotations

import json
import threading
import time

import anthropic
import httpx
import openai
import pytest

from controller.keys import hash_key
from load_tests.live_server import LiveServer

ADMIN, KEY = "admin-ux57b-token", "key-alice-ux57b-0123"
# a function whose call takes hundreds of tokens: a response cut while it is written is cut inside it
LONG = {"type": "function", "name": "put", "parameters": {
    "type": "object", "properties": {"xs": {"type": "array", "items": {"type": "integer"}, "minItems": 400}},
    "required": ["xs"]}}
CITY = {"type": "function", "name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}}
TZ = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"type": "string", "enum": ["UTC", "CET"]}}}}}


@pytest.fixture(scope="module")
def server(make_varied, tmp_path_factory):
    cfg = {"admin_token_hash": hash_key(ADMIN),
           "tenants": [{"name": "alice", "key_hashes": [hash_key(KEY)]}],
           "workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "models": [{"name": "varied", "path": str(make_varied("qwen2")), "tool_call_parser": "hermes",
                       "engine": {"max_num_seqs": 8}}]}
    with LiveServer(cfg, tmp_path_factory.mktemp("ux57b")) as srv:
        yield srv


def oai(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def stored(c: openai.OpenAI, rid: str):
    deadline = time.monotonic() + 10
    while True:
        try:
            return c.responses.retrieve(rid)
        except openai.NotFoundError:
            assert time.monotonic() < deadline, f"{rid} was never stored"
            time.sleep(0.05)


def check_calls(output) -> list:
    """Function_call items as a cut response holds them: the whole calls `completed` (their arguments JSON), at most
    the last `incomplete`; the whole ones returned."""
    assert output and all(o.type == "function_call" for o in output), output
    assert all(o.status == "completed" for o in output[:-1]) and output[-1].status in ("completed", "incomplete")
    whole = [o for o in output if o.status == "completed"]
    for o in whole:
        json.loads(o.arguments)
    return whole


def test_a_non_streamed_response_whose_client_left_is_stored_incomplete(server):
    """The client of a non-streamed request gives up (a read timeout) while a call is written: the response is kept
    as `incomplete`, its calls so far as function_call items (the id is the one the dashboard's requests show)."""
    seen: set[str] = set()
    done = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN}"}) as a:
            while not done.is_set():
                seen.update(x["id"] for x in a.get("/admin/requests").json())
                time.sleep(0.01)

    t = threading.Thread(target=poll)
    t.start()
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/responses", headers={"Authorization": f"Bearer {KEY}"}, timeout=0.8, json={
                "model": "varied", "input": "numbers", "tools": [LONG], "tool_choice": {"type": "function", "name": "put"},
                "max_output_tokens": 1500})
    finally:
        time.sleep(0.2)
        done.set()
        t.join()
    (rid,) = [x for x in seen if x.startswith("resp_")]
    got = stored(oai(server), rid)
    assert got.status == "incomplete" and got.incomplete_details.reason == "interrupted", got
    (call,) = got.output
    assert (call.type, call.name, call.status) == ("function_call", "put", "incomplete"), call
    assert call.arguments.startswith('{"xs": [') and 0 < got.usage.output_tokens < 1500


def test_a_cut_stream_of_calls_is_stored_as_function_call_items(server):
    """A stream of calls (held to its end, as the chat path holds them) cut by its client: stored as function_call
    items, not a message of their JSON; the conversation goes on with the whole calls' outputs."""
    c = oai(server)
    with c.responses.create(model="varied", input="weather and numbers", tools=[CITY, LONG], tool_choice="required",
                            max_output_tokens=1500, stream=True, extra_body={"seed": 5}) as s:
        rid = next(iter(s)).response.id
        time.sleep(0.5)  # (calls being written)
    got = stored(c, rid)
    assert got.status == "incomplete" and got.incomplete_details.reason == "interrupted", got
    whole = check_calls(got.output)
    nxt = c.responses.create(model="varied", previous_response_id=rid, max_output_tokens=2, tools=[CITY, LONG],
                             tool_choice="none", input=[{"type": "function_call_output", "call_id": o.call_id,
                                                         "output": "done"} for o in whole] or "go on")
    assert nxt.status in ("completed", "incomplete") and nxt.usage.input_tokens > got.usage.input_tokens


def test_calls_cut_by_max_output_tokens_are_function_call_items(server):
    """max_output_tokens ending a call: the call being written is an incomplete function_call item (streamed too:
    its events, then response.incomplete), not a message of its JSON."""
    c = oai(server)
    r = c.responses.create(model="varied", input="numbers", tools=[LONG], max_output_tokens=30,
                           tool_choice={"type": "function", "name": "put"})
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    (call,) = r.output
    assert (call.type, call.name, call.status) == ("function_call", "put", "incomplete")
    assert call.arguments.startswith('{"xs": [')
    events = list(c.responses.create(model="varied", input="numbers", tools=[LONG], max_output_tokens=30,
                                     tool_choice={"type": "function", "name": "put"}, stream=True))
    assert events[-1].type == "response.incomplete"
    assert [e.item.status for e in events if e.type == "response.output_item.done"] == ["incomplete"]


def test_a_tools_arguments_take_only_the_keys_its_schema_lists(server):
    """As vLLM's default backend holds a tool's parameters (and OpenAI's strict functions): an object that lists its
    properties takes no others. The random model added keys of its own making."""
    c = oai(server)
    for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        r = c.chat.completions.create(model="varied", messages=[{"role": "user", "content": "time?"}], tools=[TZ],
                                      tool_choice=choice, n=6, max_tokens=60, seed=2, parallel_tool_calls=False)
        # (a named choice's calls finish `stop`, as OpenAI's: test_ux58b_api_gaps)
        assert all(ch.finish_reason == ("tool_calls" if choice == "required" else "stop") for ch in r.choices), r
        calls = [json.loads(ch.message.tool_calls[0].function.arguments) for ch in r.choices]
        assert all(set(x) <= {"tz"} for x in calls), calls


def test_a_tool_schema_the_grammar_cannot_take_is_named(server):
    """The 400 names the tool's own parameters (chat), as the Responses and Messages APIs call them."""
    bad = {"type": "object", "properties": {"a": {"type": "strin"}}}
    c = oai(server)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="varied", messages=[{"role": "user", "content": "x"}], tool_choice="required",
                                  tools=[TZ, {"type": "function", "function": {"name": "b", "parameters": bad}}])
    assert e.value.body["param"] == "tools.1.function.parameters" and "strin" in e.value.body["message"], e.value.body
    with pytest.raises(openai.BadRequestError) as e:  # ("auto": the hermes grammar)
        c.responses.create(model="varied", input="x", tools=[CITY, {**CITY, "name": "b", "parameters": bad}])
    assert e.value.body["param"] == "tools[1].parameters", e.value.body
    a = anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as e:
        a.messages.create(model="varied", max_tokens=5, messages=[{"role": "user", "content": "x"}],
                          tools=[{"name": "b", "input_schema": bad}], tool_choice={"type": "any"})
    assert e.value.body["error"]["message"].startswith("tools.0.input_schema: "), e.value.body


def test_a_text_reply_with_tools_auto_streams_as_it_comes(server):
    """tool_choice "auto" (the model's hermes syntax) and a reply that is text: the Responses and Messages streams
    send it as it comes, as the chat path's does (they held it to the end: one delta)."""
    c = oai(server)
    deltas, done = [], None
    for e in c.responses.create(model="varied", input="hi", tools=[CITY], max_output_tokens=12, stream=True,
                                extra_body={"seed": 1}):
        if e.type == "response.output_text.delta":
            deltas.append(e.delta)
        elif e.type in ("response.completed", "response.incomplete"):
            done = e.response
    assert done.output[0].type == "message", done.output  # (a text reply: the model wrote no call)
    assert len(deltas) > 1 and "".join(deltas) == done.output_text, deltas
    a = anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0)
    tool = {"name": CITY["name"], "input_schema": CITY["parameters"]}
    with a.messages.stream(model="varied", max_tokens=12, messages=[{"role": "user", "content": "hi"}],
                           tools=[tool], extra_body={"temperature": 0}) as s:
        # (greedy: the Messages API takes no seed, and ~2% of sampled replies ended before max_tokens)
        texts = [e.delta.text for e in s if e.type == "content_block_delta"]
        final = s.get_final_message()
    assert [b.type for b in final.content] == ["text"] and final.stop_reason == "max_tokens"
    assert len(texts) > 1 and "".join(texts) == final.content[0].text, texts


def test_calls_max_tokens_cut_keep_the_whole_ones_on_the_messages_api(server):
    """tool_choice any, parallel calls, max_tokens ending the second: the reply holds the first call whole (its
    input) and the cut one's tool_use (input {}), streamed alike; it held one block named after the first call."""
    a = anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0)
    kw = {"model": "varied", "max_tokens": 44, "messages": [{"role": "user", "content": "weather?"}],
          "tools": [{"name": CITY["name"], "input_schema": CITY["parameters"]}], "tool_choice": {"type": "any"},
          "extra_body": {"temperature": 0}}
    m = a.messages.create(**kw)
    assert m.stop_reason == "max_tokens" and [b.type for b in m.content] == ["tool_use", "tool_use"], m
    assert set(m.content[0].input) == {"city"} and m.content[1].input == {}, m
    with a.messages.stream(**kw) as s:
        final = s.get_final_message()
    assert [(b.name, b.input) for b in final.content] == [(b.name, b.input) for b in m.content]
