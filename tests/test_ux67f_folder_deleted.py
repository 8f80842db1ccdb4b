"""A model folder deleted while it is served: the model serves on from the host copy its worker holds; a worker that
starts afresh (the old one killed) cannot load it, and the 503 (and `/admin/models`' load_error) said the folder "has
no config.json (not a Hugging Face model directory)", as if it were not a model. It says the folder does not exist."""

from __future__ import annotations

import os
import shutil
import signal
import time

import httpx
import openai

from controller.keys import hash_key
from tests import ports

ADMIN = "admin-ux67f-folder-token"

PORTS = range(30000, 30050)


def _chat(url: str):
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
    return c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)


def test_a_deleted_model_folder_is_said_to_be_gone(tmp_path, make_tiny):
    folder = tmp_path / "m"
    shutil.copytree(make_tiny("qwen2"), folder)
    cfg = {"admin_token_hash": hash_key(ADMIN), "workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "models": [{"name": "m", "path": str(folder), "engine": {"max_num_seqs": 2, "max_model_len": 64}}]}
    with ports.live_server_on(PORTS, cfg, tmp_path / "work") as srv:
        assert _chat(srv.url).choices[0].finish_reason == "length"
        shutil.move(folder, tmp_path / "moved")
        assert _chat(srv.url).choices[0].finish_reason == "length"  # (its host copy serves on)
        adm = {"Authorization": f"Bearer {ADMIN}"}
        pid = next(e["pid"] for e in httpx.get(srv.url + "/admin/engines", headers=adm, timeout=10).json())
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:
            try:
                _chat(srv.url)
            except openai.APIStatusError as e:
                if e.status_code == 503 and e.code == "model_load_failed":
                    assert f"{folder} does not exist" in e.message, e.message
                    assert "config.json" not in e.message, e.message
                    break
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.2)
