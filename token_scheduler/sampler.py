"""Sampling from a batch of logits, one row per request.

Each seeded request owns a `torch.Generator`, and its row is drawn with that generator alone, so what a
seeded request samples does not depend on which other requests share the batch.
Sampling uses the exponential-race trick (argmax of p / Exp(1)) instead of `torch.multinomial`: one
draw per vocabulary entry from the request's own generator, and no host sync until tokens are read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


def _filter(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_l, idx = torch.sort(logits, descending=True)
        probs = sorted_l.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(0, idx, sorted_l.masked_fill(drop, float("-inf")))
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return logits


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self._default = torch.Generator(device=device)
        self._default.manual_seed(seed)
        self._gens: dict[str, torch.Generator] = {}

    def generator(self, req: Request) -> torch.Generator:
        seed = req.sampling_params.seed
        if seed is None:
            return self._default
        g = self._gens.get(req.request_id)
        if g is None:
            g = self._gens[req.request_id] = torch.Generator(device=self.device)
            g.manual_seed(seed)
        return g

    def release(self, request_id: str) -> None:
        self._gens.pop(request_id, None)

    def __call__(self, logits: torch.Tensor, reqs: list[Request]) -> SampleResult:
        """logits: [N, V] float32, row i for reqs[i] (may be modified in place)."""
        want_lp = any(r.sampling_params.logprobs is not None for r in reqs)
        logprobs_all = torch.log_softmax(logits, dim=-1) if want_lp else None
        tokens = self.sample_tokens(logits, reqs)
        return self.read(tokens, reqs, logprobs_all)

    def sample_tokens(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """The sampled ids as a device tensor [N]: only kernels are queued, nothing waits for the GPU (an
        overlapped step feeds them to the next forward before the host reads them)."""
        raw = logits
        if all(r.sampling_params.greedy and not r.sampling_params.needs_penalties for r in reqs):
            return raw.argmax(-1)
        tokens = torch.empty(len(reqs), dtype=torch.long, device=raw.device)
        for i, r in enumerate(reqs):
            sp = r.sampling_params
            row = raw[i].clone() if sp.needs_penalties else raw[i]
            if sp.needs_penalties:
                row = apply_penalties(row, r)
            if sp.greedy:
                tokens[i] = row.argmax()
                continue
            row = _filter(row / sp.temperature, sp.top_k, sp.top_p, sp.min_p)
            probs = row.softmax(-1)
            q = torch.empty_like(probs).exponential_(1.0, generator=self.generator(r))
            tokens[i] = (probs / q).argmax()
        return tokens

    def read(self, tokens: torch.Tensor, reqs: list[Request], logprobs_all: torch.Tensor | None) -> SampleResult:
        token_list = tokens.tolist()  # the one host sync of a step
        if logprobs_all is None:
            return SampleResult(token_list, None)
        lps: list[dict[int, float]] = []
        for i, r in enumerate(reqs):
            k = r.sampling_params.logprobs
            if k is None:
                lps.append({})
                continue
            row = logprobs_all[i]
            d = {token_list[i]: float(row[token_list[i]])}
            if k > 0:
                vals, ids = torch.topk(row, k)
                for t, lp in zip(ids.tolist(), vals.tolist()):
                    d.setdefault(t, lp)
            lps.append(d)
        return SampleResult(token_list, lps)
