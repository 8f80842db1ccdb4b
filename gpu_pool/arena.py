"""The VRAM arena: one buffer reserved once per engine, carved into weight slots and KV pools.

An engine reserves its whole budget as a single uint8 tensor at start-up; after that, placing or replacing a
model never calls the CUDA caching allocator (`torch.cuda.memory_reserved()` stays flat across swaps), so
there is no fragmentation inside torch and no `empty_cache` dance. The bookkeeping (`RangeAllocator`) is plain
Python over byte offsets and raises on shortage: the scheduler decides what to evict, never the arena.

Slots are identified by their offset, which is stable for the slot's lifetime: two models of the same layout
placed into the same slot see the same `data_ptr`s, so CUDA graphs captured for that slot stay valid.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from gpu_pool.freelist import FreeList
from gpu_pool.placement import DEFAULT_ALIGN, align_up

MiB = 1 << 20


class ArenaError(RuntimeError):
    """A request the arena cannot serve. `needed`, `free` and `largest_free` are bytes."""

    def __init__(self, msg: str, needed: int, free: int, largest_free: int):
        super().__init__(msg)
        self.needed, self.free, self.largest_free = needed, free, largest_free


class ArenaTooSmall(ArenaError):
    """The request is larger than the whole arena: it can never fit, whatever is evicted."""


class ArenaFull(ArenaError):
    """The request fits the arena's capacity but not its free space now: evict something (or defragment)."""


@dataclass(frozen=True)
class Slot:
    offset: int  # bytes from the arena's start; the slot's identity
    nbytes: int  # rounded up to the arena's alignment
    tag: str = ""


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB ({n} B)"


class RangeAllocator:
    """Best-fit allocation of aligned byte ranges in [0, capacity), with coalescing on free."""

    def __init__(self, capacity: int, align: int = DEFAULT_ALIGN):
        if align <= 0 or align & (align - 1):
            raise ValueError(f"align must be a power of two, got {align}")
        self.capacity, self.align = capacity, align
        self._free = FreeList(capacity)
        self._slots: dict[int, Slot] = {}

    def _round(self, nbytes: int) -> int:
        return align_up(nbytes, self.align)

    @property
    def free_bytes(self) -> int:
        return self._free.free

    @property
    def used_bytes(self) -> int:
        return self.capacity - self._free.free

    @property
    def largest_free(self) -> int:
        return self._free.largest

    def slots(self) -> list[Slot]:
        return sorted(self._slots.values(), key=lambda s: s.offset)

    def free_runs(self) -> list[tuple[int, int]]:
        """(start, length) of every free range, in address order."""
        return self._free.runs()

    def can_ever_allocate(self, nbytes: int) -> bool:
        return self._round(nbytes) <= self.capacity

    def can_allocate(self, nbytes: int) -> bool:
        # exact answer without mutating: an aligned start inside some free run
        n = self._round(nbytes)
        for s, length in self._free.runs():
            a = align_up(s, self.align)
            if a + n <= s + length:
                return True
        return False

    def allocate(self, nbytes: int, tag: str = "", prefer: Iterable[int] = ()) -> Slot:
        """A slot of `nbytes` (rounded up to the alignment). `prefer`: offsets to place it at, the first whose
        range is free wins; otherwise best fit."""
        if nbytes <= 0:
            raise ValueError(f"allocation size must be > 0, got {nbytes}")
        n = self._round(nbytes)
        if n > self.capacity:
            raise ArenaTooSmall(
                f"{tag or 'request'} needs {_gib(n)} but the whole arena is {_gib(self.capacity)}: "
                "it can never fit; raise the arena budget", n, self.free_bytes, self.largest_free)
        off = next((o for o in prefer if o % self.align == 0 and self._free.take_at(o, n)), None)
        if off is None:
            off = self._free.take(n, self.align)
        if off is None:
            raise ArenaFull(
                f"{tag or 'request'} needs {_gib(n)}; free now {_gib(self.free_bytes)}, largest free range "
                f"{_gib(self.largest_free)}: evict a slot first", n, self.free_bytes, self.largest_free)
        slot = Slot(off, n, tag)
        self._slots[off] = slot
        return slot

    def free(self, slot: Slot) -> None:
        if self._slots.get(slot.offset) != slot:
            raise ValueError(f"{slot} is not allocated in this arena")
        del self._slots[slot.offset]
        self._free.give(slot.offset, slot.nbytes)


def parse_budget(budget: int | float | str, total: int) -> int:
    """Bytes from an int (bytes), a float in (0, 1] (fraction of `total`) or a string: '40GB' (10^9),
    '40GiB' (2^30), '512MiB', '0.9' (fraction) or '123456' (bytes)."""
    if isinstance(budget, str):
        s = budget.strip()
        m = re.fullmatch(r"([0-9.]+)\s*([KMGT]i?B|B)?", s, flags=re.IGNORECASE)
        if not m:
            raise ValueError(f"cannot parse memory budget {budget!r}; use e.g. 40GB, 38GiB, 0.9 or bytes")
        num, unit = m.group(1), (m.group(2) or "").upper()
        if not unit:
            return parse_budget(float(num) if "." in num else int(num), total)
        powers = {"K": 1, "M": 2, "G": 3, "T": 4}
        base = 1024 if "I" in unit else 1000
        return int(float(num) * base ** powers.get(unit[0], 0))
    if isinstance(budget, float):
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"a float budget is a fraction of the device's memory in (0, 1], got {budget}")
        return int(budget * total)
    if budget <= 0:
        raise ValueError(f"budget must be > 0 bytes, got {budget}")
    return int(budget)


def device_total_memory(device: torch.device) -> int:
    """What a fractional budget is a fraction of: the card's memory, or on the CPU the host's as this process may use
    it (a container's cgroup limit where that is lower than MemTotal)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    from gpu_pool.inventory import host_memory_bytes

    return host_memory_bytes()


class Arena:
    """One reserved uint8 buffer on `device` plus a RangeAllocator over it."""

    def __init__(self, nbytes: int, device: str | torch.device = "cpu", align: int = DEFAULT_ALIGN):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if nbytes > free:
                raise ArenaTooSmall(f"cannot reserve an arena of {_gib(nbytes)} on {self.device}: only "
                                    f"{_gib(free)} free on the card", nbytes, free, free)
        # torch.empty: no zeroing pass over the budget; every byte is written before it is read
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self.alloc = RangeAllocator(nbytes, align)

    @classmethod
    def reserve(cls, budget: int | float | str, device: str | torch.device = "cpu",
                align: int = DEFAULT_ALIGN) -> Arena:
        """Reserve `budget` (bytes, '40GB', or a fraction of the device's total memory)."""
        dev = torch.device(device)
        return cls(parse_budget(budget, device_total_memory(dev)), dev, align)

    @property
    def capacity(self) -> int:
        return self.alloc.capacity

    def allocate(self, nbytes: int, tag: str = "", prefer: Iterable[int] = ()) -> Slot:
        return self.alloc.allocate(nbytes, tag, prefer)

    def free(self, slot: Slot) -> None:
        """Return the slot's bytes. Work already queued on a stream that reads them is the caller's to order."""
        self.alloc.free(slot)

    def view(self, offset: int, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """A tensor aliasing arena bytes [offset, offset + numel * itemsize): no allocation, no copy."""
        numel = 1
        for d in shape:
            numel *= d
        itemsize = dtype.itemsize
        end = offset + numel * itemsize
        if offset < 0 or end > self.capacity:
            raise ValueError(f"view [{offset}, {end}) is outside the arena [0, {self.capacity})")
        if offset % itemsize:
            raise ValueError(f"offset {offset} is not aligned to {dtype}'s {itemsize} bytes")
        return self.buffer[offset:end].view(dtype).view(tuple(shape))

    def slot_bytes(self, slot: Slot) -> torch.Tensor:
        """The slot's bytes as a 1-D uint8 view."""
        return self.buffer[slot.offset:slot.offset + slot.nbytes]

    def data_ptr(self, slot: Slot) -> int:
        return self.buffer.data_ptr() + slot.offset
