"""What every benchmark result records: device, date, commit, the exact command."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def cpu_model() -> str | None:
    """The CPU's model name (/proc/cpuinfo), for results run on CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def git_commit() -> str:
    import os

    if os.environ.get("TOKENPOOL_COMMIT"):  # a copied tree without .git (e.g. a remote GPU box)
        return os.environ["TOKENPOOL_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, stderr=subprocess.DEVNULL,
                                       cwd=Path(__file__).resolve().parents[1]).strip()  # (this checkout's, run from anywhere)
    except Exception:
        return "unknown"


def bench_models_dir() -> Path:
    """Where the benchmarks keep the factory models they make: beside the server's cache (`$TOKENPOOL_CACHE`, as
    `tokenpool serve` uses it) when that is set, else ~/.cache/tokenpool/bench-models."""
    from tokenpool import env

    return Path(env.CACHE.get()) / "bench-models" if env.CACHE.get() else Path.home() / ".cache/tokenpool/bench-models"


def header() -> dict:
    return {
        "device": device_name(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "command": " ".join(["tokenpool", *sys.argv[1:]]) if sys.argv[0].endswith("tokenpool") else " ".join(sys.argv),
        # the switches the run had on (TOKENPOOL_PIPELINE=1 ...): part of its command line
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("TOKENPOOL_") and k != "TOKENPOOL_COMMIT"},
    }


def checkpoint_size(name: str) -> str:
    """A served model's checkpoint size: its name less an alias number ("qwen2-1.5b-7" -> "qwen2-1.5b"); a name
    without one as it is."""
    head, _, tail = name.rpartition("-")
    return head if head and tail.isdigit() else name


def spread(xs: list[float], key: str) -> dict:
    """{key_p50, key_p90, key_max} of `xs` (nearest rank; not empty)."""
    xs = sorted(xs)
    return {f"{key}_p50": xs[len(xs) // 2], f"{key}_p90": xs[min(len(xs) - 1, int(0.9 * len(xs)))],
            f"{key}_max": xs[-1]}


# Short chat questions the served benchmarks ask (bench_prefix, bench_lora).
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Name three primary colours.",
             "Explain what a CPU does in one sentence.", "Who wrote Romeo and Juliet?", "What is 12 times 7?",
             "Give me a short tip for learning to cook.", "Translate 'good morning' into Spanish.",
             "What colour is the sky?", "Name a large mammal.", "How many legs has a spider?", "Say hello."]


def model_or_smollm2(model: str | None) -> str:
    """`model`, or the embedded SmolLM2-135M-Instruct's directory (made from its GGUF on first use)."""
    if model is not None:
        return model
    from controller.config import REAL_MODEL, cache_dir
    from controller.real_model import ensure_smollm2

    return str(ensure_smollm2(cache_dir() / REAL_MODEL))


def write_json(path: Path | None, data: dict) -> None:
    text = json.dumps(data, indent=2)
    print(text)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


def graph_replay_us(fn, reps: int = 20) -> float:
    """Microseconds of one call of `fn` (run once first), captured in a CUDA graph and replayed: median of `reps`."""
    import statistics
    import time

    import torch

    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return 1e6 * statistics.median(ts)


def hbm_bandwidth(nbytes: int = 2 << 30, iters: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    import torch

    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    sec = start.elapsed_time(end) / 1e3 / iters
    del a, b
    torch.cuda.empty_cache()
    return 2 * nbytes / sec
