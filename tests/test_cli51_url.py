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


def test_pull_of_a_name_that_is_no_repo_id_says_what_hf_download_takes():
    """`tokenpool pull smollm2` (or llama3.2:1b, as `ollama pull` takes) said `hf download smollm2`, which is no
    Hugging Face repo id; a repo id is still said as it was."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        env = {"COLUMNS": "200", "TOKENPOOL_URL": f":{s.getsockname()[1]}"}  # (no server: nothing served already)
    for name in ("llama3.2", "llama3.2:1b"):  # (smollm2, the default's: test_ux65f_newuser)
        r = CliRunner().invoke(app, ["pull", name], env=env)
        assert r.exit_code == 2 and f"'{name}' is not a Hugging Face repo id (ORG/NAME)" in r.output and \
            f"hf download {name}" not in r.output and "hf download ORG/NAME" in r.output, r.output
    r = CliRunner().invoke(app, ["pull", "org/model"], env=env)
    assert r.exit_code == 2 and "`hf download org/model`" in r.output, r.output


def test_stop_of_a_model_not_served_names_those_that_are(monkeypatch):
    """`tokenpool stop nosuch` said "http://.../admin/models/nosuch/evict: HTTP 404: no model 'nosuch'"; as `ollama
    stop`, it names the model and what the server serves (as `tokenpool run` says it), and asks nothing to be
    evicted."""
    from controller import ps

    calls = []

    def fetch(url, path, token, timeout=10.0, method="GET"):
        calls.append((method, path))
        if method == "POST":
            return {"engines": 1}
        return [{"name": "smollm2-135m-instruct", "aliases": ["smollm2"]}, {"name": "demo"}]

    monkeypatch.setattr(ps, "fetch", fetch)
    r = CliRunner().invoke(app, ["stop", "nosuch", "--url", ":18250", "--admin-token", "t"], env={"COLUMNS": "200"})
    assert r.exit_code == 1 and r.output.strip() == ('tokenpool stop: model "nosuch" not found; served: '
                                                     'smollm2-135m-instruct, smollm2, demo'), r.output  # (as `run`
    # says it: the aliases `stop` takes too)
    assert calls == [("GET", "/admin/models")]
    r = CliRunner().invoke(app, ["stop", "smollm2:latest", "--url", ":18250", "--admin-token", "t"])
    # (the evict, then the engines read for the reply's words: VRAM or memory)
    assert r.exit_code == 0 and calls[-2:] == [("POST", "/admin/models/smollm2-135m-instruct/evict"),
                                               ("GET", "/admin/engines")], (r.output, calls)
