"""A served model's engine draws its KV cache from the pool's one region (gpus.kv_cache_gb), in pages the pool sizes:
a model's engine.block_size, num_kv_blocks and kv_cache_memory_gb were accepted and documented, and sized nothing.
They are refused now, saying what sizes the KV here (the config, the admin API, the PooledModel builder, `tokenpool
serve --block-size`); vLLM's --seed and --max-num-batched-tokens, which a pooled engine does honor, are serve flags."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from typer.testing import CliRunner

from controller import serve as serve_mod
from controller.app import build_app
from controller.cli import app
from controller.config import ServerConfig
from controller.keys import hash_key
from controller.operator import builders as b
from controller.startup import validation_line

SAYS = "every served model's KV cache is the pool's, one region sized by gpus.kv_cache_gb"


@pytest.mark.parametrize("key, value", [("block_size", 16), ("num_kv_blocks", 64), ("kv_cache_memory_gb", 4)])
def test_a_models_own_kv_sizing_is_refused_naming_the_pools(key, value):
    with pytest.raises(ValidationError) as e:
        ServerConfig.model_validate({"models": [{"name": "m", "path": "/m", "engine": {key: value}}]})
    line = validation_line(e.value)
    assert line.startswith(f"models.0.engine.{key}: not a model's setting here") and SAYS in line, line


def test_the_admin_api_refuses_it_with_a_400():
    admin = "eng53-admin"
    c = TestClient(build_app(ServerConfig(admin_token_hash=hash_key(admin), models=[])))  # (no lifespan: no workers)
    r = c.post("/admin/models", headers={"Authorization": f"Bearer {admin}"},
               json={"name": "m", "path": "/m", "engine": {"kv_cache_memory_gb": 4}})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and SAYS in err["message"], err
    assert "kv_cache_memory_gb" in (err["param"] or "") + err["message"], err


def test_a_pooled_models_kv_cache_memory_gb_is_no_engine_option():
    """Dropped from the CRD (an old resource's value is pruned by its structural schema); a spec that has it still
    makes the controller's model, without it (it used to map onto kv_cache_memory_gb, which sized nothing)."""
    body = b.build_model_spec("m", {"source": {"path": "m"}, "engine": {"maxNumSeqs": 8, "kvCacheMemoryGB": 8}})
    assert body["engine"]["max_num_seqs"] == 8 and body["engine"]["kv_cache_memory_gb"] is None


def _model_dir(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "qwen2"}')
    return model


def test_serve_seed_and_max_num_batched_tokens_set_the_model_dirs_engines(tmp_path):
    cfg, _ = serve_mod.prepare(None, None, None, [_model_dir(tmp_path)], seed=7, max_num_batched_tokens=512)
    assert (cfg.models[0].engine.seed, cfg.models[0].engine.max_num_batched_tokens) == (7, 512)


def test_serve_cli_passes_seed_and_max_num_batched_tokens(tmp_path, monkeypatch):
    got = []
    monkeypatch.setattr(serve_mod, "serve", lambda **kw: got.append(kw))
    r = CliRunner().invoke(app, ["serve", str(_model_dir(tmp_path)), "--seed", "7", "--max-num-batched-tokens", "512"])
    assert r.exit_code == 0 and (got[0]["seed"], got[0]["max_num_batched_tokens"]) == (7, 512), r.output


def test_serve_block_size_says_the_pool_sizes_kv(monkeypatch):
    monkeypatch.setattr(serve_mod, "serve", lambda **kw: pytest.fail("started"))
    r = CliRunner().invoke(app, ["serve", "some-model-dir", "--block-size", "16"], env={"COLUMNS": "400"})
    assert r.exit_code == 2 and r.output.startswith("tokenpool serve: --block-size"), r.output
    assert "gpus.kv_cache_gb" in r.output and "engine.block_size" not in r.output, r.output


def test_a_gpu_pools_kv_cache_gb_sizes_its_workers_kv_region():
    """What stands for kvCacheMemoryGB on Kubernetes: the pool's KV region, each worker's --kv-cache-gb."""
    (c,) = b.build_worker_daemonset("a", "ns", {"kvCacheGB": 8})["spec"]["template"]["spec"]["containers"]
    assert c["command"][-2:] == ["--kv-cache-gb", "8"]
    (c,) = b.build_worker_daemonset("a", "ns", {})["spec"]["template"]["spec"]["containers"]
    assert "--kv-cache-gb" not in c["command"]  # (unset: the controller's gpus.kv_cache_gb, else its default)
