"""One key of several taken from a tenant, against a live `tokenpool serve` with the official `openai` client: the
rotation is a DELETE then a POST of the tenant with the keys it keeps (the Kubernetes operator's, when a key leaves the
tenant's Secret). The removed key's streams end (an error event, invalid_api_key) and the key gets 401; the streams
of the keys it keeps run to their end (they were all ended: each request now records the hash of the key it was
admitted with)."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from controller.keys import hash_key
from load_tests.live_server import LiveServer

ADMIN = "admin-key-removal"
ADM = {"Authorization": f"Bearer {ADMIN}"}
KEEP, DROP = "key-kept-abcdefghijklmnop", "key-dropped-abcdefghijklm"


def _consume(key: str, url: str, max_tokens: int, out: dict) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)
    out["chunks"] = 0
    try:
        stream = client.chat.completions.create(model="pace", messages=[{"role": "user", "content": "go"}],
                                                max_tokens=max_tokens, stream=True)
        for _ in stream:
            out["chunks"] += 1
        out["end"] = "complete"
    except openai.APIError as e:
        out["end"] = e


def test_removing_one_key_ends_only_its_requests(tmp_path):
    cfg = {"admin_token_hash": hash_key(ADMIN),
           "models": [{"name": "pace", "engine": {"kind": "pace", "pace_s_per_token": 0.02}}],
           "workers": {"local": "cpu", "standby": False},
           "tenants": [{"name": "other", "key_hashes": [hash_key("other-key-abcdefghijklmn")]}]}
    with LiveServer(cfg, tmp_path) as srv:
        spec = {"name": "ops", "models": ["pace"], "key_hashes": [hash_key(KEEP), hash_key(DROP)]}
        assert httpx.post(srv.url + "/admin/tenants", headers=ADM, json=spec, timeout=10).status_code == 201
        kept: dict = {}
        dropped: dict = {}
        threads = [threading.Thread(target=_consume, args=(KEEP, srv.url, 150, kept), daemon=True),  # ~3 s
                   threading.Thread(target=_consume, args=(DROP, srv.url, 3000, dropped), daemon=True)]  # ~60 s
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while min(kept.get("chunks", 0), dropped.get("chunks", 0)) < 3 and time.monotonic() < deadline:
            assert "end" not in kept and "end" not in dropped, (kept, dropped)
            time.sleep(0.05)
        assert httpx.delete(srv.url + "/admin/tenants/ops", headers=ADM, timeout=10).status_code == 200
        fewer = dict(spec, key_hashes=spec["key_hashes"][:1])
        assert httpx.post(srv.url + "/admin/tenants", headers=ADM, json=fewer, timeout=10).status_code == 201
        assert "end" not in kept, kept  # (still streaming across the change: what the test is about)

        threads[1].join(10)  # the removed key's stream: ended a moment after the DELETE
        assert not threads[1].is_alive(), dropped
        err = dropped["end"]
        assert isinstance(err, openai.APIError) and err.body["code"] == "invalid_api_key", err
        threads[0].join(30)  # the kept key's: to its end
        assert kept["end"] == "complete", kept
        assert kept["chunks"] >= 150

        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key=DROP, max_retries=0).models.list()
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEEP, max_retries=0, timeout=60)
        assert c.completions.create(model="pace", prompt="x", max_tokens=2).usage.completion_tokens == 2
        ops = httpx.get(srv.url + "/admin/tenants/ops", headers=ADM, timeout=5).json()
        assert ops["inflight"] == 0 and ops["usage"]["requests"] >= 2, ops
