"""Request validation as OpenAI's and Anthropic's APIs do it, past session 64's (test_ux64b_validation; helper ux65a),
through the official clients on one live server of the tiny model:

- a Responses input item (a message, function_call, function_call_output or reasoning item) or one of its parts
  (input_text, input_image, output_text, a reasoning item's summary and content parts, a function_call_output's
  output parts) took any field unsaid: now OpenAI's 400 unknown_parameter naming its path
  (`Unknown parameter: 'input[0].content[0].foo'.`), the fields of the `openai` client's types taken, and a
  response's output sent back as input (the usual way to go on from it) taken as it came;
- Responses' `reasoning.summary` (and the older `generate_summary`), `reasoning.context` and `text.verbosity` took
  any value unsaid: now OpenAI's 400 invalid_value (`Invalid value: 'x'. Supported values are: ...`), as
  `reasoning.effort`'s;
- chat completions' `verbosity` and `modalities` took any value unsaid (a field chat completions do not know is
  still ignored, as vLLM's): now OpenAI's 400 invalid_value; `modalities` with "audio" (no served model speaks)
  a 400 naming it;
- the Messages API's `service_tier`, `speed` and a block's `cache_control` type and ttl took any value unsaid: now
  Anthropic's 400.
"""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

from tests.ports import live_server_on

PORTS = range(29200, 29250)
HI = [{"role": "user", "content": "Hi"}]
CALL = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
OUT = {"type": "function_call_output", "call_id": "c1", "output": "4"}
REASONING = {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "s"}],
             "content": [{"type": "reasoning_text", "text": "t"}], "status": "completed"}


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("ux65a")
    cfg = {"workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "models": [{"name": "tiny", "path": str(tiny_model), "engine": {"max_num_seqs": 4}}]}
    with live_server_on(PORTS, cfg, work) as srv:
        yield srv


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def _unknown(where: str) -> dict:
    return {"message": f"Unknown parameter: '{where}'.", "type": "invalid_request_error", "param": where,
            "code": "unknown_parameter"}


def _invalid(value: str, supported: str, where: str) -> dict:
    return {"message": f"Invalid value: '{value}'. Supported values are: {supported}.",
            "type": "invalid_request_error", "param": where, "code": "invalid_value"}


@pytest.mark.parametrize("items, where", [
    ([{"role": "user", "content": "Hi", "foo": 1}], "input[0].foo"),
    ([{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi", "foo": 1}]}],
     "input[0].content[0].foo"),
    ([*HI, {"role": "assistant", "content": [{"type": "output_text", "text": "Yo", "foo": 1}]}, *HI],
     "input[1].content[0].foo"),
    ([{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png", "foo": 1}]}],
     "input[0].content[0].foo"),
    ([*HI, {**CALL, "foo": 1}, OUT], "input[1].foo"),
    ([*HI, CALL, {**OUT, "foo": 1}], "input[2].foo"),
    ([*HI, CALL, {**OUT, "output": [{"type": "input_text", "text": "4", "foo": 1}]}], "input[2].output[0].foo"),
    ([{**REASONING, "foo": 1}, *HI], "input[0].foo"),
    ([{**REASONING, "summary": [{"type": "summary_text", "text": "s", "foo": 1}]}, *HI], "input[0].summary[0].foo"),
    ([{**REASONING, "content": [{"type": "reasoning_text", "text": "t", "foo": 1}]}, *HI],
     "input[0].content[0].foo")])
def test_an_unknown_input_item_field_is_openais_400(oai, items, where):
    with pytest.raises(openai.BadRequestError) as e:
        oai.responses.create(model="tiny", input=items, max_output_tokens=2)
    assert e.value.status_code == 400 and e.value.body == _unknown(where), e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        oai.responses.input_tokens.count(model="tiny", input=items)
    assert e.value.body == _unknown(where), e.value.body


def test_the_input_fields_openai_types_are_taken(oai):
    """Every field the `openai` client types for the input items read here, and a response's own output sent back as
    input (its message's output_text with annotations and logprobs), are no error."""
    first = oai.responses.create(model="tiny", input="Hi", max_output_tokens=3, temperature=0,
                                 include=["message.output_text.logprobs"])
    assert first.output[-1].type == "message" and first.output[-1].content[0].logprobs, first
    mark = {"ttl": "30m"}
    items = [
        {"type": "message", "role": "developer", "status": "completed", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": "Hi", "prompt_cache_breakpoint": mark}]},
        *first.output,  # (as the client's models: each field the server sent, sent back)
        {"role": "user", "content": "Again"},
        {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed", "phase": "final_answer",
         "content": [{"type": "output_text", "text": "Yo", "annotations": [], "logprobs": []}]},
        {**REASONING, "encrypted_content": None},
        {**CALL, "id": "fc_1", "status": "completed", "namespace": "ns", "async": False,
         "caller": {"type": "direct"}},
        {**OUT, "id": "fco_1", "status": "completed", "caller": {"type": "direct"}, "name": "f", "namespace": "ns",
         "output": [{"type": "input_text", "text": "4", "prompt_cache_breakpoint": mark}]}]
    r = oai.responses.create(model="tiny", input=items, max_output_tokens=2)
    assert r.error is None and r.status in ("completed", "incomplete"), r
    assert oai.responses.input_tokens.count(model="tiny", input=items).input_tokens > 0


def test_responses_enum_values_are_held_to_openais(oai):
    """reasoning.summary, generate_summary, context and text.verbosity: each of OpenAI's values (and null) taken,
    another OpenAI's 400 invalid_value, as reasoning.effort's; in input_tokens.count too."""
    for summary in ("auto", "concise", "detailed", None):
        r = oai.responses.create(model="tiny", input="Hi", max_output_tokens=2,
                                 reasoning={"summary": summary, "generate_summary": summary, "context": "all_turns"})
        assert r.error is None, r
    for verbosity in ("low", "medium", "high", None):
        assert oai.responses.create(model="tiny", input="Hi", max_output_tokens=2,
                                    text={"verbosity": verbosity}).error is None
    summaries = "'auto', 'concise', and 'detailed'"
    for kw, want in (({"reasoning": {"summary": "verbose"}}, _invalid("verbose", summaries, "reasoning.summary")),
                     ({"reasoning": {"generate_summary": "short"}},
                      _invalid("short", summaries, "reasoning.generate_summary")),
                     ({"reasoning": {"context": "everything"}},
                      _invalid("everything", "'auto', 'current_turn', and 'all_turns'", "reasoning.context")),
                     ({"text": {"verbosity": "loud"}}, _invalid("loud", "'low', 'medium', and 'high'",
                                                               "text.verbosity"))):
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as e:
                oai.responses.create(model="tiny", input="Hi", max_output_tokens=2, stream=stream, **kw)
            assert e.value.body == want, e.value.body
        with pytest.raises(openai.BadRequestError) as e:
            oai.responses.input_tokens.count(model="tiny", input="Hi", **kw)
        assert e.value.body == want, e.value.body


def test_chat_verbosity_and_modalities_are_held_to_openais(oai):
    """Chat completions' verbosity and modalities: OpenAI's values taken, another OpenAI's 400 invalid_value; audio
    output a 400 naming modalities. A field chat completions do not know is still ignored, as vLLM's."""
    ok = oai.chat.completions.create(model="tiny", messages=HI, max_tokens=2, verbosity="low", modalities=["text"],
                                     service_tier="flex", extra_body={"not_a_field": 1})
    assert ok.choices[0].finish_reason in ("stop", "length"), ok
    for kw, want in (({"verbosity": "loud"}, _invalid("loud", "'low', 'medium', and 'high'", "verbosity")),
                     ({"modalities": ["text", "video"]}, _invalid("video", "'text' and 'audio'", "modalities"))):
        with pytest.raises(openai.BadRequestError) as e:
            oai.chat.completions.create(model="tiny", messages=HI, max_tokens=2, **kw)
        assert e.value.body == want, e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="tiny", messages=HI, max_tokens=2, modalities=["text", "audio"],
                                    stream=True)
    assert e.value.body["param"] == "modalities" and "audio output is not supported" in e.value.body["message"]


def test_messages_enum_values_are_held_to_anthropics(server):
    """service_tier, speed and a block's cache_control (type, ttl): Anthropic's values taken (not used here), another
    Anthropic's 400 in its words."""
    claude = anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0, timeout=120)
    cached = [{"role": "user", "content": [{"type": "text", "text": "Hi",
                                            "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}]
    r = claude.messages.create(model="tiny", max_tokens=2, messages=cached, service_tier="standard_only",
                               extra_body={"speed": "fast"})
    assert r.stop_reason in ("end_turn", "max_tokens"), r
    for extra, message in (({"service_tier": "priority"}, "service_tier: Input should be 'auto' or 'standard_only'"),
                           ({"speed": "turbo"}, "speed: Input should be 'standard' or 'fast'"),
                           ({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi", "cache_control": {
                               "type": "ephemeral", "ttl": "2h"}}]}]},
                            "messages.0.content.0.cache_control.ttl: Input should be '5m' or '1h'"),
                           ({"system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "persistent"}}]},
                            "system.0.cache_control.type: Input should be 'ephemeral'")):
        r = httpx.post(server.url + "/v1/messages", timeout=60,
                       json={"model": "tiny", "max_tokens": 2, "messages": HI, **extra})
        assert r.status_code == 400 and r.json() == {"type": "error", "error": {
            "type": "invalid_request_error", "message": message}}, r.text
