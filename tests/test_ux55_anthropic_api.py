"""Anthropic's Messages API as the official `anthropic` client meets it on a live server: what a tool_result's
`is_error` tells the model, and errors that name the fields the client sent (not the chat path's own)."""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pytest

from load_tests.live_server import LiveServer

GREEDY = {"temperature": 0}  # (the client's create() no longer takes sampling fields; the API still does)
TOOL = {"name": "get_weather", "description": "Weather in a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
ASKED = [{"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                            "input": {"city": "Paris"}}]}]


@pytest.fixture(scope="module")
def server(make_varied, tmp_path_factory):
    cfg = {"workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "models": [{"name": "tiny", "path": str(make_varied("qwen2")), "engine": {"max_num_seqs": 8}}]}
    with LiveServer(cfg, tmp_path_factory.mktemp("ux55-anthropic")) as srv:
        yield srv


def ac(srv) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=srv.url, api_key="x", max_retries=0, timeout=60)


def _result(content, **more) -> list[dict]:
    return [*ASKED, {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": content,
                                                  **more}]}]


def _chat(tool_says: str) -> list[dict]:
    """ASKED and a tool message saying `tool_says`, as the chat endpoint takes them."""
    return [ASKED[0], {"role": "assistant", "content": None, "tool_calls": [
        {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": tool_says}]


def _prompt(srv, chat: list[dict]) -> tuple[int, str]:
    """The chat endpoint's prompt for `chat`: its token count and its text (vLLM's /tokenize and /detokenize)."""
    t = httpx.post(srv.url + "/tokenize", json={"model": "tiny", "messages": chat}, timeout=30).json()
    text = httpx.post(srv.url + "/detokenize", json={"model": "tiny", "tokens": t["tokens"]}, timeout=30).json()
    return t["count"], text["prompt"]


def test_a_failed_tool_results_is_error_reaches_the_prompt(server):
    """A tool_result with is_error true (the call failed; its content the error) went to the model as a plain
    result, the flag dropped: the model read "disk full" as the weather. It is now the tool message "Error: disk
    full" (a chat template has no field for the flag): count_tokens, and the greedy reply, are the chat endpoint's for
    that tool message; without the flag (or false), the plain result's. An is_error block with no content is
    "Error"; an is_error that is not a boolean is a 400 naming it, as Anthropic's."""
    c = ac(server)
    n_err, text = _prompt(server, _chat("Error: disk full"))
    n_plain, _ = _prompt(server, _chat("disk full"))
    assert "Error: disk full" in text and n_err != n_plain
    # (a result of two text blocks: a line apart)
    for blocks, says in (("disk full", "disk full"), ([{"type": "text", "text": "disk"},
                                                        {"type": "text", "text": "full"}], "disk\nfull")):
        erred, plain = _prompt(server, _chat(f"Error: {says}"))[0], _prompt(server, _chat(says))[0]
        assert c.messages.count_tokens(model="tiny", messages=_result(blocks, is_error=True)).input_tokens == erred
        assert c.messages.count_tokens(model="tiny", messages=_result(blocks)).input_tokens == plain
        assert c.messages.count_tokens(model="tiny", messages=_result(blocks, is_error=False)).input_tokens == plain
    r = c.messages.create(model="tiny", messages=_result("disk full", is_error=True), max_tokens=6, extra_body=GREEDY)
    want = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0).chat.completions.create(
        model="tiny", messages=_chat("Error: disk full"), max_tokens=6, temperature=0)
    assert r.content[0].text == want.choices[0].message.content
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == n_err
    assert c.messages.count_tokens(model="tiny", messages=_result("", is_error=True)).input_tokens == \
        _prompt(server, _chat("Error"))[0]
    with pytest.raises(anthropic.BadRequestError) as ei:
        c.messages.count_tokens(model="tiny", messages=_result("disk full", is_error="yes"))
    assert "messages.2.content.0.is_error" in ei.value.body["error"]["message"], ei.value.body


def test_tool_choice_tool_needs_its_name(server):
    """tool_choice {"type": "tool"} without a name answered with the chat path's validation of its own tool_choice
    ("tool_choice.literal['none','auto','required']: Input should be ..."), words the client never sent; Anthropic's
    400 says tool_choice's name is required."""
    with pytest.raises(anthropic.BadRequestError) as ei:
        ac(server).messages.create(model="tiny", messages=ASKED[:1], max_tokens=4, tools=[TOOL],
                                   tool_choice={"type": "tool"})
    msg = ei.value.body["error"]["message"]
    assert ei.value.body["error"]["type"] == "invalid_request_error" and "tool_choice.name" in msg, msg
    assert "literal" not in msg and "required'" not in msg, msg


def test_a_tools_errors_name_its_input_schema_and_name(server):
    """A tool's input_schema that is no object schema, and a name the server refuses, were said in the chat path's
    terms ("tools.0.function.parameters: a function's parameters are ...", "tools.0.function.name"); the Messages
    API's client sent `input_schema` and `name`, which the 400 names now, from create() and count_tokens() alike."""
    c = ac(server)
    for tool, said in (({"name": "f", "input_schema": {"type": "string"}}, "tools.0.input_schema"),
                       ({"name": "bad name!", "input_schema": {"type": "object"}}, "tools.0.name")):
        for call, more in ((c.messages.create, {"max_tokens": 4}), (c.messages.count_tokens, {})):
            with pytest.raises(anthropic.BadRequestError) as ei:
                call(model="tiny", messages=ASKED[:1], tools=[tool], tool_choice={"type": "any"}, **more)
            msg = ei.value.body["error"]["message"]
            assert msg.startswith(said) and "function" not in msg, msg


def test_the_anthropic_clients_other_paths_answer_in_its_shape(server):
    """The `anthropic` client's calls this server does not serve (files, batches) are 404s in Anthropic's error shape
    (`{"type": "error", "error": {"type": "not_found_error", ...}}`): files.list() got OpenAI's, which the client
    cannot read (its error's type was lost)."""
    c = ac(server)
    for call in (c.beta.files.list, c.messages.batches.list):
        with pytest.raises(anthropic.NotFoundError) as ei:
            call()
        assert ei.value.body["type"] == "error" and ei.value.body["error"]["type"] == "not_found_error", ei.value.body
    r = httpx.get(server.url + "/v1/files")  # (the same path without the client's header: OpenAI's shape, as before)
    assert r.status_code == 404 and "type" in r.json()["error"] and r.json().get("type") != "error", r.text
    assert json.loads(httpx.get(server.url + "/v1/models").text)["object"] == "list"


def test_consecutive_turns_of_a_role_are_one_turn(server):
    """Two user messages in a row (or assistant ones) are one turn, as the Messages API combines them: they went to
    the template as two turns, which a template that holds the roles to alternate (Gemma's, Mistral's) refuses, and
    which showed the model a turn it never took. The prompt is now that of one turn, its texts a blank line apart
    (count_tokens and the reply as the chat endpoint's for the combined turn); a prefill split over two assistant
    messages is one prefill; a tool result's turn stays its own."""
    c = ac(server)
    oc = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    split = [{"role": "user", "content": "Hello"}, {"role": "user", "content": [{"type": "text", "text": "there"}]}]
    one = [{"role": "user", "content": "Hello\n\nthere"}]
    assert c.messages.count_tokens(model="tiny", messages=split).input_tokens == _count(server, one)
    r = c.messages.create(model="tiny", messages=split, max_tokens=5, extra_body=GREEDY)
    want = oc.chat.completions.create(model="tiny", messages=one, max_tokens=5, temperature=0)
    assert r.content[0].text == want.choices[0].message.content
    prefill = [*one, {"role": "assistant", "content": "Once"}, {"role": "assistant", "content": "upon"}]
    assert c.messages.count_tokens(model="tiny", messages=prefill).input_tokens == _count(
        server, [*one, {"role": "assistant", "content": "Once\n\nupon"}], continue_final_message=True,
        add_generation_prompt=False)
    after = [*_result("sunny"), {"role": "user", "content": "Thanks"}]
    assert c.messages.count_tokens(model="tiny", messages=after).input_tokens == _count(
        server, [*_chat("sunny"), {"role": "user", "content": "Thanks"}])


def _count(srv, chat: list[dict], **kw) -> int:
    return httpx.post(srv.url + "/tokenize", json={"model": "tiny", "messages": chat, **kw}, timeout=30).json()["count"]


def test_a_tool_use_block_sent_back_has_its_id_name_and_input(server):
    """An assistant's tool_use block without its name, with an input that is no object, or without its id went to
    the template as a call of tool None (or of arguments "x"), a 200; Anthropic's 400 names the field. One whole is
    taken, as before."""
    c = ac(server)
    call = ASKED[1]["content"][0]
    for bad, said in (({k: v for k, v in call.items() if k != "name"}, "messages.1.content.0.name: Field required"),
                      ({**call, "name": None}, "messages.1.content.0.name"),
                      ({**call, "input": "x"}, "messages.1.content.0.input"),
                      ({**call, "input": [1]}, "messages.1.content.0.input"),
                      ({k: v for k, v in call.items() if k != "id"}, "messages.1.content.0.id: Field required")):
        msgs = [ASKED[0], {"role": "assistant", "content": [bad]}, *_result("sunny")[2:]]
        for call_it, more in ((c.messages.count_tokens, {}), (c.messages.create, {"max_tokens": 2})):
            with pytest.raises(anthropic.BadRequestError) as ei:
                call_it(model="tiny", messages=msgs, **more)
            assert ei.value.body["error"]["message"].startswith(said), (bad, ei.value.body)
    assert c.messages.count_tokens(model="tiny", messages=_result("sunny")).input_tokens == _count(server, _chat("sunny"))


def test_an_empty_tool_choice_is_refused_not_read_as_auto(server):
    """tool_choice {} was read as auto (a 200, or auto's refusal on a model without a tool-call parser, which told the
    client to send what it had not chosen); Anthropic's 400 says tool_choice.type is required."""
    c = ac(server)
    for tools in ([], [TOOL]):
        with pytest.raises(anthropic.BadRequestError) as ei:
            c.messages.count_tokens(model="tiny", messages=ASKED[:1], tool_choice={}, **({"tools": tools} if tools
                                                                                         else {}))
        assert ei.value.body["error"]["message"].startswith("tool_choice.type: Field required"), ei.value.body


def test_a_reply_of_no_text_has_no_content_block(server):
    """A reply with no text (a stop sequence at its very start) was one text block of "" (streamed: a text block
    opened and closed with no delta); Anthropic's is `content: []` -- its text blocks are never empty, and one sent
    back in a conversation is a 400 ("text content blocks must be non-empty"), here as there. Streamed, no
    content_block event; the client's accumulated message has no block either. A reply with text is unchanged."""
    c = ac(server)
    msgs = [{"role": "user", "content": "Count: 1 2 3"}]
    free = c.messages.create(model="tiny", messages=msgs, max_tokens=6, extra_body=GREEDY).content[0].text
    assert free
    r = c.messages.create(model="tiny", messages=msgs, max_tokens=6, extra_body=GREEDY, stop_sequences=[free[0]])
    assert r.content == [] and r.stop_reason == "stop_sequence" and r.stop_sequence == free[0], r
    ev = httpx.post(server.url + "/v1/messages", timeout=60, json={
        "model": "tiny", "messages": msgs, "max_tokens": 6, "stop_sequences": [free[0]], "stream": True, **GREEDY})
    kinds = [line[7:] for line in ev.text.splitlines() if line.startswith("event: ")]
    assert kinds == ["message_start", "message_delta", "message_stop"], ev.text
    with c.messages.stream(model="tiny", messages=msgs, max_tokens=6, extra_body=GREEDY,
                           stop_sequences=[free[0]]) as s:
        final = s.get_final_message()
    assert final.content == [] and final.stop_reason == "stop_sequence"
    with c.messages.stream(model="tiny", messages=msgs, max_tokens=6, extra_body=GREEDY) as s:
        assert "".join(s.text_stream) == free and [b.type for b in s.get_final_message().content] == ["text"]


def test_an_image_in_a_tool_result_or_the_system_prompt_is_named(server):
    """An image (or document) block in a tool_result's content or in the system prompt was refused as "only text
    blocks are supported", where one in a message says "image blocks are not supported: the served models take
    text"; all three say so now, naming where it was."""
    c = ac(server)
    img = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
    for kw, where in (({"messages": _result([img])}, "messages.2.content.0.content"),
                      ({"messages": ASKED[:1], "system": [img]}, "system"),
                      ({"messages": [{"role": "user", "content": [img]}]}, "messages.0.content")):
        for call, more in ((c.messages.count_tokens, {}), (c.messages.create, {"max_tokens": 2})):
            with pytest.raises(anthropic.BadRequestError) as ei:
                call(model="tiny", **kw, **more)
            assert ei.value.body["error"]["message"] == \
                f"{where}: image blocks are not supported: the served models take text", ei.value.body


def test_a_call_cut_by_max_tokens_ends_in_its_tool_use_block(server):
    """A call that max_tokens cut short (tool_choice any or tool) was a text block of the call's JSON as far as it
    got ('[{"name": "get_we'), the chat path's own format, which a client took for the answer; Anthropic's reply
    ends in the call's tool_use block, its input incomplete, with stop_reason max_tokens (its documented cue to retry
    with more max_tokens). Its name is the tool named, the one tool, or the one the output names; streamed alike."""
    c = ac(server)
    short = {**TOOL, "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                                      "required": ["city"], "additionalProperties": False}}
    other = {**short, "name": "get_time", "description": "Time in a city"}
    any_one = {"type": "any", "disable_parallel_tool_use": True}  # (one call: the whole call ends)
    for tools, choice, max_tokens in (([short], {"type": "tool", "name": "get_weather"}, 2),
                                      ([short], any_one, 2), ([other, short], any_one, 12)):
        kw = {"model": "tiny", "messages": ASKED[:1], "max_tokens": max_tokens, "tools": tools, "tool_choice": choice,
              "extra_body": GREEDY}
        whole = c.messages.create(**{**kw, "max_tokens": 60})
        assert whole.stop_reason == "tool_use", (choice, whole)  # (the call the cut one begins)
        want = whole.content[0].name
        r = c.messages.create(**kw)
        assert r.stop_reason == "max_tokens" and [b.type for b in r.content] == ["tool_use"], r
        assert r.content[0].name == want and r.content[0].input == {}, r
        with c.messages.stream(**kw) as s:
            final = s.get_final_message()
        assert final.stop_reason == "max_tokens" and [(b.type, b.name) for b in final.content] == [("tool_use", want)]


def test_a_tool_result_answers_a_tool_use_of_the_previous_message(server):
    """A tool_result whose tool_use_id no tool_use block of the message before it has (a result of no call, or of a
    call two turns back) was rendered as an answer to nothing the model asked, a 200; Anthropic's is a 400 naming the
    block. A result of the previous message's call is taken, as before."""
    c = ac(server)
    unasked = [ASKED[0], {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                                         "content": "sunny"}]}]
    other_id = [*ASKED, {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_2",
                                                        "content": "sunny"}]}]
    two_back = [*_result("sunny"), {"role": "assistant", "content": "It is sunny."},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "rain"}]}]
    for msgs, at, tid in ((unasked, 1, "toolu_1"), (other_id, 2, "toolu_2"), (two_back, 4, "toolu_1")):
        for call_it, more in ((c.messages.count_tokens, {}), (c.messages.create, {"max_tokens": 2})):
            with pytest.raises(anthropic.BadRequestError) as ei:
                call_it(model="tiny", messages=msgs, **more)
            assert ei.value.body["error"]["message"].startswith(
                f"messages.{at}.content.0: unexpected `tool_use_id` found in `tool_result` blocks: {tid}."), ei.value.body
    assert c.messages.count_tokens(model="tiny", messages=_result("sunny")).input_tokens == _count(server, _chat("sunny"))


def test_text_blocks_are_a_line_apart_and_claude_codes_billing_block_is_left_out(server):
    """A message's text blocks, and a tool_result's, reach the template a line apart, as vLLM's Messages API gives
    them (as the chat path's text parts); they were glued. The system's blocks stay glued, as vLLM's, less Claude
    Code's first block (its version and a hash that changes every request: no prompt of it would share a cached
    prefix with the one before), which vLLM's leaves out too."""
    c = ac(server)
    blocks = [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]
    assert _count(server, [{"role": "user", "content": "Hi\nthere"}]) != _count(server, [{"role": "user",
                                                                                          "content": "Hithere"}])
    assert c.messages.count_tokens(model="tiny", messages=[{"role": "user", "content": blocks}]).input_tokens == \
        _count(server, [{"role": "user", "content": "Hi\nthere"}])
    assert c.messages.count_tokens(model="tiny", messages=_result(blocks)).input_tokens == \
        _count(server, _chat("Hi\nthere"))
    system = [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.0.14.abc; cc_entrypoint=cli; cch=9f3e;"},
              {"type": "text", "text": "You are terse. "}, {"type": "text", "text": "Answer in French."}]
    got = c.messages.count_tokens(model="tiny", system=system, messages=ASKED[:1]).input_tokens
    assert got == _count(server, [{"role": "system", "content": "You are terse. Answer in French."}, ASKED[0]])
