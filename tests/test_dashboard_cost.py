"""Open dashboards do not slow serving (issue 18: 50 of them cost < 2% of the controller's CPU under load).

What makes that hold is structural and is asserted here exactly: one Hub writes for every connection, so per
beat its work (events encoded, snapshots built) does not grow with the number of dashboards; every connection
is handed the very same bytes object (nothing encoded or joined per subscriber); and under a flood of routine
events a dashboard gets one write a tick, while an operator's event still goes out within a beat.
The figure itself is a benchmark, `tokenpool suite dashboards` (bench/results/dashboard_cost_cpu.json): on a
shared 2-core CI machine the controller's CPU time moves by 10-15% between identical rounds, so the live test
below bounds it only generously, and checks that the dashboards were live while it measured.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from controller.dashboard.stream import Hub, snapshot_frame
from controller.events import EventBus
from load_tests.dashboard_cost import run_dashboard_cost
from load_tests.faults import target
from tests.conftest import Listener

BEAT_S = 0.05


async def watch(n: int, beats: int, urgent_at: int | None = None, tick_beats: int = 2) -> dict:
    """n dashboards on one hub (a tick of `tick_beats` beats) while routine events flood the bus for `beats` beats;
    what each received."""
    bus = EventBus()
    builds = [0]

    def build() -> bytes:
        builds[0] += 1
        return snapshot_frame("pool", b'{"n": %d}' % builds[0])

    hub = Hub(bus, build, beat_s=BEAT_S, tick_beats=tick_beats, heartbeat_s=60)
    conns = [Listener(hub, None, snapshots=True) for _ in range(n)]
    for c in conns:
        await c.next()
        c.got.clear()  # (each connection's first write is its own: RETRY and the snapshot joined)
    published, t_urgent = 0, None
    t0 = time.monotonic()
    while time.monotonic() - t0 < beats * BEAT_S:
        for _ in range(5):
            bus.publish("admit", model="m", tenant="t", request_id=f"r{published}")
            published += 1
        if urgent_at is not None and t_urgent is None and time.monotonic() - t0 > urgent_at * BEAT_S:
            bus.publish("pin", model="m")
            published, t_urgent = published + 1, time.monotonic()
        await asyncio.sleep(0.002)
    await asyncio.sleep(3 * BEAT_S)  # the last tick
    for c in conns:
        c.close()
    assert not hub.conns
    return dict(hub=hub, builds=builds[0], published=published, got=[c.got for c in conns], t_urgent=t_urgent,
                elapsed=time.monotonic() - t0)


def test_per_beat_work_does_not_grow_with_the_dashboards():
    one, fifty = asyncio.run(watch(1, 20)), asyncio.run(watch(50, 20))
    for r in (one, fifty):
        # every event encoded once, whatever the number of connections; every one of them delivered to each
        assert r["hub"].frames.encoded == r["published"]
        for g in r["got"]:
            assert sum(c.count(b"\nid: ") + c.startswith(b"id: ") for _, c in g) == r["published"]
        # one snapshot build a tick (and one when the first dashboard came), not one per dashboard
        # (50 dashboards building their own snapshot would be ~50 a tick; the bound is on the run's own
        # ticks, since a loaded CI machine stretches one run more than the other: a fixed difference between
        # the two runs' counts flaked, 15 against 12, on a run that took longer)
        assert 1 <= r["builds"] <= r["elapsed"] / (2 * BEAT_S) + 2
    # the bytes every connection writes at a beat are one object, built once: the same ids for all 50
    per_conn = [[id(c) for _, c in g] for g in fifty["got"]]
    assert all(ids == per_conn[0] for ids in per_conn), "a connection wrote bytes of its own"


def test_a_routine_flood_is_one_write_a_tick_and_an_operator_event_goes_out_within_a_beat():
    # a tick of 40 beats (2 s, on a grid from the hub's start) and the pin 1.5 s in: held for the tick it would go
    # out ~0.5 s later; within a beat it goes out in 0.05 s (bounded at 0.3 s: a loaded 2-core CI machine took
    # 0.19 s once, which a bound of 3 beats with a tick of 2 failed and could not tell from a tick anyway)
    r = asyncio.run(watch(10, 60, urgent_at=30, tick_beats=40))
    ticks = r["elapsed"] / (40 * BEAT_S)
    for g in r["got"]:
        # ~250 admit events a second: one write a tick, plus the one the pin event asked for
        assert len(g) <= ticks + 3, len(g)
        t_pin = next(t for t, c in g if b'"kind": "pin"' in c)
        assert t_pin - r["t_urgent"] < 6 * BEAT_S  # a beat, not a tick


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads CPU time from /proc")
def test_fifty_dashboards_under_48_streams_stay_live_and_serving_goes_on():
    with target(max_num_seqs=64) as t:
        # one round without dashboards and one with them: nothing below compares rounds (the pairs' CPU ratio is
        # the benchmark's), and two more rounds were 13 s of the suite; 3 s a round, not 5: each bound below is a
        # rate or a ratio of the same round (three ticks of snapshots a dashboard and more), 4 s of the suite; 1 s to
        # settle (2 s before the first round), not the benchmark's 1.5: 3 s of the suite
        r = run_dashboard_cost(t, streams=48, dashboards=50, duration=3.0, rounds=1, settle_s=1.0)
    print(f"\ncontroller CPU over {r['duration_s']} s: {r['baseline_cpu_s']} s serving, {r['with_dashboards_cpu_s']} s "
          f"with {r['dashboards']} dashboards: {100 * r['ratio']:+.1f}% (paired {100 * r['ratio_paired_median']:+.1f}%; "
          f"the writer's own {100 * r['writer_ratio']:.1f}%)")
    dashed = [x for x in r["rows"] if x["dashboards"]]
    # Behaviour, not timing (the CPU figure is a benchmark: `tokenpool suite dashboards`, bench/results/
    # dashboard_cost_cpu.json; one round's noise on a shared 2-core machine is 10-30%). That 50 dashboards cost
    # one encode per frame and the same bytes to every connection is asserted exactly by the tests above.
    assert all(x["tokens_per_s"] > 0.5 * 48 * 100 for x in r["rows"])  # serving went on
    assert all(x["snapshots_per_dashboard_per_s"] >= 0.5 for x in dashed)  # every dashboard stayed live
    assert r["event_to_screen_max_s"] < 3.0  # a routine event rides the next tick (0.9 s), plus a loaded client
    # the writer's own CPU (snapshots, encoding, socket writes) is counted where it is spent, without the
    # rounds' noise: bounded, generously (about 1.5% on the 2-core CPU)
    assert 0 < r["writer_ratio"] < 0.05, r["writer_ratio"]
