"""The grammars response_format and tools make (controller/api/structured.py), run by llguidance over a real
tokenizer: what they accept and refuse, and the tool calls read back from an output."""

from __future__ import annotations

import json
from types import SimpleNamespace

import llguidance
import llguidance.hf
import pytest
from transformers import AutoTokenizer

from controller.api import protocol as p
from controller.api.structured import response_grammar, tool_plan
from controller.errors import ServingError


@pytest.fixture(scope="module")
def accepts(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    lt = llguidance.hf.from_tokenizer(tok, eos_token=tok.eos_token_id)

    def f(grammar: str, text: str) -> bool:
        """Whether `text`, token by token, is a whole string of the grammar."""
        m = llguidance.LLMatcher(lt, grammar, log_level=0)
        return m.consume_tokens(tok.encode(text)) and not m.is_error() and m.is_accepting()

    return f


def _tools(*defs):
    return [p.Tool.model_validate({"type": "function", "function": d}) for d in defs]


def test_response_format_grammars(accepts):
    obj = response_grammar({"type": "json_object"})
    assert accepts(obj, '{"a": [1, 2], "b": {"c": null}}') and not accepts(obj, "[1, 2]")
    assert not accepts(obj, '{"a":1}')  # the layout is fixed: Python's separators, no free whitespace
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 9}}, "required": ["n"],
              "additionalProperties": False}
    g = response_grammar({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert accepts(g, '{"n": 7}') and not accepts(g, '{"n": 17}') and not accepts(g, '{"n": 7, "m": 1}')
    assert response_grammar(None) is None and response_grammar({"type": "text"}) is None


def test_tool_grammars_and_calls(accepts):
    tools = _tools({"name": "add", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}},
                                                  "required": ["x"], "additionalProperties": False}},
                   {"name": "noop"})
    two = '[{"name": "add", "parameters": {"x": 1}}, {"name": "noop", "parameters": {}}]'
    plan = tool_plan(tools, "required", None)
    assert accepts(plan.grammar, two) and not accepts(plan.grammar, "[]")
    assert not accepts(plan.grammar, '[{"name": "sub", "parameters": {"x": 1}}]')
    one = tool_plan(tools, "required", False)
    assert not accepts(one.grammar, two) and accepts(one.grammar, '[{"name": "noop", "parameters": {}}]')
    calls = plan.calls(two)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [("add", {"x": 1}),
                                                                                                ("noop", {})]
    assert len({c["id"] for c in calls}) == 2 and plan.calls('[{"name": "add", "param') is None
    named = tool_plan(tools, p.NamedToolChoice.model_validate({"type": "function", "function": {"name": "add"}}),
                      None)
    assert accepts(named.grammar, '{"x": 5}') and not accepts(named.grammar, two)
    assert named.calls('{"x": 5}')[0]["function"] == {"name": "add", "arguments": '{"x": 5}'}
    assert tool_plan(tools, "none", None) is None and tool_plan(None, None, None) is None
    with pytest.raises(ServingError, match="tool_choice 'auto'"):
        tool_plan(tools, None, None)


def test_history_messages_reach_the_template_as_templates_take_them():
    """An assistant's tool calls go to the chat template with their arguments as objects (templates write them with
    tojson), a tool message with its call id, a participant with its name."""
    from controller.api.serving import OpenAIServing

    msgs = [p.ChatMessage.model_validate(m) for m in (
        {"role": "user", "content": "hi", "name": "bob"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"x": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "2"})]
    got = [OpenAIServing._template_message(m) for m in msgs]
    assert got == [{"role": "user", "content": "hi", "name": "bob"},
                   {"role": "assistant", "content": "", "tool_calls": [
                       {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": {"x": 1}}}]},
                   {"role": "tool", "content": "2", "tool_call_id": "call_1"}]


class _Req:
    """The structured-output fields of a request, as protocol._Sampling carries them."""

    def __init__(self, **kw):
        self.structured_outputs = kw.pop("structured_outputs", None)
        for k in ("json", "regex", "choice", "grammar"):
            setattr(self, f"guided_{k}", kw.pop(f"guided_{k}", None))
        assert not kw


def test_vllm_structured_outputs(accepts):
    from controller.api.structured import vllm_grammar

    choice = vllm_grammar(_Req(guided_choice=["yes", "no", 'a "quoted" one']))
    assert accepts(choice, "yes") and accepts(choice, 'a "quoted" one') and not accepts(choice, "maybe")
    assert vllm_grammar(_Req(structured_outputs={"choice": ["yes", "no"]})) is not None
    regex = vllm_grammar(_Req(structured_outputs={"regex": "[0-9]{3}-[a-z]+"}))
    assert accepts(regex, "123-abc") and not accepts(regex, "12-abc")
    lark = vllm_grammar(_Req(guided_grammar='start: "(" NUM ")"\nNUM: /[0-9]+/'))
    assert accepts(lark, "(42)") and not accepts(lark, "42")
    js = vllm_grammar(_Req(guided_json='{"type": "array", "items": {"type": "integer"}, "maxItems": 2}'))
    assert accepts(js, "[1, 2]") and not accepts(js, "[1, 2, 3]")
    assert accepts(vllm_grammar(_Req(structured_outputs={"json_object": True})), '{"a": 1}')
    assert vllm_grammar(_Req()) is None and vllm_grammar(_Req(structured_outputs={"json_object": False})) is None
    for req, param, words in ((_Req(guided_regex="[0-9", guided_choice=["a"]), "guided_regex", "one structured output"),
                              (_Req(guided_regex="[0-9"), "guided_regex", "unclosed character class"),
                              (_Req(structured_outputs={"choice": []}), "structured_outputs.choice", "non-empty"),
                              (_Req(guided_json="{oops"), "guided_json", "not a JSON schema"),
                              (_Req(structured_outputs={"json": {"type": "nonsense"}}), "structured_outputs.json",
                               "cannot be used")):
        with pytest.raises(ServingError) as ei:
            vllm_grammar(req)
        assert ei.value.param == param and words in str(ei.value), (param, str(ei.value))


def test_hermes_auto_grammar_and_calls(accepts):
    """tool_choice "auto" for a model that writes hermes calls (ModelSpec.tool_call_parser): the output is text that
    does not begin as a call does, or <tool_call> blocks of {"name", "arguments"} held to the tools' schemas (one with
    parallel_tool_calls false); the calls read back; without a parser "auto" is a 400."""
    from controller.api.structured import HERMES_CLOSE, HERMES_OPEN

    tools = _tools({"name": "add", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}},
                                                  "required": ["x"], "additionalProperties": False}})
    plan = tool_plan(tools, "auto", None, "hermes")
    call = HERMES_OPEN + '{"name": "add", "arguments": {"x": 1}}' + HERMES_CLOSE
    for text, ok in (("Hello there", True), ("<b>bold</b>", True), ("", True), (call, True), (call + "\n" + call, True),
                     (HERMES_OPEN + '{"name": "sub", "arguments": {"x": 1}}' + HERMES_CLOSE, False),
                     (HERMES_OPEN + "not json", False)):
        assert accepts(plan.grammar, text) == ok, text
    assert not accepts(tool_plan(tools, "auto", False, "hermes").grammar, call + "\n" + call)
    calls = plan.calls(call + "\n" + call.replace('"x": 1', '"x": 2'))
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"x": 1}, {"x": 2}]
    assert plan.calls("Hello there") is None and plan.calls(HERMES_OPEN + '{"name": "add", "argu') is None
    assert [plan.opening(s) for s in ("<too", HERMES_OPEN, "Hello", "<b")] == [None, True, False, False]
    with pytest.raises(ServingError, match="tool_choice 'auto'"):
        tool_plan(tools, "auto", None, None)


def _stream_frames(deltas, tools, role=False):
    """What the chat stream writes for a choice whose engine deltas are `deltas` (the serving layer's own code over
    a scripted generation), past the role's first delta (`role`: with it)."""
    import asyncio

    from tests.scripted_gen import bare_serving, generation

    gen, serving = generation(deltas), bare_serving()
    req = p.ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                  "stream": True})

    async def run():
        return b"".join([b async for b in serving._stream_chat(gen, req, "id", SimpleNamespace(tokenizer=None), tools)])

    chunks = [json.loads(x[6:]) for x in asyncio.run(run()).decode().split("\n\n") if x.startswith("data: {")]
    return [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in chunks][0 if role else 1:]


def test_auto_tool_stream_holds_a_call_and_streams_text():
    from controller.api.structured import HERMES_CLOSE, HERMES_OPEN

    plan = tool_plan(_tools({"name": "add"}), "auto", None, "hermes")
    call = HERMES_OPEN + '{"name": "add", "arguments": {}}' + HERMES_CLOSE
    frames = _stream_frames([(call[:4], False), (call[4:], True)], plan)  # "<too" held, then the call: one delta
    assert [f[1] for f in frames] == [None, "tool_calls"] and frames[0][0]["tool_calls"][0]["function"] == {
        "name": "add", "arguments": "{}"}
    frames = _stream_frames([("<b", False), (">hi", False), ("!", True)], plan)  # text: as it comes, once known
    assert frames == [({"content": "<b"}, None), ({"content": ">hi"}, None), ({"content": "!"}, None), ({}, "stop")]
    assert _stream_frames([("<too", True)], plan) == [({"content": "<too"}, None), ({}, "stop")]  # ended undecided


def test_streamed_choice_opens_with_null_content_when_it_is_calls():
    """The role's delta says `content: null` for tool calls and `content: ""` for text, as OpenAI's streams do; with
    "auto" it goes out once the output shows which (before the call is whole; with the text's first delta)."""
    from controller.api.structured import HERMES_CLOSE, HERMES_OPEN

    auto = tool_plan(_tools({"name": "add"}), "auto", None, "hermes")
    call = HERMES_OPEN + '{"name": "add", "arguments": {}}' + HERMES_CLOSE
    frames = _stream_frames([(call[:4], False), (call[4:20], False), (call[20:], True)], auto, role=True)
    assert [f[0].get("content", "-") for f in frames] == [None, "-", "-"] and frames[0][0]["role"] == "assistant"
    assert frames[1][0]["tool_calls"][0]["function"]["name"] == "add"
    frames = _stream_frames([("<b", False), ("!", True)], auto, role=True)
    assert frames[:2] == [({"role": "assistant", "content": ""}, None), ({"content": "<b"}, None)]
    required = tool_plan(_tools({"name": "add"}), "required", None)
    frames = _stream_frames([('[{"name": "add", ', False), ('"parameters": {}}]', True)], required, role=True)
    assert frames[0] == ({"role": "assistant", "content": None}, None) and frames[1][0]["tool_calls"]
    assert "content" not in frames[1][0] and frames[2] == ({}, "tool_calls")


def _official_client_errors(model_path, requests):
    """Each request (the official `openai` client's chat.completions.create keywords) sent to the app as `tokenpool
    serve` builds it, in process (no engine runs: a request that passes every check is a 503 "no engine"): the
    (status, error param) each one gets."""
    import asyncio

    import httpx
    import openai

    from controller.app import build_app
    from controller.config import ModelSpec, ServerConfig

    async def go():
        app = build_app(ServerConfig.model_validate({"auth": False}))
        await app.state.controller.add_model(ModelSpec.model_validate({"name": "tiny", "path": str(model_path)}))
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                 base_url="http://test")
        client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="x", http_client=http, max_retries=0)
        out = []
        try:
            for kw in requests:
                try:
                    await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                         max_tokens=8, **kw)
                    out.append((200, None))
                except openai.APIStatusError as e:
                    out.append((e.status_code, (e.body or {}).get("param") if isinstance(e.body, dict) else None))
        finally:
            await http.aclose()
            getattr(app.state.serving, "close", lambda: None)()
        return out

    return asyncio.run(go())


def _nested_tool():
    """A tool as `openai.pydantic_function_tool` writes one for a model with a nested model: `$defs` and `$ref`."""
    from typing import Literal

    import openai
    from pydantic import BaseModel

    class Place(BaseModel):
        city: Literal["Paris", "Rome"]

    class GetWeather(BaseModel):
        where: Place
        also: list[Place]

    return openai.pydantic_function_tool(GetWeather)


def test_tools_with_refs_are_held_whatever_the_tool_choice(accepts, tiny_model):
    """A tool whose parameters have `$defs`/`$ref` (pydantic's nested models) works with tool_choice "required" and
    hermes "auto" as with a named choice: the references resolve within the calls' grammar (they were a 400, "Pointer
    '/$defs/Place' does not exist"), and the nested arguments are held to their schema."""
    tool = _nested_tool()
    assert "$defs" in tool["function"]["parameters"]
    named = {"type": "function", "function": {"name": "GetWeather"}}
    got = _official_client_errors(tiny_model, [{"tools": [tool], "tool_choice": c} for c in ("required", named)])
    assert got == [(503, None), (503, None)], got  # past every check (then no engine in this test)

    tools = _tools(tool["function"], {"name": "noop"})
    good, bad = '{"where": {"city": "Rome"}, "also": []}', '{"where": {"city": "Oslo"}, "also": []}'
    req = tool_plan(tools, "required", None)
    assert accepts(req.grammar, f'[{{"name": "GetWeather", "parameters": {good}}}]')
    assert not accepts(req.grammar, f'[{{"name": "GetWeather", "parameters": {bad}}}]')
    assert not accepts(req.grammar, '[{"name": "GetWeather", "parameters": {"where": {"city": "Rome"}}}]')
    auto = tool_plan(tools, "auto", None, "hermes")
    call = '<tool_call>\n{"name": "GetWeather", "arguments": %s}\n</tool_call>'
    assert accepts(auto.grammar, call % good) and not accepts(auto.grammar, call % bad)


def test_tool_parameters_must_describe_an_object(accepts, tiny_model):
    """A function's arguments are a JSON object (OpenAI refuses other parameters schemas): `parameters` of another
    type is a 400 naming it (it was accepted, and the calls' arguments came back as JSON strings, which the client's
    parsers cannot use as keyword arguments); a schema naming no type is held to objects."""
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}
    ok = {"type": "function", "function": {"name": "g", "parameters": {"type": "object"}}}
    got = _official_client_errors(tiny_model, [{"tools": [ok, bad], "tool_choice": "required"},
                                               {"tools": [bad], "tool_choice": {"type": "function",
                                                                                "function": {"name": "f"}}}])
    assert got == [(400, "tools.1.function.parameters"), (400, "tools.0.function.parameters")], got
    untyped = _tools({"name": "f", "parameters": {"properties": {"x": {"type": "integer"}}}})
    g = tool_plan(untyped, p.NamedToolChoice.model_validate({"type": "function", "function": {"name": "f"}}),
                  None).grammar
    assert accepts(g, '{"x": 1}') and not accepts(g, '"text"') and not accepts(g, "[1]")


def test_structured_outputs_it_cannot_hold_are_refused(tiny_model):
    """vLLM's structured_outputs with a shape this server does not hold to (structural_tag), or a misspelt key, is a
    400 naming it: the output was free text, as if nothing had been asked. vLLM's options beside a shape pass."""
    got = _official_client_errors(tiny_model, [
        {"extra_body": {"structured_outputs": {"structural_tag": '{"type": "structural_tag"}'}}},
        {"extra_body": {"structured_outputs": {"jsonschema": {"type": "object"}}}},
        {"extra_body": {"structured_outputs": {"regex": "[0-9]+", "disable_any_whitespace": True,
                                               "disable_fallback": True}}}])
    assert got == [(400, "structured_outputs.structural_tag"), (400, "structured_outputs.jsonschema"),
                   (503, None)], got


def test_one_of_is_held_as_any_of(accepts):
    """`oneOf` (pydantic's discriminated unions, tool parameters written by hand) is generated as `anyOf`, as vLLM's
    backends do: branches llguidance cannot prove disjoint were a 400 ("oneOf constraints are not supported") on
    response_format, structured outputs and tools alike."""
    from controller.api.structured import vllm_grammar

    one_of = {"type": "object", "properties": {"id": {"oneOf": [{"type": "string", "pattern": "^[a-z]{1,8}$"},
                                                                {"type": "integer", "minimum": 1}]},
                                               "n": {"oneOf": [{"type": "integer", "maximum": 0},
                                                               {"type": "integer", "minimum": 10}]}},
              "required": ["id", "n"], "additionalProperties": False}
    g = response_grammar({"type": "json_schema", "json_schema": {"name": "u", "schema": one_of}})
    assert accepts(g, '{"id": "abc", "n": -3}') and accepts(g, '{"id": 7, "n": 12}')
    assert not accepts(g, '{"id": "ABC", "n": 0}') and not accepts(g, '{"id": "a", "n": 5}')
    req = p.ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                  "structured_outputs": {"json": one_of}})
    assert accepts(vllm_grammar(req), '{"id": "z", "n": 0}')
    plan = tool_plan(_tools({"name": "f", "parameters": one_of}), "required", None)
    assert accepts(plan.grammar, '[{"name": "f", "parameters": {"id": 2, "n": 10}}]')
    auto = tool_plan(_tools({"name": "f", "parameters": one_of}), "auto", None, "hermes")
    assert accepts(auto.grammar, '<tool_call>\n{"name": "f", "arguments": {"id": "q", "n": 99}}\n</tool_call>')


def test_gbnf_grammars_as_vllm_takes_them(accepts):
    """vLLM's grammar shapes (guided_grammar, structured_outputs.grammar) take GBNF/EBNF (`root ::= ...`, as vLLM's
    own examples write them) besides Lark: GBNF was a 400 ("Expected token '_'")."""
    from controller.api.structured import vllm_grammar

    sql = ('root ::= select_statement\n'
           'select_statement ::= "SELECT " column " from " table " where " condition\n'
           'column ::= "col_1 " | "col_2 "\ntable ::= "table_1 " | "table_2 "\n'
           'condition ::= column "= " number\nnumber ::= "1 " | "2 "\n')

    def req(**kw):
        return p.CompletionRequest.model_validate({"model": "m", "prompt": "x", **kw})

    for r in (req(guided_grammar=sql), req(structured_outputs={"grammar": sql})):
        g = vllm_grammar(r)
        assert accepts(g, "SELECT col_1  from table_2  where col_2 = 1 ")
        assert not accepts(g, "SELECT col_3  from table_2  where col_2 = 1 ")
    lark = vllm_grammar(req(guided_grammar='start: "yes" | "no"'))
    assert accepts(lark, "yes") and not accepts(lark, "maybe")
    for bad in ('root ::= "yes" (', "root ::= undefined"):
        with pytest.raises(ServingError) as ei:
            vllm_grammar(req(guided_grammar=bad))
        assert ei.value.status == 400 and ei.value.param == "guided_grammar", bad


def test_disable_additional_properties_closes_the_objects(accepts):
    """vLLM's structured_outputs option disable_additional_properties (its guidance backend's): every object schema
    that does not say otherwise takes no other properties (it was a 400, an unknown key); off, they are allowed."""
    from controller.api.structured import vllm_grammar

    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "in": {
        "type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}, "free": {
        "type": "object", "additionalProperties": True}}, "required": ["a", "in", "free"]}

    def g(**so):
        return vllm_grammar(p.CompletionRequest.model_validate({"model": "m", "prompt": "x",
                                                                "structured_outputs": {"json": schema, **so}}))

    closed, open_ = g(disable_additional_properties=True), g(disable_additional_properties=False)
    plain = '{"a": 1, "in": {"b": 2}, "free": {"z": 3}}'
    assert accepts(closed, plain) and accepts(open_, plain)
    for extra in ('{"a": 1, "in": {"b": 2}, "free": {}, "c": 3}', '{"a": 1, "in": {"b": 2, "c": 3}, "free": {}}'):
        assert not accepts(closed, extra) and accepts(open_, extra), extra
