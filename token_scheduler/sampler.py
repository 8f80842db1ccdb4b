"""Sampling from a batch of logits, one row per request.

Each seeded request owns a `torch.Generator`, and its row is drawn with that generator alone, so what a
seeded request samples does not depend on which other requests share the batch.
Sampling uses the exponential-race trick (argmax of p / Exp(1)) instead of `torch.multinomial`: one
draw per vocabulary entry from the request's own generator, and no host sync until tokens are read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpu_pool.pinned import upload
from token_scheduler.request import Request


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None  # per row, or None when no row asked for logprobs


def apply_penalties(logits: torch.Tensor, req: Request) -> torch.Tensor:
    """vLLM semantics: repetition over prompt+output; presence/frequency over output only."""
    sp = req.sampling_params
    dev = logits.device
    if sp.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(req.all_token_ids)), device=dev, dtype=torch.long)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / sp.repetition_penalty, vals * sp.repetition_penalty)
    if (sp.presence_penalty or sp.frequency_penalty) and req.output_token_ids:
        out = torch.tensor(req.output_token_ids, device=dev, dtype=torch.long)
        counts = torch.zeros_like(logits).index_add_(0, out, torch.ones_like(out, dtype=logits.dtype))
        logits -= sp.frequency_penalty * counts + sp.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def adjust_logits(logits: torch.Tensor, reqs: list[Request], grammar: bool = True) -> torch.Tensor:
    """vLLM v1's order: a grammar's mask (unless `grammar` is False: `mask_grammars` put it on already) and
    allowed_token_ids' (row by row), logit_bias and min_tokens' stop-token mask over the batch (one scatter each),
    then each row's penalties. `logits`: [N, V] fp32, changed in place. The stop-token mask reads how many tokens a
    row has made, and a grammar is fed them, so such rows never run overlapped (`ModelRunner.launchable`): the host
    knows those tokens exactly."""
    rows, cols, vals, mrows, mcols = [], [], [], [], []
    if grammar:
        mask_grammars(logits, reqs)
    for i, r in enumerate(reqs):
        sp = r.sampling_params
        if sp.allowed_token_ids is not None:  # (ids past the vocabulary are never drawn anyway)
            ids = upload([t for t in sp.allowed_token_ids if t < logits.shape[1]], logits.device)
            keep = logits[i].index_select(0, ids)
            logits[i].fill_(float("-inf")).index_copy_(0, ids, keep)
        if sp.logit_bias:
            rows += [i] * len(sp.logit_bias)
            cols += sp.logit_bias.keys()
            vals += sp.logit_bias.values()
        for seq in r.bad_word_ids:  # (vLLM's bad_words) the token that would complete one is masked
            if len(seq) == 1 or r.output_token_ids[len(r.output_token_ids) - len(seq) + 1:] == seq[:-1]:
                if seq[-1] < logits.shape[1]:
                    mrows.append(i)
                    mcols.append(seq[-1])
        if masks_stop_tokens(r):
            stops = {t for t in (*(sp.stop_token_ids or ()), *(() if sp.ignore_eos else r.eos_token_ids))
                     if t < logits.shape[1]}  # (an id past the vocabulary is never drawn anyway)
            mrows += [i] * len(stops)
            mcols += stops
    dev = logits.device
    if rows:
        logits.index_put_((upload(rows, dev), upload(cols, dev)), upload(vals, dev, logits.dtype), accumulate=True)
    if mrows:
        logits.index_put_((upload(mrows, dev), upload(mcols, dev)), torch.tensor(float("-inf"), device=dev))
    for i, r in enumerate(reqs):
        if r.sampling_params.needs_penalties:
            logits[i] = apply_penalties(logits[i], r)
    return logits


def mask_grammars(logits: torch.Tensor, reqs: list[Request]) -> None:
    """Each grammar row's mask (`_grammar_mask`) on `logits` [N, V], in place."""
    for i, r in enumerate(reqs):
        if r.matcher is not None:
            _grammar_mask(logits[i], r.matcher)


def _grammar_mask(row: torch.Tensor, matcher) -> None:
    """-inf on every token the request's grammar does not allow next (llguidance's mask: a byte a token, 0 or not;
    a matcher in an error state allows EOS alone, so such a request ends)."""
    allowed = torch.frombuffer(bytearray(matcher.compute_logit_bias()), dtype=torch.uint8)
    n = min(allowed.numel(), row.numel())
    if row.device.type == "cuda":  # (from pinned memory, queued like the kernels around it)
        allowed = allowed.pin_memory().to(row.device, non_blocking=True)
    row[:n].masked_fill_(allowed[:n] == 0, float("-inf"))
    row[n:] = float("-inf")


def masks_stop_tokens(req: Request) -> bool:
    """min_tokens (vLLM): EOS (unless ignore_eos) and the stop token ids cannot be drawn before the output has
    that many tokens."""
    return len(req.output_token_ids) < req.sampling_params.min_tokens


def _filter(x: torch.Tensor, top_k: list[int], top_p: list[float], min_p: list[float]) -> torch.Tensor:
    """Top-k, top-p and min-p over a batch of rows [N, V] at once, each row with its own settings (off: -1, 1.0,
    0.0). A batched op per filter instead of a Python loop over rows: the ops and results are those of
    filtering each row alone (row-wise sort, softmax and cumsum)."""
    n, vocab = x.shape
    dev = x.device
    if any(0 < k < vocab for k in top_k):
        ks = [k if 0 < k < vocab else vocab for k in top_k]
        top = torch.topk(x, max(ks), dim=-1).values
        kth = top.gather(1, upload(ks, dev).sub_(1).unsqueeze(1))
        x = x.masked_fill(x < kth, float("-inf"))
    if any(p < 1.0 for p in top_p):
        sorted_l, idx = torch.sort(x, dim=-1, descending=True)
        probs = sorted_l.softmax(-1)
        # keep the smallest prefix whose mass reaches top_p (a row with top_p 1.0 drops nothing)
        drop = probs.cumsum(-1) - probs > upload(top_p, dev, probs.dtype).unsqueeze(1)
        x = x.scatter(1, idx, sorted_l.masked_fill(drop, float("-inf")))
    if any(p > 0.0 for p in min_p):
        probs = x.softmax(-1)
        floor = upload(min_p, dev, probs.dtype).unsqueeze(1) * probs.amax(-1, keepdim=True)
        x = x.masked_fill(probs < floor, float("-inf"))
    return x


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self._default = torch.Generator(device=device)
        self._default.manual_seed(seed)

    def generator(self, req: Request) -> torch.Generator:
        seed = req.sampling_params.seed
        if seed is None:
            return self._default
        if req.generator is None:  # on the request: it goes with it
            req.generator = torch.Generator(device=self.device)
            req.generator.manual_seed(seed)
        return req.generator

    def __call__(self, logits: torch.Tensor, reqs: list[Request]) -> SampleResult:
        """logits: [N, V], row i for reqs[i]: fp32, or the model dtype (a decode graph's with runner.STEP_IO), which
        is upcast where fp32 matters (logprobs, penalties, temperature) -- the same values either way."""
        want_lp = any(r.sampling_params.logprobs is not None for r in reqs)
        masked = want_lp and any(r.matcher is not None for r in reqs)
        if masked:  # (a grammar's mask first, as vLLM applies it before its sampler: logprobs of what it allows)
            logits = logits.to(torch.float32, copy=True)
            mask_grammars(logits, reqs)
        logprobs_all = torch.log_softmax(logits.float(), dim=-1) if want_lp else None
        tokens = self.sample_tokens(logits, reqs, grammar=not masked)
        return self.read(tokens, reqs, logprobs_all)

    def sample_tokens(self, logits: torch.Tensor, reqs: list[Request], grammar: bool = True) -> torch.Tensor:
        """The sampled ids as a device tensor [N]: only kernels are queued, nothing waits for the GPU (an
        overlapped step feeds them to the next forward before the host reads them). Batched over the rows;
        only penalties (rare) and seeded rows' random draws go row by row. `grammar` False: the grammars' masks
        are on `logits` already (`mask_grammars`)."""
        sps = [r.sampling_params for r in reqs]
        raw = logits
        if any(sp.adjusts_logits for sp in sps):
            raw = adjust_logits(raw.to(torch.float32, copy=True), reqs, grammar)
        greedy = [sp.greedy for sp in sps]
        if all(greedy):  # (in the logits' own dtype: an upcast keeps every value, so the first maximum too)
            return raw.argmax(-1)
        raw = raw.float()
        dev = raw.device
        temps = upload([1.0 if g else sp.temperature for g, sp in zip(greedy, sps)], dev, raw.dtype)
        x = _filter(raw / temps.unsqueeze(1), [sp.top_k for sp in sps], [sp.top_p for sp in sps],
                    [sp.min_p for sp in sps])
        probs = x.softmax(-1)
        # exponential race: unseeded rows draw from the engine's generator in one call; a seeded row redraws
        # its own row from its own generator (the same V draws it would make alone, whatever the batch)
        q = torch.empty_like(probs).exponential_(1.0, generator=self._default)
        for i, (g, sp) in enumerate(zip(greedy, sps)):
            if sp.seed is not None and not g:
                q[i].exponential_(1.0, generator=self.generator(reqs[i]))
        tokens = (probs / q).argmax(-1)
        if any(greedy):
            tokens = torch.where(upload(greedy, dev), raw.argmax(-1), tokens)
        return tokens

    def read(self, tokens: torch.Tensor, reqs: list[Request], logprobs_all: torch.Tensor | None) -> SampleResult:
        token_list = tokens.tolist()  # the one host sync of a step without logprobs
        if logprobs_all is None:
            return SampleResult(token_list, None)
        ks = [r.sampling_params.logprobs for r in reqs]
        sampled = logprobs_all.gather(1, tokens.view(-1, 1)).view(-1).tolist()  # one read for every row
        kmax = max((k for k in ks if k), default=0)
        top_vals = top_ids = None
        if kmax:
            v, i = torch.topk(logprobs_all, kmax, dim=-1)
            top_vals, top_ids = v.tolist(), i.tolist()
        lps: list[dict[int, float]] = []
        for row, k in enumerate(ks):
            if k is None:
                lps.append({})
                continue
            d = {token_list[row]: sampled[row]}
            if k > 0:  # (a token a grammar forbids, -inf, is none of the likely ones: a row may have fewer than k)
                for t, lp in zip(top_ids[row][:k], top_vals[row][:k]):
                    if lp != float("-inf"):
                        d.setdefault(t, lp)
            lps.append(d)
        return SampleResult(token_list, lps)
