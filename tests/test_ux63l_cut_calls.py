"""A hermes "auto" reply that says a sentence, then begins a call that max_tokens cuts before the call's name is
whole (helper ux63l; found by a user pass): greedy SmolLM2, after turns that say a sentence and then call
(test_ux63e_api's), writes `Let me check the weather.\\n<tool_call>\\n{"` in 14 tokens.

Chat completions (streamed or not) and Ollama's /api/chat gave the sentence with the cut call's `<tool_call>\\n{"`
after it as content. Now the sentence alone is the content (finish `length`): the call, of which nothing can be
given (no name yet), is dropped, as vLLM's streaming hermes parser holds it back. Responses and Messages already
gave the sentence apart (a message item, completed as it was streamed before the call began, of an `incomplete`
response; a text block, then the cut call's tool_use block of the one tool, input {}, as a call cut with no text
before it): pinned here too. (An output that is only the cut call is all the text it wrote: unchanged.)
"""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pytest

from tests.ports import live_server_on
from tests.test_ux63e_api import ASK_SAID, CHAT_TOOL, FN, SAY, TOOL
from tests.ux66c_at_once import BURSTS, at_once

PORTS = range(28750, 28800)
CUT = 14  # (max_tokens) `Let me check the weather.\n<tool_call>\n{"`


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    cfg = {"workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25}, **BURSTS,
           "models": [{"name": "smol", "path": str(smollm2), "tool_call_parser": "hermes",
                       "engine": {"max_num_seqs": 8}}]}
    with live_server_on(PORTS, cfg, tmp_path_factory.mktemp("ux63l")) as srv:
        yield srv


@pytest.mark.parametrize("stream", [False, True])
def test_chat_gives_the_text_before_a_call_cut_before_its_name(server, stream):
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    kw = {"model": "smol", "messages": ASK_SAID, "tools": [CHAT_TOOL], "max_tokens": CUT, "temperature": 0}
    if stream:
        chunks = [c.choices[0] for c in oai.chat.completions.create(stream=True, **kw) if c.choices]
        assert "".join(c.delta.content or "" for c in chunks) == f"{SAY}\n", chunks
        assert not any(c.delta.tool_calls for c in chunks) and chunks[-1].finish_reason == "length", chunks
    else:
        r, whole = at_once(lambda: oai.chat.completions.create(**kw).choices[0],
                           lambda: oai.chat.completions.create(**{**kw, "max_tokens": 60}).choices[0])
        assert (r.message.content, r.message.tool_calls, r.finish_reason) == (f"{SAY}\n", None, "length"), r
        # (the whole reply is the sentence and the call, as before)
        assert whole.message.content == f"{SAY}\n" and whole.message.tool_calls[0].function.name == "get_weather"


@pytest.mark.parametrize("stream", [False, True])
def test_ollama_gives_the_text_before_a_call_cut_before_its_name(server, stream):
    with httpx.stream("POST", server.url + "/api/chat", timeout=120, json={
            "model": "smol", "messages": ASK_SAID, "tools": [CHAT_TOOL], "stream": stream,
            "options": {"temperature": 0, "num_predict": CUT}}) as resp:
        assert resp.status_code == 200, resp.read()
        lines = [json.loads(x) for x in resp.iter_lines() if x.strip()]
    assert "".join(x["message"]["content"] for x in lines) == f"{SAY}\n", lines
    assert not [c for x in lines for c in x["message"].get("tool_calls", [])], lines
    assert lines[-1]["done"] and lines[-1]["done_reason"] == "length", lines[-1]


@pytest.mark.parametrize("stream", [False, True])
def test_responses_and_messages_give_the_text_apart(server, stream):
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    claude = anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0, timeout=120)

    def respond():
        kw = {"model": "smol", "input": ASK_SAID, "tools": [FN], "max_output_tokens": CUT, "temperature": 0}
        if not stream:
            return oai.responses.create(**kw)
        return [e for e in oai.responses.create(stream=True, **kw) if e.type == "response.incomplete"][-1].response

    def message():
        kw = {"model": "smol", "max_tokens": CUT, "tools": [TOOL], "extra_body": {"temperature": 0},
              "messages": [{"role": m["role"], "content": m["content"]} for m in ASK_SAID]}
        if not stream:
            return claude.messages.create(**kw)
        with claude.messages.stream(**kw) as s:
            return s.get_final_message()

    r, m = at_once(respond, message)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens", r
    assert [(o.type, o.status) for o in r.output] == [("message", "completed")] and r.output_text == f"{SAY}\n"
    assert m.stop_reason == "max_tokens" and [b.type for b in m.content] == ["text", "tool_use"], m.content
    assert m.content[0].text == f"{SAY}\n" and (m.content[1].name, m.content[1].input) == ("get_weather", {})
