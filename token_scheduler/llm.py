"""Offline API, as vLLM users know it: `LLM(model=...).generate(prompts, params)`."""

from __future__ import annotations

from dataclasses import replace
from itertools import count

from token_scheduler.engine import EngineConfig, LLMEngine
from token_scheduler.request import CompletionOutput, RequestOutput, SamplingParams, l2_normalize


class LLM:
    def __init__(self, model: str, device: str = "cpu", dtype: str = "auto", **engine_kwargs):
        self.engine = LLMEngine(EngineConfig(model=str(model), device=device, dtype=dtype, **engine_kwargs))
        self._ids = count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """prompts: a string, a list of token ids, or a list of either. One RequestOutput per prompt, in order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} sampling params")
        groups: list[list[str]] = []
        for prompt, sp in zip(prompts, params_list):
            ids = []
            for i in range(sp.n):
                rid = f"gen-{next(self._ids)}"
                seed = None if sp.seed is None else sp.seed + i
                self.engine.add_request(rid, prompt, replace(sp, n=1, seed=seed))
                ids.append(rid)
            groups.append(ids)
        done: dict[str, RequestOutput] = {}
        prompt_lps: dict[str, list] = {}  # (prompt_logprobs: on each request's first output)
        while self.engine.has_unfinished_requests():
            for o in self.engine.step():
                if o.prompt_logprobs is not None:
                    prompt_lps[o.request_id] = o.prompt_logprobs
                if o.finished:
                    done[o.request_id] = o
        results = []
        for prompt, ids in zip(prompts, groups):
            first = done[ids[0]]
            outs = [replace(done[rid].outputs[0], index=i) for i, rid in enumerate(ids)]
            results.append(RequestOutput(first.request_id, first.prompt_token_ids, outs, True, model=first.model,
                                         prompt=prompt if isinstance(prompt, str) else None,
                                         prompt_logprobs=prompt_lps.get(ids[0]), embedding=first.embedding))
        return results

    def embed(self, prompts, normalize: bool = True) -> list[list[float]]:
        """Each prompt's embedding (vLLM's `LLM.embed` for a decoder model: the last token's final hidden state),
        L2-normalized unless `normalize` is False. prompts: as `generate` takes them."""
        outs = self.generate(prompts, SamplingParams(embed=True))
        return [l2_normalize(o.embedding) if normalize else o.embedding for o in outs]  # type: ignore[arg-type]


__all__ = ["LLM", "SamplingParams", "CompletionOutput", "RequestOutput"]
