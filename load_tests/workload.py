"""Seeded multi-model workloads: Poisson arrivals per model, ShareGPT-like lengths, JSONL on disk.

Lengths are lognormal (sigma 1.0: a long tail, as ShareGPT's) with the given means before capping, capped
so prompt + output fits the context. Each model draws from its own generator seeded by (seed, model), and
arrival times are a unit-rate process divided by the rate, so the same seed at a higher rate gives the same
requests, only closer together (common random numbers: rate sweeps are smooth and monotone in load).

JSONL, one request per line: {"time": s, "model": name, "prompt_len": n, "output_len": n, "id": str}.
"""

from __future__ import annotations

import functools
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class WorkItem:
    time: float
    model: str
    prompt_len: int
    output_len: int
    id: str


@dataclass(frozen=True, slots=True)
class WorkloadModel:
    name: str
    arch: str
    size: str


def parse_models(spec: str = "4x7b,6x1.5b", arch: str = "qwen2") -> list[WorkloadModel]:
    """"4x7b,6x1.5b" -> qwen2-7b-0..3, qwen2-1.5b-0..5 (an entry may name its arch: "2xllama:8b")."""
    out = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        count, _, what = part.partition("x") if "x" in part.split(":")[0] else ("1", "", part)
        a, _, size = what.partition(":") if ":" in what else (arch, "", what)
        out += [WorkloadModel(f"{a}-{size}-{i}", a, size) for i in range(int(count))]
    if not out:
        raise ValueError(f"no models in {spec!r}")
    return out


def _lognormal(rng: random.Random, mean: float, sigma: float) -> float:
    return rng.lognormvariate(math.log(mean) - sigma * sigma / 2.0, sigma)


def generate(models: list[str], rate: float | dict[str, float], duration: float, seed: int = 0,
             mean_prompt: float = 256.0, mean_output: float = 256.0, sigma: float = 1.0,
             max_context: int = 4096) -> list[WorkItem]:
    """Requests arriving in [0, duration), sorted by time. `rate`: requests/s per model (or per-model dict)."""
    items = []
    for model in models:
        r = rate[model] if isinstance(rate, dict) else rate
        if r <= 0:
            continue
        rng = random.Random(f"{seed}:{model}")
        t_unit, k = 0.0, 0
        while True:
            t_unit += rng.expovariate(1.0)
            p = max(1, min(max_context - 2, int(round(_lognormal(rng, mean_prompt, sigma)))))
            o = max(1, min(max_context - p - 1, int(round(_lognormal(rng, mean_output, sigma)))))
            t = t_unit / r
            if t >= duration:
                break
            items.append(WorkItem(t, model, p, o, f"{model}#{k}"))
            k += 1
    items.sort(key=lambda w: (w.time, w.id))
    return items


def write_jsonl(items: list[WorkItem], path: str | Path) -> None:
    with open(path, "w") as f:
        for w in items:
            f.write(json.dumps(asdict(w)) + "\n")


def read_jsonl(path: str | Path) -> list[WorkItem]:
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                out.append(WorkItem(float(d["time"]), d["model"], int(d["prompt_len"]), int(d["output_len"]),
                                    str(d["id"])))
    return out


@functools.lru_cache(maxsize=64)
def spec_for(arch: str, size: str, name: str | None = None):
    """The cost model's ModelSize of a real-size model (bf16), from the model factory's shapes."""
    from controller.model_factory import model_config
    from model_swapper.model_config import ModelConfig
    from token_scheduler.cost_model import ModelSize

    cfg = ModelConfig.from_hf(model_config(arch, size))
    return ModelSize.from_config(name or f"{arch}-{size}", cfg)
