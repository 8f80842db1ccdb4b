"""Prefix caching through the live server, as OpenAI's and vLLM's users see it: `usage.prompt_tokens_details.
cached_tokens` with the official `openai` client, the same text as with the cache off, tenants kept apart (no hit
on another tenant's prompt), vLLM's `cache_salt`, and the prefix-cache counters on /metrics."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller.keys import hash_key
from load_tests.live_server import LiveServer

ADMIN, METRICS = "admin-apc-token", "metrics-apc-token"
ALICE, BOB = "key-alice-apc-0123", "key-bob-apc-0123"
SYSTEM = "You are a careful assistant. " * 12  # (a shared prefix of several blocks)
GREEDY = dict(max_tokens=8, temperature=0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def server(make_varied, tmp_path_factory):
    d = str(make_varied("qwen2"))
    cfg = {
        "admin_token_hash": hash_key(ADMIN), "metrics_token_hash": hash_key(METRICS),
        "workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
        "tenants": [{"name": "alice", "key_hashes": [hash_key(ALICE)]}, {"name": "bob", "key_hashes": [hash_key(BOB)]}],
        "models": [{"name": "tiny", "path": d, "engine": {"max_num_seqs": 8}},
                   {"name": "tiny-nocache", "path": d,
                    "engine": {"max_num_seqs": 8, "enable_prefix_caching": False}}],
    }
    with LiveServer(cfg, tmp_path_factory.mktemp("apc")) as srv:
        yield srv


@pytest.fixture(scope="module")
def block(server, make_varied) -> int:
    """The tokens of a KV block of the model (what cached_tokens counts in): the pool sizes its pages, so this is read
    from the server (the engine's `kv_page_bytes` in GET /admin/pool, once its Stats have said it) over the model's KV
    bytes per token (fp32 on the CPU), the largest power of two that fits, as the pool gives a model's block."""
    import torch

    from model_swapper.model_config import ModelConfig

    client(server).completions.create(model="tiny", prompt="hi", max_tokens=1)  # (registered: the KV region carved)
    deadline = time.monotonic() + 30
    while True:  # (the worker's next Stats carry it: they come every heartbeat)
        pool = httpx.get(server.url + "/admin/pool", headers={"Authorization": f"Bearer {ADMIN}"}).json()
        page = next((e["kv_page_bytes"] for e in pool["engines"] if e["kv_page_bytes"]), None)
        if page is not None:
            break
        assert time.monotonic() < deadline, pool
        time.sleep(0.05)
    per_token = ModelConfig.from_pretrained(str(make_varied("qwen2"))).kv_bytes_per_token(torch.float32)
    return 1 << ((page // per_token).bit_length() - 1)


def client(srv, key=ALICE) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=60)


def _metric(srv, name: str, **labels) -> float:
    text = httpx.get(srv.url + "/metrics", headers={"Authorization": f"Bearer {METRICS}"}).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _cached(r) -> int:
    return r.usage.prompt_tokens_details.cached_tokens


def test_second_request_reads_the_cache_and_says_so(server, block):
    """A prompt sent twice: the first finds nothing cached, the second its whole blocks but the last token's, its
    usage says so, and both texts are what the model says with the cache off; /metrics counts the same tokens."""
    c = client(server)
    q0, h0 = (_metric(server, f"tokenpool_prefix_cache_{k}_total", model="tiny") for k in ("queries", "hits"))
    prompt = SYSTEM + "Name a colour."
    first = c.completions.create(model="tiny", prompt=prompt, **GREEDY)
    second = c.completions.create(model="tiny", prompt=prompt, **GREEDY)
    off = c.completions.create(model="tiny-nocache", prompt=prompt, **GREEDY)
    n = first.usage.prompt_tokens
    assert n > 3 * block and _cached(first) == 0
    assert _cached(second) == (n - 1) // block * block
    assert first.choices[0].text == second.choices[0].text == off.choices[0].text
    assert _cached(off) == 0
    assert _metric(server, "tokenpool_prefix_cache_queries_total", model="tiny") == q0 + 2 * n
    assert _metric(server, "tokenpool_prefix_cache_hits_total", model="tiny") == h0 + _cached(second)


def test_chat_turns_share_the_system_prompt(server, block):
    """Chat requests with one system prompt and different questions: the later ones find its blocks; a second turn
    (the first turn and its answer, then a question) finds the first turn's; every text equals the uncached model's."""
    c = client(server)
    sysmsg = {"role": "system", "content": SYSTEM}
    qs = ["What is 2+2?", "Name a planet.", "Say hello."]
    got, want = [], []
    for q in qs:
        msgs = [sysmsg, {"role": "user", "content": q}]
        got.append(c.chat.completions.create(model="tiny", messages=msgs, **GREEDY))
        want.append(c.chat.completions.create(model="tiny-nocache", messages=msgs, **GREEDY))
    assert [g.choices[0].message.content for g in got] == [w.choices[0].message.content for w in want]
    assert all(_cached(g) >= 4 * block for g in got[1:])
    turn2 = [sysmsg, {"role": "user", "content": qs[0]},
             {"role": "assistant", "content": got[0].choices[0].message.content}, {"role": "user", "content": "Why?"}]
    t2 = c.chat.completions.create(model="tiny", messages=turn2, **GREEDY)
    assert _cached(t2) >= _cached(got[1])
    assert t2.choices[0].message.content == \
        c.chat.completions.create(model="tiny-nocache", messages=turn2, **GREEDY).choices[0].message.content


def test_tenants_and_salts_do_not_share(server):
    """On a multi-tenant server a tenant's prompt never finds another tenant's cached KV (nor can time it), and vLLM's
    cache_salt splits one tenant's requests the same way; the texts are unchanged."""
    prompt = SYSTEM + "Tell me a secret."
    a = client(server).completions.create(model="tiny", prompt=prompt, **GREEDY)
    b = client(server, BOB).completions.create(model="tiny", prompt=prompt, **GREEDY)
    b2 = client(server, BOB).completions.create(model="tiny", prompt=prompt, **GREEDY)
    assert _cached(b) == 0 and _cached(b2) > 0 and a.choices[0].text == b.choices[0].text == b2.choices[0].text
    salted = dict(GREEDY, extra_body={"ignore_eos": True, "cache_salt": "s1"})
    s1 = client(server).completions.create(model="tiny", prompt=prompt, **salted)
    s1b = client(server).completions.create(model="tiny", prompt=prompt, **salted)
    assert _cached(s1) == 0 and _cached(s1b) > 0
    r = httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {ALICE}"},
                   json={"model": "tiny", "prompt": "x", "cache_salt": ""})
    assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt"


def test_streamed_usage_and_responses_report_cached_tokens(server, block):
    """The streamed usage chunk (stream_options.include_usage) and the Responses API's input_tokens_details carry the
    cached tokens too."""
    c = client(server)
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Count to three."}]
    c.chat.completions.create(model="tiny", messages=msgs, **GREEDY)
    chunks = list(c.chat.completions.create(model="tiny", messages=msgs, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert _cached(chunks[-1]) >= 4 * block
    r = c.responses.create(model="tiny", instructions=SYSTEM, input="Count to three.", max_output_tokens=8,
                           temperature=0)
    r2 = c.responses.create(model="tiny", instructions=SYSTEM, input="Count to four.", max_output_tokens=8,
                            temperature=0)
    assert r2.usage.input_tokens_details.cached_tokens >= 4 * block and r.usage.input_tokens > 4 * block
