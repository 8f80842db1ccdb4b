"""The command line as an Ollama user meets it: a bare command group prints its help (exit 0), and the client
commands find their server and credentials in the environment (TOKENPOOL_URL as OLLAMA_HOST)."""

from __future__ import annotations

import http.server
import json
import socket

import pytest
from typer.testing import CliRunner

from controller.cli import app
from tests.http_stub import stub_server


@pytest.mark.parametrize("group", [[], ["bench"], ["keys"], ["suite"]], ids=["tokenpool", "bench", "keys", "suite"])
def test_a_bare_group_prints_its_help_and_exits_0(group):
    """`tokenpool`, `tokenpool bench`, ... with no command: the group's help on stdout, exit 0, as `ollama` does
    (click's no_args_is_help printed it as a usage error, exit 2)."""
    r = CliRunner().invoke(app, group, prog_name="tokenpool")
    assert r.exit_code == 0, (r.exit_code, r.output)
    assert f"Usage: {' '.join(['tokenpool', *group])} [OPTIONS] COMMAND" in " ".join(r.output.split()), r.output
    assert "Commands" in r.output
    # a command it does not have is still a usage error
    assert CliRunner().invoke(app, [*group, "nosuch"]).exit_code == 2


@pytest.fixture
def recording_stub():
    """A stand-in tokenpool server that records each request's path and Authorization header."""
    seen: list[tuple[str, str, str | None]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _json(self, body) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            seen.append(("GET", self.path, self.headers.get("authorization")))
            if self.path == "/v1/models":
                self._json({"object": "list", "data": [{"id": "m", "max_model_len": 64}]})
            elif self.path == "/admin/models":
                self._json([{"name": "m"}])
            elif self.path.startswith("/admin/"):
                self._json([])
            else:
                self._json({"id": "m"})

        def do_POST(self):
            seen.append(("POST", self.path, self.headers.get("authorization")))
            self.rfile.read(int(self.headers.get("content-length") or 0))
            if self.path.startswith("/admin/"):
                self._json({"engines": 0})
                return
            data = b'data: {"choices": [{"delta": {"content": "hello"}}]}\n\ndata: [DONE]\n\n'
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    with stub_server(Handler) as url:
        yield url, seen


def test_client_commands_take_their_server_and_keys_from_the_environment(recording_stub):
    url, seen = recording_stub
    # host:port as OLLAMA_HOST is written; the keys from their own variables
    environ = {"TOKENPOOL_URL": url.removeprefix("http://"), "TOKENPOOL_API_KEY": "tenant-key",
               "TOKENPOOL_ADMIN_TOKEN": "admin-token"}
    runner = CliRunner()
    for args, want in ((["ls"], ("GET", "/v1/models", "Bearer tenant-key")),
                       (["run", "m", "hi"], ("POST", "/v1/chat/completions", "Bearer tenant-key")),
                       (["ps"], ("GET", "/admin/models", "Bearer admin-token")),
                       (["stop", "m"], ("POST", "/admin/models/m/evict", "Bearer admin-token"))):
        seen.clear()
        r = runner.invoke(app, args, env=environ, input="")
        assert r.exit_code == 0 and want in seen, (args, r.exit_code, r.output, seen)
    # an OpenAI client's base URL (OPENAI_BASE_URL's form) is taken too, and --url still wins over the variable
    seen.clear()
    r = runner.invoke(app, ["ls"], env={**environ, "TOKENPOOL_URL": url + "/v1"})
    assert r.exit_code == 0 and ("GET", "/v1/models", "Bearer tenant-key") in seen, (r.output, seen)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # (a port nothing listens on once the socket is closed)
    r = runner.invoke(app, ["ls", "--url", f"127.0.0.1:{closed}"], env=environ)
    assert r.exit_code == 1 and f"cannot reach http://127.0.0.1:{closed}" in r.output, r.output


def test_the_url_variable_is_declared_and_shown_in_help():
    from tokenpool import env

    assert env.URL.name == "TOKENPOOL_URL" and env.URL.default == "http://127.0.0.1:8000"
    for cmd in ("run", "ls", "ps", "stop", "loadtest"):
        r = CliRunner().invoke(app, [cmd, "--help"], env={"COLUMNS": "200"})
        assert "TOKENPOOL_URL" in r.output, (cmd, r.output)


@pytest.mark.parametrize(("given", "url"), [(":18382", "http://127.0.0.1:18382"), ("myhost", "http://myhost:8000"),
                                            ("::1", "http://[::1]:8000"), ("[::1]:9", "http://[::1]:9"),
                                            ("h:1/v1/", "http://h:1"), ("http://h", "http://h"),
                                            ("https://h/v1", "https://h"), ("0.0.0.0", "http://0.0.0.0:8000")])
def test_url_without_a_scheme_reads_as_ollama_host_does(given, url):
    """OLLAMA_HOST's spellings: a missing host is 127.0.0.1 and a missing port the server's default (`:18382` was
    'Name or service not known', `myhost` went to port 80)."""
    from controller.ps import base_url

    assert base_url(given) == url


def test_suite_url_is_read_as_the_client_commands_read_it(monkeypatch):
    """`tokenpool suite corpus --url :8001` (or host:port) went to the suite's HTTP client without a scheme."""
    import contextlib

    seen = []

    @contextlib.contextmanager
    def target(url, *a, **kw):
        seen.append(url)
        raise SystemExit(0)
        yield

    monkeypatch.setattr("load_tests.faults.target", target)
    r = CliRunner().invoke(app, ["suite", "corpus", "--url", ":18382"])
    assert r.exit_code == 0 and seen == ["http://127.0.0.1:18382"], (r.output, seen)


def test_loadtest_refusing_a_remote_url_names_itself():
    r = CliRunner().invoke(app, ["loadtest", "--url", "example.com:80"])
    assert r.exit_code == 1 and r.output == "tokenpool loadtest: refusing to load-test 'example.com': loopback only\n", \
        r.output
