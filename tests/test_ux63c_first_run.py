"""A first run (`tokenpool serve`, the embedded default, in a fresh cache) makes its models in a child process: the
server's own process never imports torch.

The conversion and the model factory import torch and transformers; they ran on a thread of the server's start-up,
which cost the server's process ~1-2 s of CPU on a 2-core first run (beside the local worker's own start-up) and kept
torch's memory in it for good, where session 62 had made the rest of its start-up torch-free. `serve.ensure_demo_models`
runs them as `python -m controller.model_factory NAME=DIR ...` now, only where a model is not made yet."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

import load_tests.live_server as live_server
from controller import serve
from controller.config import DEMO_MODELS, REAL_MODEL, default_config
from controller.model_factory import MARKER as FACTORY_MARKER
from controller.real_model import MARKER as GGUF_MARKER
from tests.ports import free_port

openai = pytest.importorskip("openai")

PORTS = range(28400, 28450)

# Imported first in every process of the server (PYTHONPATH): in the server's own (`python -m controller.serve`), it
# records that it watches, and the stack of a first import of torch there; the workers and the child making the
# models (other __main__ modules) import torch as they must.
WATCH = '''
import sys, traceback


class _Loader:  # torch's own loader, noting the stack of the import that runs torch's module
    def __init__(self, real):
        self.real = real

    def create_module(self, spec):
        return self.real.create_module(spec)

    def exec_module(self, module):
        with open({torch!r}, "a") as f:
            f.write("".join(traceback.format_stack()))
        return self.real.exec_module(module)


class _Watch:  # (a find_spec alone is no import: transformers asks whether torch is there)
    def find_spec(self, name, path=None, target=None):
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        if spec is None or spec.name != "controller.serve":
            return None
        open({watching!r}, "a").close()
        if name != "torch":
            return None
        for finder in sys.meta_path:
            found = finder is not self and finder.find_spec(name, path, target)
            if found:
                found.loader = _Loader(found.loader)
                return found
        return None


sys.meta_path.insert(0, _Watch())
'''


def _cache(tmp_path: Path, smollm2: Path) -> Path:
    """A fresh TOKENPOOL_CACHE but for SmolLM2's conversion (once per machine: the fixture's; ~9 s on 2 cores): its
    demo models are made by the server."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / REAL_MODEL).symlink_to(smollm2)
    return cache


def _server(monkeypatch, tmp_path: Path, cache: Path, wait_ready: bool = True) -> live_server.LiveServer:
    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setattr(live_server, "free_port", lambda: free_port(PORTS))
    return live_server.LiveServer(None, tmp_path / "srv", ready_timeout=180, wait_ready=wait_ready,
                                  env={"TOKENPOOL_CACHE": str(cache), "TOKENPOOL_SHM_DIR": str(shm)})


def test_a_first_run_makes_its_models_without_torch_in_the_servers_process(smollm2, tmp_path, monkeypatch):
    """`tokenpool serve` in a fresh cache: the demo models are made (the same folders: the factory's marker,
    config.json, weights), the first chat completions through the official client are answered, and the server's
    process never imported torch (it did, making them on a thread of its start-up)."""
    cache = _cache(tmp_path, smollm2)
    hook = tmp_path / "hook"
    hook.mkdir()
    torch_at, watching = tmp_path / "torch-imported-by-the-server", tmp_path / "watching"
    (hook / "sitecustomize.py").write_text(WATCH.format(torch=str(torch_at), watching=str(watching)))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
    with _server(monkeypatch, tmp_path, cache) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)
        assert {REAL_MODEL, *(n for n, _, _ in DEMO_MODELS)} <= {m.id for m in client.models.list()}
        for name in (REAL_MODEL, DEMO_MODELS[0][0]):
            got = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Say hi"}],
                                                 max_tokens=3, temperature=0)
            assert got.choices[0].finish_reason in ("length", "stop") and got.usage.completion_tokens >= 1, got
        log = srv.log()
    for name, _, _ in DEMO_MODELS:
        assert {"config.json", FACTORY_MARKER, "model.safetensors"} <= {f.name for f in (cache / name).iterdir()}, name
    assert watching.exists(), f"the import hook did not run in the server's process:\n{log}"
    assert not torch_at.exists(), f"the server's process imported torch:\n{torch_at.read_text()[-4000:]}"


def _maker_of(pid: int) -> int | None:
    """The pid of `pid`'s child making the default's models (`serve.MAKER`), if it runs."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"controller.model_factory" in cmd:
            return int(d.name)
    return None


def test_a_first_run_stopped_while_its_models_are_made_leaves_nothing_behind(smollm2, tmp_path, monkeypatch):
    """Ctrl-C (SIGINT, the server's alone: the child runs in its own session, as a worker does) while the child makes
    the demo models: the server stops cleanly (exit 0, no traceback: the thread that waited for the child, woken by
    its end at the server's exit, found the start-up's loop closed), and the child with it (it ran on orphaned, and
    the next start made the same folders beside it)."""
    cache = _cache(tmp_path, smollm2)
    srv = _server(monkeypatch, tmp_path, cache, wait_ready=False)
    demo = cache / DEMO_MODELS[0][0]
    with srv:
        deadline = time.monotonic() + 120
        while not (demo / FACTORY_MARKER).exists():  # (torch imported there, the first model begun)
            assert srv.proc.poll() is None and time.monotonic() < deadline, srv.log()
            time.sleep(0.05)
        maker = _maker_of(srv.proc.pid)
        assert maker is not None, srv.log()
        os.kill(srv.proc.pid, signal.SIGINT)
        assert srv.proc.wait(60) == 0, srv.log()
        log = srv.log()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{maker}").exists() and time.monotonic() < deadline:  # (reaped by the server, or by init)
        time.sleep(0.05)
    assert not Path(f"/proc/{maker}").exists(), "the child making the models outlived the server"
    assert "Traceback" not in log and "CancelledError" not in log, log
    # a folder is made or not: its config.json written last (a half-made one is made again at the next start), and no
    # temporary folder is left in the cache
    for name, _, _ in DEMO_MODELS:
        if (cache / name / "config.json").exists():
            assert (cache / name / "model.safetensors").exists(), name
    assert not [p.name for p in cache.iterdir() if p.is_dir() and p.name.startswith(".")], list(cache.iterdir())


def test_a_warm_start_starts_no_child_and_a_cold_one_names_every_model(tmp_path, monkeypatch):
    """The default's models made already (a warm start): nothing is started. One missing: the child is given every
    model's name and folder (it leaves those made alone: `config.ensure_demo_models`)."""
    monkeypatch.setenv("TOKENPOOL_CACHE", str(tmp_path))
    cfg = default_config()
    for m in cfg.models:
        Path(m.path).mkdir()
        (Path(m.path) / "config.json").write_text("{}")
    (Path(cfg.models[0].path) / GGUF_MARKER).write_text("{}")
    started: list[list[str]] = []

    class Popen:
        def __init__(self, cmd, **kw):  # (the pipe's end is closed once it is handed over: nothing to read)
            started.append(cmd)
            self.returncode = 0

        def wait(self):
            return 0

    monkeypatch.setattr(serve.subprocess, "Popen", Popen)
    serve.ensure_demo_models(cfg)
    assert started == []
    (Path(cfg.models[-1].path) / "config.json").unlink()
    serve.ensure_demo_models(cfg)
    assert started == [[*serve.MAKER, "--result-fd", started[0][len(serve.MAKER) + 1], *(f"{m.name}={m.path}" for m in cfg.models)]]
