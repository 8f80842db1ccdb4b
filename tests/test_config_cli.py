"""Configuration format (examples/, keep_alive, aliases) and the command line (serve MODEL_DIR, keys, --version)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from pydantic import ValidationError

from controller.config import ModelSpec, ServerConfig, load_config, parse_duration
from controller.keys import hash_key, verify_key
from controller.serve import model_specs, prepare
from controller.startup import StartupError
from load_tests.live_server import REPO_ROOT, LiveServer
from tests.http_stub import Terminal, stub_server


def server_configs(folder: Path) -> list[Path]:
    """The configurations `tokenpool serve --config` takes in `folder` (mappings with models), not what running an
    example in place leaves beside them: multi-tenant.yaml's tenants_file, examples/tenants.yaml (a list of tenants, or
    {tenants, revoked}), failed test_examples_validate[tenants] as a fourth example."""
    return sorted(p for p in folder.glob("*.yaml")
                  if isinstance(data := yaml.safe_load(p.read_text()), dict) and "models" in data)


EXAMPLES = server_configs(REPO_ROOT / "examples")


def cli(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # (wide enough that rich's error box never wraps a message the tests look for: a temporary path's length varies)
    # (stdin is never inherited: `tokenpool run` reads a stdin that is not a terminal, as `ollama run` does)
    return subprocess.run([sys.executable, "-m", "controller.cli", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, input=stdin if stdin is not None else "", timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "400", **(env or {})})


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_examples_validate(path):
    cfg = load_config(path)
    assert cfg.models and all(Path(m.path).is_absolute() for m in cfg.models)  # relative to the file


def test_what_running_the_examples_in_place_leaves_is_no_example(tmp_path):
    for p in EXAMPLES:
        (tmp_path / p.name).write_text(p.read_text())
    (tmp_path / "tenants.yaml").write_text(yaml.safe_dump([{"name": "carol", "key_hashes": ["sha256$00$00"]}]))
    (tmp_path / "old-tenants.yaml").write_text(yaml.safe_dump({"tenants": [], "revoked": ["sha256$00$00"]}))
    assert [p.name for p in server_configs(tmp_path)] == [p.name for p in EXAMPLES]


def test_examples_cover_the_three_setups():
    assert {p.stem for p in EXAMPLES} >= {"one-gpu", "multi-tenant", "remote-workers"}
    one, multi, remote = (load_config(REPO_ROOT / "examples" / f"{n}.yaml") for n in
                          ("one-gpu", "multi-tenant", "remote-workers"))
    assert not one.auth_enabled and one.listen.host == "127.0.0.1"
    assert multi.auth_enabled and multi.metrics_token_hash and len(multi.tenants) == 3
    assert remote.workers.local == "none" and remote.workers.join_token_hash
    pinned = one.models[0]
    assert pinned.pin and pinned.preload and pinned.aliases == ["default", "qwen"]
    assert one.models[1].keep_alive == 300 and one.models[2].keep_alive == 30


@pytest.mark.parametrize(("text", "seconds"), [(300, 300.0), ("300", 300.0), ("30s", 30.0), ("5m", 300.0),
                                                ("1.5h", 5400.0), ("250ms", 0.25), (0, 0.0), ("-1", -1.0),
                                                (-1, -1.0), (None, None), ("1h30m", 5400.0), ("2d", 172800.0),
                                                ("0m0s", 0.0), ("-1s", -1.0), (" 90s ", 90.0)])
def test_keep_alive_durations(text, seconds):
    assert parse_duration(text) == seconds
    assert ModelSpec(name="m", path="/x", keep_alive=text).keep_alive == seconds


@pytest.mark.parametrize("bad", ["5 minutes", "m", "", True, "1e400", "5x", "1h30", "nan", float("inf")])
def test_keep_alive_refuses_nonsense(bad):
    with pytest.raises(ValidationError, match="duration"):
        ModelSpec(name="m", path="/x", keep_alive=bad)


def test_aliases_are_unique_across_models():
    a = {"name": "a", "path": "/a", "aliases": ["shared"]}
    with pytest.raises(ValidationError, match="unique across models: shared"):
        ServerConfig(models=[a, {"name": "b", "path": "/b", "aliases": ["shared"]}])
    with pytest.raises(ValidationError, match="unique across models: a"):
        ServerConfig(models=[a, {"name": "b", "path": "/b", "aliases": ["a"]}])
    with pytest.raises(ValidationError, match="alias"):
        ModelSpec(name="m", path="/x", aliases=["has space"])


def test_model_dirs_become_models(make_tiny, tmp_path):
    q, ll = make_tiny("qwen2"), make_tiny("llama")
    assert [(s.name, s.path) for s in model_specs([q, ll], [])] == [(q.name, str(q)), (ll.name, str(ll))]
    assert [s.name for s in model_specs([q, ll], ["x", "y"])] == ["x", "y"]
    one = model_specs([q], ["main", "alt", "other"])[0]
    assert (one.name, one.aliases) == ("main", ["alt", "other"])  # vLLM: the names after the first are aliases
    with pytest.raises(ValueError, match="2 model directories but 3"):
        model_specs([q, ll], ["x", "y", "z"])
    with pytest.raises(ValueError, match="no config.json"):
        model_specs([tmp_path], [])
    with pytest.raises(ValueError, match="none were given"):
        model_specs([], ["x"])
    cfg, token = prepare(None, None, None, [q], ["main"], 12.5)
    assert [m.name for m in cfg.models] == ["main"] and not cfg.is_default and not cfg.auth_enabled
    assert cfg.gpus.budget_gb == 12.5 and cfg.listen.host == "127.0.0.1" and verify_key(token, cfg.admin_token_hash)
    cfg, _ = prepare(REPO_ROOT / "examples" / "multi-tenant.yaml", None, 9000, [q], [])
    assert [m.name for m in cfg.models][-1] == q.name and cfg.auth_enabled and cfg.listen.port == 9000
    with pytest.raises(StartupError, match="--gpu-budget 0: Input should be greater than 0"):
        prepare(None, None, None, [q], [], 0)
    # vLLM's flags: --api-key (a tenant of every model, auth on), --max-model-len and --dtype (the directories')
    cfg, _ = prepare(None, None, None, [q], [], None, "k-123", 96, "bf16")
    assert cfg.auth_enabled and [t.name for t in cfg.tenants] == ["api-key"]
    assert verify_key("k-123", cfg.tenants[0].key_hashes[0]) and cfg.tenants[0].models == ["*"]
    assert (cfg.models[0].engine.max_model_len, cfg.models[0].engine.dtype) == (96, "bf16")
    for args, words in (((None, None, "banana"), "--dtype: dtype 'banana' is not one of auto, bf16"),
                        ((None, 0, None), "--max-model-len: Input should be greater than or equal to 1"),
                        (("", None, None), "--api-key is empty")):
        with pytest.raises(StartupError, match=re.escape(words)):
            prepare(None, None, None, [q], [], None, *args)
    with pytest.raises(StartupError, match="apply to the MODEL_DIR arguments"):
        prepare(None, None, None, [], [], None, None, 96)
    cfg, _ = prepare(None, None, None, [q], [], None, None, None, None, "hermes")
    assert cfg.models[0].tool_call_parser == "hermes"
    with pytest.raises(StartupError, match="the ones known are hermes"):
        prepare(None, None, None, [q], [], None, None, None, None, "mistral")
    # vLLM's --[no-]enable-prefix-caching: the directories' models (on unless said)
    assert prepare(None, None, None, [q], [])[0].models[0].engine.enable_prefix_caching
    assert not prepare(None, None, None, [q], [], enable_prefix_caching=False)[0].models[0].engine.enable_prefix_caching
    with pytest.raises(StartupError, match="apply to the MODEL_DIR arguments"):
        prepare(None, None, None, [], [], enable_prefix_caching=False)


def test_serve_names_each_model_dir_problem_in_a_line(make_tiny, tmp_path):
    """Names two folders would share, a --served-model-name given twice or not a name, a name a --config model has,
    and a --max-model-len past the model's positions are refused in one line naming them (they were a pydantic
    traceback, a pydantic error dump, and a silent clamp to the model's 2048)."""
    q, ll = make_tiny("qwen2"), make_tiny("llama")
    twin = tmp_path / "other" / q.name
    twin.parent.mkdir()
    twin.symlink_to(q)
    for args, words in ((([q, twin], []), f"two models would be named '{q.name}'"),
                        (([q, ll], ["a", "a"]), "'a' is given twice"),
                        (([q], ["bad name!"]), "--served-model-name 'bad name!' is not a model name")):
        with pytest.raises(ValueError, match=re.escape(words)):
            model_specs(*args)
    (tmp_path / "c.yaml").write_text(f"models:\n  - name: a\n    path: {ll}\n")
    with pytest.raises(StartupError, match="'a': already a model .* name the MODEL_DIR otherwise"):
        prepare(tmp_path / "c.yaml", None, None, [q], ["a"])
    with pytest.raises(StartupError, match=rf"--max-model-len 4096 is more than model '{q.name}' takes: 2048 tokens"):
        prepare(None, None, None, [q], [], None, None, 4096)
    assert prepare(None, None, None, [q], [], None, None, 2048)[0].models[0].engine.max_model_len == 2048
    r = cli("serve", str(q), str(twin), "--port", "1")
    assert r.returncode == 2 and f"two models would be named '{q.name}'" in r.stderr and "Traceback" not in r.stderr


def test_serve_on_a_busy_port_keeps_that_servers_token_file_and_port_0_names_its_own(make_tiny, tmp_path,
                                                                                      monkeypatch):
    """A second `tokenpool serve` on a port in use used to overwrite the running server's admin-token-PORT file and
    remove it at exit (its `tokenpool ps` then got 401s); `--port 0` wrote admin-token-0, which `tokenpool ps --url`
    of the port it listened on never finds."""
    import socket

    from controller import serve as serve_mod
    from controller import shutdown

    monkeypatch.setenv("TOKENPOOL_CACHE", str(tmp_path))
    ran = []

    def fake_run(cfg, prepare=None, tenants=None):  # (the listener and the workers are not the point: where the token file went is)
        ran.append((cfg.listen.port, sorted(p.name for p in tmp_path.glob("admin-token-*"))))
        return 0

    monkeypatch.setattr(shutdown, "run", fake_run)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        theirs = tmp_path / f"admin-token-{port}"
        theirs.write_text("tpadmin-theirs\n")
        with pytest.raises(SystemExit) as e:
            serve_mod.serve(model_dirs=[make_tiny("qwen2")], port=port)
        assert e.value.code == 2 and not ran and theirs.read_text() == "tpadmin-theirs\n"
    serve_mod.serve(model_dirs=[make_tiny("qwen2")], port=0)
    (got, files), = ran
    assert got != 0 and f"admin-token-{got}" in files and "admin-token-0" not in files


def test_serve_model_dir_with_names_live(make_tiny, tmp_path):
    d = make_tiny("qwen2")
    with LiveServer(None, tmp_path, args=[str(d), "--served-model-name", "mine", "tiny", "--api-key", "k-live",
                                          "--max-model-len", "96"]) as srv:
        with pytest.raises(openai.AuthenticationError):  # --api-key: a request without it is refused
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="k-live", max_retries=0, timeout=60)
        assert [m.id for m in c.models.list()] == ["mine", "tiny"]  # (every served name, as vLLM lists them)
        assert c.models.retrieve("mine").model_extra["max_model_len"] == 96
        # its card by the name or an alias, as a request would name it (the alias used to be a 404 here)
        assert c.models.retrieve("mine").id == "mine" and c.models.retrieve("tiny").id == "tiny"
        with pytest.raises(openai.NotFoundError):
            c.models.retrieve("nope")
        r = c.completions.create(model="tiny", prompt="Hi", max_tokens=3, temperature=0,
                                 extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 3
        with pytest.raises(openai.NotFoundError):
            c.completions.create(model="nope", prompt="Hi", max_tokens=1)
        # `tokenpool stop` takes the alias `tokenpool run` takes (it was a 404 "no model 'tiny'")
        path = re.search(r"admin token for this run written to (\S+) ", srv.log_path.read_text()).group(1)
        admin = {"TOKENPOOL_ADMIN_TOKEN": Path(path).read_text().strip()}
        r = cli("stop", "tiny", "--url", srv.url, env=admin)
        assert r.returncode == 0 and r.stdout.startswith(("tiny: its weights leave VRAM on 1 engine",
                                                          "tiny: its weights leave the memory of 1 engine")), r.stderr
        r = cli("stop", "nope", "--url", srv.url, env=admin)
        assert (r.returncode, r.stderr) == (1, 'tokenpool stop: model "nope" not found; served: mine, tiny\n'), r.stderr


def test_serve_a_repo_id_from_the_local_hugging_face_cache(make_tiny, tmp_path):
    """`tokenpool serve org/name`, as `vllm serve` takes a repo id: the snapshot in the local Hugging Face cache (the
    layout the hub client writes: refs/main naming a snapshot), served under the id; one not cached: exit 2, one
    line saying how to get it (this server downloads nothing)."""
    import shutil

    hub = tmp_path / "hub"
    repo = hub / "models--tinyorg--tiny-qwen2"
    sha = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(make_tiny("qwen2"), repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    env = {"HF_HUB_CACHE": str(hub)}
    with LiveServer(None, tmp_path, args=["tinyorg/tiny-qwen2"], env=env) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in c.models.list()] == ["tinyorg/tiny-qwen2"]
        assert c.models.retrieve("tinyorg/tiny-qwen2").id == "tinyorg/tiny-qwen2"
        r = c.completions.create(model="tinyorg/tiny-qwen2", prompt="Hi", max_tokens=2, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 2
    r = subprocess.run([sys.executable, "-m", "controller.serve", "tinyorg/not-here"], cwd=REPO_ROOT, timeout=60,
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **env})
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "tinyorg/not-here is neither a path nor a model in the local Hugging Face cache" in lines[0]
    assert "hf download tinyorg/not-here" in lines[0]


def test_serve_help_names_what_serve_takes():
    """`tokenpool serve --help` says it takes a repo id (it named folders and .gguf files only), and that
    --gpu-budget is the arena, weights and KV (it said weights)."""
    r = cli("serve", "--help")
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", r.stdout).split())
    assert r.returncode == 0 and "Hugging Face repo ids (org/name) in the local Hugging Face cache" in text, text
    assert "pooled arena, weights and KV" in text


def test_serve_refuses_config_pins_that_starve_a_model(tmp_path):
    """`tokenpool serve --config`: pins that leave a registered model too little weight space stop start-up once the
    GPU's worker joined, with exit status 2 and one line naming the models, their sizes and the GPU -- not requests
    waiting forever (tests/test_admin_pool.py has the cases). The CPU worker here: a 2 GB arena, 0.5 GB of it KV."""
    pace = {"engine": {"kind": "pace"}}
    cfg = {"admin_token_hash": hash_key("unused"), "workers": {"local": "cpu", "standby": False},
           "gpus": {"cpu_budget_gb": 2, "kv_cache_gb": 0.5},
           "models": [{"name": "big", "memory_gb": 1.0, "pin": True, **pace}, {"name": "small", "memory_gb": 0.5, **pace}]}
    with LiveServer(cfg, tmp_path, wait_ready=False) as srv:
        assert srv.proc.wait(120) == 2, srv.log()
        log = srv.log()
    assert ("cannot start: pinned model 'big' (1.07 GB) would leave 'small' (0.54 GB) too little of the 1.50 GB "
            "weight space of w0 (cpu)") in log
    assert "Traceback" not in log


def test_keys_cli():
    r = cli("keys", "new", "--prefix", "tpadmin")
    key = r.stdout.split("key:")[1].split()[0]
    assert key.startswith("tpadmin-") and verify_key(key, r.stdout.split("hash:")[1].split()[0])
    h = cli("keys", "hash", "my-key").stdout.strip()
    assert verify_key("my-key", h) and not verify_key("other", h)
    assert verify_key("piped", cli("keys", "hash", "-", stdin="piped\n").stdout.strip())
    help_ = subprocess.run([sys.executable, "-m", "controller.keys", "--help"], cwd=REPO_ROOT, capture_output=True,
                           text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert help_.returncode == 0 and "usage:" in help_.stdout and "sha256$" not in help_.stdout


def test_version_and_bad_serve_arguments(tmp_path):
    from importlib.metadata import version

    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"tokenpool {version('tokenpool')}"
    bad = cli("serve", str(tmp_path))
    assert bad.returncode == 2 and "no config.json" in bad.stderr
    bad = cli("serve", "--config", str(tmp_path / "missing.yaml"))
    assert bad.returncode == 2 and "no configuration file" in bad.stderr


def test_serve_refuses_malformed_environment_variables(monkeypatch):
    """A typed TOKENPOOL_* variable that does not parse, or a value outside its choices, stops `tokenpool serve` before
    it starts (exit 2, one line each naming the variable and its meaning) -- not a server whose worker fails every
    model it loads with a bare `invalid literal for int()`."""
    from tokenpool import env

    monkeypatch.setenv("TOKENPOOL_PREFILL_GRAPHS", "lots")
    monkeypatch.setenv("TOKENPOOL_PIPELINE_LEARN", "always")
    monkeypatch.setenv("TOKENPOOL_GC_YOUNG", "")  # optional and empty: unset
    monkeypatch.setenv("TOKENPOOL_WORKER_BURST_S", "0.02")
    assert len(env.problems()) == 2 and env.WORKER_BURST_S.number() == 0.02
    with pytest.raises(ValueError, match="TOKENPOOL_PREFILL_GRAPHS='lots' is not an integer"):
        env.PREFILL_GRAPHS.integer()
    bad = cli("serve", "--port", "1")
    assert bad.returncode == 2, bad.stderr
    assert "TOKENPOOL_PREFILL_GRAPHS='lots' is not an integer (default 1024" in bad.stderr
    assert "TOKENPOOL_PIPELINE_LEARN='always' is not one of interval, device, none" in bad.stderr
    assert "Traceback" not in bad.stderr
    monkeypatch.setenv("TOKENPOOL_PREFILL_GRAPHS", "0")
    monkeypatch.delenv("TOKENPOOL_PIPELINE_LEARN")
    assert env.problems() == [] and env.PREFILL_GRAPHS.integer() == 0


def test_ps_last_use_reads_as_ollama_ps_does():
    """`tokenpool ps`'s LAST USED column: whole units, singular at one, the next unit once a count would round up to
    it (never "60 seconds ago" or "1 minutes ago")."""
    from controller.ps import _ago

    said = {s: _ago(0.0, s) for s in (1, 30, 59.7, 61, 150, 3599, 7200, 90000, 3 * 86400)}
    assert said == {1: "1 second ago", 30: "30 seconds ago", 59.7: "1 minute ago", 61: "1 minute ago",
                    150: "2 minutes ago", 3599: "1 hour ago", 7200: "2 hours ago", 90000: "1 day ago",
                    3 * 86400: "3 days ago"}
    assert _ago(None, 5.0) == "never" and _ago(10.0, 5.0) == "0 seconds ago"  # (a clock behind: not negative)


def test_health_names_a_model_whose_load_keeps_failing(make_tiny, tmp_path):
    """A model whose weights cannot be read (a truncated safetensors file: config.json is fine, so it passes the start-up
    check) keeps /health at 503 "starting", and /health says which model and why; requests to it get a 503 naming the
    cause at once, and the other model serves."""
    import shutil
    import time

    good = make_tiny("qwen2")
    bad = tmp_path / "broken"
    shutil.copytree(good, bad)
    w = next(bad.glob("*.safetensors"))
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with LiveServer(None, tmp_path / "srv", args=[str(good), str(bad)], wait_ready=False) as srv:
        deadline, body = time.monotonic() + 120, {}
        while time.monotonic() < deadline and "failed_models" not in body:
            try:
                r = httpx.get(srv.url + "/health", timeout=5)
                body = r.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert r.status_code == 503 and body["status"] == "starting", body
        assert list(body["failed_models"]) == ["broken"] and "engine w0:" in body["failed_models"]["broken"], body
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.APIStatusError) as ei:
            c.completions.create(model="broken", prompt="Hi", max_tokens=1)
        assert ei.value.status_code == 503 and "could not be registered" in ei.value.message
        assert c.completions.create(model=good.name, prompt="Hi", max_tokens=2, temperature=0,
                                    extra_body={"ignore_eos": True}).usage.completion_tokens == 2
        # the admin API and `tokenpool ps` say it too
        path = re.search(r"admin token for this run written to (\S+) ", srv.log_path.read_text()).group(1)
        out = cli("ps", "--url", srv.url, env={"TOKENPOOL_ADMIN_TOKEN": Path(path).read_text().strip()}).stdout
        row = next(ln for ln in out.splitlines() if ln.startswith("broken"))
        assert "failed" in row.split() and "broken failed to load: engine w0:" in out, out
        pool = httpx.get(srv.url + "/admin/pool", headers={"Authorization": f"Bearer {Path(path).read_text().strip()}"},
                         timeout=10).json()  # the dashboard's data: state "failed", the cause beside it
        broken = next(m for m in pool["models"] if m["name"] == "broken")
        assert broken["state"] == "failed" and broken["load_error"].startswith("engine w0:"), broken
        assert next(m for m in pool["models"] if m["name"] != "broken")["load_error"] is None


def test_the_cli_reads_a_local_servers_token_for_that_port_only(tmp_path, monkeypatch):
    """`tokenpool ps/stop` without a token: the owner-only file a server without admin_token_hash wrote for the URL's
    port; another port's file is not that server's (two servers of one user), and no file is read for another host
    (its token would be sent there)."""
    from controller.cli import _admin_token
    from controller.config import ServerConfig
    from controller.startup import write_admin_token

    monkeypatch.setenv("TOKENPOOL_CACHE", str(tmp_path))
    for port, token in ((8123, "tok-a"), (80, "tok-80")):
        f = write_admin_token(ServerConfig.model_validate({"listen": {"port": port}}), token)
        assert f.name == f"admin-token-{port}" and f.stat().st_mode & 0o077 == 0
    assert _admin_token(None, "http://127.0.0.1:8123") == "tok-a"
    assert _admin_token(None, "http://localhost:8123/") == "tok-a"
    assert _admin_token(None, "http://127.0.0.1:8124") is None  # another server's port
    assert _admin_token(None, "http://127.0.0.1") == "tok-80"
    assert _admin_token(None, "http://gpu-box.example:8123") is None and _admin_token(None, "http://10.0.0.2") is None
    assert _admin_token("given", "http://127.0.0.1:8123") == "given"


@pytest.fixture
def chat_stub():
    """A stand-in OpenAI server for `tokenpool run`: it serves the model "known", records each chat body, and streams
    "ok" as the reply. Yields (url, bodies)."""
    import http.server
    import json

    bodies: list[dict] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _json(self, code: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path in ("/v1/models/known", "/v1/models"):
                return self._json(200, {"id": "known"} if self.path.endswith("known") else {"data": [{"id": "known"}]})
            self._json(404, {"error": {"message": "The model `nosuch` does not exist."}})

        def do_POST(self):
            bodies.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            if bodies[-1]["model"] != "known":
                return self._json(404, {"error": {"message": "The model `nosuch` does not exist."}})
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()
            self.wfile.write(b'data: {"choices": [{"delta": {"content": "ok"}}]}\n\ndata: [DONE]\n\n')

    with stub_server(Handler) as url:
        yield url, bodies


def test_run_takes_piped_text_before_the_prompt_and_multi_line_messages(chat_stub):
    """As `ollama run`: `cat file | tokenpool run M "summarize"` sends the file and then the words (the piped text was
    dropped), and in a conversation the lines between \"\"\" and \"\"\" are one message (each was its own turn)."""
    from controller.chat_cli import run

    url, bodies = chat_stub
    r = cli("run", "known", "summarize", "this", "--url", url, stdin="line 1\nline 2\n")
    assert r.returncode == 0 and r.stdout == "ok\n", r.stderr
    assert bodies[-1]["messages"] == [{"role": "user", "content": "line 1\nline 2\n\nsummarize this"}]
    r = cli("run", "known", "--url", url, stdin="just stdin")
    assert r.returncode == 0 and bodies[-1]["messages"] == [{"role": "user", "content": "just stdin"}]
    r = cli("run", "known", "words", "--url", url)  # (nothing piped: the words alone)
    assert r.returncode == 0 and bodies[-1]["messages"] == [{"role": "user", "content": "words"}]
    out = io.StringIO()
    run(url, None, "known", None, None, {}, Terminal('"""def f():\n    return 1\n"""\n"""one line"""\n/bye\n'), out)
    assert [b["messages"][-1]["content"] for b in bodies[-2:]] == ["def f():\n    return 1\n", "one line"]
    assert out.getvalue().count(">>> ") == 3 and out.getvalue().count("... ") == 2


def test_run_refuses_an_unknown_model_before_a_conversation(chat_stub):
    """`tokenpool run nosuch` on a terminal: one line and exit 1, as `ollama run` says it (it started a conversation
    that answered every line typed with the same error)."""
    from controller.chat_cli import ChatError, run

    url, bodies = chat_stub
    out = io.StringIO()
    with pytest.raises(ChatError, match='model "nosuch" not found; served: known'):  # (ollama run's words)
        run(url, None, "nosuch", None, None, {}, Terminal("hello\n/bye\n"), out)
    assert bodies == [] and ">>>" not in out.getvalue()
    run(url, None, "known", None, None, {}, Terminal("hello\n/bye\n"), out)
    assert [b["messages"] for b in bodies] == [[{"role": "user", "content": "hello"}]]


def test_cli_urls_without_a_scheme_and_loadtest_without_a_server(chat_stub):
    """--url host:port (as OLLAMA_HOST is given) is http (it was `unknown url type`), and `tokenpool loadtest`
    with nothing listening says so in one line (it was a traceback)."""
    import socket

    url, bodies = chat_stub
    r = cli("ls", "--url", url.removeprefix("http://"))
    assert r.returncode == 0 and r.stdout.split() == ["NAME", "SIZE", "CONTEXT", "known", "-", "-"], r.stderr
    r = cli("run", "known", "hi", "--url", url.removeprefix("http://"))
    assert r.returncode == 0 and r.stdout == "ok\n", r.stderr
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = cli("loadtest", "--url", f"127.0.0.1:{port}", "--duration", "0.2", "--streams", "1")
    assert r.returncode == 1 and r.stderr.strip() == f"tokenpool loadtest: cannot reach http://127.0.0.1:{port}: " \
        "Connection refused", r.stderr


def test_cli_urls_given_as_an_openai_base_url(chat_stub):
    """--url http://host:port/v1, the base URL an OpenAI client is given, is that server (`tokenpool run` and `ls`
    asked /v1/v1/... and said a bare 'Not Found')."""
    url, bodies = chat_stub
    for given in (url + "/v1", url + "/v1/", url.removeprefix("http://") + "/v1"):
        r = cli("ls", "--url", given)
        assert r.returncode == 0 and r.stdout.split() == ["NAME", "SIZE", "CONTEXT", "known", "-", "-"], (given, r.stderr)
        r = cli("run", "known", "hi", "--url", given)
        assert r.returncode == 0 and r.stdout == "ok\n", (given, r.stderr)


def test_conversation_commands_as_ollama_run_has_them(chat_stub):
    """/? and /help print the commands, /clear forgets the turns so far (the --system message stays), a lone unknown
    /word and ollama's /set etc. are commands, not sent; text that only begins with / is a message (they
    all went to the model as messages)."""
    from controller.chat_cli import run

    url, bodies = chat_stub
    out = io.StringIO()
    typed = "/?\nhi\n/clear\nagain\n/nope\n/set parameter temperature 0\n/etc/hosts explain\n/bye\n"
    run(url, None, "known", None, "be brief", {}, Terminal(typed), out)
    sys_msg = {"role": "system", "content": "be brief"}
    assert [b["messages"] for b in bodies] == [
        [sys_msg, {"role": "user", "content": "hi"}],
        [sys_msg, {"role": "user", "content": "again"}],  # (after /clear: not hi, ok)
        [sys_msg, {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"},
         {"role": "user", "content": "/etc/hosts explain"}]]
    text = out.getvalue()
    assert "/clear    forget the conversation" in text and "Cleared the conversation so far." in text
    assert "Unknown command '/nope'. Type /? for help" in text and "Set parameter 'temperature' to '0'" in text
    assert bodies[-1]["temperature"] == 0.0


def test_a_key_without_a_prefix_never_starts_with_a_dash(monkeypatch):
    """`tokenpool keys new --prefix ""`: a key that began with '-' was read as an option by `keys hash KEY`."""
    import secrets

    from controller import keys

    drawn = iter(["-starts-with-dash", "abc_def"])
    monkeypatch.setattr(secrets, "token_urlsafe", lambda n: next(drawn))
    assert keys.new_key("") == "abc_def"
    monkeypatch.setattr(secrets, "token_urlsafe", lambda n: "-x")
    assert keys.new_key("tp") == "tp--x"  # (a prefix keeps it from leading)
