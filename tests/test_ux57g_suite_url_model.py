"""`tokenpool suite PART --url` of a server that does not serve --model (default `pace`, the suite's own paced
server's) says so in one line (exit 1), naming what it serves, as `tokenpool loadtest` does: `suite corpus --url`
of the embedded default counted a 404 per case as its results and exited 0."""

import pytest

from load_tests.faults import target
from tests.http_stub import JsonHandler, stub_server


class _Server(JsonHandler):
    def do_GET(self):  # noqa: N802 - (http.server's name)
        if self.path == "/health":
            self._json(200, {"status": "ok"})
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": "smollm2"}]})
        elif self.path == "/v1/models/smollm2":
            self._json(200, {"id": "smollm2"})
        else:
            self._json(404, {"error": {"message": "no such model"}})


@pytest.fixture
def url():
    with stub_server(_Server) as u:
        yield u


def test_suite_url_without_the_model_says_so(url):
    with pytest.raises(SystemExit) as e, target(url=url):
        pass
    assert isinstance(e.value.code, str)
    assert "'pace'" in e.value.code and "smollm2" in e.value.code and "--model" in e.value.code


def test_suite_url_with_the_model_runs(url):
    with target(url=url, model="smollm2") as t:
        assert t.model == "smollm2"
