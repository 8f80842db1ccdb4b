"""Open dashboards do not slow serving: 50 of them (each one event stream with snapshots, as the page opens it)
cost the controller process less than 2% of a CPU core while it streams tokens to clients.

Measured on a live `tokenpool serve` (pace models) as the controller's own CPU time (/proc, the worker
processes not counted), in alternating rounds with and without the dashboards, medians compared.
"""

from __future__ import annotations

import os
import statistics
import threading
import time

import httpx
import pytest

from controller.keys import hash_key
from load_tests.live_server import LiveServer

ADMIN = "admin-cost-token"
H = {"Authorization": f"Bearer {ADMIN}"}
DASHBOARDS = 50
ROUND_S = 6.0


def cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads CPU time from /proc")
def test_fifty_dashboards_cost_under_two_percent_of_a_core(tmp_path):
    cfg = {"admin_token_hash": hash_key(ADMIN), "workers": {"local": "cpu"},
           "models": [{"name": f"pace-{i}", "path": None, "engine": {"kind": "pace", "pace_s_per_token": 0.01}}
                      for i in range(3)]}
    stop = threading.Event()
    served = [0]

    def client(url: str, model: str) -> None:
        from openai import OpenAI

        c = OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        while not stop.is_set():
            for _ in c.completions.create(model=model, prompt="hi", max_tokens=100, stream=True,
                                          extra_body={"ignore_eos": True}):
                served[0] += 1

    def dashboard(url: str, halt: threading.Event, frames: list[int]) -> None:
        with httpx.stream("GET", url + "/admin/events?since=0&snapshots=true", headers=H, timeout=None) as r:
            for chunk in r.iter_raw():
                frames[0] += chunk.count(b"event: pool")
                if halt.is_set():
                    break

    with LiveServer(cfg, tmp_path) as srv:
        clients = [threading.Thread(target=client, args=(srv.url, f"pace-{i % 3}"), daemon=True) for i in range(12)]
        for t in clients:
            t.start()
        time.sleep(2)
        usage: dict[int, list[float]] = {0: [], DASHBOARDS: []}
        snapshots = [0]
        try:
            for _ in range(3):
                for n in (0, DASHBOARDS):
                    halt = threading.Event()
                    dash = [threading.Thread(target=dashboard, args=(srv.url, halt, snapshots), daemon=True)
                            for _ in range(n)]
                    for d in dash:
                        d.start()
                    time.sleep(1.5)
                    c0, t0, s0 = cpu_s(srv.proc.pid), time.monotonic(), served[0]
                    time.sleep(ROUND_S)
                    usage[n].append((cpu_s(srv.proc.pid) - c0) / (time.monotonic() - t0))
                    assert served[0] - s0 > 500 * ROUND_S  # serving went on (tokens streamed to the clients)
                    halt.set()
                    for d in dash:
                        d.join(5)
        finally:
            stop.set()
            for t in clients:
                t.join(30)
        base, dashed = statistics.median(usage[0]), statistics.median(usage[DASHBOARDS])
        print(f"\ncontroller CPU: {100 * base:.1f}% of a core serving; {100 * dashed:.1f}% with {DASHBOARDS} "
              f"dashboards ({snapshots[0]} snapshots delivered)")
        assert snapshots[0] >= DASHBOARDS * ROUND_S * 3 * 0.8  # the dashboards were live: ~1 snapshot/s each
        assert dashed - base < 0.02
