"""Device memory as plain-Python bookkeeping: what devices there are (`inventory`), one reserved VRAM arena
per engine carved into slots (`arena`, over `freelist`), which model holds which slot (`slots`, evicting what
`placement` says when free space is fragmented), and page-locked host regions shareable across the processes
of a node (`pinned`).

The names are loaded on first use (PEP 562): the controller reads the inventory (its GPU metrics), and importing
the arena with it imported torch, ~1.4 s of every server's start-up in a process that never uses torch."""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {"Arena": "arena", "ArenaError": "arena", "ArenaFull": "arena", "ArenaTooSmall": "arena",
          "RangeAllocator": "arena", "Slot": "arena", "parse_budget": "arena", "DeviceInfo": "inventory",
          "list_devices": "inventory", "PinnedRegion": "pinned", "SlotTable": "slots"}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'gpu_pool' has no attribute {name!r}")
    return getattr(importlib.import_module(f"gpu_pool.{_WHERE[name]}"), name)
