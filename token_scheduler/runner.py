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
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], kv_cache: torch.Tensor,
                 block_size: int, max_model_len: int, device: torch.device, seed: int = 0,
                 host_kv_cache: torch.Tensor | None = None, cuda_graphs: bool = True, max_graph_batch: int = 256):
        self.cfg = cfg
        self.weights = weights
        self.kv = kv_cache  # the last block is a scratch block for padded graph rows
        self.host_kv = host_kv_cache
        self.block_size = block_size
        self.max_blocks = -(-max_model_len // block_size)
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        self.rope = llama.RopeCache.build(cfg, max_model_len + 1, self.device)
        self.sampler = Sampler(self.device, seed)
        self.use_triton = self.is_cuda and _triton_ok()
        # Decode runs the fused kernels; prefill keeps the reference op sequence (it is compute-bound, so
        # fusion buys little there, and first-token logits then follow HF's arithmetic op for op).
        self.fwd_decode = llama.forward_fused if self.use_triton else llama.forward
        self.graphs: dict[int, _DecodeGraph] = {}
        self.bucket_of: dict[int, int] = {}  # decode batch size -> smallest captured bucket that fits
        if self.is_cuda and cuda_graphs:
            self.capture_graphs([b for b in GRAPH_BUCKETS if b <= max_graph_batch])

    @property
    def scratch_block(self) -> int:
        return self.kv.shape[0] - 1

    # -- execution ---------------------------------------------------------------------------------
    def execute(self, out: SchedulerOutput) -> StepResult:
        for gpu, host in out.swap_out:
            self._copy_blocks(self.kv, gpu, self.host_kv, host)
        for host, gpu in out.swap_in:
            self._copy_blocks(self.host_kv, host, self.kv, gpu)
        if not out.chunks:
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

    def _copy_blocks(self, src, src_ids, dst, dst_ids) -> None:
        if dst is None or src is None:
            raise RuntimeError("KV swap planned but the runner has no host KV pool")
        s = torch.tensor(src_ids, dtype=torch.long, device=src.device)
        d = torch.tensor(dst_ids, dtype=torch.long, device=dst.device)
        dst.index_copy_(0, d, src.index_select(0, s).to(dst.device, non_blocking=True))

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
    def capture_graphs(self, buckets: list[int]) -> None:
        pool = torch.cuda.graph_pool_handle()
        for b in sorted(buckets, reverse=True):
            self.graphs[b] = _DecodeGraph(self, b, pool)
        sizes = sorted(self.graphs)
        self.bucket_of = {n: next(b for b in sizes if b >= n) for n in range(1, sizes[-1] + 1)}

    def _decode_graph(self, out: SchedulerOutput) -> torch.Tensor:
        n = len(out.chunks)
        g = self.graphs[self.bucket_of[n]]
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
