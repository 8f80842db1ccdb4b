"""`vllm serve`'s flags a user copies that have no `tokenpool serve` flag were "No such option": each is now one
line saying what stands for it here (a configuration's engine option, the model's dtype, its own chat template),
exit 2, before anything starts; vLLM's log switches are taken (this server logs no line per request)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from controller import serve as serve_mod
from controller.cli import app


@pytest.mark.parametrize("args, says", [
    (["--quantization", "awq"], "--quantization and --kv-cache-dtype are vLLM's: here a model's weights and KV cache "
                                "are in its dtype (--dtype auto, bf16, fp16 or fp32), not quantized"),
    (["--kv-cache-dtype", "fp8"], "--quantization and --kv-cache-dtype are vLLM's"),
    (["--chat-template", "t.jinja"], "--chat-template is vLLM's: here a model's chat template is its own"),
    (["--block-size", "32"], "--block-size and --num-gpu-blocks-override are vLLM's: here every model's KV cache is "
                             "the pool's, one region per GPU sized by gpus.kv_cache_gb in a --config file"),
    (["--num-gpu-blocks-override", "512"], "here every model's KV cache is the pool's"),
], ids=["quantization", "kv-cache-dtype", "chat-template", "block-size", "num-gpu-blocks-override"])
def test_vllm_flags_without_a_counterpart_say_what_stands_for_them(args, says, monkeypatch):
    monkeypatch.setattr(serve_mod, "serve", lambda **kw: pytest.fail("started"))
    r = CliRunner().invoke(app, ["serve", "some-model-dir", *args], env={"COLUMNS": "400"})
    assert r.exit_code == 2 and r.output.startswith("tokenpool serve: ") and says in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1


def test_vllm_log_switches_are_taken(monkeypatch, make_tiny):
    started = []
    monkeypatch.setattr(serve_mod, "serve", lambda **kw: started.append(kw))
    r = CliRunner().invoke(app, ["serve", str(make_tiny("qwen2")), "--disable-log-requests", "--disable-log-stats"],
                           env={"COLUMNS": "200"})
    assert r.exit_code == 0 and len(started) == 1, r.output
