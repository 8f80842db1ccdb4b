"""/health polled while a test's request runs: how long the server's event loop kept other callers waiting."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import httpx


@contextlib.contextmanager
def health_waits(url: str) -> Iterator[list[float]]:
    """/health polled every 10 ms while the block runs: the list of its answers' waits (seconds)."""
    waits: list[float] = []
    done = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            while not done.is_set():
                t0 = time.perf_counter()
                c.get("/health")
                waits.append(time.perf_counter() - t0)
                time.sleep(0.01)

    th = threading.Thread(target=poll)
    th.start()
    try:
        yield waits
    finally:
        done.set()
        th.join()
