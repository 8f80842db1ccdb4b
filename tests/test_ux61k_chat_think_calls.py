"""The chat route (/v1/chat/completions) with a model whose template thinks (Qwen3's) served with the hermes parser:
its reply's `<think>` block began it, so the tool reader took the whole reply as text -- the content
`<think>...</think>\\n\\n<tool_call>{...}</tool_call>`, `tool_calls` None, finish_reason "stop" -- streamed or not.
vLLM's hermes parser (no reasoning parser) reads the calls wherever they begin: the content is the text before the
first (the think block), the calls `tool_calls`, finish_reason "tool_calls". So here now, through the official
`openai` client: SmolLM2 under a thinking template, shown turns that think then call (test_ux61i_agents' `qthink`),
greedy; streamed, content deltas of the think block, then tool_calls deltas.
"""

from __future__ import annotations

import json

import openai
import pytest

from tests.ports import live_server_on
from tests.test_ux61i_agents import ASK, PARAMS, THINKING_TEMPLATE, THOUGHT, templated
from tests.ux66c_at_once import BURSTS, at_once

PORTS = range(27100, 27200)
OPENING_TEMPLATE = THINKING_TEMPLATE.replace("'<|im_start|>assistant\\n' }}", "'<|im_start|>assistant\\n<think>\\n' }}")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": PARAMS}}]


@pytest.fixture(scope="module")
def client(smollm2, tmp_path_factory):
    work = tmp_path_factory.mktemp("ux61k")
    qthink = templated(smollm2, work / "qthink", THINKING_TEMPLATE)  # (test_ux61i_agents' server's)
    # (the same, its generation prompt opening the think block, as Qwen3-Thinking-2507's)
    qopen = templated(smollm2, work / "qopen", OPENING_TEMPLATE)
    cfg = {"workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25}, **BURSTS,
           "models": [{"name": m.name, "path": str(m), "tool_call_parser": "hermes", "engine": {"max_num_seqs": 8}}
                      for m in (qthink, qopen)]}
    with live_server_on(PORTS, cfg, work) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)


def _chat(client: openai.OpenAI, stream: bool, **kw):
    """(content, tool_calls as (name, arguments) pairs, finish_reason, the streamed deltas' kinds in order) of a
    greedy chat completion of qthink."""
    kw = {"model": "qthink", "temperature": 0, "max_tokens": 80, **kw}
    if not stream:
        c = client.chat.completions.create(**kw).choices[0]
        calls = [(t.function.name, t.function.arguments) for t in c.message.tool_calls or []]
        return c.message.content, calls, c.finish_reason, []
    text, calls, why, kinds = "", {}, None, []
    for chunk in client.chat.completions.create(stream=True, **kw):
        if chunk.usage is not None:  # (asked: each generated token's logprob came, once)
            assert kinds.count("lp") == chunk.usage.completion_tokens, kinds
            kinds = [k for k in kinds if k != "lp"]
        for c in chunk.choices:
            kinds += ["lp"] * len(c.logprobs.content or []) if c.logprobs is not None else []
            if c.delta.content:
                text += c.delta.content
                kinds.append("content")
            for t in c.delta.tool_calls or []:
                name, args = calls.get(t.index, ("", ""))
                calls[t.index] = (name + (t.function.name or ""), args + (t.function.arguments or ""))
                kinds.append("tool_calls")
            why = c.finish_reason or why
    return text or None, [calls[k] for k in sorted(calls)], why, kinds


GREETED = [*(m for q in ("Hi", "Hey", "Yo") for m in (
    {"role": "user", "content": q}, {"role": "assistant", "content": "<think>\nA greeting.\n</think>\n\nHello!"})),
    {"role": "user", "content": "Hello"}]  # (shots of a reply that thinks, then answers in text)


@pytest.fixture(scope="module")
def replies(client) -> dict:
    """The replies the tests read, streamed and not, all at once (one batch a model in the engine, where each test's
    were a batch each): qthink's to ASK with the tool (with logprobs, and `first`: without, not streamed, the tool
    loop's first turn and the content the streamed reply's is checked against), to GREETED, and qopen's to ASK."""
    calls = {"first": lambda: client.chat.completions.create(model="qthink", temperature=0, max_tokens=80, messages=ASK,
                                                             tools=TOOLS).choices[0].message}
    for stream in (False, True):
        calls |= {(stream, "read"): lambda s=stream: _chat(
                      client, s, messages=ASK, tools=TOOLS, logprobs=True,
                      **({"stream_options": {"include_usage": True}} if s else {})),
                  (stream, "text"): lambda s=stream: _chat(client, s, messages=GREETED, tools=TOOLS),
                  (stream, "opened"): lambda s=stream: _chat(client, s, model="qopen", messages=ASK, tools=TOOLS)}
    return dict(zip(calls, at_once(*calls.values())))


@pytest.fixture(scope="module")
def first(replies):
    return replies["first"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_thinking_models_call_is_read_after_its_think_block(replies, first, stream):
    content, calls, why, kinds = replies[stream, "read"]
    assert "lp" not in kinds  # (the usage chunk came)
    assert why == "tool_calls", (content, calls)
    assert [(n, json.loads(a)) for n, a in calls] == [("get_weather", {"city": "Paris"})]
    # the think block, as the model wrote it, is the content (vLLM's: the text before the first call); no raw call
    assert content is not None and content.startswith("<think>") and "<tool_call>" not in content, content
    assert THOUGHT in content and content.rstrip().endswith("</think>"), content
    if stream:  # (the think block's text as it comes, then the call)
        assert kinds == ["content"] * kinds.count("content") + ["tool_calls"] * kinds.count("tool_calls"), kinds
        assert kinds.count("content") > 1, kinds
        assert first.content == content  # (the same content, streamed or not)


@pytest.fixture(scope="module")
def loop(client, first) -> dict:
    """The reply to the call's result sent back (the assistant turn as the client got it: its content and
    tool_calls), streamed and not, both at once."""
    assert first.tool_calls, first
    after = [*ASK, first.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": "Sunny, 21C"}]
    return dict(zip((False, True), at_once(*(lambda s=s: _chat(client, s, messages=after, tools=TOOLS, max_tokens=60)
                                             for s in (False, True)))))


@pytest.mark.parametrize("stream", [False, True])
def test_the_tool_loop_goes_on_from_the_call(loop, stream):
    """The call's result is answered, with no raw think block or call in a reply of text."""
    content, calls, why, _ = loop[stream]
    assert why in ("stop", "tool_calls", "length"), (content, calls)
    assert calls or "<tool_call>" not in (content or ""), content


@pytest.mark.parametrize("stream", [False, True])
def test_a_thinking_models_text_reply_with_tools_is_its_whole_text(replies, stream):
    """A reply that thinks and then answers in text, tools offered: its whole text the content, as before."""
    content, calls, why, _ = replies[stream, "text"]
    assert calls == [] and why == "stop"
    assert content.startswith("<think>") and content.endswith("Hello!") and "A greeting." in content, content


@pytest.mark.parametrize("stream", [False, True])
def test_calls_after_a_think_block_the_prompt_opened(replies, stream):
    """A template whose generation prompt opens the think block (the reply starts inside it, with no <think> of its
    own): the calls after its `</think>` are read too, the text before them the content."""
    assert "assistant\\n<think>\\n" in OPENING_TEMPLATE
    content, calls, why, kinds = replies[stream, "opened"]
    assert why == "tool_calls", (content, calls)
    assert [(n, json.loads(a)) for n, a in calls] == [("get_weather", {"city": "Paris"})]
    assert content.startswith(THOUGHT) and content.rstrip().endswith("</think>") and "<tool_call>" not in content
