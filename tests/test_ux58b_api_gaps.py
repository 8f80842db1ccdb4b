"""The OpenAI, Anthropic and admin APIs as their users expect them, found by review against one live server (a tiny
model whose matrices are scaled so its outputs vary, with the hermes tool-call parser):

- a chat completion whose tool_choice named the function finished `tool_calls`: OpenAI answers `stop` there,
  streamed or not (and vLLM with it, its PR #25054); "required" and "auto" calls stay `tool_calls`;
- a streamed tool call went out whole in one delta at the end: now as OpenAI streams one, a first delta with its
  index, id, type, name and arguments "" (or their first part), then the arguments in parts as they are written
  (the id only in the first); the openai client's stream helper rebuilds the same calls;
- a Responses stream that failed (an operator's cancel) ended with `response.failed` of no output when it was
  writing calls: now its function_call items, as response.incomplete and the stored response have them;
- a tenant created or changed with `models: []` was accepted unsaid, every request of its keys then a 404: it stays
  allowed (it means no model, as the operator's Tenant documents: reason NoModels), and the answer's `warning` says
  so;
- the Messages API took fields Anthropic's does not know (`seed`) and ignored them: a 400 invalid_request_error
  "seed: Extra inputs are not permitted", as Anthropic answers; the fields Anthropic knows (those Claude Code sends:
  metadata, context_management, service_tier, ...) are still taken.
"""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import anthropic
import httpx
import openai
import pytest

from controller.keys import hash_key
from tests.ports import live_server_on

ADMIN, KEY = "admin-ux58b-token", "key-alice-ux58b-0123"
LONG = {"type": "function", "function": {"name": "put", "parameters": {
    "type": "object", "properties": {"xs": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                                            "minItems": 16,
                                            "maxItems": 20}}, "required": ["xs"]}}}
CITY = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}}}
MSGS = [{"role": "user", "content": "weather and numbers?"}]


@pytest.fixture(scope="module")
def server(make_varied, tmp_path_factory):
    cfg = {"admin_token_hash": hash_key(ADMIN),
           "tenants": [{"name": "alice", "key_hashes": [hash_key(KEY)]}],
           "workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "models": [{"name": "varied", "path": str(make_varied("qwen2")), "tool_call_parser": "hermes",
                       "engine": {"max_num_seqs": 8}}]}
    with live_server_on(range(24200, 24300), cfg, tmp_path_factory.mktemp("ux58b")) as srv:
        yield srv


def oai(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


def test_a_named_tool_choice_finishes_stop_as_openai_answers(server):
    """OpenAI's finish_reason for a call tool_choice named is `stop`, streamed or not; "required" is `tool_calls`."""
    c = oai(server)
    r = c.chat.completions.create(model="varied", messages=MSGS, tools=[CITY, LONG], tool_choice=named("get_weather"),
                                  max_tokens=60, seed=1)
    ch = r.choices[0]
    assert ch.finish_reason == "stop" and ch.message.tool_calls[0].function.name == "get_weather", ch
    chunks = [x.choices[0] for x in c.chat.completions.create(
        model="varied", messages=MSGS, tools=[CITY], tool_choice=named("get_weather"), max_tokens=60, seed=1,
        stream=True) if x.choices]
    assert chunks[-1].finish_reason == "stop", chunks[-1]
    r = c.chat.completions.create(model="varied", messages=MSGS, tools=[CITY], tool_choice="required", max_tokens=60,
                                  seed=1, parallel_tool_calls=False)
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.tool_calls, r.choices[0]


def _streamed(c: openai.OpenAI, **kw) -> list:
    return [x.choices[0] for x in c.chat.completions.create(model="varied", messages=MSGS, stream=True, **kw)
            if x.choices]


@pytest.mark.parametrize("choice", ["required", named("put")])
def test_streamed_tool_calls_go_out_as_their_arguments_are_written(server, choice):
    """Each call: a first delta with its index, id, type, name and arguments so far; then arguments only, in many
    parts (the call used to go out whole, in one delta); joined, they are the calls the same request (its seed)
    answers unstreamed. (The random model never begins a reply of "auto" as a call: its hermes calls are
    `test_hermes_calls_stream_as_they_are_written`'s.)"""
    c = oai(server)
    kw: dict = dict(tools=[CITY, LONG], tool_choice=choice, max_tokens=300, seed=2, parallel_tool_calls=False)
    whole = c.chat.completions.create(model="varied", messages=MSGS, **kw).choices[0]
    assert whole.message.tool_calls and whole.finish_reason in ("stop", "tool_calls"), whole
    deltas = _streamed(c, **kw)
    assert deltas[-1].finish_reason == whole.finish_reason
    parts = [tc for d in deltas for tc in d.delta.tool_calls or []]
    assert all(d.delta.content is None for d in deltas)
    calls: dict[int, dict] = {}
    for tc in parts:
        if tc.index not in calls:  # its first delta: id, type, name
            assert tc.id.startswith("call_") and tc.type == "function" and tc.function.name, tc
            calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": tc.function.arguments or ""}
        else:  # then its arguments alone
            assert tc.id is None and tc.function.name is None and tc.function.arguments, tc
            calls[tc.index]["arguments"] += tc.function.arguments
    assert sorted(calls) == list(range(len(calls)))
    assert [(x["name"], json.loads(x["arguments"])) for x in calls.values()] == [
        (t.function.name, json.loads(t.function.arguments)) for t in whole.message.tool_calls]
    big = [x for x in calls.values() if x["name"] == "put"]
    if big:  # (a call of 16 numbers or more: in parts as the tokens came, not one)
        k = next(i for i, x in calls.items() if x["name"] == "put")
        assert sum(1 for tc in parts if tc.index == k) > 10, parts
    # the openai client's stream helper (ChatCompletionStreamState) rebuilds the same message
    with c.chat.completions.stream(model="varied", messages=MSGS, **kw) as s:
        final = s.get_final_completion().choices[0]
    assert final.finish_reason == whole.finish_reason and final.message.content is None
    assert [(t.function.name, json.loads(t.function.arguments)) for t in final.message.tool_calls] == [
        (x["name"], json.loads(x["arguments"])) for x in calls.values()]


def test_streamed_calls_cut_by_max_tokens_and_of_several_choices(server):
    """A call cut by max_tokens streams what was written (finish `length`); n choices each stream their own calls,
    the indexes of each from 0."""
    c = oai(server)
    deltas = _streamed(c, tools=[LONG], tool_choice=named("put"), max_tokens=12, seed=3)
    assert deltas[-1].finish_reason == "length"
    parts = [tc for d in deltas for tc in d.delta.tool_calls or []]
    assert parts[0].function.name == "put" and len(parts) > 3
    assert "".join(tc.function.arguments for tc in parts).startswith('{"xs": [')
    deltas = _streamed(c, tools=[CITY], tool_choice="required", max_tokens=60, seed=4, n=3)
    for i in range(3):
        mine = [tc for d in deltas if d.index == i for tc in d.delta.tool_calls or []]
        firsts = [tc for tc in mine if tc.id]
        assert [tc.index for tc in firsts] == list(range(len(firsts))) and firsts[0] == mine[0], mine
        for k in range(len(firsts)):
            assert "city" in json.loads("".join(tc.function.arguments for tc in mine if tc.index == k))


def test_a_failed_responses_stream_keeps_its_calls(server):
    """An operator cancels a Responses stream while it writes a call: its `response.failed` holds the function_call
    items (the whole calls completed, the one being written incomplete), as response.incomplete and a stored cut
    response do; it held no output."""
    c = oai(server)
    long = {"type": "function", "name": "put", "parameters": {
        "type": "object", "properties": {"xs": {"type": "array", "items": {"type": "integer"}, "minItems": 400}},
        "required": ["xs"]}}
    events: list = []

    def cancel(rid: str) -> None:
        time.sleep(0.6)  # (the call being written)
        r = httpx.post(f"{server.url}/admin/requests/{rid}/cancel", headers={"Authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 200, r.text

    with c.responses.create(model="varied", input="numbers", tools=[long], max_output_tokens=1500, stream=True,
                            tool_choice={"type": "function", "name": "put"}) as s:
        t = None
        for e in s:
            events.append(e)
            if t is None:
                t = threading.Thread(target=cancel, args=(e.response.id,))
                t.start()
    t.join()
    assert events[-1].type == "response.failed", [e.type for e in events[-3:]]
    failed = events[-1].response
    assert failed.status == "failed" and "cancelled" in failed.error.message
    (call,) = failed.output
    assert (call.type, call.name, call.status) == ("function_call", "put", "incomplete"), call
    assert call.arguments.startswith('{"xs": [') and failed.usage.output_tokens > 0


def test_a_tenant_of_no_models_is_said(server):
    """`models: []` means no model (the operator's Tenant documents it so: reason NoModels), kept as asked; the
    create and the change answer a warning saying its keys may use no model (they were silent)."""
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN}"}) as a:
        r = a.post("/admin/tenants", json={"name": "nobody-ux58b", "models": []})
        assert r.status_code == 201 and r.json()["models"] == [], r.text
        assert "models is empty" in r.json()["warning"] and "no model" in r.json()["warning"], r.json()
        key = r.json()["api_key"]
        e = pytest.raises(openai.NotFoundError, oai(server).with_options(api_key=key).chat.completions.create,
                          model="varied", messages=MSGS, max_tokens=1)
        assert e.value.status_code == 404
        r = a.patch("/admin/tenants/nobody-ux58b", json={"models": ["*"]})
        assert r.status_code == 200 and r.json()["warning"] is None, r.text
        r = a.patch("/admin/tenants/nobody-ux58b", json={"models": []})
        assert r.status_code == 200 and "models is empty" in r.json()["warning"], r.text
        r = a.patch("/admin/tenants/nobody-ux58b", json={"priority": 1})  # (models not changed: not said again)
        assert r.status_code == 200 and r.json()["warning"] is None, r.text
        r = a.post("/admin/tenants", json={"name": "all-ux58b"})
        assert r.status_code == 201 and r.json()["models"] == ["*"] and r.json()["warning"] is None, r.text


def test_messages_refuse_fields_anthropic_does_not_know(server):
    """A top-level field Anthropic's Messages API does not know is a 400 invalid_request_error naming it, as
    Anthropic's ("seed: Extra inputs are not permitted"; it was ignored); count_tokens too. Fields Anthropic knows
    and this server does not use (Claude Code's metadata, context_management, service_tier...) are still taken."""
    a = anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0)
    msgs = [{"role": "user", "content": "hi"}]
    for extra in ({"seed": 1}, {"response_format": {"type": "json_object"}}, {"n": 2}):
        with pytest.raises(anthropic.BadRequestError) as e:
            a.messages.create(model="varied", max_tokens=2, messages=msgs, extra_body=extra)
        (k,) = extra
        assert e.value.body == {"type": "error", "error": {"type": "invalid_request_error",
                                                           "message": f"{k}: Extra inputs are not permitted"}}
    with pytest.raises(anthropic.BadRequestError) as e:
        a.messages.count_tokens(model="varied", messages=msgs, extra_body={"seed": 1})
    assert e.value.body["error"]["message"] == "seed: Extra inputs are not permitted"
    r = a.messages.create(model="varied", max_tokens=2, messages=msgs, metadata={"user_id": "u1"}, service_tier="auto",
                          stop_sequences=["zz"], extra_body={"temperature": 0, "top_k": 5, "top_p": 0.9,
                                                             "context_management": {"edits": []}})
    assert r.type == "message" and r.usage.output_tokens >= 1
    with a.messages.stream(model="varied", max_tokens=2, messages=msgs, metadata={"user_id": "u1"}) as s:
        assert s.get_final_message().type == "message"
    assert a.messages.count_tokens(model="varied", messages=msgs, system="be brief").input_tokens > 0


def test_hermes_calls_stream_as_they_are_written():
    """tool_choice "auto" (the model's hermes syntax), the chat stream's own code over scripted tokens: the reply is
    held until it shows it is calls, then each call opens once its name is whole and its arguments go as they come;
    the finish is `tool_calls`, the joined arguments each call's."""
    import asyncio

    from controller.api import protocol as p
    from controller.api.structured import tool_plan
    from tests.scripted_gen import bare_serving, generation, in_pieces, two_hermes_calls

    tools = [p.Tool.model_validate(t) for t in (CITY, LONG)]
    plan = tool_plan(tools, "auto", None, "hermes")
    gen, serving = generation(in_pieces(two_hermes_calls())), bare_serving()
    req = p.ChatCompletionRequest.model_validate({"model": "m", "messages": MSGS, "stream": True})

    async def run():
        return b"".join([b async for b in serving._stream_chat(gen, req, "id", SimpleNamespace(tokenizer=None), plan)])

    chunks = [json.loads(x[6:])["choices"][0] for x in asyncio.run(run()).decode().split("\n\n")
              if x.startswith("data: {")]
    assert chunks[0]["delta"] == {"role": "assistant", "content": None} and chunks[-1]["finish_reason"] == "tool_calls"
    parts = [tc for ch in chunks for tc in ch["delta"].get("tool_calls", [])]
    firsts = [tc for tc in parts if "id" in tc]
    assert [(tc["index"], tc["type"], tc["function"]["name"]) for tc in firsts] == [
        (0, "function", "get_weather"), (1, "function", "put")]
    assert all(set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
               for tc in parts if "id" not in tc)
    assert len(parts) > 10  # (in parts as they came)
    args = ["".join(tc["function"]["arguments"] for tc in parts if tc["index"] == k) for k in (0, 1)]
    assert [json.loads(a) for a in args] == [{"city": 'Par"is}'}, {"xs": [1, 2, 3]}]
