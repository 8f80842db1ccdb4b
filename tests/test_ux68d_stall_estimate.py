"""A worker paused mid-step (SIGSTOP, swap, a long GC) does not leave its step estimate inflated (ux68d).

The pause was taken as one step (and one round, and one gap between the worker's outputs): a 4 s pause made the
estimate ~100x, and with the model idle after it nothing washed it out, so admission refused queued requests that
would have met their SLO."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time

import httpx
import openai

from controller.admission import STALL_FACTOR, ewma
from controller.config import EngineOptions
from controller.hosting import HostedModels
from controller.keys import hash_key
from load_tests.live_server import LiveServer
from token_scheduler.request import SamplingParams

STEP = 0.002


def _hosted() -> HostedModels:
    """A paced model with a request in flight: its steps count toward the round."""
    hm = HostedModels("cpu")
    paced = EngineOptions(kind="pace", pace_s_per_token=0.0)
    hm.prepare(None, paced)
    hm.host("p", None, paced, None)
    hm.add_request("p", "r", [5, 6], SamplingParams(max_tokens=1000, ignore_eos=True))
    return hm


def _steps(hm: HostedModels, t: float, durations: list[float]) -> float:
    for dt in durations:
        hm._observe("p", t, dt)
        t += dt
    return t


def test_a_pause_mid_step_counts_as_a_bounded_step():
    hm = _hosted()
    try:
        t = _steps(hm, 100.0, [STEP] * 20)
        t = _steps(hm, t, [4.0, STEP, STEP])  # paused 4 s in a step, then the stream's last two steps
        # before: step 0.52 s, round 0.33 s (the router's step_s), where a step is 2 ms
        assert hm.step_s["p"] < 2 * STEP and hm.stats()["p"]["step_s"] == hm.step_s["p"]
        assert hm.round_estimate_s < 2 * STEP
    finally:
        hm.close()


def test_a_real_slowdown_still_comes_through():
    hm = _hosted()
    try:
        t = _steps(hm, 100.0, [STEP] * 20)
        _steps(hm, t, [20 * STEP] * 30)  # every step 20x slower from now on: not a pause
        assert hm.step_s["p"] > 15 * STEP and hm.round_estimate_s > 15 * STEP
    finally:
        hm.close()


def test_ewma():
    assert ewma(0.0, 3.0, 0.1) == 3.0  # the first sample is the estimate
    assert ewma(1.0, 2.0, 0.1) == 0.9 + 0.1 * 2.0
    assert ewma(1.0, 1000.0, 0.1) == 0.9 + 0.1 * STALL_FACTOR


ADMIN = "ux68d-admin"


def test_a_paused_worker_is_not_refused_traffic_after(tmp_path):
    """Live: a stream's worker stopped 2 s near its end (its controller keeps it: dead_after_s 10); once the stream
    is done the engine's step estimate is what it was, and a burst that queues (max_num_seqs 1) is admitted whole
    (before: step_s 50 ms -> 0.2-0.4 s, and the burst's queued requests were 429s)."""
    cfg = {"admin_token_hash": hash_key(ADMIN),
           "workers": {"local": "cpu", "heartbeat_s": 0.25, "dead_after_s": 10.0, "standby": False},
           "models": [{"name": "pace", "slo": {"ttft_s": 0.8},
                       "engine": {"kind": "pace", "pace_s_per_token": 0.05, "max_num_seqs": 1}}]}
    adm = {"Authorization": f"Bearer {ADMIN}"}
    with LiveServer(cfg, tmp_path, port=30300) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=30)

        def engine() -> dict:
            (e,) = [e for e in httpx.get(srv.url + "/admin/engines", headers=adm).json() if e["alive"]]
            return e

        def one(_=None) -> int:
            try:
                c.completions.create(model="pace", prompt="hi", max_tokens=3)
                return 200
            except openai.APIStatusError as ex:
                return ex.status_code

        one()
        stream = iter(c.completions.create(model="pace", prompt="hi", max_tokens=30, stream=True))
        for _ in range(27):  # near its end: the few steps after the pause washed it out
            next(stream)
        pid = engine()["pid"]
        os.kill(pid, signal.SIGSTOP)
        time.sleep(2.0)
        os.kill(pid, signal.SIGCONT)
        for _ in stream:
            pass
        time.sleep(0.6)  # the worker's Stats after the stream
        assert engine()["step_s"] < 0.12, engine()
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            assert list(pool.map(one, range(3))) == [200, 200, 200]
