"""A cold model's extra registration given back by the autoscaler is never its only ready one while the others still
load (make before break). It gave back the registration that served -- the one on the engine busiest with other
models -- as "an extra registration went cold", leaving the model one still loading (on a worker that had just
joined again: it never became ready, and the model's requests waited on it)."""

from __future__ import annotations

from controller.autoscaler import Autoscaler, ModelLoad
from controller.config import AutoscalerSettings
from controller.router import EngineView, ModelInfo, ReplicaView

GB = 1 << 30


def _cold_ticks(engines: list[EngineView], ticks: int = 3) -> list[tuple[str, str]]:
    a = Autoscaler(AutoscalerSettings(up_ticks=1, down_ticks=2))
    load = ModelLoad(ModelInfo("m", GB), 1, 3, 0, 4)  # min 1, no request: cold
    out = []
    for _ in range(ticks):
        out += [(x.kind, x.engine_id) for x in a.plan([load], engines) if x.model == "m"]
    return out


def test_the_only_ready_registration_stays_while_the_other_loads():
    # e0 serves m (ready) and is the busier engine (another model's requests): the victim the busiest-engine rule picks
    serving = EngineView("e0", 10 * GB, {"m": ReplicaView("m", True, 4),
                                         "x": ReplicaView("x", True, 4, (5, 5))})
    loading = EngineView("e1", 10 * GB, {"m": ReplicaView("m", False, 4)})
    acts = _cold_ticks([serving, loading])
    assert ("unload", "e0") not in acts, acts
    assert acts == [("unload", "e1")], acts  # the extra that goes is the one still loading


def test_with_two_ready_the_busiest_engines_registration_still_goes():
    serving = EngineView("e0", 10 * GB, {"m": ReplicaView("m", True, 4),
                                         "x": ReplicaView("x", True, 4, (5, 5))})
    other = EngineView("e1", 10 * GB, {"m": ReplicaView("m", True, 4)})
    assert _cold_ticks([serving, other]) == [("unload", "e0")]
