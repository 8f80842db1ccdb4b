"""An operator's cancel (POST /admin/requests/{id}/cancel) against a live `tokenpool serve`, with the official `openai`
client as users run it (its default retries on): the request ends once, and is not sent again by the client."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from controller.keys import hash_key
from load_tests.live_server import LiveServer

ADMIN = "admin-cancel-live"
ADM = {"Authorization": f"Bearer {ADMIN}"}
KEY = "key-cancel-abcdefghijklmnop"



@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = {"admin_token_hash": hash_key(ADMIN),
           "workers": {"local": "cpu", "standby": False},
           "forwarded_allow_ips": [],  # (test_forwarded_allow_ips_reaches_the_server)
           "tenants": [{"name": "t", "key_hashes": [hash_key(KEY)]}],
           "models": [{"name": "pace", "engine": {"kind": "pace", "pace_s_per_token": 0.02}}]}
    with LiveServer(cfg, tmp_path_factory.mktemp("srv")) as srv:
        yield srv


def _in_flight(srv) -> list[dict]:
    return httpx.get(srv.url + "/admin/requests", headers=ADM, timeout=5).json()


def _cancel_first(srv, running: bool = False) -> str:
    """Cancel the first request in flight (`running`: once it has made a token; one cancelled before its first
    token is charged nothing, as a refused one)."""
    deadline = time.monotonic() + 20
    while not (reqs := _in_flight(srv)) or (running and not reqs[0]["tokens"]):
        assert time.monotonic() < deadline, "the request never showed (running) in /admin/requests"
        time.sleep(0.05)
    r = httpx.post(srv.url + f"/admin/requests/{reqs[0]['id']}/cancel", headers=ADM, timeout=5)
    assert r.status_code == 200, r.text
    return reqs[0]["id"]


def _usage(srv) -> dict:
    return httpx.get(srv.url + "/v1/usage", headers={"Authorization": f"Bearer {KEY}"}, timeout=5).json()


def test_a_cancelled_request_is_not_retried_by_the_client(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, timeout=60)  # max_retries: its default, 2
    before = _usage(server)["requests"]
    out: dict = {}

    def run() -> None:
        try:
            client.completions.create(model="pace", prompt="x", max_tokens=300)  # ~6 s
            out["end"] = "complete"
        except openai.APIError as e:
            out["end"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    _cancel_first(server, running=True)
    t.join(20)
    assert not t.is_alive()
    err = out["end"]
    assert isinstance(err, openai.APIStatusError), err
    assert err.body["code"] == "request_cancelled" and "cancelled by an operator" in err.message
    assert "engine failure" not in err.message
    time.sleep(0.5)
    assert _in_flight(server) == []  # nothing sent again
    assert _usage(server)["requests"] == before + 1


def test_a_cancelled_stream_ends_with_an_error_event(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, timeout=60)
    stream = client.chat.completions.create(model="pace", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=300, stream=True)
    next(iter(stream))
    _cancel_first(server)
    with pytest.raises(openai.APIError) as ei:
        for _ in stream:
            pass
    assert ei.value.body["code"] == "request_cancelled" and ei.value.body["type"]
    assert _in_flight(server) == []


def test_forwarded_allow_ips_reaches_the_server(server):
    """`forwarded_allow_ips: []` trusts no proxy, not even one on this host (uvicorn's default trusts loopback):
    a loopback peer's X-Forwarded-Proto: https no longer makes the dashboard's session cookie Secure."""
    r = httpx.post(server.url + "/dashboard/login", data={"token": ADMIN}, headers={"X-Forwarded-Proto": "https"})
    assert r.status_code == 303, r.text
    assert "secure" not in {a.strip().lower() for a in r.headers["set-cookie"].split(";")[1:]}
