"""What open dashboards cost the controller (issue 18: 50 of them < 2% of its CPU under load).

    tokenpool suite dashboards [--streams 48 --dashboards 50 --duration 20 --rounds 3] [--json F]

Serving load: `streams` closed-loop streamed completions (the paced model). In alternating rounds of `duration`
seconds the controller runs with no dashboard and with `dashboards` event streams open as the page opens them
(/admin/events?snapshots=true); its own CPU time (/proc/PID/stat utime+stime: the workers are other processes)
is read over each round. The figure is the median of the rounds with dashboards over the median without, less
one. On a shared machine that ratio moves by several percent between identical runs (an A/A run, no dashboard in
either round, read -2.9%), so the part also reports the writer's own CPU in each round (the controller's
tokenpool_event_stream_cpu_seconds_total: the snapshots, the encoding, the socket writes) over the same
baseline: a floor of the dashboards' cost, without the noise. Each dashboard also times the `admit` events it
receives against their publish time (event to screen).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time

import httpx

from gpu_pool.inventory import cpu_name
from load_tests import sse_client
from load_tests.faults import Target, open_stream

TIMED = 3  # dashboards that parse every frame and time the events (the rest count snapshots)


def writer_cpu_s(t: Target) -> float | None:
    """The controller's event-stream writer's CPU seconds so far (None: a server without the counter)."""
    r = httpx.get(t.url + "/metrics", headers=t.admin_headers(), timeout=10)
    r.raise_for_status()
    for line in r.text.splitlines():
        if line.startswith("tokenpool_event_stream_cpu_seconds_total "):
            return float(line.split()[1])
    return None


def cpu_s(pid: int) -> float:
    """A process's CPU seconds so far (all its threads, not its children)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Dashboard:
    """One dashboard's event stream: counts snapshots; with `timed`, also times admit events from publish to
    arrival. Only a few dashboards parse frames: this client shares the machine with the controller, and 50
    parsers' CPU would crowd the controller's (on 2 cores that inflates its CPU time by a few percent and is
    not what the figure is about)."""

    def __init__(self, timed: bool = True) -> None:
        self.snapshots = 0
        self.delays: list[float] = []
        self.conn: sse_client.Connection | None = None
        self._buf = b""
        self.timed = timed

    def feed(self, data: bytes, _perf: float, wall: float) -> None:
        if not self.timed:  # a frame's marker split across two reads is missed: a liveness count, not a figure
            self.snapshots += data.count(b"event: pool")
            return
        self._buf += data
        *frames, self._buf = self._buf.split(b"\n\n")
        for f in frames:
            if f.startswith(b"event: pool"):
                self.snapshots += 1
            elif f.startswith(b"id: ") and b'"kind": "admit"' in f:
                t = f.find(b'"t": ')
                self.delays.append(wall - float(f[t + 5:f.index(b",", t)]))

    async def open(self, t: Target) -> None:
        host, port = t.host_port
        self.conn = await sse_client.connect(host, port)
        self.conn.request("GET", f"{host}:{port}", "/admin/events?snapshots=true", headers=t.admin_headers(),
                          on_data=self.feed)
        if await self.conn.head != 200:
            raise RuntimeError(f"/admin/events answered {self.conn.status}")


async def _measure(t: Target, streams: int, dashboards: int, duration: float, rounds: int, settle_s: float,
                   max_tokens: int) -> dict:
    load0 = os.getloadavg()
    stop = False
    served = [0]

    async def client() -> None:
        while not stop:
            s = await open_stream(t, max_tokens)
            served[0] += s.tokens

    clients = [asyncio.ensure_future(client()) for _ in range(streams)]
    await asyncio.sleep(2 * settle_s)  # every stream running before the first round
    rows = []
    try:
        for r in range(2 * rounds):
            # pairs in ABBA order (none then open, open then none, ...): a steady drift of the machine or of the
            # controller's own state (its CPU rose over the first rounds) cancels out of the paired ratios
            n = dashboards if (r % 2) != ((r // 2) % 2) else 0
            dash = [Dashboard(timed=i < TIMED) for i in range(n)]
            await asyncio.gather(*(d.open(t) for d in dash))
            await asyncio.sleep(settle_s)  # past the connections' first frames
            for d in dash:
                d.snapshots, d.delays = 0, []
            w0 = writer_cpu_s(t)  # (before the CPU reading: its /metrics is not in the round)
            c0, t0, s0 = cpu_s(t.server_pid), time.monotonic(), served[0]  # type: ignore[arg-type]
            await asyncio.sleep(duration)
            cpu, wall = cpu_s(t.server_pid) - c0, time.monotonic() - t0  # type: ignore[arg-type]
            w1 = writer_cpu_s(t)
            delays = [x for d in dash for x in d.delays]
            rows.append({"dashboards": n, "cpu_s": round(cpu, 3), "wall_s": round(wall, 3),
                         "writer_cpu_s": round(w1 - w0, 4) if w0 is not None and w1 is not None else None,
                         "tokens_per_s": round((served[0] - s0) / wall, 1),
                         "snapshots_per_dashboard_per_s": round(sum(d.snapshots for d in dash) / n / wall, 2) if n else None,
                         "event_to_screen_p50_s": round(statistics.median(delays), 3) if delays else None,
                         "event_to_screen_max_s": round(max(delays), 3) if delays else None})
            for d in dash:
                d.conn.close()  # type: ignore[union-attr]
    finally:
        stop = True
        await asyncio.gather(*clients, return_exceptions=True)
    base = statistics.median(x["cpu_s"] for x in rows if not x["dashboards"])
    dashed = statistics.median(x["cpu_s"] for x in rows if x["dashboards"])
    # each round with dashboards against the one without beside it (ABBA pairs): the machine's drift cancels
    pairs = [sorted(rows[i:i + 2], key=lambda x: x["dashboards"]) for i in range(0, len(rows) - 1, 2)]
    paired = [(b["cpu_s"] - a["cpu_s"]) / a["cpu_s"] for a, b in pairs]
    sem = statistics.stdev(paired) / len(paired) ** 0.5 if len(paired) > 1 else None
    writer = [x["writer_cpu_s"] for x in rows if x["dashboards"] and x["writer_cpu_s"] is not None]
    writer_s = statistics.median(writer) if writer else None
    return {"part": "dashboards", "streams": streams, "dashboards": dashboards, "duration_s": duration,
            "rounds": rounds, "max_tokens": max_tokens, "cpu": cpu_name(), "cpus": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in load0],
            "baseline_cpu_s": round(base, 3), "with_dashboards_cpu_s": round(dashed, 3),
            "extra_cpu_s": round(dashed - base, 3),
            "ratio": round((dashed - base) / base, 4), "ratio_paired_median": round(statistics.median(paired), 4),
            "ratio_paired": [round(x, 4) for x in paired], "ratio_paired_mean": round(statistics.mean(paired), 4),
            "ratio_paired_sem": round(sem, 4) if sem is not None else None, "extra_core_pct": round(100 * (dashed - base) / duration, 2),
            "writer_cpu_s": writer_s, "writer_ratio": round(writer_s / base, 4) if writer_s is not None else None,
            "event_to_screen_max_s": max((x["event_to_screen_max_s"] for x in rows if x["dashboards"]), default=None),
            "rows": rows}


def run_dashboard_cost(t: Target, streams: int = 48, dashboards: int = 50, duration: float = 20.0,
                       rounds: int = 3, settle_s: float = 1.5, max_tokens: int = 100) -> dict:
    if t.server_pid is None:
        raise SystemExit("the controller's pid is needed (--pid with --url) to read its CPU time")
    return asyncio.run(_measure(t, streams, dashboards, duration, rounds, settle_s, max_tokens))
