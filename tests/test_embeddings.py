"""Embeddings through the live server: OpenAI's /v1/embeddings with the official `openai` client, Ollama's /api/embed
and /api/embeddings with the official `ollama` client, each vector checked against HF transformers' final hidden
state of the last token on the same weights (the pooled CPU worker, fp32)."""

from __future__ import annotations

import base64
import struct
import threading
import time

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from controller.keys import hash_key
from load_tests.live_server import LiveServer

ADMIN, METRICS = "admin-embed-token", "metrics-embed-token"
ALICE, BOB = "key-alice-embed-0123", "key-bob-embed-0123"
TEXTS = ["Hello there", "The quick brown fox jumps over the lazy dog", "x"]


@pytest.fixture(scope="module")
def models(make_tiny):
    return {"tiny-a": make_tiny("qwen2"), "tiny-b": make_tiny("llama")}


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    cfg = {
        "admin_token_hash": hash_key(ADMIN),
        "metrics_token_hash": hash_key(METRICS),
        "workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
        "tenants": [{"name": "alice", "key_hashes": [hash_key(ALICE)]},
                    {"name": "bob", "key_hashes": [hash_key(BOB)], "models": ["tiny-b"]}],
        "models": [
            {"name": "tiny-a", "path": str(models["tiny-a"]), "engine": {"max_num_seqs": 8}},
            {"name": "tiny-b", "path": str(models["tiny-b"]), "engine": {"max_num_seqs": 8}},
            {"name": "pace-1", "engine": {"kind": "pace", "pace_s_per_token": 0.05, "max_num_seqs": 1}},
        ],
    }
    with LiveServer(cfg, tmp_path_factory.mktemp("embed")) as srv:
        yield srv


@pytest.fixture(scope="module")
def hf(models):
    """name -> (tokenizer, the last token's final hidden state of a list of ids)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = {}
    for name, d in models.items():
        model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()

        def last(ids, model=model) -> torch.Tensor:
            with torch.no_grad():
                return model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1].float()

        out[name] = (AutoTokenizer.from_pretrained(str(d)), last)
    return out


def client(srv, key=ALICE) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=60)


def _close(got, want: torch.Tensor, tol: float = 1e-4) -> bool:
    return len(got) == want.numel() and (torch.tensor(got) - want).abs().max().item() <= tol


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def _metric(srv, name: str, **labels) -> float:
    text = httpx.get(srv.url + "/metrics", headers={"Authorization": f"Bearer {METRICS}"}).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _status(fn) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as ei:
        fn()
    return ei.value


def test_openai_embeddings_match_hf(server, hf):
    """The official client (which asks for base64 and decodes it) gets HF's last hidden state, unit length, for each
    input in order, on both architectures; "float" gives the same numbers; token ids give what their text gives; the
    usage is the prompts' tokens, and no generation tokens are counted."""
    c = client(server)
    gen_before = _metric(server, "tokenpool_generation_tokens_total", model="tiny-a")
    r = c.embeddings.create(model="tiny-a", input=TEXTS)
    tok, last = hf["tiny-a"]
    ids = [tok.encode(t, add_special_tokens=False) for t in TEXTS]
    assert r.object == "list" and r.model == "tiny-a" and [d.index for d in r.data] == [0, 1, 2]
    for d, x in zip(r.data, ids):
        assert d.object == "embedding" and _close(d.embedding, _unit(last(x)))
        assert abs(sum(v * v for v in d.embedding) - 1) < 1e-5
    assert (torch.tensor(r.data[0].embedding) - torch.tensor(r.data[1].embedding)).abs().max() > 1e-3
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(map(len, ids))
    raw = httpx.post(server.url + "/v1/embeddings", headers={"Authorization": f"Bearer {ALICE}"},
                     json={"model": "tiny-a", "input": TEXTS[1], "encoding_format": "float"}).json()
    assert isinstance(raw["data"][0]["embedding"], list) and raw["usage"] == {"prompt_tokens": len(ids[1]),
                                                                               "total_tokens": len(ids[1])}
    assert _close(raw["data"][0]["embedding"], torch.tensor(r.data[1].embedding), 1e-6)
    b64 = httpx.post(server.url + "/v1/embeddings", headers={"Authorization": f"Bearer {ALICE}"},
                     json={"model": "tiny-a", "input": TEXTS[1], "encoding_format": "base64"}).json()
    floats = raw["data"][0]["embedding"]
    f32 = struct.pack(f"<{len(floats)}f", *floats)  # (base64 carries float32: the float list rounded to it)
    assert base64.b64decode(b64["data"][0]["embedding"]) == f32
    by_ids = c.embeddings.create(model="tiny-a", input=ids)
    one = c.embeddings.create(model="tiny-a", input=ids[1])
    # (the same numbers but for rounding: later requests start on the KV the first cached, prefix caching)
    assert all(_close(a.embedding, torch.tensor(b.embedding), 1e-6) for a, b in zip(by_ids.data, r.data))
    assert _close(one.data[0].embedding, torch.tensor(r.data[1].embedding), 1e-6)
    assert _metric(server, "tokenpool_generation_tokens_total", model="tiny-a") == gen_before
    tok_b, last_b = hf["tiny-b"]
    rb = client(server, BOB).embeddings.create(model="tiny-b", input=TEXTS[1], dimensions=64)
    assert _close(rb.data[0].embedding, _unit(last_b(tok_b.encode(TEXTS[1], add_special_tokens=False))))


def test_embeddings_beside_generation(server, hf):
    """Embeddings asked while a greedy generation streams on the same model: the generation's text is what it is
    alone, and every embedding is the one asked alone."""
    c = client(server)
    kw = dict(model="tiny-a", prompt="Once upon a time", max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    alone = c.completions.create(**kw).choices[0].text
    want = c.embeddings.create(model="tiny-a", input=TEXTS).data
    got, errors = [], []

    def embed():
        try:
            got.append(c.embeddings.create(model="tiny-a", input=TEXTS).data)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    stream = c.completions.create(stream=True, **kw)
    threads = [threading.Thread(target=embed) for _ in range(6)]
    text = ""
    for i, ch in enumerate(stream):
        if i == 1:
            for t in threads:
                t.start()
        text += ch.choices[0].text if ch.choices else ""
    for t in threads:
        t.join()
    assert not errors and text == alone and len(got) == 6
    for data in got:
        assert all(_close(a.embedding, torch.tensor(b.embedding), 1e-5) for a, b in zip(data, want))


def test_embedding_truncation_and_errors(server, hf):
    """vLLM's truncate_prompt_tokens keeps the last tokens; an input the context cannot take is a 400 without it;
    empty input, too many inputs, an id outside the vocabulary, dimensions other than the model's, a paced model, an
    unknown model or one the key may not use: each a clear OpenAI error, counted once in the metrics."""
    c = client(server)
    tok, last = hf["tiny-a"]
    long = "word " * 3000
    ids = tok.encode(long, add_special_tokens=False)
    ctx = c.models.retrieve("tiny-a").model_extra["max_model_len"]
    assert len(ids) > ctx
    r = c.embeddings.create(model="tiny-a", input=long, extra_body={"truncate_prompt_tokens": 100})
    assert _close(r.data[0].embedding, _unit(last(ids[-100:]))) and r.usage.prompt_tokens == 100
    r = c.embeddings.create(model="tiny-a", input=long, extra_body={"truncate_prompt_tokens": -1})
    assert r.usage.prompt_tokens == ctx  # (an input may fill the context: vLLM's pooling takes max_model_len)
    e = _status(lambda: c.embeddings.create(model="tiny-a", input=long))
    assert e.status_code == 400 and e.body["code"] == "context_length_exceeded" and e.body["param"] == "input"
    e = _status(lambda: c.embeddings.create(model="tiny-a", input=[[1, 2], ids[:ctx + 1]]))  # (one past it)
    assert e.status_code == 400 and e.body["code"] == "context_length_exceeded", e.body
    assert f"maximum context length is {ctx} tokens; input 1 has {ctx + 1} tokens" in e.body["message"], e.body
    for kw, param, words in (
            (dict(input=""), "input", "empty"),
            (dict(input=["a", ""]), "input", "input 1 is an empty string"),
            (dict(input=["a"] * 2049), "input", ""),
            (dict(input=[[1, 2], [10**6]]), "input", "outside the vocabulary"),
            (dict(input="a", dimensions=32), "dimensions", "of 64 dimensions"),
            (dict(input="a", encoding_format="int8"), "encoding_format", "")):
        e = _status(lambda kw=kw: c.embeddings.create(model="tiny-a", **kw))
        assert e.status_code == 400 and e.body["type"] == "invalid_request_error", (kw, e.body)
        assert param in (e.body.get("param") or e.body["message"]) and words in e.body["message"], (kw, e.body)
    before = _metric(server, "tokenpool_requests_total", model="pace-1", status="400")
    e = _status(lambda: c.embeddings.create(model="pace-1", input="a"))
    assert e.status_code == 400 and "cannot embed" in e.body["message"], e.body
    assert _metric(server, "tokenpool_requests_total", model="pace-1", status="400") == before + 1
    e = _status(lambda: c.embeddings.create(model="nope", input="a"))
    assert e.status_code == 404 and e.body["param"] == "model"
    e = _status(lambda: client(server, BOB).embeddings.create(model="tiny-a", input="a"))
    assert e.status_code == 404
    e = _status(lambda: client(server, "wrong-key").embeddings.create(model="tiny-a", input="a"))
    assert e.status_code == 401


def test_ollama_embed_with_the_official_client(server, hf):
    """/api/embed: unit vectors equal to /v1/embeddings', the prompt's token count; an input past the context is cut
    to its start (truncate, Ollama's default) or a 400 (truncate false); no input: no vectors. /api/embeddings: one
    prompt's vector unnormalized, HF's hidden state itself. Unknown model 404, no key 401."""
    import ollama

    oc = ollama.Client(host=server.url, headers={"Authorization": f"Bearer {ALICE}"})
    tok, last = hf["tiny-a"]
    ref = client(server).embeddings.create(model="tiny-a", input=TEXTS[:2])
    r = oc.embed(model="tiny-a", input=TEXTS[:2])
    assert r.model == "tiny-a" and len(r.embeddings) == 2
    assert all(_close(a, torch.tensor(b.embedding), 1e-6) for a, b in zip(r.embeddings, ref.data))
    assert r.prompt_eval_count == ref.usage.prompt_tokens and r.total_duration > 0
    one = oc.embed(model="tiny-a", input=TEXTS[1])
    assert _close(one.embeddings[0], torch.tensor(ref.data[1].embedding), 1e-6)
    ids = tok.encode("word " * 3000, add_special_tokens=False)
    ctx = client(server).models.retrieve("tiny-a").model_extra["max_model_len"]
    cut = oc.embed(model="tiny-a", input="word " * 3000)
    assert cut.prompt_eval_count == ctx and _close(cut.embeddings[0], _unit(last(ids[:ctx])))
    with pytest.raises(ollama.ResponseError) as ei:
        oc.embed(model="tiny-a", input="word " * 3000, truncate=False)
    assert ei.value.status_code == 400 and "context length" in ei.value.error
    assert oc.embed(model="tiny-a", input=[]).embeddings == []
    legacy = oc.embeddings(model="tiny-a", prompt=TEXTS[0])
    assert _close(legacy.embedding, last(tok.encode(TEXTS[0], add_special_tokens=False)))
    assert abs(sum(v * v for v in legacy.embedding) - 1) > 1e-3  # (unnormalized, as Ollama's)
    with pytest.raises(ollama.ResponseError) as ei:
        oc.embed(model="nope", input="a")
    assert ei.value.status_code == 404 and "model 'nope' not found" in ei.value.error
    with pytest.raises(ollama.ResponseError) as ei:
        ollama.Client(host=server.url, headers={"Authorization": "Bearer wrong"}).embed(model="tiny-a", input="a")
    assert ei.value.status_code == 401


def test_rerank_and_score_by_cosine_of_hf_embeddings(server, hf):
    """vLLM's /rerank (/v1, /v2; Jina's and Cohere's shape) and /score: cosine similarities of HF's last hidden states
    (these decoders' embeddings), documents best first, top_n and return_documents honoured, usage the prompts'
    tokens; a document that is neither text nor {"text"} and mismatched score lists are 400s naming the field."""
    tok, last = hf["tiny-a"]
    hdr = {"Authorization": f"Bearer {ALICE}"}
    query, docs = "a cat", ["dogs and cats", {"text": "the stock market"}, "x y z", "a cat sat"]
    texts = [d if isinstance(d, str) else d["text"] for d in docs]
    q = _unit(last(tok.encode(query, add_special_tokens=False)))
    want = [float(q @ _unit(last(tok.encode(t, add_special_tokens=False)))) for t in texts]
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        r = httpx.post(server.url + path, headers=hdr, json={"model": "tiny-a", "query": query, "documents": docs})
        assert r.status_code == 200, r.text
        res = r.json()["results"]
        assert [x["index"] for x in res] == sorted(range(4), key=lambda i: -want[i])
        assert all(abs(x["relevance_score"] - want[x["index"]]) < 1e-4 and x["document"]["text"] == texts[x["index"]]
                   for x in res)
        assert r.json()["usage"]["prompt_tokens"] == sum(len(tok.encode(t, add_special_tokens=False))
                                                         for t in [query, *texts])
    top = httpx.post(server.url + "/v1/rerank", headers=hdr, json={"model": "tiny-a", "query": query, "documents": docs,
                                                                    "top_n": 2, "return_documents": False}).json()
    assert [x["index"] for x in top["results"]] == sorted(range(4), key=lambda i: -want[i])[:2]
    assert "document" not in top["results"][0]
    s = httpx.post(server.url + "/score", headers=hdr, json={"model": "tiny-a", "text_1": query, "text_2": texts})
    assert [round(d["score"], 4) for d in s.json()["data"]] == [round(w, 4) for w in want]
    pairs = httpx.post(server.url + "/v1/score", headers=hdr, json={"model": "tiny-a", "text_1": [query, texts[0]],
                                                                     "text_2": [texts[3], texts[3]]}).json()["data"]
    assert abs(pairs[0]["score"] - want[3]) < 1e-4 and len(pairs) == 2
    for path, body, param in (("/rerank", {"model": "tiny-a", "query": query, "documents": [{"title": "no text"}]},
                               "documents"),
                              ("/score", {"model": "tiny-a", "text_1": ["a", "b"], "text_2": ["a", "b", "c"]},
                               "text_1")):
        r = httpx.post(server.url + path, headers=hdr, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert httpx.post(server.url + "/rerank", headers=hdr, json={"model": "nope", "query": "a",
                                                                 "documents": ["b"]}).status_code == 404


def test_llama_swap_running_and_unload(server):
    """llama-swap's /running lists the key's models in VRAM (ttl: keep_alive); its /unload frees every model's VRAM
    once idle -- the admin token on this multi-tenant server, a tenant's key refused -- and they answer again after."""
    hdr = {"Authorization": f"Bearer {ALICE}"}
    client(server).completions.create(model="tiny-a", prompt="hi", max_tokens=2)

    def running() -> list[dict]:
        return httpx.get(server.url + "/running", headers=hdr).json()["running"]

    deadline = time.monotonic() + 10
    while "tiny-a" not in {m["model"] for m in running()}:  # (residency comes with the worker's next stats)
        assert time.monotonic() < deadline, running()
        time.sleep(0.2)
    assert all(m["state"] == "ready" for m in running())
    bob = httpx.get(server.url + "/running", headers={"Authorization": f"Bearer {BOB}"}).json()["running"]
    assert {m["model"] for m in bob} <= {"tiny-b"}
    assert httpx.get(server.url + "/unload", headers=hdr).status_code == 401
    r = httpx.get(server.url + "/unload", headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200 and r.text == "OK"
    deadline = time.monotonic() + 20
    while {m["model"] for m in running()} & {"tiny-a", "tiny-b"}:  # (a paced model has no weights to free)
        assert time.monotonic() < deadline, "models still resident after /unload"
        time.sleep(0.3)
    assert client(server).completions.create(model="tiny-a", prompt="hi", max_tokens=2).choices[0].text is not None
