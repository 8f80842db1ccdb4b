"""How long a model is held (session 65): an Ollama request's keep_alive replaces the model's configured one for its
load, as Ollama's does, for its weights on the engine and for a `replicas.min: 0` model's last registration alike
(the registration went once its configured keep_alive ran out, the request's ignored; and a request's other than 0
never reached the engine either); 0 ends the hold; `/api/ps`, `/admin/models` and `tokenpool ps` say the one in
force. And a model registered again starts its keep_alive's clock at its registration: a `preload` model with a
keep_alive had its weights evicted as soon as they landed (the engine knew no use of it, so it was idle "for ever").

One live server (a CPU worker, an autoscaler tick of 0.1 s, cold after 0.5 s), shared in file order."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime, timezone

import httpx
import openai
import pytest

from controller.keys import hash_key
from load_tests.live_server import REPO_ROOT
from tests import ports

PORTS = range(29250, 29300)
ADMIN = "admin-ux65b-token"
MiB = 1 << 20
PAGE = 16 * 512  # 16 tokens of fp32 KV of the tiny models
LAZY_KEEP_S = 2.0  # lazy's configured keep_alive


@pytest.fixture(scope="module")
def server(make_tiny, tmp_path_factory):
    cfg = {
        "admin_token_hash": hash_key(ADMIN),
        "workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.2},
        "autoscaler": {"interval_s": 0.1, "down_ticks": 5},
        "gpus": {"cpu_budget_gb": 16 * MiB / 1e9, "kv_cache_gb": 128 * PAGE / 1e9},
        "models": [
            {"name": "lazy", "path": str(make_tiny("llama")), "replicas": {"min": 0, "max": 1},
             "keep_alive": f"{LAZY_KEEP_S:g}s", "slo": {"ttft_s": 30, "tpot_s": 5}},
            {"name": "pre", "path": str(make_tiny("qwen2")), "preload": True, "keep_alive": "60s",
             "slo": {"ttft_s": 30, "tpot_s": 5}},
        ],
    }
    with ports.live_server_on(PORTS, cfg, tmp_path_factory.mktemp("ux65b")) as srv:
        yield srv


def _admin(srv, path: str):
    r = httpx.get(srv.url + path, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def _model(srv, name: str) -> dict:
    return next(m for m in _admin(srv, "/admin/models") if m["name"] == name)


def _engine_keep_alive(srv, name: str) -> float | str | None:
    """What the worker's pooled engine evicts `name`'s weights after (its keep_alive_s; None: when the memory is
    needed), or "-" where the engine has not said it holds `name`."""
    (e,) = [e for e in _admin(srv, "/admin/engines") if e["alive"]]
    return ((e.get("pool") or {}).get("models") or {}).get(name, {}).get("keep_alive_s", "-")


def _until(what: str, cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"never: {what}")


def _ollama(srv, route: str, body: dict) -> dict:
    r = httpx.post(srv.url + route, json={"stream": False, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _tokenpool_ps(srv) -> str:
    p = subprocess.run([sys.executable, "-m", "controller.cli", "ps", "--url", srv.url, "--admin-token", ADMIN],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(REPO_ROOT), COLUMNS="250"))
    assert p.returncode == 0, p.stderr
    return p.stdout


def _expires_in(srv, name: str) -> float:
    """Seconds until /api/ps says `name`'s weights are freed."""
    (m,) = [m for m in httpx.get(srv.url + "/api/ps", timeout=10).json()["models"] if m["name"] == f"{name}:latest"]
    return (datetime.fromisoformat(m["expires_at"].replace("Z", "+00:00")) - datetime.now(timezone.utc)).total_seconds()


def test_a_preloaded_model_keeps_its_weights_for_its_keep_alive(server):
    """`pre` (preload, keep_alive 60s): its weights come in at registration and stay (they were evicted as they
    landed, and /api/ps never listed it)."""
    _until("pre resident", lambda: "pre:latest" in [m["name"] for m in httpx.get(server.url + "/api/ps").json()["models"]])
    time.sleep(1.0)  # (the worker's idle ticks expire keep_alive at once)
    assert "pre:latest" in [m["name"] for m in httpx.get(server.url + "/api/ps").json()["models"]], server.log()[-3000:]
    assert not any(ln for ln in server.log().splitlines() if "evict" in ln and "pre" in ln)


def test_a_request_keep_alive_holds_a_scaled_to_zero_model_past_its_configured_one(server):
    assert _model(server, "lazy")["engines"] == []  # (replicas.min 0: on no engine until asked for)
    r = _ollama(server, "/api/chat", {"model": "lazy", "messages": [{"role": "user", "content": "hi"}],
                                      "options": {"num_predict": 2}, "keep_alive": "1m"})
    done = time.monotonic()
    assert r["done"]
    m = _model(server, "lazy")
    assert m["keep_alive"] == LAZY_KEEP_S and m["keep_alive_asked"] == 60.0 and m["engines"]
    _until("the engine's keep_alive the request's", lambda: _engine_keep_alive(server, "lazy") == 60.0)  # (one, not two)
    assert 55 < _expires_in(server, "lazy") <= 60.5
    running = httpx.get(server.url + "/running", timeout=10).json()["running"]  # (llama-swap's ttl)
    assert [r["ttl"] for r in running if r["model"] == "lazy"] == [60.0]
    assert "keep 60s (asked)" in _tokenpool_ps(server)
    # an OpenAI request (no keep_alive) leaves it, as a request without one leaves Ollama's loaded model's
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    c.chat.completions.create(model="lazy", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    # past its configured keep_alive (2 s) and its down_ticks (0.5 s), it is still registered: the request's holds it
    time.sleep(max(0.0, done + LAZY_KEEP_S + 1.5 - time.monotonic()))
    assert _model(server, "lazy")["engines"], server.log()[-3000:]
    assert "unregistering lazy" not in server.log()
    assert _model(server, "lazy")["keep_alive_asked"] == 60.0

    # keep_alive 0 (`ollama stop`'s load request): its weights go at once, and so does its hold: the registration is
    # given back once cold, not held for the rest of a keep_alive
    r = _ollama(server, "/api/generate", {"model": "lazy", "keep_alive": 0})
    assert r["done_reason"] == "unload"
    stopped = time.monotonic()
    _until("lazy given back", lambda: not _model(server, "lazy")["engines"], timeout=10)
    assert time.monotonic() - stopped < LAZY_KEEP_S  # (not its configured keep_alive after its last use either)


def test_a_request_keep_alive_for_ever_and_the_configured_one_again_after_it(server):
    # a load request (empty prompt) with keep_alive -1: held for ever, as Ollama's; its weights until the memory is
    # needed (the engine's null)
    r = _ollama(server, "/api/generate", {"model": "lazy", "keep_alive": -1})
    assert r["done_reason"] == "load"
    m = _model(server, "lazy")
    assert m["keep_alive_asked"] == -1.0 and m["engines"]
    _until("the engine's keep_alive none", lambda: _engine_keep_alive(server, "lazy") is None)
    assert _expires_in(server, "lazy") > 100 * 365 * 86400  # (Ollama's "for ever": some 292 years on)
    assert "keep for ever (asked)" in _tokenpool_ps(server)
    time.sleep(LAZY_KEEP_S + 1.0)
    assert _model(server, "lazy")["engines"]

    # an operator's keep_alive (PATCH) replaces the request's: its configured one holds again, from its last use
    h = {"Authorization": f"Bearer {ADMIN}"}
    r = httpx.patch(server.url + "/admin/models/lazy", json={"keep_alive": "1s"}, headers=h, timeout=10)
    assert r.status_code == 200 and r.json()["keep_alive_asked"] is None and r.json()["keep_alive"] == 1.0
    _until("lazy given back", lambda: not _model(server, "lazy")["engines"], timeout=10)  # (used > 1 s ago)


def test_a_request_keep_alive_shorter_than_the_configured_one_ends_the_hold_sooner(server):
    h = {"Authorization": f"Bearer {ADMIN}"}
    assert httpx.patch(server.url + "/admin/models/lazy", json={"keep_alive": "1m"}, headers=h).status_code == 200
    _ollama(server, "/api/generate", {"model": "lazy", "prompt": "hi", "options": {"num_predict": 2},
                                      "keep_alive": "1s"})
    done = time.monotonic()
    assert _model(server, "lazy")["keep_alive_asked"] == 1.0
    _until("lazy given back", lambda: not _model(server, "lazy")["engines"], timeout=10)
    assert time.monotonic() - done < 10  # (its configured minute did not hold it)
    # its next use is a new load: held for its configured keep_alive again (a request sending none)
    _ollama(server, "/api/generate", {"model": "lazy", "prompt": "hi", "options": {"num_predict": 2}})
    m = _model(server, "lazy")
    assert m["keep_alive_asked"] is None and m["engines"]
    _until("the engine's keep_alive the configured one", lambda: _engine_keep_alive(server, "lazy") == 60.0)
    time.sleep(2.0)
    assert _model(server, "lazy")["engines"]


def test_a_configured_keep_alive_for_ever_holds_a_scaled_to_zero_model(server):
    """keep_alive -1 configured (here by PATCH, parsed as the config's): for ever, as a request's -1 is and as Ollama
    reads it; a `replicas.min: 0` model kept its registration only while used, as with none set (-1 was unset)."""
    h = {"Authorization": f"Bearer {ADMIN}"}
    r = httpx.patch(server.url + "/admin/models/lazy", json={"keep_alive": "-1"}, headers=h, timeout=10)
    assert r.status_code == 200 and r.json()["keep_alive"] == -1.0, r.text
    _ollama(server, "/api/generate", {"model": "lazy", "prompt": "hi", "options": {"num_predict": 2}})
    _until("the engine's keep_alive none", lambda: _engine_keep_alive(server, "lazy") is None)
    assert _expires_in(server, "lazy") > 100 * 365 * 86400
    assert "keep for ever" in _tokenpool_ps(server)
    time.sleep(1.5)  # (past its down_ticks, 0.5 s, cold)
    assert _model(server, "lazy")["engines"], server.log()[-3000:]
