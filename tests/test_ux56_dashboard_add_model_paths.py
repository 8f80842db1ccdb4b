"""The dashboard's Add a model form (POST /admin/models) with a path as an operator types it: "~/models/x" was
refused ("path ~/models/x does not exist": no `~` expansion, where a configuration file's paths have it), and a
relative path was kept as given, for each worker to read from its own working directory. Both are made absolute
against the server's home and working directory, as a configuration's are against its file."""

from __future__ import annotations

import shutil

from fastapi.testclient import TestClient

from controller.app import build_app
from controller.config import ServerConfig
from controller.keys import hash_key

ADMIN = "admin-ux56-add-model-paths"
H = {"Authorization": f"Bearer {ADMIN}"}


def test_a_path_with_tilde_or_relative_is_made_absolute(tmp_path, monkeypatch, tiny_model):
    home, work = tmp_path / "home", tmp_path / "work"
    shutil.copytree(tiny_model, home / "models" / "tiny")
    shutil.copytree(tiny_model, work / "models" / "tiny2")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    app = build_app(ServerConfig(admin_token_hash=hash_key(ADMIN), models=[]))
    with TestClient(app) as c:
        r = c.post("/admin/models", headers=H, json={"name": "a", "path": "~/models/tiny"})
        assert r.status_code == 201, r.text
        assert r.json()["path"] == str(home / "models" / "tiny")
        r = c.post("/admin/models", headers=H, json={"name": "b", "path": "models/tiny2",
                                                     "engine": {"max_model_len": 10**6}})
        assert r.status_code == 201, r.text
        assert r.json()["path"] == str(work / "models" / "tiny2")
        # (bounded by the model's positions, as an absolute path's is)
        assert r.json()["max_model_len"] < 10**6
        r = c.post("/admin/models", headers=H, json={"name": "c", "path": "models/nowhere"})
        assert r.status_code == 400 and str(work / "models" / "nowhere") in r.json()["error"]["message"], r.text
