"""examples/ as a user runs them: multi-tenant.yaml's keys, models and limits as its comments say them (bob's
max_concurrent reachable by the openai client's requests, which send no max_tokens: its tokens_per_min let one run at
a time); remote-workers.yaml's controller with a worker started as its comment says (the
example's join token admits it, a wrong one is refused in a line that says so; the model it serves only when asked for
stays registered after its first request; SIGTERM drains the worker: the request in flight finishes, exit 0), and
what running the examples in place leaves beside them is kept out of git."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
import yaml

from controller.autoscaler import Autoscaler, ModelLoad
from controller.config import AutoscalerSettings
from controller.keys import verify_key
from controller.router import EngineView, ModelInfo, ReplicaView
from load_tests import live_server
from load_tests.live_server import REPO_ROOT, LiveServer
from tests import ports
from tests.test_ux57f_worker_drain import _until
from tests.test_worker_failover import _in_background

EXAMPLES = REPO_ROOT / "examples"
# the example tokens the examples' comments name (their hashes are in the files)
ADMIN = "tpadmin-example-admin-token-replace-me"
ALICE = "tp-example-alice-key-replace-me"
BOB = "tp-example-bob-key-replace-me"
METRICS = "tpmetrics-example-scrape-token-replace-me"
JOIN = "tpjoin-example-join-token-replace-me"
PORTS = range(29050, 29100)


@pytest.fixture  # (stopped before the next test's server starts: one server at a time on 2 cores)
def multi(tmp_path_factory, make_tiny):
    """multi-tenant.yaml as it is, but for its models' folders (tiny factory models; chat-small's with qwen2-1.5b's
    context, 32768) and its listener (loopback, this file's range); its tenants_file lands beside the config."""
    cfg = yaml.safe_load((EXAMPLES / "multi-tenant.yaml").read_text())
    small = tmp_path_factory.mktemp("ux64g-qwen2-1.5b-context") / "m"
    shutil.copytree(make_tiny("qwen2"), small)
    conf = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps(dict(conf, max_position_embeddings=32768)))
    dirs = {"chat-large": make_tiny("qwen2"), "chat-small": small}
    for m in cfg["models"]:
        m["path"] = str(dirs[m["name"]])
    with ports.live_server_on(PORTS, cfg, tmp_path_factory.mktemp("ux64g-multi")) as srv:
        yield srv


def test_multi_tenant_example_keys_limits_and_tokens(multi):
    def client(key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=multi.url + "/v1", api_key=key, max_retries=0, timeout=60)

    alice, bob = client(ALICE), client(BOB)
    assert [m.id for m in alice.models.list()] == ["chat-large", "chat-small", "chat"]  # models: ["*"]
    assert [m.id for m in bob.models.list()] == ["chat-small", "chat"]  # only chat-small, its alias too
    with pytest.raises(openai.NotFoundError):
        bob.chat.completions.create(model="chat-large", messages=[{"role": "user", "content": "hi"}], max_tokens=1)

    # bob's max_concurrent (8) is what bounds the openai client's requests (no max_tokens: each reserves the model's
    # whole context of tokens_per_min); the example's 60000 tokens/min let one run at a time
    streams = []
    try:
        for _ in range(8):  # (ignore_eos: the tiny model's sampled EOS ended one now and then, its slot freed)
            s = bob.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], stream=True,
                                            extra_body={"ignore_eos": True})
            next(iter(s))
            streams.append(s)
        with pytest.raises(openai.RateLimitError) as ei:
            bob.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], stream=True)
        assert "8 requests in flight (limit 8)" in str(ei.value) and ei.value.response.headers["retry-after"]
    finally:
        for s in streams:
            s.close()
    # ... and its request rate: 5/s with a burst of 10, past it a 429 with Retry-After
    with pytest.raises(openai.RateLimitError) as ei:
        for _ in range(20):
            bob.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert "5 requests/s (burst 10)" in str(ei.value) and int(ei.value.response.headers["retry-after"]) >= 1

    # the metrics token scrapes /metrics (the admin token too); a tenant's key does not
    for token, status in ((METRICS, 200), (ADMIN, 200), (ALICE, 401), (None, 401)):
        h = {"Authorization": f"Bearer {token}"} if token else {}
        assert httpx.get(multi.url + "/metrics", headers=h, timeout=10).status_code == status, token
    ps = subprocess.run([sys.executable, "-m", "controller.cli", "ps", "--url", multi.url, "--admin-token", ADMIN],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT), COLUMNS="200"))
    assert ps.returncode == 0 and "chat-small" in ps.stdout and "chat-large" in ps.stdout, ps.stderr

    # a tenant made through the admin API lands in tenants_file, as its hash only
    made = httpx.post(multi.url + "/admin/tenants", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10,
                      json={"name": "carol", "models": ["chat"]}).json()
    kept = (multi.config_path.parent / "tenants.yaml").read_text()
    assert "carol" in kept and made["api_key"] not in kept
    assert verify_key(made["api_key"], yaml.safe_load(kept)[0]["key_hashes"][0])
    assert [m.id for m in client(made["api_key"]).models.list()] == ["chat"]  # (granted by the alias: that name)


@contextlib.contextmanager
def remote_example(tmp_path_factory, make_tiny, port_range, keep_alive, down_ticks: int):
    """remote-workers.yaml as it is, but for its models' folders (tiny factory models), its ports (`port_range`, on
    loopback), a fast autoscaler tick (0.1 s: cold after `down_ticks` of them) and llama-8b's keep_alive (seconds,
    not 15 minutes). No engine until a worker joins; the workers a test starts go in `srv.procs`, killed after."""
    cfg = yaml.safe_load((EXAMPLES / "remote-workers.yaml").read_text())
    dirs = {"qwen2-7b": make_tiny("qwen2"), "llama-8b": make_tiny("llama")}
    for m in cfg["models"]:
        m["path"] = str(dirs[m["name"]])
        if m["name"] == "llama-8b":
            m["keep_alive"] = keep_alive
    api = ports.free_port(port_range)
    workers = ports.free_port(port_range, skip=(api,))
    cfg["workers"]["listen"] = {"host": "127.0.0.1", "port": workers}
    cfg["autoscaler"] = {"interval_s": 0.1, "down_ticks": down_ticks}
    with pytest.MonkeyPatch.context() as mp:  # (LiveServer's port: this range)
        mp.setattr(live_server, "free_port", lambda: api)
        srv = LiveServer(cfg, tmp_path_factory.mktemp("remote-example"), wait_ready=False)
    srv.worker_port, srv.procs, srv.t_start = workers, [], time.monotonic()
    with srv:
        with httpx.Client(timeout=2) as c:
            _until("the controller listening", lambda: _get(c, srv.url + "/"), timeout=60)
        try:
            yield srv
        finally:
            for p in srv.procs:
                if p.poll() is None:
                    p.kill()
                p.wait(10)


@pytest.fixture(scope="module")
def remote(tmp_path_factory, make_tiny):
    # (llama-8b's keep_alive, 15m, holds its last registration that long: test_ux64i_remote; 1 s here, less than
    # down_ticks, which then decide when it goes: cold for 1.5 s, given back)
    with remote_example(tmp_path_factory, make_tiny, PORTS, "1s", down_ticks=15) as srv:
        yield srv

def _get(c: httpx.Client, url: str) -> bool:
    try:
        return c.get(url).status_code == 200
    except httpx.HTTPError:
        return False


def _worker(srv, token: str) -> subprocess.Popen:
    """`TOKENPOOL_JOIN_TOKEN=... python -m controller.worker --controller HOST:PORT --device cpu`, as the example says."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TOKENPOOL_JOIN_TOKEN=token, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "controller.worker", "--controller", f"127.0.0.1:{srv.worker_port}",
                          "--device", "cpu"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    srv.procs.append(p)
    return p


def _engines(srv) -> list[dict]:
    return httpx.get(srv.url + "/admin/engines", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10).json()


def _registered(srv, pid: int, model: str, state: str | None = None) -> bool:
    return any(e["pid"] == pid and e["alive"] and any(r["model"] == model and state in (None, r["state"])
                                                      for r in e["models"]) for e in _engines(srv))


def test_remote_workers_example_join_scale_to_zero_and_drain(remote):
    wrong = _worker(remote, "tpjoin-not-the-token")
    assert wrong.wait(60) == 1
    assert "controller refused this worker: bad join token" in wrong.stderr.read()
    assert "bad join token" in remote.log()

    w = _worker(remote, JOIN)
    _until("the worker serving qwen2-7b", lambda: _registered(remote, w.pid, "qwen2-7b", "ready"), timeout=60)
    c = openai.OpenAI(base_url=remote.url + "/v1", api_key=ALICE, max_retries=0, timeout=60)

    # llama-8b (replicas.min 0: "loaded only when asked for") is on no engine until a request; the registration that
    # request made stays while its follow-ups may come. The autoscaler counted its ticks on no engine as cold, and
    # gave the registration back at the next tick after the request (here 0.1 s; 2 s by default).
    time.sleep(max(0.0, remote.t_start + 2.0 - time.monotonic()))  # more ticks than down_ticks on no engine
    assert not _registered(remote, w.pid, "llama-8b")
    r = c.chat.completions.create(model="llama-8b", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert r.choices[0].finish_reason == "length"
    time.sleep(0.6)
    assert _registered(remote, w.pid, "llama-8b"), remote.log()
    assert "unregistering llama-8b" not in remote.log()  # (nor given back at once, and made again for the request)
    # ... and, idle, it is given back once its down_ticks (1.5 s here) have passed: scale to zero still works
    _until("llama-8b given back", lambda: not _registered(remote, w.pid, "llama-8b"), timeout=15)

    # SIGTERM drains the worker, as the example's comment says: the stream in flight finishes, then it exits 0, and
    # the controller has no live engine left (the only one went)
    drained(remote, w, c, 200)
    assert "was signalled to stop" in remote.log()


def drained(srv, w: subprocess.Popen, c: openai.OpenAI, max_tokens: int) -> None:
    """Worker `w` sent SIGTERM with a stream of `max_tokens` in flight on it: the stream finishes (finish `length`),
    `w` exits 0, and the controller has no live engine left (the only one went)."""
    it = iter(c.chat.completions.create(model="qwen2-7b", messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=max_tokens, stream=True, extra_body={"ignore_eos": True}))
    next(it)
    os.kill(w.pid, signal.SIGTERM)
    rest = _in_background(list, it)
    assert rest.result(60)[-1].choices[0].finish_reason == "length"
    assert w.wait(30) == 0, w.stderr.read()[-3000:]
    _until("the controller without the worker", lambda: not any(e["alive"] for e in _engines(srv)), timeout=10)


def test_a_scaled_to_zero_model_counts_its_cold_ticks_from_its_registration():
    """The autoscaler's side of the above, tick by tick: ticks on no engine are not cold ones."""
    a = Autoscaler(AutoscalerSettings(down_ticks=3))
    llama = ModelLoad(ModelInfo("llama-8b", 2**30), 0, 4, 0, 64)
    for _ in range(10):
        assert a.plan([llama], [EngineView("w", 60 * 2**30)]) == []
    on_w = [EngineView("w", 60 * 2**30, {"llama-8b": ReplicaView("llama-8b", True, 64)})]
    assert a.plan([llama], on_w) == [] and a.plan([llama], on_w) == []
    assert [(x.kind, x.model) for x in a.plan([llama], on_w)] == [("unload", "llama-8b")]


@pytest.mark.parametrize("command", [["controller.cli", "keys"], ["controller.keys"]], ids=["tokenpool", "module"])
def test_keys_new_and_hash_make_what_the_examples_say(command):
    """multi-tenant.yaml's `tokenpool keys new` (a key and its hash) and `tokenpool keys hash` (one a line, for keys
    piped in); `python -m controller.keys`, "the same as tokenpool keys", hashed only the first line piped in."""
    def run(*args: str, stdin: str = "") -> list[str]:
        out = subprocess.run([sys.executable, "-m", *command, *args], cwd=REPO_ROOT, input=stdin, capture_output=True,
                             text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
        assert out.returncode == 0, out.stderr
        return out.stdout.splitlines()

    key, hashed = (line.split()[1] for line in run("new", "--prefix", "tpjoin"))
    assert key.startswith("tpjoin-") and verify_key(key, hashed)
    keys = [ALICE, BOB, key]
    hashes = run("hash", "-", stdin="\n".join(keys) + "\n")
    assert len(hashes) == 3 and all(verify_key(k, h) for k, h in zip(keys, hashes))


def test_what_the_examples_make_in_place_is_not_for_git():
    """README.md has the examples' models made under examples/models (7 GB for qwen2-7b), and multi-tenant.yaml's
    tenants_file is examples/tenants.yaml: neither showed as ignored, so `git add -A` took weights and a deployment's
    tenants, and a tenants.yaml beside the examples read as a fourth one."""
    made = ["examples/models/qwen2-7b/model.safetensors", "examples/models/llama-3b/config.json",
            "examples/tenants.yaml", "examples/tenants.yaml.edited-20260101-120000", "examples/tenants.tmp"]
    got = subprocess.run(["git", "check-ignore", "--no-index", *made, "examples/one-gpu.yaml",
                          "examples/multi-tenant.yaml", "examples/remote-workers.yaml"],
                         cwd=REPO_ROOT, capture_output=True, text=True)
    assert got.stdout.split() == made, got.stderr
    assert yaml.safe_load((EXAMPLES / "multi-tenant.yaml").read_text())["tenants_file"] == "tenants.yaml"
