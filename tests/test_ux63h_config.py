"""workers.dead_after_s against workers.heartbeat_s: a worker beats every heartbeat_s, and one silent for
dead_after_s is declared dead and killed. With heartbeat_s 5 and dead_after_s at its 3 s default, every worker was
killed 3 s after it registered, again and again, until one outlived its warm-up (three test files met it)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from controller.cli import app
from controller.config import WorkerSettings


def test_dead_after_follows_the_heartbeat_when_unset():
    assert WorkerSettings().dead_after_s == 3.0
    assert WorkerSettings(heartbeat_s=0.25).dead_after_s == 3.0  # 3 s at least
    assert WorkerSettings(heartbeat_s=5).dead_after_s == 30.0  # six beats
    assert WorkerSettings(heartbeat_s=5, dead_after_s=12).dead_after_s == 12  # set: kept


def test_dead_after_shorter_than_two_beats_is_refused():
    with pytest.raises(ValidationError, match=r"dead_after_s \(3 s\) must be at least two heartbeats \(heartbeat_s 5 s\)"):
        WorkerSettings(heartbeat_s=5, dead_after_s=3)
    WorkerSettings(heartbeat_s=0.5, dead_after_s=1.0)  # two beats: taken


def test_config_check_says_it_in_one_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("workers: {heartbeat_s: 5, dead_after_s: 3}\n")
    r = CliRunner().invoke(app, ["config", "check", str(f)], env={"COLUMNS": "300"})
    assert r.exit_code == 2 and r.output.startswith(f"tokenpool config check: config {f}: workers: dead_after_s (3 s) "
                                                    "must be at least two heartbeats"), r.output
