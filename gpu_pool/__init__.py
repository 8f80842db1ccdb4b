"""Device memory as plain-Python bookkeeping: what devices there are (`inventory`), one reserved VRAM arena
per engine carved into slots (`arena`, over `freelist`), which model holds which slot (`slots`, evicting what
`placement` says when free space is fragmented), and page-locked host regions shareable across the processes
of a node (`pinned`)."""

from gpu_pool.arena import Arena, ArenaError, ArenaFull, ArenaTooSmall, RangeAllocator, Slot, parse_budget
from gpu_pool.inventory import DeviceInfo, list_devices
from gpu_pool.pinned import PinnedRegion
from gpu_pool.slots import SlotTable

__all__ = ["Arena", "ArenaError", "ArenaFull", "ArenaTooSmall", "DeviceInfo", "PinnedRegion", "RangeAllocator",
           "Slot", "SlotTable", "list_devices", "parse_budget"]
