"""KV cache swap between the engine's paged GPU KV tensor and a pinned host block pool.

GPU layout (the engine's): one tensor per model, [num_blocks, num_layers, 2, block_size, kv_heads, head_dim],
block outermost, so one block is one contiguous range of bytes. The host pool has the same block shape.

Small copies waste the link (a 1 MiB block per memcpy reaches well under the link's rate), so a swap of
scattered blocks is: gather the GPU blocks into a contiguous staging buffer with `index_select` (HBM speed),
then one memcpy per run of consecutive host ids; swap-in is the mirror (`index_copy_`). The gathers run on a
second stream in chunks for swap-ins, pipelined with the copies, so only the last chunk's scatter trails the link.
The host allocator hands out one contiguous run whenever it can, so that is usually a single large memcpy.
When both sides are already long consecutive runs, they are copied directly and the gather is skipped.

KV is never dropped: host shortage raises `HostKVFull` and the scheduler decides (keep, or recompute).
All copies run on the copy stream; every host-block access is on that stream, so host ids may be freed (and
reused) right after enqueueing a swap-in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpu_pool.freelist import FreeList
from gpu_pool.pinned import PinnedRegion

IDS_RING = 8  # pinned block-id upload slots per swapper (see KVSwapper._upload_ids)


class HostKVFull(RuntimeError):
    def __init__(self, needed: int, free: int):
        super().__init__(f"host KV pool: need {needed} blocks, {free} free; keep the sequence on the GPU or "
                         "recompute it")
        self.needed, self.free = needed, free


class HostBlockAllocator:
    """Host block ids, plain Python. `allocate` prefers one contiguous run (best fit), else the largest runs."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = FreeList(num_blocks)
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return self._free.free

    @property
    def num_used(self) -> int:
        return len(self._used)

    def can_allocate(self, n: int) -> bool:
        return n <= self._free.free

    def allocate(self, n: int) -> list[int]:
        if n <= 0:
            return []
        if n > self._free.free:
            raise HostKVFull(n, self._free.free)
        start = self._free.take(n)
        if start is not None:
            ids = list(range(start, start + n))
        else:
            ids = []
            while len(ids) < n:
                s, k = self._free.take_upto(n - len(ids))
                ids += range(s, s + k)
        self._used.update(ids)
        return ids

    def free(self, ids: list[int]) -> None:
        bad = [i for i in ids if i not in self._used]
        if bad or len(set(ids)) != len(ids):
            raise ValueError(f"freeing host blocks that are not allocated (or twice): {bad[:8]}")
        self._used.difference_update(ids)
        for s, k in runs(sorted(ids)):
            self._free.give(s, k)


def runs(ids: list[int]) -> list[tuple[int, int]]:
    """(start, length) of maximal runs of consecutive ids, in the given order."""
    out: list[tuple[int, int]] = []
    for i in ids:
        if out and out[-1][0] + out[-1][1] == i:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((i, 1))
    return out


def paired_runs(a: list[int], b: list[int]) -> list[tuple[int, int, int]]:
    """(a_start, b_start, length) of runs where both a and b advance by one."""
    out: list[tuple[int, int, int]] = []
    for x, y in zip(a, b, strict=True):
        if out and out[-1][0] + out[-1][2] == x and out[-1][1] + out[-1][2] == y:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((x, y, 1))
    return out


class HostKVPool:
    """`num_blocks` host blocks of `block_shape` in one page-locked private region."""

    def __init__(self, num_blocks: int, block_shape: tuple[int, ...], dtype: torch.dtype, pin: bool | None = None):
        self.block_shape, self.dtype = tuple(block_shape), dtype
        n = dtype.itemsize
        for d in block_shape:
            n *= d
        self.block_bytes = n
        self.region = PinnedRegion.anonymous(num_blocks * n, pin)
        self.blocks = self.region.tensor.view(dtype).view(num_blocks, *block_shape) if num_blocks else None
        self.allocator = HostBlockAllocator(num_blocks)

    @classmethod
    def like(cls, kv: torch.Tensor, num_blocks: int, pin: bool | None = None) -> HostKVPool:
        return cls(num_blocks, tuple(kv.shape[1:]), kv.dtype, pin)

    def view(self, block_shape: tuple[int, ...], dtype: torch.dtype) -> HostKVPool:
        """The same blocks (one region, one allocator) seen with another block shape that fits in a block:
        models of different KV widths share one host pool. Block i starts at byte i * block_bytes."""
        v = object.__new__(HostKVPool)
        v.block_shape, v.dtype, v.region, v.allocator, v._view = tuple(block_shape), dtype, self.region, self.allocator, True
        elems = 1
        for d in block_shape:
            elems *= d
        v.block_bytes = elems * dtype.itemsize
        if v.block_bytes > self.block_bytes or self.block_bytes % dtype.itemsize:
            raise ValueError(f"blocks of {v.block_bytes} B do not fit the pool's {self.block_bytes} B blocks")
        v.blocks = None if self.blocks is None else strided_blocks(self.region.tensor, self.allocator.num_blocks,
                                                                      self.block_bytes, block_shape, dtype)
        return v

    def close(self) -> None:
        self.blocks = None
        if not getattr(self, "_view", False):
            self.region.close()


def strided_blocks(flat: torch.Tensor, n: int, block_bytes: int, block_shape: tuple[int, ...],
                   dtype: torch.dtype) -> torch.Tensor:
    """[n, *block_shape] view of a flat uint8 buffer whose block i starts at byte i * block_bytes (contiguous
    when the block shape fills a block exactly)."""
    inner = []
    st = 1
    for d in reversed(block_shape):
        inner.append(st)
        st *= d
    return flat.view(dtype).as_strided((n, *block_shape), (block_bytes // dtype.itemsize, *reversed(inner)))


@dataclass
class KVHandle:
    event: object | None  # torch.cuda.Event, or None on CPU (already done)
    device: torch.device

    def wait(self, stream: torch.cuda.Stream | None = None) -> None:
        if self.event is not None:
            (stream or torch.cuda.current_stream(self.device)).wait_event(self.event)

    def synchronize(self) -> None:
        if self.event is not None:
            self.event.synchronize()

    def done(self) -> bool:
        return self.event is None or self.event.query()


class KVSwapper:
    def __init__(self, kv: torch.Tensor, host: HostKVPool, stream: torch.cuda.Stream | None = None,
                 staging_blocks: int = 64, direct_min_bytes: int = 8 << 20, chunk_blocks: int | None = None):
        if tuple(kv.shape[1:]) != host.block_shape or kv.dtype != host.dtype:
            raise ValueError(f"host pool blocks {host.block_shape} {host.dtype} do not match the KV tensor "
                             f"{tuple(kv.shape[1:])} {kv.dtype}")
        self.kv, self.host = kv, host
        self.device = kv.device
        cuda = self.device.type == "cuda"
        self.stream = stream if stream is not None else (torch.cuda.Stream(self.device) if cuda else None)
        # swap-in scatters run here, pipelined with the link copies on `stream` (see _window)
        self.gather_stream = torch.cuda.Stream(self.device) if self.stream is not None else None
        self.chunk_blocks = chunk_blocks or max(1, min(16, staging_blocks // 2))  # 16: best on the H100 (diag_gpu kv)
        # allocated once here; per-swap work never calls the caching allocator for data
        self.staging = torch.empty((staging_blocks, *host.block_shape), dtype=kv.dtype, device=self.device)
        self._idx = torch.empty(max(staging_blocks, 1), dtype=torch.int64, device=self.device)
        # block ids reach the GPU from a small ring of pinned slots written in place (numpy), so a swap costs no
        # pinned allocation on the host path before its first byte moves; a slot is reused once its upload ran
        self._ids_host = torch.empty((IDS_RING, max(staging_blocks, 1)), dtype=torch.int64,
                                     pin_memory=self.stream is not None)
        self._ids_np = self._ids_host.numpy()
        self._ids_ev: list[object | None] = [None] * IDS_RING
        self._ids_slot = 0
        if self.stream is not None:  # used on the copy stream: freeing must wait for it
            for t in (self.staging, self._idx, kv):
                t.record_stream(self.stream)
                t.record_stream(self.gather_stream)
        self.direct_min_bytes = direct_min_bytes

    def swap_out(self, gpu_blocks: list[int]) -> tuple[list[int], KVHandle]:
        """Copy GPU blocks to newly allocated host blocks (returned, in the same order). The copy follows
        all work queued so far on the current stream. Reuse the GPU blocks only after `handle.wait()`."""
        host_ids = self.host.allocator.allocate(len(gpu_blocks))
        try:
            return host_ids, self._transfer(gpu_blocks, host_ids, to_host=True)
        except BaseException:
            self.host.allocator.free(host_ids)
            raise

    def swap_in(self, host_blocks: list[int], gpu_blocks: list[int], free_host: bool = True) -> KVHandle:
        """Copy host blocks into (already allocated) GPU blocks; compute waits on the handle before reading.
        With `free_host`, the host blocks go back to the pool at once (safe: see the module note)."""
        h = self._transfer(gpu_blocks, host_blocks, to_host=False)
        if free_host:
            self.host.allocator.free(host_blocks)
        return h

    def copy(self, gpu_blocks: list[int], host_blocks: list[int], to_host: bool) -> KVHandle:
        """Copy between blocks whose ids the caller allocated (an engine's scheduler owns both allocators).
        Same ordering rules as swap_out / swap_in."""
        return self._transfer(gpu_blocks, host_blocks, to_host)

    def _transfer(self, gpu: list[int], host: list[int], to_host: bool) -> KVHandle:
        if len(gpu) != len(host):
            raise ValueError(f"{len(gpu)} GPU blocks vs {len(host)} host blocks")
        if not gpu:
            return KVHandle(None, self.device)
        if self.stream is None:
            self._copy(gpu, host, to_host)
            return KVHandle(None, self.device)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # KV written / blocks freed so far
        with torch.cuda.stream(self.stream):
            self._copy(gpu, host, to_host)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        return KVHandle(ev, self.device)

    def _copy(self, gpu: list[int], host: list[int], to_host: bool) -> None:
        nb = self.host.block_bytes
        pairs = paired_runs(gpu, host)
        hb, kv = self.host.blocks, self.kv
        if all(k * nb >= self.direct_min_bytes for _, _, k in pairs) or self.staging.shape[0] == 0:
            for g, h, k in pairs:  # both sides contiguous: no gather needed
                if to_host:
                    hb[h:h + k].copy_(kv[g:g + k], non_blocking=True)
                else:
                    kv[g:g + k].copy_(hb[h:h + k], non_blocking=True)
            return
        cap = self.staging.shape[0]
        for i in range(0, len(gpu), cap):
            self._window(gpu[i:i + cap], host[i:i + cap], to_host)

    def _upload_ids(self, g_ids: list[int]) -> torch.Tensor:
        """The GPU block ids of one window in `self._idx[:n]`, uploaded on the current (copy) stream."""
        n, slot = len(g_ids), self._ids_slot
        self._ids_slot = (slot + 1) % IDS_RING
        ev = self._ids_ev[slot]
        if ev is not None:
            ev.synchronize()  # that slot's upload (IDS_RING windows ago) has run: almost always already true
        self._ids_np[slot, :n] = g_ids
        idx = self._idx[:n]
        idx.copy_(self._ids_host[slot, :n], non_blocking=self.stream is not None)
        if self.stream is not None:
            ev = torch.cuda.Event()
            ev.record(self.stream)
            self._ids_ev[slot] = ev
        return idx

    def _window(self, g_ids: list[int], h_ids: list[int], to_host: bool) -> None:
        """Up to one staging buffer of blocks. On CUDA a swap-in's link copies and scatters (HBM) run on two
        streams in chunks, so chunk c's copy overlaps chunk c-1's scatter."""
        n = len(g_ids)
        stage, hb, kv = self.staging[:n], self.host.blocks, self.kv
        cs, gs = self.stream, self.gather_stream
        # Swap-in only: chunked, with the scatters on the second stream, so only the last scatter trails the
        # link. Swap-out stays one chunk on the copy stream -- its exposed gather (~40 us for 64 7B blocks)
        # costs less than enqueueing chunks and cross-stream waits from Python (H100: 64-block swap-out 81.7% of
        # the pinned rate unchunked, 79.5% in chunks of 16; swap-in 79.1% -> 86.8%).
        pipe = gs if gs is not None and not to_host else None
        step = max(1, self.chunk_blocks) if pipe is not None else n
        idx = self._upload_ids(g_ids) if to_host else None  # a swap-in's first link copy goes out before it
        for c in range(0, n, step):
            sl = slice(c, min(n, c + step))
            if to_host:
                torch.index_select(kv, 0, idx[sl], out=stage[sl])
            j = c
            for s, k in runs(h_ids[sl]):
                if to_host:
                    hb[s:s + k].copy_(stage[j:j + k], non_blocking=True)
                else:
                    stage[j:j + k].copy_(hb[s:s + k], non_blocking=True)
                j += k
            if not to_host:
                if idx is None:
                    idx = self._upload_ids(g_ids)
                if pipe is not None:
                    pipe.wait_stream(cs)  # this chunk (and the index upload) has landed in staging
                    with torch.cuda.stream(pipe):
                        kv.index_copy_(0, idx[sl], stage[sl])
                else:
                    kv.index_copy_(0, idx[sl], stage[sl])
        if pipe is not None:
            cs.wait_stream(pipe)  # the handle's event (on the copy stream) covers the last scatter, and the
            # next window's or swap's copies into staging come after these scatters read it
