"""Request validation and output gaps of the OpenAI and Anthropic routes, found by review (helper ux62c), each
through the official client where users meet it, on one live server of the real SmolLM2 (greedy):

- a conversation whose tool calls were never answered was taken: the Messages API's assistant `tool_use` with no
  `tool_result` of its id in the next user message (Anthropic: 400 "messages.N: `tool_use` ids were found without
  `tool_result` blocks immediately after: ..."), Responses' `function_call` with no `function_call_output` of its
  call_id (OpenAI: 400 "No tool output found for function call ..."), and chat completions' assistant tool_calls
  not followed by a tool message of each id (OpenAI: 400 "An assistant message with 'tool_calls' must be followed by
  tool messages responding to each 'tool_call_id'...", which vLLM takes unsaid). Valid conversations still go:
  parallel calls answered in any order, an earlier turn's answered calls, a chain of previous_response_id, a chat
  whose last message is the assistant's calls (continue_final_message);
- the Messages API took `top_k: -1` (the chat path's "off"); Anthropic's range is top_k >= 0: a 400 in its error
  shape, 0 still taken;
- an unstreamed Response's output_text logprobs ended with the end token `<|im_end|>`'s, which the streamed deltas
  never carried: now the output text's tokens alone, streamed or not;
- /tokenize with both or neither of prompt and messages answered a 400 whose `param` was null: it names messages;
- a model whose template thinks (Qwen3's: `qthink`, test_ux61i_agents' SmolLM2 under such a template, shown turns
  that think then call) with tools and a response_format of type "text" (which shapes nothing; clients send it for
  plain text) on chat completions, or text.format "text" on Responses: the calls after the think block were text
  (content `<think>...</think> <tool_call>...`, finish_reason stop; an output_text of the same), as where a
  response_format of a schema holds the output from its first token. Now read as where none is sent (485d3e5's
  chat reading, 72e93e0's Responses reasoning item); a schema's response_format still gives the calls alone.
"""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pytest

from tests import smol_qthink
from tests.test_ux61i_agents import ASK, PARAMS, THOUGHT
from tests.test_ux61k_chat_think_calls import _chat
from tests.ux66c_at_once import at_once

PORTS = range(27400, 27500)
server, oai, claude = smol_qthink.server, smol_qthink.oai, smol_qthink.claude  # (the fixtures: on PORTS)
TOOL = {"name": "get_weather", "description": "the forecast", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
FN = {"type": "function", "name": "get_weather", "parameters": TOOL["input_schema"]}
CHAT_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": TOOL["input_schema"]}}


def _use(i: str, city: str = "Paris") -> dict:
    return {"type": "tool_use", "id": i, "name": "get_weather", "input": {"city": city}}


def _result(i: str) -> dict:
    return {"type": "tool_result", "tool_use_id": i, "content": "sunny"}


def test_messages_tool_use_without_its_tool_result_is_a_400(claude):
    ask = {"role": "user", "content": "Weather in Paris and Rome?"}
    calls = {"role": "assistant", "content": [{"type": "text", "text": "Checking."}, _use("toolu_a"),
                                              _use("toolu_b", "Rome")]}
    for then in ({"role": "user", "content": "and?"},  # (no result at all)
                 {"role": "user", "content": [_result("toolu_b"), {"type": "text", "text": "and?"}]}):  # (one of two)
        for stream in (False, True):
            with pytest.raises(anthropic.BadRequestError) as e:
                claude.messages.create(model="smol", max_tokens=4, tools=[TOOL], messages=[ask, calls, then],
                                       stream=stream)
            err = e.value.body["error"]
            assert e.value.body["type"] == "error" and err["type"] == "invalid_request_error", e.value.body
            missing = "toolu_a, toolu_b" if isinstance(then["content"], str) else "toolu_a"
            assert err["message"] == (f"messages.1: `tool_use` ids were found without `tool_result` blocks "
                                      f"immediately after: {missing}. Each `tool_use` block must have a corresponding "
                                      "`tool_result` block in the next message."), err
    # valid ones still go: both answered in either order (text beside them), then a later turn after that one
    def answered(results: list[dict]):
        return claude.messages.create(model="smol", max_tokens=2, tools=[TOOL], extra_body={"temperature": 0},
                                      messages=[ask, calls, {"role": "user", "content": results},
                                                {"role": "assistant", "content": "Sunny both."},
                                                {"role": "user", "content": "Thanks"}])

    for r in at_once(lambda: answered([_result("toolu_b"), _result("toolu_a")]),
                     lambda: answered([_result("toolu_a"), {"type": "text", "text": "ok"}, _result("toolu_b")])):
        assert r.type == "message" and r.usage.output_tokens >= 1
    n = claude.messages.count_tokens(model="smol", tools=[TOOL], messages=[ask, calls, {
        "role": "user", "content": [_result("toolu_a"), _result("toolu_b")]}])
    assert n.input_tokens > 0
    with pytest.raises(anthropic.BadRequestError):  # (count_tokens reads the conversation as /v1/messages does)
        claude.messages.count_tokens(model="smol", tools=[TOOL], messages=[ask, calls, {"role": "user",
                                                                                        "content": "and?"}])


def test_responses_function_call_without_its_output_is_a_400(oai):
    call = {"type": "function_call", "call_id": "call_a", "name": "get_weather", "arguments": '{"city": "Paris"}'}
    call_b = {**call, "call_id": "call_b", "arguments": '{"city": "Rome"}'}
    ask = {"role": "user", "content": "Weather in Paris and Rome?"}
    out_b = {"type": "function_call_output", "call_id": "call_b", "output": "sunny"}
    for stream in (False, True):
        for inp in ([ask, call], [ask, call, call_b, out_b]):
            with pytest.raises(openai.BadRequestError) as e:
                oai.responses.create(model="smol", input=inp, tools=[FN], max_output_tokens=2, stream=stream)
            err = e.value.body
            assert "no tool output found for function call 'call_a'" in err["message"], err
            assert err["param"] == "input[1].call_id", err
    # answered in any order (parallel calls, then their outputs) goes
    # (and a previous response's calls are the next input's to answer: forced here, so there is one to answer)
    r, first = at_once(
        lambda: oai.responses.create(model="smol", input=[ask, call_b, call, {**out_b, "call_id": "call_a"}, out_b],
                                     tools=[FN], max_output_tokens=2, temperature=0),
        lambda: oai.responses.create(model="smol", input="Weather in Paris?", tools=[FN], tool_choice="required",
                                     max_output_tokens=40, temperature=0))
    assert r.status in ("completed", "incomplete") and r.usage.output_tokens >= 1
    made = [o for o in first.output if o.type == "function_call"]
    assert made, first.output
    with pytest.raises(openai.BadRequestError) as e:
        oai.responses.create(model="smol", previous_response_id=first.id, input="and?", tools=[FN],
                             max_output_tokens=2)
    assert made[0].call_id in e.value.body["message"] and e.value.body["param"] == "input", e.value.body
    after = oai.responses.create(model="smol", previous_response_id=first.id, tools=[FN], max_output_tokens=2,
                                 input=[{"type": "function_call_output", "call_id": c.call_id, "output": "sunny"}
                                        for c in made])
    assert after.status in ("completed", "incomplete")
    # ... and once answered, a later turn of the chain goes on
    later = oai.responses.create(model="smol", previous_response_id=after.id, input="Thanks", max_output_tokens=2)
    assert later.status in ("completed", "incomplete")


def test_chat_tool_calls_without_their_tool_messages_are_a_400(oai):
    def calls(*ids: str) -> dict:
        return {"role": "assistant", "content": None, "tool_calls": [
            {"id": i, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
            for i in ids]}

    def tool(i: str) -> dict:
        return {"role": "tool", "tool_call_id": i, "content": "sunny"}

    ask, more = {"role": "user", "content": "Weather in Paris?"}, {"role": "user", "content": "and?"}
    for msgs, missing in (([ask, calls("call_a"), more], "call_a"),
                          ([ask, calls("call_a", "call_b"), tool("call_b"), more], "call_a"),
                          ([ask, calls("call_a", "call_b"), tool("call_a")], "call_b")):
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as e:
                oai.chat.completions.create(model="smol", messages=msgs, tools=[CHAT_TOOL], max_tokens=2,
                                            stream=stream)
            assert e.value.body["message"] == (
                "An assistant message with 'tool_calls' must be followed by tool messages responding to each "
                f"'tool_call_id'. The following tool_call_ids did not have response messages: {missing}"), e.value.body
            assert e.value.body["param"] == "messages.1.tool_calls", e.value.body
    valid = ([ask, calls("call_a", "call_b"), tool("call_b"), tool("call_a"), more],  # (any order)
             [ask, calls("call_a"), tool("call_a"), {"role": "assistant", "content": "Sunny."}, more],
             [ask, calls("call_a")])  # (the conversation ends with the calls: the reply goes on from them)
    for r in at_once(*(lambda m=m: oai.chat.completions.create(model="smol", messages=m, tools=[CHAT_TOOL], max_tokens=2,
                                                               temperature=0) for m in valid)):
        assert r.choices[0].finish_reason in ("stop", "length", "tool_calls"), r


def test_messages_top_k_below_zero_is_a_400(claude):
    for stream in (False, True):
        with pytest.raises(anthropic.BadRequestError) as e:
            # (extra_body: the client of today sends no top_k of its own, deprecated; older ones, and raw
            # clients, do)
            claude.messages.create(model="smol", max_tokens=2, extra_body={"top_k": -1}, stream=stream,
                                   messages=[{"role": "user", "content": "Hi"}])
        body = e.value.body
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
        assert body["error"]["message"].startswith("top_k:"), body
    r = claude.messages.create(model="smol", max_tokens=2, extra_body={"top_k": 0},
                               messages=[{"role": "user", "content": "Hi"}])
    assert r.usage.output_tokens >= 1


def test_responses_output_text_logprobs_leave_out_the_end_token(oai):
    hi = {"role": "user", "content": "Say hi"}  # (after one turn of it, greedy: "Hey!" and the end token)
    kw = {"model": "smol", "input": [hi, {"role": "assistant", "content": "Hi!"}, hi], "max_output_tokens": 40,
          "temperature": 0, "top_logprobs": 1, "include": ["message.output_text.logprobs"]}
    r, events = at_once(lambda: oai.responses.create(**kw), lambda: list(oai.responses.create(stream=True, **kw)))
    assert r.status == "completed", r  # (the reply ended on its own: its end token was generated)
    got = [lp.token for lp in r.output[0].content[0].logprobs]
    assert "<|im_end|>" not in got and "".join(got) == r.output_text, got
    assert len(got) == r.usage.output_tokens - 1  # (every token but the end's)
    streamed = [lp.token for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    done = next(e for e in events if e.type == "response.output_text.done")
    assert streamed == got and [lp.token for lp in done.logprobs] == got
    assert [lp.token for lp in events[-1].response.output[0].content[0].logprobs] == got


def test_tokenize_with_both_or_neither_input_names_the_param(server):
    msgs = [{"role": "user", "content": "Hi"}]
    for body, said in (({"model": "smol"}, "messages: send either prompt or messages"),
                       ({"model": "smol", "prompt": "x", "messages": msgs},
                        "messages: send either prompt or messages, not both")):
        r = httpx.post(server.url + "/tokenize", json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
        assert r.json()["error"]["message"] == said, r.text
    for body in ({"model": "smol", "prompt": "x"}, {"model": "smol", "messages": msgs}):
        assert httpx.post(server.url + "/tokenize", json=body, timeout=30).status_code == 200


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": PARAMS}}]
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
TEXT_FORMAT = {"model": "qthink", "input": ASK, "temperature": 0, "max_output_tokens": 80,
               "text": {"format": {"type": "text"}},
               "tools": [{"type": "function", "name": "get_weather", "parameters": PARAMS}]}


@pytest.fixture(scope="module")
def beside(oai) -> dict:
    """qthink's replies to ASK the next two tests read, streamed and not: chat with a text response_format, with
    none, with a schema's, and Responses with text.format text (its stream's events); all eight at once (one batch
    in the engine, qthink's max_num_seqs, where the four tests' batches took as many steps each)."""
    calls = {}
    for stream in (False, True):
        calls |= {
            (stream, "text"): lambda s=stream: _chat(oai, s, messages=ASK, tools=TOOLS, response_format={"type": "text"}),
            (stream, "unsent"): lambda s=stream: _chat(oai, s, messages=ASK, tools=TOOLS),
            (stream, "held"): lambda s=stream: _chat(oai, s, messages=ASK, tools=TOOLS, response_format={
                "type": "json_schema", "json_schema": {"name": "out", "schema": SCHEMA}})}
    calls[False, "responses"] = lambda: oai.responses.create(**TEXT_FORMAT)
    calls[True, "responses"] = lambda: list(oai.responses.create(stream=True, **TEXT_FORMAT))
    return dict(zip(calls, at_once(*calls.values())))


@pytest.mark.parametrize("stream", [False, True])
def test_a_thinking_models_calls_are_read_beside_a_text_response_format(beside, stream):
    (content, calls, why, kinds), unsent, held = (beside[stream, k] for k in ("text", "unsent", "held"))
    assert why == "tool_calls", (content, calls)
    assert [(n, json.loads(a)) for n, a in calls] == [("get_weather", {"city": "Paris"})]
    assert content.startswith("<think>") and THOUGHT in content and "<tool_call>" not in content, content
    assert unsent[:3] == (content, calls, why)  # (as with none sent)
    if stream:  # (the think block's text as it comes, then the call)
        assert kinds[0] == "content" and kinds[-1] == "tool_calls", kinds
    # a schema's response_format holds the output from its first token: the call alone, no think block
    content, calls, why, _ = held
    assert (content, why) == (None, "tool_calls") and [n for n, _ in calls] == ["get_weather"], (content, calls)


@pytest.mark.parametrize("stream", [False, True])
def test_a_thinking_models_calls_are_read_beside_a_text_format_on_responses(beside, stream):
    if stream:
        events = beside[stream, "responses"]
        assert "response.reasoning_text.delta" in [e.type for e in events]
        r = events[-1].response
    else:
        r = beside[stream, "responses"]
    assert [o.type for o in r.output] == ["reasoning", "function_call"], r.output
    assert r.output[0].content[0].text == THOUGHT
    assert (r.output[1].name, json.loads(r.output[1].arguments)) == ("get_weather", {"city": "Paris"})
