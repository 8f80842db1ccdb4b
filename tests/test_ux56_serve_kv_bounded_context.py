"""A model whose context is longer than the pool's KV region holds of it (a 128k-context Llama 3.1 8B on a GPU's
default 10% KV region, 8 GB: 61k of its tokens) was served with its whole context: every request that left
max_tokens out (a chat client's default) asked for the context's room and was refused, a 400 "request needs up
to 131072 tokens of KV; the pool holds 61k" without a code, whatever its prompt. The model's context is now bounded
by what the region holds of it, as vLLM bounds max_model_len by its KV cache: such a request generates until
the region's end (finish_reason length), /v1/models says the bounded context, and a prompt past it is the usual
context_length_exceeded 400."""

from __future__ import annotations

import httpx

from load_tests.live_server import LiveServer


def test_a_context_longer_than_the_kv_region_is_bounded_by_it(make_tiny, tmp_path):
    model = make_tiny("qwen2")  # context 2048; 2 layers x 2 KV heads x 16 dims fp32: 512 B a token
    cfg = {"models": [{"name": "tiny", "path": str(model)}],
           # a region of ~1000 of its tokens (pages of 8 tokens at least of the largest model: this one)
           "gpus": {"kv_cache_gb": 0.0005}, "workers": {"local": "cpu", "standby": False}}
    with LiveServer(cfg, tmp_path) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
        ctx = next(m["max_model_len"] for m in c.get("/v1/models").json()["data"] if m["id"] == "tiny")
        # (a chat completion: its max_tokens left out is the context's room; a completion's is 16)
        r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                  "ignore_eos": True})
        too_long = c.post("/v1/completions", json={"model": "tiny", "prompt": [1] * ctx, "max_tokens": 1})
    assert 0 < ctx < 2048, ctx
    assert r.status_code == 200, r.text
    usage, choice = r.json()["usage"], r.json()["choices"][0]
    assert choice["finish_reason"] == "length" and usage["prompt_tokens"] + usage["completion_tokens"] == ctx, r.text
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded", too_long.text
