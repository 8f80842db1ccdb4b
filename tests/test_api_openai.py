"""The official `openai` client against a live server driving the real engine with tiny CPU models."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller.keys import hash_key
from load_tests.live_server import LiveServer

ADMIN = "admin-test-token"
METRICS = "metrics-scrape-token"
ALICE, BOB, SLOW = "key-alice-0123456789", "key-bob-0123456789", "key-slow-0123456789"


@pytest.fixture(scope="module")
def server(make_tiny, tmp_path_factory):
    cfg = {
        "admin_token_hash": hash_key(ADMIN),
        "metrics_token_hash": hash_key(METRICS),
        "workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
        "autoscaler": {"interval_s": 0.5},
        "tenants": [
            {"name": "alice", "key_hashes": [hash_key(ALICE)]},
            {"name": "bob", "key_hashes": [hash_key(BOB)], "models": ["tiny-b"]},
            {"name": "slow", "key_hashes": [hash_key(SLOW)], "rate": {"requests_per_s": 0.5, "burst": 1}},
        ],
        "models": [
            {"name": "tiny-a", "path": str(make_tiny("qwen2")), "engine": {"max_num_seqs": 8}},
            {"name": "tiny-b", "path": str(make_tiny("llama")), "engine": {"max_num_seqs": 8},
             "tool_call_parser": "hermes"},
            {"name": "pace-1", "engine": {"kind": "pace", "pace_s_per_token": 0.05, "max_num_seqs": 1},
             "slo": {"ttft_s": 0.5, "tpot_s": 0.2}},
        ],
    }
    with LiveServer(cfg, tmp_path_factory.mktemp("api")) as srv:
        yield srv


def client(srv, key=ALICE) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=30)


GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


def test_models_are_per_tenant(server):
    assert {m.id for m in client(server).models.list()} == {"tiny-a", "tiny-b", "pace-1"}
    assert [m.id for m in client(server, BOB).models.list()] == ["tiny-b"]


def test_completion_usage_and_max_tokens(server):
    r = client(server).completions.create(model="tiny-a", prompt="Hello there", max_tokens=5, **GREEDY)
    assert r.object == "text_completion" and r.model == "tiny-a"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_and_max_completion_tokens(server):
    r = client(server).chat.completions.create(model="tiny-b", messages=[{"role": "user", "content": "Hi"}],
                                               max_completion_tokens=3, **GREEDY)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    assert isinstance(r.choices[0].message.content, str)


def test_chat_content_parts_text_and_refused_kinds(server):
    """Text parts read as the plain string of them a line apart, as vLLM joins them (they were glued: "see the
    table:" and "Name,Age" read as one line); an image (or any non-text) part is refused with a 400 that names the
    part's type and the message it is in, not a union's first mismatch."""
    c = client(server)
    plain = c.chat.completions.create(model="tiny-b", messages=[{"role": "user", "content": "Hi\nthere"}],
                                      max_tokens=4, **GREEDY)
    parts = c.chat.completions.create(model="tiny-b", messages=[{"role": "user", "content": [
        {"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}], max_tokens=4, **GREEDY)
    assert parts.choices[0].message.content == plain.choices[0].message.content
    assert parts.usage.prompt_tokens == plain.usage.prompt_tokens
    e = _status(lambda: c.chat.completions.create(model="tiny-b", max_tokens=4, messages=[
        {"role": "user", "content": "Hi"},
        {"role": "user", "content": [{"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": "x"}}]}]))
    assert e.status_code == 400 and e.body["param"] == "messages.1.content"
    assert "content parts of type 'image_url' are not supported" in e.body["message"]


def test_streaming_matches_non_streaming_and_reports_usage(server):
    c = client(server)
    full = c.completions.create(model="tiny-a", prompt="Once upon", max_tokens=8, **GREEDY)
    chunks = list(c.completions.create(model="tiny-a", prompt="Once upon", max_tokens=8, stream=True,
                                       stream_options={"include_usage": True}, **GREEDY))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == full.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert all(ch.usage is None for ch in chunks[:-1])


def test_continuous_usage_stats(server):
    """vLLM's stream_options.continuous_usage_stats: every chunk carries the usage so far (its completion tokens never
    falling, the prompt's fixed), the last the whole request's; without it only the last does."""
    c = client(server)
    for kind in ("chat", "completion"):
        kw = dict(model="tiny-a", max_tokens=5, stream=True, **GREEDY,
                  stream_options={"include_usage": True, "continuous_usage_stats": True})
        chunks = list(c.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], **kw) if kind == "chat"
                      else c.completions.create(prompt="Hi", **kw))
        used = [ch.usage for ch in chunks]
        assert all(u is not None for u in used) and used[-1].completion_tokens == 5, kind
        done = [u.completion_tokens for u in used]
        assert done == sorted(done) and len({u.prompt_tokens for u in used}) == 1
        assert all(u.total_tokens == u.prompt_tokens + u.completion_tokens for u in used)
    plain = list(c.completions.create(model="tiny-a", prompt="Hi", max_tokens=3, stream=True, **GREEDY,
                                      stream_options={"include_usage": True}))
    assert [ch.usage is None for ch in plain] == [True] * (len(plain) - 1) + [False]


def test_chat_stream_shape(server):
    chunks = list(client(server).chat.completions.create(
        model="tiny-a", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True, **GREEDY))
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert chunks[-1].choices[0].finish_reason == "length" and not chunks[-1].choices[0].delta.content
    assert len({ch.id for ch in chunks}) == 1


def test_stop_string(server):
    c = client(server)
    text = c.completions.create(model="tiny-a", prompt="abc", max_tokens=12, **GREEDY).choices[0].text
    assert len(text) >= 4
    stop = text[2:4]
    r = c.completions.create(model="tiny-a", prompt="abc", max_tokens=12, stop=[stop], **GREEDY)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[: text.index(stop)]


def test_completion_text_offset_with_stop_strings(server):
    """logprobs.text_offset is each token's place in the text: the offset before it plus the tokens' lengths before
    it, whether or not a stop string holds text back (the engine keeps back what could begin a stop string: the
    offsets followed the text sent so far and lagged, [0, 0, 0, 1, ...]), streamed, and echoed with the prompt."""
    c = client(server)
    text = c.completions.create(model="tiny-b", prompt="x", max_tokens=16, **GREEDY).choices[0].text
    assert len(text) >= 10 and text.index(text[6:10]) == 6, text
    stop = text[6:10]

    def check(tokens, offsets, start=0):
        want = [start + sum(len(t) for t in tokens[:j]) for j in range(len(tokens))]
        assert offsets == want, (tokens, offsets, want)

    for kw in ({"stop": [stop]}, {}):
        r = c.completions.create(model="tiny-b", prompt="x", max_tokens=16, logprobs=1, **kw, **GREEDY)
        lp = r.choices[0].logprobs
        assert r.choices[0].text == (text[: text.index(stop)] if kw else text)
        check(lp.tokens, lp.text_offset)
        chunks = list(c.completions.create(model="tiny-b", prompt="x", max_tokens=16, logprobs=1, stream=True, **kw,
                                           **GREEDY))
        lps = [ch.choices[0].logprobs for ch in chunks if ch.choices and ch.choices[0].logprobs]
        check([t for lp in lps for t in lp.tokens], [o for lp in lps for o in lp.text_offset])
        r = c.completions.create(model="tiny-b", prompt="x", max_tokens=16, logprobs=1, echo=True, **kw, **GREEDY)
        lp = r.choices[0].logprobs
        check(lp.tokens, lp.text_offset)


def test_stop_reason_says_what_stopped_it(server):
    """vLLM's `stop_reason` beside finish_reason: the stop string or stop token id that ended a choice (None for the
    end of text or the length), in replies and in a stream's finishing chunk, on both endpoints."""
    c = client(server)
    lp = c.completions.create(model="tiny-b", prompt="x", max_tokens=8, logprobs=0, **{
        **GREEDY, "extra_body": {"ignore_eos": True, "return_tokens_as_token_ids": True}}).choices[0].logprobs
    ids = [int(t.removeprefix("token_id:")) for t in lp.tokens]
    text = c.completions.create(model="tiny-b", prompt="x", max_tokens=8, **GREEDY).choices[0].text
    stop = text[6:10]
    msgs = [{"role": "user", "content": "x"}]
    for kw, want in (({"stop": [stop]}, stop), ({"extra_body": {"ignore_eos": True, "stop_token_ids": [ids[3]]}},
                                                  ids[3]), ({}, None)):
        args = {**GREEDY, **kw, "extra_body": {"ignore_eos": True, **kw.get("extra_body", {})}}
        r = c.completions.create(model="tiny-b", prompt="x", max_tokens=8, **args).choices[0]
        assert (r.finish_reason, r.model_extra.get("stop_reason", "-")) == ("length" if want is None else "stop",
                                                                           want), (kw, r)
        last = [ch.choices[0] for ch in c.completions.create(model="tiny-b", prompt="x", max_tokens=8, stream=True,
                                                              **args) if ch.choices][-1]
        assert last.finish_reason and last.model_extra.get("stop_reason", "-") == want, (kw, last)
    chat = c.chat.completions.create(model="tiny-b", messages=msgs, max_tokens=8, **GREEDY).choices[0].message.content
    for kw, want in (({"stop": [chat[3:6]]}, chat[3:6]), ({}, None)):
        r = c.chat.completions.create(model="tiny-b", messages=msgs, max_tokens=8, **kw, **GREEDY).choices[0]
        assert r.model_extra.get("stop_reason", "-") == want, (kw, r)
        last = [ch.choices[0] for ch in c.chat.completions.create(model="tiny-b", messages=msgs, max_tokens=8,
                                                                   stream=True, **kw, **GREEDY) if ch.choices][-1]
        assert last.finish_reason and last.model_extra.get("stop_reason", "-") == want, (kw, last)


def test_seed_reproducible_and_n(server):
    c = client(server)

    def go(seed):
        return c.completions.create(model="tiny-a", prompt="x", max_tokens=12, temperature=1.0, seed=seed,
                                    extra_body={"ignore_eos": True}).choices[0].text

    assert go(7) == go(7)
    assert go(7) != go(8) or go(9) != go(7)
    r = c.completions.create(model="tiny-a", prompt="x", max_tokens=4, n=3, seed=1, temperature=1.0,
                             extra_body={"ignore_eos": True})
    assert sorted(ch.index for ch in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == 12


def test_logprobs(server):
    c = client(server)
    r = c.completions.create(model="tiny-a", prompt="x", max_tokens=3, logprobs=2, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 3 and len(lp.token_logprobs) == 3 and all(len(t) <= 2 for t in lp.top_logprobs)
    r = c.chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                  logprobs=True, top_logprobs=2, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)
    chunks = list(c.completions.create(model="tiny-a", prompt="x", max_tokens=3, logprobs=2, stream=True, **GREEDY))
    lps = [ch.choices[0].logprobs for ch in chunks if ch.choices and ch.choices[0].text]
    assert sum(len(lp.tokens) for lp in lps) == 3 and all(len(lp.tokens) == len(lp.text_offset) for lp in lps)


def test_chat_logprobs_bytes_of_partial_characters(server, tiny_model):
    """A token that is part of a character's UTF-8 (one byte of an emoji) has its own bytes in logprobs' `bytes`, as
    OpenAI gives them so a client can join tokens back into text: they were the replacement character's
    ([239, 191, 189], what the token decodes to alone) for every such token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = tok.encode("\U0001f389", add_special_tokens=False)  # (four byte tokens here, each decoding to U+FFFD)
    raw = {tok.decode([i]): None for i in ids}
    assert list(raw) == ["\ufffd"] and len(ids) == 4, ids
    want = [list("\U0001f389".encode())[k:k + 1] for k in range(4)]
    r = client(server).chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": "party"}],
                                               max_tokens=6, logprobs=True, top_logprobs=4,
                                               extra_body={"allowed_token_ids": ids, "ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    for t in content:
        assert t.token == "\ufffd" and t.bytes in want, t
        for x in t.top_logprobs:  # (the alternatives are the model's, past allowed_token_ids: any token)
            assert x.bytes != [239, 191, 189] if x.token == "\ufffd" else x.bytes == list(x.token.encode()), x


def test_completion_top_logprobs_hold_the_sampled_token(server):
    """Completions' top_logprobs hold the sampled token beside the `logprobs` most likely ("the API will always return
    the logprob of the sampled token, so there may be up to logprobs+1 elements", as OpenAI's legacy API and vLLM
    give them): a sampled token outside the top k was missing, and logprobs=0 gave {} instead of it alone."""
    c = client(server)
    for k in (0, 2):
        for stream in (False, True):
            kw = dict(model="tiny-b", prompt="x", max_tokens=12, logprobs=k, temperature=2.0, seed=11,
                      extra_body={"ignore_eos": True})
            if stream:
                parts = [ch.choices[0].logprobs for ch in c.completions.create(stream=True, **kw)
                         if ch.choices and ch.choices[0].logprobs]
            else:
                parts = [c.completions.create(**kw).choices[0].logprobs]
            got = [(t, lp, top) for part in parts
                   for t, lp, top in zip(part.tokens, part.token_logprobs, part.top_logprobs)]
            assert len(got) == 12
            for t, lp, top in got:
                assert top.get(t) == lp and len(top) <= k + 1, (k, t, lp, top)
                assert list(top.values()) == sorted(top.values(), reverse=True), top
            if k:
                assert any(len(top) == k + 1 for _, _, top in got), got  # (sampled hot: some fall outside the top k)


def test_truncate_prompt_tokens_on_completions_and_chat(server):
    """vLLM's truncate_prompt_tokens on completions and chat keeps a prompt's last N tokens (-1: as many as the
    context takes); it was ignored: a long prompt was a 400 and a short one was fed whole. Past the context: a 400."""
    c = client(server)
    ctx = next(m for m in c.models.list() if m.id == "tiny-a").max_model_len
    r = c.completions.create(model="tiny-a", prompt="word " * 5000, max_tokens=2, extra_body={"truncate_prompt_tokens": 20})
    assert r.usage.prompt_tokens == 20
    ids = httpx.post(server.url + "/tokenize", json={"model": "tiny-a", "prompt": "Once upon a time there"},
                     headers={"Authorization": f"Bearer {ALICE}"}).json()["tokens"]
    short = c.completions.create(model="tiny-a", prompt="Once upon a time there", max_tokens=4,
                                 extra_body={"truncate_prompt_tokens": 3, "ignore_eos": True}, temperature=0)
    last3 = c.completions.create(model="tiny-a", prompt=ids[-3:], max_tokens=4, **GREEDY)
    assert short.usage.prompt_tokens == 3 and short.choices[0].text == last3.choices[0].text
    r = c.completions.create(model="tiny-a", prompt="word " * 5000, max_tokens=1, extra_body={"truncate_prompt_tokens": -1})
    assert r.usage.prompt_tokens == ctx - 1
    r = c.chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": "word " * 5000}], max_tokens=2,
                                  extra_body={"truncate_prompt_tokens": 10})
    assert r.usage.prompt_tokens == 10
    e = _status(lambda: c.completions.create(model="tiny-a", prompt="x", max_tokens=1,
                                             extra_body={"truncate_prompt_tokens": ctx + 1}))
    assert e.status_code == 400 and e.body["param"] == "truncate_prompt_tokens", e.body


def test_vllm_extras_it_cannot_honour_are_refused_and_token_ids_as_tokens(server):
    """vLLM's prompt_logprobs and use_beam_search were ignored (no prompt logprobs in the reply, a sampled output for
    a beam search): a 400 naming each; return_tokens_as_token_ids writes logprobs' tokens as "token_id:N" on both
    endpoints, as vLLM does (it was ignored)."""
    c = client(server)
    msgs = [{"role": "user", "content": "Hi"}]
    for extra in ({"prompt_logprobs": 1}, {"use_beam_search": True}):
        (param,) = extra
        e = _status(lambda x=extra: c.chat.completions.create(model="tiny-a", messages=msgs, max_tokens=2, extra_body=x))
        assert e.status_code == 400 and e.body["param"] == param, e.body
        e = _status(lambda x=extra: c.completions.create(model="tiny-a", prompt="x", max_tokens=2, extra_body=x))
        assert e.status_code == 400 and e.body["param"] == param, e.body
    ok = c.completions.create(model="tiny-a", prompt="x", max_tokens=2, extra_body={"use_beam_search": False,
                                                                                   "prompt_logprobs": None})
    assert ok.usage.completion_tokens >= 1
    ids = {"return_tokens_as_token_ids": True, "ignore_eos": True}
    r = c.completions.create(model="tiny-a", prompt="x", max_tokens=3, logprobs=2, temperature=0, extra_body=ids)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 3 and all(t.startswith("token_id:") and t[9:].isdigit() for t in lp.tokens), lp.tokens
    assert all(k.startswith("token_id:") for top in lp.top_logprobs for k in top), lp.top_logprobs
    r = c.chat.completions.create(model="tiny-a", messages=msgs, max_tokens=3, logprobs=True, top_logprobs=2,
                                  temperature=0, extra_body=ids)
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(t.token.startswith("token_id:") and t.bytes == list(t.token.encode())
                                     for t in content), content
    assert all(x.token.startswith("token_id:") for t in content for x in t.top_logprobs)


def test_sampling_extras_pass_through(server):
    r = client(server).completions.create(
        model="tiny-a", prompt="x", max_tokens=4, temperature=0.7, top_p=0.9, presence_penalty=0.5,
        frequency_penalty=0.5, extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": True})
    assert r.usage.completion_tokens == 4


def test_min_tokens_past_max_tokens_is_a_400(server):
    """min_tokens above max_tokens (max_completion_tokens) cannot be honoured: a 400 naming min_tokens, as vLLM
    answers it (the output was cut at max_tokens, shorter than asked, with no word); equal is fine."""
    c = client(server)
    msgs = [{"role": "user", "content": "Hi"}]
    for kw in ({"max_tokens": 2}, {"max_completion_tokens": 2}):
        e = _status(lambda k=kw: c.chat.completions.create(model="tiny-a", messages=msgs, extra_body={"min_tokens": 5},
                                                            **k))
        assert e.status_code == 400 and e.body["param"] == "min_tokens" and "max_tokens" in e.body["message"], e.body
    e = _status(lambda: c.completions.create(model="tiny-a", prompt="x", extra_body={"min_tokens": 17}))  # (16: default)
    assert e.status_code == 400 and e.body["param"] == "min_tokens", e.body
    r = c.completions.create(model="tiny-a", prompt="x", max_tokens=3, temperature=0, extra_body={"min_tokens": 3})
    assert r.usage.completion_tokens == 3


def test_allowed_token_ids_and_include_stop_str_in_output(server, tiny_model):
    """vLLM's allowed_token_ids (only those ids are drawn, sampled or greedy) and include_stop_str_in_output (the
    stop string that ends the output is kept, streamed or not); bad ids are 400s naming the field."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    a, b = tok.encode(" hello")[0], tok.encode(" world")[0]
    c = client(server)
    r = c.completions.create(model="tiny-a", prompt="Hello there", max_tokens=6, temperature=1.0, seed=3,
                             logprobs=0, extra_body={"allowed_token_ids": [a, b], "ignore_eos": True})
    assert r.usage.completion_tokens == 6
    assert set(r.choices[0].logprobs.tokens) <= {tok.decode([a]), tok.decode([b])}
    r = c.completions.create(model="tiny-a", prompt="Hello there", max_tokens=3, temperature=0,
                             extra_body={"allowed_token_ids": [b], "ignore_eos": True})
    assert r.choices[0].text == tok.decode([b] * 3)
    for ids, words in (([], "at least 1 item"), ([-1], "greater than or equal to 0"),
                       ([4000], "allowed_token_ids: token id 4000 is outside the vocabulary (size 4000)")):
        e = _status(lambda i=ids: c.completions.create(model="tiny-a", prompt="x", max_tokens=1,
                                                       extra_body={"allowed_token_ids": i}))
        assert e.status_code == 400 and words in e.body["message"] and e.body["param"].startswith("allowed_token_ids")

    full = c.completions.create(model="tiny-a", prompt="Once upon", max_tokens=12, temperature=0,
                                extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert len(stop) == 3
    at = full.find(stop)
    for include in (False, True):
        kw = dict(model="tiny-a", prompt="Once upon", max_tokens=12, temperature=0, stop=[stop],
                  extra_body={"ignore_eos": True, "include_stop_str_in_output": include})
        want = full[: at + len(stop)] if include else full[:at]
        r = c.completions.create(**kw)
        assert r.choices[0].text == want and r.choices[0].finish_reason == "stop", (include, r.choices[0].text)
        streamed = "".join(ch.choices[0].text for ch in c.completions.create(stream=True, **kw) if ch.choices)
        assert streamed == want


def test_bad_words(server):
    """vLLM's bad_words: a word the greedy output holds is not generated once banned (alone or after a space), the
    output is the same greedy one up to it and goes on past it (a ban is not a stop); a blank word is a 400 naming the
    field."""
    c = client(server)
    kw = dict(model="tiny-a", prompt="Once upon a time", max_tokens=12, temperature=0, logprobs=0)
    free = c.completions.create(**kw, extra_body={"ignore_eos": True}).choices[0]
    word = next(t for t in free.logprobs.tokens if t.strip())
    banned = c.completions.create(**kw, extra_body={"ignore_eos": True, "bad_words": [word.strip()]}).choices[0]
    assert all(t.strip() != word.strip() for t in banned.logprobs.tokens), (word, banned.logprobs.tokens)
    assert banned.text != free.text and len(banned.logprobs.tokens) == 12
    first = free.logprobs.tokens.index(word)
    assert banned.logprobs.tokens[:first] == free.logprobs.tokens[:first]  # (the same until the banned word)
    e = _status(lambda: c.completions.create(model="tiny-a", prompt="x", max_tokens=1, extra_body={"bad_words": [""]}))
    assert e.status_code == 400 and e.body["param"].startswith("bad_words")


def test_logit_bias_and_min_tokens(server, tiny_model):
    """logit_bias as OpenAI means it (a +100 token is drawn every step; keys are ids as strings), min_tokens as vLLM
    means it (EOS, made the likeliest token, cannot end the output before that many tokens); bad values are 400s
    naming the field."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    t = tok.encode(" hello")[0]
    c = client(server)
    r = c.completions.create(model="tiny-a", prompt="Hello there", max_tokens=3, temperature=0.8, seed=1,
                             logit_bias={str(t): 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].text == tok.decode([t] * 3) and r.usage.completion_tokens == 3
    eos = {str(tok.eos_token_id): 100}
    r = c.chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": "x"}], max_tokens=8,
                                  temperature=0, logit_bias=eos)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 1 and r.choices[0].message.content == ""
    r = c.chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": "x"}], max_tokens=8,
                                  temperature=0, logit_bias=eos, extra_body={"min_tokens": 3})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 4
    for bias, words in (({"a": 1}, "logit_bias: keys are token ids (non-negative integers, written as strings); got 'a'"),
                        ({"-1": 1}, "got '-1'"), ({"1": 101}, "less than or equal to 100"),
                        ({"4000": 1}, "token id 4000 is outside the vocabulary (size 4000)")):
        e = _status(lambda b=bias: c.completions.create(model="tiny-a", prompt="x", max_tokens=1, logit_bias=b))
        assert e.status_code == 400 and words in e.body["message"] and e.body["param"].startswith("logit_bias"), e.body


def test_continue_final_message(server, tiny_model):
    """vLLM's continue_final_message: the last (assistant) message is left open and the model continues it: the same
    tokens as /v1/completions given the template's text ending inside that message; with add_generation_prompt also
    set true, a 400."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! I am"}]
    text = tok.apply_chat_template(msgs, tokenize=False, continue_final_message=True)
    assert text.endswith("Hello! I am")
    c = client(server)
    r = c.chat.completions.create(model="tiny-a", messages=msgs, max_tokens=6, extra_body={
        "continue_final_message": True, "ignore_eos": True}, temperature=0)
    ref = c.completions.create(model="tiny-a", prompt=tok.encode(text), max_tokens=6, **GREEDY)
    assert r.choices[0].message.content == ref.choices[0].text
    assert r.usage.prompt_tokens == ref.usage.prompt_tokens == len(tok.encode(text))
    e = _status(lambda: c.chat.completions.create(model="tiny-a", messages=msgs, max_tokens=1, extra_body={
        "continue_final_message": True, "add_generation_prompt": True}))
    assert e.status_code == 400 and e.body["param"] == "continue_final_message"


def test_echo_with_logprobs_scores_the_prompt(server):
    """OpenAI's echo with logprobs: the prompt's tokens come first in the logprobs (the first with null), their
    offsets from 0 over the echoed text; streamed, the same lists arrive (the prompt with the first tokens); a paced
    model, which has no logits, answers 400."""
    c = client(server)
    prompt = "The quick brown fox"
    r = c.completions.create(model="tiny-a", prompt=prompt, max_tokens=2, logprobs=1, echo=True, **GREEDY)
    lp, text = r.choices[0].logprobs, r.choices[0].text
    n = r.usage.prompt_tokens
    assert text.startswith(prompt) and len(lp.tokens) == n + 2 and "".join(lp.tokens) == text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[0] == 0
    assert all(v <= 0 for v in lp.token_logprobs[1:]) and all(len(t) >= 1 for t in lp.top_logprobs[1:])
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    plain = c.completions.create(model="tiny-a", prompt=prompt, max_tokens=2, logprobs=1, **GREEDY)
    assert plain.choices[0].logprobs.token_logprobs == lp.token_logprobs[n:]  # the completion's, unchanged
    chunks = list(c.completions.create(model="tiny-a", prompt=prompt, max_tokens=2, logprobs=1, echo=True,
                                       stream=True, **GREEDY))
    parts = [ch.choices[0] for ch in chunks if ch.choices]
    assert "".join(x.text for x in parts) == text
    assert [v for x in parts if x.logprobs for v in x.logprobs.token_logprobs] == lp.token_logprobs
    assert [v for x in parts if x.logprobs for v in x.logprobs.text_offset] == lp.text_offset
    e = _status(lambda: c.completions.create(model="pace-1", prompt="x", max_tokens=1, logprobs=1, echo=True))
    assert e.status_code == 400 and "paced model" in e.body["message"], e.body
    e = _status(lambda: c.completions.create(model="pace-1", prompt="x", max_tokens=1,
                                             extra_body={"response_format": {"type": "json_object"}}))
    assert e.status_code == 400 and "held to a schema" in e.body["message"], e.body


def test_echo_with_max_tokens_0_scores_the_prompt_alone(server):
    """echo with max_tokens 0 (OpenAI's legacy way to score a prompt, which vLLM and lm-eval's clients keep): the
    prompt comes back alone, its logprobs the ones a longer echo gives the prompt's tokens, streamed or not; without
    echo max_tokens 0 is a 400 naming it."""
    c = client(server)
    prompt = "The quick brown fox"
    longer = c.completions.create(model="tiny-a", prompt=prompt, max_tokens=2, logprobs=1, echo=True, **GREEDY)
    n = longer.usage.prompt_tokens
    r = c.completions.create(model="tiny-a", prompt=prompt, max_tokens=0, logprobs=1, echo=True)
    ch = r.choices[0]
    assert ch.text == prompt and ch.finish_reason == "length" and len(ch.logprobs.tokens) == n
    assert ch.logprobs.token_logprobs == longer.choices[0].logprobs.token_logprobs[:n]
    assert ch.logprobs.text_offset == longer.choices[0].logprobs.text_offset[:n]
    parts = [x.choices[0] for x in c.completions.create(model="tiny-a", prompt=prompt, max_tokens=0, logprobs=1,
                                                          echo=True, stream=True) if x.choices]
    assert "".join(x.text for x in parts) == prompt
    assert [v for x in parts if x.logprobs for v in x.logprobs.token_logprobs] == ch.logprobs.token_logprobs
    assert c.completions.create(model="tiny-a", prompt=prompt, max_tokens=0, echo=True).choices[0].text == prompt
    e = _status(lambda: c.completions.create(model="tiny-a", prompt=prompt, max_tokens=0))
    assert e.status_code == 400 and e.body["param"] == "max_tokens" and "echo" in e.body["message"], e.body


def test_fields_sent_as_null_take_their_defaults(server):
    """A field sent as null takes its default, as OpenAI's spec ("X or null") and vLLM read it, on every API: chat's
    n, stream and logprobs, a completion's echo, the Responses' stream and store, the Messages' stream, Ollama's
    stream (its default: NDJSON) and options; a field whose null means something keeps it (max_tokens: no cap)."""
    h = {"Authorization": f"Bearer {ALICE}"}
    msgs = [{"role": "user", "content": "x"}]
    nulls = {"n": None, "stream": None, "logprobs": None, "top_logprobs": None}
    r = httpx.post(server.url + "/v1/chat/completions", headers=h, timeout=30,
                   json={"model": "tiny-a", "messages": msgs, "max_tokens": 2, **nulls})
    assert r.status_code == 200 and len(r.json()["choices"]) == 1 and r.json()["choices"][0]["logprobs"] is None, r.text
    body = {"model": "tiny-a", "prompt": "x", "max_tokens": 2, "temperature": 0}
    r = httpx.post(server.url + "/v1/completions", headers=h, timeout=30,
                   json={**body, "echo": None, "n": None, "stream": None})
    want = client(server).completions.create(**body).choices[0].text  # (echo false)
    assert r.status_code == 200 and [c["text"] for c in r.json()["choices"]] == [want], r.text
    r = httpx.post(server.url + "/v1/responses", headers=h, timeout=30,
                   json={"model": "tiny-a", "input": "x", "max_output_tokens": 2, "stream": None, "store": None})
    assert r.status_code == 200 and r.json()["store"] is True, r.text
    r = httpx.post(server.url + "/v1/messages", headers=h, timeout=30,
                   json={"model": "tiny-a", "messages": msgs, "max_tokens": 2, "stream": None})
    assert r.status_code == 200 and r.json()["type"] == "message", r.text
    r = httpx.post(server.url + "/api/chat", headers=h, timeout=30,
                   json={"model": "tiny-a", "messages": msgs, "stream": None, "options": {"num_predict": 2, "top_k": None}})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson", r.text
    e = _status(lambda: client(server).chat.completions.create(model="tiny-a", messages=msgs, n="two"))
    assert e.status_code == 400 and e.body["param"] == "n"


def test_response_format_json_schema(server):
    """response_format: a JSON schema's instance comes back (a random-weight model, sampled: the grammar alone makes it
    valid), on chat and completions, streamed too, ending with "stop"; json_object gives an object; a schema that
    cannot compile and an unknown type are 400s naming the field."""
    import json

    import jsonschema

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                               "maximum": 9}},
              "required": ["ok", "n"], "additionalProperties": False}
    rf = {"type": "json_schema", "json_schema": {"name": "small", "schema": schema, "strict": True}}
    c = client(server)
    msgs = [{"role": "user", "content": "Is it ok?"}]
    for seed in range(3):
        r = c.chat.completions.create(model="tiny-a", messages=msgs, max_tokens=40, temperature=1.0, seed=seed,
                                      response_format=rf)
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
        assert r.choices[0].finish_reason == "stop"
    chunks = list(c.chat.completions.create(model="tiny-b", messages=msgs, max_tokens=40, temperature=1.0, seed=7,
                                            response_format=rf, stream=True))
    jsonschema.validate(json.loads("".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)), schema)
    r = c.completions.create(model="tiny-a", prompt="x", max_tokens=40, temperature=1.0, seed=1,
                             extra_body={"response_format": rf})
    jsonschema.validate(json.loads(r.choices[0].text), schema)
    r = c.chat.completions.create(model="tiny-a", messages=msgs, max_tokens=60, temperature=0,
                                  response_format={"type": "json_object"}, logit_bias={"0": -100})
    assert r.choices[0].message.content.startswith("{")
    for bad, param in (({"type": "xml"}, "response_format.type"), ({"type": "json_schema"}, "response_format.json_schema"),
                       ({"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}, "response_format")):
        e = _status(lambda b=bad: c.chat.completions.create(model="tiny-a", messages=msgs, max_tokens=1,
                                                             response_format=b))
        assert e.status_code == 400 and e.body["param"] == param, e.body


def test_one_of_schema_through_the_api(server):
    """A `oneOf` schema (held as anyOf, as vLLM does; it was a 400) on response_format, structured outputs and a
    tool's parameters: a sampled random-weight model's output parses and is an instance of the schema."""
    import json

    import jsonschema

    schema = {"type": "object", "properties": {
        "id": {"oneOf": [{"type": "string", "pattern": "^[a-z]{1,8}$"}, {"type": "integer", "minimum": 1, "maximum": 99}]},
        "n": {"oneOf": [{"type": "integer", "minimum": -9, "maximum": 0}, {"type": "integer", "minimum": 10,
                                                                          "maximum": 99}]}},
        "required": ["id", "n"], "additionalProperties": False}
    rf = {"type": "json_schema", "json_schema": {"name": "union", "schema": schema, "strict": True}}
    c = client(server)
    msgs = [{"role": "user", "content": "Pick one."}]
    for seed in range(3):
        r = c.chat.completions.create(model="tiny-a", messages=msgs, max_tokens=60, temperature=1.0, seed=seed,
                                      response_format=rf)
        assert r.choices[0].finish_reason == "stop", r.choices[0]
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = c.completions.create(model="tiny-b", prompt="x", max_tokens=60, temperature=1.0, seed=3,
                             extra_body={"structured_outputs": {"json": schema}})
    jsonschema.validate(json.loads(r.choices[0].text), schema)
    tool = {"type": "function", "function": {"name": "pick", "parameters": schema}}
    r = c.chat.completions.create(model="tiny-a", messages=msgs, tools=[tool], max_tokens=60, temperature=1.0, seed=4,
                                  tool_choice={"type": "function", "function": {"name": "pick"}})
    assert r.choices[0].finish_reason == "stop", r.choices[0]  # (a named choice's call: OpenAI's `stop`)
    jsonschema.validate(json.loads(r.choices[0].message.tool_calls[0].function.arguments), schema)


def test_vllm_structured_outputs_through_the_api(server):
    """vLLM's structured outputs on both endpoints, a random-weight model sampled: guided_choice answers one of the
    choices, structured_outputs.regex a match; two shapes at once are a 400."""
    import re

    c = client(server)
    for seed in range(3):
        r = c.chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": "Yes or no?"}],
                                      max_tokens=10, temperature=1.0, seed=seed,
                                      extra_body={"guided_choice": ["yes", "no", "maybe later"]})
        assert r.choices[0].message.content in ("yes", "no", "maybe later") and r.choices[0].finish_reason == "stop"
        r = c.completions.create(model="tiny-b", prompt="Code:", max_tokens=20, temperature=1.0, seed=seed,
                                 extra_body={"structured_outputs": {"regex": "[A-Z]{2}-[0-9]{3}"}})
        assert re.fullmatch("[A-Z]{2}-[0-9]{3}", r.choices[0].text), r.choices[0].text
        r = c.completions.create(model="tiny-a", prompt="Ok?", max_tokens=10, temperature=1.0, seed=seed,
                                 extra_body={"guided_grammar": 'root ::= answer "!"\nanswer ::= "yes" | "no"'})
        assert r.choices[0].text in ("yes!", "no!"), r.choices[0].text  # (GBNF, as vLLM's examples write it)
    e = _status(lambda: c.completions.create(model="tiny-a", prompt="x", max_tokens=1, extra_body={
        "guided_choice": ["a"], "response_format": {"type": "json_object"}}))
    assert e.status_code == 400 and e.body["param"] == "response_format", e.body


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "the forecast", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer", "minimum": 1,
                                                                                 "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}
NOOP = {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {},
                                                                        "additionalProperties": False}}}


def test_tools_required_and_named(server):
    """tools with tool_choice "required" or a named function: the output is held to the calls' JSON, so a random-weight
    model returns valid tool_calls (each call's arguments an instance of its tool's schema), streamed too; the calls
    go back in as history; "auto" (no parser here), a missing or unknown tool, a repeated name are 400s."""
    import json

    import jsonschema

    c = client(server)
    msgs = [{"role": "user", "content": "Weather in Paris for 3 days?"}]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, NOOP)}

    def check(msg, finish, n=None, why="tool_calls"):
        assert finish == why and msg.content is None and (n is None or len(msg.tool_calls) == n), msg
        for call in msg.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
        return msg.tool_calls

    for seed in range(3):
        r = c.chat.completions.create(model="tiny-a", messages=msgs, tools=[WEATHER, NOOP], tool_choice="required",
                                      parallel_tool_calls=False, max_tokens=60, temperature=1.0, seed=seed)
        check(r.choices[0].message, r.choices[0].finish_reason, 1)
    r = c.chat.completions.create(model="tiny-a", messages=msgs, tools=[WEATHER, NOOP], max_tokens=60,
                                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    named = check(r.choices[0].message, r.choices[0].finish_reason, 1, "stop")  # (named: OpenAI's `stop`)
    assert named[0].function.name == "get_weather"
    chunks = list(c.chat.completions.create(model="tiny-b", messages=msgs, tools=[WEATHER], stream=True, max_tokens=60,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    deltas = [ch.choices[0] for ch in chunks if ch.choices]
    streamed = [tc for d in deltas for tc in d.delta.tool_calls or []]  # (the arguments in parts as they come)
    assert deltas[-1].finish_reason == "stop" and {tc.index for tc in streamed} == {0} and streamed[0].id
    jsonschema.validate(json.loads("".join(tc.function.arguments for tc in streamed)), schemas["get_weather"])
    history = msgs + [{"role": "assistant", "content": None, "tool_calls": [named[0].model_dump()]},
                      {"role": "tool", "tool_call_id": named[0].id, "content": "sunny"}]
    r = c.chat.completions.create(model="tiny-a", messages=history, tools=[WEATHER], tool_choice="none", max_tokens=4,
                                  **GREEDY)
    assert r.choices[0].message.tool_calls is None and isinstance(r.choices[0].message.content, str)
    for kw, param in (({"tools": [WEATHER]}, "tool_choice"), ({"tool_choice": "required"}, "tool_choice"),
                      ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                       "tool_choice.function.name"), ({"tools": [WEATHER, WEATHER], "tool_choice": "required"}, "tools.1"),
                      ({"tools": [{"type": "function", "function": {"name": "has space"}}], "tool_choice": "required"},
                       "tools.0.function.name")):
        e = _status(lambda k=kw: c.chat.completions.create(model="tiny-a", messages=msgs, max_tokens=1, **k))
        assert e.status_code == 400 and e.body["param"] == param, (kw, e.body)
    e = _status(lambda: c.chat.completions.create(model="tiny-a", messages=msgs, max_tokens=1, tools=[WEATHER]))
    assert "tool_choice 'auto'" in e.body["message"]  # (tiny-a has no tool_call_parser)
    # the way to give it one that a served folder takes (bare `tokenpool serve --tool-call-parser` is refused)
    assert "tokenpool serve MODEL_DIR --tool-call-parser hermes" in e.body["message"], e.body


def test_streamed_tool_calls_have_null_content(server):
    """A streamed reply of tool calls carries `content: null` in every delta, the role's included, as OpenAI's stream
    does (the role's delta had `content: ""`: a client reading `delta.content is None` as "no text" saw text); the
    calls' arguments, accumulated by index, parse as JSON; the openai client's stream helper rebuilds the message
    with no content. A text stream still opens with `content: ""`."""
    import json

    c = client(server)
    msgs = [{"role": "user", "content": "Weather in Paris for 3 days?"}]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        chunks = list(c.chat.completions.create(model="tiny-a", messages=msgs, tools=[WEATHER], tool_choice=choice,
                                                parallel_tool_calls=False, n=2, stream=True, max_tokens=100,
                                                temperature=1.0, seed=5))
        deltas = [ch.choices[0] for ch in chunks if ch.choices]
        assert deltas and all(d.delta.content is None for d in deltas), [d.delta for d in deltas]
        for i in (0, 1):
            mine = [d for d in deltas if d.index == i]
            assert mine[0].delta.role == "assistant" and mine[-1].finish_reason == (
                "tool_calls" if choice == "required" else "stop")
            args: dict[int, str] = {}
            for d in mine:
                for tc in d.delta.tool_calls or []:
                    args[tc.index] = args.get(tc.index, "") + (tc.function.arguments or "")
            assert args and all(isinstance(json.loads(a), dict) for a in args.values()), args
    with c.chat.completions.stream(model="tiny-a", messages=msgs, tools=[WEATHER], tool_choice="required",
                                   parallel_tool_calls=False, max_tokens=100, temperature=1.0, seed=6) as stream:
        final = stream.get_final_completion()
    msg = final.choices[0].message
    assert final.choices[0].finish_reason == "tool_calls" and msg.content is None and msg.tool_calls
    assert json.loads(msg.tool_calls[0].function.arguments)["city"] in ("Paris", "Rome")
    text = [ch.choices[0].delta for ch in c.chat.completions.create(model="tiny-a", messages=msgs, stream=True,
                                                                     max_tokens=3, **GREEDY) if ch.choices]
    assert text[0].role == "assistant" and text[0].content == ""


def test_tool_message_without_tool_call_id_is_a_400(server):
    """A tool message names the call it answers (`tool_call_id`), as OpenAI requires: without it, a 400 naming the
    field (it went to the template, which cannot tie the result to a call)."""
    c = client(server)
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Paris", "days": 3}'}}
    history = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": [call]}]
    for extra in ({}, {"tool_call_id": None}):
        e = _status(lambda x=extra: c.chat.completions.create(model="tiny-a", max_tokens=2, messages=[
            *history, {"role": "tool", "content": "sunny", **x}]))
        assert e.status_code == 400 and e.body["param"] == "messages.2.tool_call_id", e.body
    r = c.chat.completions.create(model="tiny-a", max_tokens=2, messages=[
        *history, {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}])
    assert r.usage.completion_tokens >= 1


def test_tokenize_detokenize_version(server, tiny_model):
    """vLLM's /tokenize (a prompt, or messages through the chat template: the ids a request feeds the model, counted as
    its usage counts them), /detokenize (the way back), /version; a key is needed, bad input is a 400."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    c = client(server)
    auth = {"Authorization": f"Bearer {ALICE}"}
    text = "Hello there, tokens"
    r = httpx.post(server.url + "/tokenize", json={"model": "tiny-a", "prompt": text}, headers=auth)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tok.encode(text) and body["count"] == len(body["tokens"]) and body["max_model_len"] > 0
    used = c.completions.create(model="tiny-a", prompt=text, max_tokens=1, **GREEDY).usage.prompt_tokens
    assert used == body["count"]
    msgs = [{"role": "user", "content": "Hi"}]
    r = httpx.post(server.url + "/tokenize", json={"model": "tiny-a", "messages": msgs}, headers=auth)
    chat_used = c.chat.completions.create(model="tiny-a", messages=msgs, max_tokens=1, **GREEDY).usage.prompt_tokens
    assert r.json()["count"] == chat_used
    r = httpx.post(server.url + "/detokenize", json={"model": "tiny-a", "tokens": body["tokens"]}, headers=auth)
    assert r.status_code == 200 and r.json() == {"prompt": text}
    for path, payload, status in (("/tokenize", {"model": "tiny-a"}, 400),
                                  ("/tokenize", {"model": "tiny-a", "prompt": "x", "messages": msgs}, 400),
                                  ("/detokenize", {"model": "tiny-a", "tokens": [10 ** 6]}, 400),
                                  ("/tokenize", {"model": "nope", "prompt": "x"}, 404)):
        r = httpx.post(server.url + path, json=payload, headers=auth)
        assert r.status_code == status and "message" in r.json()["error"], (path, payload, r.text)
    assert httpx.post(server.url + "/tokenize", json={"model": "tiny-a", "prompt": "x"}).status_code == 401
    r = httpx.get(server.url + "/version")
    assert r.status_code == 200 and r.json()["version"]


def test_tokenpool_run_and_ls(server):
    """`tokenpool run` (as `ollama run`): a prompt's reply streamed to stdout, stdin piped in as the prompt, a
    conversation that carries its history -- each the reply the openai client gets for the same messages; `tokenpool
    ls` lists the key's models; an unknown model or a missing key: exit 1 and the server's reason."""
    import io

    from controller.chat_cli import conversation
    from tests.test_config_cli import cli

    c = client(server)
    opts = ["--url", server.url, "--temperature", "0", "--max-tokens", "6"]

    def reply(msgs):
        return c.chat.completions.create(model="tiny-a", messages=msgs, temperature=0, max_tokens=6).choices[0].message

    first = reply([{"role": "user", "content": "Hello there"}]).content
    r = cli("run", "tiny-a", "Hello", "there", *opts, env={"TOKENPOOL_API_KEY": ALICE})
    assert r.returncode == 0 and r.stdout == first + "\n", (r.stdout, r.stderr)
    r = cli("run", "tiny-a", *opts, "--api-key", ALICE, stdin="Hello there")
    assert r.returncode == 0 and r.stdout == first + "\n", r.stderr
    out = io.StringIO()
    body = {"model": "tiny-a", "messages": [], "temperature": 0, "max_tokens": 6}
    conversation(server.url, ALICE, body, io.StringIO("Hello there\n\nAnd again\n/bye\n"), out)
    second = reply([{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": first},
                    {"role": "user", "content": "And again"}]).content
    assert out.getvalue().split(">>> ")[1:] == [first + "\n", "", second + "\n", ""]
    r = cli("ls", "--url", server.url, env={"TOKENPOOL_API_KEY": BOB})
    assert r.returncode == 0 and [(row[0], row[-1]) for row in map(str.split, r.stdout.splitlines()[1:])] == \
        [("tiny-b", str(c.models.retrieve("tiny-b").max_model_len))]  # (NAME, SIZE, CONTEXT: BOB's one model)
    r = cli("run", "nope", "hi", "--url", server.url, "--api-key", ALICE)
    assert r.returncode == 1 and 'model "nope" not found; served: tiny-a, tiny-b, pace-1' in r.stderr  # (ALICE's models)
    r = cli("run", "tiny-a", "hi", "--url", server.url, env={"TOKENPOOL_API_KEY": ""})
    assert r.returncode == 1 and "TOKENPOOL_API_KEY" in r.stderr, r.stderr


def test_ollama_api_with_the_official_client(server):
    """Ollama's API (/api/*) through the official `ollama` client: the key's models listed; chat, streamed and not,
    and generate (templated, and raw) give the tokens the OpenAI routes give for the same request; `format` holds the
    reply to a schema; the closing counts are the usage; unknown model 404, no key 401, a bad option 400."""
    import json

    import jsonschema
    import ollama

    def oc(key=ALICE):
        return ollama.Client(host=server.url, headers={"Authorization": f"Bearer {key}"})

    c = client(server)
    assert [m.model for m in oc(BOB).list().models] == ["tiny-b:latest"]  # (Ollama's names)
    assert {m.model for m in oc().list().models} == {"tiny-a:latest", "tiny-b:latest", "pace-1:latest"}
    msgs = [{"role": "user", "content": "Hello there"}]
    ref = c.chat.completions.create(model="tiny-a", messages=msgs, temperature=0, max_tokens=6)
    r = oc().chat(model="tiny-a", messages=msgs, options={"temperature": 0, "num_predict": 6})
    assert r.message.content == ref.choices[0].message.content and r.done and r.done_reason == ref.choices[0].finish_reason
    assert (r.prompt_eval_count, r.eval_count) == (ref.usage.prompt_tokens, ref.usage.completion_tokens)
    assert r.total_duration >= r.eval_duration > 0
    parts = list(oc().chat(model="tiny-a", messages=msgs, stream=True, options={"temperature": 0, "num_predict": 6}))
    assert "".join(x.message.content for x in parts) == r.message.content
    assert [x.done for x in parts] == [False] * (len(parts) - 1) + [True] and parts[-1].eval_count == r.eval_count
    g = oc().generate(model="tiny-a", prompt="Hello there", options={"temperature": 0, "num_predict": 6})
    assert g.response == r.message.content  # (the model's template over the prompt, as Ollama applies it)
    raw = oc().generate(model="tiny-a", prompt="Hello there", raw=True, options={"temperature": 0, "num_predict": 5})
    assert raw.response == c.completions.create(model="tiny-a", prompt="Hello there", temperature=0,
                                                max_tokens=5).choices[0].text
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    f = oc().chat(model="tiny-a", messages=msgs, format=schema, options={"temperature": 1.0, "seed": 3})
    jsonschema.validate(json.loads(f.message.content), schema)
    assert oc().show("tiny-a").modelinfo["context_length"] == c.models.retrieve("tiny-a").model_extra["max_model_len"]
    info = oc().show("tiny-b").modelinfo  # (Ollama's key names: clients read "<architecture>.context_length")
    assert info["general.architecture"] == "llama" and info["llama.context_length"] == info["context_length"]
    assert info["llama.embedding_length"] == len(c.embeddings.create(model="tiny-b", input="x").data[0].embedding)
    assert oc().show("tiny-a").capabilities == ["completion"] and oc().show("tiny-b").capabilities == ["completion",
                                                                                                       "tools"]
    for call, status, words in ((lambda: oc().chat(model="nope", messages=msgs), 404, "model 'nope' not found"),
                                (lambda: oc("wrong").list(), 401, "Incorrect API key"),
                                (lambda: oc().chat(model="tiny-a", messages=msgs, options={"temperature": 5}), 400,
                                 "temperature")):
        with pytest.raises(ollama.ResponseError) as ei:
            call()
        assert ei.value.status_code == status and words in ei.value.error, (status, ei.value.error)


def test_ollama_generate_context_continues_a_conversation(server):
    """Ollama's `context`: /api/generate returns its prompt and reply as token ids, and a next /api/generate passing
    them continues after them -- the same tokens as /v1/completions on those ids then the new prompt's (templated,
    or raw), streamed or not, starting on the KV the prefix cache kept; a context that is not token ids is a 400."""
    import ollama

    oc = ollama.Client(host=server.url, headers={"Authorization": f"Bearer {ALICE}"})
    c = client(server)
    opts = {"temperature": 0, "num_predict": 6}
    first = oc.generate(model="tiny-a", prompt="Hello there, tell me a story about a cat", options=opts)
    ctx = first.context
    assert ctx and len(ctx) == first.prompt_eval_count + first.eval_count
    tok = httpx.post(server.url + "/tokenize", headers={"Authorization": f"Bearer {ALICE}"}, json={
        "model": "tiny-a", "messages": [{"role": "user", "content": "And then?"}],
        "add_generation_prompt": True}).json()["tokens"]
    want = c.completions.create(model="tiny-a", prompt=ctx + tok, temperature=0, max_tokens=6)
    second = oc.generate(model="tiny-a", prompt="And then?", context=ctx, options=opts)
    assert second.response == want.choices[0].text and second.prompt_eval_count == len(ctx) + len(tok)
    assert second.context[: len(ctx) + len(tok)] == ctx + tok and len(second.context) == len(ctx) + len(tok) + 6
    parts = list(oc.generate(model="tiny-a", prompt="And then?", context=ctx, options=opts, stream=True))
    assert "".join(x.response for x in parts) == second.response and parts[-1].context == second.context
    raw = oc.generate(model="tiny-a", prompt=" More.", context=ctx, raw=True, options=opts)
    raw_ids = httpx.post(server.url + "/tokenize", headers={"Authorization": f"Bearer {ALICE}"},
                         json={"model": "tiny-a", "prompt": " More."}).json()["tokens"]
    assert raw.response == c.completions.create(model="tiny-a", prompt=ctx + raw_ids, temperature=0,
                                                max_tokens=6).choices[0].text
    bad = httpx.post(server.url + "/api/generate", headers={"Authorization": f"Bearer {ALICE}"},
                     json={"model": "tiny-a", "prompt": "x", "context": [1, "two"], "stream": False})
    assert bad.status_code == 400 and "context" in bad.json()["error"]


def test_ollama_root_pull_and_model_management(server):
    """The root answers 200 (GET and HEAD), as Ollama's clients check; `pull` of a served model succeeds (streamed or
    not), of any other a 404 saying this server downloads nothing; keep_alive 0 unloads nothing on a server with
    tenants; create/copy/delete/push are 501s naming the admin API; each needs the key."""
    import ollama

    oc = ollama.Client(host=server.url, headers={"Authorization": f"Bearer {ALICE}"})
    assert httpx.get(server.url + "/").text.startswith("tokenpool is running")
    assert httpx.head(server.url + "/").status_code == 200
    assert oc.pull("tiny-a").status == "success"
    assert oc.generate(model="tiny-a", prompt="", keep_alive=0).done_reason == "load"  # (tenants: no unloading)
    assert [x.status for x in oc.pull("tiny-a", stream=True)] == ["success"]
    with pytest.raises(ollama.ResponseError) as ei:
        oc.pull("llama3.2")
    assert ei.value.status_code == 404 and "downloads nothing" in ei.value.error
    with pytest.raises(ollama.ResponseError) as ei:
        oc.delete("tiny-a")
    assert ei.value.status_code == 501 and "/admin/models" in ei.value.error
    with pytest.raises(ollama.ResponseError) as ei:
        oc.copy("tiny-a", "tiny-c")
    assert ei.value.status_code == 501
    with pytest.raises(ollama.ResponseError) as ei:
        ollama.Client(host=server.url).delete("tiny-a")
    assert ei.value.status_code == 401
    r = httpx.post(server.url + "/api/nothing", headers={"Authorization": f"Bearer {ALICE}"}, json={})
    assert r.status_code == 404 and "error" in r.json()


def test_ollama_chat_with_tools(server):
    """Ollama's chat with tools (the model decides, as with tool_choice "auto") gives what /v1/chat/completions gives
    for the same request and seed: the same calls (arguments as objects, as Ollama writes them) or the same text,
    streamed too; a conversation with the model's calls and the tool's result continues as the chat endpoint's does;
    a model without a tool-call parser is a 400 saying it does not support tools."""
    import json

    import ollama

    oc = ollama.Client(host=server.url, headers={"Authorization": f"Bearer {ALICE}"})
    c = client(server)
    msgs = [{"role": "user", "content": "Weather in Paris for 3 days?"}]
    kinds = set()
    for seed in range(6):
        ref = c.chat.completions.create(model="tiny-b", messages=msgs, tools=[WEATHER, NOOP], max_tokens=60,
                                        temperature=1.0, seed=seed).choices[0].message
        opts = {"temperature": 1.0, "seed": seed, "num_predict": 60}
        r = oc.chat(model="tiny-b", messages=msgs, tools=[WEATHER, NOOP], options=opts)
        parts = list(oc.chat(model="tiny-b", messages=msgs, tools=[WEATHER, NOOP], options=opts, stream=True))
        streamed = [tc for x in parts for tc in (x.message.tool_calls or [])]
        if ref.tool_calls:
            kinds.add("calls")
            want = [(t.function.name, json.loads(t.function.arguments)) for t in ref.tool_calls]
            assert [(t.function.name, dict(t.function.arguments)) for t in r.message.tool_calls] == want
            assert [(t.function.name, dict(t.function.arguments)) for t in streamed] == want
            assert r.message.content == "" and r.done_reason == "stop"
        else:
            kinds.add("text")
            assert not r.message.tool_calls and r.message.content == ref.content
            assert "".join(x.message.content for x in parts) == ref.content and not streamed
        assert parts[-1].done
    assert kinds  # (seeds 0-5 give text on this random model: the calls' shape is test_ollama_tool_calls_shape's)
    history = [*msgs, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}}]},
        {"role": "tool", "content": "sunny, 21 C", "tool_name": "get_weather"}]
    ref = c.chat.completions.create(model="tiny-b", tools=[WEATHER], max_tokens=8, temperature=0, messages=[
        *msgs, {"role": "assistant", "content": "", "tool_calls": [{"id": "call_0", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris", "days": 3})}}]},
        {"role": "tool", "content": "sunny, 21 C", "name": "get_weather", "tool_call_id": "call_0"}])
    r = oc.chat(model="tiny-b", messages=history, tools=[WEATHER], options={"temperature": 0, "num_predict": 8})
    assert r.prompt_eval_count == ref.usage.prompt_tokens
    assert (r.message.content, [t.function.name for t in r.message.tool_calls or []]) == (
        ref.choices[0].message.content or "", [t.function.name for t in ref.choices[0].message.tool_calls or []])
    with pytest.raises(ollama.ResponseError) as ei:
        oc.chat(model="tiny-a", messages=msgs, tools=[WEATHER])
    assert ei.value.status_code == 400 and "does not support tools" in ei.value.error
    assert "tokenpool serve MODEL_DIR --tool-call-parser hermes" in ei.value.error


def test_ollama_tool_calls_shape():
    """A whole hermes output's calls as Ollama's chat returns them: name and arguments as an object, which the official
    client's Message type reads; text, or an output cut short, is no calls."""
    import json

    import ollama

    from controller.api import protocol as p
    from controller.api.ollama import _calls
    from controller.api.serving import OpenAIServing
    from controller.api.structured import tool_plan

    plan = tool_plan([p.Tool.model_validate(t) for t in (WEATHER, NOOP)], None, None, "hermes")
    text = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "days": 2}}\n</tool_call>'
            '<tool_call>\n{"name": "noop", "arguments": {}}\n</tool_call>')
    calls = _calls(OpenAIServing, text, "stop", plan)
    msg = ollama.Message.model_validate({"role": "assistant", "content": "", "tool_calls": json.loads(json.dumps(calls))})
    assert [(t.function.name, dict(t.function.arguments)) for t in msg.tool_calls] == [
        ("get_weather", {"city": "Rome", "days": 2}), ("noop", {})]
    assert _calls(OpenAIServing, "It is sunny.", "stop", plan) is None
    assert _calls(OpenAIServing, text[:40], "length", plan) is None


def test_tool_choice_auto_with_the_hermes_syntax(server, tiny_model):
    """A model configured with tool_call_parser hermes takes tool_choice "auto" (the default with tools): a sampled
    random-weight model answers text or calls, each call valid for its tool (the grammar holds a call's JSON); text
    streams as the unstreamed reply; a model without a parser answers "auto" with a 400."""
    import json

    import jsonschema
    from transformers import AutoTokenizer

    c = client(server)
    msgs = [{"role": "user", "content": "Weather in Paris for 3 days?"}]
    kinds = set()
    for seed in range(6):
        r = c.chat.completions.create(model="tiny-b", messages=msgs, tools=[WEATHER, NOOP], max_tokens=60,
                                      temperature=1.0, seed=seed)
        msg, why = r.choices[0].message, r.choices[0].finish_reason
        if msg.tool_calls:
            assert why == "tool_calls" and msg.content is None
            for call in msg.tool_calls:
                args = json.loads(call.function.arguments)
                jsonschema.validate(args, {"get_weather": WEATHER, "noop": NOOP}[call.function.name]["function"][
                    "parameters"])
            kinds.add("calls")
        else:
            assert not msg.content.startswith("<tool_call>\n") and why in ("stop", "length")
            kinds.add("text")
    assert kinds  # (which of the two a random model picks is its own affair)
    lt = str(AutoTokenizer.from_pretrained(tiny_model).encode("<")[0])
    kw = dict(model="tiny-b", messages=msgs, tools=[WEATHER], max_tokens=8, **GREEDY, logit_bias={lt: -100})
    whole = c.chat.completions.create(**kw).choices[0]
    chunks = [ch.choices[0] for ch in c.chat.completions.create(stream=True, **kw) if ch.choices]
    assert whole.message.tool_calls is None and whole.finish_reason == "length"
    assert "".join(ch.delta.content or "" for ch in chunks) == whole.message.content
    assert sum(1 for ch in chunks if ch.delta.content) > 1  # streamed as it came, not held to the end
    e = _status(lambda: c.chat.completions.create(model="tiny-a", messages=msgs, max_tokens=1, tools=[WEATHER]))
    assert e.status_code == 400 and "tool_call_parser" in e.body["message"]


# --- errors ---
def _status(fn) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as ei:
        fn()
    return ei.value


def test_400_malformed_and_too_long(server):
    c = client(server)
    e = _status(lambda: c.completions.create(model="tiny-a", prompt="x", max_tokens=0))
    assert e.status_code == 400 and e.body["type"] == "invalid_request_error"
    e = _status(lambda: c.completions.create(model="tiny-a", prompt="word " * 5000, max_tokens=1))
    assert e.status_code == 400 and "context length" in e.message and e.body["code"] == "context_length_exceeded"
    e = _status(lambda: c.completions.create(model="tiny-a", prompt="x", temperature=-1))
    assert e.status_code == 400
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"Authorization": f"Bearer {ALICE}"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    err = r.json()["error"]  # sent without a JSON content-type (as curl -d does): says what to send
    assert err["param"] is None and "content-type: application/json" in err["message"], err
    for ctype in ("application/x-www-form-urlencoded", "text/plain"):  # valid JSON, but not sent as JSON
        r = httpx.post(server.url + "/v1/completions", content=b'{"model": "tiny-a", "prompt": "x", "max_tokens": 1}',
                       headers={"Authorization": f"Bearer {ALICE}", "content-type": ctype})
        assert r.status_code == 400 and f"this request's content-type: {ctype}" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {ALICE}", "content-type": "application/json"})
    err = r.json()["error"]  # says what is wrong, and names no parameter (not the character position)
    assert r.status_code == 400 and err["param"] is None, err
    assert err["message"].startswith("the request body is not valid JSON (at character 1)"), err
    r = httpx.post(server.url + "/v1/completions", content=b"",
                   headers={"Authorization": f"Bearer {ALICE}", "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "the request body is empty: send a JSON object"
    for body, kind in ((b"[]", "an array"), (b"null", "null"), (b'"x"', "a string"), (b"7", "a number")):
        r = httpx.post(server.url + "/v1/chat/completions", content=body,
                       headers={"Authorization": f"Bearer {ALICE}", "content-type": "application/json"})
        err = r.json()["error"]  # (not pydantic's "Input should be a valid dictionary or object to extract fields")
        assert r.status_code == 400 and err["message"] == f"the request body must be a JSON object, not {kind}", err


def test_401_403_404(server):
    assert _status(lambda: client(server, "wrong").models.list()).status_code == 401
    e = _status(lambda: client(server, BOB).completions.create(model="tiny-a", prompt="x", max_tokens=1))
    assert e.status_code == 404  # another tenant's model looks missing: its existence is not leaked
    e = _status(lambda: client(server).completions.create(model="nope", prompt="x", max_tokens=1))
    assert e.status_code == 404 and e.body["code"] == "model_not_found"


def test_429_rate_limit_with_retry_after_then_recovers(server):
    c = client(server, SLOW)
    c.completions.create(model="pace-1", prompt="x", max_tokens=1)
    e = _status(lambda: c.completions.create(model="pace-1", prompt="x", max_tokens=1))
    assert e.status_code == 429 and int(e.response.headers["Retry-After"]) >= 1
    time.sleep(int(e.response.headers["Retry-After"]))
    assert c.completions.create(model="pace-1", prompt="x", max_tokens=1).usage.completion_tokens == 1


def test_429_on_ollamas_api_says_when_to_retry(server):
    """Ollama's routes refuse past a tenant's rate with the Retry-After the OpenAI and Anthropic routes send (the
    tenant's bucket holds one request: of two at once, one is a 429)."""
    got = [httpx.post(server.url + "/api/generate", headers={"Authorization": f"Bearer {SLOW}"}, timeout=30,
                      json={"model": "pace-1", "prompt": "x", "stream": False, "options": {"num_predict": 1}})
           for _ in range(2)]
    refused = [r for r in got if r.status_code == 429]
    assert refused, [r.status_code for r in got]
    assert "rate limit" in refused[0].json()["error"] and int(refused[0].headers["Retry-After"]) >= 1


def test_429_admission_control_when_ttft_slo_cannot_be_met(server):
    c = client(server)
    long = c.completions.create(model="pace-1", prompt="x", max_tokens=60, stream=True)  # holds the only slot
    next(iter(long))
    try:
        e = _status(lambda: c.completions.create(model="pace-1", prompt="x", max_tokens=1))
        assert e.status_code == 429 and int(e.response.headers["Retry-After"]) >= 1
        assert "SLO" in e.message
    finally:
        long.close()


def test_503_when_no_engine_can_take_it(server):
    admin = {"Authorization": f"Bearer {ADMIN}"}
    engines = httpx.get(server.url + "/admin/engines", headers=admin).json()
    for e in engines:
        assert httpx.post(f"{server.url}/admin/engines/{e['id']}/drain", headers=admin).status_code == 200
    try:
        e = _status(lambda: client(server).completions.create(model="tiny-a", prompt="x", max_tokens=1))
        assert e.status_code == 503 and "Retry-After" in e.response.headers
    finally:
        for e in engines:
            httpx.post(f"{server.url}/admin/engines/{e['id']}/resume", headers=admin)
    deadline = time.monotonic() + 30
    while True:  # the drained engine gave its models back; they come back on demand
        try:
            client(server).completions.create(model="tiny-a", prompt="x", max_tokens=1)
            break
        except openai.APIStatusError:
            assert time.monotonic() < deadline
            time.sleep(0.2)


def test_disconnect_aborts_and_frees_kv(server):
    admin = {"Authorization": f"Bearer {ADMIN}"}
    stream = client(server).completions.create(model="tiny-a", prompt="x", max_tokens=1500, stream=True,
                                               extra_body={"ignore_eos": True})
    it = iter(stream)
    next(it), next(it)

    def running():
        e = httpx.get(server.url + "/admin/engines", headers=admin).json()
        return sum(x["stats"].get("tiny-a", {}).get("num_running", 0) for x in e), sum(x["inflight"] for x in e)

    deadline = time.monotonic() + 5
    while running()[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    stream.close()
    deadline = time.monotonic() + 3
    while running() != (0, 0):
        assert time.monotonic() < deadline, running()
        time.sleep(0.1)


def test_concurrent_requests_across_models(server):
    c = client(server)
    out = {}

    def go(i):
        model = ("tiny-a", "tiny-b")[i % 2]
        out[i] = c.completions.create(model=model, prompt=f"p{i}", max_tokens=6, **GREEDY).usage.completion_tokens

    ts = [threading.Thread(target=go, args=(i,)) for i in range(8)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert out == {i: 6 for i in range(8)}


def test_metrics_parse_and_need_admin(server):
    assert httpx.get(server.url + "/metrics").status_code == 401
    r = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"})
    fams = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in ("tokenpool_requests", "tokenpool_time_to_first_token_seconds", "tokenpool_kv_blocks_used",
                 "tokenpool_queue_depth", "tokenpool_running_requests", "tokenpool_model_swap_latency_seconds",
                 "tokenpool_time_per_output_token_seconds", "tokenpool_e2e_request_latency_seconds"):
        assert name in fams, name
    statuses = {s.labels["status"] for s in fams["tokenpool_requests"].samples if s.name.endswith("_total")}
    assert {"200", "401", "404", "429"} <= statuses


def test_metrics_take_the_stable_metrics_token(server):
    """With auth on, /metrics wants the configured metrics token (stable across restarts) or the admin token."""
    get = lambda tok: httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {tok}"}).status_code
    assert get(METRICS) == 200 and get(ADMIN) == 200
    assert get(ALICE) == 401 and get("nonsense") == 401


def test_admin_requires_token_and_lists_placement(server):
    assert httpx.get(server.url + "/admin/engines").status_code == 401
    r = httpx.get(server.url + "/admin/models", headers={"Authorization": f"Bearer {ADMIN}"})
    models = {m["name"]: m for m in r.json()}
    assert models["tiny-a"]["engines"] and models["tiny-a"]["max_model_len"] > 0
