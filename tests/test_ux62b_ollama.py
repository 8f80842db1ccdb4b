"""Ollama's API as a user of the official `ollama` client meets it on a live server (tiny random-weights models, one
with a template that opens the think block in the prompt, as Qwen3's Thinking-2507 and DeepSeek-R1's do):

- model names: Ollama matches them ignoring the case of their letters (its model.Name compares with EqualFold, and
  its server finds `Llama3` among its manifests as `llama3`), `:latest` implied; here the Ollama routes were exact
  (`Tiny` was a 404 on chat, generate, embed, show, pull, delete). Now: the name as sent where a model answers to
  it, else without `:latest`, else the one name the key may use equal to it ignoring case. Two served names that
  differ only in case and none exact: neither (a 404; each is found by its exact name). The OpenAI routes stay
  exact, as vLLM's are;
- `think: true` with a `format` (a JSON schema, or "json") on a model whose template opens the think block in the
  prompt: the format's grammar held the reply to the JSON from its first token, which the reply's split read as its
  thinking (the block the prompt opened was never closed): the JSON in `thinking`, the content empty. Now the
  grammar is a think block (free text up to `</think>`) then the JSON, as vLLM's reasoning parser holds a reply to
  its structured output only once the reasoning has ended;
- `prompt_eval_count` counts the whole prompt, as Ollama's does (its PR 5371 made it so whatever its prompt cache
  held; llama-server's count of the cached tokens is added back to keep it, PR 16428): unchanged, checked here.
  Ollama's `prompt_eval_cached_count` beside it (of those, the tokens its cache held) was missing: given now.
"""

from __future__ import annotations

import json
import shutil

import httpx
import ollama
import pytest

from tests.ports import live_server_on
from tests.test_ux60b_thinking_budget import THINKING_TEMPLATE

PORTS = range(27300, 27400)
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
          "required": ["n", "ok"]}


@pytest.fixture(scope="module")
def server(make_varied, tmp_path_factory):
    work = tmp_path_factory.mktemp("ux62b")
    thinker = work / "thinker"
    shutil.copytree(make_varied("qwen2"), thinker)
    (thinker / "chat_template.jinja").write_text(THINKING_TEMPLATE)
    tiny = str(make_varied("qwen2"))
    cfg = {"workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "models": [{"name": "tiny", "path": tiny, "aliases": ["Nick"], "engine": {"max_num_seqs": 8}},
                      {"name": "Mixed-Case", "path": tiny, "engine": {"max_num_seqs": 8}},
                      {"name": "twin", "path": tiny, "engine": {"max_num_seqs": 8}},
                      {"name": "Twin", "path": tiny, "engine": {"max_num_seqs": 8}},
                      {"name": "thinker", "path": str(thinker), "engine": {"max_num_seqs": 8}}]}
    with live_server_on(PORTS, cfg, work) as srv:
        yield srv


def oc(srv) -> ollama.Client:
    return ollama.Client(host=srv.url, timeout=120)


HI = [{"role": "user", "content": "Hello there"}]
GREEDY = {"temperature": 0, "num_predict": 4}


def test_names_are_matched_ignoring_case(server):
    """A served model asked by its name in other cases (with `:latest` in any case too) is served by every Ollama
    route that names one, the reply echoing the name as sent; an alias and a name with capitals so too."""
    c = oc(server)
    want = c.chat(model="tiny", messages=HI, options=GREEDY)
    for name in ("TINY", "Tiny:Latest", "tiny:LATEST"):
        got = c.chat(model=name, messages=HI, options=GREEDY)
        assert (got.model, got.message.content) == (name, want.message.content), name
    assert c.generate(model="TiNy", prompt="Hello", options=GREEDY).response == \
        c.generate(model="tiny", prompt="Hello", options=GREEDY).response
    assert c.embed(model="TINY:latest", input="hello").embeddings == c.embed(model="tiny", input="hello").embeddings
    assert c.show("Tiny").capabilities == c.show("tiny").capabilities
    assert c.chat(model="nick", messages=HI, options=GREEDY).message.content == want.message.content  # (alias Nick)
    assert c.chat(model="mixed-case", messages=HI, options=GREEDY).done
    assert c.show("MIXED-CASE:latest").details is not None
    assert c.pull("Tiny").status == "success"
    with pytest.raises(ollama.ResponseError) as ei:  # (found, then Ollama's management is not served here: a 501)
        c.delete("TINY")
    assert ei.value.status_code == 501
    for name in ("tinyx", "tiny:7b"):  # (another name, another tag: still not found)
        with pytest.raises(ollama.ResponseError) as ei:
            c.chat(model=name, messages=HI, options=GREEDY)
        assert (ei.value.status_code, ei.value.error) == (404, f"model '{name}' not found")


def test_names_differing_only_in_case(server):
    """`twin` and `Twin` both served: each exact name is its own model; `TWIN` names neither (a 404, not a pick)."""
    c = oc(server)
    assert c.chat(model="twin", messages=HI, options=GREEDY).done
    assert c.chat(model="Twin:latest", messages=HI, options=GREEDY).done
    with pytest.raises(ollama.ResponseError) as ei:
        c.chat(model="TWIN", messages=HI, options=GREEDY)
    assert (ei.value.status_code, ei.value.error) == (404, "model 'TWIN' not found")


def test_openai_routes_stay_exact(server):
    """The OpenAI routes' model names are exact, as vLLM's served names are: `TINY` is their 404."""
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "TINY", "messages": HI, "max_tokens": 2},
                   timeout=60)
    assert r.status_code == 404, r.text


def test_format_grammar_lets_the_think_block_come_first(make_tiny):
    """The grammar a `think` + `format` request is held to, run by llguidance over a model's tokenizer as the
    engine's sampler runs it: with the block opened in the prompt, free text (JSON-looking too) up to `</think>`, then
    the schema's JSON alone; without, the reply's own `<think>...</think>` block then the JSON, or the JSON alone."""
    import llguidance
    import llguidance.hf
    from transformers import AutoTokenizer

    from controller.api import protocol as p
    from controller.api.ollama import _format_after_thinking
    from controller.api.structured import vllm_grammar

    tok = AutoTokenizer.from_pretrained(make_tiny("qwen2"))
    lt = llguidance.hf.from_tokenizer(tok)
    req = p.ChatCompletionRequest.model_validate({"model": "m", "messages": HI, "response_format": {
        "type": "json_schema", "json_schema": {"name": "format", "schema": SCHEMA}}})

    def takes(opened: bool, text: str) -> bool:
        grammar = vllm_grammar(_format_after_thinking(req, opened))
        m = llguidance.LLMatcher(lt, grammar, log_level=0)
        return m.consume_tokens(tok.encode(text)) and not m.is_error() and m.is_accepting()

    answer = '{"n": 3, "ok": true}'
    assert takes(True, f'Let me see: {{"n": 1}} is close.\n</think>\n\n{answer}')
    assert takes(True, f"</think>\n\n{answer}")
    assert not takes(True, answer)  # (the reply starts inside the block: it must close it)
    assert not takes(True, f"Hmm.</think>\n\n{answer} and more")
    assert not takes(True, 'Hmm.</think>\n\n{"n": 3}')  # (the schema's: `ok` is required)
    assert takes(False, f"<think>\nHmm.\n</think>\n\n{answer}")
    assert takes(False, answer)
    assert not takes(False, f"Hmm.</think>\n\n{answer}")


def test_think_with_format_keeps_the_json_out_of_thinking(server):
    """`think: true` with a format, on the template that opens the block: the thinking is free text (the random
    model's, not the JSON grammar's), and the content, once the block is closed, the schema's JSON; chat and
    generate, streamed or not, schema or "json". Before, the thinking was the JSON the grammar forced from the
    reply's first token and the content was empty."""
    c = oc(server)
    opts = {"temperature": 0, "num_predict": 24}
    for fmt in (SCHEMA, "json"):
        got = c.chat(model="thinker", messages=HI, think=True, format=fmt, options=opts)
        assert got.message.thinking and not got.message.thinking.lstrip().startswith("{"), got.message
        if got.message.content:  # (the block closed within num_predict: the JSON after it)
            assert got.done_reason == "stop" and isinstance(json.loads(got.message.content), dict)
        parts = list(c.chat(model="thinker", messages=HI, think=True, format=fmt, options=opts, stream=True))
        assert "".join(x.message.thinking or "" for x in parts) == got.message.thinking
        assert "".join(x.message.content for x in parts) == got.message.content
        g = c.generate(model="thinker", prompt="Hello there", think=True, format=fmt, options=opts)
        assert g.thinking and not g.thinking.lstrip().startswith("{"), g
    # (`think: false`: the format holds the reply from its first token, the JSON the content; not sent, it is on as
    # Ollama's: ux62g)
    plain = c.chat(model="thinker", messages=HI, think=False, format=SCHEMA,
                   options={"temperature": 0, "num_predict": 60})
    assert not plain.message.thinking and plain.message.content.startswith('{"n": ')


def test_bad_format_with_think_names_format(server):
    """A schema the grammar cannot take, sent with `think`: the 400 names `format`, as without it."""
    r = httpx.post(server.url + "/api/chat", json={"model": "thinker", "messages": HI, "think": True, "stream": False,
                                                   "format": {"type": "object", "properties": {"a": {"type": 7}}}},
                   timeout=60)
    assert r.status_code == 400 and r.json()["error"].startswith("format"), r.text


def test_prompt_eval_count_is_the_whole_prompt(server):
    """The same prompt twice (its second time from the prefix cache): the same prompt_eval_count, the whole
    prompt's, as Ollama counts it whatever its cache held; `prompt_eval_cached_count` (Ollama's, of those, the
    tokens the cache held) says the second found it cached, chat and generate."""
    msgs = [{"role": "user", "content": "A longer prompt, so that the prefix cache has whole blocks to keep " * 4}]
    for path, body in (("/api/chat", {"messages": msgs}), ("/api/generate", {"prompt": "Once more " + "x y " * 40})):
        first, again = (httpx.post(server.url + path, json={"model": "tiny", "stream": False, "options": GREEDY,
                                                            **body}, timeout=60).json() for _ in range(2))
        assert first["prompt_eval_count"] == again["prompt_eval_count"] > 40, (first, again)
        assert first["prompt_eval_cached_count"] < again["prompt_eval_cached_count"] <= again["prompt_eval_count"]
