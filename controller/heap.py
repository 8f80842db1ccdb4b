"""Garbage-collector settings of the serving processes (the controller and the engine workers).

Two costs the cyclic collector adds to streaming, both measured with py-spy under the API-overhead load test:
- the start-up heap (torch, tokenizers, pydantic models: ~200k objects) is rescanned by every oldest-generation
  pass, ~150 ms each: a pause every stream in flight feels. Frozen, it is never scanned again.
- a step's burst of deltas (thousands of short-lived objects at 1,000 streams) crosses the default young
  threshold of 700 every step, so each burst paid for collections of objects that were about to be freed by
  reference counting anyway (~15% of the controller's CPU). The young threshold counts allocations net of
  frees, so a threshold above the largest burst lets them die uncollected; cyclic garbage still gets
  collected, a little later.
"""

from __future__ import annotations

import ctypes
import gc

from tokenpool import env

YOUNG_THRESHOLD = 50_000  # (TOKENPOOL_GC_YOUNG overrides it, for A/B runs)

try:
    _malloc_trim = ctypes.CDLL(None).malloc_trim  # glibc's; not in musl or macOS's libc
except (OSError, AttributeError):
    _malloc_trim = None


def freeze_long_lived(collect: bool = False) -> None:
    """Move everything alive now out of the collector's reach; call after start-up and after loading a model."""
    if collect:
        gc.collect()
    gc.freeze()
    g0, g1, g2 = gc.get_threshold()
    young = env.GC_YOUNG.integer() if env.GC_YOUNG.get() else max(YOUNG_THRESHOLD, g0)
    gc.set_threshold(young, g1, g2)


def collect_all() -> None:
    """After dropping something long-lived (an unloaded model): frozen objects in reference cycles are only
    freed by a collection that sees them, so thaw, collect (~150 ms), freeze again."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def give_back_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim, every thread's arena; elsewhere
    nothing). glibc keeps what a big, short-lived allocation freed: a 4 MB prompt's tokenization (the tokenizer's
    encoding, ~330 bytes a token) left the controller ~600 MB larger after its 400, for good."""
    if _malloc_trim is not None:
        _malloc_trim(0)
