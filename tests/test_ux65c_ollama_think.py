"""A `<tool_call>` written inside a think block, on Ollama's /api/chat with `think` off (helper ux65c), on one live
server of the real SmolLM2 (greedy) under two chat templates that think with no switch to turn it off: `rthink`
writes its think blocks itself (its template renders a turn's reasoning in one, and has no `enable_thinking`), and
`r1` opens the block in the prompt (its generation prompt ends `<think>\\n`, as DeepSeek-R1's): the reply starts
inside it. Session 64 made such a call thinking on the OpenAI chat API (the grammar leaves the block free, the reply
reads its calls past the block); Ollama's `think: false` asks the template for nothing it can do, the model thinks
anyway, and its reply went to the tool parser whole: the call inside the block was read as a call (two calls,
the first the one it only weighed), its content `<think>\\nNot `. Now Ollama's reply is read by the chat reply's
rule (`serving.thinks_first`, `serving.Thought`): the block is content, as written, and its calls are read past
it, streamed or not.

The rest of the edge, each checked: `think` true or left out on /api/chat (the block is `thinking`, its call in it
too), /api/generate (no tools: its call is the block's text, in `thinking` or `response`), and the OpenAI chat
reply with `reasoning_effort: "none"` (a template with no switch thinks as it does: the block is content, the call
past it the reply's one call).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from controller.api.structured import HERMES_CLOSE, HERMES_OPEN
from tests.ports import live_server_on
from tests.test_ux61i_agents import PARAMS, templated
from tests.ux66c_at_once import BURSTS

PORTS = range(29300, 29350)
CALL = HERMES_OPEN + '{"name": "get_weather", "arguments": {"city": "%s"}}' + HERMES_CLOSE
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": PARAMS}}
CITIES = ("Rome", "Berlin", "Madrid")
TURNS = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}"
         "{%- if message.reasoning_content is defined and message.reasoning_content %}"
         "{{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}{%- endif %}"
         "{{- (message['content'] or '') + '<|im_end|>\\n' }}{%- endfor %}")
# (no `enable_thinking`: `think: false` changes nothing in the prompt)
RTHINK = TURNS + "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
R1 = TURNS + "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
WEIGHED = "Not " + CALL + " yet."  # (a thought that writes the call it weighs)
PARIS = ("get_weather", {"city": "Paris"})


# turns that think so, then call; then the question greedy SmolLM2 answers the same way (where the prompt opens the
# block, it goes on from there as the turns did)
ASK = [*(m for city in CITIES for m in (
    {"role": "user", "content": f"Weather in {city}?"},
    {"role": "assistant", "content": f"<think>\n{WEIGHED % city}\n</think>\n\n{CALL % city}"})),
    {"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    work = tmp_path_factory.mktemp("ux65c")
    cfg = {"workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25}, **BURSTS,
           "models": [{"name": m, "path": str(templated(smollm2, work / m, tpl)), "tool_call_parser": "hermes",
                       "engine": {"max_num_seqs": 8}} for m, tpl in (("rthink", RTHINK), ("r1", R1))]}
    with live_server_on(PORTS, cfg, work) as srv:
        yield srv


def ollama(server, path: str, stream: bool, body: dict) -> tuple[str, str, list, str]:
    """(content or response, thinking, [(name, arguments)], done_reason) of an Ollama reply, its lines put together."""
    with httpx.stream("POST", server.url + path, timeout=120, json={
            "stream": stream, "options": {"temperature": 0, "num_predict": 100}, **body}) as resp:
        assert resp.status_code == 200, resp.read()
        lines = [json.loads(x) for x in resp.iter_lines() if x.strip()]
    assert lines[-1]["done"], lines
    msgs = [x.get("message", {}) for x in lines]
    text = "".join(m["content"] for m in msgs) if "message" in lines[0] else "".join(x["response"] for x in lines)
    thinking = "".join(m.get("thinking", "") for m in msgs) + "".join(x.get("thinking", "") for x in lines)
    return text, thinking, [(c["function"]["name"], c["function"]["arguments"]) for m in msgs
                            for c in m.get("tool_calls", [])], lines[-1]["done_reason"]


def block(model: str) -> str:
    """The reply's think block as written (`r1`'s prompt opened it)."""
    return f"{'' if model == 'r1' else '<think>' + chr(10)}{WEIGHED % 'Paris'}\n</think>\n\n"


def chat(oai: openai.OpenAI, model: str, stream: bool) -> tuple:
    """(content, [(name, arguments)], finish_reason) of a chat reply with reasoning off, streamed (its chunks put
    together) or not."""
    kw = {"model": model, "messages": ASK, "tools": [TOOL], "max_tokens": 100, "temperature": 0,
          "reasoning_effort": "none"}
    if not stream:
        r = oai.chat.completions.create(**kw).choices[0]
        return r.message.content, [(c.function.name, json.loads(c.function.arguments))
                                   for c in r.message.tool_calls or []], r.finish_reason
    chunks = [c.choices[0] for c in oai.chat.completions.create(stream=True, **kw) if c.choices]
    calls: dict[int, list[str]] = {}
    for c in chunks:
        for tc in c.delta.tool_calls or []:
            calls.setdefault(tc.index, [tc.function.name, ""])[1] += tc.function.arguments or ""
    return ("".join(c.delta.content or "" for c in chunks), [(n, json.loads(a)) for n, a in calls.values()],
            chunks[-1].finish_reason)


# (`r1`'s prompt, raw: it opens the block)
RAW = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in ASK) + "<|im_start|>assistant\n<think>\n"
# each case's request: Ollama's chat with `think` off, each model streamed and not, or on (left out, Ollama's default
# for a model that thinks, and true: the same path); /api/generate; the OpenAI chat with reasoning off
OFF = [("off", m, s) for m in ("rthink", "r1") for s in (False, True)]
ON = [("on", "rthink", None, True), ("on", "r1", True, False)]
GENERATE = [("generate", False), ("generate", None)]
OPENAI = [("openai", "rthink", False), ("openai", "r1", True)]


@pytest.fixture(scope="module")
def replies(server) -> dict[tuple, tuple]:
    """Each case's reply, the requests made at once (the engine batches their generations: seconds, not tens)."""
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)

    def run(case: tuple) -> tuple:
        if case[0] == "off":
            return ollama(server, "/api/chat", case[2], {"model": case[1], "messages": ASK, "tools": [TOOL],
                                                         "think": False})
        if case[0] == "on":
            return ollama(server, "/api/chat", case[3], {"model": case[1], "messages": ASK, "tools": [TOOL],
                                                         **({"think": case[2]} if case[2] is not None else {})})
        if case[0] == "generate":
            return ollama(server, "/api/generate", False, {"model": "r1", "prompt": RAW, "raw": True,
                                                           **({"think": case[1]} if case[1] is not None else {})})
        return chat(oai, case[1], case[2])

    cases = [*OFF, *ON, *GENERATE, *OPENAI]
    with ThreadPoolExecutor(len(cases)) as pool:
        return dict(zip(cases, pool.map(run, cases)))


def test_think_false_a_call_inside_the_think_block_is_content(replies):
    """`think: false`: the block the content as written, the call past it the one call, streamed or not."""
    assert [replies[c] for c in OFF] == [(block(m), "", [PARIS], "stop") for _, m, _ in OFF]


def test_think_on_a_call_inside_the_think_block_is_thinking(replies):
    assert [replies[c] for c in ON] == [("", WEIGHED % "Paris", [PARIS], "stop")] * len(ON)


def test_generate_has_no_calls_to_read(replies):
    """/api/generate takes no tools: the call in the block is the block's text, the response's as written (`think`
    off) or the thinking (by default); the call after it the response's text."""
    assert [replies[c] for c in GENERATE] == [(block("r1") + CALL % "Paris", "", [], "stop"),
                                              (CALL % "Paris", WEIGHED % "Paris", [], "stop")]


def test_openai_chat_reasoning_off_reads_the_call_past_the_block(replies):
    """`reasoning_effort: "none"` turns no switch these templates lack: the block the content, the call past it."""
    assert [replies[c] for c in OPENAI] == [(block(m), [PARIS], "tool_calls") for _, m, _ in OPENAI]
