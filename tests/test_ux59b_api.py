"""Gaps found in review, checked on one live server (a tiny model, varied, with two aliases and the hermes tool-call
parser) as the official `openai` client and Anthropic-shaped requests over httpx meet it:

- /v1/models listed a model under its own name only: each alias is now its own card, as vLLM lists every
  `--served-model-name`, their `root` the model's name (vLLM's served names share their model's root);
- Messages requests took unknown fields inside a block, a tool, tool_choice, metadata or thinking and ignored them
  (a misspelt `is_eror` said nothing): a 400 naming the field's path, as Anthropic's "Extra inputs are not
  permitted"; the fields Claude Code and the `anthropic` client send (cache_control, citations, a tool's strict ...)
  are still taken;
- Messages structured outputs (`output_config.format`, the beta's `output_format`) were taken and ignored: the
  reply's text is now held to the schema, as the chat path's response_format holds it;
- a stream whose tool calls had gone out when the whole output turned out not to be calls (a stop sequence inside
  one) ended `end_turn` (Messages; `stop_sequence` here) and `stop` (chat), the calls' blocks and deltas standing:
  it ends `tool_use` and `tool_calls`, what the client holds.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.ports import live_server_on

PORTS = range(25200, 25300)
AH = {"anthropic-version": "2023-06-01", "x-api-key": "x"}


@pytest.fixture(scope="module")
def server(make_varied, tmp_path_factory):
    cfg = {"workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "models": [{"name": "tiny", "path": str(make_varied("qwen2")), "aliases": ["nick", "nick-2"],
                       "tool_call_parser": "hermes", "engine": {"max_num_seqs": 8}}]}
    with live_server_on(PORTS, cfg, tmp_path_factory.mktemp("ux59b")) as srv:
        yield srv


def oai(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)


def test_models_lists_every_alias(server):
    """Each name a model is served under is a card of its own (the OpenAI list and Anthropic's Models API page),
    every one's `root` the model; GET /v1/models/{alias} answers under the alias with that root."""
    c = oai(server)
    cards = c.models.list().data
    assert [(m.id, m.model_extra.get("root"), m.model_extra.get("parent")) for m in cards] == [
        ("tiny", "tiny", None), ("nick", "tiny", None), ("nick-2", "tiny", None)]
    got = c.models.retrieve("nick-2")
    assert got.id == "nick-2" and got.model_extra["root"] == "tiny"
    page = httpx.get(server.url + "/v1/models", headers=AH, timeout=30).json()
    assert [m["id"] for m in page["data"]] == ["tiny", "nick", "nick-2"] and page["has_more"] is False
    r = c.completions.create(model="nick-2", prompt="Hi", max_tokens=1)  # (each listed name serves)
    assert r.model == "nick-2" and r.usage.completion_tokens == 1


TOOL = {"name": "get_weather", "description": "Weather in a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CC = {"type": "ephemeral"}


def messages(srv, body: dict, path: str = "/v1/messages") -> httpx.Response:
    return httpx.post(srv.url + path, json={"model": "tiny", "max_tokens": 2, **body}, headers=AH, timeout=60)


def test_messages_refuse_unknown_nested_fields(server):
    """An unknown field anywhere Anthropic's request has a fixed shape is a 400 invalid_request_error naming its path
    (count_tokens too); a request as Claude Code sends one (cache_control on system, blocks and tools, with its ttl;
    metadata.user_id; thinking disabled; a tool's strict and eager_input_streaming) is still answered."""
    hi = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    asked = [{"role": "user", "content": "Weather?"},
             {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                "input": {"city": "Paris"}}]}]
    bad = [({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi", "colour": 1}]}]},
            "messages.0.content.0.colour"),
           ({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi", "cache_control":
                                                        {"type": "ephemeral", "tll": "5m"}}]}]},
            "messages.0.content.0.cache_control.tll"),
           ({"messages": [*asked[:1], {"role": "assistant", "content": [{**asked[1]["content"][0], "args": {}}]}]},
            "messages.1.content.0.args"),
           ({"messages": [*asked, {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                                                "content": "sunny", "is_eror": True}]}]},
            "messages.2.content.0.is_eror"),
           ({"messages": [*asked, {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                                                "content": [{"type": "text", "text": "sunny",
                                                                             "x": 1}]}]}]},
            "messages.2.content.0.content.0.x"),
           ({"messages": hi, "system": [{"type": "text", "text": "Be brief.", "priority": 1}]}, "system.0.priority"),
           ({"messages": hi, "tools": [{**TOOL, "parameters": {}}]}, "tools.0.parameters"),
           ({"messages": hi, "tools": [TOOL], "tool_choice": {"type": "any", "parallel": False}},
            "tool_choice.parallel"),
           ({"messages": hi, "tools": [TOOL], "tool_choice": {"type": "none", "name": "get_weather"}},
            "tool_choice.name"),
           ({"messages": hi, "metadata": {"user_id": "u", "session": "s"}}, "metadata.session"),
           ({"messages": hi, "thinking": {"type": "disabled", "budget": 0}}, "thinking.budget")]
    for body, field in bad:
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            r = messages(server, body, path)
            assert r.status_code == 400, (field, r.text)
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and err["message"].startswith(field + ":"), (field, err)
    claude_code = {"system": [{"type": "text", "text": "You are Claude Code.", "cache_control": {**CC, "ttl": "1h"}}],
                   "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi", "cache_control": CC,
                                                              "citations": None}]}],
                   "tools": [{**TOOL, "cache_control": CC, "strict": True, "eager_input_streaming": True}],
                   "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
                   "metadata": {"user_id": "user_abc"}, "thinking": {"type": "disabled"}}
    r = messages(server, claude_code)
    assert r.status_code == 200 and r.json()["type"] == "message", r.text
    assert messages(server, claude_code, "/v1/messages/count_tokens").json()["input_tokens"] > 0


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 4}, "n": {"enum": [1, 2, 3]}},
          "required": ["name", "n"], "additionalProperties": False}
FMT = {"type": "json_schema", "schema": SCHEMA}


def _streamed_text(srv, body: dict) -> tuple[str, str]:
    """A streamed Message's text and stop_reason."""
    text, reason = "", None
    with httpx.stream("POST", srv.url + "/v1/messages", json={"model": "tiny", **body, "stream": True}, headers=AH,
                      timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                ev = json.loads(line[6:])
                if ev["type"] == "content_block_delta":
                    text += ev["delta"]["text"]
                elif ev["type"] == "message_delta":
                    reason = ev["delta"]["stop_reason"]
    return text, reason


def test_messages_structured_outputs(server):
    """output_config.format (and the beta's output_format) hold the reply's text to the schema: the chat path's
    response_format reply, token for token, streamed or not; a format of another type, a schema that cannot
    compile, both fields, or the format with a prefill, are 400s naming the field (beside tools the model may
    call, the reply is a call or text of the schema: test_ux60e_structured_tools)."""
    hi = [{"role": "user", "content": "Name a thing."}]
    base = {"messages": hi, "max_tokens": 60, "temperature": 0}
    want = oai(server).chat.completions.create(
        model="tiny", messages=hi, max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}})
    assert set(json.loads(want.choices[0].message.content)) == {"name", "n"}
    for shaped in ({"output_config": {"format": FMT, "effort": "low"}}, {"output_format": FMT}):
        r = messages(server, {**base, **shaped})
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["content"] == [{"type": "text", "text": want.choices[0].message.content}], got
        assert got["stop_reason"] == "end_turn"
        assert _streamed_text(server, {**base, **shaped}) == (want.choices[0].message.content, "end_turn")
    tool = {"tools": [TOOL]}
    for body, field in (({"output_config": {"format": {"type": "json", "schema": SCHEMA}}}, "output_config.format.type"),
                        ({"output_config": {"format": {"type": "json_schema"}}}, "output_config.format.schema"),
                        ({"output_config": {"format": FMT, "verbosity": 1}}, "output_config.verbosity"),
                        ({"output_format": {**FMT, "strict": True}}, "output_format.strict"),
                        ({"output_config": {"format": FMT}, "output_format": FMT}, "output_format"),
                        ({"output_format": {"type": "json_schema", "schema": {"type": "string", "pattern": "("}}},
                         "output_format"),
                        ({"output_format": FMT, "messages": [*hi, {"role": "assistant", "content": "{"}]},
                         "output_format")):
        r = messages(server, {**base, **body})
        assert r.status_code == 400, (field, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["message"].startswith(field + ":"), (field, err)
    # tools the model may not call (tool_choice none) leave the output to the schema
    r = messages(server, {**base, "output_format": FMT, **tool, "tool_choice": {"type": "none"}})
    assert r.status_code == 200 and set(json.loads(r.json()["content"][0]["text"])) == {"name", "n"}, r.text


def test_streams_whose_calls_went_out_end_as_calls(server):
    """A stop sequence inside a call's arguments (`"}` ends the city's string) leaves calls sent that the whole
    output is not: the Messages stream's tool_use block stands and the stop_reason is tool_use (it was
    stop_sequence: the client held a tool_use block of a reply that said it ended in text); the chat stream's finish
    is tool_calls (it was stop), as its deltas are. Unstreamed, the same tool_use block and stop_reason (ux68e: it was
    the grammar's raw text, stop_reason stop_sequence)."""
    short = {**TOOL, "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}},
                                      "required": ["city"]}}
    body = {"messages": [{"role": "user", "content": "Weather?"}], "max_tokens": 60, "temperature": 0,
            "tools": [short], "tool_choice": {"type": "any"}, "stop_sequences": ['"}']}
    events = []
    with httpx.stream("POST", server.url + "/v1/messages", json={"model": "tiny", **body, "stream": True},
                      headers=AH, timeout=60) as r:
        events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: ")]
    kinds = [e["type"] for e in events]
    starts = [e["content_block"] for e in events if e["type"] == "content_block_start"]
    assert [(b["type"], b["name"]) for b in starts] == [("tool_use", "get_weather")], events
    assert kinds.count("content_block_stop") == 1 and kinds[-1] == "message_stop"
    delta = next(e for e in events if e["type"] == "message_delta")["delta"]
    assert delta == {"stop_reason": "tool_use", "stop_sequence": None}, delta
    whole = messages(server, body).json()
    assert [(c["type"], c["name"]) for c in whole["content"]] == [("tool_use", "get_weather")], whole
    assert whole["stop_reason"] == "tool_use", whole
    chunks = list(oai(server).chat.completions.create(
        model="tiny", messages=body["messages"], max_tokens=60, temperature=0, stop=['"}'], stream=True,
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": short["input_schema"]}}],
        tool_choice="required"))
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert calls and calls[0].function.name == "get_weather"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
