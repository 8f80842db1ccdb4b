"""A worker's stats never read the engines' queues while the event loop changes them.

The snapshot (`Worker._snapshot`) runs on the step thread, but it was submitted there at any beat: queued behind a
step, it ran as soon as that step ended, while the event loop applied the messages that came meanwhile
(`_apply_pending`: adds, aborts) to the same queues. A 100,000-input /api/embed logged
`worker stats failed: RuntimeError('deque mutated during iteration')` five times (the pooled engine's snapshot
iterating a scheduler's waiting deque). Here the worker's own step loop and beat run a tiny CPU model while
thousands of requests are added and aborted, with beats far more often than a server's."""

from __future__ import annotations

import asyncio
import logging
import sys
import time

from controller import messages as m
from controller.config import EngineOptions
from tests.test_ctl53_kv_page import cpu_worker
from token_scheduler.policies.slo import ModelSLO
from token_scheduler.request import SamplingParams


def test_stats_taken_while_requests_are_added_and_aborted_never_fail(tiny_model, request, caplog):
    w = cpu_worker(tiny_model, request, "ux68k")
    opts = EngineOptions(max_num_seqs=2, max_model_len=64)
    w.models.prepare(str(tiny_model), opts)
    w.models.host("m", str(tiny_model), opts, ModelSLO(ttft_s=5.0, tpot_s=0.5))
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    w.models.add_request("m", "warm", [1, 2, 3], params)  # (its weights in, its first steps taken: steps are short)
    while w.models.busy():
        w.models.step()
    for i in range(3000):  # a long queue, as a large /api/embed leaves: a snapshot takes a while to read it
        w.models.add_request("m", f"q{i}", [1, 2, 3], params)
    sent: list[m.Message] = []
    w.send = sent.append  # type: ignore[method-assign]

    def taken() -> int:
        return sum(isinstance(x, m.Stats) for x in sent)

    async def body() -> None:
        tasks = [asyncio.create_task(w._step_loop()), asyncio.create_task(w._beat(0.001))]
        try:
            n, prev = 0, []
            t0 = time.monotonic()
            while time.monotonic() - t0 < 10 and (taken() < 20 or time.monotonic() - t0 < 0.5):
                batch = [f"r{n + i}" for i in range(50)]
                n += len(batch)
                w._pending += [m.NewRequest(rid, "m", [1, 2, 3], params) for rid in batch]
                w._pending.append(m.Abort(prev))  # (the batch before: the queue stays ~3,000 long)
                prev = batch
                w._wake.set()
                await asyncio.sleep(0.002)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # (the threads take turns often: an overlap, where there is one, is met)
    try:
        with caplog.at_level(logging.ERROR, logger="tokenpool.worker"):
            asyncio.run(body())
    finally:
        sys.setswitchinterval(switch)
    failed = [r.getMessage() for r in caplog.records if "stats failed" in r.getMessage()]
    assert not failed, failed
    assert taken() >= 20
