"""Structured outputs beside tools the model may call, on one live server (a tiny random-weights model, varied, with
the hermes tool-call parser) as the official `openai` and `anthropic` clients meet it.

Both routes refused the two together: the chat path's `response_format` (json_schema) with `tools` and tool_choice
auto was a 400 ("tools, response_format and structured outputs cannot shape one output together"), and the Messages
API's `output_config.format` (or the beta's `output_format`) with tools that may be called a 400 naming the field,
where vLLM and Anthropic take both: the model either calls a tool or answers with text that follows the schema. The
reply's grammar is now the alternation of the two (the hermes calls of tool_choice auto, or JSON of the schema):
whichever the model takes, it is valid. A forced call (required / any / a named tool) is held to the call alone
(the schema is the final answer's); tool_choice none, to the schema alone. The model's weights are random, so the
grammar is what makes each reply valid: every reply is checked to be a call of a declared tool with arguments valid
under its schema, or text that is JSON valid under the format's schema, and over a handful of prompts both are seen.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import anthropic
import jsonschema
import llguidance
import llguidance.hf
import openai
import pytest
from transformers import AutoTokenizer

from controller.api import protocol as p
from tests.ports import live_server_on

PORTS = range(25800, 25900)

SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 8}, "n": {"enum": [1, 2, 3]}},
          "required": ["answer", "n"], "additionalProperties": False}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}}, "required": ["city"],
           "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 99}},
       "required": ["a", "b"], "additionalProperties": False}
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
OAI_TOOLS = [{"type": "function", "function": {"name": n, "description": n.replace("_", " "), "parameters": s}}
             for n, s in SCHEMAS.items()]
ANT_TOOLS = [{"name": n, "description": n.replace("_", " "), "input_schema": s} for n, s in SCHEMAS.items()]
RF = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
FMT = {"type": "json_schema", "schema": SCHEMA}
PROMPTS = [f"Question {k}: {w}" for k, w in enumerate(
    ["weather in Paris?", "add two numbers", "what is it?", "tell me", "hello", "sum 3 and 4", "rain?", "name one",
     "go", "help", "why?", "list"])]


@pytest.fixture(scope="module")
def server(make_varied, tmp_path_factory):
    cfg = {"workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "models": [{"name": "tiny", "path": str(make_varied("qwen2")), "tool_call_parser": "hermes",
                       "engine": {"max_num_seqs": 8}}]}
    with live_server_on(PORTS, cfg, tmp_path_factory.mktemp("ux60e")) as srv:
        yield srv


def oai(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)


def ac(srv) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=srv.url, api_key="x", max_retries=0, timeout=120)


def _call_ok(name: str, args: dict) -> None:
    assert name in SCHEMAS, name
    jsonschema.validate(args, SCHEMAS[name])


def _oai_outcome(msg, finish: str) -> str:
    """"call" or "text", after checking the chat reply is one valid call or schema-valid JSON text."""
    if msg.tool_calls:
        assert finish == "tool_calls" and not msg.content, (finish, msg)
        assert len(msg.tool_calls) == 1, msg  # (parallel_tool_calls false)
        fn = msg.tool_calls[0].function
        _call_ok(fn.name, json.loads(fn.arguments))
        return "call"
    assert finish == "stop", (finish, msg)
    jsonschema.validate(json.loads(msg.content), SCHEMA)
    return "text"


def _chat(srv, prompt: str, stream: bool, **kw):
    """A chat reply's message and finish reason, streamed (the deltas gathered, read as the client's message is)
    or not."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": 120,
            "temperature": 0, "tools": OAI_TOOLS, "response_format": RF, "parallel_tool_calls": False, **kw}
    if not stream:
        r = oai(srv).chat.completions.create(**body)
        return r.choices[0].message, r.choices[0].finish_reason
    text, calls, finish = "", {}, None
    for c in oai(srv).chat.completions.create(**body, stream=True):
        if not c.choices:
            continue
        d = c.choices[0].delta
        text += d.content or ""
        for tc in d.tool_calls or []:
            got = calls.setdefault(tc.index, {"name": "", "arguments": ""})
            got["name"] += (tc.function.name or "") if tc.function else ""
            got["arguments"] += (tc.function.arguments or "") if tc.function else ""
        finish = c.choices[0].finish_reason or finish
    fns = [SimpleNamespace(function=SimpleNamespace(**v)) for _, v in sorted(calls.items())]
    return SimpleNamespace(content=text or None, tool_calls=fns or None), finish


def test_chat_response_format_beside_auto_tools(server):
    """response_format json_schema with tools (tool_choice auto): a 200 whose reply is a valid call or JSON text of
    the schema, streamed the same as not; over the prompts both outcomes come."""
    seen = set()
    for prompt in PROMPTS:
        msg, finish = _chat(server, prompt, False)
        outcome = _oai_outcome(msg, finish)
        seen.add(outcome)
        smsg, sfinish = _chat(server, prompt, True)
        assert _oai_outcome(smsg, sfinish) == outcome, prompt
        if outcome == "text":
            assert smsg.content == msg.content
        else:
            f, sf = msg.tool_calls[0].function, smsg.tool_calls[0].function
            assert (sf.name, json.loads(sf.arguments)) == (f.name, json.loads(f.arguments))
    assert seen == {"call", "text"}, seen


def test_chat_response_format_with_forced_or_no_tools(server):
    """tool_choice required or a named function holds the reply to the call alone (the schema is the final
    answer's); tool_choice none, to the schema alone."""
    for prompt in PROMPTS[:4]:
        for choice in ("required", {"type": "function", "function": {"name": "add"}}):
            for stream in (False, True):
                msg, finish = _chat(server, prompt, stream, tool_choice=choice)
                assert msg.tool_calls, (choice, msg)
                fn = msg.tool_calls[0].function
                _call_ok(fn.name, json.loads(fn.arguments))
                if choice != "required":
                    assert fn.name == "add" and finish == "stop", (fn.name, finish)
        for stream in (False, True):
            msg, finish = _chat(server, prompt, stream, tool_choice="none")
            assert _oai_outcome(msg, finish) == "text"


def _ant_outcome(m) -> str:
    """"call" or "text", after checking the Message is one valid tool_use block or one text block of the schema."""
    kinds = [b.type for b in m.content]
    if m.stop_reason == "tool_use":
        assert kinds == ["tool_use"], m
        _call_ok(m.content[0].name, m.content[0].input)
        return "call"
    assert m.stop_reason == "end_turn" and kinds == ["text"], m
    jsonschema.validate(json.loads(m.content[0].text), SCHEMA)
    return "text"


def _message(srv, prompt: str, stream: bool, fmt: dict, **kw):
    """A Message (the stream's final one, streamed); output_config as the client takes it, the beta's
    output_format (and temperature, which the client's create() no longer takes) as extra fields."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": 120,
            "tools": ANT_TOOLS, **kw}
    if "output_config" in fmt:
        body.update(output_config=fmt["output_config"], extra_body={"temperature": 0})
    else:
        body["extra_body"] = {"temperature": 0, **fmt}
    if "tool_choice" not in kw:
        body["tool_choice"] = {"type": "auto", "disable_parallel_tool_use": True}
    if not stream:
        return ac(srv).messages.create(**body)
    with ac(srv).messages.stream(**body) as s:
        return s.get_final_message()


@pytest.mark.parametrize("field", ["output_config", "output_format"])
def test_messages_output_format_beside_auto_tools(server, field):
    """output_config.format (or the beta's output_format) with tools the model may call: a 200 whose content is a
    tool_use block of a declared tool, input valid under its input_schema (stop_reason tool_use), or a text block
    of JSON valid under the schema (end_turn), streamed the same as not; over the prompts both come."""
    fmt = {"output_config": {"format": FMT}} if field == "output_config" else {"output_format": FMT}
    seen = set()
    for prompt in PROMPTS:
        m = _message(server, prompt, False, fmt)
        outcome = _ant_outcome(m)
        seen.add(outcome)
        s = _message(server, prompt, True, fmt)
        assert _ant_outcome(s) == outcome, prompt
        if outcome == "text":
            assert s.content[0].text == m.content[0].text
        else:
            assert (s.content[0].name, s.content[0].input) == (m.content[0].name, m.content[0].input)
    assert seen == {"call", "text"}, seen


def test_messages_output_format_with_forced_or_no_tools(server):
    """tool_choice any or tool holds the reply to the call alone; none, to the schema alone."""
    fmt = {"output_config": {"format": FMT}}
    for prompt in PROMPTS[:4]:
        for choice in ({"type": "any", "disable_parallel_tool_use": True}, {"type": "tool", "name": "get_weather"}):
            for stream in (False, True):
                m = _message(server, prompt, stream, fmt, tool_choice=choice)
                assert m.stop_reason == "tool_use" and m.content[0].type == "tool_use", (choice, m)
                _call_ok(m.content[0].name, m.content[0].input)
                if choice["type"] == "tool":
                    assert m.content[0].name == "get_weather"
        for stream in (False, True):
            assert _ant_outcome(_message(server, prompt, stream, fmt, tool_choice={"type": "none"})) == "text"


def test_the_grammar_is_the_calls_or_the_schema(tiny_model):
    """The reply's grammar (tool_choice auto beside a response_format) takes a hermes call of a declared tool or
    JSON of the schema, and neither free text, JSON outside the schema, nor a call of a tool not declared."""
    from controller.api.structured import HERMES_OPEN, response_schema, tool_plan

    tok = AutoTokenizer.from_pretrained(tiny_model)
    lt = llguidance.hf.from_tokenizer(tok, eos_token=tok.eos_token_id)
    tools = [p.Tool.model_validate(t) for t in OAI_TOOLS]
    g = tool_plan(tools, "auto", None, "hermes").answering(response_schema(RF)).grammar

    def accepts(text: str) -> bool:
        m = llguidance.LLMatcher(lt, g, log_level=0)
        return m.consume_tokens(tok.encode(text)) and not m.is_error() and m.is_accepting()

    call = HERMES_OPEN + '{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    assert accepts(call) and accepts('{"answer": "hi", "n": 2}')
    assert not accepts("hello") and not accepts('{"answer": "hi", "n": 7}') and not accepts("")
    assert not accepts(HERMES_OPEN + '{"name": "sub", "arguments": {"a": 1, "b": 2}}\n</tool_call>')
