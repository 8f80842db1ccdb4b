"""Which weight slots to evict so that a model's slot finds a contiguous range: the one placement decision.

Plain Python over integer ranges. Its one caller is the slot table (gpu_pool/slots.py) that the real pool
(token_scheduler/residency.py) and the simulator (load_tests/simulator.py) share, so a fragmented arena skips
the same prefetches and forces the same evictions in both.

A policy reasons in bytes; the arena needs one aligned contiguous range. When free bytes suffice but no free
run does, something beyond the policy's plan must go. Two rules:

- no order from the policy (the fallback; for a load, also when the order cannot make room): a load evicts the pool's least recently used models one
  after another until a range fits -- whether or not a victim borders a free run (so it may evict models that
  do not help); a prefetch never evicts and is skipped.
- an order from the policy (models it allows to go, preferred victim first), load or prefetch: among the
  address windows made only of free runs and those models' slots that hold an aligned range, take the one
  whose most valuable victim comes earliest in the order, then the fewest bytes evicted, then the lowest
  address. Only models inside that window go.
"""

from __future__ import annotations

# An arena's slot sizes and offsets are multiples of this (gpu_pool.arena): big enough to keep the free list short,
# small enough not to waste
DEFAULT_ALIGN = 2 * 2**20


def align_up(n: int, align: int = DEFAULT_ALIGN) -> int:
    """`n` rounded up to a multiple of `align`: the bytes a weight slot of `n` takes, or the first aligned offset
    from `n`. The one rounding of the arena, the slot table and the controller's placement (`ModelInfo.slot_bytes`)."""
    return -(-n // align) * align


def _fits(start: int, end: int, need: int, align: int) -> bool:
    return align_up(start, align) + need <= end


def placement_victims(free_runs: list[tuple[int, int]], slots: dict[str, tuple[int, int]], need: int, align: int,
                      order: list[str] | None, lru: list[str] = (), blocking: bool = True) -> list[str] | None:
    """Models to evict before `need` bytes (already rounded) can be allocated: [] if they fit now, None if they
    cannot (or must not: a prefetch without an order).

    `free_runs`: (start, length) of the allocator's free runs; `slots`: model -> (offset, nbytes) of every
    weight slot held (landed or in flight); `order`: the policy's evictable models, preferred first (None:
    the fallback rule over `lru`, the pool's evictable models least recently used first).
    """
    if any(_fits(s, s + n, need, align) for s, n in free_runs):
        return []
    victims = _window(free_runs, slots, need, align, order) if order is not None else None
    if victims is None and blocking:  # a load must happen: the fallback if the policy's order cannot make room
        victims = _prefix(free_runs, slots, need, align, lru)
    return victims


def _prefix(free_runs, slots, need, align, lru) -> list[str] | None:
    """Evict in `lru` order until the coalesced free space holds an aligned range (an allocate-retry loop)."""
    runs = sorted(free_runs)
    out = []
    for name in lru:
        if name not in slots:
            continue
        out.append(name)
        runs = _coalesce(runs + [slots[name]])
        if any(_fits(s, s + n, need, align) for s, n in runs):
            return out
    return None


def _coalesce(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for s, n in sorted(runs):
        if out and out[-1][0] + out[-1][1] == s:
            out[-1][1] += n
        else:
            out.append([s, n])
    return [(s, n) for s, n in out]


def _window(free_runs, slots, need, align, order) -> list[str] | None:
    rank = {name: i for i, name in enumerate(order) if name in slots}
    # address-ordered segments: free runs (no victim) and the slots the policy lets go
    segs = sorted([(s, n, None) for s, n in free_runs] + [(*slots[name], name) for name in rank])
    best = None  # (max rank, bytes evicted, start), victims
    for i, (start, _, _) in enumerate(segs):
        end, worst, nbytes, victims = start, -1, 0, []
        for s, n, name in segs[i:]:
            if s != end:  # a slot the policy keeps (or the KV region) breaks the window
                break
            end = s + n
            if name is not None:
                worst, nbytes = max(worst, rank[name]), nbytes + n
                victims.append(name)
            if _fits(start, end, need, align):
                key = (worst, nbytes, start)
                if best is None or key < best[0]:
                    best = (key, victims)
                break  # a longer window only evicts more
    return None if best is None else sorted(best[1], key=rank.__getitem__)


def kv_pages(kv_bytes: int, per_token: int, block_tokens: int = 16, page_bytes: int | None = None,
             min_page_bytes: int = 0) -> tuple[int, int]:
    """(page bytes, pages) of a pool's KV region: a page holds `block_tokens` tokens of the first model
    registered, and at least `min_page_bytes` (rounded up to 256 B), unless `page_bytes` is given; the region is as
    many pages as fit."""
    page_bytes = page_bytes or -(-max(block_tokens * per_token, min_page_bytes) // 256) * 256
    return page_bytes, kv_bytes // page_bytes


def kv_region_bytes(kv_bytes: int, page_bytes: int | None = None, align: int = DEFAULT_ALIGN) -> int:
    """Bytes of the arena the KV region takes: its whole pages (`kv_pages`), rounded up to the alignment as every range
    is. Before the page size is known (the first model registered fixes it) the most it can take: all of `kv_bytes`,
    rounded up. The weight space is the arena less this (`SlotTable.weight_capacity`, the controller's estimate)."""
    return align_up(kv_bytes if page_bytes is None else kv_bytes // page_bytes * page_bytes, align)
