"""Found by user testing, against one live server (a tiny model with a LoRA adapter, two paced models):

- a fast model beside an idle slow one on one worker was judged at the slow one's pace (the engine's round kept the
  slowest model's step): 40 tokens queued read as 16 s, a 429 on an idle server;
- a LoRA adapter's requests showed under the base model's name in the dashboard's requests and the `admit` event;
- an input to embed could not fill the context (vLLM's pooling takes max_model_len tokens: it generates none);
- a request body that stalled held its request for ever (now a 408 at `body_timeout_s`, its connection closed);
- a /v1/responses stream its client cut was not stored: now kept as `incomplete`, what was made until the cut;
- Ollama's /api/embed with a keep_alive that is no duration: a 400 counted nowhere, and a 400 to a caller without a key;
- Ollama's /api/generate `template` was ignored: its simple fields are rendered now, the rest a 400 naming it.

Found fine, and pinned: the Messages API's max_tokens past the context is Anthropic's invalid_request_error 400; an
Ollama request without sampling options takes the model's generation_config.json recommendation.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller.keys import hash_key
from controller.model_factory import make_lora
from load_tests.live_server import LiveServer

ADMIN, KEY = "admin-ux57-token", "key-alice-ux57-0123"
CTX = 64


@pytest.fixture(scope="module")
def server(make_tiny, make_varied, tmp_path_factory):
    work = tmp_path_factory.mktemp("ux57")
    tiny = make_tiny("qwen2")
    greedy = work / "greedy"  # (a generation_config.json that recommends top_k 1: greedy)
    shutil.copytree(make_varied("qwen2"), greedy)
    gc = greedy / "generation_config.json"
    gc.write_text(json.dumps({**json.loads(gc.read_text()), "top_k": 1}))
    cfg = {"admin_token_hash": hash_key(ADMIN), "body_timeout_s": 0.5,
           "tenants": [{"name": "alice", "key_hashes": [hash_key(KEY)]}],
           "workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "models": [
               {"name": "tiny", "path": str(tiny), "engine": {"max_num_seqs": 8, "max_model_len": CTX},
                "lora_modules": [{"name": "sql", "path": str(make_lora(tiny, work / "sql", rank=4, seed=1))}]},
               {"name": "greedy", "path": str(greedy), "engine": {"max_num_seqs": 8}},
               {"name": "varied", "path": str(make_varied("qwen2")), "engine": {"max_num_seqs": 8}},
               {"name": "slow", "slo": {"ttft_s": 1.0}, "engine": {"kind": "pace", "pace_s_per_token": 0.25}},
               {"name": "fast", "slo": {"ttft_s": 1.0},
                "engine": {"kind": "pace", "pace_s_per_token": 0.01, "max_num_seqs": 1}}]}
    with LiveServer(cfg, work) as srv:
        yield srv


def client(srv, key=KEY) -> httpx.Client:
    return httpx.Client(base_url=srv.url, timeout=60, headers={"Authorization": f"Bearer {key}"})


def oai(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def counts(srv) -> dict[tuple[str, str, str], float]:
    text = client(srv, ADMIN).get("/metrics").text
    return {(s.labels["model"], s.labels["tenant"], s.labels["status"]): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name == "tokenpool_requests_total"}


def test_a_fast_model_beside_an_idle_slow_one_is_judged_at_its_own_pace(server):
    """`fast` (0.01 s a token, one slot) beside `slow` (0.25 s a token) on one worker: once slow has run, a second
    request to fast behind one of 40 tokens waits 0.4 s, within its 1 s SLO; it was estimated at slow's step (10 s)."""
    with client(server) as c:
        assert c.post("/v1/completions", json={"model": "slow", "prompt": "x", "max_tokens": 2}).status_code == 200
        first = []
        t = threading.Thread(target=lambda: first.append(c.post("/v1/completions", json={
            "model": "fast", "prompt": "x", "max_tokens": 40, "ignore_eos": True})))
        t.start()
        time.sleep(0.1)  # (the first holds fast's one slot)
        r = c.post("/v1/completions", json={"model": "fast", "prompt": "x", "max_tokens": 40})
        t.join()
    assert first[0].status_code == 200, first[0].text
    assert r.status_code == 200, r.text


def test_a_lora_adapters_request_shows_under_the_adapters_name(server):
    """In the dashboard's requests (GET /admin/requests) and the `admit` event: the adapter the client asked for,
    the model serving it beside it as base_model."""
    seen: list[dict] = []
    done = threading.Event()

    def poll() -> None:
        with client(server, ADMIN) as a:
            while not done.is_set():
                seen.extend(a.get("/admin/requests").json())
                time.sleep(0.002)

    t = threading.Thread(target=poll)
    t.start()
    try:
        r = oai(server).completions.create(model="sql", prompt="hello", max_tokens=50, extra_body={"ignore_eos": True})
    finally:
        done.set()
        t.join()
    assert r.model == "sql"
    mine = [x for x in seen if x["id"] == r.id]
    assert mine and all((x["model"], x["base_model"]) == ("sql", "tiny") for x in mine), seen[:3]
    with client(server, ADMIN) as a, a.stream("GET", "/admin/events", params={"since": 0}) as s:
        for line in s.iter_lines():
            if line.startswith("data:") and (ev := json.loads(line[5:])).get("request_id") == r.id \
                    and ev["kind"] == "admit":
                break
    assert (ev["model"], ev["base_model"], ev["tenant"]) == ("sql", "tiny", "alice"), ev
    # (a request to the model itself has no base_model)
    with client(server, ADMIN) as a:
        assert all(x.get("base_model") is None for x in a.get("/admin/requests").json() if x["model"] == "tiny")


def test_an_input_to_embed_may_fill_the_context(server, make_tiny):
    """vLLM's pooling takes max_model_len tokens: CTX tokens embed (the last token's hidden state, as HF gives it),
    CTX + 1 are the 400; truncation keeps CTX."""
    import torch
    from transformers import AutoModelForCausalLM

    ids = [(7 * i + 11) % 3000 + 5 for i in range(CTX)]
    c = oai(server)
    got = c.embeddings.create(model="tiny", input=[ids])
    assert got.usage.prompt_tokens == CTX
    hf = AutoModelForCausalLM.from_pretrained(str(make_tiny("qwen2")), torch_dtype=torch.float32)
    with torch.no_grad():
        h = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1]
    want = (h / h.norm()).tolist()
    assert max(abs(a - b) for a, b in zip(got.data[0].embedding, want)) < 1e-4
    with pytest.raises(openai.BadRequestError) as e:
        c.embeddings.create(model="tiny", input=[ids + [5]])
    assert e.value.code == "context_length_exceeded" and f"input has {CTX + 1} tokens" in e.value.message
    with client(server) as h:
        r = h.post("/api/embed", json={"model": "tiny", "input": " a" * (2 * CTX)})
        assert r.status_code == 200 and r.json()["prompt_eval_count"] == CTX, r.text
        r = h.post("/v1/embeddings", json={"model": "tiny", "input": [ids * 2], "truncate_prompt_tokens": -1})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == CTX, r.text


def _stalled(srv, path: str) -> tuple[float, bytes, bytes]:
    """Headers and part of a body, then nothing: (seconds to the answer, the answer, what follows it)."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json"
                  "\r\nContent-Length: 100\r\n\r\n{\"model\":".encode())
        t0 = time.monotonic()
        got = b""
        while b"\r\n\r\n" not in got or len(got.split(b"\r\n\r\n", 1)[1]) < int(
                got.split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0]):
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
        took = time.monotonic() - t0
        return took, got, s.recv(100)  # (b"": the server closed the connection)


def test_a_stalled_request_body_is_a_408(server):
    before = counts(server).get(("-", "-", "408"), 0)
    took, got, after = _stalled(server, "/v1/chat/completions")
    head, body = got.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 408 "), got
    assert 0.4 < took < 5, took
    err = json.loads(body)["error"]
    assert err["code"] == "request_timeout" and "did not arrive within 0.5 s (got 9 bytes" in err["message"], err
    assert after == b""  # closed
    _, got, _ = _stalled(server, "/api/chat")  # (Ollama's routes: Ollama's error shape)
    assert got.startswith(b"HTTP/1.1 408 ") and json.loads(got.split(b"\r\n\r\n", 1)[1]) == {
        "error": "the request body did not arrive within 0.5 s (got 9 bytes of it)"}, got
    assert counts(server).get(("-", "-", "408"), 0) == before + 2
    # a body that comes in time is served as ever, a slow one included
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        body = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 1}).encode()
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: "
                  f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:5])
        time.sleep(0.2)
        s.sendall(body[5:])
        assert s.recv(4096).startswith(b"HTTP/1.1 200 ")


def test_a_responses_stream_cut_by_its_client_is_stored_incomplete(server):
    c = oai(server)
    text, rid = "", None
    with c.responses.create(model="fast", input="hi", max_output_tokens=300, stream=True) as s:
        for ev in s:
            if ev.type == "response.created":
                rid = ev.response.id
            elif ev.type == "response.output_text.delta":
                text += ev.delta
                if len(text) >= 5:
                    break
    deadline = time.monotonic() + 10
    while True:
        try:
            got = c.responses.retrieve(rid)
            break
        except openai.NotFoundError:
            assert time.monotonic() < deadline, "the cut response was never stored"
            time.sleep(0.05)
    assert got.status == "incomplete" and got.incomplete_details.reason == "interrupted", got
    kept = got.output[0].content[0].text
    assert kept.startswith(text) and len(kept) < 300 and got.usage.output_tokens == len(kept), (text, kept)
    # ... and a conversation goes on from it
    nxt = c.responses.create(model="fast", input="more", previous_response_id=rid, max_output_tokens=2)
    assert nxt.status in ("completed", "incomplete")


def test_ollama_embed_with_a_bad_keep_alive_is_a_counted_refusal(server):
    before = counts(server)
    with client(server) as c:
        for path, body in (("/api/embed", {"model": "tiny", "input": "hi", "keep_alive": "5x"}),
                           ("/api/embeddings", {"model": "tiny", "prompt": "hi", "keep_alive": [1]})):
            r = c.post(path, json=body)
            assert r.status_code == 400 and r.json()["error"].startswith("keep_alive: "), r.text
            assert httpx.post(server.url + path, json=body).status_code == 401  # (no key: 401, whatever the body)
    after = counts(server)
    assert after.get(("tiny", "alice", "400"), 0) == before.get(("tiny", "alice", "400"), 0) + 2


def test_ollama_generate_renders_the_requests_template(server):
    """The template's simple fields (Ollama's {{ .System }}, {{ .Prompt }}, if blocks, trimming) are rendered and fed
    as a raw prompt: the same ids as that prompt sent raw; anything else is a 400 that names it."""
    with client(server) as c:
        def gen(**kw):
            return c.post("/api/generate", json={"model": "tiny", "stream": False,
                                                 "options": {"num_predict": 2, "temperature": 0}, **kw})

        raw = gen(prompt="<SYS> be brief\nUSER: hiAI:", raw=True).json()
        tpl = "{{ if .System }}<SYS> {{ .System }}\n{{ end }}USER: {{ .Prompt }}\n{{- /* c */ -}}\nAI:{{ .Response }}"
        got = gen(prompt="hi", system="be brief", template=tpl).json()
        assert got["context"][:got["prompt_eval_count"]] == raw["context"][:raw["prompt_eval_count"]], (got, raw)
        assert got["response"] == raw["response"]
        no_system = gen(prompt="hi", template=tpl).json()
        assert no_system["prompt_eval_count"] == gen(prompt="USER: hiAI:", raw=True).json()["prompt_eval_count"]
        r = gen(prompt="hi", template="{{ range .Messages }}{{ .Content }}{{ end }}")
        assert r.status_code == 400 and r.json()["error"].startswith(
            "template: {{ range .Messages }} is not supported"), r.text
        assert gen(prompt="hi", template="{{ if .System }}x").status_code == 400


def test_messages_max_tokens_past_the_context_is_anthropics_400(server):
    with client(server) as c:
        r = c.post("/v1/messages", json={"model": "tiny", "max_tokens": 100000,
                                         "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
    # (Anthropic's words, which Claude Code reads to retry with a max_tokens that fits: tests/test_ux61i_agents.py)
    assert re.search(rf"input length and `max_tokens` exceed context limit: \d+ \+ 100000 > {CTX}",
                     body["error"]["message"]), body


def test_ollama_requests_without_options_take_the_models_generation_config(server):
    """`greedy` recommends top_k 1: with any seed, /api/generate and /api/chat give the greedy reply; `varied` (the
    same weights, no recommendation) varies; an option sent overrides the recommendation."""
    with client(server) as c:
        def replies(model: str, **options) -> tuple[set[str], set[str]]:
            gen = {c.post("/api/generate", json={"model": model, "prompt": "Tell me a story", "stream": False,
                                                 "options": {"num_predict": 6, "seed": s, **options}}).json()["response"]
                   for s in range(3)}
            chat = {c.post("/api/chat", json={"model": model, "stream": False, "messages": [
                {"role": "user", "content": "Tell me a story"}], "options": {"num_predict": 6, "seed": s, **options}}
                ).json()["message"]["content"] for s in range(3)}
            return gen, chat

        greedy_gen, greedy_chat = replies("greedy")
        want = c.post("/api/generate", json={"model": "varied", "prompt": "Tell me a story", "stream": False,
                                             "options": {"num_predict": 6, "temperature": 0}}).json()["response"]
        assert greedy_gen == {want} and len(greedy_chat) == 1
        assert len(replies("varied")[0]) > 1 and len(replies("greedy", top_k=-1)[0]) > 1
