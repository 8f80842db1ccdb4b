"""Explicit VRAM management for a policy: what to swap out or evict to free N bytes, in what order.

Victims come in the order the caller gives (furthest next use first for the token policy, least recently
used for the request-level baseline). For each victim model its KV goes first (small, cheap to bring back,
its weights may still serve other requests), then its weights (the host copy always stays, so eviction is a
pointer drop). Models whose weights are being loaded are not touched: the copy is already paid for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from token_scheduler.policies.state import PoolState, Residency
from token_scheduler.request import RequestStatus


@dataclass(slots=True)
class Room:
    evict: list[str] = field(default_factory=list)
    swap_out: list = field(default_factory=list)
    freed: int = 0


def make_room(st: PoolState, need: int, victims: list[str], room: Room | None = None,
              weights_too: bool = True) -> Room:
    """Free at least `need` bytes from `victims` (in order); frees less if it cannot. Adds to `room`."""
    room = room or Room()
    taken = set(room.evict)
    out_ids = {id(r) for r in room.swap_out}
    for name in victims:
        if room.freed >= need:
            break
        m = st.models[name]
        if m.kv_gpu_tokens:
            bpt = m.spec.kv_bytes_per_token
            for r in reversed(m.running):  # newest first, as in a preemption
                if r.status == RequestStatus.RUNNING and id(r) not in out_ids:
                    room.swap_out.append(r)
                    out_ids.add(id(r))
                    room.freed += r.num_computed_tokens * bpt
                    if room.freed >= need:
                        break
        if room.freed >= need:
            break
        if weights_too and m.residency == Residency.RESIDENT and name not in taken and not m.pinned:
            room.evict.append(name)
            taken.add(name)
            room.freed += m.spec.weight_bytes
    return room
