"""Model runner: executes a SchedulerOutput for one model's weights. It never decides anything.

Per step: KV swap copies (out, then in), then one forward over the flattened tokens of every scheduled
chunk, then sampling for the chunks that reached the end of their sequence. Decode-only steps on CUDA
replay a CUDA graph captured for the smallest batch bucket that fits (static input buffers filled with
non-blocking copies from pinned host memory); everything else runs eagerly.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from gpu_pool.pinned import device_view, kernel_copy, upload
from model_swapper.model_config import ModelConfig
from token_scheduler import graph_cap
from token_scheduler.model import llama, megakernel
from token_scheduler.model.attention import AttentionMetadata
from token_scheduler.model.lora import LoraAdapter, LoraRows, LoraSlots
from token_scheduler.request import Request
from token_scheduler.sampler import Sampler, SampleResult, masks_stop_tokens
from token_scheduler.scheduler import SchedulerOutput
from tokenpool import env

log = logging.getLogger(__name__)

GRAPH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)
# CUDA graphs kept per graph key (graph_cap.py). 96: a cold `bench serve` point at 1.3 req/s/model (4 x 7B + 6 x 1.5B,
# two shapes) captured 98 graphs in all, so a working set of that size stays whole (a capture again costs ~14 ms of
# the step thread on the H200 at 9ff79c5, a shape's first capture of a bucket ~45 ms). What it bounds one shape's logits to: 96 x the largest bucket's (152k vocabulary:
# ~20 MB at bucket 32, 1.9 GB for 96; at the served max_num_seqs of 64, ~39 MB each, 3.7 GB at most).
GRAPH_CAP = max(1, env.GRAPH_CAP.integer())
GPU_LORAS = max(1, env.GPU_LORAS.integer())  # adapter slots a model has on its device (`LoraSlots`; vLLM's --max-loras)
# Prefill and mixed steps whose every chunk goes row by row (`rowwise_prefill_max`) replay CUDA graphs too: such a
# step is a decode of its rows (row p attends to positions <= p, its K/V written first in each layer). Eager, the
# forward is ~170 Triton and ~110 cuBLAS launches whatever its length: served prefill steps spent ~19 ms of the step
# thread before their forward was queued (serve_h200_models40_seed7_859bd59.json step_phases). A row graph keeps the
# logits of ROW_SELECT rows (the sampled ones, picked by an index input), not of all its rows: ~10 MB a graph,
# capped per shape apart from the decode graphs (graph_cap.rows_key). More than ROW_SELECT sampled rows: pieces of
# rows in order, each a replay (a later piece's rows read the K/V an earlier one wrote). Only host-bound steps go this
# way: up to TOKENPOOL_PREFILL_GRAPHS rows and ROW_GRAPH_FLOP of projections
# (bucket padding and the capture's GEMM choices cost a device-bound step more than its launches). H200, d223a0b
# (diag_gpu prefill, step until read, eager -> row graph): 1.5B 3x256 14.4 -> 7.8 ms, 3x~256 14.5 -> 9.5, 1x768
# 10.9 -> 10.7, 3x~600 17.1 -> 20.4 (2048 rows); 7B 3x256 19.5 -> 20.2, 1x768 22.7 -> 23.6, 3x~600 54.7 -> 59.0.
# Few buckets: a pooled engine captures each one in every weight slot a shape lands in (~18 ms each on the H200);
# with 11 buckets (32 to 2048) a 40-model served run captured 277 graphs (5.1 s of the step thread) against 90
# without row graphs, and evicted 141 (serve 37eb483, session 33); with these 4 and a cap of their own: 184 captures, 4
# evictions (43e49e4). Padding rows should cost little below ~256 rows, where a step is mostly its weights' stream
# (not measured bucket by bucket).
ROW_BUCKETS_ALL = (64, 256, 1024, 2048)
ROW_SELECT = 16
ROW_GRAPH_ROWS = env.PREFILL_GRAPHS.integer()
ROW_GRAPH_FLOP = 2.6e12  # ~1,000 rows of a 1.5B, ~200 of a 7B
ROW_BUCKETS = tuple(b for b in ROW_BUCKETS_ALL if b <= ROW_GRAPH_ROWS) or (0,)
# The edges of a CUDA decode step, outside its graph's replay: the measured step (`bench engine`, H200, context 512)
# is 28 us (1.5B) to 47 us (7B batch 32) longer than the replay alone (engine_qwen2_*_h200_cfa166b/bf69dbe.json),
# which for the 7B's batch 32 is the distance between 1.25x its floor and 1.24x. Around each replay the stream ran
# seven small operations one after another: two kernel copies of the inputs from pinned memory, a copy of the ids
# sampled the step before (or a gather and a copy), an int64 -> int32 copy of the context lengths, then after the
# replay the sampler's argmax and a copy engine's memcpy of the ids to the host. STEP_IO: one Triton kernel writes
# every input (`triton_ops.fill_inputs`, the same bytes), the graph keeps its logits in the model dtype (no fp32 copy
# of [batch, vocabulary] inside it, half the graph pool's logits memory; greedy argmax reads them as they are), and a
# kernel writes the sampled ids to pinned memory through a device view (`_Readback`). Outputs are bit-identical
# either way. Off until measured on a GPU (TOKENPOOL_STEP_IO=1: on).
STEP_IO = env.STEP_IO.on()


@dataclass
class StepResult:
    sampled: dict[str, int]
    logprobs: dict[str, dict[int, float]]
    device_s: float | None = None  # (`ModelRunner.time_steps`, CUDA) the device's time for the step
    # request id -> the logprobs of the prompt tokens this step's chunk predicts (SamplingParams.prompt_logprobs)
    prompt_logprobs: dict[str, list[dict[int, float]]] = field(default_factory=dict)
    # request id -> the last prompt token's final hidden state (SamplingParams.embed; the step that ends its prefill)
    embeddings: dict[str, list[float]] = field(default_factory=dict)


def _embeds(out: SchedulerOutput) -> bool:
    """Whether a chunk of `out` ends an embedding request's prompt (its step runs the eager forward, whose hidden
    states it reads)."""
    return any(c.sample and c.request.sampling_params.embed for c in out.chunks)


def _scored_rows(out: SchedulerOutput) -> list[int]:
    """How many rows of each chunk predict a prompt token whose logprob its request asked for (prompt_logprobs; a
    step with any runs the eager forward, whose hidden states the LM head then reads)."""
    return [max(0, min(c.num_tokens, c.request.num_prompt_tokens - 1 - c.start))
            if c.request.sampling_params.prompt_logprobs is not None else 0 for c in out.chunks]


# rows whose logprobs over the vocabulary are made at once (`ModelRunner._prompt_logprobs`)
PROMPT_LOGPROB_ROWS = 256


@dataclass
class LaunchedDecode:
    """A decode step queued on the GPU whose sampled ids the host has not read yet (overlapped stepping)."""

    out: SchedulerOutput
    tokens: torch.Tensor  # [n] sampled ids on the device (the next step's inputs, fed GPU to GPU)
    host: torch.Tensor  # pinned [n]: the same ids once `event` has fired
    event: torch.cuda.Event | None  # None on CPU (already computed)
    graph: _DecodeGraph | None = None  # the graph it replayed, in flight (not evictable) until `read`
    start: torch.cuda.Event | None = None  # (launched `timed`) recorded before its device work, `event` after
    overlapped: bool = False  # another model's step ran on the device beside it (co-stepping): its device time is shared
    readback: tuple[_Readback, _IdsBuffer] | None = None  # (STEP_IO) where `host` came from: given back once read

    def device_s(self) -> float | None:
        """(Launched `timed`, once read) the device's time for the step: from when the stream reached it -- the step
        before done, or its replay's launch (after the inputs' copies), whichever came later -- to its last kernel;
        None when not timed or on CPU."""
        return None if self.start is None else self.start.elapsed_time(self.event) / 1e3


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
    replays that model's graphs; missing buckets are captured on first use. At most GRAPH_CAP graphs of a key
    are kept: the least recently replayed one not in flight goes first (graph_cap.py).
    """

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor] | None, kv_cache: torch.Tensor,
                 block_size: int, max_model_len: int, device: torch.device, seed: int = 0,
                 kv_swapper=None, cuda_graphs: bool = True, max_graph_batch: int = 256,
                 graphs: dict | None = None, graph_key: object = None, scratch_block: int | None = None,
                 name: str = "", hf_exact_prefill: bool = False, hf_exact_decode: bool = False,
                 max_loras: int | None = None):
        self.cfg = cfg
        self.name = name
        self.hf_exact_prefill = hf_exact_prefill or hf_exact_decode
        self.hf_exact_decode = hf_exact_decode  # decode rows go the reference way too (eager, per sequence)
        self.time_steps = False  # CUDA events time each step read in `execute` (StepResult.device_s; a diagnostic)
        self.weights = weights
        self.slot_key: object = None  # which weight slot `weights` live in (graphs are per slot)
        # LoRA adapters hosted with the model, by name (host copies; LLMEngine.add_lora); their device slots, made at
        # the first step that needs them and dropped with the weights (outside the weight arena: max_loras slots of
        # the largest rank hosted); and the decode graphs over those slots at the current weights, by (lane, bucket),
        # in a graph memory pool a lane of their own
        self.loras: dict[str, LoraAdapter] = {}
        self.max_loras = GPU_LORAS if max_loras is None else max_loras  # the slots (vLLM's --max-loras)
        self._slots: LoraSlots | None = None
        self._slots_failed: tuple | None = None  # (slots, rank, projections) whose allocation ran out of memory
        self._lora_graphs: dict[tuple, _DecodeGraph] = {}
        self._lora_pools: dict[int, tuple] = {}
        self.kv = kv_cache
        self.kv_swapper = kv_swapper  # model_swapper.KVSwapper over `kv` and the host KV pool
        self.block_size = block_size
        self.max_blocks = -(-max_model_len // block_size)
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        self.scratch_block = self.kv.shape[0] - 1 if scratch_block is None else scratch_block  # padded graph rows
        self.rope = llama.RopeCache.build(cfg, max_model_len + 1, self.device)
        self.sampler = Sampler(self.device, seed)
        self.readback = _Readback(self.device, max_graph_batch)  # (STEP_IO, CUDA) launched steps' ids
        self.use_triton = self.is_cuda and triton_available()
        # prefill chunks with tokens x context up to this run token by token through the batched decode
        # attention (one call for the step); 0 = never. CPU default 0: gathering each row's context costs more
        # there than the per-sequence calls it saves (tests set it to check the path against HF).
        # A longer chunk costs its step ~7 launches a layer more (gather, SDPA, scatter); row by row its device time
        # grows with tokens x context instead, and the steps are host-bound (the 7B's ~1,800-token GEMMs aside).
        # H200, 8aa5247 (diag_gpu prefill, step until read): 1.5B one 768-token prompt 34.1 ms per sequence -> 9.2
        # row by row, three of ~600 60.2 -> 16.6; 7B 31.2 -> 22.3, 74.7 -> 54.0. Served (36 models, seed 0) the
        # prefill steps' host time went 23.0 -> 16.3 ms. Hence the default 2^22: prompts up to 2048 tokens row by row.
        self.rowwise_prefill_max = env.ROWWISE_PREFILL_MAX.integer() if self.use_triton else 0
        # Steps that are not decodes run with their token count rounded up (`padded_rows`; padding rows write their
        # K/V into the scratch block and are dropped): cuBLAS picks its GEMM algorithm per shape the first time it
        # sees it, ~1.6-3.3 ms a projection on the H200 (diag_gpu prefill), so a prefill of a new token count paid
        # ~8 ms of host time before the rounding. On CUDA, but never on the HF-exact reference path.
        self.pad_rows = self.is_cuda
        # row-by-row steps through captured row graphs (ROW_BUCKETS); CPU runs the same pieces eagerly (tests)
        self.row_graphs = self.is_cuda and cuda_graphs and ROW_BUCKETS[-1] > 0
        # the most rows a step may have to go this way (more: eager)
        self.row_graph_rows = min(ROW_BUCKETS[-1], int(ROW_GRAPH_FLOP / (2 * layer_params(cfg))))
        # the fused forward, on CUDA: every step runs it but an HF-exact prefill (`_forward_eager`)
        self.fwd_decode = llama.forward_fused if self.use_triton else llama.forward
        self.shared_graphs = graphs is not None
        self.graphs: dict = graphs if graphs is not None else {}
        self.graph_key = graph_key
        # Which lane the next steps run on (a multi-model engine's co-stepping sets it around a launch; see
        # MultiModelEngine._co_step): lane 0 is the current stream's, lane 1 another model's step beside it. Each lane
        # has graphs and a graph memory pool of its own (`graph_cap.lane_key`): graphs of one pool share their
        # intermediates, so two in one pool must never run at once.
        self.lane = 0
        self.buckets = buckets = [b for b in GRAPH_BUCKETS if b <= max_graph_batch] if self.is_cuda and cuda_graphs else []
        # decode batch size -> smallest bucket that fits
        self.bucket_of: dict[int, int] = {n: next(b for b in buckets if b >= n) for n in range(1, max(buckets or [0]) + 1)}
        # Every paged-attention variant compiled now, once per graph key (prefill rows and decode buckets
        # pick split counts from a fixed set; a first-use JIT compile while serving is a stall of ~1 s).
        warmed = self.graphs.setdefault(("warm", self.graph_key), set())
        if self.use_triton and "attention" not in warmed:
            self._warm_attention()
            warmed.add("attention")
        if buckets and weights is not None and not self.shared_graphs:
            self.capture_graphs(buckets)

    def set_weights(self, weights: dict[str, torch.Tensor] | None, slot_key: object = None) -> None:
        """Point the runner at a model's weights (views into an arena slot), or at none (evicted)."""
        if weights is None or slot_key != self.slot_key:  # (graphs read the weights by address)
            self.drop_lora_graphs()
        if weights is None:
            self._slots = self._slots_failed = None
        self.weights, self.slot_key = weights, slot_key

    def drop_lora_graphs(self) -> None:
        """Forget the graphs over the adapter slots, and their pools with them: a pool whose graphs are all gone is
        released by the allocator, and a capture into its handle again fails (an internal assert)."""
        self._lora_graphs.clear()
        self._lora_pools.clear()

    def drop_lora(self, name: str) -> None:
        ad = self.loras.pop(name, None)
        if ad is not None and self._slots is not None:
            self._slots.forget(ad.uid)

    def _lora_slots(self, out: SchedulerOutput) -> list[int] | None:
        """Each chunk's adapter slot (-1: the model alone), its adapters written into the slots first; None when no
        row asks for an adapter, or when more adapters than `max_loras` do (`_lora_rows` then)."""
        if not self.loras:  # (the common case: no adapter hosted, no walk of the step's chunks)
            return None
        names = [c.request.sampling_params.lora for c in out.chunks]
        used = {n for n in names if n is not None}
        if not used or len(used) > self.max_loras:
            return None
        for n in used:
            if n not in self.loras:
                raise RuntimeError(f"step planned with LoRA adapter {n!r}, which is not hosted")
        s, want = self._slots, min(self.max_loras, len(self.loras))
        if s is None or s.slots < want or not s.holds(self.loras[n] for n in used):
            # slots for every adapter hosted (up to max_loras), of the largest rank among them: made again only when
            # adapters are added; the graphs over the old ones go
            rank, projs = LoraSlots.shape_for(self.loras.values())
            if self._slots_failed == (want, rank, projs):
                return None  # (out of memory for these before: by index, until the weights or adapters change)
            self._slots = None
            self.drop_lora_graphs()
            try:
                s = self._slots = LoraSlots(self.cfg, self.kv.dtype, self.device, want, rank, projs, self.use_triton)
            except torch.OutOfMemoryError:
                # Outside the weight arena and the KV budget: on a device filled to its budget the slots may not fit.
                # Adapter rows then take the by-index path (device copies of a step's adapters alone).
                self._slots_failed = (want, rank, projs)
                log.warning("model %s: no device memory for %d LoRA slots of rank %d; adapter steps run by index "
                            "(slower) until its adapters or weights change", self.name, want, rank)
                return None
            self._slots_failed = None
        keep = {self.loras[n].uid for n in used}
        slot = {n: s.slot_of(self.loras[n], keep) for n in used}
        return [-1 if n is None else slot[n] for n in names]

    def _adapters(self, out: SchedulerOutput) -> tuple[list[int] | None, LoraRows | None]:
        """How `out`'s adapter rows get their deltas: each chunk's slot (`_lora_slots`), or, past the slots or without
        them, by row index (`_lora_rows`); (None, None) for a step of the model alone."""
        slots = self._lora_slots(out)
        return slots, (self._lora_rows(out) if slots is None and self.loras else None)

    def _lora_rows(self, out: SchedulerOutput) -> LoraRows | None:
        """A step with adapter rows of more adapters than the slots hold, or when the slots could not be made (out of
        device memory): each adapter's rows by index, over device copies made for the step (slow, and only then: the
        eager forward adds the deltas adapter by adapter)."""
        rows: dict[str, list[int]] = {}
        q0 = 0
        for c in out.chunks:
            if (name := c.request.sampling_params.lora) is not None:
                rows.setdefault(name, []).extend(range(q0, q0 + c.num_tokens))
            q0 += c.num_tokens
        if not rows or (len(rows) <= self.max_loras and self._slots_failed is None):
            return None
        return LoraRows([(self.loras[name].to(self.device), upload(idx, self.device)) for name, idx in rows.items()])


    # -- execution ---------------------------------------------------------------------------------
    def execute(self, out: SchedulerOutput, on_launch: Callable[[], None] | None = None) -> StepResult:
        """Run a step and read its sampled tokens. `on_launch`: called once the forward is queued, before the
        host waits for it (a pipelined caller does the previous step's host work then, beside the device)."""
        self.swap_kv(out.swap_out, out.swap_in)
        if not out.chunks:
            return StepResult({}, {})
        if self.weights is None:
            raise RuntimeError("step planned for a model whose weights are not resident")
        sample_reqs = [c.request for c in out.chunks if c.sample]
        # (time_steps) recorded just before the graph replays or the eager forward starts, so a graph step's time
        # is the device's alone; an eager step's includes the gaps while the host launches its kernels
        start = torch.cuda.Event(enable_timing=True) if self.time_steps and self.is_cuda and sample_reqs else None
        prompt_lps: dict[str, list[dict[int, float]]] = {}
        embeds: dict[str, list[float]] = {}
        # adapter rows: their slots, or (more adapters than slots) their deltas by index on the eager forward
        slots, lora = self._adapters(out)
        eager = _embeds(out) or lora is not None  # (a one-token prompt's prefill is a decode-shaped step)
        if out.is_decode and len(out.chunks) in self.bucket_of and not self.hf_exact_decode and not eager:
            # (not marked in flight: its logits are sampled below, and nothing captures before that)
            logits = self._decode_graph(out, start=start, slots=slots).logits[: len(out.chunks)]
        elif self.row_graphs and self._by_rows(out) and not any(_scored_rows(out)) and not eager:
            logits = self._row_pieces(out, start, slots)
        else:
            if start is not None:
                start.record()
            hidden, idx = self._forward_eager(out, lora=lora, slots=slots)
            logits = llama.compute_logits(self.weights, hidden[idx]) if idx else None
            if any(scored := _scored_rows(out)):
                prompt_lps = self._prompt_logprobs(out, hidden, scored)
            if eager:
                embeds = self._embeddings(out, hidden)
        if on_launch is not None:
            on_launch()
        if not sample_reqs:
            return StepResult({}, {}, prompt_logprobs=prompt_lps)
        res: SampleResult = self.sampler(logits, sample_reqs)
        sampled = {r.request_id: t for r, t in zip(sample_reqs, res.token_ids)}
        lps = {r.request_id: lp for r, lp in zip(sample_reqs, res.logprobs or []) if lp}
        dev = None
        if start is not None:  # the tokens are read: the stream is idle, so `end` fires at once
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            dev = start.elapsed_time(end) / 1e3
        return StepResult(sampled, lps, dev, prompt_lps, embeds)

    @staticmethod
    def _embeddings(out: SchedulerOutput, hidden: torch.Tensor) -> dict[str, list[float]]:
        """The final hidden state of the last prompt token of each embedding request `out` ends the prefill of."""
        rows, rids, q = [], [], 0
        for c in out.chunks:
            q += c.num_tokens
            if c.sample and c.request.sampling_params.embed:
                rows.append(q - 1)
                rids.append(c.request.request_id)
        vecs = hidden[rows].float().tolist()  # (one read for the step)
        return dict(zip(rids, vecs))

    def _prompt_logprobs(self, out: SchedulerOutput, hidden: torch.Tensor,
                         scored: list[int]) -> dict[str, list[dict[int, float]]]:
        """The logprobs of the prompt tokens each chunk's first `scored` rows predict (row p: token p + 1): the LM
        head over those rows, PROMPT_LOGPROB_ROWS at a time (a long chunk's logits of the whole vocabulary at once
        would be rows x vocabulary x 4 bytes)."""
        res, q0 = {}, 0
        for c, n in zip(out.chunks, scored):
            k = c.request.sampling_params.prompt_logprobs or 0
            got = []
            for a in range(0, n, PROMPT_LOGPROB_ROWS):
                b = min(n, a + PROMPT_LOGPROB_ROWS)
                lp = torch.log_softmax(llama.compute_logits(self.weights, hidden[q0 + a: q0 + b]), -1)
                target = c.request.prompt_token_ids[c.start + 1 + a: c.start + 1 + b]
                chosen = lp.gather(1, upload(target, lp.device).unsqueeze(1)).view(-1).tolist()
                # (one read of each list for the block: a read a row would wait on the device once a row)
                top_v, top_i = [x.tolist() for x in torch.topk(lp, k, dim=-1)] if k else ([[]] * len(target),) * 2
                for t, p, ids, vals in zip(target, chosen, top_i, top_v):
                    d = {t: p}
                    for tid, v in zip(ids, vals):
                        d.setdefault(tid, v)
                    got.append(d)
            if got:
                res[c.request.request_id] = got
            q0 += c.num_tokens
        return res

    def can_launch(self, out: SchedulerOutput) -> bool:
        """Can `out` run as an overlapped decode: a graph bucket, no KV moves, and sampling that needs
        neither the tokens the host has not read yet (penalties) nor host-side logprobs."""
        return (out.is_decode and not out.swap_out and not out.swap_in and self.weights is not None
                and self.launchable(len(out.chunks), (c.request for c in out.chunks)))

    def launchable(self, n: int, requests) -> bool:
        """Whether a decode of `n` rows, `requests`, can run overlapped (`can_launch` less the step's own checks: a
        co-stepping engine asks it of a plan before its step is committed): a graph bucket, not the HF-exact path,
        and sampling that needs neither the tokens the host has not read yet (penalties; min_tokens' stop-token mask,
        which counts them; a grammar, which is fed them; bad_words, matched against them) nor host-side logprobs, and no embedding (read from the eager
        forward's hidden states), and no more LoRA adapters than the slots hold."""
        requests = list(requests)
        return (not self.hf_exact_decode and (n in self.bucket_of or not self.is_cuda)
                and len(names := {r.sampling_params.lora for r in requests} - {None}) <= self.max_loras
                and not (names and self._slots_failed is not None)
                and all(not (sp := r.sampling_params).needs_penalties and sp.logprobs is None and not sp.embed
                        and not sp.bad_words
                        and not masks_stop_tokens(r) and r.matcher is None for r in requests))

    def launch_decode(self, out: SchedulerOutput, ids: torch.Tensor | None = None,
                      timed: bool = False, rows: list[int] | None = None) -> LaunchedDecode:
        """Queue a decode step and its sampling without waiting for the GPU. `ids` (device): the previous step's
        sampled ids, when the host does not know them yet: row i's input token is `ids[rows[i]]` (`rows` None:
        `ids[i]`). `timed`: its device time is measured (CUDA events; `LaunchedDecode.device_s`)."""
        start = None
        if timed and self.is_cuda:  # (recorded just before the replay: a host late to launch it is not device time)
            start = torch.cuda.Event(enable_timing=True)
        g = None
        # (adapter rows whose slots could not be made just now, out of memory: by index, eagerly)
        slots, lora = self._adapters(out)
        if len(out.chunks) in self.bucket_of and lora is None:
            g = self._decode_graph(out, ids, start=start, rows=rows, slots=slots)
            logits = g.logits[: len(out.chunks)]
        else:  # CPU (no graphs): the same overlap logic, run eagerly
            if ids is not None and rows is not None:
                ids = ids[upload(rows, ids.device)]
            if start is not None:
                start.record()
            hidden, idx = self._forward_eager(out, ids, lora=lora, slots=slots)
            logits = llama.compute_logits(self.weights, hidden[idx])
        tokens = self.sampler.sample_tokens(logits, [c.request for c in out.chunks])
        if not self.is_cuda:
            return LaunchedDecode(out, tokens, tokens, None)
        readback, n = None, tokens.shape[0]
        if STEP_IO and (buf := self.readback.take(n)).view is not None:
            readback, host = (self.readback, buf), buf.host[:n]
            kernel_copy(buf.view[:n], tokens)
        else:
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
        ev = torch.cuda.Event(enable_timing=start is not None)
        ev.record()
        if g is not None:
            g.in_flight += 1
        return LaunchedDecode(out, tokens, host, ev, g, start, readback=readback)

    @staticmethod
    def read(step: LaunchedDecode) -> StepResult:
        if step.event is not None:
            step.event.synchronize()  # the one host wait of the step
        if step.graph is not None:  # read: its graph may be evicted again (and this step no longer holds it)
            step.graph.in_flight -= 1
            step.graph = None
        ids = step.host.tolist()
        if step.readback is not None:  # (once: a step is read once)
            pool, buf = step.readback
            pool.give(buf)
            step.readback = None
        return StepResult({c.request.request_id: t for c, t in zip(step.out.chunks, ids)}, {}, step.device_s())

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

    def _inputs(self, out: SchedulerOutput, ids_known: bool = False):
        bs = self.block_size
        ids, pos, sb, so = [], [], [], []
        for c in out.chunks:
            r: Request = c.request
            if not ids_known:
                ids += r.all_token_ids[c.start : c.start + c.num_tokens] if c.num_tokens > 1 else [r.token_at(c.start)]
            for p in range(c.start, c.start + c.num_tokens):
                pos.append(p)
                sb.append(r.block_ids[p // bs])
                so.append(p % bs)
        return ids, pos, sb, so

    def _decode_meta(self, groups) -> AttentionMetadata:
        """Attention metadata for rows of one query token each. `groups`: (request, context length of its
        first row including that token, number of rows) -- one row per decode, or a short prefill chunk taken
        token by token (causal by construction: the row of position p attends to positions < p + 1).
        Padded block tables (a request's table repeated for its rows), context lengths."""
        # numpy, not torch ops on CPU tensors: torch's CPU repeat_interleave took 2.4-3.6 ms of a prefill step's
        # ~21 ms of host time on the H200 machine (cProfile, diag_gpu prefill: 3 prompts of ~256), numpy's µs
        nb = max(len(r.block_ids) for r, _, _ in groups)
        bt = np.zeros((len(groups), nb), dtype=np.int32)
        for i, (r, _, _) in enumerate(groups):
            bt[i, : len(r.block_ids)] = r.block_ids
        if all(k == 1 for _, _, k in groups):
            ctx = np.array([c for _, c, _ in groups], dtype=np.int32)
        else:
            bt = np.repeat(bt, [k for _, _, k in groups], axis=0)
            ctx = np.concatenate([np.arange(c, c + k, dtype=np.int32) for _, c, k in groups])
        return AttentionMetadata(None, None, self.block_size, decode=True,
                                 block_tables=torch.from_numpy(bt).to(self.device),
                                 context_lens=torch.from_numpy(ctx).to(self.device), use_triton=self.use_triton)

    def _forward_eager(self, out: SchedulerOutput, input_ids: torch.Tensor | None = None,
                       lora: LoraRows | None = None, slots: list[int] | None = None):
        """`lora`: adapters' deltas by row index; `slots`: each chunk's adapter slot (`_lora_slots`)."""
        ids, pos, sb, so = self._inputs(out, input_ids is not None)
        row_slots = [s for c, s in zip(out.chunks, slots) for _ in range(c.num_tokens)] if slots else None
        dev = self.device
        t = lambda x: torch.tensor(x, dtype=torch.long, device=dev)  # noqa: E731
        if out.is_decode and not self.hf_exact_decode:
            meta = self._decode_meta([(c.request, c.start + 1, 1) for c in out.chunks])
            meta.slot_blocks, meta.slot_offsets, meta.own_rows = t(sb), t(so), True
        else:
            pad = 0
            if self.pad_rows and not self.hf_exact_prefill and input_ids is None:
                pad = padded_rows(len(pos)) - len(pos)
            if pad:  # rows at position 0 whose K/V go to the scratch block; their outputs are never read
                ids, pos = ids + [0] * pad, pos + [0] * pad
                sb, so = sb + [self.scratch_block] * pad, so + [0] * pad
                if row_slots:
                    row_slots += [-1] * pad
            meta = AttentionMetadata(t(sb), t(so), self.block_size, hf_exact=self.hf_exact_prefill)
            q0, groups, qrows = 0, [], []
            for c in out.chunks:
                ctx = c.start + c.num_tokens
                if self._rowwise(c):
                    groups.append((c.request, c.start + 1, c.num_tokens))
                    qrows += range(q0, q0 + c.num_tokens)
                else:
                    meta.seqs.append((q0, c.num_tokens, ctx))
                    meta.seq_block_tables.append(t(c.request.block_ids[: -(-ctx // self.block_size)]))
                q0 += c.num_tokens
            if pad and groups and not meta.seqs:  # the padding rows as one-query rows over the scratch block
                groups += [(_ScratchRow([self.scratch_block]), 1, 1)] * pad
            if groups and not meta.seqs:  # every row is a one-query row: the decode attention's call alone (no
                # gather into it and scatter back, 3 launches a layer: a 28-layer prefill's host time is its launches)
                meta = dataclasses.replace(self._decode_meta(groups), slot_blocks=meta.slot_blocks,
                                           slot_offsets=meta.slot_offsets)
            elif groups:
                meta.mixed_rows = t(qrows)
                meta.mixed = self._decode_meta(groups)
        # hf_exact_prefill: pure prefill follows HF's op sequence (bit-exact first-token logits on the H100).
        # Otherwise every step runs the fused kernels: on the reference path (~40 ops per layer, one SDPA per
        # sequence) a prefill of a few short prompts was launch-bound, ~36 ms on the H100 for ~100 tokens, and one of
        # 768 tokens of a 1.5B ~47 ms on the H200 (diag_gpu prefill).
        # LoRA rows: their adapters' deltas added after each projection (the fused forward on cuBLAS, eager)
        fwd = llama.forward if self.hf_exact_prefill and not meta.decode and meta.mixed_rows is None else self.fwd_decode
        if row_slots:
            lora = self._slots.rows(upload(row_slots, dev))
        kw = {} if lora is None else {"lora": lora}
        hidden = fwd(self.cfg, self.weights, self.kv, self.rope, t(ids) if input_ids is None else input_ids,
                     t(pos), meta, **kw)
        idx, q = [], 0
        for c in out.chunks:
            q += c.num_tokens
            if c.sample:
                idx.append(q - 1)
        return hidden, idx

    def _rowwise(self, c) -> bool:
        """Does chunk `c` of a non-decode step go row by row? One-token chunks, and short chunks token by token, go
        to one batched decode-attention call; long chunks get one SDPA each (their ~12 launches per layer are
        amortised; row by row they would re-read the context once per token)."""
        row_max = 0 if self.hf_exact_prefill else self.rowwise_prefill_max
        return (c.num_tokens == 1 and not self.hf_exact_decode) or c.num_tokens * (c.start + c.num_tokens) <= row_max

    def _by_rows(self, out: SchedulerOutput) -> bool:
        """Does every chunk of this prefill or mixed step go row by row (so the step can replay row graphs)?"""
        return (not out.is_decode and not self.hf_exact_prefill and self.weights is not None
                and sum(c.num_tokens for c in out.chunks) <= self.row_graph_rows
                and all(self._rowwise(c) for c in out.chunks))

    def _row_pieces(self, out: SchedulerOutput, start: torch.cuda.Event | None = None,
                    slots: list[int] | None = None) -> torch.Tensor | None:
        """Run a row-by-row step as pieces of consecutive rows (at most ROW_BUCKETS[-1] rows and ROW_SELECT sampled
        rows each), in order; the logits of the sampled rows, in chunk order (None: nothing sampled). `slots`: each
        chunk's adapter slot (`_lora_slots`)."""
        pieces, reqs, pos, sel, sl = [], [], [], [], []
        limit = ROW_BUCKETS[-1]
        for i, c in enumerate(out.chunks):
            for p in range(c.start, c.start + c.num_tokens):
                if len(reqs) == limit:
                    pieces.append((reqs, pos, sel, sl))
                    reqs, pos, sel, sl = [], [], [], []
                reqs.append(c.request)
                pos.append(p)
                sl.append(slots[i] if slots else -1)
            if c.sample:
                sel.append(len(reqs) - 1)
                if len(sel) == ROW_SELECT:
                    pieces.append((reqs, pos, sel, sl))
                    reqs, pos, sel, sl = [], [], [], []
        if reqs:
            pieces.append((reqs, pos, sel, sl))
        parts = []
        for i, (reqs, pos, sel, sl) in enumerate(pieces):
            logits = self._row_piece(reqs, pos, sel, start if i == 0 else None, sl if slots else None)
            if sel:  # (a copy when another piece follows: it may replay the same graph, over these logits)
                parts.append(logits[: len(sel)].clone() if i + 1 < len(pieces) else logits[: len(sel)])
        return (parts[0] if len(parts) == 1 else torch.cat(parts)) if parts else None

    def _row_piece(self, reqs: list, pos: list[int], sel: list[int], start=None,
                   slots: list[int] | None = None) -> torch.Tensor:
        """One piece: rows (request, position) as a decode of their tokens; logits of rows `sel` first. CUDA:
        the row graph of the smallest bucket that holds it (over the adapter slots with `slots`, each row's); CPU: the
        same eagerly."""
        if not self.is_cuda:
            bs = self.block_size
            meta = self._decode_meta([(r, p + 1, 1) for r, p in zip(reqs, pos)])
            meta.slot_blocks = upload([r.block_ids[p // bs] for r, p in zip(reqs, pos)], self.device)
            meta.slot_offsets = upload([p % bs for p in pos], self.device)
            ids = upload([r.token_at(p) for r, p in zip(reqs, pos)], self.device)
            kw = {} if slots is None else {"lora": self._slots.rows(upload(slots, self.device))}
            h = self.fwd_decode(self.cfg, self.weights, self.kv, self.rope, ids, upload(pos, self.device), meta, **kw)
            return llama.compute_logits(self.weights, h[upload(sel, self.device)]) if sel else h[:0]
        b = ("rows", next(k for k in ROW_BUCKETS if k >= len(reqs)))
        return self._replay(b, lambda g: g.fill_rows(reqs, pos, self, sel, slots), start,
                            lora=slots is not None).logits

    # -- CUDA graphs ---------------------------------------------------------------------------------
    def _graph_id(self, bucket) -> tuple:
        """(key, weight slot, bucket): a decode bucket is a batch size, a row graph's ("rows", rows)."""
        key = graph_cap.rows_key(self.graph_key) if isinstance(bucket, tuple) else self.graph_key
        return (graph_cap.lane_key(key, self.lane), self.slot_key, bucket)

    def capture_graphs(self, buckets: list[int]) -> None:
        """Capture the buckets for the current weights (largest first, so smaller ones reuse its memory)."""
        for b in sorted(buckets, reverse=True):
            self._capture(b)

    def capture_first(self) -> int:
        """Capture, at the current weights' slot, every bucket no model of this shape has run yet: each one's
        first capture (warm-up forwards, first-use compiles) then, at a load, instead of at its first step under
        load. Later slots' captures skip the warm-up. The buckets captured (0 on CPU or once all are warm)."""
        warmed = self.graphs.setdefault(("warm", self.graph_key), set())
        missing = [b for b in self.buckets if b not in warmed]
        if missing and self.weights is not None:
            self.capture_graphs(missing)
        return len(missing) if self.weights is not None else 0

    def _capture(self, bucket: int):
        key = ("pool", graph_cap.lane_key(self.graph_key, self.lane))
        pool = self.graphs.get(key)
        if pool is None:
            # One capture stream per pool, not one per capture: the caching allocator gives a freed block
            # again only on the stream it was allocated on, so an evicted graph's memory is reused by the
            # next capture only when both are captured on the same stream.
            pool = self.graphs[key] = (torch.cuda.graph_pool_handle(), torch.cuda.Stream(self.device))
        # Over the cap, the least recently replayed graph of the key goes first, so its memory is free for this one.
        graph_cap.make_room(self.graphs, self._graph_id(bucket)[0], GRAPH_CAP)
        # Warm-up runs before a capture initialise lazy state (Triton JIT, cuBLAS workspaces): needed once per
        # graph key and bucket, not for every weight slot a model of that shape lands in (a 7B capture with
        # warm-up took ~0.3 s on the H100, paid at every new slot).
        warmed = self.graphs.setdefault(("warm", graph_cap.lane_key(self.graph_key, self.lane)), set())
        first = bucket not in warmed
        t = time.perf_counter()
        g = _DecodeGraph(self, bucket, *pool, warmup=2 if first else 0)
        warmed.add(bucket)
        graph_cap.added(self.graphs, self._graph_id(bucket), g, time.perf_counter() - t, first)
        return g

    def _warm_attention(self) -> None:
        """Compile each split-count variant of the paged attention (one call each into the scratch block)."""
        from token_scheduler.model import triton_decode

        cfg, dev = self.cfg, self.device
        q = torch.zeros(1, cfg.num_heads, cfg.head_dim, dtype=self.kv.dtype, device=dev)
        bt = torch.full((1, 1), self.scratch_block, dtype=torch.int32, device=dev)
        # a one-token step on the GEMV path does RoPE in its qkv epilogue, never in the attention
        one = torch.zeros(1, cfg.hidden_size, dtype=self.kv.dtype, device=dev)
        triton_decode.warm_up(q, self.kv, bt, torch.ones(1, dtype=torch.int32, device=dev), cfg.head_dim**-0.5,
                              cfg.sliding_window, self.rope if llama.folds_rope(cfg) else None,
                              rope_one_row=not llama.takes_gemv(cfg, one))

    def _decode_graph(self, out: SchedulerOutput, ids: torch.Tensor | None = None,
                      start: torch.cuda.Event | None = None, rows: list[int] | None = None,
                      slots: list[int] | None = None) -> _DecodeGraph:
        """Replay the graph of `out`'s bucket (captured first if missing); its logits' first rows are `out`'s.
        `ids`, `rows`: as in `launch_decode`. `start`: recorded just before the replay (after a capture and the
        inputs' uploads). `slots` (`_lora_slots`): the graph over the adapter slots, each row's slot an input."""
        return self._replay(self.bucket_of[len(out.chunks)], lambda g: g.fill(out, self, ids, rows, slots), start,
                            lora=slots is not None)

    def _capture_lora(self, bucket) -> _DecodeGraph:
        """The graph of `bucket` (a decode bucket, or a row graph's) over the adapter slots, on this lane (its own
        pool: one per lane, as the model's graphs have, so two never run at once); warmed up each time (captures are
        rare: a bucket's first adapter step at a weight slot, or after the slots were made again)."""
        pool = self._lora_pools.get(self.lane)
        if pool is None:
            pool = self._lora_pools[self.lane] = (torch.cuda.graph_pool_handle(), torch.cuda.Stream(self.device))
        g = self._lora_graphs[(self.lane, bucket)] = _DecodeGraph(self, bucket, *pool, lora=self._slots)
        return g

    def _replay(self, bucket, fill: Callable[[_DecodeGraph], None], start: torch.cuda.Event | None,
                lora: bool = False) -> _DecodeGraph:
        """The graph of `bucket` at the current weights' slot (captured first if missing), `fill`ed and replayed."""
        if lora:
            g = self._lora_graphs.get((self.lane, bucket)) or self._capture_lora(bucket)
        else:
            g = self.graphs.get(self._graph_id(bucket)) or self._capture(bucket)
        g.users.add(self.name)
        fill(g)
        if start is not None:
            start.record()
        g.graph.replay()
        graph_cap.touch(g)
        return g


@dataclass
class _IdsBuffer:
    host: torch.Tensor  # pinned int64 [rows]
    view: torch.Tensor | None  # the same memory as a device tensor (`device_view`), or None where it cannot be mapped


class _Readback:
    """(STEP_IO) Pinned buffers that launched decode steps' sampled ids are written into by a kernel through a device
    view, instead of copied by a copy engine: one a step from its launch until it is read (`give`); a step dropped
    unread keeps its buffer, which goes with it. The host reads the ids once the step's event has fired."""

    def __init__(self, device: torch.device, rows: int):
        self.device, self.rows = device, rows
        self.free: list[_IdsBuffer] = []

    def take(self, n: int) -> _IdsBuffer:
        while self.free:
            buf = self.free.pop()
            if buf.host.shape[0] >= n:
                return buf
        with torch.cuda.device(self.device):  # (pinned with the device current: mapped as its tensors)
            host = torch.zeros(max(n, self.rows), dtype=torch.long, pin_memory=True)
        try:
            view = device_view(host, self.device)
        except RuntimeError:
            view = None
        return _IdsBuffer(host, view)

    def give(self, buf: _IdsBuffer) -> None:
        self.free.append(buf)


class _DecodeGraph:
    """Static buffers + captured graph for one decode batch bucket, or (bucket ("rows", n)) for the rows of a
    row-by-row step: n rows, logits for ROW_SELECT of them, chosen by an index row of the inputs. With `lora`: over
    those adapter slots, each row's slot (-1: none) one more input."""

    def __init__(self, runner: ModelRunner, bucket, pool, stream: torch.cuda.Stream, warmup: int = 2,
                 lora: LoraSlots | None = None):
        dev, mb = runner.device, runner.max_blocks
        rows = isinstance(bucket, tuple)
        self.batch = batch = bucket[1] if rows else bucket
        # Two pinned input buffers, used in turn: with overlapped steps the host fills step N+1 while the
        # upload that feeds step N may still be queued behind step N-1, so N+1 must not write N's buffer.
        with torch.cuda.device(dev):  # (pinned with `dev` current: mapped as its tensors, below)
            self.hosts = [torch.zeros(5 + rows, batch, dtype=torch.long, pin_memory=True) for _ in range(2)]
            self.host_bts = [torch.zeros(batch, mb, dtype=torch.int32, pin_memory=True) for _ in range(2)]
            self.host_slots = [torch.full((batch,), -1, dtype=torch.long, pin_memory=True) for _ in range(2)] if lora else []
        # Uploaded by a kernel reading them where they are (`device_view`), not by copies: a step queued behind the
        # one in flight (TOKENPOOL_PIPELINE) while a weight prefetch ran had its block-table copy (2 KB and up)
        # wait for the copy engine until the prefetch ended: ~17 ms late a step on the H200 at 36 models (session
        # 30). Copies where the pinned pages cannot be mapped as `dev`'s tensors.
        try:
            self.views = [(device_view(h, dev), device_view(b, dev)) for h, b in zip(self.hosts, self.host_bts)]
            self.slot_views = [device_view(h, dev) for h in self.host_slots]
        except RuntimeError:
            self.views = self.slot_views = None
        # numpy views of the same pinned memory: `fill` writes the step's rows there from Python lists without a
        # torch call each (a torch op cost ~20 us of the step thread on the H200 host, before the replay; fill
        # was 5 of them, ~0.17 ms a step at 35 models)
        self.hosts_np = [h.numpy() for h in self.hosts]
        self.host_bts_np = [h.numpy() for h in self.host_bts]
        self.pad = [[0], [0], [runner.scratch_block], [0], [1]] + [[0]] * rows  # a padded row's column of `hosts`
        for h in self.hosts_np:
            h[:] = self.pad
        self.turn = 0
        self.dev = torch.zeros(5 + rows, batch, dtype=torch.long, device=dev)
        self.bt = torch.full((batch, mb), runner.scratch_block, dtype=torch.int32, device=dev)
        self.ctx32 = torch.ones(batch, dtype=torch.int32, device=dev)
        self.dev[2].fill_(runner.scratch_block)
        self.dev[4].fill_(1)
        self.lora = lora
        self.slot_ids = torch.full((batch,), -1, dtype=torch.long, device=dev) if lora else None
        # (STEP_IO) every input written by one kernel (`triton_ops.fill_inputs`), compiled now for both of its
        # variants (ids from the host, ids gathered on the device), not at a first use under load: a fill of no rows,
        # which copies the padded columns the buffers hold and writes what the lines above wrote
        self.fused = STEP_IO and runner.use_triton and self.views is not None
        if self.fused:
            from token_scheduler.model import triton_ops

            for ids in (None, self.dev[0]):
                triton_ops.fill_inputs(self.dev, self.bt, self.ctx32, *self.views[0], 0, 0, ids)
        meta = AttentionMetadata(self.dev[2], self.dev[3], runner.block_size, decode=True,
                                 block_tables=self.bt, context_lens=self.ctx32, use_triton=runner.use_triton,
                                 own_rows=not rows)

        self.users: set[str] = set()  # names of the models that replayed it (shared per slot)
        self.keep = (runner.rope, meta)  # the graph reads them by address: keep them alive with it
        self.last_replay = 0  # graph_cap's bookkeeping: recency, and launched steps not read yet
        self.in_flight = 0

        # a batch-1 step as one persistent kernel (megakernel.py, TOKENPOOL_MEGAKERNEL): its logits straight out
        mk = None
        if (not rows and batch == 1 and lora is None and runner.use_triton and megakernel.USE
                and megakernel.reason_not(runner.cfg, runner.weights, runner.kv) is None):
            mk = megakernel.DecodeStep(runner.cfg, runner.weights, runner.kv, runner.rope, *self.dev[:4], self.ctx32,
                                       self.bt)
            # the graph reads its parameter block, counters and scratch by address: kept alive with the graph (as a
            # local only, they went back to the allocator after capture and a replay read reused memory: an
            # illegal address, found on an H100 at 3286ef0)
            self.keep = (*self.keep, mk)

        def run():  # (the adapter mask from the rows' slots is computed in the graph, at every replay)
            if mk is not None:
                return mk() if STEP_IO else mk().float()
            kw = {} if lora is None else {"lora": lora.rows(self.slot_ids)}
            h = runner.fwd_decode(runner.cfg, runner.weights, runner.kv, runner.rope, self.dev[0], self.dev[1], meta,
                                  **kw)
            return llama.compute_logits(runner.weights, h[self.dev[5, :ROW_SELECT]] if rows else h, fp32=not STEP_IO)

        # The capture stream is this runner's device's own: torch.cuda.graph's default capture stream is made
        # once per process, on whichever device was current then, so a second GPU's graphs captured on it came
        # out empty (and Triton refused the other device's pointers). Triton launches on the current device.
        with torch.cuda.device(dev):
            s = stream
            s.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(s):
                for _ in range(warmup):
                    run()
            torch.cuda.current_stream(dev).wait_stream(s)
            # capture_begin/end, not `with torch.cuda.graph(...)`: its __enter__ synchronizes the whole device
            # (waiting out a weight prefetch in flight, up to 0.28 s for a 7B on the H200) and empties the
            # device and pinned-host caching allocators, so the steps after each capture went back to
            # cudaMalloc/cudaHostAlloc. Served from a cold start that was 71 captures at ~35 ms each on the step
            # thread (88eac94, 1.3 req/s/model). The capture itself needs neither: its stream only waits on ours.
            # thread_local: the prefetcher's copies and event queries on their own stream go on meanwhile.
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.stream(s):
                self.graph.capture_begin(pool=pool, capture_error_mode="thread_local")
                try:
                    self.logits = run()
                finally:
                    self.graph.capture_end()
        self.nbytes = self.logits.numel() * self.logits.element_size()  # held in the pool for as long as the graph

    def fill(self, out: SchedulerOutput, runner: ModelRunner, ids: torch.Tensor | None = None,
             rows: list[int] | None = None, slots: list[int] | None = None) -> None:
        """The inputs of `out`'s rows, uploaded (stream-ordered) into the graph's buffers. `ids` (device): the input
        tokens, when the host does not know them yet -- row i's is `ids[rows[i]]` (`rows` None: `ids[i]`). `slots`:
        each row's adapter slot (a graph over the adapter slots)."""
        # Only the first `nb` block-table columns of real rows are read (the kernel stops at the context
        # length), so stale columns need no reset. Padded rows write their K/V into the scratch block.
        self._fill([c.request for c in out.chunks], [c.start for c in out.chunks], runner, ids, rows, slots=slots)

    def fill_rows(self, reqs: list, pos: list[int], runner: ModelRunner, sel: list[int],
                  slots: list[int] | None = None) -> None:
        """A row graph's inputs: row i is request reqs[i]'s token at pos[i]; logits for rows `sel` (the rest 0);
        `slots`: each row's adapter slot (a graph over the adapter slots)."""
        self._fill(reqs, pos, runner, sel=sel, slots=slots)

    def _fill(self, reqs: list, pos: list[int], runner: ModelRunner, ids=None, rows=None, sel=None,
              slots=None) -> None:
        bs, scratch = runner.block_size, runner.scratch_block
        n = len(reqs)
        t = self.turn
        if self.lora is not None:  # (this turn's buffer; padded rows: no adapter)
            hs = self.host_slots[t].numpy()
            hs[:n] = slots
            hs[n:] = -1
            if self.slot_views is not None:
                kernel_copy(self.slot_ids, self.slot_views[t])
            else:
                self.slot_ids.copy_(self.host_slots[t], non_blocking=True)
        h, hb = self.hosts_np[t], self.host_bts_np[t]
        self.turn ^= 1
        h[0, :n] = [r.token_at(p) for r, p in zip(reqs, pos)] if ids is None else (rows or range(n))
        h[1, :n] = pos
        h[2, :n] = [r.block_ids[p // bs] for r, p in zip(reqs, pos)]
        h[3, :n] = [p % bs for p in pos]
        h[4, :n] = [p + 1 for p in pos]
        h[:, n:] = self.pad
        if sel is not None:
            h[5, : len(sel)] = sel
            h[5, len(sel):] = 0
        nb = max(len(r.block_ids) for r in reqs)
        i = 0
        while i < n:  # a run of rows of one request (a prefill's) shares its table: one numpy write for the run
            r, j = reqs[i], i + 1
            while j < n and reqs[j] is r:
                j += 1
            k = len(r.block_ids)
            hb[i:j, :k] = r.block_ids
            hb[i:j, k:nb] = scratch
            i = j
        if self.fused:  # row i's token: ids[h[0, i]] with ids given
            from token_scheduler.model import triton_ops

            triton_ops.fill_inputs(self.dev, self.bt, self.ctx32, *self.views[t], n, nb, ids)
            return
        if self.views is not None:
            kernel_copy(self.dev, self.views[t][0])
            kernel_copy(self.bt[:n], self.views[t][1][:n])
        else:
            self.dev.copy_(self.hosts[t], non_blocking=True)
            self.bt[:n].copy_(self.host_bts[t][:n], non_blocking=True)
        if ids is not None:
            self.dev[0, :n].copy_(ids if rows is None else ids.index_select(0, self.dev[0, :n]))
        self.ctx32.copy_(self.dev[4])


def layer_params(cfg: ModelConfig) -> int:
    """Weights a token's projections multiply in all the decoder layers (not the embedding or LM head)."""
    h = cfg.hidden_size
    return cfg.num_layers * (h * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * h + 3 * h * cfg.intermediate_size)


def padded_rows(t: int) -> int:
    """The row count a non-decode step of `t` tokens runs with: one row as it is, then multiples of 16 up to 64, of
    64 up to 1024, of 256 beyond -- ~50 sizes in all up to 8192, so every GEMM shape is one cuBLAS has seen before
    after a few prefills, for at most ~25% more rows (a prefill's projections are a few ms of the device at most)."""
    if t <= 1:
        return t
    step = 16 if t <= 64 else 64 if t <= 1024 else 256
    return -(-t // step) * step


@dataclass
class _ScratchRow:
    """A padding row's stand-in request in `_decode_meta`: its one block is the scratch block."""

    block_ids: list[int]


def triton_available() -> bool:
    try:
        import triton  # noqa: F401

        from token_scheduler.model import triton_decode  # noqa: F401
        return True
    except Exception:
        return False
