"""`tokenpool run` as `ollama run` words it:

- `--verbose` printed `time to first token` where `ollama run --verbose` prints Ollama's lines (its Metrics.Summary:
  total duration, load duration, prompt eval count, prompt eval duration, prompt eval rate, eval count, eval
  duration, eval rate): they are now the server's own, from its Ollama /api/chat reply, the client's first-token
  wait after them;
- a model not served said "The model `nope` does not exist."; Ollama says `model "nope" not found, try pulling it
  first`, and nothing is pulled here, so the line names what is served (a few, with how many more).
"""

from __future__ import annotations

import copy

import pytest
from typer.testing import CliRunner

from controller import chat_cli
from controller.cli import app
from load_tests import faults
from tests import ports

OLLAMA_LINES = ["total duration", "load duration", "prompt eval count", "prompt eval duration", "prompt eval rate",
                "eval count", "eval duration", "eval rate"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = faults.paced_config(pace_s=0.002)
    del cfg["admin_token_hash"], cfg["tenants"]
    cfg["workers"]["standby"] = False
    second = copy.deepcopy(cfg["models"][0])
    second["name"] = "pace-b"
    cfg["models"].append(second)
    with ports.live_server_on(range(24800, 24900), cfg, tmp_path_factory.mktemp("ux58f-run")) as srv:
        yield srv


def test_verbose_prints_ollamas_lines(server):
    r = CliRunner().invoke(app, ["run", "pace", "hi", "--verbose", "--max-tokens", "6", "--url", server.url])
    assert r.exit_code == 0, r.output
    labels = [line.split(":")[0] for line in r.output.splitlines() if ":" in line]
    # (as Ollama's: a line only where its value is above 0; a model loaded already may have waited for no load)
    assert labels in (OLLAMA_LINES + ["time to first token"],
                      [x for x in OLLAMA_LINES if x != "load duration"] + ["time to first token"]), r.output
    assert "eval count:           6 token(s)" in r.output, r.output
    assert "prompt eval rate:" in r.output and r.output.split("eval rate:")[-1].strip().split()[1] == "tokens/s"


def test_a_model_not_served_is_said_as_ollama_says_it_with_what_is_served(server):
    r = CliRunner().invoke(app, ["run", "nope", "hi", "--url", server.url])
    assert (r.exit_code, r.output) == (1, 'tokenpool run: model "nope" not found; served: pace, pace-b\n'), r.output
    r = CliRunner().invoke(app, ["run", "nope", "--url", server.url], input="hi\n")  # (a conversation: the same)
    assert r.exit_code == 1 and 'model "nope" not found; served: pace, pace-b' in r.output, r.output


def test_many_models_are_cut_short(monkeypatch):
    monkeypatch.setattr(chat_cli, "models", lambda url, key: [{"id": f"m{i}"} for i in range(12)])
    assert chat_cli.not_served("http://h", None, "nope") == \
        'model "nope" not found; served: m0, m1, m2, m3, m4 and 7 more (tokenpool ls)'
    monkeypatch.setattr(chat_cli, "models", lambda url, key: [])
    assert chat_cli.not_served("http://h", None, "nope") == 'model "nope" not found; the server serves no model'
