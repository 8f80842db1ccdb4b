"""A worker step that launches more than once (a worker hosting two engine kinds, a pooled model and a paced one,
steps both in one step) hands the previous step's outputs on once: they were emitted once per launch, so every
token went to the client twice while both kinds had requests."""

from __future__ import annotations

import asyncio

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
