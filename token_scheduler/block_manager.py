"""KV block allocator: plain Python over integer block ids (no torch).

`allocate` raises `NoFreeBlocks` on shortage; the scheduler decides what to do (wait, preempt, swap).
The same class manages GPU blocks and host (swap) blocks. `share(block_size)` gives another model a view of
the same pool with its own tokens per block: models of different KV widths then draw pages of one byte size
from one free list (the multi-model engine's shared KV region). Each view counts the blocks drawn through it
(`num_held`): one model's share of the pool, read every step without walking its requests.

Prefix caching (vLLM's automatic prefix caching): a full block whose KV is computed may be `register`ed under the
hash of its tokens and of every token before it (`block_hash`, chained), keyed by the view (a model's blocks never
serve another's). A later request whose tokens start the same takes those blocks (`take_cached`) instead of
computing them. Blocks are reference-counted: one a request frees stays cached while any holds it, and once none
does it is *evictable* -- counted free, handed out last (least recently freed first), its hash forgotten then.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from itertools import count

_KEYS = count()


class NoFreeBlocks(RuntimeError):
    pass


def block_hash(parent: bytes, tokens: list[int], extra: bytes = b"") -> bytes:
    """The hash of a full block of `tokens` after the blocks whose chained hash is `parent` (b"" for the first);
    `extra` keeps apart what the same tokens do not share (a LoRA adapter, a tenant's salt). 128 bits of BLAKE2b:
    a collision would hand one prefix another's KV, so not Python's `hash`, which a prompt can be made to collide."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes() + extra, digest_size=16).digest()


def hash_extra(lora: str | None, salt: str | None, load: int | None = None) -> bytes:
    """What besides the tokens keeps cached KV apart: the LoRA adapter (and which load of it) and the cache salt."""
    if lora is None and salt is None:
        return b""
    return f"{lora or ''}\0{load}\0{salt or ''}".encode()


def chain_hashes(hashes: list[bytes], tokens: list[int], n_blocks: int, block_size: int,
                 extra: bytes = b"") -> list[bytes]:
    """Extend `hashes`, the chained hashes of the first blocks of `tokens`, to its first `n_blocks` blocks (in
    place); returns those."""
    for i in range(len(hashes), n_blocks):
        hashes.append(block_hash(hashes[-1] if hashes else b"", tokens[i * block_size: (i + 1) * block_size], extra))
    return hashes[:n_blocks]


class _Cache:
    """The prefix cache of one pool, shared by its views."""

    __slots__ = ("by_hash", "hash_of", "refs", "evictable")

    def __init__(self) -> None:
        self.by_hash: dict[tuple[int, bytes], int] = {}  # (view key, block hash) -> block
        self.hash_of: dict[int, tuple[int, bytes]] = {}  # its inverse
        self.refs: dict[int, int] = {}  # a cached block in use -> its holders (absent: 1)
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, held by none; least recently freed first


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token (got {num_blocks} x {block_size})")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()
        self._cache = _Cache()
        self.key = next(_KEYS)  # this view's prefix-cache key
        self.num_held = 0  # blocks allocated through this allocator (this view of a shared pool), not yet freed

    def share(self, block_size: int) -> BlockAllocator:
        """Another allocator over the same blocks (one free list), counting `block_size` tokens per block."""
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        view = object.__new__(BlockAllocator)
        view.num_blocks, view.block_size, view._free, view._used = self.num_blocks, block_size, self._free, self._used
        view._cache, view.key = self._cache, next(_KEYS)
        view.num_held = 0
        return view

    @property
    def num_free(self) -> int:
        """Blocks an `allocate` may hand out: free ones, and cached ones no request holds."""
        return len(self._free) + len(self._cache.evictable)

    @property
    def num_used(self) -> int:
        return len(self._used)

    @property
    def num_cached(self) -> int:
        """Blocks of the whole pool held only by the prefix cache (evictable; counted in num_free)."""
        return len(self._cache.evictable)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise NoFreeBlocks(f"need {n} KV blocks, {self.num_free} free of {self.num_blocks}")
        out = [self._free.popleft() for _ in range(min(n, len(self._free)))]
        c = self._cache
        while len(out) < n:  # the cache gives back its least recently freed blocks
            b, _ = c.evictable.popitem(last=False)
            del c.by_hash[c.hash_of.pop(b)]
            out.append(b)
        self._used.update(out)
        self.num_held += n
        return out

    def free(self, ids: list[int]) -> None:
        """Give back one request's blocks (in its order). Cached ones become evictable last block first: a prefix's
        later blocks, the less shared, are handed out before its first."""
        c = self._cache
        for b in reversed(ids):
            if b not in self._used:
                raise ValueError(f"block {b} is not allocated (double free?)")
            held = c.refs.pop(b, 1) - 1
            if held:  # another request still holds this cached block
                c.refs[b] = held
                continue
            self._used.remove(b)
            if b in c.hash_of:
                c.evictable[b] = None
            else:
                self._free.append(b)
            self.num_held -= 1

    def grow(self, block_ids: list[int], num_tokens: int) -> None:
        """Extend `block_ids` in place so it covers `num_tokens` tokens (raises before changing anything)."""
        need = self.blocks_for(num_tokens) - len(block_ids)
        if need > 0:
            block_ids.extend(self.allocate(need))

    # -- prefix caching -------------------------------------------------------------------------
    def register(self, block: int, h: bytes) -> None:
        """Offer allocated `block`, full and computed, under hash `h`; a block of the same hash already cached stays
        the one found (this one is then freed as any other)."""
        c, k = self._cache, (self.key, h)
        if k not in c.by_hash and block not in c.hash_of:
            c.by_hash[k] = block
            c.hash_of[block] = k

    def cached_prefix(self, hashes: list[bytes]) -> list[tuple[int, bool]]:
        """The cached blocks of the longest run of `hashes` from the first, each with whether no request holds it
        (taking such a block lowers num_free by one)."""
        c, out = self._cache, []
        for h in hashes:
            b = c.by_hash.get((self.key, h))
            if b is None:
                break
            out.append((b, b in c.evictable))
        return out

    def shared(self, blocks: list[int]) -> int:
        """How many of `blocks` (one request's) another request holds too: freeing them frees none of those."""
        refs = self._cache.refs
        return sum(refs.get(b, 1) > 1 for b in blocks) if refs else 0

    def take_cached(self, blocks: list[int]) -> None:
        """Hold cached `blocks` (from `cached_prefix`) for one more request."""
        c = self._cache
        for b in blocks:
            if b in c.evictable:
                del c.evictable[b]
                self._used.add(b)
                self.num_held += 1
            else:
                c.refs[b] = c.refs.get(b, 1) + 1
