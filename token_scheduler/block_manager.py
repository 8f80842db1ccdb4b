"""KV block allocator: plain Python over integer block ids (no torch).

`allocate` raises `NoFreeBlocks` on shortage; the scheduler decides what to do (wait, preempt, swap).
The same class manages GPU blocks and host (swap) blocks. `share(block_size)` gives another model a view of
the same pool with its own tokens per block: models of different KV widths then draw pages of one byte size
from one free list (the multi-model engine's shared KV region). Each view counts the blocks drawn through it
(`num_held`): one model's share of the pool, read every step without walking its requests.
"""

from __future__ import annotations

from collections import deque


class NoFreeBlocks(RuntimeError):
    pass


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token (got {num_blocks} x {block_size})")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()
        self.num_held = 0  # blocks allocated through this allocator (this view of a shared pool), not yet freed

    def share(self, block_size: int) -> BlockAllocator:
        """Another allocator over the same blocks (one free list), counting `block_size` tokens per block."""
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        view = object.__new__(BlockAllocator)
        view.num_blocks, view.block_size, view._free, view._used = self.num_blocks, block_size, self._free, self._used
        view.num_held = 0
        return view

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise NoFreeBlocks(f"need {n} KV blocks, {len(self._free)} free of {self.num_blocks}")
        out = [self._free.popleft() for _ in range(n)]
        self._used.update(out)
        self.num_held += n
        return out

    def free(self, ids: list[int]) -> None:
        for b in ids:
            if b not in self._used:
                raise ValueError(f"block {b} is not allocated (double free?)")
            self._used.remove(b)
            self._free.append(b)
            self.num_held -= 1

    def grow(self, block_ids: list[int], num_tokens: int) -> None:
        """Extend `block_ids` in place so it covers `num_tokens` tokens (raises before changing anything)."""
        need = self.blocks_for(num_tokens) - len(block_ids)
        if need > 0:
            block_ids.extend(self.allocate(need))
