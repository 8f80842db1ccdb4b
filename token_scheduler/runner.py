"""Model runner: executes a SchedulerOutput for one model's weights. It never decides anything.

Per step: KV swap copies (out, then in), then one forward over the flattened tokens of every scheduled
chunk, then sampling for the chunks that reached the end of their sequence. Decode-only steps on CUDA
replay a CUDA graph captured for the smallest batch bucket that fits (static input buffers filled with
non-blocking copies from pinned host memory); everything else runs eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from token_scheduler.model import llama
from token_scheduler.model.attention import AttentionMetadata
from token_scheduler.model.config import ModelConfig
from token_scheduler.request import Request
from token_scheduler.sampler import Sampler, SampleResult
from token_scheduler.scheduler import SchedulerOutput

GRAPH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)


@dataclass
class StepResult:
    sampled: dict[str, int]
    logprobs: dict[str, dict[int, float]]


def allocate_kv_cache(cfg: ModelConfig, num_blocks: int, block_size: int, dtype, device, pin: bool = False):
    """One tensor, block outermost: a block's K and V of every layer are contiguous (cheap to swap)."""
    shape = (num_blocks, cfg.num_layers, 2, block_size, cfg.num_kv_heads, cfg.head_dim)
    if pin:
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    return torch.empty(shape, dtype=dtype, device=device)


class ModelRunner:
    """Runs one model's steps. Weights are an argument (`set_weights` swaps them; None: not resident).

    CUDA graphs are kept in `graphs`, keyed by (`graph_key`, weight slot, bucket). A single-model engine owns
    its dict and captures every bucket up front. A multi-model engine passes one dict shared by all its
    runners and a `graph_key` naming everything a captured graph bakes in besides the weights (config, dtype,
    KV tensor, lengths): a model that lands in the same arena slot as an earlier model with the same key
    replays that model's graphs; missing buckets are captured on first use.
    """

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor] | None, kv_cache: torch.Tensor,
                 block_size: int, max_model_len: int, device: torch.device, seed: int = 0,
                 kv_swapper=None, cuda_graphs: bool = True, max_graph_batch: int = 256,
                 graphs: dict | None = None, graph_key: object = None, scratch_block: int | None = None,
                 name: str = ""):
        self.cfg = cfg
        self.name = name
        self.weights = weights
        self.slot_key: object = None  # which weight slot `weights` live in (graphs are per slot)
        self.kv = kv_cache
        self.kv_swapper = kv_swapper  # model_swapper.KVSwapper over `kv` and the host KV pool
        self.block_size = block_size
        self.max_blocks = -(-max_model_len // block_size)
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        self.scratch_block = self.kv.shape[0] - 1 if scratch_block is None else scratch_block  # padded graph rows
        self.rope = llama.RopeCache.build(cfg, max_model_len + 1, self.device)
        self.sampler = Sampler(self.device, seed)
        self.use_triton = self.is_cuda and _triton_ok()
        # Decode runs the fused kernels; prefill keeps the reference op sequence (it is compute-bound, so
        # fusion buys little there, and first-token logits then follow HF's arithmetic op for op).
        self.fwd_decode = llama.forward_fused if self.use_triton else llama.forward
        self.shared_graphs = graphs is not None
        self.graphs: dict = graphs if graphs is not None else {}
        self.graph_key = graph_key
        self._graph_pool = None
        buckets = [b for b in GRAPH_BUCKETS if b <= max_graph_batch] if self.is_cuda and cuda_graphs else []
        # decode batch size -> smallest bucket that fits
        self.bucket_of: dict[int, int] = {n: next(b for b in buckets if b >= n) for n in range(1, max(buckets or [0]) + 1)}
        if buckets and weights is not None and not self.shared_graphs:
            self.capture_graphs(buckets)

    def set_weights(self, weights: dict[str, torch.Tensor] | None, slot_key: object = None) -> None:
        """Point the runner at a model's weights (views into an arena slot), or at none (evicted)."""
        self.weights, self.slot_key = weights, slot_key

    # -- execution ---------------------------------------------------------------------------------
    def execute(self, out: SchedulerOutput) -> StepResult:
        self.swap_kv(out.swap_out, out.swap_in)
        if not out.chunks:
            return StepResult({}, {})
        if self.weights is None:
            raise RuntimeError("step planned for a model whose weights are not resident")
            return StepResult({}, {})
        sample_reqs = [c.request for c in out.chunks if c.sample]
        if out.is_decode and len(out.chunks) in self.bucket_of:
            logits = self._decode_graph(out)
        else:
            hidden, idx = self._forward_eager(out)
            logits = llama.compute_logits(self.weights, hidden[idx]) if idx else None
        if not sample_reqs:
            return StepResult({}, {})
        res: SampleResult = self.sampler(logits, sample_reqs)
        sampled = {r.request_id: t for r, t in zip(sample_reqs, res.token_ids)}
        lps = {r.request_id: lp for r, lp in zip(sample_reqs, res.logprobs or []) if lp}
        return StepResult(sampled, lps)

    def release(self, request_id: str) -> None:
        self.sampler.release(request_id)

    def swap_kv(self, swap_out, swap_in, wait: bool = True) -> list:
        """KV copies on the swapper's copy stream: out first (GPU -> host), then in. With `wait`, compute
        waits (GPU-side, no CPU block) until they land: this step may reuse the freed blocks or read the
        swapped-in ones. Returns the handles (for a caller that waits later, e.g. freeing blocks on poll)."""
        if not swap_out and not swap_in:
            return []
        if self.kv_swapper is None:
            raise RuntimeError("KV swap planned but the runner has no host KV pool")
        hs = [self.kv_swapper.copy(gpu, host, to_host=True) for gpu, host in swap_out]
        hs += [self.kv_swapper.copy(gpu, host, to_host=False) for host, gpu in swap_in]
        if wait:
            for h in hs:
                h.wait()
        return hs

    def _inputs(self, out: SchedulerOutput):
        bs = self.block_size
        ids, pos, sb, so = [], [], [], []
        for c in out.chunks:
            r: Request = c.request
            toks = r.all_token_ids[c.start : c.start + c.num_tokens] if c.num_tokens > 1 else [r.token_at(c.start)]
            ids += toks
            for p in range(c.start, c.start + c.num_tokens):
                pos.append(p)
                sb.append(r.block_ids[p // bs])
                so.append(p % bs)
        return ids, pos, sb, so

    def _forward_eager(self, out: SchedulerOutput):
        ids, pos, sb, so = self._inputs(out)
        dev = self.device
        t = lambda x: torch.tensor(x, dtype=torch.long, device=dev)  # noqa: E731
        meta = AttentionMetadata(t(sb), t(so), self.block_size)
        if out.is_decode:
            nb = max(len(c.request.block_ids) for c in out.chunks)
            bt = [c.request.block_ids + [0] * (nb - len(c.request.block_ids)) for c in out.chunks]
            meta.decode = True
            meta.block_tables = torch.tensor(bt, dtype=torch.int32, device=dev)
            meta.context_lens = torch.tensor([c.start + 1 for c in out.chunks], dtype=torch.int32, device=dev)
            meta.use_triton = self.use_triton
        else:
            q0 = 0
            for c in out.chunks:
                ctx = c.start + c.num_tokens
                meta.seqs.append((q0, c.num_tokens, ctx))
                meta.seq_block_tables.append(t(c.request.block_ids[: -(-ctx // self.block_size)]))
                q0 += c.num_tokens
        fwd = self.fwd_decode if out.is_decode else llama.forward
        hidden = fwd(self.cfg, self.weights, self.kv, self.rope, t(ids), t(pos), meta)
        idx, q = [], 0
        for c in out.chunks:
            q += c.num_tokens
            if c.sample:
                idx.append(q - 1)
        return hidden, idx

    # -- CUDA graphs ---------------------------------------------------------------------------------
    def _graph_id(self, bucket: int) -> tuple:
        return (self.graph_key, self.slot_key, bucket)

    def capture_graphs(self, buckets: list[int]) -> None:
        """Capture the buckets for the current weights (largest first, so smaller ones reuse its memory)."""
        for b in sorted(buckets, reverse=True):
            self._capture(b)

    def _capture(self, bucket: int):
        if self._graph_pool is None:
            self._graph_pool = self.graphs.setdefault(("pool", self.graph_key), torch.cuda.graph_pool_handle())
        g = self.graphs[self._graph_id(bucket)] = _DecodeGraph(self, bucket, self._graph_pool)
        return g

    def _decode_graph(self, out: SchedulerOutput) -> torch.Tensor:
        n = len(out.chunks)
        b = self.bucket_of[n]
        g = self.graphs.get(self._graph_id(b)) or self._capture(b)
        g.users.add(self.name)
        g.fill(out, self)
        g.graph.replay()
        return g.logits[:n]


class _DecodeGraph:
    """Static buffers + captured graph for one decode batch bucket."""

    def __init__(self, runner: ModelRunner, batch: int, pool):
        dev, mb = runner.device, runner.max_blocks
        self.batch = batch
        self.host = torch.zeros(5, batch, dtype=torch.long, pin_memory=True)  # ids, pos, blk, off, ctx
        self.host_bt = torch.zeros(batch, mb, dtype=torch.int32, pin_memory=True)
        self.dev = torch.zeros(5, batch, dtype=torch.long, device=dev)
        self.bt = torch.full((batch, mb), runner.scratch_block, dtype=torch.int32, device=dev)
        self.ctx32 = torch.ones(batch, dtype=torch.int32, device=dev)
        self.dev[2].fill_(runner.scratch_block)
        self.dev[4].fill_(1)
        meta = AttentionMetadata(self.dev[2], self.dev[3], runner.block_size, decode=True,
                                 block_tables=self.bt, context_lens=self.ctx32, use_triton=runner.use_triton)

        self.users: set[str] = set()  # names of the models that replayed it (shared per slot)
        self.keep = (runner.rope, meta)  # the graph reads them by address: keep them alive with it

        def run():
            h = runner.fwd_decode(runner.cfg, runner.weights, runner.kv, runner.rope, self.dev[0], self.dev[1], meta)
            return llama.compute_logits(runner.weights, h)

        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = run()

    def fill(self, out: SchedulerOutput, runner: ModelRunner) -> None:
        # Only the first `nb` block-table columns of real rows are read (the kernel stops at the context
        # length), so stale columns need no reset. Padded rows write their K/V into the scratch block.
        bs, scratch, pad = runner.block_size, runner.scratch_block, self.batch - len(out.chunks)
        reqs = [c.request for c in out.chunks]
        pos = [c.start for c in out.chunks]
        rows = [
            [r.token_at(p) for r, p in zip(reqs, pos)] + [0] * pad,
            pos + [0] * pad,
            [r.block_ids[p // bs] for r, p in zip(reqs, pos)] + [scratch] * pad,
            [p % bs for p in pos] + [0] * pad,
            [p + 1 for p in pos] + [1] * pad,
        ]
        self.host.copy_(torch.tensor(rows, dtype=torch.long))
        nb = max(len(r.block_ids) for r in reqs)
        n = len(reqs)
        self.host_bt[:n, :nb] = torch.tensor([r.block_ids + [scratch] * (nb - len(r.block_ids)) for r in reqs],
                                             dtype=torch.int32)
        self.dev.copy_(self.host, non_blocking=True)
        self.bt[:n].copy_(self.host_bt[:n], non_blocking=True)
        self.ctx32.copy_(self.dev[4])


def _triton_ok() -> bool:
    try:
        import triton  # noqa: F401

        from token_scheduler.model import triton_decode  # noqa: F401
        return True
    except Exception:
        return False
