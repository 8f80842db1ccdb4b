"""A worker paused mid-stream (SIGSTOP, as a host stall: swap, a long GC) and its step estimate after.

`python -m load_tests.bench_stall OUT.json [--port P] [--pause-s S]`: `tokenpool serve` over a tiny factory model on
the CPU (max_num_seqs 1, so a second request queues and admission judges it by its estimated TTFT against the model's
1 s SLO); a stream in flight, its worker stopped for `--pause-s` and continued; after the stream ends, the step
estimate the admin API shows (the engine's and the model's), again after idling, then a burst of 3 requests each
0.5 s: how many are refused (429) and how long until a burst is admitted whole.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

from controller.keys import hash_key
from load_tests.live_server import LiveServer

ADMIN = "bench-stall-admin"
MODEL = "tiny"


def config(model_dir: Path) -> dict:
    return {"admin_token_hash": hash_key(ADMIN),
            # silent for less than dead_after_s: the paused worker is kept, not replaced
            "workers": {"local": "cpu", "heartbeat_s": 0.5, "dead_after_s": 30.0, "standby": False},
            "models": [{"name": MODEL, "path": str(model_dir), "slo": {"ttft_s": 1.0},
                        "engine": {"max_num_seqs": 1}}]}


def engine(url: str) -> dict:
    (e,) = [e for e in httpx.get(url + "/admin/engines", headers={"Authorization": f"Bearer {ADMIN}"}).json()
            if e["alive"]]
    return e


def estimate(url: str) -> dict:
    e = engine(url)
    return {"engine_step_s": e["step_s"], "model_step_s": e["stats"].get(MODEL, {}).get("step_s", 0.0)}


def burst(c: openai.OpenAI, n: int) -> list[int]:
    """`n` requests at once: each one's status (200, or the refusal's)."""
    def one(_):
        try:
            c.completions.create(model=MODEL, prompt="hi", max_tokens=16, extra_body={"ignore_eos": True})
            return 200
        except openai.APIStatusError as ex:
            return ex.status_code
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def run(url: str, pause_s: float, idle_s: float, give_up_s: float) -> dict:
    c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    for _ in range(3):  # warm: the steps' estimates settle
        burst(c, 1)
    time.sleep(1.0)  # a Stats after them
    before = estimate(url)
    pid = engine(url)["pid"]
    stream = c.completions.create(model=MODEL, prompt="hi", max_tokens=40, stream=True,
                                  extra_body={"ignore_eos": True})
    it = iter(stream)
    for _ in range(30):  # near its end: the steps after the pause are too few to wash it out
        next(it)
    os.kill(pid, signal.SIGSTOP)
    time.sleep(pause_s)
    os.kill(pid, signal.SIGCONT)
    for _ in it:
        pass
    t_end = time.monotonic()
    time.sleep(1.0)  # a Stats after the stream
    after = estimate(url)
    time.sleep(idle_s)
    after_idle = estimate(url)
    bursts, refused, t_admitted = [], 0, None
    while time.monotonic() - t_end < give_up_s:
        t = time.monotonic()
        codes = burst(c, 3)
        bursts.append({"t_s": round(t - t_end, 2), "codes": codes})
        refused += sum(x != 200 for x in codes)
        if all(x == 200 for x in codes):
            t_admitted = t - t_end
            break
        time.sleep(max(0.0, 0.5 - (time.monotonic() - t)))
    return {"estimate_before": before, "estimate_after_stream": after, f"estimate_after_{idle_s:g}s_idle": after_idle,
            "refused": refused, "first_whole_burst_s_after_stream": t_admitted, "bursts": bursts}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--port", type=int, default=30300)
    ap.add_argument("--pause-s", type=float, default=4.0)
    ap.add_argument("--idle-s", type=float, default=10.0)
    ap.add_argument("--give-up-s", type=float, default=60.0)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "m"
        subprocess.run([sys.executable, "-m", "controller.cli", "make-model", "--arch", "qwen2", "--size", "tiny",
                        "--dtype", "fp32", "--device", "cpu", "--out", str(model_dir)], check=True, stdout=subprocess.DEVNULL)
        with LiveServer(config(model_dir), Path(tmp) / "srv", port=a.port) as srv:
            result = run(srv.url, a.pause_s, a.idle_s, a.give_up_s)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"commit": commit, "pause_s": a.pause_s, **result}
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "bursts"}, indent=1))


if __name__ == "__main__":
    main()
