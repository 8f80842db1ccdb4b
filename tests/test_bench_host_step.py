"""`load_tests.bench_host_step` (host time per pooled step on CPU) runs both ways: its wrappers stand in for
`ModelRunner`'s methods, so a change of their signatures breaks the tool, as `launch_decode(timed=...)` did
unnoticed until a session ran it with TOKENPOOL_PIPELINE=1."""

from __future__ import annotations

import pytest

from load_tests import bench_host_step
from token_scheduler import multi_engine
from token_scheduler.runner import ModelRunner


@pytest.mark.parametrize("pipeline", [False, True], ids=["pipeline_off", "pipeline_on"])
def test_host_step_bench_runs_and_pipelines(monkeypatch, model_cache, pipeline):
    monkeypatch.setattr(multi_engine, "PIPELINE", pipeline)
    methods = (ModelRunner.execute, ModelRunner.launch_decode, ModelRunner.read)
    out = bench_host_step.run("2x7b,3x1.5b", steps=40, rounds=1, warmup=40, device_ms=1.0, cache_dir=model_cache)
    assert (ModelRunner.execute, ModelRunner.launch_decode, ModelRunner.read) == methods  # put back
    med = out["median"]
    assert out["pipeline"] is pipeline
    # steps ran and the emulated device's time is left out of the host's (a step lasts at least its 1 ms)
    assert med["wall_us"] >= 1000 and 0 < med["host_us"] < med["wall_us"]
    assert out["engine"]["steps"] >= 80
    if pipeline:
        assert med["pipelined_frac"] > 0  # decodes were queued before the step before was read
    else:
        assert med["pipelined_frac"] == 0
