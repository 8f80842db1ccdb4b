"""Load test of the HTTP API: many concurrent streams, inter-token arrival vs the engine's pace, 1-token req/s.

    tokenpool loadtest --url http://127.0.0.1:8000 --streams 1000 --duration 20     # against a running server
    python -m load_tests.loadtest --bench                                           # the API-overhead figure

`--bench` starts its own server on loopback whose engine is PaceEngine (a token every `pace` seconds for every
running request, no model), so whatever the client sees beyond the pace is the serving stack's overhead:
HTTP + JSON + SSE in the controller, the worker protocol, and the worker loop. Loopback only, bounded in count
and time.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
PER_CLIENT = 32


def _check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if host not in LOOPBACK:
        raise SystemExit(f"refusing to load-test {host!r}: loopback only")


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def _first_model(client: httpx.AsyncClient, url: str) -> str:
    r = await client.get(url + "/v1/models")
    r.raise_for_status()
    return r.json()["data"][0]["id"]


async def stream_phase(url: str, streams: int, duration: float, model: str | None, headers: dict[str, str],
                       max_tokens: int) -> dict:
    """`streams` concurrent streaming completions held for `duration` seconds; per-token arrival gaps."""
    # httpx's connection pool costs O(connections) per request: shard the streams over small clients
    clients = [httpx.AsyncClient(limits=httpx.Limits(max_connections=PER_CLIENT + 1), headers=headers,
                                 timeout=httpx.Timeout(duration + 60)) for _ in range(math.ceil(streams / PER_CLIENT))]
    try:
        model = model or await _first_model(clients[0], url)
        gaps: list[float] = []
        lat: list[float] = []
        ttfts: list[float] = []
        errors: list[str] = []
        live = 0
        live_samples: list[int] = []
        tokens = 0
        stop_at = time.perf_counter() + duration
        started = asyncio.Event()

        async def one(i: int) -> None:
            nonlocal live, tokens
            body = {"model": model, "prompt": f"stream {i}", "max_tokens": max_tokens, "stream": True,
                    "ignore_eos": True}
            t0 = time.perf_counter()
            last = None
            counted = False
            try:
                async with clients[i % len(clients)].stream("POST", url + "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        errors.append(f"{r.status_code}: {(await r.aread())[:200]!r}")
                        return
                    buf = b""
                    async for raw in r.aiter_raw():
                        now = time.perf_counter()
                        wall = time.time()
                        buf += raw
                        *events, buf = buf.split(b"\n\n")
                        for ev in events:
                            if not ev.startswith(b"data: {"):
                                continue
                            if b'"error"' in ev[:20]:
                                errors.append(ev[:200].decode(errors="replace"))
                                return
                            tokens += 1
                            k = ev.find(b'"text":"@')
                            if k >= 0:  # PaceEngine stamp: emission wall-clock time of this token
                                lat.append(wall - float(ev[k + 9:ev.index(b'"', k + 9)]))
                            if last is None:
                                ttfts.append(now - t0)
                                if not counted:
                                    live += 1
                                    counted = True
                            else:
                                gaps.append(now - last)
                            last = now
                        if now >= stop_at:
                            return
            except (httpx.HTTPError, OSError) as e:
                errors.append(f"{type(e).__name__}: {e}")
            finally:
                if counted:
                    live -= 1

        async def sample() -> None:
            await started.wait()
            while time.perf_counter() < stop_at:
                live_samples.append(live)
                await asyncio.sleep(0.25)

        t_begin = time.perf_counter()
        tasks = [asyncio.create_task(one(i)) for i in range(streams)]
        started.set()
        sampler = asyncio.create_task(sample())
        await asyncio.gather(*tasks)
        await sampler
        elapsed = time.perf_counter() - t_begin
    finally:
        for c in clients:
            await c.aclose()
    steady = live_samples[len(live_samples) // 3:] or [0]  # after the ramp
    return {
        "streams_requested": streams, "model": model, "duration_s": round(elapsed, 2),
        "streams_held_min_steady": min(steady), "streams_held_max": max(live_samples or [0]),
        "tokens": tokens, "tokens_per_s": round(tokens / elapsed, 1), "errors": len(errors),
        "error_examples": errors[:3],
        "inter_token_s": {"median": _pct(gaps, 0.5), "p90": _pct(gaps, 0.9), "p99": _pct(gaps, 0.99),
                          "mean": statistics.fmean(gaps) if gaps else None, "n": len(gaps)},
        "ttft_s": {"median": _pct(ttfts, 0.5), "p90": _pct(ttfts, 0.9), "p99": _pct(ttfts, 0.99)},
        "emission_to_arrival_s": {"median": _pct(lat, 0.5), "p90": _pct(lat, 0.9), "p99": _pct(lat, 0.99),
                                  "n": len(lat)},
    }


async def rps_phase(url: str, concurrency: int, duration: float, model: str | None, headers: dict[str, str]) -> dict:
    """Closed loop of non-streaming 1-token completions from `concurrency` clients for `duration` seconds."""
    clients = [httpx.AsyncClient(timeout=60, headers=headers) for _ in range(concurrency)]  # one connection each
    try:
        model = model or await _first_model(clients[0], url)
        lat: list[float] = []
        errors = 0
        stop_at = time.perf_counter() + duration

        async def loop(i: int) -> None:
            nonlocal errors
            body = {"model": model, "prompt": f"r{i}", "max_tokens": 1}
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    r = await clients[i].post(url + "/v1/completions", json=body)
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    lat.append(time.perf_counter() - t0)
                else:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(loop(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - t0
    finally:
        for c in clients:
            await c.aclose()
    return {"concurrency": concurrency, "model": model, "duration_s": round(elapsed, 2), "requests": len(lat),
            "errors": errors, "requests_per_s": round(len(lat) / elapsed, 1),
            "latency_s": {"median": _pct(lat, 0.5), "p90": _pct(lat, 0.9), "p99": _pct(lat, 0.99)}}


def run_loadtest(url: str = "http://127.0.0.1:8000", streams: int = 100, duration: float = 10.0,
                 model: str | None = None, json_out: Path | None = None, api_key: str | None = None,
                 max_tokens: int = 100_000) -> dict:
    """Hold `streams` concurrent streams for `duration` s against a running server; print and return the figures."""
    _check_loopback(url)
    url = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    res = asyncio.run(stream_phase(url, streams, duration, model, headers, max_tokens))
    print(json.dumps(res, indent=2))
    if json_out is not None:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(res, indent=2) + "\n")
    return res


def bench_api_overhead(streams: int = 1000, duration: float = 20.0, pace_s: float = 0.25, rps_concurrency: int = 64,
                       rps_duration: float = 10.0, out: Path | None = None) -> dict:
    """The API-overhead figure: a PaceEngine server on loopback, then the stream and 1-token phases."""
    from controller.testing import LiveServer

    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"tokenpool-loadtest-{os.getpid()}"
    cfg = {"workers": {"local": "cpu"}, "metrics_public": True,
           "admission": {"max_queue_per_engine": 100_000},
           "models": [
               {"name": "pace", "engine": {"kind": "pace", "pace_s_per_token": pace_s, "max_num_seqs": 4096,
                                           "max_model_len": 1_000_000, "pace_stamp": True},
                "slo": {"ttft_s": 30, "tpot_s": 1}},
               {"name": "fast", "engine": {"kind": "pace", "pace_s_per_token": 0.0, "max_num_seqs": 4096}},
           ]}
    max_tokens = math.ceil(duration / pace_s) + 20
    with LiveServer(cfg, work) as srv:
        stream = asyncio.run(stream_phase(srv.url, streams, duration, "pace", {}, max_tokens))
        time.sleep(2)  # let the aborted streams drain
        rps = asyncio.run(rps_phase(srv.url, rps_concurrency, rps_duration, "fast", {}))
    med = stream["inter_token_s"]["median"]
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "command": "python -m load_tests.loadtest --bench " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["--bench"]
                                                                         else []),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "setup": {"engine": "PaceEngine (no model)", "pace_s_per_token": pace_s, "client": "httpx async, loopback",
                  "server": "uvicorn + FastAPI controller, one CPU engine worker process over TCP",
                  "note": "client, controller and worker share this machine's CPUs"},
        "streams": stream,
        # per streamed token, engine emission (PaceEngine stamp) to client arrival: worker -> controller -> HTTP
        "added_latency_per_token_ms": {k: None if v is None else round(v * 1000, 3)
                                       for k, v in stream["emission_to_arrival_s"].items() if k != "n"},
        # inter-token arrival minus the engine's pace (also includes the worker's own per-step work)
        "inter_token_minus_pace_ms": {
            "median": None if med is None else round((med - pace_s) * 1000, 3),
            "p90": None if stream["inter_token_s"]["p90"] is None else
            round((stream["inter_token_s"]["p90"] - pace_s) * 1000, 3)},
        "one_token_completions": rps,
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m load_tests.loadtest", description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", action="store_true", help="start a PaceEngine server and measure API overhead")
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--pace", type=float, default=0.25, help="--bench: engine seconds per token")
    ap.add_argument("--rps-concurrency", type=int, default=64)
    ap.add_argument("--rps-duration", type=float, default=10.0)
    ap.add_argument("--model", default=None)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.bench:
        bench_api_overhead(a.streams, a.duration, a.pace, a.rps_concurrency, a.rps_duration,
                           a.json or Path("bench/results/api_overhead_cpu.json"))
    else:
        run_loadtest(a.url, a.streams, a.duration, a.model, a.json, a.api_key)


if __name__ == "__main__":
    main()
