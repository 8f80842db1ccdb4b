"""Serving with a graceful end: bind, start the controller, serve, and drain on SIGTERM.

    `tokenpool serve` -> run(cfg) -> exit status

SIGTERM (or a first Ctrl-C, or SIGHUP: the terminal closed) does not stop the server at once: new requests get 503 + Retry-After (and /health
says "draining", so a load balancer stops sending), requests in flight get `shutdown_grace_s` to finish, and
whatever is still running then ends with an error event and `data: [DONE]` (a non-streamed one with a 503).
Then uvicorn closes its connections, the controller stops its workers, and the process exits 0. A second
signal stops at once. A local worker that exits meanwhile (signalled too: its requests done, the controller lets it
go) is not replaced.

One SIGTERM to a single local worker (not the server) stops that worker alone, quickly: it stops taking requests at
once, finishes those it has (`shutdown_grace_s` at most; then they go to another engine where nothing of them was
sent, else end with an error), and exits; its standby takes the slot, and requests for its models wait for that
one (controller/worker.py `Worker.run`, service.py `Controller._stopping`). A SIGHUP ignored when the server started (nohup) stays ignored.

The socket is served from before the controller starts (it starts its workers and reads the configured models'
tokenizers: seconds with real models): meanwhile /health answers 503 "starting" (a probe or a `curl` used to hang
on the listen backlog), and any other request waits for the start-up to end (`controller.app.StartGate`). A signal
that comes while the server is still starting stops the start-up: the workers started so far are stopped, the
run's admin token file is removed, and the process exits 0 (it used to die by the signal, status 143, leaving the
token file behind).

"accepting connections on" is logged once the socket is served, when the models are made or converted first (a
GGUF file's conversion: minutes for a 7B), so that where to go is said at once. "listening on" is logged once the
controller has started and uvicorn serves the bound socket with its own signal handling, with the port the kernel
gave; a port that cannot be bound, or a controller that cannot start (a model
that will not load, ...), is one log line and exit status 2, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import uvicorn

from controller.config import ServerConfig
from controller.errors import ServingError
from controller.startup import StartupError

if TYPE_CHECKING:
    from controller.tenants import TenantRegistry

log = logging.getLogger("tokenpool")
FLUSH_S = 2.0  # after the grace period, how long the ended streams get to write their error event
CLOSE_S = 5.0  # uvicorn's own wait for connections to close once draining is over
HEADER_TIMEOUT_S = 30.0  # a connection's request head (line and headers) must be complete this long after it opened


def bind(host: str, port: int, backlog: int = 4096) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP given explicitly: asyncio sets TCP_NODELAY on accepted sockets only when their proto says TCP
    # (with proto 0, small responses wait ~40 ms on Nagle and the client's delayed ACK)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def cannot_listen(host: str, port: int, e: OSError) -> str:
    """The line `tokenpool serve` stops on when `bind` failed: a port in use says what to do about it."""
    url = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    hint = (f" (a server is there already, perhaps tokenpool's own: `tokenpool ps --url {url}` asks it; --port, or "
            "listen.port in a --config file, picks another)" if e.errno == errno.EADDRINUSE else "")
    return f"cannot listen on {host}:{port}: {e.strerror or e}{hint}"


def _http_protocol():
    """uvicorn's httptools protocol, but a request it cannot parse gets a 400 in OpenAI's error JSON (uvicorn
    writes plain text), and a connection whose request head (request line and headers) is not complete
    HEADER_TIMEOUT_S after it opened, or after its previous response, gets a 408 and is closed: uvicorn has no
    such deadline, so idle or slowloris connections (a few bytes of headers, then nothing) were held for ever,
    each a file descriptor, until the process ran out of them. None (uvicorn's choice) without httptools."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return None

    class JSONErrorProtocol(HttpToolsProtocol):
        _head_timer: asyncio.TimerHandle | None = None

        def _send_error(self, status: bytes, msg: str, code: str, kind: str = "invalid_request_error",
                        headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
            body = json.dumps({"error": {"message": msg, "type": kind, "param": None, "code": code}}).encode()
            head = [b"HTTP/1.1 ", status, b"\r\n"]
            for name, value in (*self.server_state.default_headers, *headers):
                head += [name, b": ", value, b"\r\n"]
            head += [b"content-type: application/json\r\ncontent-length: ", str(len(body)).encode(),
                     b"\r\nconnection: close\r\n\r\n"]
            self.transport.write(b"".join(head) + body)
            self.transport.close()

        def send_400_response(self, msg: str) -> None:
            self._send_error(b"400 Bad Request", msg, "bad_http_request")

        # the request head's deadline: armed when the connection opens and after each response, disarmed once a
        # request's headers are complete (its body and its response take what they take)
        def _arm_head_timer(self) -> None:
            self._disarm_head_timer()
            if not self.transport.is_closing():
                self._head_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._head_timeout)

        def _disarm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or not (self.cycle is None or self.cycle.response_complete):
                return
            self._send_error(b"408 Request Timeout",
                             f"the request's headers did not arrive within {HEADER_TIMEOUT_S:g} s", "request_timeout")

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_timer()
            super().connection_lost(exc)

        def on_headers_complete(self) -> None:
            self._disarm_head_timer()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_head_timer()

        def shutdown(self) -> None:
            # The server closes (its drain is over): a request whose body is still arriving (a large prompt on a
            # slow link) gets the 503 new requests get while it drains, now. uvicorn waited CLOSE_S for that body,
            # then cancelled its task: a plain-text "Internal Server Error" 500 and an ASGI traceback in the log.
            # (Closing the connection lets its task read a disconnect and end quietly.)
            cycle = self.cycle
            if (cycle is not None and cycle.more_body and not cycle.response_started
                    and not self.transport.is_closing()):
                self._send_error(b"503 Service Unavailable", "the server is shutting down", "shutting_down",
                                 "service_unavailable_error", ((b"retry-after", b"5"),))
                return
            super().shutdown()

    return JSONErrorProtocol


class GracefulServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains (see the module docstring) instead of stopping."""

    def __init__(self, config: uvicorn.Config, serving, grace_s: float, url: str):
        super().__init__(config)
        self.serving, self.grace_s, self.url = serving, grace_s, url
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signals = 0
        self._drain: asyncio.Task | None = None
        self._closed = False

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's (SIGINT, SIGTERM), and SIGHUP as SIGTERM (the terminal that ran the server closed: it died by
        the signal, streams cut without an error event, the admin token file left), unless SIGHUP was ignored
        when the server started (nohup): then it stays ignored."""
        hup = _take_hangup(self.handle_exit)
        try:
            with super().capture_signals():
                yield
        finally:
            if hup is not None:
                signal.signal(signal.SIGHUP, hup)  # type: ignore[arg-type]

    # uvicorn's `serve` (capture_signals, startup, main_loop, shutdown) in three parts, so the socket is served while
    # the controller starts (StartupSignals holding the signals meanwhile): `open`, then `run`, then `close`.
    async def open(self, sockets: list[socket.socket]) -> None:
        """Serve `sockets` from now on (the app answers /health "starting" while the controller starts); signals
        stay the caller's until `run`."""
        self._loop = asyncio.get_running_loop()
        if not self.config.loaded:
            self.config.load()
        self.lifespan = self.config.lifespan_class(self.config)
        await self.startup(sockets=sockets)
        await self.on_tick(0)  # (the default headers: date)

    async def run(self, sockets: list[socket.socket]) -> None:
        """Serve with uvicorn's signal handling (this class's `handle_exit`) until told to exit, then `close`."""
        log.info("listening on %s (OpenAI API under /v1, Ollama's under /api, admin under /admin, the dashboard "
                 "at /dashboard)", self.url)
        with self.capture_signals():
            if not self.should_exit:
                await self.main_loop()
            await self.close(sockets)  # (a second signal meanwhile: stop at once, as in a drain)

    async def close(self, sockets: list[socket.socket]) -> None:
        """Stop accepting, and close the connections (their requests get CLOSE_S to finish); once."""
        if self.started and not self._closed:
            self._closed = True
            await self.shutdown(sockets=sockets)

    def handle_exit(self, sig: int, frame) -> None:
        # A signal handler (main thread, between two bytecodes of the loop): only flags and a thread-safe call.
        # uvicorn's own handler also records the signal to re-raise it after serving, which would turn a clean
        # drain into death by SIGTERM (exit status 143); this one does not.
        self._signals += 1
        if self._signals > 1 or self._loop is None or not self.started:
            self.should_exit = True
            self.force_exit = self._signals > 1
            if self.force_exit and self._loop is not None:  # the loop's own objects are touched on the loop only
                self._loop.call_soon_threadsafe(self._stop_now, sig)
            return
        self._loop.call_soon_threadsafe(self._start_drain, sig)

    def _stop_now(self, sig: int) -> None:
        """A second signal: what is in flight ends now, each with an error event and [DONE] (one not streamed: a
        503), and the server says so itself; a drain then ends without its "grace period over" line (its grace did
        not run out). It used to end the streams with no line of its own, and the drain went on to say "grace period
        over: ended N requests with an error" of those still closing."""
        n = _end_all(self.serving)
        log.warning("signal %d again: stopping now; %s in flight ended with an error", sig, _requests(n))

    def _start_drain(self, sig: int) -> None:
        self._drain = asyncio.ensure_future(self.drain(sig))

    async def drain(self, sig: int = 15) -> None:
        s = self.serving
        s.draining = True
        # A stop that signals the whole server (systemd's control group) signals its local workers too: each finishes
        # its requests, then the controller lets it go (EnginePool.release_if_idle); none is replaced while draining
        s.ctl.pool.quiet = True
        s.drain_retry_after = max(1, int(self.grace_s) + 1)
        # INFO: a stop someone asked for (Ctrl-C, systemctl stop, a pod's deletion) is no fault, as uvicorn's and
        # vLLM's "Shutting down" are INFO; what it cuts ("grace period over: ended ...") is the WARNING
        log.info("signal %d: draining; %s in flight get %.0f s to finish (signal again to stop now)",
                 sig, _requests(max(len(s.active), len(_admitted(s)))), self.grace_s)
        deadline = time.monotonic() + self.grace_s
        while (s.active or _admitted(s)) and time.monotonic() < deadline and not self.force_exit:
            await asyncio.sleep(0.05)
        if (s.active or _admitted(s)) and not self.force_exit:  # (a second signal ended them: `_stop_now`)
            n = _end_all(s)
            log.warning("grace period over: ended %s with an error", _requests(n))
            deadline = time.monotonic() + FLUSH_S
            while s.active and time.monotonic() < deadline and not self.force_exit:
                await asyncio.sleep(0.02)
        self.should_exit = True


def _end_all(s) -> int:
    """End every request in flight with an error (a drain's grace over, or a second signal); how many ended. Those
    still waiting for their model's load (or an engine) are ended too: each then answers at once (its stream an error
    event and [DONE], one not streamed a 503), where uvicorn cancelled it (a plain-text 500 and a traceback) once it
    stopped waiting for connections."""
    n = s.abort_all("the server is shutting down")
    return n + s.ctl.end_requests(lambda g: not any(t.gen is g for t in s.active), "the server is shutting down",
                                  "shutdown")


def _admitted(s) -> list:
    """The requests admitted and not yet answered, `s.active`'s and those still waiting for their model's load or an
    engine (not in `s.active` until they are placed): a drain gives them its grace too -- the load may finish in it."""
    return [g for g in s.ctl.activity.live.values() if not g.closed]


def _take_hangup(handler) -> object | None:
    """Install `handler` for SIGHUP unless SIGHUP is ignored (nohup) or there is none (or not the main thread);
    the handler it replaced, else None."""
    sig = getattr(signal, "SIGHUP", None)
    if sig is None or signal.getsignal(sig) == signal.SIG_IGN:
        return None
    try:
        return signal.signal(sig, handler)
    except ValueError:  # not the main thread
        return None


_early: list[int] = []  # signals `hold_signals` recorded before the start-up's own handlers were installed
_held: dict[int, object] = {}  # signal -> its handler before `hold_signals` (given back by StartupSignals.remove)


def hold_signals() -> None:
    """From now until `StartupSignals` takes over, SIGTERM/SIGINT/SIGHUP are recorded instead of killing the process
    (one ignored at start, as under nohup, stays ignored): the start-up then stops at once, cleanly. `serve` calls it
    before it writes the run's admin token file, which a kill by the signal left behind. `release_signals` (or
    StartupSignals.remove) gives the handlers from before back: left installed, a SIGTERM was recorded for ever,
    in the process and in every child forked from it (a multiprocessing pool's workers then outlived terminate())."""
    for sig in StartupSignals.SIGNALS:
        try:
            old = signal.getsignal(sig)
            if old != signal.SIG_IGN:
                signal.signal(sig, lambda got, _frame: _early.append(got))
                _held.setdefault(sig, old)
        except ValueError:  # not the main thread: nothing to hold
            return


def release_signals() -> None:
    """Give back the handlers `hold_signals` replaced (where StartupSignals has not already); forget what it
    recorded."""
    for sig, old in _held.items():
        signal.signal(sig, old)  # type: ignore[arg-type]
    _held.clear()
    _early.clear()


class StartupSignals:
    """SIGTERM/SIGINT while the server starts (before uvicorn's own handlers): `run(start)` runs the start-up
    coroutine, cancelled by the first such signal (one that came earlier, during the synchronous set-up, counts
    too: the loop runs its handler first). Installed on construction; `remove()` gives the previous handlers back
    (uvicorn then installs its own). Without signals to catch (not the main thread), it only runs `start`."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, *((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ()))

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.got: int | None = None
        self._task: asyncio.Future | None = None
        self._old: dict[int, object] = {}
        for sig in self.SIGNALS:
            # (what `hold_signals` replaced is the handler to give back at remove)
            old = _held[sig] if sig in _held else signal.getsignal(sig)
            if old == signal.SIG_IGN and sig == getattr(signal, "SIGHUP", None):  # (under nohup: stays ignored)
                continue
            try:
                self.loop.add_signal_handler(sig, self._on_signal, sig)
            except (ValueError, RuntimeError, NotImplementedError):  # not the main thread, or no signals here
                continue
            _held.pop(sig, None)
            self._old[sig] = old
        if _early:  # one came between `hold_signals` and here
            self._on_signal(_early[0])
            _early.clear()

    def _on_signal(self, sig: int) -> None:
        if self.got is None:
            self.got = sig
            log.info("signal %d during start-up: stopping", sig)  # (asked for, as a drain's: not a WARNING)
        if self._task is not None:
            self._task.cancel()

    async def run(self, start) -> bool:
        """Await `start` (a coroutine); True if a signal stopped it (it was cancelled), False once it finished."""
        self._task = asyncio.ensure_future(start)
        if self.got is not None:
            self._task.cancel()
        try:
            await asyncio.shield(self._task)
        except asyncio.CancelledError:
            if self.got is None:  # this task itself was cancelled, not by a signal
                self._task.cancel()
                raise
            await asyncio.gather(self._task, return_exceptions=True)  # let the start-up unwind
            return True
        return False

    def remove(self) -> None:
        for sig, old in self._old.items():
            self.loop.remove_signal_handler(sig)
            signal.signal(sig, old)  # type: ignore[arg-type]  (remove_signal_handler installs the default)
        self._old = {}


async def serve_async(cfg: ServerConfig, prepare: Callable[[], None] | None = None,
                      tenants: TenantRegistry | None = None) -> int:
    early = StartupSignals()
    try:
        return await _serve(cfg, early, prepare, tenants)
    finally:
        early.remove()


def _requests(n: int) -> str:
    return f"{n} request{'' if n == 1 else 's'}"


async def _in_a_thread(fn: Callable[[], None]) -> None:
    """`fn()` on a daemon thread, awaited: a signal that stops the start-up does not wait for it (a model half made
    is made again at the next start: its config.json, or the conversion's marker, is written last)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def answer(set_it: Callable[[], object]) -> None:
        try:
            loop.call_soon_threadsafe(set_it)
        except RuntimeError:  # the loop closed: the start-up stopped first and the process is ending; its exit
            pass  # stops the child `fn` waited for (children.stop_all), waking it here

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting task
            answer(lambda err=e: done.done() or done.set_exception(err))
        else:
            answer(lambda: done.done() or done.set_result(None))

    threading.Thread(target=run, name="tokenpool-prepare", daemon=True).start()
    await done


async def _start(ctl, workers: asyncio.Future, prepare: Callable[[], None] | None) -> None:
    await workers  # (`_serve` started them: its error is the start-up's)
    if prepare is None:
        await ctl.start()
        return
    # (the default's models made on a first run: /health says "starting" meanwhile) the local workers start beside
    # it, and join once it is done (Controller.start)
    made = asyncio.ensure_future(_in_a_thread(prepare))
    try:
        await ctl.start(made)
    finally:
        if not made.done():  # (a start-up stopped first, by a signal or an error: not waited for, as before)
            made.cancel()
        elif not made.cancelled():
            made.exception()  # (its error, where ctl.start failed first, is not also said as never retrieved)


async def _serve(cfg: ServerConfig, early: StartupSignals, prepare: Callable[[], None] | None = None,
                 tenants: TenantRegistry | None = None) -> int:
    from controller.service import Controller

    try:
        sock = bind(cfg.listen.host, cfg.listen.port)
    except OSError as e:
        log.error("%s", cannot_listen(cfg.listen.host, cfg.listen.port, e))
        return 2
    host, port = sock.getsockname()[:2]
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    ctl = Controller(cfg, tenants)
    # The local workers are spawned before the app is built: their start-up (imports: the way to ready) runs beside
    # the app's imports (~0.3 s of a 2-core host's), which it came after. Their start's error is said with the
    # start-up's (`_start`).
    workers = asyncio.ensure_future(ctl.start_workers(hold_joins=prepare is not None))
    server: GracefulServer | None = None
    serving = None
    try:
        await asyncio.wait({workers})
        from controller.app import build_app

        app = build_app(cfg, manage_controller=False, controller=ctl)
        serving = app.state.serving
        # lifespan off: this function starts and stops the controller itself (build_app's lifespan would only close
        # `serving`, done below); a lifespan task still waiting at exit was cancelled with a traceback
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=int(CLOSE_S), backlog=4096,
                                http=_http_protocol() or "auto", proxy_headers=True,
                                forwarded_allow_ips=cfg.forwarded_allow_ips)
        server = GracefulServer(config, serving, cfg.shutdown_grace_s, url)
        # a configuration found unservable once the workers joined (Controller.fatal, logged there): exit 2
        ctl.on_fatal = lambda: setattr(server, "should_exit", True)
        # The socket is served while the controller starts (its workers start, the configured models' tokenizers are
        # read: seconds with real models): /health answers 503 "starting" (a Kubernetes probe or a `curl` hung on the
        # listen backlog, or timed out), and every other request waits for the start-up (`controller.app.StartGate`).
        started = app.state.started = asyncio.get_running_loop().create_future()
        await server.open([sock])
        if prepare is not None:  # (minutes, for a 7B GGUF: where to go is said now, not only once it is done)
            log.info("accepting connections on %s: %s first; /health says \"starting\" and requests wait until the "
                     "server is ready", url, getattr(prepare, "doing", "preparing the models"))
        try:
            stopped = await early.run(_start(ctl, workers, prepare))
        except StartupError as e:  # (the operator's to fix, said as one line: `tokenpool serve`'s exit 2)
            started.set_result("the server could not start (its log says why)")
            log.error("%s", e)
            return 2
        except (ServingError, OSError, ValueError) as e:
            started.set_result("the server could not start (its log says why)")  # (paths: not for any caller)
            log.error("cannot start: %s", getattr(e, "message", None) or e)
            return 2
        except BaseException:  # (a bug: what waits for the start-up is let go all the same)
            started.set_result("the server could not start")
            raise
        if stopped:
            started.set_result("the server was stopped while it started")
            return 0  # a signal during start-up: stopped before serving (the finally below stops the workers)
        started.set_result(None)
        early.remove()  # uvicorn's handlers (GracefulServer.handle_exit) from here
        if ctl.fatal is None:
            await server.run([sock])
        return 0 if ctl.fatal is None else 2
    finally:
        if server is not None:
            await server.close([sock])
        sock.close()
        with _signals_while_stopping():
            await ctl.stop()
            if serving is not None:
                serving.close()
        log.info("stopped")


@contextlib.contextmanager
def _signals_while_stopping() -> Iterator[None]:
    """SIGTERM/SIGINT/SIGHUP while the workers are stopped (after uvicorn gave its handlers back) are said and
    otherwise ignored: a second Ctrl-C there was a KeyboardInterrupt traceback that cut the stop short (a worker
    not stopped, the admin token file left)."""
    loop = asyncio.get_running_loop()
    held = []
    for sig in StartupSignals.SIGNALS:
        old = signal.getsignal(sig)
        if old == signal.SIG_IGN:
            continue
        try:
            loop.add_signal_handler(sig, log.warning, "signal %d: already stopping (the workers are being stopped)",
                                    sig)
        except (ValueError, RuntimeError, NotImplementedError):  # not the main thread, or no signals here
            continue
        held.append((sig, old))
    try:
        yield
    finally:
        for sig, old in held:
            loop.remove_signal_handler(sig)
            signal.signal(sig, old)


def run(cfg: ServerConfig, prepare: Callable[[], None] | None = None, tenants: TenantRegistry | None = None) -> int:
    """Serve until SIGTERM/SIGINT; the process's exit status (0 after a graceful end). `prepare` (on a thread, after
    the bind, before the controller starts; a `StartupError` is said and exits 2): what the models need first.
    `tenants`: the tenants as `tokenpool serve` read them (its check is the server's read); None: read here."""
    return asyncio.run(serve_async(cfg, prepare, tenants))
