"""API semantics left from session 62 (helper ux63e), each through the official client where users meet it, on one
live server of the real SmolLM2 (greedy), plain (`smol`) and under a Qwen3-style thinking template (`qthink`:
test_ux61i_agents' `enable_thinking` switch and shown turns that think, then call):

- a reasoning effort was ignored (Responses' `reasoning: {"effort": ...}` only echoed, chat completions'
  `reasoning_effort` dropped unread): "none", which OpenAI's newest reasoning models take for no reasoning, left a
  thinking template thinking. Now as vLLM maps it: "none" turns the template's `enable_thinking` off, any other
  effort on, a client's own `enable_thinking` in chat_template_kwargs standing; a value OpenAI does not know is its
  400 (`invalid_value`) naming `reasoning.effort` / `reasoning_effort`;
- hermes tool_choice "auto" on a template that does not think: a reply that began as text could not go on to a
  call (the grammar's text ran to the end; a `<tool_call>` it wrote was text, its JSON unchecked), where Qwen2.5
  and Hermes write a sentence, then their calls. Now the grammar's text ends at the first call's opening (a lazy
  lexeme), the calls after it held to their schemas, and every route reads them as vLLM's hermes parser does: chat
  completions' content the text and `tool_calls` the calls, a Responses message item then function_call items, a
  Messages text block then tool_use blocks, Ollama's content and tool_calls; streamed, the text as it comes (what
  may begin a call's opening held until the next piece tells), then the calls;
- a Messages conversation that ends with the assistant's `tool_use` blocks was taken (the template wrote the calls
  and a new assistant turn, the model answering as if it had their results): now Anthropic's 400, the same words
  as for a next message without the tool_result blocks, naming the last message.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import anthropic
import httpx
import llguidance
import llguidance.hf
import openai
import pytest
from transformers import AutoTokenizer

from controller.api import protocol as p
from controller.api.structured import HERMES_CLOSE, HERMES_OPEN, Lead, tool_plan
from tests import smol_qthink
from tests.scripted_gen import bare_serving, generation
from tests.test_ux61i_agents import ASK, PARAMS, THOUGHT
from tests.ux66c_at_once import at_once

PORTS = range(28450, 28500)
server, oai, claude = smol_qthink.server, smol_qthink.oai, smol_qthink.claude  # (the fixtures: on PORTS)
FN = {"type": "function", "name": "get_weather", "parameters": PARAMS, "strict": False}
TOOL = {"name": "get_weather", "description": "the forecast", "input_schema": PARAMS}


def _respond(oai: openai.OpenAI, stream: bool, **kw):
    kw = {"model": "qthink", "temperature": 0, "max_output_tokens": 60, "input": ASK, "tools": [FN], **kw}
    if not stream:
        return oai.responses.create(**kw)
    with oai.responses.stream(**kw) as s:
        list(s)
        return s.get_final_response()


@pytest.fixture(scope="module")
def efforts(oai) -> dict:
    """qthink's replies to ASK by reasoning effort: Responses' high and none, streamed and not, and chat completions'
    content at minimal, none, and none with the client's own switch on; all seven at once (one batch in the engine,
    where the two tests' three batches took as many steps each)."""
    def content(**kw) -> str:
        r = oai.chat.completions.create(model="qthink", messages=ASK, temperature=0, max_tokens=20, **kw)
        return r.choices[0].message.content or ""

    calls = {**{(stream, effort): lambda s=stream, e=effort: _respond(oai, s, reasoning={"effort": e})
                for stream in (False, True) for effort in ("high", "none")},
             "minimal": lambda: content(reasoning_effort="minimal"), "none": lambda: content(reasoning_effort="none"),
             "switched_on": lambda: content(reasoning_effort="none",
                                            extra_body={"chat_template_kwargs": {"enable_thinking": True}})}
    return dict(zip(calls, at_once(*calls.values())))


@pytest.mark.parametrize("stream", [False, True])
def test_responses_reasoning_effort_none_turns_thinking_off(oai, efforts, stream):
    thought, r = efforts[stream, "high"], efforts[stream, "none"]
    # (effort high, as with none sent: it thinks, then calls)
    assert [o.type for o in thought.output] == ["reasoning", "function_call"], thought.output
    assert thought.output[0].content[0].text == THOUGHT and thought.reasoning.effort == "high"
    assert r.status == "completed" and r.reasoning.effort == "none", r
    assert "reasoning" not in [o.type for o in r.output], r.output  # (the template's empty think block: no thinking)
    assert r.usage.output_tokens_details.reasoning_tokens == 0
    assert [o.type for o in r.output] == ["message"] and "<think>" not in r.output_text, r.output
    # the prompt as it was fed: the template's `<think>\n\n</think>\n\n` after the generation prompt
    assert r.usage.input_tokens > thought.usage.input_tokens
    assert oai.responses.input_tokens.count(model="qthink", input=ASK, tools=[FN], reasoning={
        "effort": "none"}).input_tokens == r.usage.input_tokens


def test_chat_reasoning_effort_turns_thinking_off_and_on(oai, efforts):
    assert efforts["minimal"].startswith("<think>")  # (any effort but none: thinking on)
    assert not efforts["none"].startswith("<think>")
    assert efforts["switched_on"].startswith("<think>")  # (a client's own switch stands, as vLLM's)
    # a model whose template has no switch: rendered as it is (an effort is no error; OpenAI's clients send one)
    r = oai.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                    reasoning_effort="none")
    assert r.choices[0].finish_reason == "length"


def test_an_unknown_reasoning_effort_is_openais_400(oai):
    want = ("Invalid value: 'extreme'. Supported values are: 'none', 'minimal', 'low', 'medium', 'high', 'xhigh', "
            "and 'max'.")
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="qthink", messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                    reasoning_effort="extreme")
    assert e.value.body == {"message": want, "type": "invalid_request_error", "param": "reasoning_effort",
                            "code": "invalid_value"}, e.value.body
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            oai.responses.create(model="qthink", input="Hi", max_output_tokens=2, reasoning={"effort": "extreme"},
                                 stream=stream)
        assert e.value.body["param"] == "reasoning.effort" and e.value.body["message"] == want, e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        oai.responses.input_tokens.count(model="qthink", input="Hi", reasoning={"effort": "extreme"})
    assert e.value.body["param"] == "reasoning.effort", e.value.body
    with pytest.raises(openai.BadRequestError) as e:  # (not a string: its type named, the field in Responses' terms)
        oai.responses.create(model="qthink", input="Hi", max_output_tokens=2, extra_body={"reasoning": {"effort": 3}})
    assert e.value.body["param"] == "reasoning.effort", e.value.body


def test_messages_ending_with_an_assistant_tool_use_is_a_400(claude):
    ask = {"role": "user", "content": "Weather in Paris and Rome?"}
    calls = {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
                                              {"type": "tool_use", "id": "toolu_a", "name": "get_weather",
                                               "input": {"city": "Paris"}},
                                              {"type": "tool_use", "id": "toolu_b", "name": "get_weather",
                                               "input": {"city": "Rome"}}]}
    want = ("messages.1: `tool_use` ids were found without `tool_result` blocks immediately after: toolu_a, toolu_b. "
            "Each `tool_use` block must have a corresponding `tool_result` block in the next message.")
    for stream in (False, True):
        with pytest.raises(anthropic.BadRequestError) as e:
            claude.messages.create(model="smol", max_tokens=4, tools=[TOOL], messages=[ask, calls], stream=stream)
        err = e.value.body["error"]
        assert e.value.body["type"] == "error" and err["type"] == "invalid_request_error", e.value.body
        assert err["message"] == want, err
    with pytest.raises(anthropic.BadRequestError) as e:  # (count_tokens reads the conversation as /v1/messages does)
        claude.messages.count_tokens(model="smol", tools=[TOOL], messages=[ask, calls])
    assert e.value.body["error"]["message"] == want, e.value.body
    # a final assistant message of text is still a prefill, continued
    r = claude.messages.create(model="smol", max_tokens=2, messages=[ask, {"role": "assistant", "content": "It is"}])
    assert r.type == "message" and r.usage.output_tokens >= 1


# turns that say a sentence, then call (as Qwen2.5's do): greedy, SmolLM2 writes the next one so
SAY = "Let me check the weather."
CALL = HERMES_OPEN + '{"name": "get_weather", "arguments": {"city": "%s"}}' + HERMES_CLOSE
SAID = [m for city in ("Rome", "Berlin", "Madrid") for m in (
    {"role": "user", "content": f"Weather in {city}?"}, {"role": "assistant", "content": f"{SAY}\n" + CALL % city})]
ASK_SAID = [*SAID, {"role": "user", "content": "Weather in Paris?"}]
CHAT_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": PARAMS}}


def _plan():
    return tool_plan([p.Tool.model_validate(CHAT_TOOL)], "auto", None, "hermes")


def test_the_hermes_grammar_lets_text_go_on_to_calls(smollm2):
    tok = AutoTokenizer.from_pretrained(smollm2)
    lt = llguidance.hf.from_tokenizer(tok, eos_token=tok.eos_token_id)

    def accepts(text: str) -> bool:
        m = llguidance.LLMatcher(lt, _plan().grammar, log_level=0)
        return m.consume_tokens(tok.encode(text)) and not m.is_error() and m.is_accepting()

    call = CALL % "Paris"
    for text, ok in ((f"{SAY}\n{call}", True), (f"{SAY} {call}\n{call}", True), (f"<{call}", True),
                     (f"<tool{call}", True), ("a < b, <tool_call> tags", True), (call, True), ("Hello", True),
                     (f"{SAY}\n{HERMES_OPEN}" + '{"name": "nope", "arguments": {}}' + HERMES_CLOSE, False),
                     (f"{SAY}\n{HERMES_OPEN}not json", False), (f"{SAY}\n{call} and more text", False)):
        assert accepts(text) == ok, text
    plan = _plan()
    got = plan.calls(f"{SAY}\n{call}")
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got] == [
        ("get_weather", {"city": "Paris"})]
    assert plan.lead(f"{SAY}\n{call}") == (f"{SAY}\n", call) and plan.lead("Hello") == ("Hello", "")
    # streamed: the text as it comes, a piece that may open a call held until the next tells
    lead = Lead()
    assert [lead.feed(x) for x in ("Sure <", "b> ok <tool", "_call>\n{")] == [
        ("Sure ", None), ("<b> ok ", None), ("", "<tool_call>\n{")]
    assert Lead().feed("a <tool_ca", end=True) == ("a <tool_ca", None)


def _chat_frames(deltas):
    import asyncio

    gen, serving = generation(deltas), bare_serving()
    req = p.ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                  "stream": True})

    async def run():
        return b"".join([b async for b in serving._stream_chat(gen, req, "id", SimpleNamespace(tokenizer=None),
                                                               _plan())])

    chunks = [json.loads(x[6:]) for x in asyncio.run(run()).decode().split("\n\n") if x.startswith("data: {")]
    return [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in chunks]


def test_the_chat_stream_sends_the_text_then_the_calls():
    call = CALL % "Paris"
    frames = _chat_frames([("Sure <", False), ("b> <tool", False), ("_call>\n", False), (call[12:], True)])
    text = "".join(f[0].get("content") or "" for f in frames)
    calls = [tc for f in frames for tc in f[0].get("tool_calls", [])]
    assert text == "Sure <b> " and frames[-1][1] == "tool_calls", frames
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads("".join(tc["function"]["arguments"] for tc in calls)) == {"city": "Paris"}
    # text that only looked like an opening: all of it, at the end
    frames = _chat_frames([("Use <tool", False), ("_call", True)])
    assert "".join(f[0].get("content") or "" for f in frames) == "Use <tool_call" and frames[-1][1] == "stop"


def _said(server, oai, claude, stream: bool) -> list:
    """The four routes' replies (chat, Responses, Messages, Ollama's chat lines) to ASK_SAID, streamed or not."""
    kw = {"model": "smol", "temperature": 0}

    def chat():
        if not stream:
            return oai.chat.completions.create(messages=ASK_SAID, tools=[CHAT_TOOL], max_tokens=60, **kw).choices[0]
        with oai.chat.completions.stream(messages=ASK_SAID, tools=[CHAT_TOOL], max_tokens=60, **kw) as s:
            list(s)
            return s.get_final_completion().choices[0]

    def message():
        ask = [{"role": m["role"], "content": m["content"]} for m in ASK_SAID]
        body = {"max_tokens": 60, "tools": [TOOL], "messages": ask, "model": "smol", "extra_body": {"temperature": 0}}
        if not stream:
            return claude.messages.create(**body)
        with claude.messages.stream(**body) as s:
            list(s)
            return s.get_final_message()

    def ollama():
        with httpx.stream("POST", server.url + "/api/chat", timeout=120, json={
                "model": "smol", "messages": ASK_SAID, "tools": [CHAT_TOOL], "stream": stream,
                "options": {"temperature": 0, "num_predict": 60}}) as resp:
            assert resp.status_code == 200, resp.read()
            return [json.loads(x) for x in resp.iter_lines() if x.strip()]

    return [chat, lambda: _respond(oai, stream, model="smol", input=ASK_SAID), message, ollama]


@pytest.fixture(scope="module")
def said(server, oai, claude) -> dict:
    """Each route's reply streamed and not: all eight at once (one batch in the engine, smol's max_num_seqs)."""
    got = at_once(*_said(server, oai, claude, False), *_said(server, oai, claude, True))
    return {False: got[:4], True: got[4:]}


@pytest.mark.parametrize("stream", [False, True])
def test_text_then_a_call_on_every_route(said, stream):
    """Greedy SmolLM2 (hermes "auto", a template that does not think) after turns that say a sentence, then call."""
    msg, r, m, lines = said[stream]
    assert msg.finish_reason == "tool_calls", msg
    assert msg.message.content == f"{SAY}\n", msg.message
    assert [(c.function.name, json.loads(c.function.arguments)) for c in msg.message.tool_calls] == [
        ("get_weather", {"city": "Paris"})]

    assert [o.type for o in r.output] == ["message", "function_call"], r.output
    assert r.output_text == f"{SAY}\n" and json.loads(r.output[1].arguments) == {"city": "Paris"}
    assert r.status == "completed" and r.output[0].status == "completed"

    assert m.stop_reason == "tool_use" and [b.type for b in m.content] == ["text", "tool_use"], m.content
    assert m.content[0].text == f"{SAY}\n" and m.content[1].input == {"city": "Paris"}

    content = "".join(x["message"]["content"] for x in lines)
    calls = [c for x in lines for c in x["message"].get("tool_calls", [])]
    assert content == f"{SAY}\n" and [c["function"]["arguments"] for c in calls] == [{"city": "Paris"}], lines
