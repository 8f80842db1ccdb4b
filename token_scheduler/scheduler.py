"""Per-model batch scheduler: continuous batching with chunked prefill under a token budget.

One rule for prefill, chunked prefill and decode: each step gives every scheduled request some of its
not-yet-computed tokens. Running requests go first (decodes keep their pace), then swapped-out ones come
back, then waiting ones are admitted while budget, sequence slots and KV blocks allow. On KV shortage the
newest running request is preempted: its KV goes to the host pool (swap) and comes back before it next
runs; only without host room is it recomputed. The scheduler deals in block ids; the runner moves bytes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from token_scheduler.block_manager import BlockAllocator, NoFreeBlocks
from token_scheduler.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_prefill_chunk: int = 2048  # cap on one request's tokens per step (chunked prefill)


@dataclass
class ScheduledChunk:
    request: Request
    start: int  # first position computed this step (== request.num_computed_tokens)
    num_tokens: int
    sample: bool  # this chunk reaches the end of the sequence: sample the next token


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
    def __init__(self, cfg: SchedulerConfig, kv: BlockAllocator, host_kv: BlockAllocator | None = None,
                 model: str = "default"):
        self.cfg = cfg
        self.kv = kv
        self.host_kv = host_kv
        self.model = model
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.swapped: deque[Request] = deque()
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0  # requests preempted so far (KV swapped to host, or dropped and recomputed)

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
        if self.host_kv is not None and self.host_kv.can_allocate(n) and req.num_computed_tokens > 0:
            req.host_block_ids = self.host_kv.allocate(n)
            out.swap_out.append((list(req.block_ids), list(req.host_block_ids)))
            self.kv.free(req.block_ids)  # safe: the runner copies these out before this step's forward
            req.block_ids = []
            req.status = RequestStatus.SWAPPED
            self.swapped.appendleft(req)
        else:  # no host room: recompute later (KV dropped, tokens kept)
            self.kv.free(req.block_ids)
            req.block_ids = []
            req.num_computed_tokens = 0
            req.status = RequestStatus.WAITING
            self.waiting.appendleft(req)

    def preempt(self, reqs: list[Request]) -> SchedulerOutput:
        """Swap the KV of running `reqs` out to host blocks now (between turns, to make room for another
        model). Raises if the host pool cannot take one: this path never drops KV."""
        out = SchedulerOutput(self.model)
        for req in reqs:
            if req not in self.running or req.num_computed_tokens == 0:
                continue
            if self.host_kv is None or not self.host_kv.can_allocate(len(req.block_ids)):
                raise NoFreeBlocks(f"no host KV room to swap out {req.request_id}")
            self._preempt(req, out)
        return out

    def schedule(self, token_budget: int | None = None) -> SchedulerOutput:
        out = SchedulerOutput(self.model)
        budget = self.cfg.max_num_batched_tokens if token_budget is None else token_budget
        cap = self.cfg.max_prefill_chunk

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_uncomputed_tokens, budget, cap)
            while True:
                try:
                    self.kv.grow(req.block_ids, req.num_computed_tokens + n)
                    break
                except NoFreeBlocks:
                    victim = self.running[-1]
                    self._preempt(victim, out)
                    if victim is req:
                        break
            if req.status != RequestStatus.RUNNING:
                break
            self._add_chunk(out, req, n)
            budget -= n
            i += 1

        if not out.preempted:
            while self.swapped and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
                req = self.swapped[0]
                n = min(req.num_uncomputed_tokens, budget, cap)
                need = self.kv.blocks_for(req.num_computed_tokens + n)
                if not self.kv.can_allocate(need):
                    break
                self.swapped.popleft()
                gpu = self.kv.allocate(len(req.host_block_ids))
                out.swap_in.append((list(req.host_block_ids), list(gpu)))
                self.host_kv.free(req.host_block_ids)  # the runner copies them in before any later reuse
                req.host_block_ids, req.block_ids = [], gpu
                self.kv.grow(req.block_ids, req.num_computed_tokens + n)
                req.status = RequestStatus.RUNNING
                self.running.append(req)
                self._add_chunk(out, req, n)
                budget -= n

        if not out.preempted and not self.swapped:
            while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
                req = self.waiting[0]
                n = min(req.num_uncomputed_tokens, budget, cap)
                if not self.kv.can_allocate(self.kv.blocks_for(req.num_computed_tokens + n)):
                    break
                self.waiting.popleft()
                self.kv.grow(req.block_ids, req.num_computed_tokens + n)
                req.status = RequestStatus.RUNNING
                self.running.append(req)
                self._add_chunk(out, req, n)
                budget -= n
        return out

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
            "kv_blocks_used": self.kv.num_used,
            "kv_blocks_total": self.kv.num_blocks,
            "num_preemptions": self.num_preemptions,
        }
