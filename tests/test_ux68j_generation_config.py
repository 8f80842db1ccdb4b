"""vLLM's `--generation-config` (helper ux68j, a vLLM user moving over): `auto` (vLLM's default) takes a model
folder's generation_config.json sampling values for the fields a request leaves out, `vllm` takes none, and a folder
takes that folder's file instead. `tokenpool serve DIR --generation-config vllm` was `No such option`; now the flag
and a model's `generation_config` key in a configuration (a relative folder: relative to the file) or an admin
API registration do as vLLM's."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
from typer.testing import CliRunner

from controller.cli import app
from controller.keys import hash_key
from controller.serve import prepare
from controller.startup import StartupError
from tests.ports import live_server_on

PORTS = range(30600, 30650)
ADMIN = "admin-ux68j-token"


@pytest.fixture(scope="module")
def folders(make_tiny, tmp_path_factory):
    """A tiny model whose generation_config.json recommends temperature 0.6 and top_k 20, and beside it a folder
    `other` with another generation_config.json (temperature 0.3)."""
    root = tmp_path_factory.mktemp("ux68j_gc")
    model = root / "model"
    shutil.copytree(make_tiny("qwen2"), model)
    (model / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_k": 20}))
    (root / "other").mkdir()
    (root / "other" / "generation_config.json").write_text(json.dumps({"temperature": 0.3}))
    return root


def test_each_source_gives_its_sampling_defaults(folders):
    model = str(folders / "model")
    cfg = {"admin_token_hash": hash_key(ADMIN), "workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "models": [{"name": "auto", "path": model, "engine": {"max_model_len": 64}},
                      {"name": "plain", "path": model, "generation_config": "vllm", "engine": {"max_model_len": 64}},
                      {"name": "other", "path": model, "generation_config": "../other",
                       "engine": {"max_model_len": 64}}]}
    work = folders / "work"
    with live_server_on(PORTS, cfg, work) as srv:  # (the config file is work/config.yaml: ../other is beside it)
        def params(name: str) -> list[str]:
            r = httpx.post(srv.url + "/api/show", json={"model": name}, timeout=30)
            assert r.status_code == 200, r.text
            return [line.split()[0:2] for line in r.json()["parameters"].splitlines()
                    if line.split()[0] in ("temperature", "top_k")]

        assert params("auto") == [["temperature", "0.6"], ["top_k", "20"]]
        assert params("plain") == []
        assert params("other") == [["temperature", "0.3"]]
        # the admin API's registration: a folder without the file is a 400 naming the field
        r = httpx.post(srv.url + "/admin/models", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30,
                       json={"name": "more", "path": model, "generation_config": str(folders / "nowhere")})
        assert (r.status_code, r.json()["error"]["param"]) == (400, "generation_config"), r.text


def test_the_flag_sets_the_model_dirs_source(folders):
    model = folders / "model"
    assert prepare(None, None, None, [model], ["m"])[0].models[0].generation_config == "auto"
    assert prepare(None, None, None, [model], ["m"], generation_config="vllm")[0].models[0].generation_config == "vllm"
    got = prepare(None, None, None, [model], ["m"], generation_config=str(folders / "other"))[0]
    assert got.models[0].generation_config == str(folders / "other")
    with pytest.raises(StartupError, match=r"--generation-config: .*nowhere is not auto, vllm or a folder with a "
                                           r"generation_config\.json"):
        prepare(None, None, None, [model], ["m"], generation_config=str(folders / "nowhere"))


def test_serve_takes_the_flag(caplog):
    """The option exists (no usage error): without a MODEL_DIR it is said to apply to them, as --seed is (in the log
    line, which pytest's logging takes where it is set up first)."""
    r = CliRunner().invoke(app, ["serve", "--generation-config", "vllm"], env={"COLUMNS": "300"})
    said = r.output + caplog.text
    assert r.exit_code == 2 and "--seed and --generation-config apply to the MODEL_DIR arguments" in said, said
