"""The load test's own client against a live PaceEngine server: streams, stamps and 1-token requests are counted."""

from __future__ import annotations

import asyncio

import pytest

from load_tests.live_server import LiveServer
from load_tests.loadtest import rps_phase, stream_phase


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = {"workers": {"local": "cpu", "standby": False},
           "models": [{"name": "pace", "engine": {"kind": "pace", "pace_s_per_token": 0.05, "pace_stamp": True}}]}
    with LiveServer(cfg, tmp_path_factory.mktemp("loadtest")) as srv:
        yield srv


@pytest.mark.parametrize("client", ["raw", "httpx"])
def test_stream_phase_counts_tokens_and_stamps(server, client):
    res = asyncio.run(stream_phase(server.url, 4, 1.5, None, {}, 1000, client))
    assert res["errors"] == 0 and res["streams_held_max"] == 4
    lat = res["emission_to_arrival_s"]
    assert lat["n"] == res["tokens"] > 4 * 10 and 0 < lat["median"] < 1.0
    assert abs(res["inter_token_s"]["median"] - 0.05) < 0.02


def test_stream_phase_reports_refusals(server):
    res = asyncio.run(stream_phase(server.url, 2, 0.5, "no-such-model", {}, 10))
    assert res["errors"] == 2 and res["error_examples"][0].startswith("404")


def test_rps_phase(server):
    res = asyncio.run(rps_phase(server.url, 2, 1.0, "pace", {}))
    assert res["errors"] == 0 and res["requests"] > 0
