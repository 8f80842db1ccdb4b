"""`tokenpool suite corpus` (and the other parts) exited 0 whatever came out: a CI step running it passed with
cases failed (`as_expected < cases`). Now a failed check is a line on stderr and exit 1; all as expected (skipped
cases included) stays 0; each part's --help says the exit statuses. (The parts stubbed: the exit is the CLI's.)"""

from __future__ import annotations

import contextlib
import json

import pytest
from typer.testing import CliRunner

from controller.cli import app
from load_tests import faults

ROWS = [{"case": "empty body", "status": 400, "expected": 400, "ok": True},
        {"case": "bad json", "status": 200, "expected": 400, "ok": False}]


@pytest.fixture
def stubbed(monkeypatch):
    monkeypatch.setattr(faults, "target", lambda *a, **k: contextlib.nullcontext())
    got: dict = {}
    monkeypatch.setattr(faults, "run_corpus", lambda t: got["result"])
    monkeypatch.setattr(faults, "run_drops", lambda *a: got["result"])
    return got


def test_corpus_with_a_case_not_as_expected_exits_1(stubbed, tmp_path):
    stubbed["result"] = {"part": "corpus", "cases": 2, "as_expected": 1, "server_errors": 0, "results": ROWS}
    r = CliRunner().invoke(app, ["suite", "corpus", "--json", str(tmp_path / "c.json")])
    assert r.exit_code == 1, r.output
    assert "tokenpool suite corpus: failed: 1 of 2 cases not as expected: bad json" in r.output, r.output
    assert json.loads((tmp_path / "c.json").read_text())["as_expected"] == 1  # (the result is written first)


def test_corpus_all_as_expected_with_skips_exits_0(stubbed, tmp_path):
    stubbed["result"] = {"part": "corpus", "cases": 1, "as_expected": 1, "server_errors": 0, "results": ROWS[:1],
                         "skipped": [{"case": "no key", "skipped": "auth off"}]}
    r = CliRunner().invoke(app, ["suite", "corpus", "--json", str(tmp_path / "c.json")])
    assert r.exit_code == 0 and "failed" not in r.output, r.output


def test_other_parts_fail_on_their_checks(stubbed, tmp_path):
    stubbed["result"] = {"part": "drops", "back_to_zero_s": 0.1, "held_after": {},
                         "requests_after_ok": {"a": True, "b": False}}
    r = CliRunner().invoke(app, ["suite", "drops", "--url", "http://127.0.0.1:1", "--json", str(tmp_path / "d.json")])
    assert r.exit_code == 1 and "tokenpool suite drops: failed: not served after: b" in r.output, r.output
    stubbed["result"]["requests_after_ok"]["b"] = True
    r = CliRunner().invoke(app, ["suite", "drops", "--url", "http://127.0.0.1:1", "--json", str(tmp_path / "d.json")])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("part", ["corpus", "fuzz", "kill", "pooled-kill", "disconnects", "drops", "overload", "soak",
                                  "dashboards", "block"])
def test_help_says_the_exit_statuses(part):
    r = CliRunner().invoke(app, ["suite", part, "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "Exit status: 0 when every check came out as expected" in r.output, r.output
