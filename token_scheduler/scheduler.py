"""Per-model batch scheduler: continuous batching with chunked prefill under a token budget.

The batch is chosen by the one builder, `policies.batching.select_batch` (running requests first, then
swapped-out ones back, then waiting ones while budget, sequence slots and KV blocks allow; on KV shortage a
running request is preempted: the newest whose KV fits the host blocks left, else the least to recompute). This class keeps the model's queues and its blocks and carries a chosen
batch out (`commit`): preempted KV goes to the host pool (swap) and comes back before it next runs -- only
without host room is it dropped and recomputed --, swapped requests get GPU blocks back, running ones grow,
waiting ones start. Who chooses: alone (`LLMEngine` without a policy) `schedule` builds over its own queues
with everything the builder admits; under a multi-model policy the policy builds the same way over the same
queues and `commit` runs its plan as is. The scheduler deals in block ids; the runner moves bytes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace

from token_scheduler.block_manager import BlockAllocator
from token_scheduler.policies.batching import BatchLimits, select_batch
from token_scheduler.request import Request, RequestStatus

_RUNNING, _SWAPPED = RequestStatus.RUNNING, RequestStatus.SWAPPED


@dataclass
class ScheduledChunk:
    request: Request
    start: int  # first position computed this step (== request.num_computed_tokens)
    num_tokens: int
    sample: bool  # this chunk reaches the end of the sequence: sample the next token
    # (prefix caching) tokens its request found cached as it started this step: the chunk begins after them, so it
    # may be shorter than the batch planned (a chunk that reaches the end samples sooner)
    cached: int = 0


@dataclass
class SchedulerOutput:
    """One step's plan. Filled by the scheduler; the runner executes it in field order."""

    model: str
    swap_out: list[tuple[list[int], list[int]]] = field(default_factory=list)  # (gpu blocks -> host blocks)
    swap_in: list[tuple[list[int], list[int]]] = field(default_factory=list)  # (host blocks -> gpu blocks)
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_decode(self) -> bool:
        return bool(self.chunks) and all(c.num_tokens == 1 and c.sample for c in self.chunks)

    @property
    def empty(self) -> bool:
        return not (self.chunks or self.swap_out or self.swap_in)


class BatchScheduler:
    def __init__(self, limits: BatchLimits, kv: BlockAllocator, host_kv: BlockAllocator | None = None,
                 model: str = "default", prefix_caching: bool = False):
        # alone, every admissible request starts at once: no FCFS groups
        self.limits = replace(limits, group_size=limits.max_seqs)
        self.kv = kv
        self.host_kv = host_kv
        self.model = model
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.swapped: deque[Request] = deque()
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0  # requests preempted so far (KV swapped to host, or dropped and recomputed)
        # of them, those whose KV was dropped (no host room), and the computed tokens they dropped: to recompute, but
        # for blocks the prefix cache still holds when they start again
        self.num_kv_dropped = 0
        self.kv_tokens_dropped = 0
        # Prefix caching: a request starting takes the cached blocks its tokens begin with (`_reuse_prefix`), and each
        # full block computed is offered to the cache (`update`). The prompt tokens of first starts, and of them those
        # found cached (vLLM's prefix-cache queries and hits).
        self.prefix_caching = prefix_caching
        self.cache_queries = 0
        self.cache_hits = 0

    # -- queue ---------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        # The longest sequence must fit in the pool, or the request could never finish.
        if self.kv.blocks_for(req.num_prompt_tokens + req.max_output_tokens) > self.kv.num_blocks:
            raise ValueError(
                f"request needs up to {req.num_prompt_tokens + req.max_output_tokens} tokens of KV; "
                f"the pool holds {self.kv.num_blocks * self.kv.block_size}"
            )
        self.requests[req.request_id] = req
        if self.prefix_caching:
            req.kv_view = self.kv
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Take a request out of every queue and free all its KV (GPU and host)."""
        if req.request_id not in self.requests:
            return
        req.status = status
        del self.requests[req.request_id]
        for q in (self.waiting, self.swapped):
            if req in q:
                q.remove(req)
        if req in self.running:
            self.running.remove(req)
        if req.block_ids:
            self.kv.free(req.block_ids)
            req.block_ids = []
        if req.host_block_ids:
            self.host_kv.free(req.host_block_ids)
            req.host_block_ids = []

    def abort(self, request_id: str) -> Request | None:
        req = self.requests.get(request_id)
        if req is not None:
            self.finish(req, RequestStatus.FINISHED_ABORTED)
        return req

    # -- planning ------------------------------------------------------------------------------
    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.num_preemptions += 1
        self.running.remove(req)
        out.preempted.append(req.request_id)
        n = len(req.block_ids)
        req.num_registered_blocks = 0  # (its blocks go: those it gets back are offered again)
        if self.host_kv is not None and self.host_kv.can_allocate(n) and req.num_computed_tokens > 0:
            req.host_block_ids = self.host_kv.allocate(n)
            out.swap_out.append((list(req.block_ids), list(req.host_block_ids)))
            self.kv.free(req.block_ids)  # safe: the runner copies these out before this step's forward
            req.block_ids = []
            req.status = RequestStatus.SWAPPED
            self.swapped.appendleft(req)
        else:  # no host room: recompute later (KV dropped, tokens kept)
            if req.num_computed_tokens:
                self.num_kv_dropped += 1
                self.kv_tokens_dropped += req.num_computed_tokens
            self.kv.free(req.block_ids)
            req.block_ids = []
            req.num_computed_tokens = 0
            req.prompt_logprobs.clear()  # (its prefill, run again, makes them again)
            req.status = RequestStatus.WAITING
            self.waiting.appendleft(req)

    @property
    def host_free(self) -> int:
        """Host blocks left for preempted KV (the policy chooses victims counting them)."""
        return self.host_kv.num_free if self.host_kv is not None else 0

    def preempt(self, reqs: list[Request]) -> SchedulerOutput:
        """Preempt running `reqs` now (a multi-model plan's swap-outs, between turns, to make room for another
        model): their KV goes to host blocks, or is dropped where the host has no room."""
        out = SchedulerOutput(self.model)
        for req in reqs:
            if req in self.running and req.num_computed_tokens:
                self._preempt(req, out)
        return out

    def schedule(self) -> SchedulerOutput:
        """This model's next batch, everything the builder admits (the single-model engine's policy)."""
        b = select_batch(self.running, self.swapped, self.waiting, self.kv.block_size, 1, self.limits,
                         self.kv.num_free, self.limits.max_tokens, host_free=self.host_free)  # KV counted in blocks
        return self.commit(b.entries, b.swap_out)

    def commit(self, entries, swap_out=()) -> SchedulerOutput:
        """Carry out a batch the builder chose, exactly: preempt `swap_out` (this model's running requests),
        then for [(request, tokens)] in order swap in SWAPPED requests, start WAITING ones (FCFS), and grow
        every one's blocks to cover its tokens. The batch was built against these free blocks, so it fits;
        a request finished or aborted since it was planned is skipped."""
        out = SchedulerOutput(self.model)
        for req in swap_out:
            if req in self.running:
                self._preempt(req, out)
        kv, chunks, live, bs = self.kv, out.chunks, self.requests, self.kv.block_size
        spare = self._spare(entries) if self.prefix_caching and self.waiting else 0
        for req, n in entries:
            st = req.status
            if st is _RUNNING:  # the common case first, the rest of the loop inline: it runs per request per step
                c = req.num_computed_tokens
                if c + n > len(req.block_ids) * bs:
                    kv.grow(req.block_ids, c + n)
                chunks.append(ScheduledChunk(req, c, n, c + n == req.num_tokens))
                continue
            if req.request_id not in live:  # finished or aborted since the batch was built
                continue
            if st is _SWAPPED:
                self.swapped.remove(req)
                gpu = self.kv.allocate(len(req.host_block_ids))
                out.swap_in.append((list(req.host_block_ids), list(gpu)))
                self.host_kv.free(req.host_block_ids)  # the runner copies them in before any later reuse
                req.host_block_ids, req.block_ids = [], gpu
                req.status = RequestStatus.RUNNING
                self.running.append(req)
            elif st is RequestStatus.WAITING:
                if self.waiting[0] is not req:
                    raise ValueError(f"{req.request_id}: new requests start in FCFS order")
                self.waiting.popleft()
                req.status = RequestStatus.RUNNING
                self.running.append(req)
                if self.prefix_caching:
                    n, spare = self._reuse_prefix(req, n, spare)
            cached = req.num_computed_tokens if st is RequestStatus.WAITING else 0
            self.kv.grow(req.block_ids, req.num_computed_tokens + n)
            self._add_chunk(out, req, n)
            if cached:
                chunks[-1].cached = cached
        return out

    def continuation(self, prev: SchedulerOutput, can_launch) -> SchedulerOutput | None:
        """Overlapped decode: the step after `prev` for the same requests, planned before prev's tokens are
        read -- the batch the builder would choose then, in the one case it can be known now (nothing waiting
        or swapped, every running request in prev, one more token each within the limits and the free
        blocks); None otherwise, and the engine reads prev and builds. Requests whose prev token is their last
        by length are left out; one that stops on a sampled token gets a row whose result is dropped.
        `can_launch(out)`: whether the runner can queue it that way (else None too)."""
        if self.waiting or self.swapped:
            return None
        chunks, live = [], 0
        for c in prev.chunks:
            r = c.request
            if r.finished or r.request_id not in self.requests:
                continue
            live += 1
            if len(r.output_token_ids) + 1 < r.max_output_tokens:  # prev's token is not its last by length
                chunks.append(ScheduledChunk(r, c.start + 1, 1, True))
        if live != len(self.running) or not chunks or len(chunks) > self.limits.max_tokens:
            return None
        need = sum(self.kv.blocks_for(c.start + 1) - len(c.request.block_ids) for c in chunks)
        if need > 0 and not self.kv.can_allocate(need):
            return None  # the builder would preempt: let it, once prev is read
        out = SchedulerOutput(self.model, chunks=chunks)
        if not can_launch(out):
            return None
        for c in chunks:
            self.kv.grow(c.request.block_ids, c.start + 1)
        return out

    def _spare(self, entries) -> int:
        """Free blocks beyond what a batch needs, as `commit` would take them (taking cached blocks no request holds
        draws on these: the batch was built to fit the free blocks, cached ones counted in)."""
        need, bfor = 0, self.kv.blocks_for
        for req, n in entries:
            if req.status is _SWAPPED:
                need += max(len(req.host_block_ids), bfor(req.num_computed_tokens + n))
            else:
                need += max(0, bfor(req.num_computed_tokens + n) - len(req.block_ids))
        return self.kv.num_free - need

    def _reuse_prefix(self, req: Request, n: int, spare: int) -> tuple[int, int]:
        """Start `req` (planned `n` tokens from the first) on the cached blocks its tokens begin with: at most all its
        full blocks before its last token (a step must compute that one to sample), as many as the spare free blocks
        allow. Returns the tokens its chunk has now and the spare blocks left."""
        first = req.num_cached_tokens is None
        if first:
            req.num_cached_tokens = 0
            self.cache_queries += req.num_prompt_tokens
        bs, bfor = self.kv.block_size, self.kv.blocks_for
        most = (req.num_tokens - 1) // bs
        if req.num_computed_tokens or req.block_ids or not most or req.sampling_params.prompt_logprobs is not None:
            return n, spare
        hits = self.kv.cached_prefix(req.hashes_to(most, bs))
        k = len(hits)
        while k:  # taking k blocks costs the idle ones among them, and the chunk then needs fewer blocks of its own
            m = min(n, req.num_tokens - k * bs)
            cost = sum(idle for _, idle in hits[:k]) + bfor(m) - bfor(n)
            if cost <= spare:
                break
            k -= 1
        if not k:
            return n, spare
        blocks = [b for b, _ in hits[:k]]
        self.kv.take_cached(blocks)
        req.block_ids = blocks
        req.num_computed_tokens, req.num_registered_blocks = k * bs, k
        if first:
            req.num_cached_tokens = min(k * bs, req.num_prompt_tokens)
            self.cache_hits += req.num_cached_tokens
        return m, spare - cost

    @staticmethod
    def _add_chunk(out: SchedulerOutput, req: Request, n: int) -> None:
        out.chunks.append(ScheduledChunk(req, req.num_computed_tokens, n, req.num_computed_tokens + n == req.num_tokens))

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance cursors, append sampled tokens, finish on stop tokens / length. Returns requests that got a token."""
        got: list[Request] = []
        for c in out.chunks:
            req = c.request
            if req.finished or req.request_id not in self.requests:
                continue
            req.num_computed_tokens += c.num_tokens
            if self.prefix_caching and (full := req.num_computed_tokens // self.kv.block_size) > req.num_registered_blocks:
                hs = req.hashes_to(full, self.kv.block_size)
                for i in range(req.num_registered_blocks, full):
                    self.kv.register(req.block_ids[i], hs[i])
                req.num_registered_blocks = full
            if c.sample and req.request_id in sampled:
                req.output_token_ids.append(sampled[req.request_id])
                req.check_stop_token()
                got.append(req)
                if req.finished:
                    self.finish(req, req.status)
        return got

    def stats(self) -> dict[str, int]:
        return {
            "num_running": len(self.running),
            "num_waiting": len(self.waiting),
            "num_swapped": len(self.swapped),
            "kv_blocks_swapped": sum(len(r.host_block_ids or ()) for r in self.swapped),  # (host pages they hold)
            # this model's blocks: on a pooled engine its allocator is a view of the GPU's shared KV region, whose
            # num_used (every model's) /metrics showed under each model's label
            "kv_blocks_used": self.kv.num_held,
            "kv_blocks_total": self.kv.num_blocks,
            "num_preemptions": self.num_preemptions,
            "num_kv_dropped": self.num_kv_dropped,
            "kv_tokens_dropped": self.kv_tokens_dropped,
            "prefix_cache_queries": self.cache_queries,
            "prefix_cache_hits": self.cache_hits,
        }
