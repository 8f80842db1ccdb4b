"""Defects of issue 16 that only a real `tokenpool serve` process shows: SIGTERM, disconnects, the log."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import httpx
import pytest
import yaml

from controller.keys import hash_key
from load_tests.live_server import REPO_ROOT, LiveServer

ADMIN = "admin-live-hardening"
ADM = {"Authorization": f"Bearer {ADMIN}"}

PACE = {"name": "pace", "engine": {"kind": "pace", "pace_s_per_token": 0.02, "max_num_seqs": 256}}
ENV = dict(os.environ, PYTHONPATH=str(REPO_ROOT))


def _running(srv) -> int:
    """Requests the controller still holds, and requests the engine still runs."""
    engines = httpx.get(srv.url + "/admin/engines", headers=ADM, timeout=5).json()
    return sum(e["inflight"] + sum(s.get("num_running", 0) + s.get("num_waiting", 0) for s in e["stats"].values())
               for e in engines)


def _stream(url: str, max_tokens: int, out: dict) -> None:
    """Read one streamed completion to its end: out gets the data payloads and any transport error."""
    events = []
    try:
        with httpx.stream("POST", url + "/v1/completions", timeout=60,
                          json={"model": "pace", "prompt": "x", "max_tokens": max_tokens, "stream": True}) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    out["first"] = True
    except httpx.HTTPError as e:
        out["transport_error"] = repr(e)
    out["events"] = events


def _streaming(url: str, out: dict) -> threading.Thread:
    """A long stream (`_stream`, 3000 tokens) in a thread, returned once its first token came."""
    th = threading.Thread(target=_stream, args=(url, 3000, out))
    th.start()
    deadline = time.monotonic() + 20
    while not out.get("first"):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return th


def test_sigterm_drains_in_flight_streams_then_exits_0(tmp_path):
    """A server started under nohup (SIGHUP ignored from its start): a SIGHUP does nothing, it keeps serving. Then
    SIGTERM: the streams in flight get the grace to finish, those it cuts end with an error event, and it exits 0."""
    # (a grace of 3 s: the short stream's 0.8 s left took over 1.5 s on a loaded 2-core CI host, session 68)
    cfg = {"admin_token_hash": hash_key(ADMIN), "workers": {"local": "cpu", "standby": False}, "shutdown_grace_s": 3.0,
           "models": [PACE]}
    with LiveServer(cfg, tmp_path, ignore_hangup=True) as srv:
        os.kill(srv.proc.pid, signal.SIGHUP)
        time.sleep(0.5)  # (nothing should happen: give a wrong handler the time to act)
        r = httpx.post(srv.url + "/v1/completions", json={"model": "pace", "prompt": "x", "max_tokens": 2}, timeout=10)
        assert r.status_code == 200 and srv.proc.poll() is None
        assert httpx.get(srv.url + "/health", timeout=10).json()["status"] != "draining"
        short, long_ = {}, {}
        ts = [threading.Thread(target=_stream, args=(srv.url, 40, short)),     # ~0.8 s: finishes in the grace
              threading.Thread(target=_stream, args=(srv.url, 3000, long_))]   # ~60 s: cut at the grace's end
        [t.start() for t in ts]
        deadline = time.monotonic() + 20
        while not (short.get("first") and long_.get("first")):
            assert time.monotonic() < deadline, (short, long_)
            time.sleep(0.02)
        t_sig = time.monotonic()
        os.kill(srv.proc.pid, signal.SIGTERM)
        time.sleep(0.2)
        r = httpx.post(srv.url + "/v1/completions", json={"model": "pace", "prompt": "x", "max_tokens": 1}, timeout=10)
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["code"] == "shutting_down"
        assert httpx.get(srv.url + "/health", timeout=10).json()["status"] == "draining"
        [t.join(30) for t in ts]
        rc = srv.proc.wait(30)
        took = time.monotonic() - t_sig
        log = srv.log()
    assert "draining" not in log.split("listening on", 1)[-1].split("signal 15", 1)[0], log  # (not on the SIGHUP)
    assert rc == 0, log
    assert "transport_error" not in short and short["events"][-1] == "[DONE]"
    assert json.loads(short["events"][-2])["choices"][0]["finish_reason"] == "length"
    assert "transport_error" not in long_ and long_["events"][-1] == "[DONE]", long_.get("transport_error")
    err = json.loads(long_["events"][-2])["error"]
    assert "shutting down" in err["message"] and err["type"] == "service_unavailable_error"
    # as a new request's refusal names it (it said "engine failure: ..." and engine_unavailable)
    assert err["code"] == "shutting_down" and not err["message"].startswith("engine failure"), err
    assert 3.0 <= took < 14, took
    assert "Traceback" not in log
    # the log counts them in words a person reads (it said "1 requests")
    assert "draining; 2 requests in flight get 3 s to finish" in log and "ended 1 request with an error" in log, log


def test_non_streaming_disconnects_log_no_traceback(tmp_path):
    """Clients that give up on their completions leave no traceback in the log; the server, idle again, stops on
    SIGTERM with exit 0 and a clean, quiet stop."""
    cfg = {"admin_token_hash": hash_key(ADMIN), "workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "models": [PACE]}
    with LiveServer(cfg, tmp_path) as srv:
        def go():
            try:  # the client gives up after 0.3 s of a ~4 s completion and closes its connection
                httpx.post(srv.url + "/v1/completions", timeout=0.3,
                           json={"model": "pace", "prompt": "x", "max_tokens": 200})
            except httpx.TimeoutException:
                pass

        ts = [threading.Thread(target=go) for _ in range(40)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        deadline = time.monotonic() + 5
        while _running(srv):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        r = httpx.post(srv.url + "/v1/completions", json={"model": "pace", "prompt": "x", "max_tokens": 2}, timeout=10)
        assert r.status_code == 200
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
        os.kill(srv.proc.pid, signal.SIGTERM)
        rc = srv.proc.wait(30)
        log = srv.log()
    assert "Traceback" not in log and "Exception in ASGI" not in log and "CancelledError" not in log, log
    assert rc == 0, log
    assert "WARNING" not in log.split("draining", 1)[-1], log  # a clean, quiet stop




@pytest.fixture(scope="module")
def http_only(tmp_path_factory):
    """A server without workers (the HTTP layer's answers need none), a 4 KiB request limit: for the tests of what
    the real server answers to bodies over the limit and to bytes that are no HTTP. Each opens its own connection."""
    cfg = {"admin_token_hash": hash_key(ADMIN), "workers": {"local": "none"}, "max_request_bytes": 4096,
           "models": [PACE]}
    with LiveServer(cfg, tmp_path_factory.mktemp("http-only"), wait_ready=False) as srv:
        _wait_listening(srv)
        yield srv


def test_chunked_body_over_the_limit_gets_413_json_from_the_real_server(http_only):
    srv = http_only
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 1024
        body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(6)) + b"0\r\n\r\n"
        s.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < 20:
            got = s.recv(65536)
            if not got:
                break
            data += got
    status_line, rest = data.split(b"\r\n", 1)
    assert status_line.split()[1] == b"413", data
    body = json.loads(rest.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "request_too_large" and body["error"]["type"] == "invalid_request_error"


def _wait_listening(srv, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while "listening on" not in srv.log():
        assert time.monotonic() < deadline and srv.proc.poll() is None, srv.log()
        time.sleep(0.1)


def test_admin_token_goes_to_a_private_file_not_the_log(tmp_path):
    token_file = tmp_path / "secret" / "admin-token"
    cfg = {"workers": {"local": "none"}, "admin_token_file": str(token_file), "models": [PACE]}
    with LiveServer(cfg, tmp_path, wait_ready=False) as srv:
        _wait_listening(srv)
        token = token_file.read_text().strip()
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert httpx.get(srv.url + "/admin/engines", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        log = srv.log()
        assert token not in log and str(token_file) in log
        assert f"listening on http://127.0.0.1:{srv.port}" in log
        with httpx.Client(base_url=srv.url) as c:  # the pre-bound socket keeps TCP_NODELAY: no 40 ms Nagle stalls
            lat = []
            for _ in range(20):
                t0 = time.perf_counter()
                c.get("/health")
                lat.append(time.perf_counter() - t0)
        assert sorted(lat)[10] < 0.02, lat
    assert not token_file.exists()  # the token was for that run only


def _serve(config: dict | str | None, tmp_path, timeout: float = 60) -> subprocess.CompletedProcess:
    path = tmp_path / "config.yaml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "controller.serve", "--config", str(path)], cwd=REPO_ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def test_a_port_in_use_is_one_line_and_never_says_listening(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        p = _serve({"listen": {"host": "127.0.0.1", "port": port}, "workers": {"local": "none"},
                    "admin_token_file": str(tmp_path / "tok"), "models": [PACE]}, tmp_path)
    assert p.returncode == 2, p.stderr
    assert "listening on" not in p.stderr and "Traceback" not in p.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in p.stderr


def _one_line(p: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    return lines[0]


def test_config_errors_are_one_clear_line(tmp_path):
    cases = [
        ("models: [{name: m, engine: {kind: warp}}]", "models.0.engine.kind"),
        ("models: [{name: m}]", "path is required"),
        ("listen: {port: 99999}", "listen.port"),
        ("models: [ {name: m", "not valid YAML at line"),
        ("- just\n- a list", "expected a mapping of settings"),
        ("nonsense_key: 1", "nonsense_key"),
    ]
    for text, expect in cases:
        assert expect in _one_line(_serve(text, tmp_path)), text
    p = subprocess.run([sys.executable, "-m", "controller.serve", "--config", str(tmp_path / "missing.yaml")],
                       cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert "no such file" in _one_line(p)


def test_a_folder_without_config_json_is_reported_as_such(tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    line = _one_line(_serve({"models": [{"name": "m", "path": str(folder)}]}, tmp_path))
    assert "has no config.json" in line and str(folder) in line
    line = _one_line(_serve({"models": [{"name": "m", "path": str(tmp_path / "nowhere")}]}, tmp_path))
    assert "does not exist" in line
    # a model of an architecture the engine does not run: refused before the server starts (it used to start, list
    # the model and fail to load it), named with what is supported; config.json that is no JSON, said so
    (folder / "config.json").write_text('{"model_type": "mamba", "hidden_size": 8}')
    line = _one_line(_serve({"models": [{"name": "m", "path": str(folder)}]}, tmp_path))
    assert "architecture 'mamba' is not supported; supported: llama, qwen2, qwen3, mistral" in line
    (folder / "config.json").write_text("{oops")
    assert "cannot be read as JSON" in _one_line(_serve({"models": [{"name": "m", "path": str(folder)}]}, tmp_path))
    # the same from the command line: a MODEL_DIR, and a port out of range
    for argv, expect in (([str(folder)], "cannot be read as JSON"), (["--port", "99999"], "a port is 0 to 65535")):
        p = subprocess.run([sys.executable, "-m", "controller.serve", *argv], cwd=REPO_ROOT, env=ENV,
                           capture_output=True, text=True, timeout=60)
        assert expect in _one_line(p), argv


def test_declared_body_over_the_limit_gets_413_not_a_reset(http_only):
    # (a 3 MiB body declared by its Content-Length, against the 4 KiB limit: answered, not reset mid-upload)
    r = httpx.post(http_only.url + "/v1/completions", content=b'{"prompt": "' + b"x" * (3 << 20) + b'"}',
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_unparseable_http_gets_openai_json(http_only):
    with socket.create_connection(("127.0.0.1", http_only.port), timeout=10) as s:
        s.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    assert head.split()[1] == b"400" and b"application/json" in head
    assert json.loads(body)["error"]["type"] == "invalid_request_error"


def test_a_second_signal_ends_the_drain_at_once(tmp_path):
    cfg = {"admin_token_hash": hash_key(ADMIN), "workers": {"local": "cpu", "standby": False}, "shutdown_grace_s": 60,
           "models": [PACE]}
    with LiveServer(cfg, tmp_path) as srv:
        out: dict = {}
        th = _streaming(srv.url, out)
        os.kill(srv.proc.pid, signal.SIGTERM)
        time.sleep(0.3)
        t0 = time.monotonic()
        os.kill(srv.proc.pid, signal.SIGINT)  # a second Ctrl-C: do not wait out the 60 s grace
        th.join(30)
        rc = srv.proc.wait(30)
        took = time.monotonic() - t0
    assert rc == 0 and took < 10, (rc, took)
    assert out["events"][-1] == "[DONE]" and "shutting down" in json.loads(out["events"][-2])["error"]["message"]


def test_sigterm_during_start_up_stops_cleanly(tmp_path, tiny_model):
    """A SIGTERM while the server still starts (tokenizers loading, workers starting; before uvicorn serves) used
    to kill it by the signal (status -15/143) and leave the run's admin token file behind; it stops the start-up."""
    token_file = tmp_path / "admin-token"
    models = [{"name": f"t{i}", "path": str(tiny_model)} for i in range(3)]  # tokenizers to load: a start-up window
    cfg = {"workers": {"local": "cpu", "standby": False}, "admin_token_file": str(token_file), "models": models}
    with LiveServer(cfg, tmp_path, wait_ready=False) as srv:
        deadline = time.monotonic() + 60
        while "admin token for this run written" not in srv.log():
            assert time.monotonic() < deadline and srv.proc.poll() is None, srv.log()
            time.sleep(0.005)
        assert token_file.exists()
        os.kill(srv.proc.pid, signal.SIGTERM)
        rc = srv.proc.wait(30)
        log = srv.log()
    assert "listening on" not in log, log  # the signal came during the start-up
    assert rc == 0, log
    assert "signal 15 during start-up: stopping" in log and "Traceback" not in log, log
    assert not token_file.exists()


def test_a_request_head_that_never_completes_gets_408_and_is_closed(monkeypatch):
    """Slowloris: connections that send part of a request head (or nothing) were held for ever (uvicorn has no
    header deadline), each a file descriptor; they get a 408 in OpenAI's error JSON once HEADER_TIMEOUT_S passes,
    and a prompt client on the same server, keep-alive included, is not affected."""
    import asyncio

    import uvicorn

    from controller import shutdown

    monkeypatch.setattr(shutdown, "HEADER_TIMEOUT_S", 0.5, raising=False)

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main() -> None:
        sock = shutdown.bind("127.0.0.1", 0)
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, http=shutdown._http_protocol(), lifespan="off",
                                               log_level="warning", timeout_keep_alive=30))
        serving = asyncio.ensure_future(server.serve(sockets=[sock]))
        while not server.started:
            await asyncio.sleep(0.01)
        try:
            slow = []
            for head in (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n", b"", b"GET /hea"):
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(head)
                slow.append((r, w))
            r, w = await asyncio.open_connection("127.0.0.1", port)  # keep-alive: 2 requests, a pause between
            for _ in range(2):
                w.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                assert (await asyncio.wait_for(r.readuntil(b"ok"), 5)).startswith(b"HTTP/1.1 200")
                await asyncio.sleep(0.3)
            t0 = time.monotonic()
            for sr, sw in slow:
                data = await asyncio.wait_for(sr.read(), 5)  # to EOF: the server closed it
                head, body = data.split(b"\r\n\r\n", 1)
                assert head.startswith(b"HTTP/1.1 408"), data
                assert json.loads(body)["error"]["code"] == "request_timeout"
                sw.close()
            assert time.monotonic() - t0 < 2.0
            w.close()
            r, w = await asyncio.open_connection("127.0.0.1", port)  # the server still serves
            w.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await asyncio.wait_for(r.readuntil(b"ok"), 5)).startswith(b"HTTP/1.1 200")
            w.close()
        finally:
            server.should_exit = True
            await serving

    asyncio.run(main())


def test_a_model_removed_while_its_requests_are_placed(tmp_path):
    """A model added, asked for by 12 requests at once, and removed while they are being placed, ten times over: no
    request is a 500 (each is answered, or refused 404/503), no engine keeps a registration of the removed model,
    and the name added again serves its new settings. (Requests placed after the removal registered the removed
    entry again: 500s from a route that was None, and a worker left hosting it with its old settings.)"""
    from controller.keys import hash_key

    admin = {"Authorization": "Bearer hard-admin"}
    cfg = {"admin_token_hash": hash_key("hard-admin"), "auth": False, "workers": {"local": "cpu", "standby": False},
           "models": [{"name": "keep", "engine": {"kind": "pace"}}]}
    statuses: list[int] = []

    def ask(client: httpx.Client) -> None:
        try:
            statuses.append(client.post("/v1/completions", json={"model": "m1", "prompt": "hi", "max_tokens": 2},
                                        timeout=30).status_code)
        except httpx.HTTPError:
            statuses.append(-1)

    with LiveServer(cfg, tmp_path) as srv, httpx.Client(base_url=srv.url) as client:
        for i in range(10):
            spec = {"name": "m1", "engine": {"kind": "pace", "pace_s_per_token": 0.01}}
            assert client.post("/admin/models", json=spec, headers=admin).status_code == 201
            threads = [threading.Thread(target=ask, args=(client,)) for _ in range(12)]
            for t in threads:
                t.start()
            time.sleep(0.001 * (i % 5))
            assert client.delete("/admin/models/m1", headers=admin).status_code == 200
            for t in threads:
                t.join(30)
        assert statuses and set(statuses) <= {200, 404, 503}, statuses
        time.sleep(0.5)
        assert not [e["id"] for e in client.get("/admin/engines", headers=admin).json()
                    if any(r["model"] == "m1" for r in e["models"])]
        slow = {"name": "m1", "engine": {"kind": "pace", "pace_s_per_token": 0.1}}
        assert client.post("/admin/models", json=slow, headers=admin).status_code == 201
        t0 = time.monotonic()
        r = client.post("/v1/completions", json={"model": "m1", "prompt": "hi", "max_tokens": 10}, timeout=30)
        assert r.status_code == 200 and time.monotonic() - t0 >= 0.9  # 10 tokens at its new 0.1 s, not the old 0.01
    assert "Traceback" not in srv.log(), srv.log()[-3000:]


def _hangup_server(tmp_path, token_file):
    cfg = {"workers": {"local": "cpu", "standby": False}, "admin_token_file": str(token_file), "shutdown_grace_s": 1.5,
           "models": [PACE]}
    return LiveServer(cfg, tmp_path)


def test_sighup_drains_like_sigterm(tmp_path):
    """The terminal that ran `tokenpool serve` closes (SIGHUP): the server died by the signal at once (status
    -1), every stream cut without an error event, and the run's admin token file left behind; it drains as
    on SIGTERM."""
    token_file = tmp_path / "admin-token"
    with _hangup_server(tmp_path, token_file) as srv:
        out: dict = {}
        th = _streaming(srv.url, out)
        assert token_file.exists()
        os.kill(srv.proc.pid, signal.SIGHUP)
        th.join(30)
        rc = srv.proc.wait(30)
        log = srv.log()
    assert rc == 0, log
    assert "transport_error" not in out and out["events"][-1] == "[DONE]", out.get("transport_error")
    assert "shutting down" in json.loads(out["events"][-2])["error"]["message"]
    assert "signal 1: draining" in log and "Traceback" not in log, log
    assert not token_file.exists()


def test_sigterm_to_every_process_of_the_server_still_drains(tmp_path):
    """systemd's default stop (KillMode=control-group) or `kill -TERM -- -PGID` signals the controller and its
    workers at once: the workers used to exit at once, so streams that would have finished within the grace
    ended with "engine w0 died" (and a new worker was started during the drain). Local workers now stop with
    their controller: the streams finish, the server exits 0, no worker is left."""
    cfg = {"admin_token_hash": hash_key(ADMIN), "workers": {"local": "cpu"}, "shutdown_grace_s": 10,
           "models": [PACE]}
    with LiveServer(cfg, tmp_path) as srv:
        outs = [{} for _ in range(3)]
        ts = [threading.Thread(target=_stream, args=(srv.url, 60, o)) for o in outs]  # ~1.2 s each
        [t.start() for t in ts]
        deadline = time.monotonic() + 20
        while not all(o.get("first") for o in outs):
            assert time.monotonic() < deadline, outs
            time.sleep(0.02)
        kids = [int(p) for p in subprocess.run(["ps", "-o", "pid=", "--ppid", str(srv.proc.pid)], capture_output=True,
                                               text=True).stdout.split()]
        worker = httpx.get(srv.url + "/admin/engines", headers=ADM, timeout=5).json()[0]["pid"]
        assert worker in kids, (worker, kids)
        for pid in [srv.proc.pid, *kids]:
            os.kill(pid, signal.SIGTERM)
        [t.join(30) for t in ts]
        rc = srv.proc.wait(30)
        log = srv.log()
    assert rc == 0, log
    for o in outs:
        assert "transport_error" not in o and o["events"][-1] == "[DONE]", o.get("transport_error")
        assert json.loads(o["events"][-2])["choices"][0]["finish_reason"] == "length", o["events"][-2:]
    assert "restarting" not in log and "takes over" not in log, log
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{p}") for p in kids):  # (reaped by the server before it exited)
        assert time.monotonic() < deadline, [p for p in kids if os.path.exists(f"/proc/{p}")]
        time.sleep(0.05)
