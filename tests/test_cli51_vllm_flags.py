"""`vllm serve`'s spellings a user copies: `--model DIR` (was "No such option: --model") is a MODEL_DIR, and
`--enable-auto-tool-choice --tool-call-parser hermes` (vLLM's tool-calling line; was "No such option") is taken, the
switch alone refused as vLLM refuses it. Checked before a server starts (one line, exit 2)."""

from __future__ import annotations

from typer.testing import CliRunner

from controller.cli import app


def _serve(*args: str):
    return CliRunner().invoke(app, ["serve", *args], env={"COLUMNS": "200"})


def test_model_option_is_a_model_dir(tmp_path):
    r = _serve("--model", str(tmp_path / "nope"))
    assert (r.exit_code, r.output.strip()) == (2, f"tokenpool serve: path {tmp_path / 'nope'} does not exist"), \
        r.output


def test_enable_auto_tool_choice_is_taken_with_its_parser(tmp_path):
    r = _serve(str(tmp_path / "nope"), "--enable-auto-tool-choice", "--tool-call-parser", "hermes")
    assert (r.exit_code, r.output.strip()) == (2, f"tokenpool serve: path {tmp_path / 'nope'} does not exist"), \
        r.output  # (taken: what stops this start is the folder, not the flag)
    r = _serve(str(tmp_path / "nope"), "--enable-auto-tool-choice")
    assert r.exit_code == 2 and r.output.strip().startswith(
        "tokenpool serve: --enable-auto-tool-choice takes --tool-call-parser"), r.output
