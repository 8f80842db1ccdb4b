"""Request validation of the Responses and Messages APIs as OpenAI's and Anthropic's APIs do it (helper ux64b), through
the official clients on one live server of the tiny model under a Qwen3-style thinking template (`qthink`:
test_ux61i_agents' `enable_thinking` switch):

- a field the Responses request does not have was ignored unsaid: at the top level (chat completions' `max_tokens`
  sent to /v1/responses left the reply uncapped, `response_format` unshaped), in `reasoning` (a misspelt
  `reasoning.efort` left thinking on), in `text`, `text.format`, a function tool and a function tool_choice. Now
  OpenAI's 400 (`Unknown parameter: 'reasoning.foo'.`, code unknown_parameter, the field's path as `param`); the
  fields OpenAI's request has that are not used here (prompt_cache_key, service_tier, reasoning.summary, ...) are
  taken;
- the `openai` client's newest reasoning effort, "max", was a 400: now taken (thinking on), as every other effort
  OpenAI knows, "none" turning the template's thinking off;
- the Messages API's `output_config.effort` took any value unsaid: now one of Anthropic's (low, medium, high, xhigh,
  max) or Anthropic's 400.
"""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

from controller.api.thinking import EFFORTS
from tests.ports import live_server_on
from tests.test_ux61i_agents import PARAMS, THINKING_TEMPLATE, templated

PORTS = range(28850, 28900)
FN = {"type": "function", "name": "get_weather", "parameters": PARAMS, "strict": False}
SCHEMA = {"type": "json_schema", "name": "out", "schema": {"type": "object"}}


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("ux64b")
    qthink = templated(tiny_model, work / "qthink", THINKING_TEMPLATE)
    cfg = {"workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "models": [{"name": "qthink", "path": str(qthink), "engine": {"max_num_seqs": 4}}]}
    with live_server_on(PORTS, cfg, work) as srv:
        yield srv


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def _unknown(where: str, moved: str = "") -> dict:
    return {"message": f"Unknown parameter: '{where}'.{moved}", "type": "invalid_request_error", "param": where,
            "code": "unknown_parameter"}


@pytest.mark.parametrize("kw, where", [
    ({"reasoning": {"effort": "low", "foo": 1}}, "reasoning.foo"),
    ({"reasoning": {"efort": "none"}}, "reasoning.efort"),
    ({"extra_body": {"foo": 1}}, "foo"),
    ({"text": {"format": {"type": "text"}, "foo": 1}}, "text.foo"),
    ({"text": {"format": {**SCHEMA, "foo": 1}}}, "text.format.foo"),
    ({"text": {"format": {"type": "json_object", "foo": 1}}}, "text.format.foo"),
    ({"tools": [FN, {**FN, "name": "other", "foo": 1}]}, "tools[1].foo"),
    ({"tools": [FN], "tool_choice": {"type": "function", "name": "get_weather", "foo": 1}}, "tool_choice.foo")])
def test_an_unknown_responses_field_is_openais_400(oai, kw, where):
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            oai.responses.create(model="qthink", input="Hi", max_output_tokens=2, stream=stream, **kw)
        assert e.value.status_code == 400 and e.value.body == _unknown(where), e.value.body
    if "extra_body" not in kw:  # (input_tokens.count's own fields: reasoning, text, tools, tool_choice)
        with pytest.raises(openai.BadRequestError) as e:
            oai.responses.input_tokens.count(model="qthink", input="Hi", **kw)
        assert e.value.body == _unknown(where), e.value.body


def test_chat_completions_names_sent_to_responses_say_the_responses_field(oai):
    for name, value, field in (("max_tokens", 5, "max_output_tokens"),
                               ("response_format", {"type": "json_object"}, "text.format")):
        with pytest.raises(openai.BadRequestError) as e:
            oai.responses.create(model="qthink", input="Hi", extra_body={name: value})
        assert e.value.body == _unknown(name, f" In the Responses API, this parameter is '{field}'."), e.value.body


def test_the_fields_openai_knows_are_taken(oai):
    """Fields of OpenAI's request that are not used here (caching hints, a summary of reasoning, verbosity, a function
    tool's defer_loading, a schema's description) are no error."""
    r = oai.responses.create(model="qthink", input="Hi", max_output_tokens=2, temperature=0, prompt_cache_key="k",
                             safety_identifier="u1", service_tier="auto", max_tool_calls=2,
                             reasoning={"effort": "low", "summary": "auto"},
                             text={"format": {**SCHEMA, "description": "any object"}, "verbosity": "low"},
                             tools=[{**FN, "defer_loading": False}], tool_choice="none")
    assert r.error is None and r.status in ("completed", "incomplete") and r.reasoning.effort == "low", r
    assert oai.responses.input_tokens.count(model="qthink", input="Hi", reasoning={"effort": "low", "summary": "auto"},
                                            extra_body={"personality": "friendly"}).input_tokens > 0


def test_every_openai_reasoning_effort_is_taken(oai):
    """Each of the `openai` client's efforts is taken (a Responses reply, a chat completion); "none" feeds the
    template's closed think block (enable_thinking false: more prompt tokens), every other one thinks, as without."""
    assert EFFORTS == ("none", "minimal", "low", "medium", "high", "xhigh", "max")
    plain = oai.responses.input_tokens.count(model="qthink", input="Hi").input_tokens
    for effort in EFFORTS:
        n = oai.responses.input_tokens.count(model="qthink", input="Hi", reasoning={"effort": effort}).input_tokens
        assert (n > plain) if effort == "none" else (n == plain), (effort, n, plain)
    r = oai.responses.create(model="qthink", input="Hi", max_output_tokens=2, reasoning={"effort": "max"})
    assert r.error is None and r.status in ("completed", "incomplete") and r.reasoning.effort == "max", r
    c = oai.chat.completions.create(model="qthink", messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                    reasoning_effort="max")
    assert c.choices[0].finish_reason in ("stop", "length"), c
    with pytest.raises(openai.BadRequestError) as e:
        oai.responses.create(model="qthink", input="Hi", max_output_tokens=2, reasoning={"effort": "maximum"})
    assert e.value.body["param"] == "reasoning.effort" and e.value.body["code"] == "invalid_value", e.value.body
    assert "'xhigh', and 'max'." in e.value.body["message"], e.value.body


def test_messages_output_config_effort_is_one_of_anthropics(server):
    """An effort Anthropic's API does not know is its 400 (it was taken unsaid); its own are taken (not used here)."""
    claude = anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0, timeout=120)
    hi = [{"role": "user", "content": "Hi"}]
    for effort in ("low", "medium", "high", "xhigh", "max"):
        got = claude.messages.count_tokens(model="qthink", messages=hi, output_config={"effort": effort})
        assert got.input_tokens > 0
    r = httpx.post(server.url + "/v1/messages", timeout=60, json={
        "model": "qthink", "max_tokens": 4, "messages": hi, "output_config": {"effort": "extreme"}})
    assert r.status_code == 400 and r.json() == {"type": "error", "error": {
        "type": "invalid_request_error",
        "message": "output_config.effort: Input should be 'low', 'medium', 'high', 'xhigh' or 'max'"}}, r.text


def test_messages_thinking_is_held_to_anthropics_rules(server):
    """`thinking` as Anthropic's API holds it, in its error shape: a field it does not have, budget_tokens not below
    max_tokens, a top-level field it does not know. (A budget below Anthropic's 1024 is taken on purpose: a small
    local model's thinking may be a few tokens, and budget forcing holds any.)"""
    hi = [{"role": "user", "content": "Hi"}]
    for extra, message in (({"thinking": {"type": "enabled", "budget_tokens": 2, "foo": 1}},
                            "thinking.foo: Extra inputs are not permitted"),
                           ({"thinking": {"type": "enabled", "budget_tokens": 4}},
                            "max_tokens must be greater than thinking.budget_tokens"),
                           ({"reasoning_effort": "low"}, "reasoning_effort: Extra inputs are not permitted")):
        r = httpx.post(server.url + "/v1/messages", timeout=60,
                       json={"model": "qthink", "max_tokens": 4, "messages": hi, **extra})
        assert r.status_code == 400 and r.json() == {"type": "error", "error": {
            "type": "invalid_request_error", "message": message}}, r.text
    r = httpx.post(server.url + "/v1/messages", timeout=60, json={
        "model": "qthink", "max_tokens": 4, "messages": hi, "thinking": {"type": "enabled", "budget_tokens": 2}})
    assert r.status_code == 200 and r.json()["usage"]["output_tokens"] <= 4, r.text


def test_a_type_that_is_not_a_string_is_a_400_not_a_500(server):
    """A block's or a format's `type` sent as a list (the API fuzzer's find): a 400 in each API's error shape, where
    looking it up among the known types raised TypeError (unhashable), a 500."""
    r = httpx.post(server.url + "/v1/messages/count_tokens", timeout=60, json={
        "model": "qthink", "messages": [{"role": "user", "content": [{"type": []}]}]})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    assert r.json()["type"] == "error" and "[]" in r.json()["error"]["message"], r.text
    r = httpx.post(server.url + "/v1/responses", timeout=60, json={
        "model": "qthink", "input": "hi", "max_output_tokens": 2, "text": {"format": {"type": []}}})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
