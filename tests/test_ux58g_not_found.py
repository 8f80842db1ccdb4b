"""`tokenpool show nope` and `tokenpool stop nope` said a model not served otherwise than `tokenpool run nope` does
(f78fbf5: `model "nope" not found; served: a, b`, exit 1): show passed on the server's "The model `nope` does not
exist.", stop its own "no model 'nope' on URL to stop (it serves ...)". All three say it one way now (one function,
`ps.not_found`)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from controller.cli import app
from tests.http_stub import JsonHandler, stub_server

SERVED = ["a", "b", "c"]


@pytest.fixture(scope="module")
def url():
    """A stand-in tokenpool server serving a, b and c (b also as the alias bee), OpenAI's and the admin API's lists."""

    class Handler(JsonHandler):
        def do_GET(self):
            if self.path == "/v1/models":
                # (a tokenpool server lists an alias as a model of its own, after its model's name)
                self._json(200, {"object": "list", "data": [{"id": n, "object": "model"}
                                                            for n in ("a", "b", "bee", "c")]})
            elif self.path == "/admin/models":
                self._json(200, [{"name": n, "aliases": ["bee"] if n == "b" else []} for n in SERVED])
            elif self.path.removeprefix("/v1/models/") in SERVED:
                self._json(200, {"id": self.path.rsplit("/", 1)[-1], "object": "model"})
            else:
                name = self.path.rsplit("/", 1)[-1]
                self._json(404, {"error": {"message": f"The model `{name}` does not exist.", "type":
                                           "invalid_request_error", "param": "model", "code": "model_not_found"}})

        def do_POST(self):
            self._json(404, {"error": {"message": "The model `nope` does not exist.", "code": "model_not_found"}})

    with stub_server(Handler) as u:
        yield u


@pytest.mark.parametrize("command", [["run", "nope", "hi"], ["show", "nope"], ["show", "nope:latest"],
                                     ["stop", "nope", "--admin-token", "t"]])
def test_a_model_not_served_is_said_the_same_by_run_show_and_stop(url, command):
    r = CliRunner().invoke(app, [*command, "--url", url], env={"COLUMNS": "200"})
    assert (r.exit_code, r.output) == (1, f'tokenpool {command[0]}: model "{command[1]}" not found; served: a, b, bee, c\n'), \
        r.output
