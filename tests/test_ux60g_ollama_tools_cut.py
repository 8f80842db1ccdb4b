"""Ollama's /api/chat with `tools`, a reply cut inside its calls (num_predict, a stop string): the reply not streamed
is what the stream gives, its lines put together (Ollama's own non-streamed chat is its stream's lines joined): the
calls written whole as `tool_calls`, the rest as content. Before, the reply not streamed was the raw `<tool_call>`
text with no `tool_calls` wherever num_predict ended it (just after a whole call, or with a second call cut), while
the stream gave the whole calls as calls.

Live, through the official `ollama` client, on the real SmolLM2 (greedy, so each reply is the same streamed or
not) with `format` (a JSON schema) beside the tools: its output is either hermes calls or JSON of the schema, and
it calls here.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import ollama
import pytest

from tests.ports import live_server_on

PORTS = range(26020, 26040)
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}, "n": {"type": "integer"}},
          "required": ["answer", "n"], "additionalProperties": False}
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    work = tmp_path_factory.mktemp("ux60g_tools")
    cfg = {"workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "models": [{"name": "smol", "path": str(smollm2), "tool_call_parser": "hermes",
                       "engine": {"max_num_seqs": 8}}]}
    with live_server_on(PORTS, cfg, work) as srv:
        yield srv


def calls_of(msg) -> list[tuple[str, dict]]:
    return [(c.function.name, dict(c.function.arguments)) for c in msg.tool_calls or []]


def test_a_reply_cut_in_its_calls_is_the_streams_lines_together(server):
    c = ollama.Client(host=server.url, timeout=120)
    cases = [{"num_predict": 30}, {"num_predict": 45}, {"num_predict": 60}, {"num_predict": 80, "stop": ["Pa"]}]
    cases = [{**options, "temperature": 0, "seed": 1} for options in cases]

    def chat(options, stream):
        r = c.chat(model="smol", messages=ASK, tools=TOOLS, format=SCHEMA, options=options, stream=stream)
        return list(r) if stream else r

    # the 8 requests at once (max_num_seqs 8): decoded in one batch, ~80 steps where one at a time took ~430, and
    # the engine's rows are batch-invariant (tests/test_engine_batching.py), so greedy replies are the same
    with ThreadPoolExecutor(8) as ex:
        futures = [(ex.submit(chat, options, False), ex.submit(chat, options, True)) for options in cases]
        replies = [(w.result(), s.result()) for w, s in futures]
    seen = []
    for options, (whole, parts) in zip(cases, replies):
        streamed = ("".join(p.message.content or "" for p in parts),
                    [call for p in parts for call in calls_of(p.message)], parts[-1].done_reason)
        got = (whole.message.content, calls_of(whole.message), whole.done_reason)
        assert got == streamed, options
        assert whole.eval_count == parts[-1].eval_count
        assert "</tool_call>" not in got[0] and all(name == "get_weather" for name, _ in got[1]), got
        seen.append(got)
    # (the cases this covers: a whole call then num_predict, a whole call then a second one cut, and a stop string
    # inside the first call: no whole call, the text as it is)
    assert any(calls and reason == "length" and not text for text, calls, reason in seen), seen
    assert any(calls and reason == "length" and text.strip().startswith("<tool_call>")
               for text, calls, reason in seen), seen
    assert any(not calls and reason == "stop" and text.startswith("<tool_call>") for text, calls, reason in seen), seen
