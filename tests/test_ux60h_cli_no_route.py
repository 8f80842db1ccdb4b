"""A --url with a path this server does not have (`--url http://host:8000/dashboard`, a proxy's prefix left out):
tokenpool answers its own JSON 404 "Not Found", and `ls`, `run` and `show` said that alone ("tokenpool ls: Not
Found"), naming neither the URL nor the path. The URL asked is said, as another server's 404 is; a model's own 404
is still said as it was."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from controller.cli import app
from tests.http_stub import JsonHandler, stub_server


class NoRoute(JsonHandler):
    """tokenpool's answer to a path it has no route for (app.http_error), to every request."""

    def _no_route(self):
        self._json(404, {"error": {"message": "Not Found", "type": "invalid_request_error", "param": None,
                                   "code": "not_found"}})

    do_GET = do_POST = _no_route


@pytest.mark.parametrize("cmd", [["ls"], ["run", "m", "hi"], ["show", "m"]])
def test_a_path_the_server_does_not_have_is_named(cmd):
    with stub_server(NoRoute) as url:
        r = CliRunner().invoke(app, [*cmd, "--url", url + "/dashboard"], env={"COLUMNS": "200"})
    assert r.exit_code == 1, (r.exit_code, r.output)
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tokenpool {cmd[0]}: {url}/dashboard/"), r.output
    assert lines[0].endswith(": HTTP 404: Not Found"), r.output


class NoModel(JsonHandler):
    def do_GET(self):
        if self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": "a", "object": "model"}]})
        else:
            self._json(404, {"error": {"message": "model 'm' not found", "code": "model_not_found"}})

    do_POST = do_GET


def test_a_models_404_is_said_as_before():
    with stub_server(NoModel) as url:
        r = CliRunner().invoke(app, ["run", "m", "hi", "--url", url], env={"COLUMNS": "200"})
    assert r.exit_code == 1 and r.output.strip() == 'tokenpool run: model "m" not found; served: a', r.output
