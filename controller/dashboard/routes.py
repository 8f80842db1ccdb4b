"""/dashboard: the login form, the single-page dashboard and its static files (vendored, no build step).

The page talks only to the admin API (/admin/pool, /admin/requests, /admin/events, actions), authenticated by
the session cookie that a successful login sets (controller.api.auth.admin accepts it).
"""

from __future__ import annotations

import asyncio
import html
from pathlib import Path
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response

from controller.dashboard import session
from controller.errors import ServingError
from controller.keys import verify_key

STATIC = Path(__file__).resolve().parent / "static"
TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".html": "text/html",
         ".png": "image/png", ".svg": "image/svg+xml", ".txt": "text/plain; charset=utf-8"}
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
MAX_FORM = 4096

router = APIRouter(include_in_schema=False)


SESSION_ENDED = ("Your session has ended: the server restarted, or the session expired. Sign in again (a server "
                 "started without admin_token_hash has a new admin token at each start).")


def _page(name: str, status: int = 200, error: str = "", note: str = "") -> HTMLResponse:
    text = (STATIC / name).read_text()
    if error:
        text = text.replace("<!--error-->", f'<p class="error" role="alert">{html.escape(error)}</p>')
    elif note:
        text = text.replace("<!--error-->", f'<p class="note" role="status">{html.escape(note)}</p>')
    return HTMLResponse(text, status_code=status, headers=HEADERS)


@router.get("/dashboard")
@router.get("/dashboard/")
async def dashboard(request: Request):
    if session.valid(request):
        return _page("index.html")
    if not request.cookies.get(session.COOKIE):
        return _page("login.html")
    # A session cookie this server does not know: the page of a session that ended (a restart forgets every session,
    # or it expired) came back to the form, which said nothing of why. Said once: the stale cookie goes.
    resp = _page("login.html", note=SESSION_ENDED)
    resp.delete_cookie(session.COOKIE, path="/", httponly=True, samesite="strict")
    return resp


@router.post("/dashboard/login")
async def login(request: Request):
    body = await request.body()
    if len(body) > MAX_FORM:
        raise ServingError(413, "login form too large")
    token = (parse_qs(body.decode(errors="replace")).get("token") or [""])[0].strip()
    stored = request.app.state.controller.cfg.admin_token_hash
    if not token or stored is None or not verify_key(token, stored):
        # 200, not 401: a browser logs any 4xx page load as a console error; the form says what went wrong
        return _page("login.html", 200, "That is not the admin token.")
    resp = RedirectResponse("/dashboard", status_code=303, headers=HEADERS)
    # Secure where the browser's connection is HTTPS: this one, or a TLS-terminating proxy's that the server trusts.
    # uvicorn (proxy_headers, on by default) takes X-Forwarded-Proto only from the peers FORWARDED_ALLOW_IPS names
    # (loopback by default) and sets the scheme from it; from any other peer the header is ignored, never read here.
    resp.set_cookie(session.COOKIE, session.sessions(request.app).new(), max_age=int(session.TTL_S), path="/",
                    httponly=True, samesite="strict", secure=request.url.scheme == "https")
    return resp


# Whether the browser's session is live, answered 200 either way: the page asks before it opens its event stream again
# (the stream failed: the server restarted, or stopped). A restart forgets every session, and the page learnt that
# from 401s (the stream's reconnect, then each call), each logged by the browser as a failed resource, before it
# went back to the form.
@router.get("/dashboard/session")
async def session_state(request: Request):
    return JSONResponse({"signed_in": session.valid(request)}, headers={"Cache-Control": "no-store"})


# A GET of the form's own paths (typed, bookmarked, or the URL a failed sign-in left where its script did not run) was
# a 405 in JSON: the page they belong to instead. (GET signs no one in or out: only the form's POST does.)
@router.get("/dashboard/login")
@router.get("/dashboard/logout")
async def form_paths(request: Request):
    return RedirectResponse("/dashboard", status_code=303, headers=HEADERS)


@router.post("/dashboard/logout")
async def logout(request: Request):
    session.sessions(request.app).drop(request.cookies.get(session.COOKIE))
    hub = getattr(request.app.state, "event_hub", None)  # (controller.api.admin_routes: once a stream opened)
    if hub is not None and (ended := hub.end_due()):  # the session's streams end before this answer
        await asyncio.wait(ended, timeout=1.0)  # (a client that stopped reading holds its write: not this answer)
    resp = RedirectResponse("/dashboard", status_code=303, headers=HEADERS)
    resp.delete_cookie(session.COOKIE, path="/", httponly=True, samesite="strict")
    return resp


@router.get("/dashboard/static/{name}")
async def static(name: str):
    f = STATIC / name
    if "/" in name or name.startswith(".") or not f.is_file() or f.suffix not in TYPES:
        return Response(status_code=404)
    return FileResponse(f, media_type=TYPES[f.suffix], headers={"Cache-Control": "no-cache",
                                                                "X-Content-Type-Options": "nosniff"})
