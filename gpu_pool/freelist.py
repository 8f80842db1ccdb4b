"""A free list of integer ranges with best-fit allocation and coalescing.

Plain Python over integers, no torch: the VRAM arena uses it over byte offsets, the host KV pool over block
ids. Free runs are kept sorted by start; `give` merges a returned run with its neighbours, so the list never
holds two adjacent runs (the invariant the property tests check).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort


class FreeList:
    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._starts: list[int] = [0] if capacity else []  # sorted
        self._len: dict[int, int] = {0: capacity} if capacity else {}
        self.free = capacity  # total free units

    def runs(self) -> list[tuple[int, int]]:
        """(start, length) of every free run, in address order."""
        return [(s, self._len[s]) for s in self._starts]

    @property
    def largest(self) -> int:
        return max(self._len.values(), default=0)

    def take(self, n: int, align: int = 1) -> int | None:
        """Best-fit: the start of an `align`-aligned range of `n` units, or None if no run holds one.

        Among the runs that fit, the one leaving the smallest remainder wins (ties: lowest address), which
        keeps large runs whole for large requests. Alignment padding at a run's head stays free.
        """
        if n <= 0:
            raise ValueError(f"size must be > 0, got {n}")
        best: tuple[int, int, int] | None = None  # (waste, start, aligned start)
        for s in self._starts:
            a = -(-s // align) * align
            length = self._len[s]
            if a + n <= s + length:
                waste = length - n
                if best is None or waste < best[0]:
                    best = (waste, s, a)
                    if waste == 0:
                        break
        if best is None:
            return None
        _, s, a = best
        length = self._len.pop(s)
        self._starts.pop(bisect_left(self._starts, s))
        if a > s:  # head padding stays free
            self._insert(s, a - s)
        if a + n < s + length:
            self._insert(a + n, s + length - a - n)
        self.free -= n
        return a

    def take_at(self, start: int, n: int) -> bool:
        """Take exactly [start, start + n) if it is free; False (nothing taken) if not."""
        if n <= 0:
            raise ValueError(f"size must be > 0, got {n}")
        i = bisect_right(self._starts, start) - 1
        if i < 0:
            return False
        s = self._starts[i]
        length = self._len[s]
        if start + n > s + length:
            return False
        del self._len[s]
        self._starts.pop(i)
        if start > s:
            self._insert(s, start - s)
        if start + n < s + length:
            self._insert(start + n, s + length - start - n)
        self.free -= n
        return True

    def take_upto(self, n: int) -> tuple[int, int] | None:
        """Part of the largest run: (start, min(n, its length)); None when nothing is free."""
        if not self._starts:
            return None
        s = max(self._starts, key=lambda x: (self._len[x], -x))
        got = min(n, self._len[s])
        length = self._len.pop(s)
        self._starts.pop(bisect_left(self._starts, s))
        if got < length:
            self._insert(s + got, length - got)
        self.free -= got
        return s, got

    def give(self, start: int, n: int) -> None:
        """Return [start, start + n) and merge it with adjacent free runs."""
        if n <= 0 or start < 0 or start + n > self.capacity:
            raise ValueError(f"range [{start}, {start + n}) is outside [0, {self.capacity})")
        i = bisect_left(self._starts, start)
        if i < len(self._starts) and self._starts[i] < start + n:
            raise ValueError(f"double free: [{start}, {start + n}) overlaps free run at {self._starts[i]}")
        if i > 0:
            p = self._starts[i - 1]
            if p + self._len[p] > start:
                raise ValueError(f"double free: [{start}, {start + n}) overlaps free run at {p}")
        self.free += n
        if i < len(self._starts) and self._starts[i] == start + n:  # merge with the next run
            n += self._len.pop(self._starts.pop(i))
        if i > 0:
            p = self._starts[i - 1]
            if p + self._len[p] == start:  # merge into the previous run
                self._len[p] += n
                return
        self._insert(start, n)

    def _insert(self, start: int, n: int) -> None:
        insort(self._starts, start)
        self._len[start] = n
