"""Freeing a model's VRAM on a live pooled server: the admin API's evict, `tokenpool stop` (as `ollama stop`), and
Ollama's load request with keep_alive 0 (what `ollama stop` sends), each observed in /admin/pool's resident models."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from controller.keys import hash_key
from load_tests.live_server import REPO_ROOT, LiveServer

ADMIN = "admin-evict-token"
H = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def server(make_tiny, tmp_path_factory):
    cfg = {"admin_token_hash": hash_key(ADMIN), "workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.2},
           "models": [{"name": "tiny-a", "path": str(make_tiny("qwen2"))},
                      {"name": "tiny-b", "path": str(make_tiny("llama")), "pin": True}]}
    with LiveServer(cfg, tmp_path_factory.mktemp("evict")) as srv:
        yield srv


def _resident(srv) -> set[str]:
    return {n for e in httpx.get(srv.url + "/admin/pool", headers=H).json()["engines"] for n in e["resident"]}


def _until(srv, want: bool, model: str = "tiny-a", timeout: float = 20.0) -> bool:
    """Whether `model`'s residency became `want` within `timeout` (the pool's state arrives with heartbeats)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if (model in _resident(srv)) == want:
            return True
        time.sleep(0.1)
    return False


def _use(srv, model: str = "tiny-a") -> str:
    r = httpx.post(srv.url + "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 3,
                                                      "temperature": 0, "ignore_eos": True}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_admin_evict_and_tokenpool_stop(server):
    """POST /admin/models/NAME/evict frees its VRAM (the model stays served: the next request brings it back and
    answers as before); `tokenpool stop` does the same from the command line; a pinned model is a 409, an unknown one
    a 404, no token a 401."""
    text = _use(server)
    assert _until(server, True)
    r = httpx.post(server.url + "/admin/models/tiny-a/evict", headers=H)
    assert r.status_code == 200 and r.json() == {"name": "tiny-a", "engines": 1, "resident": 1}
    assert _until(server, False)
    assert _use(server) == text and _until(server, True)
    out = subprocess.run([sys.executable, "-m", "controller.cli", "stop", "tiny-a", "--url", server.url],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "TOKENPOOL_ADMIN_TOKEN": ADMIN})
    assert out.returncode == 0 and "leave the memory of 1 engine" in out.stdout, out  # (a CPU engine's: not VRAM)
    assert _until(server, False)
    # stopped again, its weights already out: nothing to free, and it says so (it said they "leave VRAM" again)
    for _ in range(50):  # (the engines' view of it arrives with the next heartbeat)
        ps = subprocess.run([sys.executable, "-m", "controller.cli", "ps", "--url", server.url], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "TOKENPOOL_ADMIN_TOKEN": ADMIN}).stdout
        if any(ln.startswith("tiny-a ") and "host" in ln.split() for ln in ps.splitlines()):
            break
        time.sleep(0.2)
    again = subprocess.run([sys.executable, "-m", "controller.cli", "stop", "tiny-a", "--url", server.url],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "TOKENPOOL_ADMIN_TOKEN": ADMIN})
    assert again.returncode == 0 and again.stdout.startswith("tiny-a: not in any engine's memory"), again
    r = httpx.post(server.url + "/admin/models/tiny-b/evict", headers=H)
    assert r.status_code == 409 and r.json()["error"]["code"] == "model_pinned"
    assert httpx.post(server.url + "/admin/models/nope/evict", headers=H).status_code == 404
    assert httpx.post(server.url + "/admin/models/tiny-a/evict").status_code == 401
    bad = subprocess.run([sys.executable, "-m", "controller.cli", "stop", "nope", "--url", server.url],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "TOKENPOOL_ADMIN_TOKEN": ADMIN})
    assert bad.returncode == 1 and 'model "nope" not found; served: ' in bad.stderr, bad.stderr  # (as run says it)


def test_ollama_keep_alive_zero_unloads(server):
    """Ollama's `stop` (a generate with no prompt and keep_alive 0) answers done_reason "unload" and frees the
    model's VRAM; the plain load request (no keep_alive) is a "load" and changes nothing; a request with a prompt and
    keep_alive 0 is answered as without, and its model's weights go once it is done."""
    import ollama

    oc = ollama.Client(host=server.url)
    _use(server)
    assert _until(server, True)
    assert oc.generate(model="tiny-a", prompt="").done_reason == "load"
    assert _until(server, True)
    r = httpx.post(server.url + "/api/generate", json={"model": "tiny-a", "keep_alive": 0}).json()
    assert r["done"] and r["done_reason"] == "unload"
    assert _until(server, False)
    _use(server)
    assert _until(server, True)
    assert oc.chat(model="tiny-a", messages=[], keep_alive="0s").done_reason == "unload"
    assert _until(server, False)
    # with a prompt: the reply as without, and the weights go after it
    want = oc.generate(model="tiny-a", prompt="hi", options={"temperature": 0, "num_predict": 4}).response
    assert _until(server, True)
    r = oc.generate(model="tiny-a", prompt="hi", options={"temperature": 0, "num_predict": 4}, keep_alive=0)
    assert r.response == want and r.done_reason == "length"
    assert _until(server, False)
    assert len(oc.embed(model="tiny-a", input="hi").embeddings) == 1 and _until(server, True)
    assert len(oc.embed(model="tiny-a", input="hi", keep_alive=0).embeddings) == 1 and _until(server, False)


def test_ollama_ps_lists_the_models_in_vram(server):
    """Ollama's ps (as `ollama ps` reads it) lists the models whose weights are in VRAM, with their size; a stopped
    model leaves the list. Its tags give each model's size and family."""
    import ollama

    oc = ollama.Client(host=server.url)
    tags = {m.model.removesuffix(":latest"): m for m in oc.list().models}  # (Ollama's NAME:latest)
    assert tags["tiny-a"].size > 0 and tags["tiny-a"].details.family == "qwen2"
    _use(server)
    assert _until(server, True)
    got = {m.model.removesuffix(":latest"): m for m in oc.ps().models}
    assert "tiny-a" in got and got["tiny-a"].size == tags["tiny-a"].size
    assert got["tiny-a"].size_vram == 0  # (a CPU worker's: Ollama's "100% CPU"; test_ux57h_ollama_client)
    assert "tiny-b" in got  # (pinned: its weights came in at start, and show as in VRAM though idle since)
    httpx.post(server.url + "/admin/models/tiny-a/evict", headers=H).raise_for_status()
    assert _until(server, False)
    assert "tiny-a:latest" not in {m.model for m in oc.ps().models}


def test_tokenpool_stop_of_a_pinned_model_says_so_in_its_words(server):
    """`tokenpool stop` of a pinned model: the server's reason as the model's (it printed the route's URL and
    `HTTP 409:` before it); other refusals keep the route and status."""
    from controller.ps import PsError, stop

    with pytest.raises(PsError) as e:
        stop(server.url, ADMIN, "tiny-b")
    assert str(e.value) == "tiny-b: 'tiny-b' is pinned: unpin it first (POST /admin/models/tiny-b/unpin)"
    with pytest.raises(PsError, match=r"/admin/models: HTTP 401"):
        stop(server.url, "wrong-token", "tiny-b")
