"""A pooled model whose weights fit the arena's weight space by their bytes, but not as a slot (its size rounded up
to the arena's alignment): `tokenpool serve` of a configuration that has it stops at start-up (exit 2), naming its
slot, as for any configured model that cannot fit (since ux68h the weight space is judged as the arena carves it,
and the slot as the worker takes it). Before session 67 it registered, and the policy never found room for its slot:
its requests waited for ever ("planned no step for 5 s with requests waiting"); in session 67 the worker refused it
and its requests were 503s. (A model added through the admin API: a 400, test_ux68a_serve_mends.)"""

from __future__ import annotations

import uuid

import pytest

import load_tests.live_server as live_server
from tests.ports import free_port

MiB = 1 << 20
PAGE = 16 * 512
PORTS = range(30050, 30100)


def test_a_model_whose_slot_cannot_fit_is_refused_not_left_waiting(make_tiny, tmp_path):
    big, small = make_tiny("llama"), make_tiny("qwen2")  # 2.3 MiB of weights (a 4 MiB slot), and 1.4 MiB
    cfg = {"workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.2},
           # the KV region takes one 2 MiB aligned slot; 2.5 MiB are left for weights: 2.3 MiB fit, 4 do not
           "gpus": {"cpu_budget_gb": (4 * MiB + MiB // 2) / 1e9, "kv_cache_gb": 48 * PAGE / 1e9,
                    "host_cache_namespace": f"test-{uuid.uuid4().hex[:10]}"},
           "models": [{"name": "big", "path": str(big)}, {"name": "small", "path": str(small)}]}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(live_server, "free_port", lambda: free_port(PORTS))
        srv = live_server.LiveServer(cfg, tmp_path, wait_ready=False)
    with srv:
        rc = srv.proc.wait(30)  # (start-up judges each configured model's slot once the local workers joined)
    log = srv.log()
    assert rc == 2, log
    assert "cannot start: model 'big' could never load: its weights (0.00244 GB, a slot of 0.00419 GB)" in log, log
