"""Structured outputs and forced tool calls through the official `openai` client against the real SmolLM2 (helper
ux68e, a user pass over structured outputs, tools and logprobs).

- The logprobs of an output held to a grammar (response_format, tools) were those of the model's distribution
  before the grammar's mask: a token the schema forces (`{"`, the first of any JSON object) came back at -12.6 with
  `top_logprobs` of tokens the grammar could never let it draw (`Bon`, `Je`), so a client reading an enum's
  confidence from them read the wrong numbers. vLLM masks the logits before its sampler takes its (raw) logprobs;
  now so does this server: a forced token's logprob is 0, and the top ones are tokens the grammar allows (fewer
  than asked where fewer are allowed), streamed or not, on chat and legacy completions alike.
- A forced call (tool_choice required or named) that a stop sequence cut was, unstreamed, the grammar's raw text as
  the content (`[{"name": "answer", "parameters": {"answer": "`, finish `stop`, no tool_calls), where the stream of
  the same request sent the call and its arguments so far, finish `tool_calls`: the deltas did not join to the
  reply. Now the reply holds the calls the stream sends (whole ones, and the cut one once its name is whole, its
  arguments what was written), finishing as whole calls do (`tool_calls`; `stop` for a named function); and the
  stream, as the reply, gives a call cut after its name but before its arguments (arguments ""), as for max_tokens.
  The Messages API's the same: tool_choice any/tool and a stop sequence inside the call gave a text block of the
  raw JSON, stop_reason `stop_sequence`, where its stream gave the tool_use block, stop_reason `tool_use`; now the
  reply is the tool_use block (input {}, as a call max_tokens cuts), `tool_use`, as streamed.
- Chat's tool_choice `allowed_tools` (OpenAI's, in the `openai` client's types: every tool declared, only those it
  lists callable, its mode `auto` or `required`) was a 400 "Input should be 'none', 'auto' or 'required'". Now
  taken: the calls are held to the allowed tools (a tool not among the tools, or not a function, a 400 naming the
  entry); `auto` needs the model's call syntax, as plain "auto" does. The Responses API's form (`{"type":
  "allowed_tools", "mode", "tools": [{"type": "function", "name"}]}`) the same, its errors in its own terms.
"""

from __future__ import annotations

import json
import math

import anthropic
import llguidance
import llguidance.hf
import openai
import pytest
from transformers import AutoTokenizer

from tests.ports import live_server_on

PORTS = range(30350, 30400)
SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
          "additionalProperties": False}
RF = {"type": "json_schema", "json_schema": {"name": "reply", "strict": True, "schema": SCHEMA}}
ASK = [{"role": "user", "content": "Is Paris in France? Answer yes or no."}]


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    cfg = {"workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "models": [{"name": "smol", "path": str(smollm2), "engine": {"max_num_seqs": 4}}]}
    with live_server_on(PORTS, cfg, tmp_path_factory.mktemp("ux68e")) as srv:
        yield srv


def oai(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)


def _held(entries) -> None:
    """Each entry's logprobs are of the grammar's tokens: the forced opening `{"` certain, each position's top ones
    a distribution over allowed tokens (their probabilities summing to at most 1)."""
    assert entries[0].token == '{"' and entries[0].logprob == pytest.approx(0, abs=1e-4), entries[0]
    assert [t.token for t in entries[0].top_logprobs] == ['{"'], entries[0].top_logprobs
    for e in entries:
        assert sum(math.exp(t.logprob) for t in e.top_logprobs) <= 1 + 1e-4, e
        assert e.token in [t.token for t in e.top_logprobs], e


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_are_of_the_tokens_the_schema_allows(server, stream):
    kw = dict(model="smol", messages=ASK, response_format=RF, max_tokens=20, temperature=0, logprobs=True,
              top_logprobs=5)
    if not stream:
        ch = oai(server).chat.completions.create(**kw).choices[0]
        text, entries = ch.message.content, ch.logprobs.content
    else:
        text, entries = "", []
        for chunk in oai(server).chat.completions.create(**kw, stream=True):
            for c in chunk.choices:
                text += c.delta.content or ""
                entries += c.logprobs.content if c.logprobs and c.logprobs.content else []
    assert json.loads(text)["answer"] in ("yes", "no"), text
    _held(entries)
    # the enum's value (after ` "`): each alternative begins one of the schema's two words, none is free text
    at = next(i for i, e in enumerate(entries) if e.token in ("yes", "no"))
    assert entries[at - 1].token == ' "', entries
    assert all('yes"}'.startswith(t.token) or 'no"}'.startswith(t.token) for t in entries[at].top_logprobs), \
        entries[at].top_logprobs


def test_a_forced_tool_call_and_completions_logprobs_too(server):
    tools = [{"type": "function", "function": {"name": "answer", "parameters": SCHEMA}}]
    ch = oai(server).chat.completions.create(model="smol", messages=ASK, tools=tools, max_tokens=20, temperature=0,
                                             tool_choice={"type": "function", "function": {"name": "answer"}},
                                             logprobs=True, top_logprobs=3).choices[0]
    assert json.loads(ch.message.tool_calls[0].function.arguments)["answer"] in ("yes", "no")
    _held(ch.logprobs.content)
    r = oai(server).completions.create(model="smol", prompt="Is Paris in France?", max_tokens=20, temperature=0,
                                       logprobs=3, extra_body={"response_format": RF})
    lp = r.choices[0].logprobs
    assert lp.tokens[0] == '{"' and lp.token_logprobs[0] == pytest.approx(0, abs=1e-4), lp
    assert list(lp.top_logprobs[0]) == ['{"'], lp.top_logprobs[0]


def _both(srv, **kw) -> tuple:
    """(unstreamed, streamed): each (finish_reason, content, [(name, arguments)])."""
    ch = oai(srv).chat.completions.create(**kw).choices[0]
    one = (ch.finish_reason, ch.message.content,
           [(t.function.name, t.function.arguments) for t in ch.message.tool_calls or []])
    content, calls, finish = "", {}, None
    for chunk in oai(srv).chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            content += c.delta.content or ""
            for t in c.delta.tool_calls or []:
                got = calls.setdefault(t.index, ["", ""])
                got[0] += t.function.name or ""
                got[1] += t.function.arguments or ""
            finish = c.finish_reason or finish
    return one, (finish, content or None, [tuple(v) for _, v in sorted(calls.items())])


@pytest.mark.parametrize(("choice", "stop", "want"), [
    ("required", "yes", ("tool_calls", None, [("answer", '{"answer": "')])),
    ("required", '"parameters"', ("tool_calls", None, [("answer", "")])),  # (its name whole, no arguments yet)
    ({"type": "function", "function": {"name": "answer"}}, "yes", ("stop", None, [("answer", '{"answer": "')])),
])
def test_a_call_a_stop_sequence_cuts_is_the_same_call_streamed_or_not(server, choice, stop, want):
    tools = [{"type": "function", "function": {"name": "answer", "parameters": SCHEMA}}]
    one, streamed = _both(server, model="smol", messages=ASK, tools=tools, tool_choice=choice, stop=[stop],
                          max_tokens=30, temperature=0)
    assert one == streamed == want, (one, streamed)


@pytest.mark.parametrize("choice", [{"type": "any"}, {"type": "tool", "name": "answer"}])
def test_messages_a_tool_use_a_stop_sequence_cuts_is_the_same_streamed_or_not(server, choice):
    a = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0, timeout=120)
    kw = dict(model="smol", max_tokens=30, messages=ASK, tools=[{"name": "answer", "input_schema": SCHEMA}],
              tool_choice=choice, stop_sequences=["yes"], extra_body={"top_k": 1})
    one = a.messages.create(**kw)
    with a.messages.stream(**kw) as s:
        streamed = s.get_final_message()
    for m in (one, streamed):
        assert m.stop_reason == "tool_use" and m.stop_sequence is None, m
        assert [(b.type, b.name, b.input) for b in m.content] == [("tool_use", "answer", {})], m


WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
           "additionalProperties": False}
TWO = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
       {"type": "function", "function": {"name": "answer", "parameters": SCHEMA}}]


def _allowed(mode: str, *names: str) -> dict:
    return {"type": "allowed_tools",
            "allowed_tools": {"mode": mode, "tools": [{"type": "function", "function": {"name": n}} for n in names]}}


def test_allowed_tools_hold_the_calls_to_those_tools(server):
    c = oai(server)
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    plain = c.chat.completions.create(model="smol", messages=ask, tools=TWO, tool_choice="required", max_tokens=40,
                                      temperature=0)
    assert plain.choices[0].message.tool_calls[0].function.name == "get_weather"  # (greedy: the weather tool)
    for stream in (False, True):
        r = c.chat.completions.create(model="smol", messages=ask, tools=TWO, tool_choice=_allowed("required", "answer"),
                                      max_tokens=40, temperature=0, stream=stream)
        if stream:
            names = [t.function.name for ch in r for c_ in ch.choices for t in c_.delta.tool_calls or []
                     if t.function and t.function.name]
        else:
            assert r.choices[0].finish_reason == "tool_calls", r
            names = [t.function.name for t in r.choices[0].message.tool_calls]
            assert json.loads(r.choices[0].message.tool_calls[0].function.arguments)["answer"] in ("yes", "no")
            assert r.usage.prompt_tokens == plain.usage.prompt_tokens  # (every tool still declared)
        assert names and set(names) == {"answer"}, names
    for choice, param in [(_allowed("required", "nope"), "tool_choice.allowed_tools.tools.0"),
                          ({"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
                              {"type": "custom", "custom": {"name": "answer"}}]}}, "tool_choice.allowed_tools.tools.0"),
                          (_allowed("auto", "answer"), "tool_choice")]:  # (auto: no call syntax configured)
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="smol", messages=ask, tools=TWO, tool_choice=choice, max_tokens=5)
        assert e.value.body["param"] == param, e.value.body


def test_allowed_tools_auto_grammar_takes_text_or_calls_of_those_tools(smollm2):
    """("auto" needs a model that writes hermes calls: its grammar, over SmolLM2's vocabulary) text, or a call of
    an allowed tool, never a call of another."""
    from controller.api import protocol as p
    from controller.api.structured import HERMES_CLOSE, HERMES_OPEN, tool_plan

    tok = AutoTokenizer.from_pretrained(smollm2)
    lt = llguidance.hf.from_tokenizer(tok, eos_token=tok.eos_token_id)
    choice = p.AllowedToolChoice.model_validate(_allowed("auto", "answer"))
    g = tool_plan([p.Tool.model_validate(t) for t in TWO], choice, None, "hermes").grammar

    def accepts(text: str) -> bool:
        m = llguidance.LLMatcher(lt, g, log_level=0)
        return m.consume_tokens(tok.encode(text)) and not m.is_error() and m.is_accepting()

    assert accepts("Sunny.") and accepts(HERMES_OPEN + '{"name": "answer", "arguments": {"answer": "no"}}' + HERMES_CLOSE)
    assert not accepts(HERMES_OPEN + '{"name": "get_weather", "arguments": {"city": "Paris"}}' + HERMES_CLOSE)


def test_responses_allowed_tools(server):
    c = oai(server)
    tools = [{"type": "function", "name": t["function"]["name"], "parameters": t["function"]["parameters"]}
             for t in TWO]
    allowed = {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "answer"}]}
    r = c.responses.create(model="smol", input="What is the weather in Paris?", tools=tools, tool_choice=allowed,
                           max_output_tokens=40, temperature=0)
    assert [(o.type, o.name) for o in r.output] == [("function_call", "answer")], r.output
    assert r.tool_choice.type == "allowed_tools", r.tool_choice  # (echoed as sent)
    for choice, param in [({**allowed, "tools": [{"type": "function", "name": "nope"}]}, "tool_choice.tools[0]"),
                          ({**allowed, "tools": [{"type": "function", "name": "answer", "x": 1}]},
                           "tool_choice.tools[0].x")]:
        with pytest.raises(openai.BadRequestError) as e:
            c.responses.create(model="smol", input="hi", tools=tools, tool_choice=choice, max_output_tokens=5)
        assert e.value.body["param"] == param, e.value.body
