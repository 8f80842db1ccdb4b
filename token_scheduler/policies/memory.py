"""Explicit VRAM management for a policy: what to swap out or evict to free N bytes, in what order.

Victims come in the order the caller gives (furthest next use first for the token policy, least recently
used for the request-level baseline). For each victim model its KV goes first (small, cheap to bring back,
its weights may still serve other requests), then its weights (the host copy always stays, so eviction is a
pointer drop). Its requests go in `batching.pick_victim`'s order (the host pages left counted: the newest whose
KV fits them, else the least to recompute); the pages they take are kept in `Room.host_used`. Models whose weights are being loaded are not touched: the copy is already paid for.

`fit_step` is the one place a policy makes room for a step, wherever KV lives (state.py): with the weights
(one `make_room` for both), in a region apart (weights evicted for the weights, other models' KV swapped out
for the KV -- what `MultiModelEngine` once did behind the plan's back), or in a KV cache of its own (nothing
of another model helps; the batch builder preempts the model's own requests).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from token_scheduler.policies.batching import pick_victim
from token_scheduler.policies.state import ModelState, PoolState, Residency, blocks
from token_scheduler.request import RequestStatus


@dataclass(slots=True)
class Room:
    evict: list[str] = field(default_factory=list)
    swap_out: list = field(default_factory=list)
    freed: int = 0
    host_used: int = 0  # host pages the swap-outs take (those counted by ModelState.host_kv_free)


def make_room(st: PoolState, need: int, victims: list[str], room: Room | None = None,
              weights_too: bool = True, kv: bool = True) -> Room:
    """Free at least `need` bytes from `victims` (in order): their KV (`kv`), then their weights
    (`weights_too`); frees less if it cannot. Adds to `room`."""
    room = room or Room()
    taken = set(room.evict)
    out_ids = {id(r) for r in room.swap_out}
    for name in victims:
        if room.freed >= need:
            break
        m = st.models[name]
        if kv and m.kv_gpu_tokens:
            cands = [r for r in m.running if r.status == RequestStatus.RUNNING and id(r) not in out_ids]
            bt = m.kv_block_tokens
            while cands and room.freed < need:  # the cheapest first, as in a preemption
                host = None if m.host_kv_free is None else m.host_kv_free - room.host_used
                r = cands.pop(pick_victim(cands, 0, host, bt))
                room.swap_out.append(r)
                out_ids.add(id(r))
                room.freed += m.kv_bytes(r.kv_tokens_freed)
                if host is not None and (h := blocks(r.num_computed_tokens, bt)) <= host:
                    room.host_used += h
        if room.freed >= need:
            break
        if weights_too and m.residency == Residency.RESIDENT and name not in taken and not m.pinned:
            room.evict.append(name)
            taken.add(name)
            room.freed += m.spec.weight_bytes
    return room


@dataclass(slots=True)
class Fit:
    room: Room  # the moves that make room for the step
    weight_free: int  # bytes of capacity still free once they are made and the model's weights are placed
    kv_free: int  # bytes the model's KV may grow by this step (the batch builder's budget)


def fit_step(st: PoolState, m: ModelState, kv_demand: int, victims: Callable[[], list[str]],
             evict: bool = True, ranges: bool = False) -> Fit | None:
    """Room for `m`'s next step: its weights when in host memory, and `kv_demand` bytes of KV growth, freed
    from `victims()` (called only when room is short) in their order; their weights too if `evict`.
    `ranges`: free bytes count for the weights only where one free range holds them (`PoolState.slot_room`).
    None: its weights cannot fit."""
    need_w = m.spec.weight_bytes if m.residency == Residency.HOST else 0
    free = st.free_bytes()
    room = Room()
    if st.kv_with_weights(m):
        if need_w + kv_demand > free:
            make_room(st, need_w + kv_demand - free, victims(), room, weights_too=evict)
        left = free + room.freed - need_w
        return Fit(room, left, left) if left >= 0 else None
    room_w = st.slot_room(need_w) if need_w and ranges else free  # fragmented arena: evict a slot's worth
    if need_w > room_w and evict:
        make_room(st, need_w - room_w, victims(), room, kv=False)
        # Short of a slot's worth from the victims: that took every victim there is. With no pinned weights and
        # no load in flight left in the arena it is then all free, one range, so the free bytes count after all.
        # A model whose slot is more than the others can free -- a 4 MiB slot in a 4 MiB arena beside an idle
        # 2 MiB one -- otherwise never got a plan: its requests waited forever behind an idle model. Beside pinned
        # weights or a load in flight the free bytes cannot say whether the range is whole (a pinned slot between
        # two free runs splits it; one at the end does not): the mechanism's layout does (`PoolState.can_load`).
        # Without it such a model waited forever beside a pinned one whose neighbour's eviction would have made room.
        if need_w > room_w + room.freed and (room_w == free or need_w > free + room.freed or (
                not st.can_load(m.name) if st.can_load is not None else any(
                    o is not m and (o.residency == Residency.LOADING or (o.pinned and o.residency == Residency.RESIDENT))
                    for o in st.models.values()))):
            return None
    kv_free = st.kv_free_bytes(m)
    near = st.kv_neighbours(m) if kv_demand > kv_free else None
    if near:
        kv_room = make_room(st, kv_demand - kv_free, [n for n in victims() if n in near], weights_too=False)
        room.swap_out += kv_room.swap_out
        room.host_used += kv_room.host_used
        kv_free += kv_room.freed
    return Fit(room, free + room.freed - need_w, kv_free)
