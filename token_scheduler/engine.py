"""LLMEngine: one model on one device. The step loop is `schedule -> execute -> update`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from model_swapper.model_config import ModelConfig, parse_dtype
from model_swapper.weights import load_weights, weight_numel
from token_scheduler.block_manager import BlockAllocator
from token_scheduler.detokenizer import IncrementalDetokenizer, detokenize
from token_scheduler.policies.batching import MAX_NUM_BATCHED_TOKENS, MAX_NUM_SEQS, BatchLimits
from token_scheduler.request import (
    Request,
    RequestOutput,
    RequestStatus,
    SamplingParams,
    TokenOutput,
    bad_word_ids,
)
from token_scheduler.runner import LaunchedDecode, ModelRunner, allocate_kv_cache
from token_scheduler.scheduler import BatchScheduler, SchedulerOutput
from token_scheduler.tokenizer import load_tokenizer
from tokenpool.models import MAX_LORA_RANK


@dataclass(frozen=True)
class EngineConfig:
    model: str
    device: str = "cpu"
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    block_size: int = 16
    num_kv_blocks: int | None = None  # default: from kv_cache_memory_gb / gpu_memory_utilization
    kv_cache_memory_gb: float | None = None
    gpu_memory_utilization: float = 0.85
    num_host_kv_blocks: int | None = None  # swap space; default: as many as GPU blocks
    # The batch limits, the one source of them: the scheduler's and any multi-model policy's (BatchLimits.of)
    max_num_seqs: int = MAX_NUM_SEQS
    max_num_batched_tokens: int = MAX_NUM_BATCHED_TOKENS
    max_model_len: int | None = None
    seed: int = 0
    cuda_graphs: bool = True
    served_model_name: str | None = None
    # Overlapped decode: queue step N+1 (fed with step N's sampled ids on the GPU) before reading step N,
    # so the host's bookkeeping hides behind the GPU. None: on CUDA; True also runs the logic on CPU.
    overlap: bool | None = None
    # Prefill attention called exactly as HF transformers calls it: bf16 first-token logits equal HF's bit
    # for bit, at the cost of SDPA's slow math backend under GQA (a parity/debug mode, not for serving).
    hf_exact_prefill: bool = False
    # Every step as HF calls it, decode too (eager reference ops, one SDPA per sequence over a contiguous copy
    # of its context, no CUDA graphs): for bf16 greedy parity checks only -- many times slower than serving.
    hf_exact: bool = False
    # LoRA adapters served over this model (vLLM's --lora-modules): name -> PEFT adapter directory. A request asks
    # for one by SamplingParams.lora; `LLMEngine.add_lora` / `remove_lora` change them at runtime.
    lora_modules: dict[str, str] | None = None
    # The adapter slots on the device (vLLM's --max-loras): a step over up to this many adapters replays a graph;
    # None: TOKENPOOL_GPU_LORAS (runner.GPU_LORAS). The largest adapter rank served (vLLM's --max-lora-rank): the
    # slots are as wide as the largest rank hosted, so an adapter of a larger rank is refused at add_lora.
    max_loras: int | None = None
    max_lora_rank: int = MAX_LORA_RANK
    # Automatic prefix caching (vLLM's): a request starts on the cached KV blocks its tokens begin with (a shared
    # system prompt, the turns before a chat's last). Off on the HF-exact reference paths.
    enable_prefix_caching: bool = True

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype, torch.bfloat16 if self.device.startswith("cuda") else torch.float32)


@dataclass
class SharedKV:
    """This model's part of a KV region shared by several models (MultiModelEngine): its view of the GPU
    pages and of the host pages, and allocators that draw from the shared free lists."""

    kv: torch.Tensor  # [pages, layers, 2, block_size, kv_heads, head_dim] view; the last page is scratch
    allocator: BlockAllocator  # BlockAllocator.share(block_size) of the pool's GPU allocator
    host: object | None  # model_swapper.HostKVPool view of the shared host pages (None: no swap space)
    block_size: int
    graphs: dict  # CUDA graphs shared by the pool's runners
    graph_key: object


class LLMEngine:
    def __init__(self, config: EngineConfig, weights: dict[str, torch.Tensor] | None = None,
                 shared_kv: SharedKV | None = None, load: bool = True, tokenizer=None):
        """`weights`: use these (views the caller owns) instead of loading. `load=False`: start with no
        weights at all (a multi-model engine makes them resident with `set_weights`). `shared_kv`: draw KV
        from a region shared with other models instead of allocating a pool. `tokenizer`: the model
        directory's, already loaded (engines never step at once, so they may share one)."""
        from model_swapper.kv_swap import HostKVPool, KVSwapper

        self.config = c = config
        self.last_out = None  # the SchedulerOutput of the latest step that was scheduled here
        self.t_read = None  # (perf_counter, thread_time) when the latest step_tokens, continue_ or complete_inflight read
        self.device_s = None  # (runner.time_steps / time_launches) the device's time for the step that read tokens
        self.device = torch.device(c.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device='cuda' asked for, but CUDA is not available")
        self.model_name = c.served_model_name or Path(c.model).name
        self.model_config = mc = ModelConfig.from_pretrained(c.model)
        self.dtype = c.torch_dtype
        self.tokenizer = tokenizer or load_tokenizer(c.model)
        self.max_model_len = min(c.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        if weights is None and load:
            weights = load_weights(c.model, mc, self.device, self.dtype)
        self.weights = weights

        if shared_kv is None:
            num_blocks = c.num_kv_blocks or self._default_num_blocks()
            host_blocks = num_blocks if c.num_host_kv_blocks is None else c.num_host_kv_blocks
            kv = allocate_kv_cache(mc, num_blocks + 1, c.block_size, self.dtype, self.device)  # +1 scratch
            self.host_kv = HostKVPool.like(kv, host_blocks) if host_blocks else None
            gpu_alloc, block_size, graphs, graph_key = BlockAllocator(num_blocks, c.block_size), c.block_size, None, None
        else:
            kv, self.host_kv, gpu_alloc = shared_kv.kv, shared_kv.host, shared_kv.allocator
            block_size, graphs, graph_key = shared_kv.block_size, shared_kv.graphs, shared_kv.graph_key
        self.block_size = block_size
        swapper = KVSwapper(kv, self.host_kv, staging_blocks=16 if shared_kv else 64) if self.host_kv else None
        self.scheduler = BatchScheduler(
            BatchLimits.of(c), gpu_alloc, self.host_kv.allocator if self.host_kv else None, model=self.model_name,
            prefix_caching=c.enable_prefix_caching and not (c.hf_exact or c.hf_exact_prefill),
        )
        self.runner = ModelRunner(mc, self.weights, kv, block_size, self.max_model_len, self.device, c.seed,
                                  swapper, cuda_graphs=c.cuda_graphs, max_graph_batch=c.max_num_seqs,
                                  graphs=graphs, graph_key=graph_key, name=self.model_name,
                                  hf_exact_prefill=c.hf_exact_prefill, hf_exact_decode=c.hf_exact,
                                  max_loras=c.max_loras)
        self._retiring: set[str] = set()  # adapters unlisted (set_loras) that still have unfinished requests
        for name, path in (c.lora_modules or {}).items():
            self.add_lora(name, path)
        self._aborted: list[Request] = []
        self._grammar_tokenizer = None  # (SamplingParams.grammar) the tokenizer in llguidance form, made once
        self.overlap = self.device.type == "cuda" if c.overlap is None else c.overlap
        self._inflight: LaunchedDecode | None = None  # a decode step queued, its tokens not read yet
        # launches timed on the device (a pipelining MultiModelEngine floors what it learns of a step in flight)
        self.time_launches = False
        self.eos_token_ids = tuple(mc.eos_token_ids) or ((self.tokenizer.eos_token_id,) if self.tokenizer.eos_token_id is not None else ())

    def _default_num_blocks(self) -> int:
        mc, c = self.model_config, self.config
        per_block = mc.kv_bytes_per_token(self.dtype) * c.block_size
        if c.kv_cache_memory_gb is not None:
            budget = c.kv_cache_memory_gb * 1e9
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = total * c.gpu_memory_utilization - (total - free) - 2e9  # room for activations/graphs
        else:  # CPU: enough for max_num_seqs sequences of 2k tokens, capped at 1 GB
            budget = min(1e9, per_block * c.max_num_seqs * -(-min(self.max_model_len, 2048) // c.block_size))
        n = int(budget // per_block)
        if n < 1:
            raise RuntimeError(f"no memory left for the KV cache (budget {budget / 1e9:.2f} GB)")
        return n

    def set_weights(self, weights: dict[str, torch.Tensor] | None, slot_key: object = None) -> None:
        """Make the model resident (views into an arena slot) or not (None). Steps need it resident."""
        self.weights = weights
        self.runner.set_weights(weights, slot_key)

    def add_lora(self, name: str, path: str | Path) -> None:
        """Host a LoRA adapter (PEFT's format) for this model's requests to ask for by `name` (SamplingParams.lora).
        Its weights are read now, onto the host; a step that uses it copies them to the device. ValueError: not an
        adapter the engine runs, or not one of this model (its shapes)."""
        from token_scheduler.model.lora import LoraAdapter

        if name in self.runner.loras:
            raise ValueError(f"LoRA adapter {name!r} is already loaded")
        self.runner.loras[name] = LoraAdapter.load(name, path, self.model_config, self.dtype, self.config.max_lora_rank)

    def remove_lora(self, name: str) -> None:
        """Stop hosting an adapter; ValueError while a request of it is unfinished."""
        if name not in self.runner.loras:
            raise ValueError(f"LoRA adapter {name!r} is not loaded")
        busy = self._lora_busy(name)
        if busy:
            raise ValueError(f"LoRA adapter {name!r} has {busy} unfinished request(s)")
        self.runner.drop_lora(name)
        self._retiring.discard(name)

    def _lora_busy(self, name: str) -> int:
        return sum(r.sampling_params.lora == name for r in self.scheduler.requests.values())

    def set_loras(self, loras: dict[str, str]) -> list[str]:
        """Host exactly these adapters (name -> path): new ones are read now; one no longer listed takes no new
        request and goes once its unfinished ones are done (`retire_loras`). Returns the errors of those that could
        not be read (the others are set regardless)."""
        errors = []
        loras = {n: str(p) for n, p in loras.items()}
        for name, ad in list(self.runner.loras.items()):
            if loras.get(name) != ad.path:
                self._retiring.add(name)
        self.retire_loras()
        for name, path in loras.items():
            if name in self.runner.loras and name not in self._retiring:
                continue
            if name in self._retiring:  # listed again (another path) while its requests finish: they keep the old
                errors.append(f"LoRA adapter {name!r} is being replaced; its unfinished requests use the old one")
                continue
            try:
                self.add_lora(name, path)
            except (OSError, ValueError) as e:
                errors.append(str(e))
        return errors

    def retire_loras(self) -> None:
        """Drop the adapters `set_loras` retired whose requests are all done."""
        for name in [n for n in self._retiring if not self._lora_busy(n)]:
            self.runner.drop_lora(name)
            self._retiring.discard(name)

    @property
    def loras(self) -> list[str]:
        return [n for n in self.runner.loras if n not in self._retiring]

    @property
    def weight_bytes(self) -> int:
        return weight_numel(self.model_config) * torch.empty((), dtype=self.dtype).element_size()

    # -- requests ------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> Request:
        params = params or SamplingParams()
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        else:
            ids = list(prompt)
            vs = self.model_config.vocab_size
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vs]
            if bad:
                raise ValueError(f"prompt token ids must be integers in [0, {vs}); got {bad[:5]}")
        vs = self.model_config.vocab_size
        for what, tids in (("logit_bias", params.logit_bias), ("allowed_token_ids", params.allowed_token_ids)):
            if tids and max(tids) >= vs:
                raise ValueError(f"{what} token id {max(tids)} is outside the vocabulary (size {vs})")
        if params.n != 1:
            raise ValueError("the engine takes n=1 requests; fan out n>1 before add_request (LLM.generate does)")
        if params.lora is not None and (params.lora not in self.runner.loras or params.lora in self._retiring):
            raise ValueError(f"LoRA adapter {params.lora!r} is not loaded for model {self.model_name!r}"
                             f"{'; loaded: ' + ', '.join(self.loras) if self.loras else ''}")
        req = Request(request_id, ids, params, model=self.model_name, eos_token_ids=self.eos_token_ids,
                      max_model_len=self.max_model_len)
        if params.lora is not None:
            req.lora_uid = self.runner.loras[params.lora].uid
        if params.grammar is not None:
            req.matcher = self._matcher(params.grammar)
        if params.bad_words:
            req.bad_word_ids = bad_word_ids(self.tokenizer, params.bad_words)
        if arrival_time is not None:
            req.arrival_time = arrival_time
        req.detok = IncrementalDetokenizer(self.tokenizer, params.stop, params.skip_special_tokens,
                                           params.include_stop_str_in_output)
        self.scheduler.add(req)
        return req

    def _matcher(self, grammar: str):
        """A fresh llguidance matcher of `grammar` over this model's vocabulary (the tokenizer's llguidance form made
        once, on first use: ~0.35 s for a 49k vocabulary). ValueError: the grammar cannot be used."""
        import llguidance
        import llguidance.hf

        if self._grammar_tokenizer is None:
            try:
                self._grammar_tokenizer = llguidance.hf.from_tokenizer(
                    self.tokenizer, n_vocab=self.model_config.vocab_size, eos_token=list(self.eos_token_ids) or None)
            except ValueError as e:
                raise ValueError(f"this model's tokenizer cannot run a grammar: {e}") from None
        m = llguidance.LLMatcher(self._grammar_tokenizer, grammar, log_level=0)
        if m.is_error():
            raise ValueError(f"the grammar cannot be used: {m.get_error()}")
        return m

    def abort_request(self, request_id: str) -> None:
        req = self.scheduler.abort(request_id)
        if req is not None:
            self._aborted.append(req)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._aborted) or self._inflight is not None

    def stats(self) -> dict[str, int]:
        return self.scheduler.stats()

    def stop_requests(self, stopped: list[tuple[Request, str]]) -> None:
        """Finish the requests `detokenize` found a stop string in, freeing their KV. One that finished (or was
        aborted) meanwhile is left alone: a pipelined caller stops them after the next step."""
        now = time.monotonic()
        for req, stop in stopped:
            if self.scheduler.requests.get(req.request_id) is req:
                req.stop_reason = stop
                self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED)
                req.finished_time = req.finished_time or now

    # -- the step loop -------------------------------------------------------------------------------
    def take_aborted(self) -> list[TokenOutput]:
        """Final outputs of requests aborted since the last step (no step runs for them)."""
        outputs = [self._token_output(r, 0) for r in self._aborted]
        self._aborted = []
        return outputs

    def step(self, batch: list | None = None, swap_out=()) -> list[RequestOutput]:
        """Run one step and detokenize what it produced (`step_tokens`, then its text inline)."""
        outputs, stopped = detokenize(self.step_tokens(batch, swap_out))
        self.stop_requests(stopped)
        return outputs

    def step_tokens(self, batch: list | None = None, swap_out=(), on_launch=None,
                    launch: bool = False) -> list[TokenOutput]:
        """Run one step; return the token ids it produced (no text: `detokenize` makes it, and the caller must
        pass the stops it finds to `stop_requests` before the step after next). `batch`: [(request, tokens)] a
        multi-model policy built (and `swap_out`, this model's requests it preempts): exactly that runs. None:
        the scheduler's own batch, everything the builder admits. With overlap, a decode step is queued on the
        GPU and its tokens are returned by the next call, which first queues the step after it (so the GPU never
        waits for the host between decode steps). `on_launch`: called once this call's device work is queued,
        before the host waits for it (`ModelRunner.execute`). `launch` (a pipelining multi-model engine): a planned
        batch the runner can run overlapped is queued (`_inflight`) and `on_launch` called, its tokens not read: the
        caller then continues it (`continue_inflight`) or reads it (`complete_inflight`) before anything else."""
        outputs = self.take_aborted()
        self.t_read = self.device_s = None
        if self._inflight is not None:
            if batch is not None:
                raise RuntimeError("a planned batch needs overlap off (its plan was built before the step in flight)")
            prev, self._inflight = self._inflight, None
            nxt = self.scheduler.continuation(prev.out, self.runner.can_launch)
            if nxt is not None:
                self._inflight = self._launch(nxt, prev)
                if on_launch is not None:
                    on_launch()
            outputs += self._complete(prev.out, self.runner.read(prev))
            if nxt is not None:
                return outputs
        out = self.scheduler.schedule() if batch is None else self.scheduler.commit(batch, swap_out)
        self.last_out = out  # what ran (the multi-model cost model learns from it)
        if out.empty:
            return outputs
        if (self.overlap or launch) and self.runner.can_launch(out):
            self._inflight = self._launch(out, None)
            if launch and on_launch is not None:
                on_launch()
            return outputs
        self._mark_scheduled(out)
        return outputs + self._complete(out, self._read(self.runner.execute(out, on_launch)))

    def continue_inflight(self, nxt: SchedulerOutput, on_launch=None) -> list[TokenOutput]:
        """Pipelined (a multi-model engine): queue `nxt` -- `scheduler.continuation` of the step in flight, its KV
        blocks already grown -- fed with that step's sampled ids on the device, call `on_launch`, then read the step
        before and apply its tokens (returned). `nxt` is in flight after."""
        prev = self._inflight
        self._inflight = self._launch(nxt, prev)
        self.last_out = nxt  # what ran
        if on_launch is not None:
            on_launch()
        res = self._read(self.runner.read(prev))
        return self.take_aborted() + self._complete(prev.out, res)

    def complete_inflight(self) -> list[TokenOutput]:
        """Read the step in flight and apply its tokens (none in flight: nothing)."""
        prev, self._inflight = self._inflight, None
        if prev is None:
            return []
        return self._complete(prev.out, self._read(self.runner.read(prev)))

    def _read(self, res):
        """`res`, the tokens of a step just read: when (`t_read`) and its device time (`device_s`) noted."""
        self.t_read = (time.perf_counter(), time.thread_time())
        self.device_s = res.device_s
        return res

    @staticmethod
    def _mark_scheduled(out: SchedulerOutput) -> None:
        now = time.monotonic()
        for c in out.chunks:
            if c.request.first_scheduled_time is None:
                c.request.first_scheduled_time = now

    def _launch(self, out: SchedulerOutput, prev: LaunchedDecode | None) -> LaunchedDecode:
        self._mark_scheduled(out)
        ids = rows = None
        if prev is not None:  # row i's input is the token prev sampled for the same request
            ids = prev.tokens
            at = {c.request.request_id: i for i, c in enumerate(prev.out.chunks)}
            rows = [at[c.request.request_id] for c in out.chunks]
            if rows == list(range(len(prev.out.chunks))):
                rows = None  # (the same rows: fed as they are; else gathered on the device, with the inputs)
        return self.runner.launch_decode(out, ids, timed=self.time_launches, rows=rows)

    def _complete(self, out: SchedulerOutput, res) -> list[TokenOutput]:
        outputs = []
        if res.prompt_logprobs:  # (before `update`: a request it finishes keeps them)
            for c in out.chunks:
                c.request.prompt_logprobs += res.prompt_logprobs.get(c.request.request_id, ())
        for c in out.chunks if res.embeddings else ():
            c.request.embedding = res.embeddings.get(c.request.request_id, c.request.embedding)
        got = self.scheduler.update(out, res.sampled)
        now = time.monotonic()
        for req in got:
            if req.matcher is not None:  # (the token was drawn under its mask: always accepted)
                req.matcher.consume_token(req.output_token_ids[-1])
            if req.first_token_time is None:
                req.first_token_time = now
            req.last_token_time = now
            if req.request_id in res.logprobs:
                req.output_logprobs.append(res.logprobs[req.request_id])
            outputs.append(self._token_output(req, 1))
        return outputs

    @staticmethod
    def _token_output(req: Request, num_new: int) -> TokenOutput:
        if req.finished:
            req.finished_time = req.finished_time or time.monotonic()
        m = {"arrival_time": req.arrival_time}
        if req.load_s:
            m["load_s"] = req.load_s
        for k in ("first_scheduled_time", "first_token_time", "last_token_time", "finished_time"):
            if getattr(req, k) is not None:
                m[k] = getattr(req, k)
        return TokenOutput(req, len(req.output_token_ids), num_new, req.status, req.stop_reason, m)
