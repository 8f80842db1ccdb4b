"""Bearer-token dependencies: tenant keys for /v1, the admin token for /admin and (unless public) /metrics."""

from __future__ import annotations

from fastapi import Request

from controller.dashboard import session
from controller.errors import ServingError
from controller.keys import verify_key
from controller.tenants import Tenant


def bearer(request: Request) -> str | None:
    h = request.headers.get("authorization")
    if not h:
        return None
    scheme, _, token = h.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def tenant(request: Request) -> Tenant:
    t = request.app.state.controller.tenants.authenticate(bearer(request))
    if t is None:
        request.app.state.controller.count_refusal(None, "-", 401)
        raise ServingError(401, "Incorrect API key provided." if bearer(request) else
                           "You didn't provide an API key (Authorization: Bearer <key>).")
    return t


def admin(request: Request) -> None:
    stored = request.app.state.controller.cfg.admin_token_hash
    token = bearer(request)
    if token is None and session.valid(request):  # the dashboard's HTTP-only session cookie
        return
    if stored is None or token is None or not verify_key(token, stored):
        raise ServingError(401, "admin token required", code="invalid_admin_token")


def metrics_reader(request: Request) -> None:
    if not request.app.state.controller.cfg.metrics_public:
        admin(request)
