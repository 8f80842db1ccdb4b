"""Ollama's API as a user of the official `ollama` client meets it on a live server (tiny random-weights models,
varied, one with a template that thinks):

- `options.seed` -1 is Ollama's "no seed" (its default; its sampler seeds no generator for it, so each request draws
  afresh): it was passed on as a fixed seed, so every request sending it got the same reply;
- `think` not sent, to a model whose template thinks: Ollama's chat and generate handlers turn it on for a model
  with the thinking capability, the reply's thinking apart in `thinking`; it was left in the content (with a stray
  `</think>` where the template opened the block in the prompt). With a `format` too, as Ollama's (ux62g: the think
  block, then the JSON; it was left off here, the grammar holding the reply to the JSON from its first token);
- `/api/generate` on a template that opens the think block in the prompt gave the whole reply as `response`, with
  `think: true` too (the prompt's end, which tells the reply starts inside the block, was kept by the chat path only);
- `/api/generate` with `raw` and a `system` or `template`: Ollama's 400 (raw mode takes neither); both were dropped
  without a word, the reply made as if they had not been sent;
- `options.stop` of more than 8 strings (the OpenAI request's bound) was a 400, where Ollama sets no number: code
  assistants send more (Continue's autocomplete for Qwen2.5-Coder: its 9 FIM tokens and 3 of its own). Up to 64 now;
- `/api/generate` (not raw) to a model with no chat template (a base model) was a 400 saying to send raw; Ollama's
  default template, `{{ .Prompt }}`, feeds the prompt as it is, so its generate completes a text model's prompt.
"""

from __future__ import annotations

import json
import shutil

import ollama
import pytest

from tests.ports import live_server_on
from tests.test_ux60b_thinking_budget import THINKING_TEMPLATE

PORTS = range(26600, 26700)


@pytest.fixture(scope="module")
def server(make_varied, tmp_path_factory):
    work = tmp_path_factory.mktemp("ux61e")
    thinker = work / "thinker"
    shutil.copytree(make_varied("qwen2"), thinker)
    # (the thinking-only shape: the generation prompt opens `<think>` unless enable_thinking is false)
    (thinker / "chat_template.jinja").write_text(THINKING_TEMPLATE)
    base = work / "base"  # (no chat template: a base model's folder)
    shutil.copytree(make_varied("qwen2"), base)
    (base / "chat_template.jinja").unlink()
    cfg = {"workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "models": [{"name": "tiny", "path": str(make_varied("qwen2")), "engine": {"max_num_seqs": 8}},
                      {"name": "thinker", "path": str(thinker), "engine": {"max_num_seqs": 8}},
                      {"name": "base", "path": str(base), "engine": {"max_num_seqs": 8}}]}
    with live_server_on(PORTS, cfg, work) as srv:
        yield srv


def oc(srv) -> ollama.Client:
    return ollama.Client(host=srv.url, timeout=120)


def test_seed_minus_one_is_no_seed(server):
    """Sampled replies (temperature 1.5) with `seed` -1 differ from request to request, as those sending no seed do,
    on both routes; a real seed still gives one reply every time."""
    c = oc(server)
    msgs = [{"role": "user", "content": "Tell me a story"}]

    def replies(seed: int | None, chat: bool) -> set[str]:
        opts = {"temperature": 1.5, "num_predict": 12, **({"seed": seed} if seed is not None else {})}
        if chat:
            return {c.chat(model="tiny", messages=msgs, options=opts).message.content for _ in range(5)}
        return {c.generate(model="tiny", prompt="Tell me a story", options=opts).response for _ in range(5)}

    for chat in (True, False):
        assert len(replies(None, chat)) > 1  # (the model's samples do vary)
        assert len(replies(-1, chat)) > 1, chat
        assert len(replies(7, chat)) == 1, chat


def test_think_not_sent_is_on_for_a_model_that_thinks(server):
    """`think` not sent to a model whose template thinks: the reply as with `think: true` (the same prompt, its
    thinking apart from the content, no `</think>` in it), chat and generate, streamed or not; `think: false` still
    turns it off. With `format` on too, as Ollama's (ux62g): the thinking apart, the JSON after it."""
    c = oc(server)
    msgs = [{"role": "user", "content": "Hello there"}]
    opts = {"temperature": 0, "num_predict": 12}
    on = c.chat(model="thinker", messages=msgs, think=True, options=opts)
    assert on.message.thinking
    got = c.chat(model="thinker", messages=msgs, options=opts)
    assert (got.message.thinking, got.message.content, got.prompt_eval_count) == \
        (on.message.thinking, on.message.content, on.prompt_eval_count)
    assert "</think>" not in got.message.content
    parts = list(c.chat(model="thinker", messages=msgs, options=opts, stream=True))
    assert "".join(p.message.thinking or "" for p in parts) == on.message.thinking
    assert "".join(p.message.content for p in parts) == on.message.content
    off = c.chat(model="thinker", messages=msgs, think=False, options=opts)
    assert not off.message.thinking and off.prompt_eval_count > on.prompt_eval_count

    g_on = c.generate(model="thinker", prompt="Hello there", think=True, options=opts)
    g = c.generate(model="thinker", prompt="Hello there", options=opts)
    assert g_on.thinking and (g.thinking, g.response) == (g_on.thinking, g_on.response)
    g_parts = list(c.generate(model="thinker", prompt="Hello there", options=opts, stream=True))
    assert "".join(p.thinking or "" for p in g_parts) == g_on.thinking

    fmt = c.chat(model="thinker", messages=msgs, format="json", options={"temperature": 0, "num_predict": 40})
    assert fmt.message.thinking and not fmt.message.thinking.lstrip().startswith("{"), fmt.message
    if fmt.message.content:  # (the block closed within num_predict: the JSON after it)
        assert fmt.done_reason == "stop" and isinstance(json.loads(fmt.message.content), dict)


def test_raw_with_system_or_template_is_a_400(server):
    """`raw` with a `system` or a `template` is Ollama's 400 naming raw mode, streamed or not; a raw prompt alone, with
    an empty system, or with a `context` (taken here) is served."""
    c = oc(server)
    opts = {"temperature": 0, "num_predict": 3}
    for kw in ({"system": "Be brief"}, {"template": "{{ .Prompt }}"}):
        for stream in (False, True):
            with pytest.raises(ollama.ResponseError) as ei:
                r = c.generate(model="tiny", prompt="Hello", raw=True, stream=stream, options=opts, **kw)
                list(r) if stream else r
            assert ei.value.status_code == 400 and ei.value.error.startswith("raw mode does not support"), kw
    first = c.generate(model="tiny", prompt="Hello", raw=True, system="", options=opts)
    assert first.done and first.eval_count == 3
    assert c.generate(model="tiny", prompt=" again", raw=True, context=first.context, options=opts).done


def test_think_not_sent_lets_a_thinking_models_calls_be_read():
    """A model whose template thinks (Qwen3's, with the hermes parser: the common tool model) asked with tools and no
    `think`: thinking is on (`_think`), so its reply's think block goes apart and the `<tool_call>` after it is read
    as a call. Before, the reply's start (`<think>`) made the tool reader take it all as text: no `tool_calls`, the
    raw call in the content. (Scripted through the route's stream: the tiny random models write no call on cue.)"""
    import asyncio
    from types import SimpleNamespace

    from controller.api.ollama import ChatRequest, _Split, _stream, _think
    from controller.api.structured import HERMES_CLOSE, HERMES_OPEN, ToolPlan
    from tests.test_ux58a_ollama_stream_calls import _call, _Gen, _Serving

    me = SimpleNamespace(tokenizer=SimpleNamespace(chat_template="{% if enable_thinking %}<think>{% endif %}"))
    body = ChatRequest.model_validate({"model": "q", "messages": [{"role": "user", "content": "Weather?"}],
                                       "tools": [{"type": "function", "function": {"name": "get_weather"}}]})
    kwargs, thinking = _think(me, body)
    assert thinking and kwargs == {"enable_thinking": True}
    assert _think(me, body.model_copy(update={"think": False})) == ({"enable_thinking": False}, False)

    lines: list[dict] = []

    def line(text, done=False, reason=None, calls=None, thought="", logprobs=None):
        return json.dumps({"content": text, "thinking": thought, "done": done, "calls": calls or []}).encode()

    async def read():
        pieces = ["<think>\nThe user wants", " the weather.\n</think>\n\n", HERMES_OPEN, _call("Paris"), HERMES_CLOSE]
        async for b in _stream(_Serving(), _Gen(pieces, []), line, ToolPlan("", None, [], hermes=True), None,
                               _Split(False) if thinking else None):
            lines.append(json.loads(b))

    asyncio.run(read())
    assert "".join(x["thinking"] for x in lines) == "The user wants the weather."
    assert [c["function"]["arguments"] for x in lines for c in x["calls"]] == [{"city": "Paris"}]
    assert "".join(x["content"] for x in lines) == ""


# the stop list Continue's autocomplete sends for Qwen2.5-Coder: its FIM template's tokens, then its own three
FIM_STOPS = ["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
             "<|file_sep|>", "<|im_start|>", "<|im_end|>", "/src/", "#- coding: utf-8", "```"]


def test_more_stop_strings_than_openais_bound(server):
    """Twelve stop strings (Continue's list and one the reply holds) end the reply at the one it holds, on raw
    generate, templated generate and chat, streamed or not (done_reason stop); past 64 a 400 naming options.stop."""
    c = oc(server)
    opts = {"temperature": 0, "num_predict": 12}
    msgs = [{"role": "user", "content": "Write some code"}]
    calls = {"raw": lambda o, **kw: c.generate(model="tiny", prompt="def f(x):", raw=True, options=o, **kw),
             "generate": lambda o, **kw: c.generate(model="tiny", prompt="Write some code", options=o, **kw),
             "chat": lambda o, **kw: c.chat(model="tiny", messages=msgs, options=o, **kw)}
    text = {"raw": lambda r: r.response, "generate": lambda r: r.response, "chat": lambda r: r.message.content}
    for name, call in calls.items():
        whole = text[name](call(opts))
        assert len(whole) > 4, (name, whole)
        cut = whole[len(whole) // 2:len(whole) // 2 + 2]
        want = whole[:whole.index(cut)]
        got = call({**opts, "stop": [*FIM_STOPS, cut]})
        assert (text[name](got), got.done_reason) == (want, "stop"), name
        parts = list(call({**opts, "stop": [cut, *FIM_STOPS]}, stream=True))
        assert "".join(text[name](p) for p in parts) == want and parts[-1].done_reason == "stop", name
    with pytest.raises(ollama.ResponseError) as ei:
        calls["chat"]({**opts, "stop": [f"s{i}" for i in range(65)]})
    assert ei.value.status_code == 400 and ei.value.error.startswith("options.stop: List should have at most 64")


def test_generate_to_a_model_without_a_chat_template_feeds_the_prompt(server):
    """A base model (no chat template) asked through /api/generate without raw: its prompt is completed as it is, the
    same reply, prompt ids and context as raw gives, streamed or not (Ollama's default template, {{ .Prompt }});
    /api/chat to it is still the 400 naming the missing template."""
    c = oc(server)
    opts = {"temperature": 0, "num_predict": 6}
    raw = c.generate(model="base", prompt="Once upon a time", raw=True, options=opts)
    got = c.generate(model="base", prompt="Once upon a time", options=opts)
    assert (got.response, got.prompt_eval_count, got.context) == (raw.response, raw.prompt_eval_count, raw.context)
    parts = list(c.generate(model="base", prompt="Once upon a time", options=opts, stream=True))
    assert "".join(p.response for p in parts) == raw.response and parts[-1].context == raw.context
    with pytest.raises(ollama.ResponseError) as ei:
        c.chat(model="base", messages=[{"role": "user", "content": "Hi"}], options=opts)
    assert ei.value.status_code == 400 and "no chat template" in ei.value.error
