"""The OpenAI routes as a user moving from vLLM's OpenAI-compatible server meets them, through the official `openai`
client (and vLLM's /tokenize over httpx) on one live server with the real SmolLM2 (greedy, so each reply is known):

- the token that ended a reply (EOS, or one of vLLM's `stop_token_ids`) was part of its text: with
  `skip_special_tokens: false` every chat reply ended "<|im_end|>", and a stop_token_ids' ordinary token (",") was
  kept. vLLM leaves it out unless `include_stop_str_in_output`, streamed or not; so does tokenpool now;
- `min_tokens` held off EOS and stop_token_ids but not stop strings, which vLLM looks for only once the output has
  min_tokens tokens: `stop: " 7"` with `min_tokens: 10` ended the reply at its fourth token;
- vLLM's `chat_template` (a template of the client's own) was ignored unsaid, the reply made with the model's own
  template: a 400 naming the field now, as vLLM answers one it is not started to trust;
- vLLM's /tokenize `return_token_strs` was ignored: its `token_strs` (each token's piece) now come back.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.ports import live_server_on
from tests.ux66c_at_once import BURSTS, at_once

PORTS = range(26500, 26600)
HI = [{"role": "user", "content": "Say hi"}]
SHORT = [*HI, {"role": "assistant", "content": "Hi!"}, *HI]  # (greedy: "Hey!" and the EOS, three tokens)
COUNT = "1, 2, 3, 4, 5,"  # (greedy: " 6, 7, 8, ...", each number three tokens: " ", the digit, ",")


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    cfg = {"workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25}, **BURSTS,
           "models": [{"name": "smol", "path": str(smollm2), "engine": {"max_num_seqs": 8}}]}
    with live_server_on(PORTS, cfg, tmp_path_factory.mktemp("ux61d")) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def _tokenize(server, **body) -> dict:
    r = httpx.post(server.url + "/tokenize", json={"model": "smol", **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _chat(client, stream: bool, **extra) -> tuple[str, str | None, object]:
    """(content, finish_reason, stop_reason) of a greedy chat reply to SHORT, streamed or not."""
    kw = dict(model="smol", messages=SHORT, max_tokens=20, temperature=0, extra_body=extra)
    if not stream:
        ch = client.chat.completions.create(**kw).choices[0]
        return ch.message.content, ch.finish_reason, ch.model_extra.get("stop_reason")
    text, finish, stop = "", None, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            text += ch.delta.content or ""
            if ch.finish_reason:
                finish, stop = ch.finish_reason, ch.model_extra.get("stop_reason")
    return text, finish, stop


def _completion(client, stream: bool, **extra) -> tuple[str, str | None, object]:
    """(text, finish_reason, stop_reason) of a greedy completion of COUNT, streamed or not."""
    stop = extra.pop("stop", None)
    kw = dict(model="smol", prompt=COUNT, max_tokens=12, temperature=0, stop=stop, extra_body=extra)
    if not stream:
        ch = client.completions.create(**kw).choices[0]
        return ch.text, ch.finish_reason, ch.model_extra.get("stop_reason")
    text, finish, why = "", None, None
    for chunk in client.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            text += ch.text
            if ch.finish_reason:
                finish, why = ch.finish_reason, ch.model_extra.get("stop_reason")
    return text, finish, why


def both(*calls) -> dict:
    """{stream: [each of `calls` called with stream]} for stream False and True, all at once (one batch in the engine:
    two streams' three requests are six, within max_num_seqs 8; each stream's were a batch of its own)."""
    got = at_once(*(lambda s=s, c=c: c(s) for s in (False, True) for c in calls))
    return {False: got[:len(calls)], True: got[len(calls):]}


@pytest.fixture(scope="module")
def eos(client) -> dict:
    return both(lambda s: _chat(client, s, skip_special_tokens=False),
                lambda s: _chat(client, s, skip_special_tokens=False, include_stop_str_in_output=True),
                lambda s: _chat(client, s))


@pytest.mark.parametrize("stream", [False, True])
def test_the_eos_that_ended_a_reply_is_not_in_its_text(eos, stream):
    """skip_special_tokens false shows the special tokens a reply holds, not the EOS that ended it (vLLM's); with
    include_stop_str_in_output it is kept, as vLLM keeps it."""
    (text, finish, stop), (kept, kept_finish, _), skipped = eos[stream]
    assert finish == "stop" and stop is None, (text, finish, stop)
    assert text and "<|im_end|>" not in text, text
    assert kept_finish == "stop" and kept == text + "<|im_end|>", (kept, text)
    # (skipped, as by default, the text is the same)
    assert skipped[0] == text


@pytest.fixture(scope="module")
def comma(server) -> int:
    [comma] = _tokenize(server, prompt=",", add_special_tokens=False)["tokens"]
    return comma


@pytest.fixture(scope="module")
def stopped(client, comma) -> dict:
    return both(lambda s: _completion(client, s), lambda s: _completion(client, s, stop_token_ids=[comma]),
                lambda s: _completion(client, s, stop_token_ids=[comma], include_stop_str_in_output=True))


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_token_id_is_not_in_the_text(stopped, comma, stream):
    """A stop_token_ids' ordinary token ends the reply without its text (stop_reason its id), as vLLM's; kept with
    include_stop_str_in_output."""
    assert stopped[stream] == [(" 6, 7, 8, 9,", "length", None), (" 6", "stop", comma), (" 6,", "stop", comma)]


@pytest.fixture(scope="module")
def held_off(client) -> dict:
    return both(lambda s: _completion(client, s, stop=" 7"), lambda s: _completion(client, s, stop=" 7", min_tokens=10),
                lambda s: _completion(client, s, stop=" 8", min_tokens=4))


@pytest.mark.parametrize("stream", [False, True])
def test_min_tokens_holds_off_stop_strings(held_off, stream):
    """A stop string ends the output only once it has min_tokens tokens, as vLLM's: " 7" within the first ten
    tokens does not stop it; one past min_tokens does."""
    assert held_off[stream] == [(" 6,", "stop", " 7"), (" 6, 7, 8, 9,", "length", None), (" 6, 7,", "stop", " 8")]


def test_a_chat_template_of_the_clients_own_is_a_400(server, client):
    """vLLM's `chat_template` is refused, naming the field (it was ignored: the model's template made the reply)."""
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="smol", messages=HI, max_tokens=2,
                                       extra_body={"chat_template": "{{ messages[0]['content'] }}"})
    err = ei.value.body
    assert ei.value.status_code == 400 and err["param"] == "chat_template", err
    assert err["type"] == "invalid_request_error" and "chat_template" in err["message"], err
    r = httpx.post(server.url + "/tokenize", json={"model": "smol", "messages": HI, "chat_template": "{{ 'x' }}"},
                   timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template", r.text
    # (chat_template_kwargs still reach the model's own template)
    assert client.chat.completions.create(model="smol", messages=HI, max_tokens=2,
                                          extra_body={"chat_template_kwargs": {"x": 1}}).choices[0].message.content


def test_tokenize_return_token_strs(server):
    """vLLM's /tokenize `return_token_strs`: each token's piece (byte-level BPE's, a space as "Ġ"); null unasked."""
    got = _tokenize(server, prompt="Hello world", return_token_strs=True)
    assert got["tokens"] == _tokenize(server, prompt="Hello world")["tokens"] and got["count"] == 2, got
    assert got["token_strs"] == ["Hello", "\u0120world"], got
    assert _tokenize(server, prompt="Hello world")["token_strs"] is None
    chat = _tokenize(server, messages=HI, return_token_strs=True)
    assert len(chat["token_strs"]) == chat["count"] and "<|im_start|>" in chat["token_strs"], chat


@pytest.mark.parametrize("stream", [False, True])
def test_chat_echo_starts_the_reply_with_the_message_it_continues(client, stream):
    """vLLM's chat `echo` (it was ignored unsaid): with continue_final_message, each choice's content starts with the
    assistant message it continues, the continuation after it; a last message of another role than the reply's is
    not echoed. With tools (which hold the reply to their calls) it is a 400 naming it."""
    start = [*HI, {"role": "assistant", "content": "Hello, my name"}]

    def reply(messages, **extra) -> list[str]:
        kw = dict(model="smol", messages=messages, max_tokens=5, temperature=0, n=2, extra_body=extra)
        if not stream:
            return [ch.message.content for ch in client.chat.completions.create(**kw).choices]
        out = ["", ""]
        for chunk in client.chat.completions.create(stream=True, **kw):
            for ch in chunk.choices:
                out[ch.index] += ch.delta.content or ""
        return out

    go_on = dict(continue_final_message=True, add_generation_prompt=False)
    # (three requests of n=2 at once, then two: no more than max_num_seqs 8 sequences at a time)
    [rest, rest2], echoed, echoed_too = at_once(lambda: reply(start, **go_on), lambda: reply(start, echo=True, **go_on),
                                                lambda: reply(start, echo=True, continue_final_message=True))
    hi_echoed, hi = at_once(lambda: reply(HI, echo=True), lambda: reply(HI))
    assert rest and rest == rest2, rest
    assert echoed == echoed_too == ["Hello, my name" + rest] * 2
    assert hi_echoed == hi  # (the user's message: not the reply's role)
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="smol", messages=HI, max_tokens=2, extra_body={"echo": True},
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert ei.value.body["param"] == "echo", ei.value.body
