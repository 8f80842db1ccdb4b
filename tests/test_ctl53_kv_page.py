"""A worker's KV pages are carved once, for the largest KV token of the models configured when it started: a model
added later over the admin API whose one token of KV is larger than that page could never load (its loads failed,
the why only in /health). The worker says its page (Stats.pool["kv_page_bytes"]), and the controller refuses such a
model at the POST, saying why and what to do; one that fits is registered as before."""

from __future__ import annotations

import dataclasses
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


def cpu_worker(path, request, prefix: str = "ctl53") -> Worker:
    """A CPU worker not connected to a controller, its models (`w.models`) configured for the model at `path` (its
    KV pages sized for it), ended with the test."""
    w = Worker(("127.0.0.1", 1), "cpu")
    request.addfinalizer(lambda: (w._step_thread.shutdown(), w._load_thread.shutdown()))
    w.models = HostedModels("cpu", GpuSettings(budget_bytes=64 * 2**20, kv_cache_gb=0.01,
                                               namespace=f"{prefix}-{uuid.uuid4().hex[:8]}",
                                               kv_elems_per_token=kv_elems_per_token(path)))
    request.addfinalizer(w.models.close)
    return w


def _page_of_a_worker_serving(path, request) -> int:
    """The KV page a CPU worker reports once it hosts the model at `path`, configured (its pages sized for it)."""
    w = cpu_worker(path, request)
    hm = w.models
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


def test_placement_leaves_out_the_engines_whose_pages_a_model_outgrows(make_tiny, tmp_path, request):
    """A model that fits some engines' KV pages and not others is registered (201), and placement -- the request
    path's and the autoscaler's (`ModelLoad.avoid`) -- never picks an engine whose pages it outgrows: a load there
    failed once, then backed off, before another engine was tried. The engine it fits is picked even where the
    other is the emptier."""
    from controller.router import place

    small = make_tiny("qwen2")
    page = _page_of_a_worker_serving(small, request)
    large = tmp_path / "large"
    shutil.copytree(small, large)
    cfg = json.loads((large / "config.json").read_text())
    cfg["num_hidden_layers"] *= 20
    cfg.pop("layer_types", None)
    (large / "config.json").write_text(json.dumps(cfg))
    need = kv_elems_per_token(large) * 4

    app = build_app(ServerConfig(models=[], admin_token_hash=hash_key(ADMIN)))
    ctl = app.state.controller
    for eid, slot, mem, pg in (("w0", 0, 4 * 10**9, page), ("w1", 1, 10**9, need)):  # w0: more weight space
        e = EngineHandle(eid, slot, "cpu", "node", 1, mem, _Closed())
        e.pool = {"kv_page_bytes": pg}
        ctl.pool.engines[eid] = e
    c = TestClient(app, headers={"Authorization": f"Bearer {ADMIN}"})
    for name, path in (("large", large), ("small", small)):  # (each registered, then placed at once: a minimum of 1)
        assert c.post("/admin/models", json={"name": name, "path": str(path)}).status_code == 201
    on = {eid: set(e.replicas) for eid, e in ctl.pool.engines.items()}
    assert "large" in on["w1"] and "large" not in on["w0"], on
    assert ctl._avoid("large") == frozenset({"w0"}) and ctl._avoid("small") == frozenset()
    loads = {ml.info.name: ml for ml in ctl._loads(ctl.views())}
    assert loads["large"].avoid == frozenset({"w0"}) and loads["small"].avoid == frozenset()
    # the request path's placement (its registration gone from w1): w1 again, not the emptier w0
    views = [dataclasses.replace(v, replicas={}) for v in ctl.views()]
    assert place(ctl.models["large"].info, views, ctl.infos()).engine_id == "w0"  # (without the pages' rule)
    assert place(ctl.models["large"].info, views, ctl.infos(), exclude=ctl._avoid("large")).engine_id == "w1"
