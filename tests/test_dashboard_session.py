"""/dashboard without a browser: the login form, the session cookie the admin API accepts, the static files."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from controller.app import build_app
from controller.config import ServerConfig, default_config
from controller.dashboard import session
from controller.dashboard.routes import STATIC
from controller.keys import hash_key

ADMIN = "admin-session-token"


@pytest.fixture
def client():
    return TestClient(build_app(ServerConfig(admin_token_hash=hash_key(ADMIN))), follow_redirects=False)


def login(c: TestClient, token: str):
    return c.post("/dashboard/login", data={"token": token})


def test_without_a_session_the_dashboard_is_the_login_form(client):
    r = client.get("/dashboard")
    assert r.status_code == 200 and 'name="token"' in r.text and "app.js" not in r.text
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert r.headers["cache-control"] == "no-store"


def test_the_login_form_says_where_this_runs_token_is(client, monkeypatch):
    """`tokenpool serve` without admin_token_hash writes its token to a file (the log names the file, never the
    token): the form sends the operator there, not to a start-up print that never happens."""
    from pathlib import Path

    from controller.startup import admin_token_path

    monkeypatch.delenv("TOKENPOOL_CACHE", raising=False)  # the default place
    text = client.get("/dashboard").text
    default = admin_token_path(ServerConfig()).relative_to(Path.home())
    assert default.name == f"admin-token-{ServerConfig().listen.port}"  # one file a port
    assert f"~/{default.parent}/admin-token-PORT" in text and "admin_token_hash" in text
    assert "printed" not in text


def test_a_wrong_token_is_refused_and_sets_no_cookie(client):
    for token in ("", "nope", ADMIN + "x"):
        r = login(client, token)
        assert "That is not the admin token." in r.text and "set-cookie" not in r.headers
    assert client.get("/admin/pool").status_code == 401


def test_login_sets_an_http_only_strict_session_cookie_the_admin_api_accepts(client):
    r = login(client, ADMIN)
    assert r.status_code == 303 and r.headers["location"] == "/dashboard"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{session.COOKIE}=") and ADMIN not in cookie
    attrs = {a.strip().lower() for a in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/"} <= attrs and "secure" not in attrs  # plain http here
    page = client.get("/dashboard")
    assert "app.js" in page.text and 'name="token"' not in page.text
    assert client.get("/admin/pool").status_code == 200
    assert client.get("/admin/models").status_code == 200
    assert client.get("/metrics").status_code == 200  # the admin dependency everywhere
    # an explicit bearer header is judged on its own: a wrong one is refused even with a session
    assert client.get("/admin/pool", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_logout_ends_the_session(client):
    login(client, ADMIN)
    sid = client.cookies[session.COOKIE]
    r = client.post("/dashboard/logout")
    assert r.status_code == 303 and f"{session.COOKIE}=" in r.headers["set-cookie"]
    client.cookies.set(session.COOKIE, sid)  # even a client that kept it
    assert client.get("/admin/pool").status_code == 401


def test_made_up_and_expired_sessions_are_refused(client):
    client.cookies.set(session.COOKIE, "made-up")
    assert client.get("/admin/pool").status_code == 401
    s = session.Sessions(ttl_s=0.05, cap=2)
    a = s.new()
    assert s.valid(a)
    time.sleep(0.06)
    assert not s.valid(a)
    b, c, d = s.new(), s.new(), s.new()
    assert not s.valid(b) and s.valid(c) and s.valid(d)  # the cap drops the oldest


def test_static_files_are_served_and_nothing_else(client):
    r = client.get("/dashboard/static/app.js")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript")
    assert client.get("/dashboard/static/uPlot.iife.min.js").status_code == 200
    lic = client.get("/dashboard/static/uPlot.LICENSE.txt")
    assert lic.status_code == 200 and "MIT License" in lic.text
    for bad in ("../session.py", "..%2Fsession.py", "nope.js", "session.py", ".hidden.js"):
        assert client.get(f"/dashboard/static/{bad}").status_code == 404
    # every file the page loads exists (the package ships them: pyproject package-data)
    index = (STATIC / "index.html").read_text()
    for name in ("app.js", "app.css", "uPlot.iife.min.js", "uPlot.min.css"):
        assert f"/dashboard/static/{name}" in index and (STATIC / name).is_file()


def test_the_embedded_default_serves_the_dashboard_too():
    c = TestClient(build_app(default_config()))  # (its lifespan, which would make the demo models, is not run)
    r = c.get("/dashboard")
    assert r.status_code == 200 and 'name="token"' in r.text
