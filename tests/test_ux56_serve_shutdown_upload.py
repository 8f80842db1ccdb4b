"""A SIGTERM while a request's body is still arriving (a long prompt sent over a slow link): the client got a
plain-text "Internal Server Error" 500 after uvicorn's 5 s wait for connections, and the log an "Exception in ASGI
application" traceback (the task cancelled in its body read). It now gets the 503 in OpenAI's error JSON that new
requests get while the server drains, at once, and the server stops without a traceback."""

from __future__ import annotations

import json
import signal
import socket
import time

from load_tests import faults
from load_tests.live_server import LiveServer


def _response(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return got


def test_a_request_whose_body_is_still_arriving_at_shutdown_gets_a_503_json(tmp_path):
    # no workers: the request never gets past its body, and the server starts in a second
    cfg = faults.paced_config(workers={"local": "none"}, shutdown_grace_s=5)
    with LiveServer(cfg, tmp_path, wait_ready=False) as srv:
        faults._wait_log(srv, "listening on")
        body = json.dumps({"model": "pace", "messages": [{"role": "user", "content": "x" * 4000}]}).encode()
        sock = socket.create_connection(("127.0.0.1", srv.port))
        try:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
                         b"authorization: Bearer " + faults.SUITE_KEY.encode() + b"\r\n"
                         b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:1000])
            time.sleep(0.3)  # (the head is read; the rest of the body never comes)
            t0 = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            got = _response(sock, 15)
            took = time.monotonic() - t0
        finally:
            sock.close()
        assert srv.proc.wait(15) == 0
        log = srv.log()
    head, _, payload = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), got[:300]
    assert b"retry-after" in head.lower(), head
    err = json.loads(payload)["error"]
    assert err["code"] == "shutting_down" and "shutting down" in err["message"], err
    assert took < 4, f"answered {took:.1f} s after the signal (uvicorn's own wait for the connection is 5 s)"
    assert "Exception in ASGI application" not in log and "Traceback" not in log, log
