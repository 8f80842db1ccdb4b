"""A worker step that launches more than once (a worker hosting two engine kinds, a pooled model and a paced one,
steps both in one step) hands the previous step's outputs on once: they were emitted once per launch, so every
token went to the client twice while both kinds had requests."""

from __future__ import annotations

import asyncio

import pytest

from controller.worker import Worker


class TwoKinds:
    """HostedModels' step surface: each step launches twice (one launch per kind's engine)."""

    def __init__(self, steps: int) -> None:
        self.n, self.steps = 0, steps

    def step_tokens(self, on_launch):
        on_launch()
        on_launch()
        self.n += 1
        return [f"step{self.n}"], True

    def busy(self) -> bool:
        return self.n < self.steps


def test_each_steps_outputs_are_emitted_once_when_two_kinds_launch_in_it():
    async def go():
        w = Worker(("127.0.0.1", 1), "cpu")
        w.models = TwoKinds(3)
        emitted: list = []
        w._emit_later = emitted.append
        loop = asyncio.get_running_loop()
        last, ran = await loop.run_in_executor(None, w._steps, loop, ["step0"])
        await asyncio.sleep(0.05)  # (the emits are handed to this loop)
        assert ran and last == ["step3"]
        assert emitted == [["step0"], ["step1"], ["step2"]]
        w._step_thread.shutdown(wait=False)
        w._load_thread.shutdown(wait=False)

    asyncio.run(go())


def test_a_crash_tells_its_requests_the_exceptions_type_not_its_text(monkeypatch, caplog):
    """An engine crash fails its requests with the exception's type; its text (which named a path of the server's
    here) goes to the log only."""
    import controller.worker as wk

    async def go():
        w = Worker(("127.0.0.1", 1), "cpu")
        w._owner = {7: object(), 9: object()}
        sent: list = []
        w.send = sent.append
        with pytest.raises(SystemExit):
            await w._crash("engine step failed", OSError("no file /srv/secret/model.safetensors"))
        w._step_thread.shutdown(wait=False)
        w._load_thread.shutdown(wait=False)
        return sent

    def exit_(code):
        raise SystemExit(code)

    monkeypatch.setattr(wk.os, "_exit", exit_)
    sent = asyncio.run(go())
    deltas = sent[0].deltas
    assert sorted(d.request_id for d in deltas) == [7, 9]
    assert all(d.error_kind == "engine" and d.error.startswith("engine failed (OSError") for d in deltas)
    assert not any("/srv/secret" in d.error for d in deltas)
    assert "/srv/secret" in caplog.text
