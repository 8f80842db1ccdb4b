"""PaceEngine: the LLMEngine interface, producing tokens at a fixed pace and no model.

It lets the serving stack (HTTP API, worker protocol, router) be tested and its overhead measured apart from
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
from pathlib import Path

from token_scheduler.request import CompletionOutput, RequestOutput, SamplingParams


class ByteTokenizer:
    """Bytes as tokens (ids 3..258); 0 pad, 1 bos, 2 eos. Enough of the HF tokenizer API for the server."""

    eos_token_id = 2
    bos_token_id = 1
    pad_token_id = 0
    vocab_size = 259
    chat_template = "bytes"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text)}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = True,
                            **_: object) -> str | list[int]:
        text = "".join(f"<|{m['role']}|>{m.get('content') or ''}\n" for m in messages)
        if add_generation_prompt:
            text += "<|assistant|>"
        return self.encode(text) if tokenize else text


def load_tokenizer(path: str | Path | None):
    """The model directory's HF tokenizer, or ByteTokenizer when there is no directory."""
    if path is None:
        return ByteTokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


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
    def __init__(self, model: str | Path | None = None, s_per_token: float = 0.02, prefill_s_per_token: float = 0.0,
                 max_num_seqs: int = 64, max_model_len: int = 4096, block_size: int = 16,
                 num_kv_blocks: int | None = None, seed: int = 0, tokenizer=None, stamp: bool = False):
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model)
        self.max_model_len = max_model_len
        self.s_per_token = s_per_token
        self.prefill_s_per_token = prefill_s_per_token
        self.max_num_seqs = max_num_seqs
        self.block_size = block_size
        self.num_kv_blocks = num_kv_blocks or max_num_seqs * max_model_len // block_size
        self._vocab = _plain_token_ids(self.tokenizer)
        self._seed = seed
        # stamp: each token's text is "@<wall-clock time its step emitted it>", so a client on the same host
        # can measure emission-to-arrival latency per token (the API-overhead benchmark does).
        self.stamp = stamp
        self._waiting: deque[_Req] = deque()
        self._running: dict[str, _Req] = {}
        self._aborted: list[_Req] = []
        self._last_step = time.monotonic()

    # --- the LLMEngine interface ---
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        ids = self.tokenizer.encode(prompt, add_special_tokens=False) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("prompt must contain at least one token")
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

    def step(self) -> list[RequestOutput]:
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
        time.sleep(max(0.0, due - time.monotonic()))
        self._last_step = due
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
            r.text = self.tokenizer.decode(r.out_ids, skip_special_tokens=True)
        for s in p.stop or []:
            i = r.text.find(s, max(0, r.sent - len(s)))
            if i >= 0:
                r.text, r.finish_reason = r.text[:i], "stop"
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
        comp = CompletionOutput(index=0, text=r.text, token_ids=list(r.out_ids), finish_reason=r.finish_reason,
                                logprobs=list(r.logprobs) if r.params.logprobs is not None else None)
        return RequestOutput(request_id=r.rid, prompt_token_ids=r.prompt_ids, outputs=[comp],
                             finished=r.finish_reason is not None, delta_text=delta_text, delta_token_ids=delta_ids)
