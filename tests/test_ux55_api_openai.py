"""The OpenAI-compatible API as vLLM's users call it through the official `openai` client, against one live server
of a tiny random-weight model (sampled: what comes back is the server's doing, not the model's sense)."""

from __future__ import annotations

from typing import Literal

import openai
import pytest
from pydantic import BaseModel

from load_tests.live_server import LiveServer


@pytest.fixture(scope="module")
def server(make_tiny, tmp_path_factory):
    work = tmp_path_factory.mktemp("ux55_openai")
    cfg = {"workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "models": [{"name": "tiny", "path": str(make_tiny("qwen2")), "engine": {"max_num_seqs": 8}}]}
    with LiveServer(cfg, work) as srv:
        yield srv


def client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="x", timeout=60, max_retries=0)


class Verdict(BaseModel):
    ok: bool
    kind: Literal["a", "b"]


def test_a_response_format_schema_takes_no_properties_it_does_not_list(server):
    """vLLM's documented structured output: response_format json_schema with a pydantic `model_json_schema()`,
    which says nothing of additionalProperties. vLLM's default backend (xgrammar, strict mode) then allows the listed
    keys alone; here the schema was held open and a sampled reply went on with keys of its own (`{"ok": false,
    "kind": "a", "< sp calling...`) until max_tokens cut it, no longer JSON. Chat, streamed or not, and the
    Responses API's text.format alike. A schema that allows more still gets them, and an allOf of partial objects
    still has instances."""
    c = client(server)
    schema = Verdict.model_json_schema()
    rf = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}}
    msgs = [{"role": "user", "content": "Judge it"}]
    for seed in range(6):
        r = c.chat.completions.create(model="tiny", messages=msgs, response_format=rf, temperature=1.0, seed=seed,
                                      max_tokens=48)
        assert r.choices[0].finish_reason == "stop", (seed, r.choices[0].message.content)
        Verdict.model_validate_json(r.choices[0].message.content)
    text = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="tiny", messages=msgs, response_format=rf, temperature=1.0, seed=0, max_tokens=48, stream=True)
        if ch.choices)
    Verdict.model_validate_json(text)
    for seed in range(3):
        resp = c.responses.create(model="tiny", input="Judge it", temperature=1.0, max_output_tokens=48,
                                  extra_body={"seed": seed}, text={"format": {"type": "json_schema", "name": "v",
                                                                              "schema": schema}})
        assert resp.status == "completed", resp.output_text
        Verdict.model_validate_json(resp.output_text)
    both = {"allOf": [{"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]},
                      {"type": "object", "properties": {"b": {"type": "boolean"}}, "required": ["b"]}]}
    r = c.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=48, response_format={
        "type": "json_schema", "json_schema": {"name": "both", "schema": both}})
    out = r.choices[0].message.content  # (its parts are left open: after a and b, a key of the model's may follow)
    assert out.startswith('{"a": ') and ', "b": ' in out, out


def test_a_schema_nested_too_deeply_is_a_400(server):
    """A response_format schema that JSON's parser takes but that nests some 600 levels is a 400 (the grammar
    could not take it), not a RecursionError's 500, on chat and on the Responses API's text.format."""
    c = client(server)
    deep: dict = {"type": "integer"}
    for _ in range(300):
        deep = {"type": "object", "properties": {"a": deep}}
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=1,
                                  response_format={"type": "json_schema", "json_schema": {"name": "d", "schema": deep}})
    assert e.value.body["param"] == "response_format", e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model="tiny", input="x", max_output_tokens=1,
                           text={"format": {"type": "json_schema", "name": "d", "schema": deep}})
    assert e.value.body["param"] == "text.format", e.value.body


DEEP = "[" * 100_000 + "]" * 100_000  # (a string: JSON text nested past what Python's parser goes)


def test_json_text_nested_too_deeply_in_a_field_is_no_500(server):
    """Fields that carry JSON as text, parsed here: an assistant's earlier tool call's `arguments` (chat, and the
    Responses API's function_call item) and vLLM's guided_json / structured_outputs.json given as a string. Nested
    past the parser (a RecursionError, not the ValueError caught) they were 500s. Arguments that are no JSON go to
    the template as the text they are, as before; a schema that is none is a 400 naming its field."""
    c = client(server)
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": DEEP}}
    r = c.chat.completions.create(model="tiny", max_tokens=1, messages=[
        {"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "done"}, {"role": "user", "content": "and?"}])
    assert r.choices[0].finish_reason == "length"
    resp = c.responses.create(model="tiny", max_output_tokens=1, input=[
        {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": DEEP},
        {"type": "function_call_output", "call_id": "call_1", "output": "done"}])
    assert resp.status == "incomplete"
    for extra, param in (({"guided_json": DEEP}, "guided_json"), ({"structured_outputs": {"json": DEEP}},
                                                                  "structured_outputs.json")):
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="tiny", prompt="x", max_tokens=1, extra_body=extra)
        assert e.value.body["param"] == param and "not a JSON schema" in e.value.body["message"], e.value.body


def test_text_parts_are_a_line_apart_in_chat_and_responses(server):
    """A message's text parts reach the template a line apart, as vLLM joins them; they were glued ("see the table:"
    then "Name,Age" read as one line). The chat path and the Responses API's input_text parts alike: the prompt's
    tokens are those of the one string with the line."""
    c = client(server)
    parts = [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]
    chat = {"model": "tiny", "max_tokens": 1}
    joined = c.chat.completions.create(messages=[{"role": "user", "content": "Hi\nthere"}], **chat).usage
    glued = c.chat.completions.create(messages=[{"role": "user", "content": "Hithere"}], **chat).usage
    assert joined.prompt_tokens != glued.prompt_tokens  # (so the comparisons below tell the two apart)
    assert c.chat.completions.create(messages=[{"role": "user", "content": parts}], **chat).usage.prompt_tokens == \
        joined.prompt_tokens
    resp = {"model": "tiny", "max_output_tokens": 16}
    one = c.responses.create(input=[{"role": "user", "content": "Hi\nthere"}], **resp).usage.input_tokens
    two = c.responses.create(input=[{"role": "user", "content": [{"type": "input_text", "text": "Hi"},
                                                                  {"type": "input_text", "text": "there"}]}],
                             **resp).usage.input_tokens
    assert one == two == joined.prompt_tokens
