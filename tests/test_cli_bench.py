"""`bench pool` and `bench serve` take the workload's options from one declaration (controller/cli.py `Workload`):
the same names, defaults and help in both, handed to the replay functions as before."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from controller.cli import app


@pytest.fixture
def calls(monkeypatch):
    import load_tests.bench_pool as bp
    import load_tests.bench_pool_real as bpr
    import load_tests.bench_serve as bs

    seen = {}
    for mod, fn in ((bp, "run_bench_pool"), (bpr, "run_real"), (bs, "run_serve")):
        monkeypatch.setattr(mod, fn, lambda fn=fn, **kw: seen.setdefault(fn, kw))
    return seen


WORKLOAD = {"models": "4x7b,6x1.5b", "duration": 120.0, "slo_ttft": 10.0, "slo_tpot": 0.1}


def test_bench_commands_hand_the_workload_to_the_replay(calls):
    r = CliRunner()
    assert r.invoke(app, ["bench", "pool", "--seed", "3"]).exit_code == 0
    assert r.invoke(app, ["bench", "pool", "--real", "--rate", "0.1,0.2", "--models", "2x7b"]).exit_code == 0
    assert r.invoke(app, ["bench", "serve", "--duration", "30", "--slo-tpot", "0.2", "--device", "cpu"]).exit_code == 0
    sim, real, serve = calls["run_bench_pool"], calls["run_real"], calls["run_serve"]
    assert {k: sim[k] for k in WORKLOAD} == WORKLOAD and sim["rate"] == 0.1 and sim["seed"] == 3
    assert real["models"] == "2x7b" and real["rate"] == [0.1, 0.2] and real["duration"] == 120.0
    assert serve["duration"] == 30.0 and serve["slo_tpot"] == 0.2 and serve["rate"] == [0.1]
    assert serve["device"] == "cpu" and serve["policies"] == ["token"] and serve["admission"] is True


def test_bench_commands_show_the_workload_options_in_place():
    r = CliRunner()
    for cmd in ("pool", "serve"):
        out = r.invoke(app, ["bench", cmd, "--help"], env={"COLUMNS": "200"}).output
        at = [out.index(f"--{o} ") for o in ("models", "rate", "duration", "slo-ttft", "slo-tpot", "gpu-budget-gb")]
        assert at == sorted(at) and "seconds of arrivals" in out and "[default: 4x7b,6x1.5b]" in out
    res = r.invoke(app, ["bench", "pool", "--rate", "0.1,0.2"])  # simulated: one rate
    assert res.exit_code != 0 and "one --rate" in res.output


def test_bench_pool_names_a_bad_profile_instead_of_a_traceback(tmp_path):
    r = CliRunner()  # (the replay itself: it reads the profile before it simulates anything)
    res = r.invoke(app, ["bench", "pool", "--profile", "nosuch"], env={"COLUMNS": "200"})
    assert res.exit_code == 2 and "no profile 'nosuch'" in res.output and "served" in res.output
    bad = tmp_path / "p.json"
    bad.write_text("{not json")
    res = r.invoke(app, ["bench", "pool", "--profile", str(bad)], env={"COLUMNS": "200"})
    assert res.exit_code == 2 and "is not JSON" in res.output


def test_bench_pool_hands_a_named_profile_on(calls):
    assert CliRunner().invoke(app, ["bench", "pool", "--profile", "served"]).exit_code == 0
    assert calls["run_bench_pool"]["profile"] == "served"


def test_bench_serve_gpu_budget_on_the_cpu_is_the_cpu_workers_arena(calls):
    """`bench serve --device cpu --gpu-budget-gb 2` handed 2 to gpus.budget_gb, which a CPU worker never reads (its
    arena stayed 8 GB): the flag was ignored, as serve's was. On the CPU it is that worker's arena now; without it,
    each device keeps its default (cuda 60, cpu 8)."""
    r = CliRunner()
    assert r.invoke(app, ["bench", "serve", "--device", "cpu", "--gpu-budget-gb", "2"]).exit_code == 0
    assert calls.pop("run_serve")["cpu_budget_gb"] == 2.0
    assert r.invoke(app, ["bench", "serve", "--device", "cpu"]).exit_code == 0
    assert calls.pop("run_serve")["cpu_budget_gb"] == 8.0
    assert r.invoke(app, ["bench", "serve"]).exit_code == 0
    got = calls.pop("run_serve")
    assert got["gpu_budget_gb"] == 60.0 and got.get("cpu_budget_gb", 8.0) == 8.0
