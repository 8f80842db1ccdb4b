"""The grammars response_format and tools make (controller/api/structured.py), run by llguidance over a real
tokenizer: what they accept and refuse, and the tool calls read back from an output."""

from __future__ import annotations

import json

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
