"""Paced models' turns are on the worker's timeline, as the pooled engine's are: the dashboard's "which model ran"
strip was empty while only paced models ran."""

from __future__ import annotations

from token_scheduler.pace import PaceConfig, PacedModels
from token_scheduler.request import SamplingParams


def test_paced_models_turns_are_on_the_timeline():
    pm = PacedModels()
    for name in ("a", "b"):
        pm.add_model(name, PaceConfig(s_per_token=0.001))
    pm.add_request("r1", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True), model="a")
    for _ in range(10):
        pm.step()
    pm.add_request("r2", [1, 2], SamplingParams(max_tokens=2, ignore_eos=True), model="b")
    for _ in range(10):
        pm.step()
    tl = list(pm.timeline)
    assert [(t[1], t[2]) for t in tl] == [("a", 3), ("b", 2)]
    assert all(t[3] > 0 for t in tl) and tl[0][0] <= tl[1][0]
