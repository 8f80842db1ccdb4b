"""Hermes tool-call parsing at its edges (helper ux64a), on one live server of the real SmolLM2 (greedy), plain
(`smol`) and under a Qwen3-style thinking template (`qthink`), through the official `openai` client and httpx on
Ollama's /api/chat, streamed and not:

- a `<tool_call>` the model writes inside its think block (weighing a call before it makes it) is thinking: the
  grammar forced it to go on as a call there (the block never closed: Responses and Ollama gave it all as
  reasoning, the chat reply parsed it as a call, its stream as text). Now the grammar leaves the block free and
  holds only what follows it, and the chat reply reads its calls past the block, as vLLM's hermes parser reads
  the content its reasoning parser leaves;
- whitespace alone before the calls (`\\n<tool_call>...`) is no text: content null, as a reply of calls alone,
  where it was a "\\n" message;
- a call max_tokens cuts once its name is whole (its arguments cut short, or not begun) is given as a call, its
  arguments what was written, finish `length`, streamed or not, as OpenAI answers and the chat stream (and vLLM's)
  streamed it; the reply not streamed gave the raw `<tool_call>` text as content (vLLM's reply not streamed does,
  its JSON not parsing), or nothing of it after text. Ollama gives whole calls only: the rest is content, as before;
- one cut before its name is dropped, with no text before it too (ToolPlan.cut_text: nothing of a call is given
  before its name, the text before it is the reply): the raw `<tool_call>\\n{"` was the content.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from controller.api.structured import HERMES_CLOSE, HERMES_OPEN
from tests.ports import live_server_on
from tests.test_ux61i_agents import PARAMS, THINKING_TEMPLATE, templated
from tests.ux66c_at_once import BURSTS, at_once

PORTS = range(28800, 28850)
CALL = HERMES_OPEN + '{"name": "get_weather", "arguments": {"city": "%s"}}' + HERMES_CLOSE
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": PARAMS}}
FN = {"type": "function", "name": "get_weather", "parameters": PARAMS, "strict": False}
CITIES = ("Rome", "Berlin", "Madrid")


def shots(reply) -> list[dict]:
    """Turns whose assistant replies are `reply(city)`, then the question greedy SmolLM2 answers the same way."""
    return [*(m for city in CITIES for m in ({"role": "user", "content": f"Weather in {city}?"},
                                             {"role": "assistant", "content": reply(city)})),
            {"role": "user", "content": "Weather in Paris?"}]


def weighed(city: str) -> str:
    """A thought that writes the call it is weighing."""
    return f"<think>\nNot {CALL % city} yet.\n</think>"


THOUGHT = weighed("Paris")
ASK_THINKS = shots(lambda c: f"{weighed(c)}\n\n{CALL % c}")  # (it thinks so, then calls)
ASK_THINKS_ONLY = shots(weighed)  # (it thinks so, and ends there)
ASK = shots(lambda c: CALL % c)  # (it calls at once)
ASK_SPACED = shots(lambda c: f"\n\n{CALL % c}")  # (it writes "\n" before the call)


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    work = tmp_path_factory.mktemp("ux64a")
    qthink = templated(smollm2, work / "qthink", THINKING_TEMPLATE)
    cfg = {"workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25}, **BURSTS,
           "models": [{"name": m, "path": str(path), "tool_call_parser": "hermes", "engine": {"max_num_seqs": 8}}
                      for m, path in (("smol", smollm2), ("qthink", qthink))]}
    with live_server_on(PORTS, cfg, work) as srv:
        yield srv


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def chat(oai: openai.OpenAI, stream: bool, model: str, messages: list[dict], max_tokens: int):
    """(content, [(name, arguments)], finish_reason) of a chat reply with the tool, streamed (its chunks put
    together) or not."""
    kw = {"model": model, "messages": messages, "tools": [TOOL], "max_tokens": max_tokens, "temperature": 0}
    if not stream:
        r = oai.chat.completions.create(**kw).choices[0]
        return r.message.content, [(c.function.name, c.function.arguments) for c in r.message.tool_calls or []], \
            r.finish_reason
    chunks = [c.choices[0] for c in oai.chat.completions.create(stream=True, **kw) if c.choices]
    calls: dict[int, list[str]] = {}
    for c in chunks:
        for tc in c.delta.tool_calls or []:
            if tc.id:
                calls[tc.index] = [tc.function.name, ""]
            calls[tc.index][1] += tc.function.arguments or ""
    text = [c.delta.content for c in chunks if c.delta.content is not None]
    return ("".join(text) if any(text) else None), [tuple(calls[k]) for k in sorted(calls)], chunks[-1].finish_reason


def ollama_chat(server, stream: bool, model: str, messages: list[dict], num_predict: int):
    """(content, thinking, [(name, arguments)], done_reason) of Ollama's /api/chat with the tool."""
    with httpx.stream("POST", server.url + "/api/chat", timeout=120, json={
            "model": model, "messages": messages, "tools": [TOOL], "stream": stream,
            "options": {"temperature": 0, "num_predict": num_predict}}) as resp:
        assert resp.status_code == 200, resp.read()
        lines = [json.loads(x) for x in resp.iter_lines() if x.strip()]
    assert lines[-1]["done"], lines
    return ("".join(x["message"]["content"] for x in lines), "".join(x["message"].get("thinking", "") for x in lines),
            [(c["function"]["name"], c["function"]["arguments"]) for x in lines for c in x["message"].get("tool_calls", [])],
            lines[-1]["done_reason"])


@pytest.fixture(scope="module")
def weighing(server, oai) -> dict:
    """The replies the next test reads, streamed and not, all five sent at once: one batch in the engine (where its
    two cases' three and two, each at once, took a third more steps' work)."""
    def respond():
        kw = {"model": "qthink", "input": ASK_THINKS, "tools": [FN], "max_output_tokens": 90, "temperature": 0}
        with oai.responses.stream(**kw) as s:
            list(s)
            return s.get_final_response()

    calls = {(False, "chat"): lambda: chat(oai, False, "qthink", ASK_THINKS, 90),
             (False, "only"): lambda: chat(oai, False, "qthink", ASK_THINKS_ONLY, 90),
             (False, "ollama"): lambda: ollama_chat(server, False, "qthink", ASK_THINKS, 90),
             (True, "chat"): lambda: chat(oai, True, "qthink", ASK_THINKS, 90), (True, "responses"): respond}
    return dict(zip(calls, at_once(*calls.values())))


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_written_inside_the_think_block_is_thinking(weighing, stream):
    """Chat both ways (its reply and its stream went wrong each its own way); the grammar, which Responses and Ollama
    share with it, once each (Responses streamed, Ollama not: each gave it all as reasoning, either way)."""
    paris = ("get_weather", '{"city": "Paris"}')
    assert weighing[stream, "chat"] == (f"{THOUGHT}\n\n", [paris], "tool_calls")
    if not stream:  # (a reply that only thinks so: its think block the content, no call; the reply parsed one)
        assert weighing[stream, "only"] == (THOUGHT, [], "stop")
        content, thinking, calls, why = weighing[stream, "ollama"]
        assert (content, calls, why) == ("", [("get_weather", {"city": "Paris"})], "stop")
        assert thinking == THOUGHT.removeprefix("<think>\n").removesuffix("\n</think>")
        return
    r = weighing[stream, "responses"]
    assert [o.type for o in r.output] == ["reasoning", "function_call"] and r.status == "completed", r.output
    assert r.output[0].content[0].text == THOUGHT.removeprefix("<think>\n").removesuffix("\n</think>")
    assert (r.output[1].name, r.output[1].arguments) == paris


@pytest.fixture(scope="module")
def spaced(server, oai) -> dict:
    """Chat's and Ollama's replies to ASK_SPACED, streamed and not, all four at once (one batch in the engine)."""
    calls = {}
    for stream in (False, True):
        calls |= {(stream, "chat"): lambda s=stream: chat(oai, s, "smol", ASK_SPACED, 40),
                  (stream, "ollama"): lambda s=stream: ollama_chat(server, s, "smol", ASK_SPACED, 40)}
    return dict(zip(calls, at_once(*calls.values())))


@pytest.mark.parametrize("stream", [False, True])
def test_whitespace_before_the_calls_is_no_text(spaced, stream):
    assert spaced[stream, "chat"] == (None, [("get_weather", '{"city": "Paris"}')], "tool_calls")
    assert spaced[stream, "ollama"] == ("", "", [("get_weather", {"city": "Paris"})], "stop")


@pytest.fixture(scope="module")
def cut(server, oai) -> dict:
    """Replies to ASK cut once the call's name is whole, streamed and not, all six at once (one batch in the
    engine): chat's at max_tokens 15 (`<tool_call>\\n{"name": "get_weather", "`) and 18 (`..."arguments": {"`),
    Ollama's at 15."""
    calls = {}
    for stream in (False, True):
        calls |= {(stream, 15): lambda s=stream: chat(oai, s, "smol", ASK, 15),
                  (stream, 18): lambda s=stream: chat(oai, s, "smol", ASK, 18),
                  (stream, "ollama"): lambda s=stream: ollama_chat(server, s, "smol", ASK, 15)}
    return dict(zip(calls, at_once(*calls.values())))


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_cut_once_its_name_is_whole_is_a_call(cut, stream):
    assert cut[stream, 15] == (None, [("get_weather", "")], "length")
    assert cut[stream, 18] == (None, [("get_weather", '{"')], "length")
    # (Ollama's gives whole calls only: the rest as content, as its parser gives back what it could not parse)
    assert cut[stream, "ollama"] == (HERMES_OPEN + '{"name": "get_weather", "', "", [], "length")


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_cut_before_its_name_is_dropped(server, oai, stream):
    # (max_tokens 7: `<tool_call>\n{"`, 6: `<tool_call>\n`)
    *cut, at4 = at_once(*(lambda n=n: chat(oai, stream, "smol", ASK, n) for n in (6, 7)),
                        *(lambda n=n: ollama_chat(server, stream, "smol", ASK, n) for n in (6, 7)),
                        lambda: chat(oai, stream, "smol", ASK, 4))
    assert cut == [(None, [], "length")] * 2 + [("", "", [], "length")] * 2
    # (text that only begins as a call's opening does is text)
    assert at4 == ("<tool_call", [], "length")
