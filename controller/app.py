"""The FastAPI application: routers, OpenAI-shaped errors, /health and /metrics. State lives on app.state."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from controller.api import admin_routes, auth, ollama, openai_routes
from controller.api.anthropic import error_body as anthropic_error
from controller.api.anthropic import speaks_anthropic
from controller.api.responses import ResponseStore
from controller.api.serving import OpenAIServing
from controller.config import ServerConfig
from controller.dashboard import routes as dashboard_routes
from controller.errors import ServingError, field_path, json_kind, telling_error
from controller.service import REQUEST_IDS, STARTUP_WAIT_S, Controller

log = logging.getLogger("tokenpool.app")

# The browser origins allowed by default (cfg.cors_origins None): pages served from this machine, any port.
LOCAL_ORIGINS = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?"


class BodyLimit:
    """Refuse request bodies over `limit` bytes (413) before they are buffered whole (pure ASGI: no per-chunk cost).

    A declared Content-Length over the limit is answered before the app runs; a chunked body that grows past it
    raises an HTTPException(413) from `receive`, which FastAPI passes through its body parsing (any other
    exception there would become a 400) to the app's handler. Either way the rest of the body (up to
    `drain_factor` x the limit) is read and dropped first: a client that sends its whole body before reading
    the answer (most do) then gets the 413 instead of a connection reset.
    """

    def __init__(self, app, limit: int, drain_factor: int = 4, on_refused=None, timeout_s: float = 60.0):
        self.app, self.limit, self.drain_cap = app, limit, drain_factor * limit
        self.on_refused = on_refused  # counts a refusal answered here, before the app sees the request
        # The body's deadline, from the app's first read of it: one that has not all come by then is a 408 (raised
        # from `receive` as the 413 is), its connection closed. Without it a client that sent its headers and then
        # stalled (or trickled a byte a minute) held its request open for ever.
        self.timeout_s = timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope.get("path", "").startswith("/api/blobs/"):  # (Ollama's blob upload, a GGUF's size: its route reads
            return await self.app(scope, receive, send)  # none of it and says, in a 501, that nothing is created here)
        for k, v in scope.get("headers", ()):
            if k == b"content-length" and v.isdigit() and int(v) > self.limit:
                if int(v) <= self.drain_cap:
                    try:  # (a body that stalls is not waited for: the 413 goes at the deadline)
                        await asyncio.wait_for(self._drain(receive, 0), self.timeout_s)
                    except asyncio.TimeoutError:
                        pass
                if self.on_refused is not None and counted_path(scope.get("path", "")):
                    self.on_refused()
                return await _too_large(send, self.limit, scope.get("path", ""))
        seen = 0
        deadline: float | None = None  # set at the first read; None again once the body has all come
        whole = False

        async def limited():
            nonlocal seen, deadline, whole
            if whole:  # (after the body: a disconnect, awaited as long as the response runs)
                return await receive()
            loop = asyncio.get_running_loop()
            if deadline is None:
                deadline = loop.time() + self.timeout_s
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise StarletteHTTPException(
                    408, f"the request body did not arrive within {self.timeout_s:g} s (got {seen} bytes of it)",
                    headers={"Connection": "close"}) from None
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    if msg.get("more_body"):
                        try:
                            await asyncio.wait_for(self._drain(receive, seen), max(0.0, deadline - loop.time()))
                        except asyncio.TimeoutError:
                            pass
                    raise StarletteHTTPException(413, f"request body exceeds {self.limit} bytes")
                whole = not msg.get("more_body")
            else:
                whole = True
            return msg

        return await self.app(scope, limited, send)

    async def _drain(self, receive, seen: int) -> None:
        while seen <= self.drain_cap:
            msg = await receive()
            if msg["type"] != "http.request":
                return
            seen += len(msg.get("body", b""))
            if not msg.get("more_body"):
                return


class StartGate:
    """While the server starts (`app.state.started`: a future `controller.shutdown` resolves once the controller has
    started, with None, or with why it did not), requests wait for it, STARTUP_WAIT_S at most; /health, / and
    /metrics answer at once (a probe hears 503 "starting"). The socket is served during the start-up so that they
    can: before, every request (a probe's too) waited on the listen backlog until the configured models' tokenizers
    were read. Without that future (the app's own lifespan starts the controller before it serves) it passes all."""

    OPEN = frozenset({"/health", "/", "/metrics"})

    def __init__(self, app, state):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        started = getattr(self.state, "started", None)
        if started is None or scope["type"] != "http" or scope.get("path") in self.OPEN:
            return await self.app(scope, receive, send)
        if not started.done():
            try:
                await asyncio.wait_for(asyncio.shield(started), STARTUP_WAIT_S)
            except asyncio.TimeoutError:
                return await _refuse(send, scope, ServingError(503, "the server is still starting", retry_after=5))
        if (why := started.result()) is not None:
            return await _refuse(send, scope, ServingError(503, why, retry_after=5))
        return await self.app(scope, receive, send)


class RequestIds:
    """Every HTTP response carries `x-request-id` (OpenAI's and vLLM's header; the OpenAI SDKs read it as
    `_request_id`), and the Messages API's also Anthropic's `request-id` (the anthropic SDKs'): the id the request
    was generated under, which the dashboard, the events and POST /admin/requests/{id}/cancel know it by (for a
    chat completion, its `id`), else (refused before one was made, or no generation) a fresh `req-...`."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        made: list[str] = []
        token = REQUEST_IDS.set(made)
        anthropic = scope.get("path", "").startswith("/v1/messages")

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                rid = (made[0] if made else f"req-{secrets.token_hex(8)}").encode()
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid),
                                                  *([(b"request-id", rid)] if anthropic else [])]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_IDS.reset(token)


def counted_path(path: str) -> bool:
    """Whether `tokenpool_requests_total` counts a request of this path: the serving routes', not the admin API's or
    the dashboard's (a 413 on an admin route was counted under model "-", tenant "-", its other answers never)."""
    return not path.startswith(("/admin", "/dashboard"))


# Paths of APIs that are not this server's (a path, or one under it), each with what stands for it here
ELSEWHERE = (
    (("/v1/audio", "/audio"), "this server serves text models: it has no audio API (transcription, translation, "
                              "speech)"),
    (("/v1/images", "/images"), "this server serves text models: it has no images API (generation, edits, "
                                "variations)"),
    (("/logs",), "llama-swap's logs: tokenpool's log is the server's own output (its stderr), and its requests and "
                 "events are on the dashboard at /dashboard (GET /admin/events streams them)"),
    (("/upstream",), "llama-swap's route to a model's own server: tokenpool serves every model itself, behind this "
                     "API: send the request to /v1/... (or Ollama's /api/...) with the model named in its body"),
    (("/ui",), "llama-swap's web UI: tokenpool's is the dashboard at /dashboard"),
)


def no_route(request: Request) -> str:
    """A 404's message for a path no route serves (OpenAI's "Invalid URL (METHOD PATH)"), with what is there instead:
    the route under /v1 a client whose base URL lacks it meant, what stands for another server's API, else where
    the APIs are. vLLM and OpenAI answer 404s too; FastAPI's bare "Not Found" named nothing."""
    method, path = request.method, request.url.path
    head = f"Invalid URL ({method} {path})"
    for prefixes, instead in ELSEWHERE:
        if any(path == x or path.startswith(x + "/") for x in prefixes):
            return f"{head}: {instead}"
    if path.startswith("/admin/"):
        return f"{head}: the admin API has no such route (its routes are listed at /docs)"
    if not path.startswith(("/v1/", "/api/", "/admin", "/dashboard")):
        scope = dict(request.scope, path="/v1" + path)
        if any(r.matches(scope)[0] != Match.NONE for r in request.app.router.routes):
            return (f"{head}: did you mean /v1{path}? OpenAI's API is under /v1 here (a client's base URL: "
                    f"{str(request.base_url).rstrip('/')}/v1)")
    return f"{head}: OpenAI's API is under /v1, Ollama's under /api, the dashboard at /dashboard"


def anthropic_errors(request: Request) -> bool:
    """Whether a request's errors take Anthropic's shape: the Messages API's always; the `anthropic` client's
    (`anthropic-version`) on the Models API it also calls (`/v1/models`) and on a path no route serves (its
    `beta.files.list()`), never on an OpenAI route (/v1/chat/completions with that header answered Anthropic's shape
    to an OpenAI client)."""
    path = request.url.path
    if path.startswith("/v1/messages"):
        return True
    return speaks_anthropic(request) and (path == "/v1/models" or path.startswith("/v1/models/")
                                          or request.scope.get("endpoint") is None)


async def _refuse(send, scope, e: ServingError) -> None:
    """Answer `e` from ASGI middleware, in the route's API's error shape."""
    body = ErrorJSON(error_content(scope.get("path", ""), e), e.status).body
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *((k.lower().encode(), v.encode()) for k, v in e.headers().items())]
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def error_content(path: str, e: ServingError, anthropic: bool = False) -> dict:
    """An error's body as the route's API writes it: Ollama's `{"error": "..."}` under /api/, Anthropic's under
    /v1/messages (and to the `anthropic` client: `anthropic`), OpenAI's elsewhere."""
    if path.startswith("/api/"):
        return {"error": e.message}
    if anthropic or path.startswith("/v1/messages"):
        return anthropic_error(e)
    return e.body()


async def _too_large(send, limit: int, path: str = "") -> None:
    body = ErrorJSON(error_content(path, ServingError(413, f"request body exceeds {limit} bytes")), 413).body
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class ErrorJSON(JSONResponse):
    """Error bodies as ASCII JSON: a message that quotes client text (a lone surrogate, say) still renders."""

    def render(self, content) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode()


def _may_operate(request: Request) -> bool:
    if not request.app.state.controller.cfg.auth_enabled:
        return True
    try:
        auth.operator(request)  # the admin token, the dashboard's session, or a single-user server's one key
    except ServingError:
        return False
    return True


def _auth_first(request: Request) -> None:
    """Raise the 401 a request would get from its route's auth dependency (which runs after body parsing)."""
    path = request.url.path
    if path.startswith("/admin"):
        auth.admin(request)
    elif path.startswith("/v1/"):
        auth.tenant(request)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "invalid request", None
    first = errs[0]
    if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
        return "the request body is empty: send a JSON object", None
    if first.get("type") == "model_attributes_type" and tuple(first.get("loc", ())) == ("body",):
        return f"the request body must be a JSON object, not {json_kind(first.get('input'))}", None
    if first.get("type") == "json_invalid":  # (its loc is the character position: not a parameter)
        pos = next((x for x in first.get("loc", ()) if isinstance(x, int)), None)
        why = (first.get("ctx") or {}).get("error")
        return ("the request body is not valid JSON" + (f" (at character {pos})" if pos is not None else "")
                + (f": {why}" if why else "")), None
    first = telling_error(errs)
    loc = list(first.get("loc", ()))
    if loc and loc[0] in ("body", "query", "path", "header"):  # (where the parameter came: not its name)
        loc = loc[1:]
    loc = field_path(loc)
    param = ".".join(loc) or None
    msg = str(first.get("msg")).removeprefix("Value error, ")  # (pydantic's, before a validator's own words)
    got = first.get("input")
    if str(first.get("type", "")).endswith("_type") and (got is None or isinstance(got, (str, int, float, bool))):
        # what was sent, as JSON writes it: "priority: Input should be a valid integer (got true)" -- a strict field
        # (the admin API's numbers and switches) refuses "2", true and 2.5 alike
        shown = json.dumps(got)
        msg += f" (got {shown if len(shown) <= 40 else shown[:37] + '...'})"
    return (f"{param}: {msg}" if param else msg), param


def build_app(cfg: ServerConfig, manage_controller: bool = True, controller: Controller | None = None) -> FastAPI:
    """The app; with `manage_controller=False` its lifespan leaves starting and stopping the controller to the
    caller (controller.shutdown.run does, to report start-up errors in one line and to drain on SIGTERM, and gives
    its own `controller`, whose workers it started before this module's imports)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage_controller:
            await app.state.controller.start()
        try:
            yield
        finally:
            if manage_controller:
                await app.state.controller.stop()
            app.state.serving.close()

    app = FastAPI(title="tokenpool", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible multi-model serving on a shared GPU pool")
    app.state.controller = ctl = controller or Controller(cfg)
    app.state.serving = OpenAIServing(ctl)
    app.state.responses = ResponseStore()  # (/v1/responses with store: kept in memory)
    app.include_router(openai_routes.router)
    app.include_router(ollama.router)
    app.include_router(admin_routes.router)
    app.include_router(dashboard_routes.router)

    def answer(request: Request, e: ServingError) -> JSONResponse:
        """The error as the route's API writes it (`error_content`), its headers (Retry-After) on every API."""
        path = request.url.path
        return ErrorJSON(error_content(path, e, anthropic_errors(request)), status_code=e.status, headers=e.headers())

    @app.exception_handler(ServingError)
    async def serving_error(request: Request, e: ServingError):
        return answer(request, e)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        try:
            _auth_first(request)  # a caller without a valid token hears 401 whatever its body holds
        except ServingError as denied:
            return answer(request, denied)
        if request.scope.get("endpoint") in openai_routes.COUNTED | openai_routes.REFUSALS_COUNTED:
            # a refused request of a route that counts its refusals (each under its model and tenant): this one too
            try:
                tenant = auth.tenant(request)  # (/rerank, /score: not under /v1/; the 401 counts itself)
            except ServingError as denied:
                return answer(request, denied)
            name = e.body.get("model") if isinstance(e.body, dict) else None
            request.app.state.controller.count_refusal(name if isinstance(name, str) else None, tenant.name, 400)
        msg, param = _validation_message(e)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if not ctype.endswith("json") and any(err.get("loc", ("",))[:1] == ("body",) for err in e.errors()):
            # (curl -d sends application/x-www-form-urlencoded unless told otherwise.) Not parsed as JSON anyway: a
            # cross-site form post can send these content types without a preflight, JSON it cannot.
            msg, param = (f"the request body must be JSON, sent with content-type: application/json (this request's "
                          f"content-type: {ctype or 'none'})"), None
        return answer(request, ServingError(400, msg, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        if e.status_code in (408, 413) and counted_path(request.url.path):
            # a request refused for its body is a refused request (others: no route)
            request.app.state.controller.count_refusal(None, "-", e.status_code)
        code = {404: "not_found", 405: "method_not_allowed", 408: "request_timeout"}.get(e.status_code)
        message = str(e.detail)
        if e.status_code == 404 and request.scope.get("endpoint") is None:  # (no route: not a route's own 404)
            message = no_route(request)
        elif e.status_code == 405 and (allow := (getattr(e, "headers", None) or {}).get("Allow")):
            message = f"{request.method} {request.url.path} is not allowed: it takes {allow}"
        err = ServingError(e.status_code, message, code=code)
        return ErrorJSON(error_content(request.url.path, err, anthropic_errors(request)), status_code=e.status_code,
                         headers=getattr(e, "headers", None))

    @app.exception_handler(UnicodeEncodeError)
    async def not_unicode(request: Request, e: UnicodeEncodeError):
        if "surrogate" not in str(e):
            return await unexpected(request, e)
        # client text no request model checked (an admin body, say): its fault, not ours
        return answer(request, ServingError(400, "the request holds text that is not valid Unicode (a lone UTF-16 "
                                                 "surrogate)"))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        log.exception("unhandled error")
        if not getattr(e, "counted", False) and counted_path(request.url.path):  # /v1 routes count their own 500s
            request.app.state.controller.count_refusal(None, "-", 500)
        return answer(request, ServingError(500, f"internal error: {type(e).__name__}"))

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def root() -> Response:
        """What answers here, in one line (Ollama's clients check that the root answers 200)."""
        return Response("tokenpool is running: OpenAI's API under /v1, Ollama's under /api, the dashboard at "
                        "/dashboard\n", media_type="text/plain")

    @app.get("/health")
    async def health(request: Request):
        c: Controller = request.app.state.controller
        if request.app.state.serving.draining:
            return JSONResponse({"status": "draining", "instance": c.instance}, status_code=503,
                                headers={"Retry-After": "5"})
        ok = c.ready()
        engines = sum(1 for e in c.pool.engines.values() if e.alive)
        # Once ready, a model that is not (its worker died and it loads again, or its loads fail) leaves the server
        # "degraded", still 200: it serves every other model, and a 503 there took the whole server out of a load
        # balancer's (or a Kubernetes Service's) endpoints for one model -- as vLLM's and Ollama's stay 200 while
        # their engine runs. 503 before the first ready ("starting"), and with no live engine ("unavailable").
        status = "ok" if ok else "starting" if not c.was_ready else "degraded" if engines else "unavailable"
        # instance: new at each start (the operator registers its models and tenants again when it changes)
        body = {"status": status, "engines": engines, "models": len(c.models), "instance": c.instance}
        if not ok and (failed := c.load_errors()):
            # What keeps it from ready, where a load keeps failing. /health answers anyone (probes send no key): the
            # names and the workers' errors (paths, exception text) go only to whoever may change what is served (no
            # auth, the admin token, the dashboard's session, or a single-user server's key); others hear how many.
            body["failed_models"] = failed if _may_operate(request) else len(failed)
        if status == "degraded":
            unready = c.unready_models()
            body["unready_models"] = unready if _may_operate(request) else len(unready)
        return JSONResponse(body, status_code=200 if status in ("ok", "degraded") else 503)

    @app.get("/metrics", dependencies=[Depends(auth.metrics_reader)])
    async def metrics(request: Request):
        return Response(request.app.state.controller.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(StartGate, state=app.state)
    app.add_middleware(BodyLimit, limit=cfg.max_request_bytes, on_refused=lambda: ctl.count_refusal(None, "-", 413),
                       timeout_s=cfg.body_timeout_s)
    app.add_middleware(RequestIds)  # (outside the two above: their refusals carry an id too)
    # Last added, so outermost: errors (401s, 413s) carry the CORS headers too, or a browser reports them as
    # network failures. No credentials: the API takes keys in headers, and the dashboard is same-origin.
    origins = cfg.cors_origins
    app.add_middleware(CORSMiddleware, allow_origins=origins or [],
                       allow_origin_regex=LOCAL_ORIGINS if origins is None else None, allow_methods=["*"],
                       allow_headers=["*"], expose_headers=["Retry-After", "x-request-id", "request-id", "x-should-retry"],
                       allow_credentials=False, max_age=600)
    return app
