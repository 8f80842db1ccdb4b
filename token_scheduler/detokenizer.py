"""Incremental detokenization and stop strings: token outputs in, RequestOutputs out.

The step loop only makes token ids (`TokenOutput`); `detokenize` turns them into text. `LLMEngine.step` calls it
inline; a worker calls it on its event loop while the next step runs on the step thread (controller/worker.py),
as vLLM v1's OutputProcessor runs beside its engine core. A stop string ends the request's output at once (text
cut, finish_reason "stop"); the engine still holds the request until its owner calls `stop_requests` with what
`detokenize` returned. Pipelined, that is after one more step, whose token for the request is never emitted:
its detokenizer is `done`.

Text is released only once the decoded bytes form whole UTF-8 characters (a trailing U+FFFD means a
character is still split across tokens; at the end, one the last tokens only began is dropped), and, while a request has stop strings, the last
`len(longest stop) - 1` characters are held back so a stop string is never streamed before it is cut.
"""

from __future__ import annotations

import time

from token_scheduler.request import CompletionOutput, Request, RequestOutput, TokenOutput


class IncrementalDetokenizer:
    """One request's text, decoded as its tokens come (`Request.detok`). Touched only by whoever calls
    `detokenize` for the request's engine: one thread at a time."""

    def __init__(self, tokenizer, stop: list[str] | None = None, skip_special_tokens: bool = True,
                 include_stop: bool = False):
        self.tok = tokenizer
        self.stop = list(stop or [])
        self.include_stop = include_stop  # (vLLM's include_stop_str_in_output) the stop string kept at the end
        self.skip_special_tokens = skip_special_tokens  # the request's own (SamplingParams), as vLLM and HF decode
        self.hold = max(map(len, self.stop)) - 1 if self.stop else 0
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # all decoded text so far (complete characters)
        self.sent = 0  # characters of `text` already handed out
        self.checked = 0  # characters of `text` a stop string can no longer end in (looked at, or made before min_tokens)
        self.stop_hit: str | None = None
        self.done = False  # its final output was made: anything its engine reports later is not emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False)

    def step(self, ids: list[int], n: int, finished: bool, stops: bool = True) -> str:
        """Consume the output ids `ids[:n]` (the request's cumulative list, which may already hold more); return
        the text newly released. Sets `stop_hit` on a stop string (`stops` False: none is looked for yet)."""
        prefix = self._decode(ids[self.prefix_offset : self.read_offset])
        full = self._decode(ids[self.prefix_offset : n])
        if finished:  # a character its last tokens only began is dropped, not sent as U+FFFD (as vLLM's and Ollama's)
            full = full.rstrip("\ufffd")
        if len(full) > len(prefix) and (finished or not full.endswith("\ufffd")):
            self.text += full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, n
        if self.stop and stops:
            # a match must end in the text new since the last look, as vLLM's detokenizer looks: one ending in the
            # text of the first min_tokens tokens is none (it cut the reply to before it, below what was sent)
            hits = [(i, s) for s in self.stop if (i := self.text.find(s, max(0, self.checked - len(s) + 1))) >= 0]
            if hits:
                i, s = min(hits)
                self.text, self.stop_hit = self.text[: i + len(s) if self.include_stop else i], s
                finished = True
        self.checked = len(self.text)
        upto = max(self.sent, len(self.text) - (0 if finished else self.hold))
        delta = self.text[self.sent : upto]
        self.sent = upto
        return delta


def detokenize(outs: list[TokenOutput]) -> tuple[list[RequestOutput], list[tuple[Request, str]]]:
    """The RequestOutputs of token outputs, and the requests a stop string finished here: (request, stop string)
    for the engine's `stop_requests`, which frees them (until then the engine may step them again)."""
    results: list[RequestOutput] = []
    stopped: list[tuple[Request, str]] = []
    for o in outs:
        req, d = o.request, o.request.detok
        if d.done:  # a stop string ended it already; the token of the step run since is dropped
            continue
        finished, reason, stop_reason, metrics = o.status.finished, o.status.finish_reason, o.stop_reason, o.metrics
        n, k = o.num_output_tokens, o.num_new
        # The token that ended the output (EOS, one of stop_token_ids) is no part of its text unless
        # include_stop_str_in_output, as vLLM's detokenizer leaves it out: with skip_special_tokens false every reply
        # ended "<|im_end|>", and a stop_token_ids' ordinary token ("," say) was kept. Its id and logprob stay.
        token_stop = finished and reason == "stop" and not isinstance(stop_reason, str) and not d.include_stop
        # (stop strings end an output only once it has min_tokens tokens, as vLLM's detokenizer looks for them)
        delta = d.step(req.output_token_ids, n - 1 if token_stop else n, finished,
                       n > req.sampling_params.min_tokens) if k else ""
        if d.stop_hit is not None and not finished:
            finished, reason, stop_reason = True, "stop", d.stop_hit
            metrics = {**metrics, "finished_time": time.monotonic()}
            stopped.append((req, d.stop_hit))
        elif d.stop_hit is not None and reason == "length":  # the last allowed token completed a stop string (as
            reason, stop_reason = "stop", d.stop_hit  # vLLM: a stop; the engine has freed the request already)
        d.done = finished
        # Running: the request's own lists, not copies (a copy per step made a generation's cost quadratic in its
        # length); they only grow. Finished: cut at this output's length, once (a later step may have appended).
        ids, lps = req.output_token_ids, req.output_logprobs if req.sampling_params.logprobs is not None else None
        if finished:
            ids, lps = ids[:n], None if lps is None else lps[:n]
        comp = CompletionOutput(0, d.text, ids, reason, stop_reason, lps)
        plp = None
        if req.sampling_params.prompt_logprobs is not None and k and n == k:  # (the first tokens' output)
            plp = [None, *req.prompt_logprobs]
        results.append(RequestOutput(
            req.request_id, req.prompt_token_ids, [comp], finished, model=req.model, delta_text=delta,
            delta_token_ids=req.output_token_ids[n - k : n],
            delta_logprobs=None if lps is None else req.output_logprobs[n - k : n], metrics=metrics,
            prompt_logprobs=plp, embedding=req.embedding if finished else None,
            num_cached_tokens=req.num_cached_tokens, first=bool(k) and n == k))
    return results, stopped
