"""`tokenpool serve` with no argument, as a new user starts it: the real SmolLM2 model beside random-weight demo
models, on loopback without auth. Driven with the official `openai` client, scraped with prometheus_client's
parser, listed by `tokenpool ps`, loaded by `tokenpool loadtest`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller.config import DEMO_MODELS, REAL_MODEL
from load_tests.live_server import REPO_ROOT, LiveServer

DEMOS = [name for name, _, _ in DEMO_MODELS]


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):  # smollm2: the conversion happens once, outside the start-up timeout
    with LiveServer(None, tmp_path_factory.mktemp("default"), ready_timeout=300) as srv:
        yield srv


def client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "controller.cli", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})})


def ask_france(srv, model: str, stream: bool = False) -> str:
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    r = client(srv).chat.completions.create(model=model, messages=msgs, temperature=0, max_tokens=32, stream=stream)
    if stream:
        return "".join(c.choices[0].delta.content or "" for c in r if c.choices)
    assert r.choices[0].finish_reason == "stop"
    return r.choices[0].message.content


def test_models_real_and_demo(server):
    assert [m.id for m in client(server).models.list()] == [REAL_MODEL, "smollm2", *DEMOS]  # (its alias too)
    # SmolLM2 is preloaded (the module's first request to it: this file's first test): its first request waits for no
    # weights (Ollama's load_duration ~0); it used to copy them in (0.5 GiB), beside the standby's start-up on a
    # 2-core host (~0.3 s there, idle; ~1 ms now: its slot made current)
    r = httpx.post(server.url + "/api/generate", json={"model": "smollm2", "prompt": "Say hi", "stream": False,
                                                        "options": {"num_predict": 2, "temperature": 0}}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["load_duration"] < 50_000_000 and r.json()["eval_count"] >= 1, r.json()


def test_smollm2_knows_paris(server):
    assert "Paris" in ask_france(server, REAL_MODEL)
    assert "Paris" in ask_france(server, "smollm2", stream=True)  # its alias, streamed


def test_demo_models_differ_and_every_token_has_text(server):
    texts = []
    for name in DEMOS:
        r = client(server).completions.create(model=name, prompt="Hello", temperature=0, max_tokens=16,
                                              logprobs=1, extra_body={"ignore_eos": True})
        lp = r.choices[0].logprobs
        assert len(lp.tokens) == 16 and all(t != "" for t in lp.tokens), lp.tokens
        texts.append(r.choices[0].text)
    assert texts[0] != texts[1]


def test_metrics_open_on_loopback_and_vllm_shaped(server):
    ask_france(server, REAL_MODEL)
    r = httpx.get(server.url + "/metrics")  # no token: the default is loopback-only without auth
    assert r.status_code == 200
    fams = {f.name: f for f in text_string_to_metric_families(r.text)}
    for f in fams.values():
        if f.type == "counter":
            assert all(s.name.endswith("_total") for s in f.samples), f.name
    # no `_created` series beside every counter and histogram (vLLM turns them off too): half the series
    assert not [s.name for f in fams.values() for s in f.samples if s.name.endswith("_created")]
    reasons = {s.labels["finished_reason"]: s.value for s in fams["tokenpool_request_success"].samples
               if s.name.endswith("_total") and s.labels["model"] == REAL_MODEL}
    assert reasons.get("stop", 0) >= 1
    for h in ("tokenpool_request_queue_time_seconds", "tokenpool_request_prefill_time_seconds",
              "tokenpool_request_decode_time_seconds", "tokenpool_request_prompt_tokens",
              "tokenpool_request_generation_tokens", "tokenpool_time_to_first_token_seconds"):
        assert fams[h].type == "histogram"
        count = [s.value for s in fams[h].samples if s.name == h + "_count" and s.labels.get("model") == REAL_MODEL]
        assert count and count[0] >= 1, h
    prompt_sum = [s.value for s in fams["tokenpool_request_prompt_tokens"].samples
                  if s.name.endswith("_sum") and s.labels["model"] == REAL_MODEL][0]
    assert prompt_sum >= 30  # the chat template's system turn and the question
    usage = [s.value for s in fams["tokenpool_kv_cache_usage_ratio"].samples]
    assert usage and all(0.0 <= v <= 1.0 for v in usage)
    assert fams["tokenpool_num_preemptions"].type == "counter"


def _admin_token(srv) -> str:
    m = re.search(r"admin token for this run written to (\S+) ", srv.log_path.read_text())
    assert m, srv.log()  # the log names the owner-only file, never the token
    path = Path(m.group(1))
    assert path.name == f"admin-token-{srv.port}"  # one file a port: another server of this user keeps its own
    assert path.stat().st_mode & 0o077 == 0
    token = path.read_text().strip()
    assert token not in srv.log_path.read_text()
    return token


def test_ps_lists_models_where_resident(server):
    ask_france(server, REAL_MODEL)
    _admin_token(server)  # (the file is where its name says)
    # no token given: on this machine, `ps` reads the one the server wrote for its port, as `ollama ps` just works
    r = subprocess.run([sys.executable, "-m", "controller.cli", "ps", "--url", server.url], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=120, env={
                           **{k: v for k, v in os.environ.items() if k != "TOKENPOOL_ADMIN_TOKEN"},
                           "PYTHONPATH": str(REPO_ROOT)})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["NAME", "SIZE", "ENGINE"]
    real = next(line for line in lines if line.startswith(REAL_MODEL))
    # the state is the pooled engine's: weights in VRAM (resident), on their way (loading) or in the host cache
    assert "cpu" in real and "resident" in real.split() and "ago" in real and "smollm2" in real
    assert sum(line.startswith(tuple(DEMOS)) and bool({"resident", "loading", "host"} & set(line.split()))
               for line in lines) == 2
    assert any(line.startswith("engine w") and " weights and " in line and " KV cache in a " in line for line in lines)
    bad = cli("ps", "--url", server.url, env={"TOKENPOOL_ADMIN_TOKEN": "wrong"})
    assert bad.returncode == 1 and "401" in bad.stderr and "TOKENPOOL_ADMIN_TOKEN" in bad.stderr
    # `tokenpool stop` (as `ollama stop`): the weights leave VRAM, which `ps` then shows; the next request brings them
    env = {"TOKENPOOL_ADMIN_TOKEN": _admin_token(server)}
    stop = cli("stop", REAL_MODEL, "--url", server.url, env=env)
    assert stop.returncode == 0 and ("leave VRAM" in stop.stdout or "leave the memory of" in stop.stdout), stop.stderr
    deadline = time.monotonic() + 20
    while "host" not in next(ln for ln in cli("ps", "--url", server.url, env=env).stdout.splitlines()
                             if ln.startswith(REAL_MODEL)).split():
        assert time.monotonic() < deadline, "the stopped model never left VRAM"
        time.sleep(0.3)
    ask_france(server, REAL_MODEL)


def test_loadtest_against_the_real_model(server, tmp_path):
    out = tmp_path / "lt.json"
    r = cli("loadtest", "--url", server.url, "--streams", "2", "--duration", "3", "--max-tokens", "8",
            "--model", "smollm2", "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["errors"] == 0 and res["tokens"] > 0 and res["requests"] >= 2
    bad = cli("loadtest", "--url", server.url, "--streams", "1", "--duration", "1", "--model", "no-such-model")
    assert bad.returncode == 1 and bad.stderr.startswith('tokenpool loadtest: model "no-such-model" not found; served: '
                                                         'smollm2-135m-instruct'), bad.stderr
