"""controller.dashboard.views.snapshot, the frames every open dashboard gets once a second, without a server."""

from __future__ import annotations

import json
from types import SimpleNamespace

from controller.dashboard import views


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
