"""What every open dashboard gets once a second (controller.dashboard.views.snapshot, the rates of
controller.dashboard.activity), without a server."""

from __future__ import annotations

import json
from types import SimpleNamespace

from controller.dashboard import views
from controller.dashboard.activity import Rate


def test_the_snapshot_counts_every_request_in_flight_beyond_those_it_lists(monkeypatch):
    """The snapshot lists the oldest requests in flight (SNAPSHOT_REQUESTS, 500), and says how many there are: the
    page's Requests count was the list's length, 500 with 1,000 streams open."""
    reqs = [dict(id=f"cmpl-{i}", model="m", tenant="t", engines=["w0"], state="running", age_s=10.0 - i, tokens=1,
                 tokens_per_s=1.0, choices=1) for i in range(3)]
    monkeypatch.setattr(views, "requests_view", lambda ctl: reqs)
    monkeypatch.setattr(views, "pool_view", lambda ctl: SimpleNamespace(model_dump_json=lambda: "{}"))
    frames = [f.split("\n") for f in views.snapshot(None, max_requests=2).decode().split("\n\n") if f]
    assert [f[0] for f in frames] == ["event: pool", "event: inflight", "event: requests"]
    assert frames[1][1] == "data: 3"
    assert [r["id"] for r in json.loads(frames[2][1].removeprefix("data: "))] == ["cmpl-0", "cmpl-1"]


def test_a_rate_after_a_gap_in_the_reads_is_of_the_last_span_only():
    """Rates come from cumulative counts sampled at each read. After a gap (no dashboard open for an hour), the
    first reads measured from the sample before the gap: a model idle since showed the hour's average (0.1
    tokens/s) for the span's first seconds. Counts older than twice the span are dropped: it is measured afresh."""
    r = Rate(span_s=10.0)
    r.add(0.0, {"m": 0.0})
    assert r.add(1.0, {"m": 10.0}) == {"m": 10.0}
    assert r.add(3600.0, {"m": 370.0}) == {"m": 0.0}  # (nothing to measure from yet)
    assert r.add(3601.0, {"m": 370.0}) == {"m": 0.0}  # idle since: 0, not 360 tokens over the hour
    assert r.add(3602.0, {"m": 372.0}) == {"m": 1.0}
