"""An engine's step time (`/admin/engines`' step_s, the dashboard's "step", `tokenpool ps`' engine line; the router's
and admission's estimate of a round) after an idle pause: the controller's own measure, the gaps between an engine's
output batches while it has requests, took the pause before a request as a gap. On the embedded default after a
few minutes of use, the CPU engine's step read 16.87 s (its models' own steps 0.07-0.19 s): 0.1 of each pause.
"""

from __future__ import annotations

import types

from controller import messages as m
from controller import pool as pool_mod
from controller.pool import EngineHandle, EnginePool


class _Writer:
    def is_closing(self) -> bool:  # (nothing is written)
        return True


def _sub(rid: str):
    return types.SimpleNamespace(rid=rid, model="x", prompt_ids=[1], params=None, attempts=0, engine_id=None,
                                 generated=0, done=False, sink=None)


def test_an_idle_pause_is_no_step(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(pool_mod.time, "monotonic", lambda: clock[0])
    pool = EnginePool.__new__(EnginePool)
    e = EngineHandle("w0", 0, "cpu", "h", 1, 0, _Writer())

    def request(rid: str, at: float, outputs: int) -> None:
        clock[0] = at
        pool.submit(e, _sub(rid))
        for i in range(outputs):
            clock[0] = at + 0.5 + 0.1 * i  # (its first output after a 0.5 s prefill, then a step each 0.1 s)
            pool._outputs(e, m.Outputs([]))
        e.subs.pop(rid)

    request("a", 1000.0, 5)
    assert abs(e.observed_step_s - 0.1) < 1e-6
    request("b", 1120.0, 5)  # (two minutes idle)
    assert abs(e.observed_step_s - 0.1) < 1e-6, e.observed_step_s
