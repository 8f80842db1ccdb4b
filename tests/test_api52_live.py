"""The API routes against one live server of a short-context model, as their users call them: Ollama's (a prompt
past the context cut as Ollama's runner cuts one, its first num_keep tokens then its last; a chat losing the fewest
oldest messages; Go's duration grammar for keep_alive; sampler values as Ollama clamps them) and OpenAI's (usage as
OpenAI counts it)."""

from __future__ import annotations

import httpx
import pytest

from controller.api.ollama import go_duration_s
from load_tests.live_server import LiveServer

CTX = 48


@pytest.fixture(scope="module")
def server(make_tiny, tmp_path_factory):
    work = tmp_path_factory.mktemp("api52")
    cfg = {"workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "models": [{"name": "short", "path": str(make_tiny("qwen2")),
                       "engine": {"max_num_seqs": 8, "max_model_len": CTX}}]}
    with LiveServer(cfg, work) as srv:
        yield srv


def ids_of(srv, **body) -> list[int]:
    r = httpx.post(srv.url + "/tokenize", json={"model": "short", **body})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def generate(srv, **body) -> httpx.Response:
    return httpx.post(srv.url + "/api/generate", json={"model": "short", "stream": False, **body}, timeout=60)


PROMPT = " ".join(f"word{i}" for i in range(40))


def test_a_generate_prompt_past_the_context_is_cut_as_ollamas_runner_cuts_it(server):
    """Past the context, the prompt keeps its first num_keep tokens (4, Ollama's default) and its last ones, the
    tokens between dropped, so that the reply has room: num_predict's, at most half the context after the kept
    tokens (what Ollama's context shift frees); raw or through the template, streamed or not. The `context`
    returned starts with the prompt as it was fed. `truncate: false` is the 400."""
    raw = ids_of(server, prompt=PROMPT)
    assert len(raw) > CTX
    opts = {"temperature": 0, "num_predict": 5}
    r = generate(server, prompt=PROMPT, raw=True, options=opts)
    assert r.status_code == 200, r.text
    body = r.json()
    fed = CTX - 5
    assert body["prompt_eval_count"] == fed and body["context"][:fed] == raw[:4] + raw[-(fed - 4):], body
    assert 0 < body["eval_count"] <= 5
    # no num_predict: half of what follows the kept tokens (Ollama's shift); num_keep 0: the prompt's end alone
    half = (CTX - 4) // 2
    body = generate(server, prompt=PROMPT, raw=True, options={"temperature": 0, "num_predict": 1}).json()
    assert body["prompt_eval_count"] == CTX - 1, body  # (num_predict is the room: one token)
    body = generate(server, prompt=PROMPT, raw=True, options={"temperature": 0}).json()
    assert body["prompt_eval_count"] == CTX - half and body["context"][:CTX - half] == raw[:4] + raw[-(CTX - half - 4):]
    body = generate(server, prompt=PROMPT, raw=True, options={**opts, "num_keep": 0}).json()
    assert body["context"][:fed] == raw[-fed:], body
    # through the template: its start is what num_keep keeps; streamed, the last line counts the same
    templated = ids_of(server, messages=[{"role": "user", "content": PROMPT}])
    body = generate(server, prompt=PROMPT, options=opts).json()
    assert body["context"][:fed] == templated[:4] + templated[-(fed - 4):], body
    with httpx.stream("POST", server.url + "/api/generate", json={"model": "short", "prompt": PROMPT, "options": opts},
                      timeout=60) as s:
        assert s.status_code == 200
        last = [line for line in s.iter_lines() if line][-1]
    assert '"done": true' in last and f'"prompt_eval_count": {fed}' in last, last
    bad = generate(server, prompt=PROMPT, raw=True, truncate=False, options=opts)
    assert bad.status_code == 400 and "maximum context length" in bad.json()["error"], bad.text
    # (a prompt that fits is fed whole)
    assert generate(server, prompt="word1 word2", raw=True, options=opts).json()["prompt_eval_count"] == \
        len(ids_of(server, prompt="word1 word2"))


def test_a_generate_continued_past_the_context_keeps_the_conversations_start(server):
    """A `context` (the earlier turns' ids) that with the new prompt runs past the context: cut the same way, the
    conversation's first tokens kept and its latest (the new prompt's end), instead of a 400."""
    opts = {"temperature": 0, "num_predict": 4}
    first = generate(server, prompt=PROMPT[:60], raw=True, options=opts).json()
    r = generate(server, prompt=PROMPT, raw=True, context=first["context"], options=opts)
    assert r.status_code == 200, r.text
    whole = first["context"] + ids_of(server, prompt=PROMPT)
    fed = CTX - 4
    assert r.json()["context"][:fed] == whole[:4] + whole[-(fed - 4):]


def test_keep_alive_takes_gos_durations_only():
    """Go's time.ParseDuration, as Ollama parses a keep_alive string: its units (ns us µs μs ms s m h), a sign,
    fractions, "0"; "1d", a bare "300", spaces and anything past ~292 years are its errors."""
    assert [go_duration_s(s) for s in ("5m", "1h30m", "-1m", "300ms", ".5h", "5.s", "0", "+0", "1µs", "1μs")] == \
        [300, 5400, -60, 0.3, 1800, 5, 0, 0, 1e-6, 1e-6]
    assert go_duration_s("2562047h47m16.854775807s") == pytest.approx(9223372036.854776)
    for bad, why in (("1d", 'unknown unit "d"'), ("300", "missing unit"), ("-1", "missing unit"),
                     ("1h30", "missing unit"), ("5 m", "unknown unit"), (" 5m", "invalid"), ("", "invalid"),
                     ("-", "invalid"), (".s", "invalid"), ("2562047h47m16.854775808s", "invalid")):
        with pytest.raises(ValueError, match=why):
            go_duration_s(bad)


def test_keep_alive_1d_is_refused_as_ollama_refuses_it(server):
    """keep_alive "1d" (the configuration file's spelling, not Go's) is Ollama's 400 on chat, generate and both
    embedding endpoints (the older one took anything); a JSON number is seconds and -1 (forever) is taken."""
    for path, body in (("/api/chat", {"messages": [{"role": "user", "content": "Hi"}]}), ("/api/generate", {"prompt": "Hi"}),
                       ("/api/embed", {"input": "Hi"}), ("/api/embeddings", {"prompt": "Hi"})):
        r = httpx.post(server.url + path, json={"model": "short", "stream": False, "keep_alive": "1d", **body,
                                                "options": {"num_predict": 1}}, timeout=60)
        assert r.status_code == 400 and r.json()["error"].startswith('keep_alive: unknown unit "d"'), (path, r.text)
    for ka in (-1, 60, "-1s", "10m"):
        assert generate(server, prompt="Hi", keep_alive=ka, options={"num_predict": 1}).status_code == 200, ka
    # a number is whole seconds, as Go's int(t) makes it: 0.5 is 0, which unloads (a load request with it: `stop`)
    for ka, want in ((1.5, "load"), (0.5, "unload")):
        r = httpx.post(server.url + "/api/generate", json={"model": "short", "keep_alive": ka}, timeout=60)
        assert r.json()["done_reason"] == want, (ka, r.text)


def test_a_conversation_far_past_the_context_loses_only_the_messages_it_must(server):
    """A chat dozens of messages past the context loses exactly its oldest messages that must go (the fewest that
    leave room to generate, found by a tokenize-only search): it lost up to twice that many past 16 drops. The system
    message and the last one stay."""
    system = {"role": "system", "content": "Be brief."}
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message number {i} is here"}
             for i in range(61)]
    kept = 1
    while len(ids_of(server, messages=[system, *turns[-(kept + 1):]])) < CTX:
        kept += 1
    assert len(turns) - kept > 20 and kept > 1
    r = httpx.post(server.url + "/api/chat", json={"model": "short", "stream": False, "messages": [system, *turns],
                                                   "options": {"temperature": 0, "num_predict": 1}}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["prompt_eval_count"] == len(ids_of(server, messages=[system, *turns[-kept:]])), kept


def test_a_request_without_its_model_is_ollamas_400(server):
    """A request that leaves out `model` is Ollama's 400 "model is required", not the validator's words."""
    for path, body in (("/api/chat", {"messages": [{"role": "user", "content": "Hi"}]}), ("/api/generate", {"prompt": "Hi"}),
                       ("/api/embed", {"input": "Hi"}), ("/api/embeddings", {"prompt": "Hi"})):
        r = httpx.post(server.url + path, json={"stream": False, **body}, timeout=60)
        assert (r.status_code, r.json()) == (400, {"error": "model is required"}), (path, r.text)


def test_ollamas_sampler_values_are_taken_as_ollama_clamps_them(server):
    """Ollama's sampler takes any value: top_p 0 keeps the likeliest token alone and a negative temperature is 0, so
    both reply as greedy decoding does (they were 400s); top_k 0 is no top-k. A value out of range here is a 400
    naming the Ollama option sent, not the OpenAI field it became."""
    def reply(**opts) -> str:
        r = generate(server, prompt="Once upon a time", raw=True, options={"num_predict": 6, **opts})
        assert r.status_code == 200, (opts, r.text)
        return r.json()["response"]

    greedy = reply(temperature=0)
    assert {reply(top_p=0, seed=s) for s in range(3)} == {greedy}
    assert {reply(temperature=-1, seed=s) for s in range(3)} == {greedy}
    assert reply(top_k=0, temperature=0) == greedy
    assert len({reply(seed=s) for s in range(4)}) > 1  # (sampled, the replies vary: the cases above are not luck)
    for opts, name in (({"repeat_penalty": 0}, "options.repeat_penalty"), ({"temperature": 5}, "options.temperature"),
                       ({"num_predict": 1 << 30}, "options.num_predict")):
        r = generate(server, prompt="Hi", raw=True, options=opts)
        assert r.status_code == 400 and r.json()["error"].startswith(name + ":"), (opts, r.text)


def test_an_endpoint_asked_with_another_method_is_a_405_naming_its_own(server):
    """POST /api/tags or GET /api/chat: a 405 saying which method the endpoint takes (it was a 404 "no such
    endpoint", or a bare 405 for a GET of any path); an unknown path is a 404 whatever the method."""
    for method, path, want in (("POST", "/api/tags", "GET"), ("GET", "/api/chat", "POST"), ("PUT", "/api/version", "GET"),
                               ("GET", "/api/delete", "DELETE")):
        r = httpx.request(method, server.url + path)
        assert (r.status_code, r.headers.get("allow")) == (405, want), (method, path, r.text)
        assert r.json() == {"error": f"{path} takes {want}, not {method}"}
    for method in ("GET", "POST"):
        r = httpx.request(method, server.url + "/api/nope")
        assert (r.status_code, r.json()) == (404, {"error": "no such endpoint: /api/nope"}), (method, r.text)
    for method in ("DELETE", "POST"):  # (management, as before: a served model's delete is the 501)
        assert httpx.request(method, server.url + "/api/delete", json={"model": "short"}).status_code == 501


def test_a_chat_whose_last_message_alone_is_past_the_context_is_cut_as_a_prompt(server):
    """Ollama's chat drops the oldest messages, then its runner cuts the prompt that is still past the context as
    a generate prompt's (the first num_keep tokens, then the last): a last message alone past the context is no
    400 (it was), streamed or not; the prompt fed is the shortest conversation's (the system message and the last
    one), cut so."""
    system = {"role": "system", "content": "Be brief."}
    msgs = [system, {"role": "user", "content": "an older one"}, {"role": "assistant", "content": "fine"},
            {"role": "user", "content": PROMPT}]
    shortest = ids_of(server, messages=[system, msgs[-1]])
    assert len(shortest) > CTX
    fed = CTX - 5
    want = shortest[:4] + shortest[-(fed - 4):]
    body = {"model": "short", "messages": msgs, "options": {"temperature": 0, "num_predict": 5}}
    r = httpx.post(server.url + "/api/chat", json={**body, "stream": False}, timeout=60)
    assert r.status_code == 200 and r.json()["prompt_eval_count"] == fed, r.text
    same = httpx.post(server.url + "/v1/completions", json={"model": "short", "prompt": want, "max_tokens": 5,
                                                             "temperature": 0}, timeout=60)
    assert r.json()["message"]["content"] == same.json()["choices"][0]["text"]  # (the reply to exactly that prompt)
    with httpx.stream("POST", server.url + "/api/chat", json=body, timeout=60) as s:
        last = [line for line in s.iter_lines() if line][-1]
    assert f'"prompt_eval_count": {fed}' in last, last



def test_an_echo_with_max_tokens_0_counts_no_completion_tokens(server):
    """OpenAI's legacy prompt scoring (echo, max_tokens 0): the prompt comes back, nothing generated, and the usage
    counts no completion token (it counted the one made for the prompt's logprobs), streamed or not."""
    import openai

    c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    n = len(ids_of(server, prompt="Hello world"))
    r = c.completions.create(model="short", prompt="Hello world", max_tokens=0, echo=True, logprobs=1)
    assert r.choices[0].text == "Hello world" and len(r.choices[0].logprobs.tokens) == n
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n, 0, n)
    chunks = list(c.completions.create(model="short", prompt="Hello world", max_tokens=0, echo=True, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == "Hello world"
    assert (chunks[-1].usage.completion_tokens, chunks[-1].usage.total_tokens) == (0, n)
    assert c.completions.create(model="short", prompt="Hello world", max_tokens=2).usage.completion_tokens == 2


def test_ollamas_show_details_are_the_tags_ones(server):
    """`show` writes a model's details as `tags` does (parent_model, parameter_size, quantization_level too, which
    clients read from either) and its modified_at, which the `ollama` client parses."""
    import ollama

    c = ollama.Client(host=server.url, timeout=60)
    shown = c.show("short")
    listed = next(m for m in c.list().models if m.model == "short:latest")
    assert shown.details.model_dump(exclude={"parent_model"}) == listed.details.model_dump(exclude={"parent_model"})
    assert shown.details.parameter_size != "" and shown.modified_at == listed.modified_at  # (test_ux57h_ollama_client)

