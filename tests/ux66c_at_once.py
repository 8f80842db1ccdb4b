"""Requests to one live server sent at once: its engine decodes them in one batch (max_num_seqs), about one reply's
steps where one at a time took their sum, and its rows are batch-invariant (tests/test_engine_batching.py), so a
greedy reply is the one it gives alone. (Each of the tests of real SmolLM2 sends its independent requests so.)"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor


def at_once(*calls: Callable[[], object]) -> list:
    """Each of `calls` (no arguments) on its own thread, all at once: their results in order (an exception raised
    by one, raised here)."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(c) for c in calls]]
