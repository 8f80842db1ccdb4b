"""Load test of the HTTP API: many concurrent streams, per-token latency vs the engine, 1-token req/s.

    tokenpool loadtest --url http://127.0.0.1:8000 --streams 1000 --duration 20     # against a running server
    python -m load_tests.loadtest --bench                                           # the API-overhead figure

`--bench` starts its own server on loopback whose engine is PaceEngine (a token every `pace` seconds for every
running request, no model, each token's text the wall-clock time it was emitted), so whatever the client sees
beyond the engine is the serving stack's overhead: the worker's output handling and protocol, the controller,
HTTP + SSE, and the kernel's loopback. Loopback only, bounded in count and time. The client is the lean one of
`load_tests.sse_client` unless `--client httpx` (which costs the shared CPUs ~20x more per event).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote, urlparse

from load_tests import sse_client
from load_tests.bench_common import cpu_model

# a PaceEngine token's whole text: "@<wall-clock time its step emitted it>"; a model's own text may begin with "@" too
PACE_STAMP = re.compile(rb'"text":"@(\d+\.\d+)"')

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
PER_CLIENT = 32
CLIENTS = ("raw", "httpx")


def _check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if host not in LOOPBACK:
        raise SystemExit(f"refusing to load-test {host!r}: loopback only")


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _summary(xs: list[float], scale: float = 1.0, digits: int = 6) -> dict:
    out = {q: None if (v := _pct(xs, f)) is None else round(v * scale, digits)
           for q, f in (("median", 0.5), ("p90", 0.9), ("p99", 0.99))}
    return dict(out, mean=round(statistics.fmean(xs) * scale, digits) if xs else None, n=len(xs))


class _Streams:
    """What every stream of a phase saw: SSE events as they arrive, split per stream by `Stream`."""

    def __init__(self, stop_at: float):
        self.stop_at = stop_at
        self.gaps: list[float] = []  # inter-token arrival gaps
        self.lat: list[float] = []  # arrival wall time - PaceEngine emission stamp
        self.ttfts: list[float] = []
        self.errors: list[str] = []
        self.live = 0
        self.tokens = 0
        self.requests = 0  # finished without an error (a request cut at the end of the phase counts)


class Stream:
    def __init__(self, s: _Streams, t0: float):
        self.s, self.t0 = s, t0
        self.buf = b""
        self.last: float | None = None
        self.counted = False
        self.over = asyncio.get_running_loop().create_future()  # set when the phase's time is up, or on error

    def feed(self, raw: bytes, now: float, wall: float) -> None:
        s = self.s
        self.buf += raw
        *events, self.buf = self.buf.split(b"\n\n")
        for ev in events:
            if not ev.startswith(b"data: {"):
                continue
            if b'"error"' in ev[:20]:
                s.errors.append(ev[:200].decode(errors="replace"))
                self._end()
                return
            s.tokens += 1
            m = PACE_STAMP.search(ev)
            if m is not None:
                s.lat.append(wall - float(m[1]))
            if self.last is None:
                s.ttfts.append(now - self.t0)
                if not self.counted:
                    s.live += 1
                    self.counted = True
            else:
                s.gaps.append(now - self.last)
            self.last = now
        if now >= s.stop_at:
            self._end()

    def _end(self) -> None:
        if not self.over.done():
            self.over.set_result(None)

    def close(self) -> None:
        if self.counted:
            self.s.live -= 1
            self.counted = False


async def _one_raw(s: _Streams, url: str, body: dict, headers: dict[str, str], timeout: float) -> None:
    u = urlparse(url)
    st = Stream(s, time.perf_counter())
    conn = None
    try:
        conn = await sse_client.connect(u.hostname, u.port or 80)
        errbody = bytearray()
        fut = conn.request("POST", u.netloc, "/v1/completions", body, headers,
                           on_data=lambda b, now, wall: st.feed(b, now, wall) if conn.status == 200 else errbody.extend(b))
        await asyncio.wait([fut, st.over], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if conn.status != 200:
            if not fut.done():
                await asyncio.wait_for(fut, 10)
            s.errors.append(f"{conn.status}: {bytes(errbody[:200])!r}")
        elif fut.done() and not fut.cancelled() and fut.exception() is not None:
            s.errors.append(f"{type(fut.exception()).__name__}: {fut.exception()}")
    except (OSError, ConnectionError, asyncio.TimeoutError, sse_client.HTTPError) as e:
        s.errors.append(f"{type(e).__name__}: {e}")
    finally:
        st.close()
        if conn is not None:
            conn.close()


def _httpx_clients(n: int, headers: dict[str, str], timeout: float) -> list:
    import httpx

    # httpx's connection pool costs O(connections) per request: shard the streams over small clients
    return [httpx.AsyncClient(limits=httpx.Limits(max_connections=PER_CLIENT + 1), headers=headers,
                              timeout=httpx.Timeout(timeout)) for _ in range(math.ceil(n / PER_CLIENT))]


async def _one_httpx(s: _Streams, client, url: str, body: dict) -> None:
    import httpx

    st = Stream(s, time.perf_counter())
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                s.errors.append(f"{r.status_code}: {(await r.aread())[:200]!r}")
                return
            async for raw in r.aiter_raw():
                st.feed(raw, time.perf_counter(), time.time())
                if st.over.done():
                    return
    except (httpx.HTTPError, OSError) as e:
        s.errors.append(f"{type(e).__name__}: {e}")
    finally:
        st.close()


async def _first_model(url: str, headers: dict[str, str], model: str | None = None) -> str:
    """The first model /v1/models lists, or `model` checked (GET /v1/models/MODEL): SystemExit in one line where the
    server serves none, or not `model`, to this key (a load test then counted a refusal per request for its whole
    duration, and one of a server without models was an IndexError)."""
    u = urlparse(url)

    async def get(path: str):
        conn = await sse_client.connect(u.hostname, u.port or 80)
        try:
            return await conn.request("GET", u.netloc, path, headers=headers)
        finally:
            conn.close()

    path = "/v1/models" if model is None else f"/v1/models/{quote(model, safe='/')}"
    status, _, body = await get(path)
    if status == 404 and model is not None:  # said as `tokenpool run` says it, with what this key may use
        from controller.ps import not_found

        st, _, listed = await get("/v1/models")
        if st == 200:
            raise SystemExit(not_found(model, [m["id"] for m in json.loads(listed).get("data") or []]))
    if status != 200:
        try:
            said = json.loads(body)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            said = repr(body[:200])
        hint = " (pass --api-key or set TOKENPOOL_API_KEY)" if status == 401 else ""  # (as the other client commands)
        raise SystemExit(f"GET {path}: {status} {said}{hint}")
    if model is not None:
        return model
    listed = json.loads(body).get("data") or []
    if not listed:
        raise SystemExit(f"{url} serves no model (GET /v1/models lists none): nothing to load-test")
    return listed[0]["id"]


async def stream_phase(url: str, streams: int, duration: float, model: str | None, headers: dict[str, str],
                       max_tokens: int, client: str = "raw", on_window=None) -> dict:
    """`streams` concurrent streaming completions held for `duration` seconds; per-token arrival figures.

    `on_window(tokens_so_far)`, if given, is called at 40% and 90% of the duration (CPU accounting).
    """
    model = model or await _first_model(url, headers)
    s = _Streams(time.perf_counter() + duration)
    live_samples: list[int] = []
    body = lambda i: {"model": model, "prompt": f"stream {i}", "max_tokens": max_tokens, "stream": True,
                      "ignore_eos": True}
    clients = _httpx_clients(streams, headers, duration + 60) if client == "httpx" else []

    async def sample() -> None:
        marks = [0.4 * duration, 0.9 * duration]
        t0 = time.perf_counter()
        while time.perf_counter() < s.stop_at:
            live_samples.append(s.live)
            if marks and time.perf_counter() - t0 >= marks[0]:
                marks.pop(0)
                if on_window is not None:
                    on_window(s.tokens)
            await asyncio.sleep(0.05)

    async def slot(i: int) -> None:
        """One stream: a request, and another as soon as it ends (a short max_tokens), until the time is up or
        a request fails."""
        while time.perf_counter() < s.stop_at:
            errors = len(s.errors)
            if client == "httpx":
                await _one_httpx(s, clients[i % len(clients)], url, body(i))
            else:
                await _one_raw(s, url, body(i), headers, max(0.0, s.stop_at - time.perf_counter()) + 60)
            if len(s.errors) > errors:
                return
            s.requests += 1

    t_begin = time.perf_counter()
    try:
        await asyncio.gather(sample(), *(slot(i) for i in range(streams)))
    finally:
        for c in clients:
            await c.aclose()
    elapsed = time.perf_counter() - t_begin
    steady = live_samples[len(live_samples) // 3:] or [0]  # after the ramp
    return {
        "streams_requested": streams, "model": model, "client": client, "duration_s": round(elapsed, 2),
        "streams_held_min_steady": min(steady), "streams_held_max": max(live_samples or [0]),
        "requests": s.requests, "tokens": s.tokens, "tokens_per_s": round(s.tokens / elapsed, 1), "errors": len(s.errors),
        "error_examples": s.errors[:3],
        "inter_token_s": _summary(s.gaps),
        "ttft_s": _summary(s.ttfts),
        "emission_to_arrival_s": _summary(s.lat),
    }


async def rps_phase(url: str, concurrency: int, duration: float, model: str | None, headers: dict[str, str],
                    client: str = "raw") -> dict:
    """Closed loop of non-streaming 1-token completions from `concurrency` clients for `duration` seconds."""
    u = urlparse(url)
    model = model or await _first_model(url, headers)
    lat: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + duration

    async def loop_raw(i: int) -> None:
        nonlocal errors
        body = {"model": model, "prompt": f"r{i}", "max_tokens": 1}
        conn = await sse_client.connect(u.hostname, u.port or 80)
        try:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    if conn.closed:
                        conn = await sse_client.connect(u.hostname, u.port or 80)
                    status, _, _ = await asyncio.wait_for(conn.request("POST", u.netloc, "/v1/completions", body,
                                                                       headers), 60)
                    ok = status == 200
                except (OSError, ConnectionError, asyncio.TimeoutError, sse_client.HTTPError):
                    ok = False
                    conn.close()
                if ok:
                    lat.append(time.perf_counter() - t0)
                else:
                    errors += 1
        finally:
            conn.close()

    async def loop_httpx(i: int, c) -> None:
        import httpx

        nonlocal errors
        body = {"model": model, "prompt": f"r{i}", "max_tokens": 1}
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                ok = (await c.post(url + "/v1/completions", json=body)).status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                lat.append(time.perf_counter() - t0)
            else:
                errors += 1

    t0 = time.perf_counter()
    if client == "httpx":
        import httpx

        clients = [httpx.AsyncClient(timeout=60, headers=headers) for _ in range(concurrency)]  # one connection each
        try:
            await asyncio.gather(*(loop_httpx(i, clients[i]) for i in range(concurrency)))
        finally:
            for c in clients:
                await c.aclose()
    else:
        await asyncio.gather(*(loop_raw(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - t0
    return {"concurrency": concurrency, "model": model, "client": client, "duration_s": round(elapsed, 2),
            "requests": len(lat), "errors": errors, "requests_per_s": round(len(lat) / elapsed, 1),
            "latency_s": _summary(lat)}


def _run(coro):
    """asyncio.run on uvloop when it is installed (the client's own loop overhead is part of what it measures)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


DEFAULT_MAX_TOKENS = 64  # what a real model's context takes beside a short prompt; a stream asks again when done


def run_loadtest(url: str = "http://127.0.0.1:8000", streams: int = 100, duration: float = 10.0,
                 model: str | None = None, json_out: Path | None = None, api_key: str | None = None,
                 max_tokens: int = DEFAULT_MAX_TOKENS, client: str = "raw") -> dict:
    """Hold `streams` concurrent streams for `duration` s against a running server; print and return the figures.
    Each stream sends one request after another (`max_tokens` each, EOS ignored) until the time is up."""
    _check_loopback(url)
    url = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    model = _run(_first_model(url, headers, model))
    res = _run(stream_phase(url, streams, duration, model, headers, max_tokens, client))
    print(json.dumps(res, indent=2))
    if json_out is not None:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(res, indent=2) + "\n")
    return res


# --- the API-overhead benchmark ---
def _cpu_s(pid: int | str = "self") -> float:
    """User + system CPU seconds of a process (from /proc)."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def _busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores, from /proc/stat)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(f) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, ValueError, IndexError):
                pass
    return out


class _CpuWindow:
    """CPU per streamed token of each process over a steady window of a stream phase (two `mark` calls)."""

    def __init__(self, pids: dict[str, int | str]):
        self.pids = pids
        self.marks: list[tuple[float, int, dict[str, float], float]] = []

    def mark(self, tokens: int) -> None:
        self.marks.append((time.perf_counter(), tokens, {k: _cpu_s(p) for k, p in self.pids.items()}, _busy_s()))

    def result(self) -> dict | None:
        if len(self.marks) < 2:
            return None
        (t0, n0, c0, b0), (t1, n1, c1, b1) = self.marks[:2]
        n = max(1, n1 - n0)
        ours = sum(c1[k] - c0[k] for k in c0)
        tick = 1 / os.sysconf("SC_CLK_TCK")
        # fewer than 5 clock ticks of CPU is below what /proc can resolve: no figure rather than a wrong one
        return {"window_s": round(t1 - t0, 2), "tokens": n1 - n0, "resolution_us_per_token": round(1e6 * tick / n, 1),
                "us_per_token": {k: round(1e6 * (c1[k] - c0[k]) / n, 1) if c1[k] - c0[k] >= 5 * tick else None
                                 for k in c0},
                "cores_busy": {k: round((c1[k] - c0[k]) / (t1 - t0), 3) for k in c0},
                # other processes on this machine during the window (the CPUs are shared)
                "other_processes_cores_busy": round(max(0.0, (b1 - b0) - ours) / (t1 - t0), 3)}


def _load_point(stream: dict, pace_s: float, cpu: dict | None) -> dict:
    it, lat = stream["inter_token_s"], stream["emission_to_arrival_s"]
    ms = lambda v, off=0.0: None if v is None else round((v - off) * 1000, 3)
    return {
        "streams": stream["streams_requested"],
        "added_latency_per_token_ms": {q: ms(lat[q]) for q in ("median", "p90", "p99")},
        "inter_token_minus_pace_ms": {q: ms(it[q], pace_s) for q in ("median", "p90", "p99")},
        "cpu_per_token": cpu,
        "raw": stream,
    }


def bench_api_overhead(streams: list[int] | int = (100, 1000), duration: float = 20.0, pace_s: float = 0.5,
                       rps_concurrency: int = 64, rps_duration: float = 10.0, out: Path | None = None,
                       client: str = "raw") -> dict:
    """The API-overhead figure: a PaceEngine server on loopback, stream phases at each load, then 1-token req/s."""
    from load_tests.live_server import LiveServer

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
    points = []
    loadavg = Path("/proc/loadavg").read_text().split()[:3]
    with LiveServer(cfg, work) as srv:
        workers = _children(srv.proc.pid)
        pids: dict[str, int | str] = {"controller": srv.proc.pid, "client": "self"}
        if len(workers) == 1:
            pids["worker"] = workers[0]
        for n in ([streams] if isinstance(streams, int) else streams):
            cpu = _CpuWindow(pids)
            stream = _run(stream_phase(srv.url, n, duration, "pace", {}, max_tokens, client, cpu.mark))
            points.append(_load_point(stream, pace_s, cpu.result()))
            time.sleep(2)  # let the aborted streams drain
        rps = _run(rps_phase(srv.url, rps_concurrency, rps_duration, "fast", {}, client))
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "command": "python -m load_tests.loadtest " + shlex.join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "cpu_model": cpu_model(), "python": platform.python_version(),
                    "platform": platform.platform(), "loadavg_before": loadavg},
        "setup": {"engine": "PaceEngine (no model)", "pace_s_per_token": pace_s, "duration_s": duration,
                  "client": f"{client} ({'load_tests.sse_client, asyncio Protocol' if client == 'raw' else 'httpx'}"
                            ", uvloop), loopback",
                  "server": "uvicorn + FastAPI controller, one CPU engine worker process over TCP",
                  "note": "client, controller and worker share this machine's CPUs"},
        "metrics": {
            "added_latency_per_token_ms": "per streamed token: the client's wall-clock time when its SSE event "
                                          "reached the client's event loop minus the wall-clock time the engine "
                                          "emitted it (PaceEngine stamps it into the token text). Everything "
                                          "between: worker output handling + protocol + TCP + controller + "
                                          "HTTP/SSE + TCP + client read. A step emits one token for every stream "
                                          "at once and they are sent one after another, so at N streams the "
                                          "median token also waits behind ~N/2 others",
            "inter_token_minus_pace_ms": "per streamed token after the first: the gap since the stream's previous "
                                         "token at the client minus the engine's pace (jitter the stack adds "
                                         "to the cadence; ~0 on average whenever it keeps up)",
            "cpu_per_token": "CPU seconds of each process per streamed token over the steady window (40%-90% "
                             "of the phase); resolution 1/CLK_TCK",
        },
        "summary": {
            "added_latency_per_token_median_ms": {p["streams"]: p["added_latency_per_token_ms"]["median"] for p in points},
            "inter_token_minus_pace_median_ms": {p["streams"]: p["inter_token_minus_pace_ms"]["median"] for p in points},
            "controller_cpu_us_per_token": {p["streams"]: (p["cpu_per_token"] or {}).get("us_per_token", {})
                                            .get("controller") for p in points},
            "streams_held": {p["streams"]: p["raw"]["streams_held_min_steady"] for p in points},
            "one_token_requests_per_s": rps["requests_per_s"],
        },
        "load_points": points,
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
    ap.add_argument("--streams", default=None,
                    help="concurrent streams; --bench: a comma-separated list of load points (default 100,1000)")
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--pace", type=float, default=0.5, help="--bench: engine seconds per token")
    ap.add_argument("--rps-concurrency", type=int, default=64)
    ap.add_argument("--rps-duration", type=float, default=10.0)
    ap.add_argument("--client", choices=CLIENTS, default="raw")
    ap.add_argument("--model", default=None)
    ap.add_argument("--api-key", default=os.environ.get("TOKENPOOL_API_KEY"), help="tenant key (or TOKENPOOL_API_KEY)")
    ap.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="per request (not with --bench)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.bench:
        streams = [int(x) for x in (a.streams or "100,1000").split(",")]
        bench_api_overhead(streams, a.duration, a.pace, a.rps_concurrency, a.rps_duration,
                           a.json or Path("bench/results/api_overhead_cpu.json"), a.client)
    else:
        res = run_loadtest(a.url, int(a.streams or 100), a.duration, a.model, a.json, a.api_key, a.max_tokens,
                           client=a.client)
        if res["tokens"] == 0:
            sys.exit(f"no tokens received ({res['errors']} errors; e.g. {res['error_examples'][:1]})")


if __name__ == "__main__":
    main()
