"""A warm `tokenpool serve` (the default's models made already) on a 2-core host: where its seconds to /health went.

Its way to ready is the local worker's start-up (torch, transformers, the served architectures' configuration classes:
~3 s of one core) and then the registrations. Both processes made their long-lived objects -- the worker's ~300k,
the server's ~130k -- under the cyclic collector's default young threshold (700), which rescanned them again and again
as they grew: in the worker ~600 young and 5 full collections, ~0.45 s of its warm-up; in the server ~0.3 s of the core
beside it. Each process runs its start-up as it runs once started now: the worker's warm-up with the collector off,
its imports frozen after it (as after a load); the server with the young threshold it serves with
(bench/results/startup_cpu2_*.json)."""

from __future__ import annotations

import json
import subprocess
import sys

from load_tests.live_server import REPO_ROOT
from tests.ports import free_port


def _run(code: str, env: dict[str, str] | None = None) -> dict:
    import os

    r = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=180,
                       env=dict(os.environ, **(env or {})))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_workers_warm_up_runs_no_collection_and_freezes_its_imports():
    """The warm-up thread of a worker (a cold start's, as `python -m controller.worker` starts it; a standby's the
    same): no collection of any generation while it imports torch, transformers and the engine (~600, 5 of them full,
    before); what it imported is frozen after it, the collector is on again, with the served young threshold."""
    got = _run("""
import gc, json, sys, time
from controller import worker  # (the module's own imports come first, as in `python -m controller.worker`)
from controller.heap import YOUNG_THRESHOLD
seen = []
gc.callbacks.append(lambda phase, info: phase == "start" and seen.append(info["generation"]))
assert "torch" not in sys.modules
worker.start_warm_up("cpu")
worker._warming.join(120)
gc.callbacks.clear()
print(json.dumps({"collections": seen, "torch": "torch" in sys.modules, "on": gc.isenabled(),
                  "frozen": gc.get_freeze_count(), "young": gc.get_threshold()[0], "served": YOUNG_THRESHOLD}))
""")
    assert got["torch"], got  # (it did import: the collections counted are the warm-up's)
    assert got["collections"] == [], f"{len(got['collections'])} collections during the warm-up"
    assert got["on"] and got["young"] >= got["served"], got
    assert got["frozen"] > 100_000, got  # torch's and transformers' objects, out of the collector's reach


def test_tokenpool_serve_starts_up_with_the_served_young_threshold(tmp_path, tiny_model):
    """`tokenpool serve`'s start-up (`shutdown.run`: uvicorn, the app, the workers, the models' tokenizers) runs with
    the collector's young threshold of the served process, not the default 700 (set once started, before)."""
    got = _run(f"""
import gc, json
from controller import serve, shutdown
from controller.heap import YOUNG_THRESHOLD
seen = {{}}
def run(cfg, prepare=None, tenants=None):  # the start-up, as `tokenpool serve` begins it
    seen.update(young=gc.get_threshold()[0], served=YOUNG_THRESHOLD, models=[m.name for m in cfg.models])
    return 0
shutdown.run = run
serve.serve(model_dirs=[{str(tiny_model)!r}], host="127.0.0.1", port={free_port(range(29000, 29050))})
print(json.dumps(seen))
""", env={"TOKENPOOL_CACHE": str(tmp_path)})
    assert got["models"] == [tiny_model.name], got
    assert got["young"] >= got["served"] > 700, got
