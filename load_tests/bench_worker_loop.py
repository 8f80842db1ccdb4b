"""The worker's step loop on CPU: wall time per step, and how much of it is not the model's forward.

    python -m load_tests.bench_worker_loop [--model DIR] [--streams 32] [--tokens 64] [--rounds 3] [--device-ms 0]

A real `controller.worker.Worker` against an in-process controller end (load_tests/worker_harness.py), hosting one
model of kind "llm" (a tiny one made by the model factory unless --model), `--streams` greedy requests of
`--tokens` tokens each at once (EOS ignored; half of them with a stop string that never matches, so the
detokenizer holds text back as it does for a real stop string). Reported per worker step, median of the rounds:
`wall_ms` (the loop's period), `forward_ms` (inside the runner: the model and its sampling, the GPU's share
on a GPU) and `host_ms` = wall - forward, the time a GPU would wait for the host between two steps on this
path. `--device-ms`: every forward also waits this long with the GIL released, from its launch, as the host does
while a GPU computes (a tiny model's CPU forward is mostly Python holding the GIL, so nothing could run beside
it); host work in the forward's `on_launch` overlaps the wait (from session 14 on; before, the wait followed the whole
forward, so earlier figures are not comparable). On 2 shared cores the figures are noisy: compare medians of
alternating runs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from controller import messages as m
from controller.config import EngineOptions
from controller.worker import Worker
from load_tests.worker_harness import FakeController, with_worker
from token_scheduler.request import SamplingParams
from token_scheduler.runner import ModelRunner


def _timed_forward(device_s: float) -> list[float]:
    """Sum the device's share of the runner's execute calls into the returned cell: the CPU forward and sampling
    (a GPU's work) and `device_s` of GIL-free waiting that starts at the launch (`on_launch`), as a GPU computes
    while the host goes on. Host work done in `on_launch` (the worker's emits of the step before, the pooled
    engine's early plan with TOKENPOOL_PLAN_AHEAD=1) overlaps that wait: it counts as host time only where it
    outlasts it."""
    cell = [0.0]
    execute = ModelRunner.execute

    def timed(self, out, on_launch=None):
        t = time.perf_counter()
        hook_s = [0.0]

        def hook():
            h = time.perf_counter()
            if on_launch is not None:
                on_launch()
            hook_s[0] = time.perf_counter() - h

        try:
            return execute(self, out, hook)
        finally:
            if device_s > hook_s[0]:
                time.sleep(device_s - hook_s[0])
            cell[0] += time.perf_counter() - t - max(hook_s[0] - device_s, 0.0)

    ModelRunner.execute = timed
    return cell


async def _round(ctl: FakeController, worker: Worker, r: int, streams: int, tokens: int, forward: list[float]
                 ) -> dict:
    steps0, fwd0 = worker.steps, forward[0]
    t0 = time.perf_counter()
    ctl.send(*(m.NewRequest(f"r{r}-{i}", "tiny", [1 + (i + j) % 50 for j in range(16)],
                            SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True,
                                           stop=["\x07never\x07"] if i % 2 else None))
               for i in range(streams)))
    done, got = set(), 0
    while len(done) < streams:
        for d in (await ctl.expect(m.Outputs, 60)).deltas:
            assert d.error is None, d
            got += len(d.token_ids)
            if d.finished:
                done.add(d.request_id)
    wall = time.perf_counter() - t0
    steps = worker.steps - steps0
    assert got == streams * tokens, got
    fwd = forward[0] - fwd0
    return {"steps": steps, "wall_ms": 1e3 * wall / steps, "forward_ms": 1e3 * fwd / steps,
            "host_ms": 1e3 * (wall - fwd) / steps}


def _run(model: Path, streams: int, tokens: int, rounds: int, device_s: float) -> list[dict]:
    forward = _timed_forward(device_s)
    runs: list[dict] = []

    async def body(ctl: FakeController, worker: Worker) -> None:
        ctl.send(m.LoadModel("tiny", str(model), EngineOptions(max_num_seqs=max(64, streams))))
        assert (await ctl.expect(m.ModelLoaded, 60)).ok
        await _round(ctl, worker, -1, streams, 8, forward)  # warm-up
        for r in range(rounds):
            runs.append(await _round(ctl, worker, r, streams, tokens, forward))

    asyncio.run(with_worker(body))
    return runs


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="model directory (default: a tiny qwen2, made here)")
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device-ms", type=float, default=0.0, help="GIL-free wait added to every forward")
    a = ap.parse_args(argv)
    model = a.model
    if model is None:
        from controller.model_factory import make_model

        model = Path(tempfile.gettempdir()) / "tokenpool-bench-worker-loop-qwen2-tiny"
        if not (model / "config.json").exists():
            make_model(arch="qwen2", size="tiny", out=model, seed=0, dtype="fp32", device="cpu", progress=False)
    runs = _run(model, a.streams, a.tokens, a.rounds, a.device_ms / 1e3)
    for r in runs:
        print({k: round(v, 3) for k, v in r.items()})
    med = {k: round(statistics.median(r[k] for r in runs), 3) for k in ("wall_ms", "forward_ms", "host_ms")}
    print(f"median per step over {a.rounds} rounds ({a.streams} streams x {a.tokens} tokens, device "
          f"{a.device_ms} ms): {med}")


if __name__ == "__main__":
    main()
