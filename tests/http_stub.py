"""A stand-in HTTP server for the CLI's tests (a handler class of http.server's on a free port, in a thread) and a
stdin that says it is a terminal."""

from __future__ import annotations

import contextlib
import http.server
import io
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def stub_server(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """`with stub_server(Handler) as url:` the server's base URL; shut down and closed after."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


class Terminal(io.StringIO):
    """Lines typed at an interactive prompt (isatty true)."""

    def isatty(self) -> bool:
        return True
