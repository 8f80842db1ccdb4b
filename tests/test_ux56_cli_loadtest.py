"""`tokenpool loadtest` against a server that serves no model, or not the --model given: one line and exit 1 before
any stream is sent (a server without models was an IndexError traceback; an unknown --model ran the whole duration,
every request refused, and said so at the end)."""

from __future__ import annotations

from typer.testing import CliRunner

from controller.cli import app
from tests.http_stub import JsonHandler, stub_server


def _server(models: list[str], asked: list[str], key: str | None = None):
    class Handler(JsonHandler):
        def do_GET(self):
            asked.append(self.path)
            if key is not None and self.headers.get("authorization") != f"Bearer {key}":
                self._json(401, {"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error",
                                           "param": None, "code": "invalid_api_key"}})
            elif self.path == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in models]})
            elif self.path.removeprefix("/v1/models/") in models:
                self._json(200, {"id": self.path.removeprefix("/v1/models/"), "object": "model"})
            else:
                name = self.path.removeprefix("/v1/models/")
                self._json(404, {"error": {"message": f"The model `{name}` does not exist.", "type":
                                           "invalid_request_error", "param": "model", "code": "model_not_found"}})

        def do_POST(self):  # (no stream may be sent)
            asked.append(self.path)
            self._json(500, {})

    return Handler


def test_a_server_without_models_is_said_in_one_line():
    asked: list[str] = []
    with stub_server(_server([], asked)) as url:
        r = CliRunner().invoke(app, ["loadtest", "--url", url, "--duration", "5", "--streams", "2"])
    assert r.exit_code == 1, r.output
    assert r.output == f"tokenpool loadtest: {url} serves no model (GET /v1/models lists none): nothing to load-test\n"
    assert asked == ["/v1/models"]


def test_a_model_the_server_does_not_serve_is_said_before_any_stream():
    asked: list[str] = []
    with stub_server(_server(["m"], asked)) as url:
        r = CliRunner().invoke(app, ["loadtest", "--url", url, "--model", "nope", "--duration", "5"])
    assert r.exit_code == 1, r.output
    assert r.output == 'tokenpool loadtest: model "nope" not found; served: m\n'  # (as tokenpool run says it)
    assert asked == ["/v1/models/nope", "/v1/models"]


def test_a_key_refused_says_how_to_give_one():
    asked: list[str] = []
    with stub_server(_server(["m"], asked, key="k")) as url:
        r = CliRunner().invoke(app, ["loadtest", "--url", url, "--duration", "5"])
        assert r.exit_code == 1 and r.output == ("tokenpool loadtest: GET /v1/models: 401 Incorrect API key provided. "
                                                 "(pass --api-key or set TOKENPOOL_API_KEY)\n"), r.output
