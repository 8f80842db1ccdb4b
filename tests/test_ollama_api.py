"""Ollama's API (/api/*) through the official `ollama` client against a live single-user server (no keys, as
`tokenpool serve` runs by default): `think` as the model's template allows it, `keep_alive` as Ollama parses it,
`ps` as Ollama writes it. (The chat/generate/embed parity with the OpenAI routes, tools and `context` are tested in
test_api_openai.py.)"""

from __future__ import annotations

import shutil
import time

import httpx
import ollama
import pytest

from load_tests.live_server import LiveServer

# Qwen3's switch, as its template has it: with enable_thinking false the reply starts after an empty think block
THINKING_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}")


@pytest.fixture(scope="module")
def server(make_tiny, tmp_path_factory):
    work = tmp_path_factory.mktemp("ollama")
    thinker = work / "thinker"
    shutil.copytree(make_tiny("qwen2"), thinker)
    (thinker / "chat_template.jinja").write_text(THINKING_TEMPLATE)
    cfg = {
        "workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
        "models": [{"name": "tiny-a", "path": str(make_tiny("qwen2")), "engine": {"max_num_seqs": 8}},
                   {"name": "think-a", "path": str(thinker), "engine": {"max_num_seqs": 8}},
                   {"name": "short-a", "path": str(make_tiny("qwen2")), "engine": {"max_num_seqs": 8,
                                                                                 "max_model_len": 48}}],
    }
    with LiveServer(cfg, work) as srv:
        yield srv


def oc(srv) -> ollama.Client:
    return ollama.Client(host=srv.url, timeout=60)


def tokens(srv, model: str, msgs: list[dict], **kwargs) -> int:
    r = httpx.post(srv.url + "/tokenize", json={"model": model, "messages": msgs, **kwargs})
    assert r.status_code == 200, r.text
    return len(r.json()["tokens"])


def test_think_follows_the_models_template(server):
    """`think` asked of a model whose template has no thinking is Ollama's 400 (`think: false` is fine); a template
    with Qwen3's enable_thinking gets it either way (the prompt is the one /tokenize renders with it), and `show`
    lists the thinking capability; a think value that is no level is a 400."""
    c = oc(server)
    msgs = [{"role": "user", "content": "Hello there"}]
    opts = {"temperature": 0, "num_predict": 2}
    for call in (lambda: c.chat(model="tiny-a", messages=msgs, think=True, options=opts),
                 lambda: c.generate(model="tiny-a", prompt="Hello there", think="high", options=opts)):
        with pytest.raises(ollama.ResponseError) as ei:
            call()
        assert ei.value.status_code == 400 and ei.value.error == '"tiny-a" does not support thinking'
    assert c.chat(model="tiny-a", messages=msgs, think=False, options=opts).done
    assert "thinking" not in c.show("tiny-a").capabilities and "thinking" in c.show("think-a").capabilities
    off, on = (tokens(server, "think-a", msgs, chat_template_kwargs={"enable_thinking": v}) for v in (False, True))
    assert off > on == tokens(server, "think-a", msgs)
    for think, want in ((False, off), (True, on), (None, on)):
        r = c.chat(model="think-a", messages=msgs, think=think, options=opts)
        assert r.prompt_eval_count == want, (think, r.prompt_eval_count, want)
        g = c.generate(model="think-a", prompt="Hello there", think=think, options=opts)
        assert g.prompt_eval_count == want, (think, g.prompt_eval_count, want)
    with pytest.raises(ollama.ResponseError) as ei:
        c.chat(model="think-a", messages=msgs, think="hard", options=opts)
    assert ei.value.status_code == 400 and "think" in ei.value.error


def test_thinking_apart_from_content():
    """A reply's leading <think> block goes to `thinking`, the rest to `content`, the same whether it comes whole or
    in pieces that split the tags (a piece that may be a tag's start is held); a reply without one is all content."""
    from controller.api.ollama import _Split

    def split(chunks: list[str]) -> tuple[str, str]:
        s, thinking, content = _Split(), "", ""
        for i, c in enumerate(chunks):
            t, x = s.feed(c, i == len(chunks) - 1)
            thinking, content = thinking + t, content + x
        return thinking, content

    whole = "<think>\nThe user greets me.\n</think>\n\nHello!"
    assert split([whole]) == ("The user greets me.", "Hello!")
    assert split([whole[i:i + 3] for i in range(0, len(whole), 3)]) == ("The user greets me.", "Hello!")
    assert split(list(whole)) == ("The user greets me.", "Hello!")
    assert split(["<", "b>bold</b>"]) == ("", "<b>bold</b>")
    assert split(["Hi <think>", "x</think>"]) == ("", "Hi <think>x</think>")
    assert split(["<think>cut sh", "ort </th"]) == ("cut short </th", "")


def test_keep_alive_as_ollama_parses_it(server):
    """keep_alive takes Go's durations ("1h30m"; "0m0s" unloads, as 0 does) and numbers of seconds; anything else
    is a 400 before any work, on chat, generate and embed alike. `ps` gives each resident model's context length."""
    c = oc(server)
    msgs = [{"role": "user", "content": "Hi"}]
    opts = {"temperature": 0, "num_predict": 2}
    assert c.chat(model="tiny-a", messages=msgs, keep_alive="1h30m", options=opts).done
    assert c.generate(model="tiny-a", prompt="Hi", keep_alive=300, options=opts).done
    for call in (lambda: c.chat(model="tiny-a", messages=msgs, keep_alive="5x", options=opts),
                 lambda: c.generate(model="tiny-a", prompt="Hi", keep_alive="soon", options=opts),
                 lambda: c.generate(model="tiny-a", keep_alive="1hour"),
                 lambda: c.embed(model="tiny-a", input="Hi", keep_alive="5 minutes")):
        with pytest.raises(ollama.ResponseError) as ei:
            call()
        assert ei.value.status_code == 400 and "keep_alive" in ei.value.error, ei.value.error
    deadline = time.monotonic() + 20  # (residency is the worker's report, a stats beat after the step that loaded it)
    while "tiny-a" not in (ps := {m.model.removesuffix(":latest"): m for m in c.ps().models}):
        assert time.monotonic() < deadline, "tiny-a never resident after its requests"
        time.sleep(0.1)
    assert ps["tiny-a"].context_length == c.show("tiny-a").modelinfo["context_length"]
    assert c.generate(model="tiny-a", keep_alive="0m0s").done_reason == "unload"
    assert c.generate(model="tiny-a", keep_alive="-1m").done_reason == "load"


def test_last_assistant_message_is_continued(server):
    """A chat ending with an assistant's text is continued (Ollama leaves that message open), as the chat endpoint's
    continue_final_message does: the same prompt and reply, streamed too; a finished turn after a user's is not."""
    import openai

    c = oc(server)
    o = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    msgs = [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once upon a time"}]
    want = o.chat.completions.create(model="tiny-a", messages=msgs, max_tokens=8, temperature=0, extra_body={
        "continue_final_message": True, "add_generation_prompt": False})
    opts = {"temperature": 0, "num_predict": 8}
    r = c.chat(model="tiny-a", messages=msgs, options=opts)
    assert (r.message.content, r.prompt_eval_count) == (want.choices[0].message.content, want.usage.prompt_tokens)
    assert "".join(x.message.content for x in c.chat(model="tiny-a", messages=msgs, options=opts,
                                                       stream=True)) == r.message.content
    turn = [*msgs, {"role": "user", "content": "Go on."}]
    ref = o.chat.completions.create(model="tiny-a", messages=turn, max_tokens=8, temperature=0)
    assert c.chat(model="tiny-a", messages=turn, options=opts).prompt_eval_count == ref.usage.prompt_tokens


def test_num_predict_past_the_context_fills_it(server):
    """num_predict past the room the prompt leaves generates until the context is full (Ollama's), done_reason
    "length", streamed or not, on chat, generate and raw generate alike, where the chat endpoint's max_tokens is a
    400; within the room it is the cap."""
    import openai

    c = oc(server)
    ctx = c.show("short-a").modelinfo["context_length"]
    assert ctx == 48
    msgs = [{"role": "user", "content": "Tell me a story."}]
    with pytest.raises(openai.BadRequestError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0).chat.completions.create(
            model="short-a", messages=msgs, max_tokens=ctx, temperature=0)
    opts = {"temperature": 0, "num_predict": ctx, "seed": 1}
    for r in (c.chat(model="short-a", messages=msgs, options=opts),
              list(c.chat(model="short-a", messages=msgs, options=opts, stream=True))[-1],
              c.generate(model="short-a", prompt="Tell me a story.", options=opts),
              c.generate(model="short-a", prompt="Tell me a story.", raw=True, options=opts)):
        assert r.done_reason == "length" and r.prompt_eval_count + r.eval_count == ctx, r
    r = c.chat(model="short-a", messages=msgs, options={**opts, "num_predict": 3})
    assert r.done_reason == "length" and r.eval_count == 3


def test_managing_a_model_not_served_is_not_found(server):
    """delete, copy and push of a model that is not served: Ollama's 404 naming it; of a served one the 501 saying
    models are managed through the admin API."""
    c = oc(server)
    for call in (lambda: c.delete("nope"), lambda: c.copy("nope", "other"), lambda: c.push("nope")):
        with pytest.raises(ollama.ResponseError) as ei:
            call()
        assert (ei.value.status_code, ei.value.error) == (404, "model 'nope' not found")
    for call in (lambda: c.delete("tiny-a"), lambda: c.copy("tiny-a", "other")):
        with pytest.raises(ollama.ResponseError) as ei:
            call()
        assert ei.value.status_code == 501 and "/admin/models" in ei.value.error


def test_logprobs(server):
    """logprobs (with top_logprobs) as Ollama gives them: each generated token with its log probability and its
    alternatives, the chat endpoint's for the same request; streamed, each line with its own tokens; generate and
    raw generate too; top_logprobs past 20 is a 400."""
    import openai

    c = oc(server)
    o = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    msgs = [{"role": "user", "content": "Hello there"}]
    want = o.chat.completions.create(model="tiny-a", messages=msgs, max_tokens=4, temperature=0, logprobs=True,
                                     top_logprobs=2).choices[0].logprobs.content
    opts = {"temperature": 0, "num_predict": 4}
    r = c.chat(model="tiny-a", messages=msgs, logprobs=True, top_logprobs=2, options=opts)
    got = [(x.token, round(x.logprob, 4), [(t.token, round(t.logprob, 4)) for t in x.top_logprobs])
           for x in r.logprobs]
    assert got == [(x.token, round(x.logprob, 4), [(t.token, round(t.logprob, 4)) for t in x.top_logprobs])
                   for x in want] and len(got) == r.eval_count == 4
    parts = list(c.chat(model="tiny-a", messages=msgs, logprobs=True, top_logprobs=2, options=opts, stream=True))
    assert [x.token for p in parts for x in p.logprobs or []] == [x.token for x in r.logprobs]
    assert all("".join(x.token for x in p.logprobs or []) == p.message.content for p in parts)
    for g in (c.generate(model="tiny-a", prompt="Hello there", logprobs=True, options=opts),
              c.generate(model="tiny-a", prompt="Hello there", raw=True, logprobs=True, top_logprobs=3, options=opts)):
        assert "".join(x.token for x in g.logprobs) == g.response and len(g.logprobs) == g.eval_count
    assert len(g.logprobs[0].top_logprobs) == 3
    assert c.chat(model="tiny-a", messages=msgs, options=opts).logprobs is None
    with pytest.raises(ollama.ResponseError) as ei:
        c.chat(model="tiny-a", messages=msgs, logprobs=True, top_logprobs=21, options=opts)
    assert ei.value.status_code == 400 and "top_logprobs" in ei.value.error


def test_a_name_with_ollamas_latest_tag_is_the_served_model(server):
    """Ollama names every model with a tag, `:latest` when none is given, and its clients and scripts send either
    (`smollm2:latest`): each endpoint takes `NAME:latest` for a model served as NAME (a 404 before), echoing the
    name as sent; an unknown name with the tag is still a 404 naming it."""
    c = oc(server)
    msgs = [{"role": "user", "content": "Hello there"}]
    opts = {"temperature": 0, "num_predict": 3}
    want = c.chat(model="tiny-a", messages=msgs, options=opts)
    got = c.chat(model="tiny-a:latest", messages=msgs, options=opts)
    assert got.model == "tiny-a:latest" and got.message.content == want.message.content
    streamed = list(c.generate(model="tiny-a:latest", prompt="Hello there", options=opts, stream=True))
    assert streamed[-1].done and streamed[-1].model == "tiny-a:latest"
    assert c.show("tiny-a:latest").modelinfo["context_length"] == c.show("tiny-a").modelinfo["context_length"]
    assert c.embed(model="tiny-a:latest", input="hi").embeddings == c.embed(model="tiny-a", input="hi").embeddings
    assert c.pull("tiny-a:latest").status == "success"
    with pytest.raises(ollama.ResponseError) as ei:
        c.chat(model="nope:latest", messages=msgs, options=opts)
    assert ei.value.status_code == 404 and "nope:latest" in str(ei.value)


def test_a_body_that_is_no_json_object_is_named(server):
    """A JSON body that is no object (an array, null, a string) is a 400 saying so, on each endpoint that takes one,
    not pydantic's words naming the server's request class."""
    for path in ("/api/chat", "/api/generate", "/api/embed", "/api/pull"):
        for body, kind in (("[1]", "an array"), ("null", "null"), ('"hi"', "a string")):
            r = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400, (path, body, r.text)
            assert r.json() == {"error": f"the request body must be a JSON object, not {kind}"}, (path, r.text)


def test_a_conversation_past_the_context_loses_its_oldest_messages(server):
    """A chat longer than the context is shortened as Ollama's is: its oldest messages go, the system message and
    the last one stay, until it fits (the prompt is the kept messages'); with `truncate: false` it is a 400. One
    whose last message alone does not fit is cut as Ollama's runner cuts it (the template's first num_keep tokens,
    then the prompt's last: test_api52_live), where it was a 400; with `truncate: false` too it is the 400."""
    c = oc(server)
    system = {"role": "system", "content": "Be brief."}
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message number {i} is here"}
             for i in range(9)]
    msgs = [system, *turns]
    assert tokens(server, "short-a", msgs) > 48
    kept = next(k for k in range(len(turns), 0, -1) if tokens(server, "short-a", [system, *turns[-k:]]) < 48)
    opts = {"temperature": 0, "num_predict": 1}
    r = c.chat(model="short-a", messages=msgs, options=opts)
    assert r.prompt_eval_count == tokens(server, "short-a", [system, *turns[-kept:]]), (r.prompt_eval_count, kept)
    assert list(c.chat(model="short-a", messages=msgs, options=opts, stream=True))[-1].prompt_eval_count == \
        r.prompt_eval_count
    bad = httpx.post(server.url + "/api/chat", json={"model": "short-a", "messages": msgs, "stream": False,
                                                     "truncate": False, "options": opts})
    assert bad.status_code == 400 and "maximum context length" in bad.json()["error"], bad.text
    huge = [system, {"role": "user", "content": "word " * 60}, {"role": "user", "content": "word " * 60}]
    assert c.chat(model="short-a", messages=huge, options=opts).prompt_eval_count == 48 - 1  # (num_predict's room)
    bad = httpx.post(server.url + "/api/chat", json={"model": "short-a", "messages": huge, "stream": False,
                                                     "truncate": False, "options": opts})
    assert bad.status_code == 400 and "maximum context length" in bad.json()["error"], bad.text



def test_a_long_conversation_past_the_context_is_shortened_in_few_tries(server):
    """A conversation of hundreds of messages past the context: each try renders and tokenizes it whole, so how many
    go is a binary search, a few tries (it took one try a message: a tenant's 1 MB chat was minutes of the server's
    tokenizer time). The reply still comes, from the latest messages; the system messages and the last one are never
    dropped."""
    from types import SimpleNamespace as M

    from controller.api.ollama import _drop_oldest

    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message number {i} is here"}
             for i in range(401)]
    r = oc(server).chat(model="short-a", messages=turns, options={"temperature": 0, "num_predict": 1})
    assert r.done and 0 < r.prompt_eval_count < 48, r
    msgs = [M(role="system"), *(M(role="user" if i % 2 == 0 else "assistant") for i in range(6))]
    assert _drop_oldest(msgs, 4) == [msgs[0], msgs[5], msgs[6]]
    assert _drop_oldest(msgs, 99) == [msgs[0], msgs[6]] and _drop_oldest([msgs[0], msgs[6]], 2) is None
