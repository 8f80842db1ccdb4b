"""Ollama's API (/api/*) as its users meet it through the official `ollama` client, against one live server of a
tiny model: `format` schemas held as Ollama holds them, the closing timings a client divides by, and `ps`'s expiry."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Literal

import httpx
import ollama
import pytest
from pydantic import BaseModel

from load_tests.live_server import LiveServer


@pytest.fixture(scope="module")
def server(make_tiny, tmp_path_factory):
    work = tmp_path_factory.mktemp("ux55_ollama")
    cfg = {"workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "models": [{"name": "tiny", "path": str(make_tiny("qwen2")), "engine": {"max_num_seqs": 8}},
                      {"name": "kept", "path": str(make_tiny("llama")), "keep_alive": "10m",
                       "engine": {"max_num_seqs": 8}}]}
    with LiveServer(cfg, work) as srv:
        yield srv


def oc(srv) -> ollama.Client:
    return ollama.Client(host=srv.url, timeout=60)


class Verdict(BaseModel):
    ok: bool
    kind: Literal["a", "b"]


def test_a_format_schema_takes_no_properties_it_does_not_list(server):
    """Ollama's structured outputs as its docs show them: `format=Model.model_json_schema()`, the reply parsed back
    with `Model.model_validate_json`. pydantic's schema says nothing of additionalProperties, and Ollama's grammar
    (llama.cpp's json-schema-to-grammar) then allows no other keys. Here the schema was held open: a model went on
    after the listed keys with keys of its own (`{"ok": false, "kind": "a", "< sp calling...`) until num_predict cut
    it, and the reply was not even JSON. Streamed or not, sampled with any seed, the reply is the model's."""
    c = oc(server)
    msgs = [{"role": "user", "content": "Judge it"}]
    for seed in range(6):
        opts = {"temperature": 1.0, "seed": seed, "num_predict": 48}
        r = c.chat(model="tiny", messages=msgs, format=Verdict.model_json_schema(), options=opts)
        assert r.done_reason == "stop", (seed, r.message.content)
        Verdict.model_validate_json(r.message.content)
        g = c.generate(model="tiny", prompt="Judge it", format=Verdict.model_json_schema(), options=opts)
        assert g.done_reason == "stop", (seed, g.response)
        Verdict.model_validate_json(g.response)
    streamed = "".join(x.message.content for x in c.chat(model="tiny", messages=msgs, stream=True, options=opts,
                                                        format=Verdict.model_json_schema()))
    Verdict.model_validate_json(streamed)
    # a schema that allows more keys, or any object, still takes them
    free = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
            "additionalProperties": {"type": "integer"}}
    r = c.generate(model="tiny", prompt="Judge it", format=free, options={"temperature": 0, "num_predict": 48})
    assert r.response.startswith('{"ok": '), r.response


def test_a_one_token_reply_has_an_eval_duration(server):
    """A client's tokens-per-second is eval_count / eval_duration (`ollama run --verbose` prints it; scripts compute
    it so). A reply of one token had eval_duration 0 (timed from its first token to its last, the same one): a
    ZeroDivisionError in Python. Ollama times eval until its final response, never 0 once a token is made."""
    c = oc(server)
    opts = {"temperature": 0, "num_predict": 1}
    r = c.generate(model="tiny", prompt="Hello", options=opts)
    s = [x for x in c.chat(model="tiny", messages=[{"role": "user", "content": "Hello"}], options=opts,
                           stream=True)][-1]
    for reply in (r, s):
        assert reply.done and reply.eval_count == 1, reply
        assert reply.eval_duration > 0 and reply.prompt_eval_duration > 0, reply
        assert reply.total_duration >= reply.prompt_eval_duration + reply.eval_duration, reply
        assert reply.eval_count / reply.eval_duration * 1e9 > 0


def test_ps_says_when_a_model_is_freed(server):
    """`ps` lists a resident model's expires_at. It was Go's zero time (0001-01-01) for every model, which the
    `ollama ps` CLI shows as "Stopping..." (an expiry that has passed). A model with a keep_alive expires that long
    after its latest request, as Ollama's; one the pool keeps until the memory is needed, for ever (Ollama's
    keep_alive -1: some 292 years on)."""
    c = oc(server)
    for m in ("tiny", "kept"):
        c.generate(model=m, prompt="Hi", options={"num_predict": 1})
    deadline = time.monotonic() + 10
    while len(seen := {m.model.removesuffix(":latest"): m.expires_at for m in c.ps().models}) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)  # (residency comes with the engine's heartbeat)
    now = datetime.now(timezone.utc)
    assert set(seen) == {"tiny", "kept"}, seen
    assert abs((seen["kept"] - now).total_seconds() - 600) < 30, seen
    assert seen["tiny"].year >= now.year + 200, seen
    time.sleep(1.1)  # (the expiry follows the latest request, not the ps call)
    assert {m.model: m.expires_at for m in c.ps().models}["kept:latest"] == seen["kept"]


def test_a_negative_context_token_is_a_400_before_any_reply(server):
    """A generate's `context` (token ids a previous reply returned) holding a negative id reached the engine: a
    streamed request got its 200 and NDJSON lines, then an error line. It is refused as one past the vocabulary
    is, a 400 before anything is sent, streamed or not."""
    c = oc(server)
    for context in ([-1], [5, -7, 9]):
        for stream in (True, False):
            with pytest.raises(ollama.ResponseError) as e:
                r = c.generate(model="tiny", prompt="Hi", context=context, stream=stream, options={"num_predict": 2})
                list(r) if stream else None
            assert e.value.status_code == 400 and "outside the vocabulary" in e.value.error, (context, stream)
    assert c.generate(model="tiny", prompt="Hi", context=[5, 7], options={"num_predict": 1}).done


def test_a_body_nested_too_deeply_is_a_400(server):
    """JSON nested deeper than Python's parser goes (its RecursionError, not a ValueError) was Ollama's 500
    "internal error: RecursionError"; so was a `format` schema the parser took but the schema's closing recursed
    past. Both are 400s, as the OpenAI routes answer them."""
    deep = "[" * 100_000 + "]" * 100_000
    for path in ("/api/generate", "/api/chat", "/api/show", "/api/embed", "/api/pull"):
        r = httpx.post(server.url + path, content=f'{{"model": {deep}}}', timeout=30)
        assert r.status_code == 400 and "nested too deeply" in r.json()["error"], (path, r.text)
    fmt = '{"a": ' * 600 + "1" + "}" * 600
    r = httpx.post(server.url + "/api/generate", timeout=30, content='{"model": "tiny", "prompt": "x", "stream": false, '
                   f'"format": {fmt}}}')
    assert r.status_code == 400 and r.json()["error"].startswith("format: "), r.text


def test_values_of_the_wrong_json_type_are_400s_as_ollama_answers_them(server):
    """Ollama's Go decoder refuses a string for a boolean or a number, and its options a string for a number; here
    they were coerced: `"num_predict": "0"` read as 0 (no limit: the reply ran to the end of the context),
    `"stream": "no"` as false, `"context": [true]` as [1]. They are 400s naming the field; a number with a fraction
    for an integer option is truncated, as Ollama's Options.FromMap does."""
    def post(path: str, **body) -> httpx.Response:
        return httpx.post(server.url + path, json={"model": "tiny", "stream": False, **body}, timeout=30)

    for path, body, field in (
            ("/api/generate", {"prompt": "Hi", "options": {"num_predict": "0"}}, "options.num_predict"),
            ("/api/chat", {"messages": [{"role": "user", "content": "Hi"}], "options": {"temperature": "0.5",
                                                                                        "num_predict": 1}},
             "options.temperature"),
            ("/api/generate", {"prompt": "Hi", "stream": "no", "options": {"num_predict": 1}}, "stream"),
            ("/api/generate", {"prompt": "Hi", "context": [True], "options": {"num_predict": 1}}, "context.0"),
            ("/api/chat", {"messages": [{"role": "user", "content": 5}], "options": {"num_predict": 1}},
             "messages.0.content"),
            ("/api/embed", {"input": "Hi", "truncate": "yes"}, "truncate")):
        r = post(path, **body)
        assert r.status_code == 400 and r.json()["error"].startswith(field + ":"), (path, body, r.text)
    r = post("/api/generate", prompt="Hi", options={"num_predict": 2.9, "seed": 3.0, "top_k": 40.5})
    assert r.status_code == 200 and r.json()["eval_count"] == 2, r.text


def test_api_version_is_an_ollama_version_clients_accept(server):
    """Clients check /api/version against the Ollama they need: VS Code's Copilot Chat refuses one older than 0.6.4,
    Open WebUI warns below 0.1.16. It answered tokenpool's own version, 0.1.0, too old for both; it is the Ollama
    version whose API the routes follow (tokenpool's own is beside it, and at /version)."""
    body = httpx.get(server.url + "/api/version", timeout=10).json()
    have = tuple(int(x) for x in body["version"].split("."))
    assert have >= (0, 6, 4), body
    assert body["tokenpool_version"] == httpx.get(server.url + "/version", timeout=10).json()["version"], body
