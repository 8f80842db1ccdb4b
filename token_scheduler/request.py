"""Request state shared by the scheduler (policy) and the runner (mechanism).

A request is a token sequence with a cursor: `num_computed_tokens` of its `all_token_ids` have KV in
the cache. Prefill, chunked prefill and decode are one rule: each step computes some of the
not-yet-computed tokens; when the cursor reaches the end, the step also samples the next token.
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import Any

from token_scheduler.block_manager import chain_hashes, hash_extra


@dataclass
class SamplingParams:
    """What a caller asks of one generation (vLLM's names and meanings)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to the model's context
    min_tokens: int = 0
    logprobs: int | None = None  # top-k logprobs to return per generated token (0 = sampled token only)
    prompt_logprobs: int | None = None  # the same for each prompt token after the first (vLLM's; OpenAI's echo)
    skip_special_tokens: bool = True
    # OpenAI's logit_bias: token id -> a value in [-100, 100] added to its logit before sampling (the logprobs
    # returned are the model's own, as vLLM's are)
    logit_bias: dict[int, float] | None = None
    # (vLLM's) only these token ids may be drawn: every other's logit is -inf before sampling (the logprobs returned
    # are the model's own, as with logit_bias)
    allowed_token_ids: list[int] | None = None
    # (vLLM's) a stop string that ends the output is kept at its end instead of cut
    include_stop_str_in_output: bool = False
    # (vLLM's) words never to be generated: each word's tokens (alone and after a space) are matched against the end
    # of the output, and the token that would complete one is not drawn (Request.bad_word_ids, made by the engine)
    bad_words: list[str] | None = None
    # an llguidance grammar (its JSON; e.g. made from a JSON schema, response_format): each token drawn keeps the
    # output a prefix of a string the grammar accepts, and once it is whole only EOS may follow
    grammar: str | None = None
    # an embedding, not a generation (vLLM's pooling; OpenAI's /v1/embeddings): the request ends with its prefill and
    # returns the last prompt token's final hidden state (after the model's last norm, fp32; Request.embedding).
    # The step still draws that one token, greedily, as a generation's first (the caller drops it).
    embed: bool = False
    # the name of a LoRA adapter hosted with the model (EngineConfig.lora_modules, LLMEngine.add_lora) whose deltas
    # this request's projections add (vLLM's LoRARequest); None: the base model
    lora: str | None = None
    # (vLLM's) prefix caching shares KV only between requests of the same salt: a tenant's prompts are never served
    # from another tenant's cache (nor timed against it). None: shared with every request of no salt.
    cache_salt: str | None = None

    def __post_init__(self) -> None:
        if self.embed:
            self.max_tokens, self.temperature = 1, 0.0
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == 0:
            self.top_k = -1
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
        if self.bad_words is not None:
            self.bad_words = list(self.bad_words) or None
        if self.logit_bias is not None:  # (JSON carries the ids as strings)
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()} or None
            except (TypeError, ValueError):
                raise ValueError("logit_bias maps token ids (integers) to numbers") from None
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(msg)

        if self.n < 1:
            bad(f"n must be at least 1, got {self.n}")
        if self.temperature < 0:
            bad(f"temperature must be non-negative, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            bad(f"top_k must be -1 (off) or a positive integer, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            bad(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            bad(f"repetition_penalty must be positive, got {self.repetition_penalty}")
        if not -2 <= self.presence_penalty <= 2:
            bad(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2 <= self.frequency_penalty <= 2:
            bad(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            bad(f"min_tokens must be non-negative, got {self.min_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            bad(f"logprobs must be in [0, 20], got {self.logprobs}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            bad(f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}")
        if any(not s for s in self.stop):  # type: ignore[union-attr]
            bad("stop strings must be non-empty")
        if any(not w.strip() for w in self.bad_words or ()):
            bad("bad_words must be non-empty words")
        if self.allowed_token_ids is not None and (not self.allowed_token_ids or min(self.allowed_token_ids) < 0):
            bad("allowed_token_ids must be a non-empty list of token ids (non-negative integers)")
        for tid, v in (self.logit_bias or {}).items():
            if tid < 0:
                bad(f"logit_bias token ids must be non-negative, got {tid}")
            if not -100 <= v <= 100:  # (NaN too)
                bad(f"logit_bias values must be in [-100, 100], got {v} for token {tid}")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def adjusts_logits(self) -> bool:
        """Whether the sampler changes this request's logits before drawing: penalties, logit_bias,
        allowed_token_ids, a min_tokens that forbids stop tokens while the output is shorter, or a grammar."""
        return (self.needs_penalties or self.logit_bias is not None or self.allowed_token_ids is not None
                or self.min_tokens > 0 or self.grammar is not None or self.bad_words is not None)


def bad_word_ids(tokenizer, words: list[str]) -> list[list[int]]:
    """The token sequences of `words` the sampler keeps from being completed (vLLM's bad_words): each word as its
    tokens, and again after a space when that gives another first token in as many tokens (the word inside text)."""
    seqs: list[list[int]] = []
    for w in words:
        alone = tokenizer.encode(w.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + w.lstrip(), add_special_tokens=False)
        for ids in (alone, spaced) if spaced[:1] != alone[:1] and len(spaced) == len(alone) else (alone,):
            if ids and ids not in seqs:
                seqs.append(ids)
    return seqs


def l2_normalize(v: list[float]) -> list[float]:
    """An embedding over its Euclidean norm, as embeddings are returned (a zero vector as it is)."""
    n = math.sqrt(math.fsum(x * x for x in v))
    return [x / n for x in v] if n > 0 else list(v)


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    SWAPPED = 2  # preempted; its KV lives in the host pool
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return {3: "stop", 4: "length", 5: "abort"}.get(int(self))


# eq=False: a request is itself, compared by identity. The generated __eq__ compared every field (prompt ids,
# outputs, ...) at each `req in queue` of the scheduler: an embeddings request of 2,048 inputs took 40 s of the
# worker's step thread there, every other request on the engine waiting behind it
@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    model: str = "default"
    eos_token_ids: tuple[int, ...] = ()
    max_model_len: int = 1 << 30
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0

    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_logprobs: list[dict[int, float]] = field(default_factory=list)  # prompt tokens 1.. (prompt_logprobs)
    embedding: list[float] | None = None  # (SamplingParams.embed) set by the step that ends its prefill
    matcher: Any = None  # (SamplingParams.grammar) its llguidance matcher, fed each token the request makes
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    block_ids: list[int] = field(default_factory=list)  # GPU KV blocks, in order
    host_block_ids: list[int] = field(default_factory=list)  # host KV blocks while SWAPPED
    stop_reason: int | str | None = None
    # Timing, filled by the engine (monotonic seconds).
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    # Seconds it waited for its model's weights to come into VRAM (a load, or a prefetch landing, that a step of its
    # model waited for before its first token): Ollama's load_duration (controller/api/ollama.py)
    load_s: float = 0.0
    # The engine's per-request state lives on the request, so it goes when the request goes (the scheduler's
    # `requests` is the one registry of a request in an engine): its detokenizer state, and the sampler's
    # generator of a seeded request.
    detok: Any = None
    generator: Any = None
    # Prefix caching (BatchScheduler): the chained hashes of its full blocks so far, how many of its blocks are
    # offered to the cache, and how many prompt tokens its first start found there (usage's cached_tokens).
    block_hashes: list = field(default_factory=list)
    num_registered_blocks: int = 0
    num_cached_tokens: int | None = None
    kv_view: Any = None  # (prefix caching) the allocator of its blocks, which knows which are shared
    lora_uid: int | None = None  # (SamplingParams.lora) the adapter's load: one reloaded under its name is another
    bad_word_ids: list[list[int]] = field(default_factory=list)  # (SamplingParams.bad_words) their token sequences

    @property
    def kv_tokens_freed(self) -> int:
        """Computed tokens whose KV preempting it would free: all, less those in the cached prefix blocks another
        request holds too (a policy counts these when it plans a preemption)."""
        c, kv = self.num_computed_tokens, self.kv_view
        if kv is None or not self.block_ids:
            return c
        return max(0, c - kv.shared(self.block_ids) * kv.block_size)

    @property
    def kv_tokens_recomputed(self) -> int:
        """Computed tokens it would compute again were its KV dropped: all, less those in the full blocks it offered
        the prefix cache, which its restart finds there unless they are evicted meanwhile (`_reuse_prefix`: not with
        prompt logprobs). A policy choosing whose KV to drop counts these."""
        c, kv = self.num_computed_tokens, self.kv_view
        if kv is None or self.sampling_params.prompt_logprobs is not None:
            return c
        return max(0, c - self.num_registered_blocks * kv.block_size)

    def hashes_to(self, n_blocks: int, block_size: int) -> list:
        """The chained hashes of its first `n_blocks` full blocks (made once each, kept), apart by its adapter's load
        and its cache salt."""
        if len(self.block_hashes) < n_blocks:
            sp = self.sampling_params
            chain_hashes(self.block_hashes, self.all_token_ids, n_blocks, block_size,
                         hash_extra(sp.lora, sp.cache_salt, self.lora_uid))
        return self.block_hashes[:n_blocks]

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("prompt must contain at least one token")
        # an embedding's prompt may fill the context (vLLM's pooling takes max_model_len tokens): its one drawn token
        # (SamplingParams.embed) is dropped, never fed back, so it needs no place in the context
        if len(self.prompt_token_ids) > self.max_model_len - (not self.sampling_params.embed):
            raise ValueError(
                f"prompt is {len(self.prompt_token_ids)} tokens; the model's context is {self.max_model_len}"
            )

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_at(self, i: int) -> int:
        p = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < p else self.output_token_ids[i - p]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens

    @property
    def max_output_tokens(self) -> int:
        room = self.max_model_len - self.num_prompt_tokens
        mt = self.sampling_params.max_tokens
        return room if mt is None else min(mt, room)

    @property
    def finished(self) -> bool:
        return self.status.finished

    def check_stop_token(self) -> None:
        """Finish on EOS / stop token ids / length after a token was appended (stop strings: detokenizer)."""
        sp = self.sampling_params
        tok = self.output_token_ids[-1]
        n = len(self.output_token_ids)
        if n >= sp.min_tokens:
            if not sp.ignore_eos and tok in self.eos_token_ids:
                self.status, self.stop_reason = RequestStatus.FINISHED_STOPPED, None
                return
            if tok in sp.stop_token_ids:  # type: ignore[operator]
                self.status, self.stop_reason = RequestStatus.FINISHED_STOPPED, tok
                return
        if n >= self.max_output_tokens:
            self.status = RequestStatus.FINISHED_LENGTH


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, float]] | None = None  # one {token_id: logprob} per generated token


@dataclass
class TokenOutput:
    """One request's share of a step, as the step thread leaves it: token ids, no text. `detokenizer.detokenize`
    makes the RequestOutput (text, stop strings) -- inline in `LLMEngine.step`, or while the next step runs (the
    worker). `request` is the engine's own: read only its fixed fields and its lists up to `num_output_tokens`
    (later steps may be appending to them meanwhile)."""

    request: Request
    num_output_tokens: int  # len(request.output_token_ids) when this was made
    num_new: int  # of those, the ones this step added (0: a final output with no step, e.g. an abort)
    status: RequestStatus  # when this was made
    stop_reason: int | str | None
    metrics: dict[str, float]


@dataclass
class RequestOutput:
    """What the engine reports for a request after a step (cumulative, plus the delta since last report)."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    model: str = "default"
    prompt: str | None = None
    # Streaming: text, token ids and (when asked for) logprobs produced since the previous RequestOutput of this
    # request. A streaming reader reads only these: the cumulative lists above may run ahead of this output when
    # it was made while a later step ran.
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[dict[int, float]] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    # (prompt_logprobs asked) each prompt token's {token_id: logprob, top ones...}, None for the first (nothing
    # precedes it): on the output carrying the request's first token -- the prompt is whole by then -- only
    prompt_logprobs: list[dict[int, float] | None] | None = None
    embedding: list[float] | None = None  # (SamplingParams.embed) on its one, final output
    # (prefix caching; vLLM's) prompt tokens whose KV its first start found cached, once it has started
    num_cached_tokens: int | None = None
    # whether this output carries the request's first output tokens (the cumulative lists, which may have run
    # ahead, cannot tell: a reader that compared their length with the delta's missed it under load)
    first: bool = False
