"""The dashboard's session cookie and a TLS-terminating proxy: Secure where the browser's connection is HTTPS, as
the server knows it. X-Forwarded-Proto counts only where the server trusts the peer that sent it (uvicorn's
proxy_headers, for the peers FORWARDED_ALLOW_IPS names: tests/test_dashboard_browser_ops.py has a live server's
loopback proxy); the app itself never reads it, so any client could not make it claim HTTPS."""

from __future__ import annotations

from fastapi.testclient import TestClient

from controller.app import build_app
from controller.config import ServerConfig
from controller.dashboard import session
from controller.keys import hash_key

ADMIN = "admin-cookie-token"


def cookie_attrs(base_url: str, headers: dict[str, str] | None = None) -> set[str]:
    c = TestClient(build_app(ServerConfig(admin_token_hash=hash_key(ADMIN))), base_url=base_url,
                   follow_redirects=False)
    r = c.post("/dashboard/login", data={"token": ADMIN}, headers=headers or {})
    assert r.status_code == 303 and r.headers["set-cookie"].startswith(f"{session.COOKIE}=")
    return {a.strip().lower() for a in r.headers["set-cookie"].split(";")[1:]}


def test_the_session_cookie_is_secure_over_https_only():
    assert "secure" in cookie_attrs("https://dash.example")
    assert "secure" not in cookie_attrs("http://dash.example")


def test_an_untrusted_x_forwarded_proto_is_not_believed():
    """A peer the server does not trust (here: no proxy layer at all) says https: the cookie stays as the connection
    is, plain HTTP (a header anyone can send is no proof that the browser's side is encrypted)."""
    attrs = cookie_attrs("http://dash.example", {"X-Forwarded-Proto": "https", "Forwarded": "proto=https"})
    assert "secure" not in attrs
