"""A stand-in HTTP server for the CLI's tests (a handler class of http.server's on a free port, in a thread) and a
stdin that says it is a terminal."""

from __future__ import annotations

import contextlib
import http.server
import io
import json
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


class JsonHandler(http.server.BaseHTTPRequestHandler):
    """A quiet handler base whose `_json(status, body)` answers with `body` as JSON."""

    def log_message(self, *a):
        pass

    def _json(self, status: int, body) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class Terminal(io.StringIO):
    """Lines typed at an interactive prompt (isatty true)."""

    def isatty(self) -> bool:
        return True


def sse_chat(asked: list[dict], events: list[dict]) -> type[http.server.BaseHTTPRequestHandler]:
    """A chat-completions stand-in: each POST's JSON body is appended to `asked`, and the answer streams `events`
    (one `data:` line each, flushed), then `[DONE]`."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *a):
            pass

        def do_POST(self):
            asked.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()
            for ev in events:
                self.wfile.write(f"data: {json.dumps(ev)}\n\n".encode())
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")

    return Handler
