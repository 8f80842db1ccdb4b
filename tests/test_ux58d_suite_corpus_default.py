"""`tokenpool suite corpus --url` of a server as a new user runs one: no authentication, no admin_token_hash (as the
embedded default `tokenpool serve` is), the admin token in the owner-only file the run wrote. The corpus reported
3 of its cases failed there, all the suite's own doing:

- "admin not json, with token" (400) and "drain a missing engine" (404) were 401s: the suite sent no admin token,
  where `tokenpool ps` reads the run's token file for a server on this machine;
- "metrics without token" expected a 401, where /metrics is open on a loopback listener without auth.
"""

from __future__ import annotations

from load_tests import faults
from tests import ports


def test_corpus_of_a_default_like_server_is_all_as_expected(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENPOOL_CACHE", str(tmp_path / "cache"))  # (where the server writes its token file)
    cfg = faults.paced_config(pace_s=0.001)
    del cfg["admin_token_hash"], cfg["tenants"]
    cfg["workers"]["standby"] = False
    with ports.live_server_on(range(24600, 24700), cfg, tmp_path / "work") as srv:
        with faults.target(srv.url) as t:
            out = faults.run_corpus(t)
    rows = {r["case"]: r for r in out["results"]}
    assert rows["admin not json, with token"]["status"] == 400
    assert rows["drain a missing engine"]["status"] == 404
    assert "metrics without token" not in rows
    assert {"case": "metrics without token", "skipped": "auth off"} in out["skipped"]
    assert out["as_expected"] == out["cases"], [r for r in out["results"] if not r["ok"]]
