"""Embeddings: OpenAI's `POST /v1/embeddings`, Ollama's `POST /api/embed` and its older `POST /api/embeddings`.

The served models are decoder LMs. A text's embedding is its last token's final hidden state (after the model's
last norm), as vLLM's pooling runner gives a decoder model by default ("last" pooling), L2-normalized; the older
Ollama endpoint returns it unnormalized, as Ollama does. Each input is one engine request that ends with its prefill
(`SamplingParams.embed`): admitted, routed, pooled and charged as any prompt, its usage the prompt's tokens.
"""

from __future__ import annotations

import base64
import struct
import time
from collections.abc import Callable

from starlette.requests import Request

from controller.api import protocol as p
from controller.api.serving import OpenAIServing, PromptTooLong, Tracked, encode_prompt, lora_of
from controller.errors import ServingError
from controller.service import ModelEntry
from controller.tenants import Tenant
from token_scheduler.request import SamplingParams, l2_normalize


def _too_long(me: ModelEntry, n: int, param: str, index: int | None, limit: int) -> ServingError:
    """An input to embed that the context (`limit`) cannot take: longer than it (an input may fill it, as vLLM's
    pooling takes max_model_len tokens: no token is generated)."""
    which = f" {index}" if index is not None else ""
    if limit < me.max_model_len:  # (Ollama's num_ctx, as its chat and generate name it)
        return num_ctx_too_long(me, limit, f"input{which}", n, param)
    return ServingError(400, f"This model's maximum context length is {me.max_model_len} tokens; input{which} has {n} "
                             "tokens.", param=param, code="context_length_exceeded")


def num_ctx_too_long(me: ModelEntry, limit: int, what: str, n: int, param: str) -> ServingError:
    """Ollama's 400 for `what` (`n` tokens) past the context its request's options.num_ctx holds it to (`limit`,
    below the model's): its chat, generate (ollama._too_long) and embed."""
    return ServingError(400, f"The context is {limit} tokens (options.num_ctx; the model's is {me.max_model_len}); "
                             f"{what} has {n} tokens.", param=param, code="context_length_exceeded")


def prompts_of(serving: OpenAIServing, me: ModelEntry, raw: str | list, truncate: int | None,
               keep_end: bool = True, param: str = "input", empty: bool = False,
               limit: int | None = None) -> list[list[int]]:
    """Each input's token ids (runs in the tokenize pool). `truncate`: an input longer keeps `truncate` tokens, its last
    (vLLM's truncate_prompt_tokens) or with `keep_end` False its first (Ollama's truncate); -1: as many as the context
    takes; more than the model's context: a 400, as vLLM answers it. None: an input the context cannot take is a 400.
    `empty` (Ollama's): an empty string is embedded as the tokens its tokenizer adds around any text (a Llama's BOS),
    as Ollama's runner embeds it; one that adds none has nothing to embed: a 400 in the runner's words ("no input
    provided"). Otherwise an empty string is a 400.
    `limit`: the context, where a request's is below the model's (Ollama's num_ctx); None: the model's."""
    # (an input may fill it: the step that ends the prefill draws one token, dropped, which takes no place)
    room = me.max_model_len if limit is None else limit
    if truncate is not None and truncate > me.max_model_len:  # (the completions' 400 too: _kept_tokens)
        raise ServingError(400, f"truncate_prompt_tokens ({truncate}) is greater than the model's maximum context "
                                f"length ({me.max_model_len})", param="truncate_prompt_tokens")
    keep = room if truncate == -1 else truncate
    items = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
    out = []
    for i, x in enumerate(items):
        which = i if len(items) > 1 else None
        if isinstance(x, str):
            if not x and not empty:
                raise ServingError(400, f"input{f' {which}' if which is not None else ''} is an empty string",
                                   param=param)
            try:
                ids = encode_prompt(me.tokenizer, x, None if keep is not None else room + 1)
            except PromptTooLong as e:
                raise _too_long(me, e.n, param, which, room) from None
        else:
            ids = list(x)
        if not ids:  # (empty: an empty string whose tokenizer adds no token)
            raise ServingError(400, f"input{f' {which}' if which is not None else ''} is an empty string: no input "
                                    "provided (this model's tokenizer adds no token to embed, such as a BOS)",
                               param=param)
        if keep is not None and len(ids) > keep:
            ids = (ids[len(ids) - keep:] if keep_end else ids[:keep]) if keep else []
        elif len(ids) > room:
            raise _too_long(me, len(ids), param, which, room)
        out.append(serving._check_ids(me, ids, param))
    return out


async def embed(serving: OpenAIServing, me: ModelEntry, tenant: Tenant, request: Request,
                prompts: list[list[int]], prefix: str, model: str) -> tuple[list[list[float]], Tracked]:
    """The final hidden state of each prompt's last token, in order, and the generation that made them (closed).
    `model`: the name asked for (a LoRA adapter's runs with it)."""
    params = SamplingParams(embed=True, lora=lora_of(me, model))
    gen = await serving.generate(me, tenant, model, prompts, params, 1, serving.ctl.new_id(prefix), stream=False)

    async def collect() -> list[list[float]]:
        vecs: list[list[float] | None] = [None] * len(prompts)
        async for i, d in gen.events():
            if d.finished:
                if d.embedding is None:  # (an engine that ended it otherwise: aborted, say)
                    raise ServingError(503, f"the engine ended input {i} without an embedding "
                                            f"({d.finish_reason or 'no reason'})")
                vecs[i] = d.embedding
        return vecs  # type: ignore[return-value]

    return await serving._collect(request, gen, collect()), gen


def ollama_dimensions(me: ModelEntry, dimensions: int | None) -> None:
    """Ollama's `dimensions`: a vector is cut to its first `dimensions` values and normalized again (`shorten`), for
    any model, as Ollama does; a 400 unless it is from 1 to the model's embedding size."""
    if dimensions is None:
        return
    size = me.hidden_size
    if size is None:
        raise ServingError(400, "dimensions: the size of this model's embeddings is not known (its configuration "
                                "gives no hidden_size): leave dimensions out", param="dimensions")
    if not 1 <= dimensions <= size:
        raise ServingError(400, f"dimensions must be between 1 and {size} (the model's embedding size), got "
                                f"{dimensions}", param="dimensions")


def shorten(v: list[float], dimensions: int | None) -> list[float]:
    """An L2-normalized embedding cut to its first `dimensions` values and normalized again, as Ollama's /api/embed
    gives a shorter one (the whole vector when `dimensions` is unset or not shorter)."""
    return l2_normalize(v[:dimensions]) if dimensions is not None and dimensions < len(v) else v


def _dimensions(me: ModelEntry, dimensions: int | None, model: str) -> None:
    """A 400 unless `dimensions` is unset or the model's own (a decoder's hidden state cannot be shortened)."""
    if dimensions is not None and dimensions != me.hidden_size:
        size = f"of {me.hidden_size} dimensions" if me.hidden_size else "whose size its configuration does not give"
        raise ServingError(400, f"model `{model}` gives embeddings {size} and cannot shorten them (it is not a "
                                "Matryoshka embedding model); leave dimensions out", param="dimensions")


async def openai_embeddings(serving: OpenAIServing, req: p.EmbeddingRequest, tenant: Tenant,
                            request: Request) -> p.EmbeddingResponse:
    me = serving.entry(tenant, req.model)
    _dimensions(me, req.dimensions, req.model)
    prompts = await serving.offload(prompts_of, serving, me, req.input, req.truncate_prompt_tokens)
    vecs, gen = await embed(serving, me, tenant, request, prompts, "embd", req.model)
    data = []
    for i, v in enumerate(vecs):
        unit = l2_normalize(v)
        out: list[float] | str = unit
        if req.encoding_format == "base64":
            out = base64.b64encode(struct.pack(f"<{len(unit)}f", *unit)).decode()
        data.append(p.Embedding(index=i, embedding=out))
    return p.EmbeddingResponse(data=data, model=req.model,
                               usage=p.EmbeddingUsage(prompt_tokens=gen.prompt_tokens, total_tokens=gen.prompt_tokens))


async def ollama_embed(serving: OpenAIServing, tenant: Tenant, request: Request, model: str, raw: str | list[str],
                       truncate: bool, dimensions: int | None, normalize: bool,
                       context: Callable[[ModelEntry], int]) -> tuple[list[list[float]], Tracked | None]:
    """Ollama's: no input (an empty string or list) loads nothing and returns no vectors, as Ollama answers it; an
    empty string in a list is embedded as Ollama's runner embeds it (`prompts_of`'s `empty`); `dimensions` cuts
    each vector and normalizes it again (`shorten`). `context`: the model's context as the request holds it (its
    options.num_ctx), which an input is cut to (`truncate`) or else must fit."""
    me = serving.entry(tenant, model)
    ollama_dimensions(me, dimensions)
    if not raw:
        return [], None
    prompts = await serving.offload(prompts_of, serving, me, raw, -1 if truncate else None, False, "input", True,
                                    context(me))
    vecs, gen = await embed(serving, me, tenant, request, prompts, "ollama", model)
    return [shorten(l2_normalize(v), dimensions) if normalize else v for v in vecs], gen



def _cosine(a: list[float], b: list[float]) -> float:
    u, v = l2_normalize(a), l2_normalize(b)
    return sum(x * y for x, y in zip(u, v))


async def _scores(serving: OpenAIServing, me: ModelEntry, tenant: Tenant, request: Request, model: str,
                  queries: list[str], docs: list[str], truncate: int | None, param: str) -> tuple[list[float], Tracked]:
    """The cosine similarity of each (query, document) pair, queries one or as many as documents: vLLM's score for
    an embedding model (these decoders' last-token states). One generation embeds them all."""
    texts = queries + docs
    prompts = await serving.offload(prompts_of, serving, me, texts, truncate, True, param)
    vecs, gen = await embed(serving, me, tenant, request, prompts, "score", model)
    qv, dv = vecs[: len(queries)], vecs[len(queries):]
    return [_cosine(qv[0] if len(qv) == 1 else qv[i], d) for i, d in enumerate(dv)], gen


async def rerank(serving: OpenAIServing, req: p.RerankRequest, tenant: Tenant, request: Request) -> dict:
    """vLLM's /rerank (Jina's, Cohere's): the documents by relevance to the query, best first (top_n of them)."""
    me = serving.entry(tenant, req.model)
    docs = []
    for i, d in enumerate(req.documents):
        text = d if isinstance(d, str) else d.get("text")
        if not isinstance(text, str) or not text:
            raise ServingError(400, f"document {i} is not a non-empty string or an object with a text",
                               param="documents")
        docs.append(text)
    scores, gen = await _scores(serving, me, tenant, request, req.model, [req.query], docs,
                                req.truncate_prompt_tokens, "documents")
    order = sorted(range(len(docs)), key=lambda i: -scores[i])[: req.top_n or len(docs)]
    results = [{"index": i, "relevance_score": scores[i], **({"document": {"text": docs[i]}}
                                                             if req.return_documents else {})} for i in order]
    return {"id": serving.ctl.new_id("rerank"), "model": req.model, "results": results,
            "usage": {"prompt_tokens": gen.prompt_tokens, "total_tokens": gen.prompt_tokens}}


async def score(serving: OpenAIServing, req: p.ScoreRequest, tenant: Tenant, request: Request) -> dict:
    """vLLM's /score: text_1 against each text_2 (a single text_1 against all, or pairs of equal lists)."""
    me = serving.entry(tenant, req.model)
    t1 = [req.text_1] if isinstance(req.text_1, str) else list(req.text_1)
    t2 = [req.text_2] if isinstance(req.text_2, str) else list(req.text_2)
    if len(t1) > 1 and len(t2) == 1:
        t2 = t2 * len(t1)
    if len(t1) != 1 and len(t1) != len(t2):
        raise ServingError(400, f"text_1 has {len(t1)} texts and text_2 {len(t2)}: give one text_1, or as many as "
                                "text_2", param="text_1")
    scores, gen = await _scores(serving, me, tenant, request, req.model, t1, t2, req.truncate_prompt_tokens,
                                "text_2")
    return {"id": serving.ctl.new_id("score"), "object": "list", "model": req.model, "created": int(time.time()),
            "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
            "usage": {"prompt_tokens": gen.prompt_tokens, "total_tokens": gen.prompt_tokens}}
