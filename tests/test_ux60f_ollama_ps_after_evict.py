"""/api/ps after an evict (ux60f), against one live single-user server through the official `ollama` client. The pool
view keeps a model it just evicted out of /api/ps while the worker's Stats still list it resident (a view taken
before the worker applied the evict: `EngineHandle.gone`). That mark outlived the evict:

- a model loaded again right after its evict (here: pinned, which brings its weights back with no request) was
  hidden from /api/ps until a token of it was made, or GONE_TRUST_S (10 s) passed;
- one the worker kept, after all (the evict did not happen), came back only after those 10 s.

Now the worker's Stats count the evicts it applied (Stats.pool["evicts"]): a view taken after every evict of a
model is believed at once; and a model's load finishing (ModelLoaded) clears the mark.
"""

from __future__ import annotations

import time

import httpx
import ollama
import pytest

from controller.config import EngineOptions, GPUSettings, WorkerSettings
from controller.keys import hash_key
from controller.messages import ModelLoaded, Stats
from controller.pool import EngineHandle, EnginePool, Replica
from tests.ports import live_server_on

PORTS = range(25960, 25975)
ADMIN = "admin-ux60f-ps-token"
HEARTBEAT_S = 3.0


@pytest.fixture(scope="module")
def server(make_tiny, tmp_path_factory):
    tiny = str(make_tiny("qwen2"))
    cfg = {"admin_token_hash": hash_key(ADMIN),
           "workers": {"local": "cpu", "standby": False, "heartbeat_s": HEARTBEAT_S, "dead_after_s": 30},
           "models": [{"name": "re", "path": tiny, "engine": {"max_num_seqs": 4, "max_model_len": 128}}]}
    with live_server_on(PORTS, cfg, tmp_path_factory.mktemp("ux60f_ps")) as srv:
        yield srv


def listed(c: ollama.Client) -> set[str]:
    return {m.model for m in c.ps().models}


def test_a_model_loaded_again_right_after_its_evict_is_listed_at_once(server):
    """`ollama stop` (keep_alive 0), then at once a pin: the worker evicts the weights and brings them back (the pin
    prefetches them), no token made. /api/ps lists the model with the worker's next Stats (a heartbeat, 3 s here),
    where it stayed hidden until 10 s after the evict."""
    c = ollama.Client(host=server.url, timeout=60)
    admin = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    assert c.generate(model="re", prompt="").done_reason == "load"
    assert "re:latest" in listed(c)
    assert c.generate(model="re", prompt="", keep_alive=0).done_reason == "unload"
    t0 = time.monotonic()
    assert "re:latest" not in listed(c)
    r = admin.post("/admin/models/re/pin")
    assert r.status_code == 200, r.text
    try:
        while "re:latest" not in listed(c):
            assert time.monotonic() - t0 < 2 * HEARTBEAT_S + 1, "a model loaded again is missing from /api/ps"
            time.sleep(0.1)
        # (the worker's own word, not a token's: none was made)
        engines = admin.get("/admin/engines").json()
        assert any("re" in (e.get("pool") or {}).get("resident", []) for e in engines), engines
    finally:
        assert admin.post("/admin/models/re/unpin").status_code == 200
    # and an evict that does happen still takes it out at once, and keeps it out
    assert c.generate(model="re", prompt="", keep_alive=0).done_reason == "unload"
    t1 = time.monotonic()
    while time.monotonic() - t1 < HEARTBEAT_S + 0.5:
        assert "re:latest" not in listed(c)
        time.sleep(0.2)


# -- the pool's bookkeeping, fed the worker's messages as they come ------------------------------------------------


class _Writer:
    def __init__(self):
        self.sent: list[bytes] = []

    def is_closing(self) -> bool:
        return False

    def write(self, b: bytes) -> None:
        self.sent.append(b)


def _pool() -> EnginePool:
    return EnginePool(WorkerSettings(local="cpu", standby=False), GPUSettings(), on_registered=lambda e, p: None,
                      on_dead=lambda e, s: None, on_loaded=lambda e, r, s: None, on_stats=lambda e: None)


def _engine(model: str) -> EngineHandle:
    e = EngineHandle("w0", 0, "cpu", "h", 1, 1 << 30, _Writer())  # type: ignore[arg-type]
    r = e.replicas[model] = Replica(model)
    r.state = "ready"
    r.ready.set()
    return e


def _view(state: str, evicts: dict[str, int] | None = None) -> dict:
    v = {"models": {"m": {"state": state}}, "resident": ["m"] if state == "resident" else []}
    return {**v, "evicts": evicts} if evicts is not None else v


def _resident(e: EngineHandle) -> bool:
    from controller.dashboard.views import resident_models

    return "m" in resident_models([e])


def test_a_view_taken_after_the_workers_evict_is_believed_at_once():
    """The worker kept the weights (its evict did not happen: pinned there, or not hosted yet): a Stats that counts
    the evict and lists the model resident lists it at once, where the pool view hid it GONE_TRUST_S long. One that
    does not count it yet (taken before the worker applied it) is still kept out; one with no counts (a worker that
    does not count them) too, until GONE_TRUST_S."""
    pool, e = _pool(), _engine("m")
    pool._stats(e, Stats({}, 0.0, 0, 0, pool=_view("resident")))
    assert _resident(e)
    pool.evict(e, "m")
    assert not _resident(e)
    pool._stats(e, Stats({}, 0.0, 0, 0, pool=_view("resident")))  # (no counts: an older worker)
    assert not _resident(e)
    pool._stats(e, Stats({}, 0.0, 0, 0, pool=_view("resident", {})))  # (taken before the worker applied it)
    assert not _resident(e)
    pool._stats(e, Stats({}, 0.0, 0, 0, pool=_view("resident", {"m": 1})))  # (after: kept, or loaded again)
    assert _resident(e) and not e.gone
    # a second evict: the worker's count must reach 2
    pool.evict(e, "m")
    pool._stats(e, Stats({}, 0.0, 0, 0, pool=_view("resident", {"m": 1})))
    assert not _resident(e)
    pool._stats(e, Stats({}, 0.0, 0, 0, pool=_view("host", {"m": 2})))
    assert not _resident(e) and not e.gone
    pool._stats(e, Stats({}, 0.0, 0, 0, pool=_view("resident", {"m": 2})))  # (loaded again since)
    assert _resident(e)


def test_a_load_finishing_after_an_unload_is_believed():
    """Unregistered, then registered again (its weights preloaded, or the unload cancelled by the load): once the
    load's answer comes, the worker's views list it, where it stayed out GONE_TRUST_S long."""
    pool, e = _pool(), _engine("m")
    pool._stats(e, Stats({}, 0.0, 0, 0, pool=_view("resident", {})))
    pool.unload(e, "m")
    assert not _resident(e)
    pool._stats(e, Stats({}, 0.0, 0, 0, pool=_view("resident", {})))  # (taken before the unload)
    assert not _resident(e)
    pool.load(e, "m", None, EngineOptions())
    pool._loaded(e, ModelLoaded("m", True, max_model_len=128, max_num_seqs=4))
    pool._stats(e, Stats({}, 0.0, 0, 0, pool=_view("resident", {})))
    assert _resident(e)
