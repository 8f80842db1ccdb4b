"""A tenant deleted through the admin API while its requests run, against a live `tokenpool serve` with the official
`openai` client: its streams end (an error event in OpenAI's shape) and their KV is freed; its key gets 401. A
tenant replaced by the same keys (the Kubernetes operator's update: DELETE then POST) keeps its streams."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from controller.keys import hash_key
from load_tests.live_server import LiveServer

ADMIN = "admin-tenant-revoke"
ADM = {"Authorization": f"Bearer {ADMIN}"}
PACE = {"name": "pace", "engine": {"kind": "pace", "pace_s_per_token": 0.02}}


def _config(models: list[dict]) -> dict:
    return {"admin_token_hash": hash_key(ADMIN), "models": models,
            "workers": {"local": "cpu", "standby": False},
            "tenants": [{"name": "keeper", "key_hashes": [hash_key("keeper-key")]}]}


def _kv_used(url: str, model: str) -> float:
    engines = httpx.get(url + "/admin/engines", headers=ADM, timeout=5).json()
    return sum(e["stats"].get(model, {}).get("kv_blocks_used", 0) for e in engines)


def _consume(client: openai.OpenAI, model: str, max_tokens: int, out: dict) -> None:
    out["chunks"] = 0
    try:
        stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Tell a story."}],
                                                max_tokens=max_tokens, stream=True, extra_body={"ignore_eos": True})
        for _ in stream:
            out["chunks"] += 1
        out["end"] = "complete"
    except openai.APIError as e:
        out["end"] = e
    out["t_end"] = time.monotonic()


def test_deleted_tenant_stream_ends_and_frees_its_kv(tmp_path, tiny_model):
    # a tiny factory model (its KV is the engine's as a real model's; SmolLM2 took ~4 s more to load): 2000
    # tokens (its context's end, ~1900) stream for ~4.5 s here, and the DELETE comes ~0.6 s in
    cfg = _config([{"name": "tiny", "path": str(tiny_model)}])
    with LiveServer(cfg, tmp_path) as srv:
        made = httpx.post(srv.url + "/admin/tenants", headers=ADM, json={"name": "eve"}, timeout=10)
        assert made.status_code == 201, made.text
        key = made.json()["api_key"]
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=120)
        deadline = time.monotonic() + 30
        while _kv_used(srv.url, "tiny") != 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        before = _kv_used(srv.url, "tiny")
        out: dict = {}
        t = threading.Thread(target=_consume, args=(client, "tiny", 2000, out), daemon=True)
        t.start()
        deadline = time.monotonic() + 60
        while (out.get("chunks", 0) < 5 or _kv_used(srv.url, "tiny") <= before) and time.monotonic() < deadline:
            assert "end" not in out, out
            time.sleep(0.1)
        assert _kv_used(srv.url, "tiny") > before
        assert [r["tenant"] for r in httpx.get(srv.url + "/admin/requests", headers=ADM, timeout=5).json()] == ["eve"]

        t_delete = time.monotonic()
        r = httpx.delete(srv.url + "/admin/tenants/eve", headers=ADM, timeout=10)
        assert r.status_code == 200, r.text
        # new requests with the key: 401 at once, in OpenAI's shape
        with pytest.raises(openai.AuthenticationError) as ex:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert ex.value.body["code"] == "invalid_api_key"

        t.join(10)  # the stream stops soon after the DELETE, with the error below (not at its end: "complete")
        assert not t.is_alive(), f"the revoked tenant's stream still runs ({out.get('chunks')} chunks)"
        assert out["t_end"] - t_delete < 5.0
        err = out["end"]
        assert isinstance(err, openai.APIError), err
        assert err.body["type"] == "authentication_error" and err.body["code"] == "invalid_api_key"
        assert "revoked" in err.message

        deadline = time.monotonic() + 10  # the engine's KV blocks come back (stats reach the controller each step)
        while _kv_used(srv.url, "tiny") != before and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _kv_used(srv.url, "tiny") == before
        assert httpx.get(srv.url + "/admin/requests", headers=ADM, timeout=5).json() == []
        assert "eve" not in [x["name"] for x in httpx.get(srv.url + "/admin/tenants", headers=ADM, timeout=5).json()]
        # the other tenant is untouched
        other = openai.OpenAI(base_url=srv.url + "/v1", api_key="keeper-key", max_retries=0, timeout=60)
        assert other.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=2).choices[0].finish_reason == "length"


def test_tenant_replaced_with_its_keys_keeps_its_streams(tmp_path):
    """The operator changes a tenant's limits by DELETE then POST with the same key hashes: nothing was revoked,
    its streams run on. Re-created with another key (a rotation), the old key's streams end."""
    with LiveServer(_config([PACE]), tmp_path) as srv:
        spec = {"name": "ops", "key_hashes": [hash_key("ops-key")], "models": ["pace"]}
        assert httpx.post(srv.url + "/admin/tenants", headers=ADM, json=spec, timeout=10).status_code == 201
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="ops-key", max_retries=0, timeout=60)
        kept: dict = {}
        t = threading.Thread(target=_consume, args=(client, "pace", 75, kept), daemon=True)  # ~1.5 s
        t.start()
        while kept.get("chunks", 0) < 3:
            assert "end" not in kept, kept
            time.sleep(0.05)
        assert httpx.delete(srv.url + "/admin/tenants/ops", headers=ADM, timeout=10).status_code == 200
        spec2 = dict(spec, rate={"requests_per_s": 50})
        assert httpx.post(srv.url + "/admin/tenants", headers=ADM, json=spec2, timeout=10).status_code == 201
        assert "end" not in kept, kept  # (still streaming across the DELETE and POST: what the test is about)
        t.join(30)
        assert kept["end"] == "complete", kept
        assert kept["chunks"] >= 75
        # its usage counts under the entry that replaced the one it began under (the same tenant, the same key)
        usage = httpx.get(srv.url + "/v1/usage", headers={"Authorization": "Bearer ops-key"}, timeout=5).json()
        assert (usage["requests"], usage["completion_tokens"]) == (1, 75), usage

        # a rotation: the old key's stream ends, the new key works
        cut: dict = {}
        t = threading.Thread(target=_consume, args=(client, "pace", 2000, cut), daemon=True)  # ~40 s
        t.start()
        while cut.get("chunks", 0) < 3:
            assert "end" not in cut, cut
            time.sleep(0.05)
        assert httpx.delete(srv.url + "/admin/tenants/ops", headers=ADM, timeout=10).status_code == 200
        made = httpx.post(srv.url + "/admin/tenants", headers=ADM, json={"name": "ops", "models": ["pace"]},
                          timeout=10)
        assert made.status_code == 201
        t.join(10)
        assert not t.is_alive() and isinstance(cut["end"], openai.AuthenticationError | openai.APIError), cut
        assert cut["end"].body["code"] == "invalid_api_key"
        fresh = openai.OpenAI(base_url=srv.url + "/v1", api_key=made.json()["api_key"], max_retries=0, timeout=60)
        assert fresh.completions.create(model="pace", prompt="x", max_tokens=2).usage.completion_tokens == 2
        tenants = {x["name"]: x for x in httpx.get(srv.url + "/admin/tenants", headers=ADM, timeout=5).json()}
        assert tenants["ops"]["inflight"] == 0
