"""An engine drain's unloads cost its worker one heap collection, not one per model (helper ux66g).

A local CPU worker ran a full pass of its heap (`controller.heap.collect_all`: ~0.2 s on an idle 2-core machine,
~1 s beside the dashboard test's browser) after each model it unloaded, on its event loop, before anything else: a
drain of an engine serving three models held the loop three passes, and a resume's registrations, then the first
request after it, waited for them (0.39 s where the reload itself took 0.05 s; 2-12 s in the dashboard test on a
loaded machine). Now the unloads applied together are collected once, after their requests are answered. The worker
counts its passes in its pool view (`/admin/engines`: `pool.loop.collections`, `collect_s`).
"""

from __future__ import annotations

import time

import httpx
import pytest
from openai import OpenAI

from controller.keys import hash_key
from tests.ports import live_server_on

PORTS = range(29700, 29750)
ADMIN = "ux66g-admin"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
PACED = ("pace-a", "pace-b")
TINY = ("tiny-a", "tiny-b")


@pytest.fixture(scope="module")
def server(make_tiny, tmp_path_factory):
    cfg = {"admin_token_hash": hash_key(ADMIN), "workers": {"local": "cpu", "standby": False},
           "models": [*({"name": n, "path": None, "engine": {"kind": "pace", "pace_s_per_token": 0.001}}
                        for n in PACED),
                      *({"name": n, "path": str(make_tiny("qwen2", seed=i)), "engine": {"max_num_seqs": 4}}
                        for i, n in enumerate(TINY))]}
    with live_server_on(PORTS, cfg, tmp_path_factory.mktemp("ux66g")) as srv:
        yield srv


def _w0(c: httpx.Client) -> dict:
    (e,) = c.get("/admin/engines").json()
    return e


def _view_after(c: httpx.Client, t: float) -> dict:
    """The worker's pool view, as a Stats taken after wall-clock time `t` has it."""
    deadline = time.monotonic() + 30
    while (pool := _w0(c)["pool"] or {}).get("loop", {}).get("t", 0.0) <= t:
        assert time.monotonic() < deadline, "no Stats from the worker"
        time.sleep(0.05)
    return pool


def test_drain_collects_once_and_resume_serves(server):
    c = httpx.Client(base_url=server.url, headers=AUTH, timeout=60)
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    for name in (*PACED, *TINY):  # every model stepped once (each resident, as before the dashboard's drain)
        assert client.completions.create(model=name, prompt="hi", max_tokens=1).choices[0].text is not None
    before = _view_after(c, time.time())
    assert sorted(before["registered"]) == sorted((*PACED, *TINY))

    assert c.post("/admin/engines/w0/drain").json()["draining"] is True
    deadline = time.monotonic() + 30
    while _w0(c)["models"]:  # (unregistered at once: the engine is idle)
        assert time.monotonic() < deadline, _w0(c)
        time.sleep(0.05)
    deadline = time.monotonic() + 30
    while (after := _view_after(c, time.time()))["registered"] or after["loop"]["collections"] == \
            before["loop"]["collections"]:
        assert time.monotonic() < deadline, after
        time.sleep(0.05)
    after = _view_after(c, time.time())  # (a view taken once a pass that began before the last one is over)
    passes = after["loop"]["collections"] - before["loop"]["collections"]
    # one pass for the four unloads (two if they reached the worker in two reads), where there were four
    assert 1 <= passes <= 2, (passes, after["loop"])
    assert after["loop"]["collect_s"] > before["loop"]["collect_s"]

    assert c.post("/admin/engines/w0/resume").json()["draining"] is False
    for name in TINY:  # registered again; the first request brings the weights back
        assert client.completions.create(model=name, prompt="hi", max_tokens=1).usage.completion_tokens == 1
    assert {m["model"] for m in _w0(c)["models"]} == {*PACED, *TINY}
