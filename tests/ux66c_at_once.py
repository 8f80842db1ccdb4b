"""Requests to one live server sent at once: its engine decodes them in one batch, as many steps as the longest reply
where one at a time took the sum (on the CPU a step of 2-5 rows costs about 1.6-2.2x one row's: cheaper than one at
a time all the same), and its rows are batch-invariant (tests/test_engine_batching.py), so a greedy reply is the
one it gives alone. Keep to the model's max_num_seqs sequences, and serve them with BURSTS in the configuration:
TTFT-SLO admission judges a request sent behind prompts not yet prefilled by its estimated wait, and on a loaded
2-core CPU a burst of SmolLM2's few-shot chats passes its 5 s SLO (429s; what admission does is
tests/test_ux67i_admission_burst.py's and test_controller_logic's)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

BURSTS = {"admission": {"enabled": False}}  # (a configuration's part: its bursts are not refused for their wait)


def at_once(*calls: Callable[[], object]) -> list:
    """Each of `calls` (no arguments) on its own thread, all at once: their results in order (an exception raised
    by one, raised here)."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(c) for c in calls]]
