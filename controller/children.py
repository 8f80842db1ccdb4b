"""The child processes that end with the server's process: the default's models made (`serve.ensure_demo_models`,
`python -m controller.model_factory`) and a GGUF file's conversion (`real_model.ensure_gguf`, `python -m
controller.real_model`).

Each is waited for on a daemon thread of the start-up, which a signal that stops the start-up does not wait for
(`shutdown._in_a_thread`): a child still running when this process ends ran on orphaned, and the next start made or
converted into the same folders beside it. One registry for both (each module kept its own set and atexit function,
one sending SIGTERM, the other SIGKILL). Stdlib only: the converter's own process imports it too (real_model).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import NoReturn

STOP_S = 5.0  # how long the children get to unwind on SIGTERM before SIGKILL

_running: set[subprocess.Popen] = set()


@contextlib.contextmanager
def ended_at_exit(p: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """`p`, ended with this process (`stop_all`) while the block waits for it."""
    _running.add(p)
    try:
        yield p
    finally:
        _running.discard(p)


def running() -> list[subprocess.Popen]:
    return list(_running)


@atexit.register
def stop_all() -> None:
    """SIGTERM to every child still running, which it unwinds on (the model factory removes its half-made folder; the
    converter, with no handler, ends at once), then SIGKILL to those left after STOP_S: all of them signalled first,
    so that one child's unwinding does not hold back another's signal."""
    children = running()
    for p in children:
        with contextlib.suppress(OSError):  # (it ended meanwhile)
            p.terminate()
    deadline = time.monotonic() + STOP_S
    for p in children:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(STOP_S)


def exit_now(code: int) -> NoReturn:
    """Exit the child with `code` without the interpreter's teardown: with torch and transformers imported, 1.4-2.3 s
    of a busy 2-core host (its modules and objects freed one by one, mostly in the cyclic collector), which the server
    waited for, on a first run's way to ready (its workers join once the models are made) and at a stop during one
    (after its "stopped" line). What the teardown does that matters is done first: the atexit functions run, the
    logs and the output flushed."""
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # (a closed pipe: nothing left to say)
            stream.flush()
    os._exit(code)
