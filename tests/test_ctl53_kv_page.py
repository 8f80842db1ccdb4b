"""A worker's KV pages are carved once, for the largest KV token of the models configured when it started: a model
added later over the admin API whose one token of KV is larger than that page could never load (its loads failed,
the why only in /health). The worker says its page (Stats.pool["kv_page_bytes"]), and the controller refuses such a
model at the POST, saying why and what to do; one that fits is registered as before."""

from __future__ import annotations

import json
import shutil
import uuid

from fastapi.testclient import TestClient

from controller.app import build_app
from controller.config import EngineOptions, ServerConfig
from controller.hosting import GpuSettings, HostedModels
from controller.keys import hash_key
from controller.pool import EngineHandle
from controller.worker import Worker
from token_scheduler.policies.slo import ModelSLO
from tokenpool.models import kv_elems_per_token

ADMIN = "ctl53-admin-token"


class _Closed:
    def is_closing(self) -> bool:
        return True


def _page_of_a_worker_serving(path, request) -> int:
    """The KV page a CPU worker reports once it hosts the model at `path`, configured (its pages sized for it)."""
    w = Worker(("127.0.0.1", 1), "cpu")
    request.addfinalizer(lambda: (w._step_thread.shutdown(), w._load_thread.shutdown()))
    hm = w.models = HostedModels("cpu", GpuSettings(budget_bytes=64 * 2**20, kv_cache_gb=0.01,
                                                    namespace=f"ctl53-{uuid.uuid4().hex[:8]}",
                                                    kv_elems_per_token=kv_elems_per_token(path)))
    request.addfinalizer(hm.close)
    assert "kv_page_bytes" not in w._snapshot().pool  # (none carved before a model is registered)
    opts = EngineOptions(max_num_seqs=2, max_model_len=64)
    hm.prepare(str(path), opts)
    hm.host("small", str(path), opts, ModelSLO(ttft_s=5.0, tpot_s=0.5))
    page = w._snapshot().pool["kv_page_bytes"]
    assert page == hm.kinds["llm"].memory.page_bytes
    return page


def test_an_admin_added_model_whose_kv_token_outgrows_the_workers_pages_is_refused(make_tiny, tmp_path, request):
    small = make_tiny("qwen2")
    page = _page_of_a_worker_serving(small, request)
    large = tmp_path / "large"  # the same model with 20 times its layers: 20 times the KV a token
    shutil.copytree(small, large)
    cfg = json.loads((large / "config.json").read_text())
    cfg["num_hidden_layers"] *= 20
    cfg.pop("layer_types", None)
    (large / "config.json").write_text(json.dumps(cfg))
    need = kv_elems_per_token(large) * 4  # (fp32: a CPU worker's default dtype)
    assert need > page >= kv_elems_per_token(small) * 4

    app = build_app(ServerConfig(models=[], admin_token_hash=hash_key(ADMIN)))  # (no lifespan: no workers start; the engine below says its page)
    ctl = app.state.controller
    e = EngineHandle("w0", 0, "cpu", "node", 1, 10**9, _Closed())
    e.pool = {"kv_page_bytes": page}
    ctl.pool.engines["w0"] = e
    c = TestClient(app, headers={"Authorization": f"Bearer {ADMIN}"})
    r = c.post("/admin/models", json={"name": "large", "path": str(large)})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "kv_page_too_small" and err["param"] == "path", err
    assert f"{need} bytes" in err["message"] and f"{page} bytes" in err["message"], err
    assert "restart the server" in err["message"] and "configuration" in err["message"], err
    assert "large" not in ctl.models

    r = c.post("/admin/models", json={"name": "fits", "path": str(make_tiny("qwen3"))})  # (twice the small's KV)
    assert r.status_code == 201, r.text
    assert "fits" in ctl.models
    # an engine whose pages are not carved yet (none said) may carve them for it: not refused
    e.pool = {}
    r = c.post("/admin/models", json={"name": "large", "path": str(large)})
    assert r.status_code == 201, r.text
