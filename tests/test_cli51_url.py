"""A --url (or $TOKENPOOL_URL) no request could go to is a usage error naming it: `http://[::1` and `localhost:abc`
were tracebacks, `:99999` was "cannot reach http://:99999: Name or service not known", `ftp://x` a DNS error."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from controller.cli import app

BAD = {"http://[::1": "not a URL the server can be reached at", "localhost:abc": "not HOST:PORT, :PORT or a URL",
       ":99999": "not HOST:PORT, :PORT or a URL", "http://h:99999": "not a URL the server can be reached at",
       "ftp://x": "the server's URL is http:// or https://", "http://": "the URL names no host"}


def _said(r) -> str:
    return " ".join(r.output.replace("│", " ").split())  # (rich's error box, unwrapped)


@pytest.mark.parametrize("url", list(BAD))
@pytest.mark.parametrize("cmd", [["run", "m", "hi"], ["ls"], ["ps"], ["stop", "m"], ["loadtest"],
                                 ["suite", "corpus"], ["bench", "serve"]])
def test_a_url_no_request_could_go_to_is_a_usage_error(cmd, url):
    r = CliRunner().invoke(app, [*cmd, "--url", url], env={"COLUMNS": "200"})
    assert r.exit_code == 2, (r.exit_code, r.output)
    assert "Invalid value for '--url'" in _said(r) and f"{url}: {BAD[url]}" in _said(r), r.output
    assert "Traceback" not in r.output


def test_a_bad_tokenpool_url_is_named_too():
    r = CliRunner().invoke(app, ["ls"], env={"COLUMNS": "200", "TOKENPOOL_URL": "localhost:abc"})
    assert r.exit_code == 2 and "TOKENPOOL_URL" in _said(r) and "localhost:abc: not HOST:PORT" in _said(r), r.output


@pytest.mark.parametrize(("given", "url"), [("HTTP://h:1", "HTTP://h:1"), ("[::1]", "http://[::1]:8000"),
                                            (" :8001 ", "http://127.0.0.1:8001"), ("h:65535", "http://h:65535")])
def test_urls_that_are_fine_stay_fine(given, url):
    from controller.ps import base_url

    assert base_url(given) == url
