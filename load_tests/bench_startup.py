"""`tokenpool serve`'s start-up, timed as its user meets it: before/after two source trees, interleaved.

    python -m load_tests.bench_startup --tree before=/tmp/before --tree after=/tmp/after --port 29350 --out FILE

Each tree (e.g. `git archive` of a commit, unpacked) is put first on PYTHONPATH of `tokenpool serve --port P` (the
embedded default), run from /tmp with TOKENPOOL_CACHE set, and timed from the Popen: a connect loop (`bound`), GET
/health every 20 ms (`health`), GET /v1/models listing smollm2-135m-instruct (`models`), then the official openai
client's streamed chat (max_tokens 8) until its first chunk with content (`first_token`). `phases`, from the server's
log: `w_spawn` (the local worker's process start: its "registered as w0 ... X s after the process started" line less
X), `w_warm` (its "cold start: warm" line), `w_hosted` (its last "hosting ... took" line), `server_cpu_at_spawn`
and `server_cpu_at_health` (the server process's CPU seconds when its worker was first seen, and at /health 200), and
`foreign_cpu_s`: the machine's CPU time during the run (/proc/stat) less the run's own (this process's and its
children's rusage).

cold: a fresh empty cache each run; warm: one cache made beforehand. The cold rounds, then the warm ones, each
round every tree once in the order given; a round is kept only where every run's foreign_cpu_s stayed under --foreign-max (the VM is shared), and each run
starts once the machine has been quiet for 2 s (under 0.2 CPU-s of activity)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai

MODEL = "smollm2-135m-instruct"
TOKENPOOL = str(Path(sys.executable).with_name("tokenpool"))
TICK = os.sysconf("SC_CLK_TCK")


def busy_cpu_s() -> float:
    """The machine's CPU seconds spent so far, every core (/proc/stat's first line less idle and iowait)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / TICK


def own_cpu_s() -> float:
    return sum(resource.getrusage(w).ru_utime + resource.getrusage(w).ru_stime
               for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def wait_quiet(window_s: float = 2.0, limit_s: float = 0.2, give_up_s: float = 120.0) -> None:
    deadline = time.monotonic() + give_up_s
    while time.monotonic() < deadline:
        a = busy_cpu_s()
        time.sleep(window_s)
        if busy_cpu_s() - a < limit_s:
            return


def _stamp(line: str) -> float:
    return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def phases(log: str, t0: float) -> dict[str, float]:
    out = {}
    for line in log.splitlines():
        if (m := re.search(r"registered as w0 .* ([\d.]+) s after the process started", line)) and "w_spawn" not in out:
            out["w_spawn"] = round(_stamp(line) - float(m.group(1)) - t0, 2)
        elif "cold start: warm" in line:
            out["w_warm"] = round(_stamp(line) - t0, 2)
        elif re.search(r"worker\[\d+\] INFO hosting .* took", line):
            out["w_hosted"] = round(_stamp(line) - t0, 2)
    return out


def proc_cpu_s(pid: int) -> float:
    """utime + stime of process `pid` (/proc/PID/stat), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        v = f.read().rsplit(")", 1)[1].split()
    return (int(v[11]) + int(v[12])) / TICK


def watch_spawn(pid: int, got: dict[str, float], done: threading.Event) -> None:
    """The server's CPU seconds when its first child (the local worker) is first seen (polled every 2 ms): how much
    of the server's start-up came before the spawn, a figure that other processes' load on the machine barely moves
    (its wall time they do)."""
    while not done.is_set():
        for d in Path("/proc").iterdir():
            try:
                if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    got["server_cpu_at_spawn"] = proc_cpu_s(pid)
                    return
            except (OSError, ValueError, IndexError):
                pass
        time.sleep(0.002)


def one_run(tree: Path, cache: Path, port: int, logs: Path, name: str) -> tuple[dict, dict]:
    env = {**os.environ, "TOKENPOOL_CACHE": str(cache), "PYTHONPATH": str(tree)}
    log_path = logs / f"{name}.log"
    cpu0, own0 = busy_cpu_s(), own_cpu_s()
    t0, m0 = time.time(), time.monotonic()
    with open(log_path, "w") as log:
        p = subprocess.Popen([TOKENPOOL, "serve", "--port", str(port)], cwd="/tmp", env=env, stdout=log, stderr=log)
    got: dict[str, float] = {}
    spawn: dict[str, float] = {}
    done = threading.Event()
    watch = threading.Thread(target=watch_spawn, args=(p.pid, spawn, done), daemon=True)
    watch.start()
    try:
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.005)
        got["bound"] = time.monotonic() - m0
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            while c.get("/health").status_code != 200:
                time.sleep(0.02)
            got["health"] = time.monotonic() - m0
            cpu_health = proc_cpu_s(p.pid)
            assert MODEL in [x["id"] for x in c.get("/v1/models").json()["data"]]
            got["models"] = time.monotonic() - m0
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        for chunk in client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi"}],
                                                    stream=True, max_tokens=8):
            if chunk.choices and chunk.choices[0].delta.content:
                got["first_token"] = time.monotonic() - m0
                break
    finally:
        done.set()
        p.send_signal(signal.SIGTERM)
        p.wait(60)
    foreign = (busy_cpu_s() - cpu0) - (own_cpu_s() - own0)
    ph = {**phases(log_path.read_text(errors="replace"), t0), **spawn, "server_cpu_at_health": cpu_health,
          "foreign_cpu_s": round(foreign, 2)}
    return {k: round(v, 2) for k, v in got.items()}, ph


def medians(runs: list[dict]) -> dict:
    return {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]} if runs else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", required=True, help="NAME=PATH: a source tree to time")
    ap.add_argument("--port", type=int, required=True, help="the first of the ports used (one a run)")
    ap.add_argument("--cold", type=int, default=3, help="cold rounds kept")
    ap.add_argument("--warm", type=int, default=3, help="warm rounds kept")
    ap.add_argument("--foreign-max", type=float, default=0.4)
    ap.add_argument("--tries", type=int, default=4, help="rounds tried for each kept, at most")
    ap.add_argument("--quiet-wait", type=float, default=120.0, help="seconds a run waits for a quiet machine, at most")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # (unwound: the server running is stopped)
    trees = dict(t.split("=", 1) for t in a.tree)
    work = Path(tempfile.mkdtemp(prefix="bench_startup_"))
    logs = work / "logs"
    logs.mkdir()
    port = a.port
    warm_cache = work / "warm"
    one_run(Path(list(trees.values())[-1]), warm_cache, port, logs, "make_warm_cache")
    runs: dict[str, list[dict]] = {f"{k}_{n}": [] for k in ("cold", "warm") for n in trees}
    ph: dict[str, list[dict]] = {k: [] for k in runs}
    dropped = 0
    for kind, want in (("cold", a.cold), ("warm", a.warm)):
        for i in range(want * a.tries):
            if len(runs[f"{kind}_{next(iter(trees))}"]) >= want:
                break
            got = {}
            for n, tree in trees.items():
                port += 1
                cache = Path(tempfile.mkdtemp(dir=work)) if kind == "cold" else warm_cache
                wait_quiet(give_up_s=a.quiet_wait)
                got[n] = one_run(Path(tree), cache, port, logs, f"{kind}_{n}_{i}")
                if kind == "cold":
                    shutil.rmtree(cache)
                print(kind, n, *got[n], flush=True)
            if all(p["foreign_cpu_s"] < a.foreign_max for _, p in got.values()):
                for n, (r, p) in got.items():
                    runs[f"{kind}_{n}"].append(r)
                    ph[f"{kind}_{n}"].append(p)
            else:
                dropped += 1
    result = {"median": {k: medians(v) for k, v in runs.items()}, "runs": runs,
              "phases": {"median": {k: medians(v) for k, v in ph.items()}, "runs": ph},
              "rounds_dropped_for_foreign_cpu": dropped, "logs": str(logs)}
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["median"], indent=1))


if __name__ == "__main__":
    main()
