"""`tokenpool serve DIR --served-model-name main alt`, as vLLM takes it (argparse's nargs="+"): `alt` is an alias of
DIR's model. It was read as a second MODEL_DIR ('path .../alt does not exist'); only the option repeated worked. A
word after the names that is a path on disk stays a MODEL_DIR, as `--served-model-name NAME DIR` always read."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from controller import serve as serve_mod
from controller.cli import app, served_names_as_vllm


@pytest.fixture
def started(monkeypatch):
    """`tokenpool serve ...` checked as it is before a start, the start itself (serve.serve) only recorded."""
    got: list[dict] = []
    monkeypatch.setattr(serve_mod, "serve", lambda **kw: got.append(kw))

    def run(*args: str):
        r = CliRunner().invoke(app, ["serve", *args], env={"COLUMNS": "200"})
        return r, got[-1] if got else None
    return run


def test_vllm_names_after_one_option_are_the_model_and_its_aliases(started, make_tiny):
    d = str(make_tiny("qwen2"))
    r, kw = started(d, "--served-model-name", "main", "alt-name", "other", "--port", "0")
    assert r.exit_code == 0, r.output
    assert kw["served_model_names"] == ["main", "alt-name", "other"] and kw["model_dirs"] == [make_tiny("qwen2")]
    assert kw["port"] == 0
    (spec,) = serve_mod.model_specs(kw["model_dirs"], kw["served_model_names"])
    assert (spec.name, spec.aliases) == ("main", ["alt-name", "other"])
    r, kw = started(d, "--served-model-name=main", "alt-name")  # (the option's = form)
    assert r.exit_code == 0 and kw["served_model_names"] == ["main", "alt-name"], r.output


def test_a_model_dir_after_the_names_is_still_a_model_dir(started, make_tiny):
    a, b = make_tiny("qwen2"), make_tiny("llama")
    r, kw = started("--served-model-name", "one", str(a))  # (the form that always worked)
    assert r.exit_code == 0 and (kw["model_dirs"], kw["served_model_names"]) == ([a], ["one"]), r.output
    r, kw = started(str(a), "--served-model-name", "one", str(b), "--served-model-name", "two")
    assert r.exit_code == 0 and (kw["model_dirs"], kw["served_model_names"]) == ([a, b], ["one", "two"]), r.output
    r, kw = started(str(a), str(b), "--served-model-name", "one", "two")  # (two folders, their two names)
    assert r.exit_code == 0 and (kw["model_dirs"], kw["served_model_names"]) == ([a, b], ["one", "two"]), r.output


def test_only_the_words_right_after_the_option_are_names():
    assert served_names_as_vllm(["--port", "8000", "--served-model-name", "a", "b", "--dtype", "fp32", "c"]) == \
        ["--port", "8000", "--served-model-name", "a", "--served-model-name", "b", "--dtype", "fp32", "c"]
    assert served_names_as_vllm(["--served-model-name", "a", "--", "b"]) == ["--served-model-name", "a", "--", "b"]


def test_names_without_a_model_dir_say_so(started):
    r, kw = started("--served-model-name", "main", "alt-name")
    assert kw is None and r.exit_code == 2
    assert r.output.strip() == "tokenpool serve: --served-model-name names the MODEL_DIR arguments; none were given"
