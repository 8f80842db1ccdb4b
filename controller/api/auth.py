"""Bearer-token dependencies: tenant keys for /v1, the admin token for /admin and (unless public) /metrics."""

from __future__ import annotations

import ipaddress

from fastapi import Request

from controller.api.anthropic import speaks_anthropic
from controller.dashboard import session
from controller.errors import ServingError
from controller.keys import verify_key
from controller.tenants import KEY_USED, Tenant


def bearer(request: Request) -> str | None:
    """The key a request presents: `Authorization: Bearer KEY`, or Anthropic's clients' `x-api-key: KEY`."""
    h = request.headers.get("authorization")
    if not h:
        return request.headers.get("x-api-key") or None
    scheme, _, token = h.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def tenant(request: Request) -> Tenant:
    """The tenant whose key the request presents (401 if none); the key's hash is kept for the request in
    `tenants.KEY_USED` (its requests record it when admitted: a rotation ends only those of the keys it removed).
    Called from the route's own task: as a dependency, through `tenant_dep` (a sync dependency runs in a thread,
    whose context variables the route never sees)."""
    t, key_hash = request.app.state.controller.tenants.identify(bearer(request))
    KEY_USED.set(key_hash)
    if t is None:
        request.app.state.controller.count_refusal(None, "-", 401)
        # (to Anthropic's clients, the header they send it in)
        how = "x-api-key: <key>" if speaks_anthropic(request) else "Authorization: Bearer <key>"
        raise ServingError(401, "Incorrect API key provided." if bearer(request) else
                           f"You didn't provide an API key ({how}).")
    return t


async def tenant_dep(request: Request) -> Tenant:
    """`tenant` as a route dependency (FastAPI runs an async one in the route's task: `KEY_USED` stays set there)."""
    return tenant(request)


def admin(request: Request) -> None:
    stored = request.app.state.controller.cfg.admin_token_hash
    token = bearer(request)
    if token is None and session.valid(request):  # the dashboard's HTTP-only session cookie
        return
    if stored is None or token is None or not verify_key(token, stored):
        raise ServingError(401, "admin token required" if token is None else "incorrect admin token",
                           code="invalid_admin_token")


def operator(request: Request) -> None:
    """Changes to what the server serves that vLLM lets its one user make (/v1/load_lora_adapter): the admin token,
    or on a single-user server (no auth, or one key as with --api-key) that user's key."""
    tenants = request.app.state.controller.tenants
    if tenants.single_user and tenants.authenticate(bearer(request)) is not None:
        return
    admin(request)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def metrics_reader(request: Request) -> None:
    """/metrics is open when public, or on a loopback listener without auth (the embedded default: nobody else
    can reach it); otherwise the scraper presents the metrics token (stable, from the configuration) or the
    admin token."""
    cfg = request.app.state.controller.cfg
    if cfg.metrics_public or (not cfg.auth_enabled and _loopback(cfg.listen.host)):
        return
    token = bearer(request)
    if token is not None and cfg.metrics_token_hash is not None and verify_key(token, cfg.metrics_token_hash):
        return
    if token is None or cfg.admin_token_hash is None or not verify_key(token, cfg.admin_token_hash):
        raise ServingError(401, "metrics token required (Authorization: Bearer <metrics or admin token>)",
                           code="invalid_metrics_token")
