"""A standby that takes over while its warm-up is still importing loads no model until the warm-up is done.

Seen live (the embedded default, the slot's worker SIGKILLed a second after it joined): the spare was told "go"
while its warm-up thread was still importing transformers, and the load thread's own `from transformers import
AutoConfig` ran beside it; transformers' lazy module came back half made and every model failed to register
("ImportError: cannot import name 'AutoConfig' from 'transformers'") until the controller's retry minutes later.
Imports done on two threads at once are not safe for such packages, so a load waits for the warm-up."""

from __future__ import annotations

import asyncio
import io
import threading
import time

from controller import messages as m
from controller import worker as worker_mod
from controller.config import EngineOptions
from controller.hosting import HostedModels
from controller.worker import Worker
from load_tests.worker_harness import FakeController, with_worker

PACE = EngineOptions(kind="pace", pace_s_per_token=0.001, max_model_len=64)


def test_a_load_after_takeover_waits_for_the_warm_up(monkeypatch, tiny_model):
    warmed, release = threading.Event(), threading.Event()

    def slow_warm_up(device: str) -> None:  # the imports, still under way when the takeover comes
        release.wait(60)
        warmed.set()

    seen: list[bool] = []
    real_prepare = HostedModels.prepare

    def prepare(self, path, opts):
        seen.append(warmed.is_set())
        return real_prepare(self, path, opts)

    monkeypatch.setattr(worker_mod, "warm_up", slow_warm_up)
    monkeypatch.setattr(worker_mod, "_warming", None)  # (standby() sets these module globals: restored after)
    monkeypatch.setattr(worker_mod, "_promoted_at", None)
    monkeypatch.setattr(HostedModels, "prepare", prepare)
    monkeypatch.setattr("sys.stdin", io.StringIO("go\n"))
    t0 = time.monotonic()
    assert worker_mod.standby("cpu")  # "go" comes at once: the takeover does not wait for the warm-up
    assert time.monotonic() - t0 < 10 and not warmed.is_set()

    async def body(ctl: FakeController, worker: Worker) -> None:
        ctl.send(m.LoadModel("bare", None, PACE))  # a paced model without a tokenizer imports nothing: no wait
        assert (await asyncio.wait_for(ctl.expect(m.ModelLoaded), 30)).ok
        ctl.send(m.LoadModel("a", str(tiny_model), PACE))  # its tokenizer: transformers
        threading.Timer(1.0, release.set).start()  # the warm-up ends a second later: the load waits for it
        assert (await asyncio.wait_for(ctl.expect(m.ModelLoaded), 30)).ok

    try:
        asyncio.run(with_worker(body))
    finally:
        release.set()
    assert seen == [False, True], seen
