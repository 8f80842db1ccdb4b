"""Issue 16's pooled-engine faults with real-shaped models: a pooled worker SIGKILLed while it moves weights and
while it swaps KV out, on the device this runs on; then what the kill left behind (processes, GPU memory,
pinned host memory, /dev/shm files) once the server is stopped.

    python3 load_tests/gpu_runs/pooled_kill.py --device cuda --size 1.5b --out $OUT

Three aliases of one factory checkpoint (random weights, the real architecture's shapes) in an arena that holds
one of them, so every switch is a weight load from the pinned host cache, and a KV region of a few hundred
tokens, so idle models' KV goes to host pages. Each part writes its JSON as soon as it has run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from controller.config import cache_dir  # noqa: E402
from load_tests.bench_common import header  # noqa: E402
from load_tests.faults import _pid_alive, pooled_config, run_kill, target  # noqa: E402

RESTART_LOG = ("registered as", "hosting ", "standby", "exited with")


def gpu_apps() -> dict[int, int]:
    """pid -> MiB of device memory, as nvidia-smi sees it ({} without a GPU)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    apps = {}
    for line in out.strip().splitlines():
        pid, mib = (x.strip() for x in line.split(","))
        apps[int(pid)] = int(mib)
    return apps


def worker_processes() -> list[int]:
    """Live `controller.worker` processes of this host (any server's: run this where no other one serves)."""
    out = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and b"controller.worker" in (p / "cmdline").read_bytes() and _pid_alive(int(p.name)):
                out.append(int(p.name))
        except OSError:
            pass
    return sorted(out)


def gpu_used_mib() -> int | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
        return sum(int(x) for x in out.split())
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None


def meminfo() -> dict[str, int]:
    keep = ("MemAvailable", "Shmem", "Mlocked", "Unevictable")
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        k, v = line.split(":", 1)
        if k in keep:
            out[k + "_mib"] = int(v.split()[0]) // 1024
    return out


def snapshot(t) -> dict:
    engines = [e for e in t.engines() if e["alive"]]
    return {"t": time.time(), "worker_pids": [e["pid"] for e in engines], "gpu_apps_mib": gpu_apps(),
            "gpu_used_mib": gpu_used_mib(), "meminfo": meminfo()}


def wait_standbys(t, n: int, timeout: float = 90.0) -> float | None:
    """Seconds until the server's log shows `n` standbys warm (None: not within `timeout`, or no log)."""
    t0 = time.monotonic()
    while t.log_path is not None and time.monotonic() - t0 < timeout:
        if t.log_path.exists() and t.log_path.read_bytes().count(b"standby: warm") >= n:
            return round(time.monotonic() - t0, 2)
        time.sleep(0.1)
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--size", default="1.5b")
    ap.add_argument("--arch", default="qwen2")
    ap.add_argument("--budget-gb", type=float, default=None, help="arena (default: one model's weights x 1.4)")
    ap.add_argument("--kv-cache-gb", type=float, default=0.012)
    ap.add_argument("--streams", type=int, default=6)
    ap.add_argument("--queued", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=300)
    ap.add_argument("--parts", default="weights,kv")
    ap.add_argument("--out", type=Path, default=Path("."))
    a = ap.parse_args()
    from controller.model_factory import make_model

    t0 = time.monotonic()
    d = cache_dir() / f"kill-{a.arch}-{a.size}-{a.device}"
    dtype = "bf16" if a.device == "cuda" else "fp32"
    if not (d / "config.json").exists():
        make_model(arch=a.arch, size=a.size, out=d, seed=0, dtype=dtype, device=a.device, progress=False)
    weights = sum(f.stat().st_size for f in d.glob("*.safetensors"))
    print(f"model {d} ({weights / 1e9:.2f} GB) in {time.monotonic() - t0:.1f}s", flush=True)
    names = ["ka", "kb", "kc"]
    budget = a.budget_gb or weights * 1.4 / 1e9
    cfg = pooled_config(dict.fromkeys(names, str(d)), budget_gb=budget, kv_cache_gb=a.kv_cache_gb)
    if a.device == "cuda":
        cfg["workers"]["local"] = "auto"
        cfg["gpus"] = {"budget_gb": budget, "kv_cache_gb": a.kv_cache_gb}
    for m in cfg["models"]:  # the running streams fill their model's slots: the queued requests wait
        m["engine"] = {"max_num_seqs": max(1, a.streams // len(names)), "max_model_len": 1024}
    a.out.mkdir(parents=True, exist_ok=True)
    result = {**header(), "device_kind": a.device, "model": f"{a.arch}-{a.size} (factory, random weights)",
              "weights_gb": round(weights / 1e9, 3), "budget_gb": round(budget, 3), "kv_cache_gb": a.kv_cache_gb,
              "models": names, "parts": {}}
    path = a.out / f"suite_pooled_kill_{a.device}_{a.size}.json"

    def write() -> None:
        path.write_text(json.dumps(result, indent=1))

    with target(config=cfg, model=names[0]) as t:
        shm_dir = t.shm_dir
        print(f"serving at {time.monotonic() - t0:.1f}s", flush=True)
        result["before"] = snapshot(t)
        for k, during in enumerate(a.parts.split(",")):
            # one kill at a time, as an SRE sees them: the slot's standby is warm again before the next one
            warm_wait = wait_standbys(t, k + 1)
            r = run_kill(t, "KILL", a.streams, a.queued, a.max_tokens, during, names)
            r["standby_warm_wait_s"] = warm_wait
            r["after_restart"] = snapshot(t)
            victim = r["victim"]["pid"]
            r["victim_gpu_memory_left_mib"] = r["after_restart"]["gpu_apps_mib"].get(victim, 0)
            result["parts"][during] = r
            write()
            print(during, json.dumps({k: r[k] for k in ("running_streams_ended_with_error_event", "error_event_s",
                                                        "queued_requests_completed", "queued_requests_failed",
                                                        "queued_requests_failed_tokens", "restart_s",
                                                        "request_after_restart_ok", "standby_warm_wait_s",
                                                        "victim_process_left", "dev_shm_files_leaked")}), flush=True)
        pids = set(result["before"]["worker_pids"]) | {p["victim"]["pid"] for p in result["parts"].values()}
        pids |= set(r["after_restart"]["worker_pids"])
        server_pid = t.server_pid
        if t.log_path is not None and t.log_path.exists():  # the workers' start-up and registration times
            log = t.log_path.read_bytes()[-4_000_000:]
            (a.out / "server.log").write_bytes(log)
            # where each restart went (worker start-up or standby, each registration's phases), in the JSON too
            result["worker_log"] = [ln for ln in log.decode(errors="replace").splitlines()
                                    if any(k in ln for k in RESTART_LOG)][-200:]
    time.sleep(1.0)
    after = {"processes_left": sorted(p for p in pids | {server_pid} if p and _pid_alive(p)),
             "worker_processes_left": worker_processes(),  # standbys included (their pids are in no view)
             "gpu_apps_mib": gpu_apps(), "gpu_used_mib": gpu_used_mib(), "meminfo": meminfo(),
             "shm_dir_left": bool(shm_dir and Path(shm_dir).exists() and any(Path(shm_dir).rglob("*")))}
    before_mem = result["before"]["meminfo"]
    after["pinned_or_shm_growth_mib"] = {k: after["meminfo"][k] - before_mem[k] for k in ("Shmem_mib", "Mlocked_mib")}
    result["after_server_stopped"] = after
    result["wall_s"] = round(time.monotonic() - t0, 1)
    write()
    print("after stop", json.dumps(after), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
