"""A lean HTTP/1.1 client for the load test: one asyncio Protocol per connection, no HTTP library.

The load test shares a 2-core machine with the server it measures, so the client's own cost per streamed
event is part of what it would otherwise report: httpx (h11, pure Python) spends ~80-130 us of CPU per SSE
event, this client a few. It timestamps bytes when they reach `data_received` (the moment the event loop
hands them over), de-chunks `Transfer-Encoding: chunked` bodies and reads `Content-Length` ones. Enough
HTTP for a loopback server we started ourselves, not a general client.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

OnData = Callable[[bytes, float, float], None]  # (body bytes, perf_counter, time.time) as they arrive


class HTTPError(Exception):
    pass


class Connection(asyncio.Protocol):
    """One keep-alive connection; `await conn.request(...)` one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._done: asyncio.Future | None = None
        self._head: asyncio.Future | None = None
        self._on_data: OnData | None = None
        self._buf = bytearray()
        self._state = "done"
        self.closed = False

    # --- protocol callbacks ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._head is not None and not self._head.done():
            self._head.cancel()
        if self._done is not None and not self._done.done():
            self._done.set_exception(ConnectionError(f"connection lost: {exc}"))

    def data_received(self, data: bytes) -> None:
        now, wall = time.perf_counter(), time.time()
        self._buf += data
        try:
            self._parse(now, wall)
        except (ValueError, HTTPError) as e:
            if self._done is not None and not self._done.done():
                self._done.set_exception(HTTPError(f"bad response: {e}"))
            self.transport.close()  # type: ignore[union-attr]

    # --- requests ---
    def request(self, method: str, host: str, path: str, body: dict | None = None,
                headers: dict[str, str] | None = None, on_data: OnData | None = None) -> asyncio.Future:
        """Send a request; the future resolves to (status, headers, body) at the end of the response.

        With `on_data`, body bytes go to it as they arrive (and the result's body is empty).
        """
        if self.closed or self.transport is None:
            raise ConnectionError("connection is closed")
        loop = asyncio.get_running_loop()
        self._done, self._head = loop.create_future(), loop.create_future()
        self._on_data = on_data
        self._buf = bytearray()
        self._state = "head"
        self._left = 0
        self._body = bytearray()
        self.status, self.headers = 0, {}
        payload = json.dumps(body).encode() if body is not None else b""
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(payload)}"]
        if body is not None:
            lines.append("Content-Type: application/json")
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
        return self._done

    @property
    def head(self) -> asyncio.Future:
        """Resolves to the status code once the response head has arrived."""
        assert self._head is not None
        return self._head

    def close(self) -> None:
        """Close the connection (a response still arriving is abandoned: its future is cancelled)."""
        for f in (self._head, self._done):
            if f is not None and not f.done():
                f.cancel()
        if self.transport is not None:
            self.transport.close()

    # --- parsing ---
    def _emit(self, data: bytes, now: float, wall: float) -> None:
        if self._on_data is not None:
            self._on_data(data, now, wall)
        else:
            self._body += data

    def _finish(self) -> None:
        self._state = "done"
        if not self._done.done():  # type: ignore[union-attr]
            self._done.set_result((self.status, self.headers, bytes(self._body)))  # type: ignore[union-attr]

    def _parse(self, now: float, wall: float) -> None:
        buf = self._buf
        while buf:
            st = self._state
            if st == "head":
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
                del buf[:end + 4]
                self.status = int(lines[0].split(" ", 2)[1])
                self.headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
                self._head.set_result(self.status)  # type: ignore[union-attr]
                if self.headers.get("transfer-encoding", "").lower() == "chunked":
                    self._state = "size"
                else:
                    self._left = int(self.headers.get("content-length", "0"))
                    self._state = "identity"
                    if self._left == 0:
                        self._finish()
            elif st == "size":
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                self._left = int(bytes(buf[:end]).split(b";")[0], 16)
                del buf[:end + 2]
                self._state = "data" if self._left else "trailer"
            elif st in ("data", "identity"):
                n = min(self._left, len(buf))
                self._emit(bytes(buf[:n]), now, wall)
                del buf[:n]
                self._left -= n
                if self._left == 0:
                    if st == "identity":
                        self._finish()
                    else:
                        self._state = "crlf"
            elif st == "crlf":
                if len(buf) < 2:
                    return
                if buf[:2] != b"\r\n":
                    raise HTTPError("chunk not followed by CRLF")
                del buf[:2]
                self._state = "size"
            elif st == "trailer":
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                del buf[:end + 2]
                if end == 0:
                    self._finish()
            else:
                raise HTTPError(f"{len(buf)} unexpected bytes after the response")


async def connect(host: str, port: int) -> Connection:
    _, conn = await asyncio.get_running_loop().create_connection(Connection, host, port)
    return conn
