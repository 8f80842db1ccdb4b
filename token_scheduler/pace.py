"""The paced engine kind: the LLMEngine interface, producing tokens at a fixed pace and no model.

A worker hosts paced models (engine kind "pace") through the same surface as real ones: `PacedModels` is the
kind's multi-model engine, with `MultiModelEngine`'s methods over one `PaceEngine` per model. It lets the serving stack (HTTP API, worker protocol, router) be tested and its overhead measured apart from
any model: steps come on a fixed cadence of `s_per_token` (plus `prefill_s_per_token` per newly admitted
prompt token), each yielding one token for every running request, like a batched decode step. Token ids are
a pure function of (seed, prompt) when a seed is given or sampling is greedy, so outputs are reproducible.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache

from token_scheduler.policies.batching import MAX_NUM_SEQS
from token_scheduler.policies.slo import ModelSLO
from token_scheduler.request import CompletionOutput, RequestOutput, SamplingParams
from token_scheduler.tokenizer import ByteTokenizer, load_tokenizer


@dataclass(frozen=True)
class PaceConfig:
    """One paced model (the engine options of kind "pace")."""

    model: str | None = None  # an HF directory for its tokenizer; None: ByteTokenizer
    s_per_token: float = 0.02  # one decode step
    prefill_s_per_token: float = 0.0  # added to a step per prompt token it admits
    max_num_seqs: int = MAX_NUM_SEQS  # a real engine's default
    max_model_len: int = 4096
    stamp: bool = False  # token text = emission wall-clock time (the API-overhead benchmark)


@lru_cache(maxsize=16)
def tokens_of(model: str | None):
    """(tokenizer, plain token ids) of a directory: read once per process (the scan of the vocabulary takes
    seconds for a large one), so registering a paced model on the step thread is quick after `prepare`."""
    tok = load_tokenizer(model)
    return tok, _plain_token_ids(tok)


def _plain_token_ids(tok, limit: int = 512) -> list[int]:
    """Token ids that decode to short plain words, so generated text looks like text."""
    if isinstance(tok, ByteTokenizer):
        return [ord(c) + 3 for c in "abcdefghijklmnopqrstuvwxyz     "]
    special = set(getattr(tok, "all_special_ids", []) or [])
    out = []
    for i in range(min(getattr(tok, "vocab_size", 0) or len(tok), 50_000)):
        if i in special:
            continue
        s = tok.decode([i])
        if s.strip().isalpha() and s.isascii():
            out.append(i)
            if len(out) >= limit:
                break
    return out or [i for i in range(min(len(tok), 1000)) if i not in special]


@dataclass
class _Req:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    rng: random.Random
    out_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of text already reported
    finish_reason: str | None = None


class PaceEngine:
    block_size = 16  # KV blocks are only counted (stats), as a real engine's would be

    def __init__(self, cfg: PaceConfig = PaceConfig()):
        self.tokenizer, self._vocab = tokens_of(cfg.model)
        self.max_model_len = cfg.max_model_len
        self.s_per_token = cfg.s_per_token
        self.prefill_s_per_token = cfg.prefill_s_per_token
        self.max_num_seqs = cfg.max_num_seqs
        self.num_kv_blocks = cfg.max_num_seqs * cfg.max_model_len // self.block_size
        # stamp: each token's text is "@<wall-clock time its step emitted it>", so a client on the same host
        # can measure emission-to-arrival latency per token (the API-overhead benchmark does).
        self.stamp = cfg.stamp
        self.steps = 0  # steps run (a step that only answers aborts is none)
        self._waiting: deque[_Req] = deque()
        self._running: dict[str, _Req] = {}
        self._aborted: list[_Req] = []
        self._last_step = time.monotonic()

    # --- the LLMEngine interface ---
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        ids = self.tokenizer.encode(prompt, add_special_tokens=False) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("prompt must contain at least one token")
        if params.prompt_logprobs is not None:
            raise ValueError("a paced model has no logits: the prompt's logprobs (echo with logprobs) cannot be given")
        if params.embed:
            raise ValueError("a paced model has no hidden states: it cannot embed")
        if params.grammar is not None:
            raise ValueError("a paced model has no logits: its output cannot be held to a schema (response_format, "
                             "tools)")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt is {len(ids)} tokens; the model's context is {self.max_model_len}")
        if request_id in self._running or any(r.rid == request_id for r in self._waiting):
            raise ValueError(f"duplicate request id {request_id!r}")
        if params.seed is not None or params.greedy:
            h = hashlib.sha256(repr((params.seed, ids)).encode()).digest()
            rng = random.Random(int.from_bytes(h[:8], "little"))
        else:
            rng = random.Random()
        self._waiting.append(_Req(request_id, ids, params, rng))

    def abort_request(self, request_id: str) -> None:
        r = self._running.pop(request_id, None)
        if r is None:
            for w in self._waiting:
                if w.rid == request_id:
                    self._waiting.remove(w)
                    r = w
                    break
        if r is not None:
            r.finish_reason = "abort"
            self._aborted.append(r)

    def has_unfinished_requests(self) -> bool:
        return bool(self._running or self._waiting or self._aborted)

    def stats(self) -> dict:
        used = sum(-(-(len(r.prompt_ids) + len(r.out_ids)) // self.block_size) for r in self._running.values())
        return {"num_running": len(self._running), "num_waiting": len(self._waiting), "num_swapped": 0,
                "kv_blocks_used": used, "kv_blocks_total": self.num_kv_blocks}

    def step(self, on_launch=None) -> list[RequestOutput]:
        """`on_launch`: called before the pace's wait, as a real engine calls it once its forward is queued."""
        outs = [self._output(r, []) for r in self._aborted]
        self._aborted.clear()
        admitted = 0
        now = time.monotonic()
        if not self._running:  # idle until now: this step starts now
            self._last_step = now
        while self._waiting and len(self._running) < self.max_num_seqs:
            r = self._waiting.popleft()
            self._running[r.rid] = r
            admitted += len(r.prompt_ids)
        if not self._running:
            return outs
        # A fixed cadence, like a device whose step takes s_per_token: the host's own work between steps
        # (outputs, protocol) overlaps the next step instead of stretching it.
        due = max(self._last_step + self.s_per_token, now) + admitted * self.prefill_s_per_token
        if on_launch is not None:
            on_launch()
        time.sleep(max(0.0, due - time.monotonic()))
        self._last_step = due
        self.steps += 1
        # A batched step emits every running request's token at once: one stamp for all of them, taken
        # before any output is built (building outputs is the serving side's cost, not the engine's)
        stamp = f"@{time.time():.6f}" if self.stamp else ""
        for r in list(self._running.values()):
            outs.append(self._advance(r, stamp))
        return outs

    # --- internals ---
    def _advance(self, r: _Req, stamp: str = "") -> RequestOutput:
        p = r.params
        tok = r.rng.choice(self._vocab)
        r.out_ids.append(tok)
        if p.logprobs is not None:
            lp = {tok: -0.25}
            for k, alt in enumerate(self._vocab[: p.logprobs + 1]):
                if len(lp) > p.logprobs:
                    break
                lp.setdefault(alt, -1.0 - k)
            r.logprobs.append(lp)
        if self.stamp:
            r.text += stamp
        else:
            r.text = self.tokenizer.decode(r.out_ids, skip_special_tokens=r.params.skip_special_tokens)
        for s in p.stop or []:
            i = r.text.find(s, max(0, r.sent - len(s)))
            if i >= 0:
                r.text, r.finish_reason = r.text[: i + len(s) if p.include_stop_str_in_output else i], "stop"
                break
        if r.finish_reason is None:
            if tok in (p.stop_token_ids or []):
                r.finish_reason = "stop"
            elif len(r.out_ids) >= min(p.max_tokens or 1 << 30, self.max_model_len - len(r.prompt_ids)):
                r.finish_reason = "length"
        if r.finish_reason is not None:
            self._running.pop(r.rid, None)
        return self._output(r, [tok])

    def _output(self, r: _Req, delta_ids: list[int]) -> RequestOutput:
        delta_text = r.text[r.sent:] if len(r.text) >= r.sent else ""
        r.sent = max(r.sent, len(r.text))
        lps = r.params.logprobs is not None
        comp = CompletionOutput(index=0, text=r.text, token_ids=list(r.out_ids), finish_reason=r.finish_reason,
                                logprobs=list(r.logprobs) if lps else None)
        return RequestOutput(request_id=r.rid, prompt_token_ids=r.prompt_ids, outputs=[comp],
                             finished=r.finish_reason is not None, delta_text=delta_text, delta_token_ids=delta_ids,
                             delta_logprobs=r.logprobs[len(r.logprobs) - len(delta_ids):] if lps else None,
                             first=bool(delta_ids) and len(r.out_ids) == len(delta_ids))


class PacedModels:
    """The pace kind's multi-model engine: `MultiModelEngine`'s surface (the part a worker's hosting calls) over
    one PaceEngine per model. No weights, so no pool: every model is resident, residency hints are void, and
    nothing is ever switched. Busy models take turns, one step each, as the pooled engine's models do."""

    memory = None  # no weights: no device memory to manage

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.engines: dict[str, PaceEngine] = {}
        self.trace: deque[str] = deque(maxlen=4096)  # model of the latest steps, in order
        self.timing = {"steps": 0}
        self.steps_per_model: dict[str, int] = {}
        self._last_run: dict[str, int] = {}  # model -> the step it last ran
        self.events: deque[dict] = deque(maxlen=1024)
        # [start (wall), model, steps, seconds] of each turn, as the pooled engine's (the dashboard's "which model
        # ran" strip); a paced model's turn is a run of its steps
        self.timeline: deque[list] = deque(maxlen=1024)

    @staticmethod
    def prepare(cfg: PaceConfig) -> None:
        """Off the step thread: read the tokenizer, so `add_model` does not hold the other models' steps."""
        tokens_of(cfg.model)

    def add_model(self, name: str, cfg: PaceConfig, slo: ModelSLO | None = None) -> None:
        if name in self.engines:
            raise ValueError(f"model {name!r} is already hosted")
        self.engines[name] = PaceEngine(cfg)
        self.steps_per_model[name] = 0
        self._event("register", name)

    def remove_model(self, name: str) -> None:
        """Stop hosting `name`; its unfinished requests are dropped (the caller answers them)."""
        if self.engines.pop(name, None) is None:
            raise ValueError(f"unknown model {name!r}; hosted: {sorted(self.engines)}")
        self.steps_per_model.pop(name, None)
        self._last_run.pop(name, None)
        self._event("unregister", name)

    # residency: every paced model is always resident
    def set_pinned(self, name: str, pinned: bool) -> None:
        pass

    def set_keep_alive(self, name: str, seconds: float | None) -> None:
        pass

    def set_slo(self, name: str, slo: ModelSLO) -> None:
        pass  # (paced models run in turn, weighed by no SLO)

    def preload(self, name: str) -> bool:
        return True

    def expire(self) -> None:
        pass

    def tick(self) -> None:
        pass

    def evict_when_idle(self, name: str) -> None:
        pass

    def evicting(self) -> set[str]:
        return set()

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    model: str | None = None) -> None:
        if model not in self.engines:
            raise ValueError(f"unknown model {model!r}; hosted: {sorted(self.engines)}")
        self.engines[model].add_request(request_id, prompt, params or SamplingParams())

    def abort_request(self, request_id: str) -> None:
        for eng in self.engines.values():  # a no-op in every engine but the request's
            eng.abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return any(e.has_unfinished_requests() for e in self.engines.values())

    def step(self, on_launch=None) -> list[RequestOutput]:
        """One step of the busy model that ran least recently."""
        busy = [n for n, e in self.engines.items() if e.has_unfinished_requests()]
        if not busy:
            return []
        name = min(busy, key=lambda n: self._last_run.get(n, -1))
        eng = self.engines[name]
        n, t0 = eng.steps, time.time()
        outs = eng.step(on_launch)
        if eng.steps > n:  # else it only answered aborts
            dur, tl = time.time() - t0, self.timeline
            if tl and tl[-1][1] == name:
                tl[-1][2] += 1
                tl[-1][3] += dur
            else:
                tl.append([t0, name, 1, dur])
            self._last_run[name] = self.timing["steps"]
            self.trace.append(name)
            self.timing["steps"] += 1
            self.steps_per_model[name] += 1
        return outs

    # A paced model has no device step to hide host work behind: its text is made at its step, and the pipeline a
    # worker runs (step_tokens on the step thread, detokenize beside the next step) passes it through.
    def step_tokens(self, on_launch=None) -> list[RequestOutput]:
        return self.step(on_launch)

    @staticmethod
    def detokenize(outs: list[RequestOutput]) -> tuple[list[RequestOutput], list]:
        return outs, []

    def stop_requests(self, stopped: list) -> None:
        pass  # its stop strings end requests at the step

    def estimate(self, name: str) -> dict[str, float]:
        eng = self.engines[name]
        return {"prefill_s_per_token": eng.prefill_s_per_token, "load_s": 0.0, "resident": 1.0}

    def snapshot(self) -> dict:
        models = {}
        for name, eng in self.engines.items():
            s = eng.stats()
            models[name] = {"state": "resident", "waiting": s["num_waiting"], "running": s["num_running"],
                            "swapped": 0, "oldest_wait_s": 0.0, "kv_pages_used": s["kv_blocks_used"],
                            "kv_swapped": 0, "steps": self.steps_per_model.get(name, 0)}
        return {"device": self.device, "active": self.trace[-1] if self.trace else None,
                "registered": sorted(self.engines), "resident": sorted(self.engines), "prefetching": [],
                "switches": 0, "switch_stall_s": 0.0, "steps": self.timing["steps"], "kv_swapped_out": 0,
                "vram": {"budget_bytes": 0, "weights_bytes": 0, "kv_bytes": 0, "free_bytes": 0,
                         "kv_pages_total": 0, "kv_pages_used": 0},
                "host_cache_bytes": 0, "models": models}

    def close(self) -> None:
        self.engines.clear()

    def _event(self, kind: str, model: str) -> None:
        self.events.append({"kind": kind, "model": model, "t": time.time()})
