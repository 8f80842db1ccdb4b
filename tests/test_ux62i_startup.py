"""The first-run user's wait (`tokenpool serve`, the embedded default): what its start-up no longer does in sequence or
in the first registration.

A first run makes its models after the bind (the GGUF conversion and the demo models: ~8 s, mostly one core); the local
workers used to start only after that, their start-up (torch, transformers, the engine: ~2.5 s of the other core)
then standing between the models and ready. They start beside it now, and join -- their settings carry the models' KV
sizes -- once the models are made. A worker reads a saved checkpoint's config.json without transformers' configuration
classes (llama's pulls torch.distributed.tensor in through transformers' activations: ~0.8 s of a core), which its
warm-up or first registration used to import (after the models were made, on a first run; by a promoted standby,
after its takeover). The default's
SmolLM2, preloaded, waits for no weights at its first request: tests/test_default_server.py's
test_models_real_and_demo."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

import controller.app
from controller import shutdown
from controller.config import ModelSpec, ServerConfig
from controller.pool import EnginePool
from load_tests.live_server import REPO_ROOT
from tests.ports import free_port
from tokenpool.models import kv_elems_per_token

openai = pytest.importorskip("openai")


@pytest.fixture
def shm():
    with tempfile.TemporaryDirectory(prefix="tokenpool-ux62i-", dir="/dev/shm") as d:
        yield Path(d)


def test_the_workers_start_while_the_models_are_made_and_join_once_they_are(make_tiny, tmp_path, monkeypatch, shm):
    """`shutdown.run` with a `prepare` (what the default's first run makes): a local worker is started and connects
    while it runs; its registration is answered only once the model's folder is made, with that model's KV size in its
    settings; the server then serves the model (the official client's chat completion)."""
    monkeypatch.setenv("TOKENPOOL_SHM_DIR", str(shm))
    made = tmp_path / "made-on-first-run"
    port = free_port(range(28020, 28040))
    cfg = ServerConfig(listen={"host": "127.0.0.1", "port": port}, workers={"local": "cpu", "standby": False},
                       models=[ModelSpec(name="m", path=str(made))])
    events: list[str] = []
    connected = threading.Event()
    admit, settings, build = EnginePool._admit, EnginePool.gpu_settings, controller.app.build_app
    built: dict = {}

    def _admit(self, reg, peer):  # a worker's Register has arrived
        events.append("worker connected")
        connected.set()
        return admit(self, reg, peer)

    def gpu_settings(self, reg):  # its registration answered (Registered.settings)
        out = settings(self, reg)
        events.append(f"worker joined, kv_elems_per_token {out['kv_elems_per_token']}")
        return out

    def build_app(cfg, manage_controller=True, controller=None):
        app = build(cfg, manage_controller, controller)
        built["app"], built["loop"] = app, asyncio.get_running_loop()
        return app

    monkeypatch.setattr(EnginePool, "_admit", _admit)
    monkeypatch.setattr(EnginePool, "gpu_settings", gpu_settings)
    monkeypatch.setattr(controller.app, "build_app", build_app)

    def prepare() -> None:
        # the workers used to be started after this returned: none would connect while it waits
        assert connected.wait(60), "no worker was started while the models were made"
        time.sleep(0.5)  # (a registration not held would be answered meanwhile)
        events.append("models made")
        shutil.copytree(make_tiny("qwen2"), made)

    rc: list[int] = []
    t = threading.Thread(target=lambda: rc.append(shutdown.run(cfg, prepare)), daemon=True)
    t.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            assert t.is_alive() and time.monotonic() < deadline, (rc, events)
            time.sleep(0.05)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        got = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                             temperature=0)
        assert got.choices[0].finish_reason in ("length", "stop") and got.usage.completion_tokens >= 1, got
    finally:
        if "app" in built and t.is_alive():  # (ctl.on_fatal: the served loop's should_exit)
            with contextlib.suppress(RuntimeError):
                built["loop"].call_soon_threadsafe(lambda: built["app"].state.controller.on_fatal())
        t.join(60)
    assert rc == [0]
    kv = kv_elems_per_token(str(made))
    assert kv > 0
    assert events == ["worker connected", "models made", f"worker joined, kv_elems_per_token {kv}"], events


def test_a_workers_warm_up_and_first_registration_import_no_served_configuration_class(make_tiny):
    """After a worker's warm-up (a cold start's, a standby's), reading a model's config and tokenizer (its first
    registration: the host copy's ModelConfig, the engine's tokenizer) of each architecture served imports neither
    transformers' activations nor torch.distributed, and no served architecture's configuration class was imported at
    all (`ModelConfig.from_json`)."""
    dirs = {arch: make_tiny(arch) for arch in ("llama", "qwen2", "qwen3", "mistral")}
    code = f"""
import sys
from controller.hosting import warm_up
warm_up("cpu")
from model_swapper.model_config import ModelConfig
from token_scheduler.tokenizer import load_tokenizer
from tokenpool.models import SUPPORTED_ARCHS
before = set(sys.modules)
for d in {[str(d) for d in dirs.values()]!r}:
    ModelConfig.from_pretrained(d)
    load_tokenizer(d)
new = sorted(m for m in set(sys.modules) - before if "activations" in m or m.startswith("torch.distributed"))
assert not new, new
classes = [a for a in SUPPORTED_ARCHS if f"transformers.models.{{a}}.configuration_{{a}}" in sys.modules]
assert not classes and "transformers.activations" not in sys.modules, classes
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
