"""The Responses and Messages streams send tool calls as they are written (they sent them whole at the end, one
delta each), as OpenAI's and Anthropic's streams do, over the chat stream's CallStream:

- Responses: a call's `response.output_item.added` (a `function_call` item `in_progress`, its call_id and name,
  arguments "") once its name is whole, then `response.function_call_arguments.delta` parts as they come, then
  `response.function_call_arguments.done` and `response.output_item.done`, before the next call's item opens; the
  final output (and the stored response) has the same item ids and call_ids, and the `openai` client's stream
  helper accumulates what the unstreamed response (same seed) gives; a call max_output_tokens cuts streams what was
  written, its item `incomplete`;
- Messages: a `tool_use` block's `content_block_start` (id, name, input {}), `input_json_delta` parts as they come,
  `content_block_stop`; the `anthropic` client's `get_final_message()` has the unstreamed reply's tool_use blocks;
  a call max_tokens cuts streams what was written, stop_reason max_tokens.
"""

from __future__ import annotations

import asyncio
import json

import anthropic
import openai
import pytest

from controller.keys import hash_key
from tests.ports import live_server_on

KEY = "key-alice-ux58e-0123"
LONG = {"type": "function", "name": "put", "parameters": {
    "type": "object", "properties": {"xs": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                                            "minItems": 16, "maxItems": 20}}, "required": ["xs"]}}
CITY = {"type": "function", "name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}}
TOOLS_A = [{"name": t["name"], "input_schema": t["parameters"]} for t in (CITY, LONG)]
MSGS = [{"role": "user", "content": "weather and numbers?"}]


@pytest.fixture(scope="module")
def server(make_varied, tmp_path_factory):
    cfg = {"tenants": [{"name": "alice", "key_hashes": [hash_key(KEY)]}],
           "workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "models": [{"name": "varied", "path": str(make_varied("qwen2")), "tool_call_parser": "hermes",
                       "engine": {"max_num_seqs": 8}}]}
    with live_server_on(range(24700, 24800), cfg, tmp_path_factory.mktemp("ux58e")) as srv:
        yield srv


def oai(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def ant(srv) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=srv.url, api_key=KEY, max_retries=0, timeout=60)


def _response_calls(events: list) -> dict[int, dict]:
    """Each function_call item's events, checked in OpenAI's order (added, argument deltas, arguments done, item
    done; an item done before the next is added): by output index, its added item, deltas, done item."""
    calls: dict[int, dict] = {}
    open_: int | None = None
    for e in events:
        if e.type == "response.output_item.added":
            assert e.item.type == "function_call" and open_ is None, e
            it = e.item
            assert (it.status, it.arguments) == ("in_progress", "") and it.call_id.startswith("call_"), it
            assert it.id.startswith("fc_") and it.name and e.output_index == len(calls), e
            calls[e.output_index] = {"added": it, "deltas": [], "done": None, "args": None}
            open_ = e.output_index
        elif e.type == "response.function_call_arguments.delta":
            assert e.output_index == open_ and e.item_id == calls[open_]["added"].id and e.delta, e
            calls[open_]["deltas"].append(e.delta)
        elif e.type == "response.function_call_arguments.done":
            assert e.output_index == open_ and e.item_id == calls[open_]["added"].id, e
            calls[open_]["args"] = e.arguments
        elif e.type == "response.output_item.done":
            c = calls[e.output_index]
            assert e.output_index == open_ and c["args"] is not None, e
            assert (e.item.id, e.item.call_id, e.item.name) == (c["added"].id, c["added"].call_id, c["added"].name)
            assert e.item.arguments == c["args"] == "".join(c["deltas"]), (e.item, c)
            c["done"], open_ = e.item, None
        else:
            assert e.type.startswith("response.") and "text" not in e.type and "content_part" not in e.type, e
    assert open_ is None
    return calls


@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "put"}])
def test_responses_stream_calls_as_they_are_written(server, choice):
    """Each function_call item opens once its name is whole, its arguments go in parts as they are written (a call
    of 16 numbers or more: many parts), it is done before the next opens; the completed response (and the stored
    one) has the same items; the stream helper accumulates what the unstreamed response of the same seed gives."""
    c = oai(server)
    kw: dict = dict(model="varied", input="weather and numbers?", tools=[CITY, LONG], tool_choice=choice,
                    max_output_tokens=300, extra_body={"seed": 4})
    whole = c.responses.create(**kw)
    assert whole.status == "completed" and all(x.type == "function_call" for x in whole.output), whole
    want = [(x.name, json.loads(x.arguments)) for x in whole.output]
    events = list(c.responses.create(stream=True, **kw))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].type == "response.completed"
    calls = _response_calls(events)
    assert [(x["done"].name, json.loads(x["done"].arguments)) for x in calls.values()] == want
    assert all(x["done"].status == "completed" for x in calls.values())
    k = next(i for i, x in calls.items() if x["done"].name == "put") if any(
        x["done"].name == "put" for x in calls.values()) else None
    if k is not None:  # (in parts as the tokens came: it was one delta, at the end)
        assert len(calls[k]["deltas"]) > 10, calls[k]["deltas"]
    else:
        assert all(len(x["deltas"]) > 1 for x in calls.values()), calls
    done = [(x["done"].id, x["done"].call_id, x["done"].name, x["done"].arguments, "completed")
            for x in calls.values()]
    final = events[-1].response
    assert [(x.id, x.call_id, x.name, x.arguments, x.status) for x in final.output] == done
    stored = c.responses.retrieve(final.id)
    assert [(x.id, x.call_id, x.name, x.arguments, x.status) for x in stored.output] == done
    with c.responses.stream(**kw) as s:
        helped = s.get_final_response()
    assert [(x.type, x.name, json.loads(x.arguments), x.status) for x in helped.output] == [
        ("function_call", n, a, "completed") for n, a in want]
    # the streamed call_ids are the stored conversation's: their outputs continue it (each call's, as OpenAI's
    # 400s a call left unanswered)
    follow = c.responses.create(model="varied", previous_response_id=final.id, tool_choice="none", max_output_tokens=2,
                                input=[{"type": "function_call_output", "call_id": x.call_id, "output": "ok"}
                                       for x in final.output])
    assert follow.status in ("completed", "incomplete"), follow


def test_responses_stream_of_a_call_cut_by_max_output_tokens(server):
    """A call max_output_tokens cuts: its item streams what was written, is done `incomplete` with those arguments,
    and the response.incomplete (as the unstreamed response) holds it so."""
    c = oai(server)
    kw: dict = dict(model="varied", input="numbers", tools=[LONG], tool_choice={"type": "function", "name": "put"},
                    max_output_tokens=12, extra_body={"seed": 3})
    whole = c.responses.create(**kw)
    (cut,) = whole.output
    assert whole.status == "incomplete" and (cut.type, cut.status) == ("function_call", "incomplete"), whole
    events = list(c.responses.create(stream=True, **kw))
    assert events[-1].type == "response.incomplete"
    calls = _response_calls(events)
    (only,) = calls.values()
    assert len(only["deltas"]) > 3 and only["done"].status == "incomplete"
    assert only["done"].arguments == cut.arguments and cut.arguments.startswith('{"xs": [')
    (last,) = events[-1].response.output
    assert (last.id, last.call_id, last.arguments, last.status) == (
        only["done"].id, only["done"].call_id, cut.arguments, "incomplete")


def _message_calls(events: list) -> list[dict]:
    """The tool_use blocks of a Messages stream's events, checked in Anthropic's order (start, input_json_delta
    parts, stop; one block open at a time)."""
    blocks: list[dict] = []
    open_ = None
    for e in events:
        if e.type == "content_block_start":
            b = e.content_block
            assert open_ is None and e.index == len(blocks) and b.type == "tool_use", e
            assert b.id.startswith("toolu_") and b.name and b.input == {}, b
            blocks.append({"id": b.id, "name": b.name, "parts": []})
            open_ = e.index
        elif e.type == "content_block_delta":
            assert e.index == open_ and e.delta.type == "input_json_delta", e
            blocks[open_]["parts"].append(e.delta.partial_json)
        elif e.type == "content_block_stop":
            assert e.index == open_, e
            open_ = None
    assert open_ is None
    return blocks


@pytest.mark.parametrize("choice", [{"type": "any", "disable_parallel_tool_use": True}, {"type": "tool", "name": "put"}])
def test_messages_stream_tool_use_as_it_is_written(server, choice):
    """Each tool_use block starts once its name is whole (input {}), its input goes as input_json_delta parts as
    it is written, the block stops before the next starts; the stream helper's final message has the unstreamed
    reply's tool_use blocks (same seed), stop_reason tool_use."""
    c = ant(server)
    kw: dict = dict(model="varied", messages=MSGS, max_tokens=300, tools=TOOLS_A, tool_choice=choice,
                    extra_body={"temperature": 0})  # (greedy: the Messages API takes no seed)
    whole = c.messages.create(**kw)
    assert whole.stop_reason == "tool_use" and all(b.type == "tool_use" for b in whole.content), whole
    want = [(b.name, b.input) for b in whole.content]
    events = list(c.messages.create(stream=True, **kw))
    assert [e.type for e in events][:2] == ["message_start", "content_block_start"]
    assert [e.type for e in events][-2:] == ["message_delta", "message_stop"]
    assert events[-2].delta.stop_reason == "tool_use"
    blocks = _message_calls(events)
    assert [(b["name"], json.loads("".join(b["parts"]))) for b in blocks] == want
    assert max(len(b["parts"]) for b in blocks) > 3, blocks  # (in parts as written: it was one, at the end)
    with c.messages.stream(**kw) as s:
        final = s.get_final_message()
    assert final.stop_reason == "tool_use" and [(b.type, b.name, b.input) for b in final.content] == [
        ("tool_use", n, i) for n, i in want]


def test_messages_stream_of_a_call_cut_by_max_tokens(server):
    """A call max_tokens cuts: its block streams what was written (input_json_delta parts of its JSON so far), then
    stops; stop_reason max_tokens, as the unstreamed reply's (whose cut block's input is {})."""
    c = ant(server)
    kw: dict = dict(model="varied", messages=MSGS, max_tokens=12, tools=TOOLS_A,
                    tool_choice={"type": "tool", "name": "put"}, extra_body={"temperature": 0})
    whole = c.messages.create(**kw)
    assert whole.stop_reason == "max_tokens" and [(b.type, b.name) for b in whole.content] == [("tool_use", "put")]
    events = list(c.messages.create(stream=True, **kw))
    (block,) = _message_calls(events)
    assert block["name"] == "put" and len(block["parts"]) > 3 and "".join(block["parts"]).startswith('{"xs": [')
    assert events[-2].delta.stop_reason == "max_tokens"
    with c.messages.stream(**kw) as s:
        final = s.get_final_message()
    assert final.stop_reason == "max_tokens" and [(b.type, b.name) for b in final.content] == [("tool_use", "put")]


# --- tool_choice auto (the hermes syntax), over scripted tokens: the random model never begins a reply as a call


def _scripted():
    from controller.api import protocol as p
    from controller.api.structured import tool_plan
    from tests.scripted_gen import bare_serving, generation, in_pieces, two_hermes_calls

    tools = [p.Tool.model_validate({"type": "function", "function": {k: t[k] for k in ("name", "parameters")}})
             for t in (CITY, LONG)]
    plan = tool_plan(tools, "auto", None, "hermes")
    return bare_serving(), plan, generation(in_pieces(two_hermes_calls()))


def _sse(stream) -> list[dict]:
    async def run():
        return b"".join([b async for b in stream])

    return [json.loads(x.split("data: ", 1)[1]) for x in asyncio.run(run()).decode().split("\n\n") if "data: " in x]


def test_hermes_calls_stream_as_written_in_responses_and_messages():
    """tool_choice "auto": each call of the model's own syntax opens once its name is whole and its arguments go as
    they come, in both streams; the joined parts are each call's arguments."""
    from controller.api import anthropic as am
    from controller.api import protocol as p
    from controller.api import responses as rm

    serving, plan, gen = _scripted()
    req = p.ResponsesRequest.model_validate({"model": "m", "input": "hi", "stream": True})
    reply = rm._Reply(serving, req, "resp_x", plan)

    def finish():
        items, _, status = reply.output()
        return reply.response(gen, status, items)

    events = _sse(rm._stream(serving, gen, reply, finish))
    kinds = [e["type"] for e in events]
    assert kinds.count("response.output_item.added") == 2 and kinds[-1] == "response.completed"
    assert kinds.count("response.function_call_arguments.delta") > 10
    items = {}
    for e in events:
        if e["type"] == "response.output_item.added":
            items[e["output_index"]] = dict(e["item"], joined="")
        elif e["type"] == "response.function_call_arguments.delta":
            items[e["output_index"]]["joined"] += e["delta"]
    assert [(x["name"], json.loads(x["joined"])) for x in items.values()] == [
        ("get_weather", {"city": 'Par"is}'}), ("put", {"xs": [1, 2, 3]})]
    added = [i for i, k in enumerate(kinds) if k == "response.output_item.added"]
    assert kinds.index("response.output_item.done") < added[1]  # (the first call done before the second opens)
    assert [(x["call_id"], x["id"]) for x in events[-1]["response"]["output"]] == [
        (x["call_id"], x["id"]) for x in items.values()]

    serving, plan, gen = _scripted()
    mreq = p.MessagesRequest.model_validate({"model": "m", "max_tokens": 99, "messages": MSGS, "stream": True})
    events = _sse(am._stream(serving, gen, am._Reply(serving, mreq, plan)))
    starts = [e for e in events if e["type"] == "content_block_start"]
    assert [(e["index"], e["content_block"]["name"]) for e in starts] == [(0, "get_weather"), (1, "put")]
    parts = [e for e in events if e["type"] == "content_block_delta"]
    assert len(parts) > 10 and all(e["delta"]["type"] == "input_json_delta" for e in parts)
    assert [json.loads("".join(e["delta"]["partial_json"] for e in parts if e["index"] == k)) for k in (0, 1)] == [
        {"city": 'Par"is}'}, {"xs": [1, 2, 3]}]
    kinds = [e["type"] for e in events]
    assert kinds.index("content_block_stop") < kinds.index("content_block_start", kinds.index("content_block_start") + 1)
    assert events[-2]["delta"]["stop_reason"] == "tool_use"
