"""Dashboard sessions: the admin token is given once to a login form; the browser then holds only a random
session id in an HTTP-only, SameSite=Strict cookie (never the token, never in a URL). Sessions live in the
controller's memory: a restart logs everyone out.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

COOKIE = "tokenpool_session"
TTL_S = 12 * 3600.0
CAP = 256  # the oldest sessions are dropped beyond this


class Sessions:
    def __init__(self, ttl_s: float = TTL_S, cap: int = CAP):
        self.ttl_s, self.cap = ttl_s, cap
        self._s: dict[str, float] = {}  # session id -> expiry (monotonic)

    def new(self) -> str:
        sid = secrets.token_urlsafe(32)
        self._s[sid] = time.monotonic() + self.ttl_s
        while len(self._s) > self.cap:
            del self._s[next(iter(self._s))]
        return sid

    def valid(self, sid: str | None) -> bool:
        if not sid:
            return False
        exp = self._s.get(sid)
        if exp is None:
            return False
        if exp < time.monotonic():
            del self._s[sid]
            return False
        return True

    def drop(self, sid: str | None) -> None:
        self._s.pop(sid or "", None)


def sessions(app: Any) -> Sessions:
    s = getattr(app.state, "dashboard_sessions", None)
    if s is None:
        s = app.state.dashboard_sessions = Sessions()
    return s


def valid(request: Any) -> bool:
    """Whether the request carries a live dashboard session cookie."""
    return sessions(request.app).valid(request.cookies.get(COOKIE))
