"""Agentic clients pointed at tokenpool (helper ux61i): the official `anthropic` client on /v1/messages as Claude
Code drives it, and the official `openai` client's Responses API as Codex CLI drives it, on one live server of the
real SmolLM2 (greedy, so each reply is known):

- a request whose prompt and max_tokens together pass the context was refused in vLLM's words ("This model's
  maximum context length is ... However, you requested ..."), which Claude Code cannot read: it sends max_tokens
  32000 and, from Anthropic's own words ("input length and `max_tokens` exceed context limit: I + M > C"), retries
  with a max_tokens that fits; a prompt past the context alone is Anthropic's "prompt is too long: N tokens > M
  maximum", which it takes as the conversation to compact. Streamed or not;
- a model whose template thinks (Qwen3's: `qthink`, SmolLM2 under such a template, shown a few turns that think
  and then call, so that it writes `<think>...</think>` and a `<tool_call>` on cue) had its think block left at the
  start of the reply's text, and so the call after it read as text: on /v1/responses (Codex CLI) an output_text of
  `<think>...<tool_call>...`, no function_call; on /v1/messages without `thinking` (Claude Code sends none for a
  model it does not know) a text block, end_turn. Now the Responses output has the thinking as a `reasoning` item
  (streamed as `response.reasoning_text.delta` events) and the call as a function_call item, and the Messages
  reply leaves the thinking out (none was asked for) and gives the call as a tool_use block; streamed or not, and
  the tool loop goes on from them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import anthropic
import openai
import pytest

from tests.ports import live_server_on
from tests.ux66c_at_once import BURSTS, at_once

PORTS = range(27050, 27100)
HI = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"},
      {"role": "user", "content": "Say hi"}]  # (greedy: "Hey!", a short reply)
# Claude Code's reading of Anthropic's refusals (the numbers it retries or compacts with)
OVER = re.compile(r"input length and `max_tokens` exceed context limit: (\d+) \+ (\d+) > (\d+)")
TOO_LONG = re.compile(r"prompt is too long: (\d+) tokens > (\d+) maximum")


# Qwen3's switch, less the rest: the model writes its own <think> block unless enable_thinking is false
THINKING_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}")
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "%s"}}\n</tool_call>'
# turns that think, then call: greedy, SmolLM2 writes the next one so ("The user wants the weather in Paris.")
SHOTS = [m for city in ("Rome", "Berlin", "Madrid") for m in (
    {"role": "user", "content": f"Weather in {city}?"},
    {"role": "assistant", "content": f"<think>\nThe user wants the weather in {city}.\n</think>\n\n" + CALL % city})]
ASK = [*SHOTS, {"role": "user", "content": "Weather in Paris?"}]
THOUGHT = "The user wants the weather in Paris."
PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def templated(model: Path, folder: Path, template: str) -> Path:
    """`folder`: `model`'s files (linked), its chat template `template` (SmolLM2 thinking, as Qwen3's template does)."""
    folder.mkdir()
    for f in model.iterdir():
        if f.name != "chat_template.jinja":
            (folder / f.name).symlink_to(f.resolve())
    (folder / "chat_template.jinja").write_text(template)
    return folder


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    work = tmp_path_factory.mktemp("ux61i")
    qthink = templated(smollm2, work / "qthink", THINKING_TEMPLATE)
    cfg = {"workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25}, **BURSTS,
           "models": [{"name": "smol", "path": str(smollm2), "engine": {"max_num_seqs": 8}},
                      {"name": "qthink", "path": str(qthink), "tool_call_parser": "hermes",
                       "engine": {"max_num_seqs": 8}}]}
    with live_server_on(PORTS, cfg, work) as srv:
        yield srv


@pytest.fixture(scope="module")
def claude(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def codex(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def _send(claude: anthropic.Anthropic, stream: bool, **kw):
    """The Message of a greedy request, streamed (the client's stream helper, as Claude Code reads one) or not."""
    kw = {"model": "smol", "extra_body": {"temperature": 0}, **kw}
    if not stream:
        return claude.messages.create(**kw)
    with claude.messages.stream(**kw) as s:
        return s.get_final_message()


def _over_and_retried(claude: anthropic.Anthropic, stream: bool) -> tuple:
    """(the refusal's error body of max_tokens 32000, the limit it named, the reply to the retry with the max_tokens
    Claude Code takes from it: the limit less the input, less a margin)."""
    with pytest.raises(anthropic.BadRequestError) as ei:
        _send(claude, stream, max_tokens=32000, messages=HI)
    err = ei.value.body["error"]
    m = OVER.search(err["message"])
    if m is None:
        return err, None, None
    prompt, _, limit = map(int, m.groups())
    return err, m, _send(claude, stream, max_tokens=limit - prompt - 1000, messages=HI)


@pytest.fixture(scope="module")
def over(claude) -> dict:
    """`_over_and_retried`, streamed and not, both at once (one batch in the engine)."""
    return dict(zip((False, True), at_once(*(lambda s=s: _over_and_retried(claude, s) for s in (False, True)))))


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_past_the_context_is_refused_in_anthropics_words(claude, over, stream):
    """Claude Code's 32000 max_tokens against an 8K model: the 400 says input + max_tokens > limit as Anthropic's
    does, and the max_tokens it retries with (the limit less the input, less a margin) is answered."""
    err, m, got = over[stream]
    assert err["type"] == "invalid_request_error", err
    assert m is not None, err["message"]
    prompt, asked, limit = map(int, m.groups())
    assert asked == 32000 and limit == 8192
    assert prompt == claude.messages.count_tokens(model="smol", messages=HI).input_tokens
    assert got.stop_reason == "end_turn" and got.content[0].text


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_past_the_context_is_too_long_in_anthropics_words(claude, stream):
    long = [{"role": "user", "content": "word " * 9000}]
    n = claude.messages.count_tokens(model="smol", messages=long).input_tokens
    with pytest.raises(anthropic.BadRequestError) as ei:
        _send(claude, stream, max_tokens=10, messages=long)
    m = TOO_LONG.search(ei.value.body["error"]["message"])
    assert m is not None, ei.value.body
    assert int(m.group(1)) == n and int(m.group(2)) == 8191  # (a token's room at least is left for the reply)


def _respond(codex: openai.OpenAI, stream: bool, **kw):
    """(the Response, the streamed events' types and reasoning deltas) of a greedy Responses request to qthink."""
    kw = {"model": "qthink", "temperature": 0, "max_output_tokens": 80, **kw}
    if not stream:
        return codex.responses.create(**kw), [], ""
    with codex.responses.stream(**kw) as s:
        events = list(s)
        final = s.get_final_response()
    return final, [e.type for e in events], "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")


FUNCTIONS = [{"type": "function", "name": "get_weather", "parameters": PARAMS, "strict": False}]
TOOLS = [{"name": "get_weather", "description": "Weather for a city", "input_schema": PARAMS}]
GREETED = [*(m for q in ("Hi", "Hey", "Yo") for m in (
    {"role": "user", "content": q}, {"role": "assistant", "content": "<think>\nA greeting.\n</think>\n\nHello!"})),
    {"role": "user", "content": "Hello"}]  # (shots of a reply that thinks, then answers in text)


@pytest.fixture(scope="module")
def turns(claude, codex) -> dict:
    """qthink's first replies the next tests read, streamed and not, all six at once (one batch in the engine,
    where each test's were a batch of one): Responses to ASK with the function and to GREETED, Messages to ASK with
    the tool."""
    calls = {}
    for stream in (False, True):
        calls |= {(stream, "call"): lambda s=stream: _respond(codex, s, input=ASK, tools=FUNCTIONS),
                  (stream, "text"): lambda s=stream: _respond(codex, s, input=GREETED,
                                                              include=["message.output_text.logprobs"]),
                  (stream, "tool_use"): lambda s=stream: _send(claude, s, model="qthink", max_tokens=80, tools=TOOLS,
                                                               messages=ASK)}
    return dict(zip(calls, at_once(*calls.values())))


def _answered(turns, stream: bool) -> list[dict]:
    """The Messages tool loop's next conversation: the tool_use answered."""
    m = turns[stream, "tool_use"]
    return [*ASK, {"role": "assistant", "content": m.content},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": m.content[0].id, "content": "Sunny"}]}]


@pytest.fixture(scope="module")
def next_turns(claude, codex, turns) -> dict:
    """The tool loops' next replies, streamed and not, all four at once: Responses to the call's output (sent back
    with previous_response_id), Messages to the tool_result."""
    calls = {}
    for stream in (False, True):
        r = turns[stream, "call"][0]
        out = [{"type": "function_call_output", "call_id": o.call_id, "output": "Sunny, 21C"} for o in r.output
               if o.type == "function_call"]
        calls |= {(stream, "call"): lambda s=stream, r=r, out=out: _respond(codex, s, previous_response_id=r.id,
                                                                            tools=FUNCTIONS, input=out),
                  (stream, "tool_use"): lambda s=stream: _send(claude, s, model="qthink", max_tokens=60, tools=TOOLS,
                                                               messages=_answered(turns, s))}
    return dict(zip(calls, at_once(*calls.values())))


@pytest.mark.parametrize("stream", [False, True])
def test_a_thinking_models_call_is_a_function_call_after_its_reasoning(request, turns, stream):
    """Codex CLI's loop with a model that thinks: the reply's thinking is a reasoning item, the call after it a
    function_call item (streamed: output_index 1, after the reasoning item's events), and the call's output, sent
    back with previous_response_id, is answered."""
    r, events, deltas = turns[stream, "call"]
    assert r.status == "completed", r
    assert [o.type for o in r.output] == ["reasoning", "function_call"], r.output
    assert r.output[0].content[0].text == THOUGHT and r.output[0].summary == []
    call = r.output[1]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert r.output_text == ""  # (no think block, no raw call, as text)
    assert 0 < r.usage.output_tokens_details.reasoning_tokens < r.usage.output_tokens
    if stream:
        assert deltas == THOUGHT
        first_call = events.index("response.function_call_arguments.delta")
        assert events.index("response.reasoning_text.done") < first_call
    got, _, _ = request.getfixturevalue("next_turns")[stream, "call"]  # (made once the first turns are checked)
    assert got.status == "completed" and got.output[-1].type in ("message", "function_call"), got.output
    assert "<think>" not in got.output_text


@pytest.mark.parametrize("stream", [False, True])
def test_a_thinking_models_text_reply_is_its_message_after_its_reasoning(turns, stream):
    r, events, deltas = turns[stream, "text"]
    assert [o.type for o in r.output] == ["reasoning", "message"], r.output
    assert r.output[0].content[0].text == "A greeting." and r.output_text == "Hello!"
    # (the text's logprobs are its own tokens', not the thinking's; every token before the text is reasoning's)
    assert [lp.token for lp in r.output[1].content[0].logprobs][:2] == ["Hello", "!"]
    assert r.usage.output_tokens_details.reasoning_tokens == r.usage.output_tokens - 3  # (Hello, !, the EOS)
    if stream:
        assert deltas == "A greeting." and "response.reasoning_text.done" in events


@pytest.mark.parametrize("stream", [False, True])
def test_a_thinking_models_call_is_a_tool_use_without_thinking_asked(request, turns, stream):
    """Claude Code's loop with a model whose template thinks and no `thinking` sent: no thinking block (none was
    asked), the call a tool_use block (stop_reason tool_use); its tool_result is answered."""
    m = turns[stream, "tool_use"]
    assert m.stop_reason == "tool_use", m
    assert [b.type for b in m.content] == ["tool_use"], m.content
    assert m.content[0].name == "get_weather" and m.content[0].input == {"city": "Paris"}
    got = request.getfixturevalue("next_turns")[stream, "tool_use"]
    assert got.stop_reason in ("end_turn", "tool_use", "max_tokens"), got
    assert all("<think>" not in getattr(b, "text", "") for b in got.content), got.content
