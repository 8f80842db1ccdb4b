"""OpenAI-compatible routes. They only translate: HTTP in, serving call, HTTP out."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import contextmanager

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse

import tokenpool
from controller.api import anthropic, auth, embeddings, responses
from controller.api import protocol as p
from controller.api.embeddings import openai_embeddings
from controller.api.serving import ClientGone, unless_disconnected
from controller.dashboard.views import resident_models
from controller.errors import ServingError
from controller.tenants import Tenant

router = APIRouter()
ERRORS = {s: {"model": p.ErrorResponse} for s in (400, 401, 404, 413, 429, 500, 503)}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _respond(result: p.BaseModel | dict | AsyncIterator[bytes]) -> Response:
    if isinstance(result, p.BaseModel):
        return Response(result.model_dump_json(), media_type="application/json")
    if isinstance(result, dict):
        return Response(json.dumps(result, ensure_ascii=False), media_type="application/json")
    return StreamingResponse(result, media_type="text/event-stream; charset=utf-8", headers=SSE_HEADERS)


async def _serve(request: Request, call, model: str, tenant: Tenant) -> Response:
    """Run one serving call; every outcome that is not a finished generation is counted here, 500s included
    (the app's handler answers them). A client that left gets nothing: 499 goes to a closed socket. The call is
    cancelled once its client has gone, while it waits to be admitted too (its model's load, the start-up's
    workers): it was placed after the wait and ran on the engine for nobody."""
    try:
        with _counting(request, model, tenant):
            return _respond(await unless_disconnected(request, call))
    except ClientGone:
        return Response(status_code=499)


@contextmanager
def _counting(request: Request, model: str | None, tenant: Tenant):
    """Count what ends the block other than its answer -- a refusal (ServingError) or a 500 -- once, under `model` and
    `tenant` (an error already counted where it arose is not)."""
    try:
        yield
    except ServingError as e:
        if not getattr(e, "counted", False):
            request.app.state.controller.count_refusal(model, tenant.name, e.status)
            e.counted = True  # type: ignore[attr-defined]
        raise
    except ClientGone:
        raise
    except Exception as e:
        if not getattr(e, "counted", False):
            request.app.state.controller.count_refusal(model, tenant.name, 500)
            e.counted = True  # type: ignore[attr-defined]
        raise


async def _refusals_counted(request: Request, call, model: str | None, tenant: Tenant):
    """Run a metadata route's call (it names a model, runs no generation): its refusals are counted as a generating
    route's are, under the model when one answers to the name (never a label value from a name no model has: "-"),
    and its tenant. It named no 404 before (a /tokenize of an unknown model was not in tokenpool_requests_total)."""
    with _counting(request, model, tenant):
        return await call


@router.post("/v1/completions", response_model=p.CompletionResponse, responses=ERRORS)
async def completions(body: p.CompletionRequest, request: Request, tenant: Tenant = Depends(auth.tenant_dep)):
    return await _serve(request, request.app.state.serving.completions(body, tenant, request), body.model, tenant)


@router.post("/v1/chat/completions", response_model=p.ChatCompletionResponse, responses=ERRORS)
async def chat_completions(body: p.ChatCompletionRequest, request: Request, tenant: Tenant = Depends(auth.tenant_dep)):
    return await _serve(request, request.app.state.serving.chat(body, tenant, request), body.model, tenant)


@router.post("/v1/embeddings", response_model=p.EmbeddingResponse, responses=ERRORS)
async def create_embeddings(body: p.EmbeddingRequest, request: Request, tenant: Tenant = Depends(auth.tenant_dep)):
    """Each input's embedding: the last token's final hidden state, L2-normalized (controller/api/embeddings.py)."""
    return await _serve(request, openai_embeddings(request.app.state.serving, body, tenant, request), body.model,
                        tenant)


@router.post("/v1/messages", responses=ERRORS)
async def create_message(body: p.MessagesRequest, request: Request, tenant: Tenant = Depends(auth.tenant_dep)):
    """Anthropic's Messages API over the chat path (controller/api/anthropic.py)."""
    return await _serve(request, anthropic.create(request.app.state.serving, body, tenant, request), body.model,
                        tenant)


@router.post("/v1/messages/count_tokens", responses=ERRORS)
async def count_message_tokens(body: p.MessagesRequest, request: Request, tenant: Tenant = Depends(auth.tenant_dep)):
    return await _refusals_counted(request, anthropic.count_tokens(request.app.state.serving, body, tenant), body.model,
                                   tenant)


@router.post("/rerank", responses=ERRORS)
@router.post("/v1/rerank", responses=ERRORS)
@router.post("/v2/rerank", responses=ERRORS)
async def rerank(body: p.RerankRequest, request: Request, tenant: Tenant = Depends(auth.tenant_dep)):
    """vLLM's (Jina's, Cohere's; llama-swap's paths): documents by the cosine similarity of their embeddings to the
    query's, best first (controller/api/embeddings.py)."""
    return await _serve(request, embeddings.rerank(request.app.state.serving, body, tenant, request), body.model, tenant)


@router.post("/score", responses=ERRORS)
@router.post("/v1/score", responses=ERRORS)
async def score(body: p.ScoreRequest, request: Request, tenant: Tenant = Depends(auth.tenant_dep)):
    """vLLM's: the cosine similarity of text_1's embedding to each text_2's."""
    return await _serve(request, embeddings.score(request.app.state.serving, body, tenant, request), body.model, tenant)


@router.get("/running")
async def running(request: Request, tenant: Tenant = Depends(auth.tenant_dep)) -> dict:
    """llama-swap's: the models the key may use whose weights are in VRAM now, with their keep_alive in force (its
    ttl: an Ollama request's, else the configured one; null: until the memory is needed)."""
    ctl = request.app.state.controller
    resident = resident_models(ctl.pool.engines.values())
    names = request.app.state.serving.names_for  # (a model allowed only by an alias: under that name)
    return {"running": [{"model": n, "state": "ready", "ttl": me.engine_keep_alive}
                        for name, me in ctl.models.items() if name in resident for n in names(tenant, me)]}


@router.get("/unload", dependencies=[Depends(auth.operator)], operation_id="unload_all_get")
@router.post("/unload", dependencies=[Depends(auth.operator)], operation_id="unload_all")
async def unload_all(request: Request) -> PlainTextResponse:
    """llama-swap's: free every model's VRAM once its requests finish (they stay served; pinned ones stay). The admin
    token, or on a single-user server that user's key."""
    ctl = request.app.state.controller
    for name, me in ctl.models.items():
        if not me.pinned:
            ctl.evict(name)
    return PlainTextResponse("OK")


@router.post("/v1/responses", responses=ERRORS)
async def create_response(body: p.ResponsesRequest, request: Request, tenant: Tenant = Depends(auth.tenant_dep)):
    """OpenAI's Responses API over the chat path (controller/api/responses.py)."""
    return await _serve(request, responses.create(request.app.state.serving, request.app.state.responses, body,
                                                  tenant, request), body.model, tenant)


# The routes whose every outcome tokenpool_requests_total counts (`_serve`): a body refused before the route ran
# (the app's validation handler) is counted too
COUNTED = frozenset({completions, chat_completions, create_embeddings, create_message, rerank, score, create_response})


@router.post("/v1/responses/input_tokens", responses=ERRORS)
async def response_input_tokens(body: p.ResponsesRequest, request: Request, tenant: Tenant = Depends(auth.tenant_dep)):
    """The input's tokens as /v1/responses would feed them (the SDK's responses.input_tokens.count)."""
    return await _refusals_counted(request, responses.input_tokens(request.app.state.serving, request.app.state.responses,
                                                                   body, tenant), body.model, tenant)


@router.post("/v1/responses/{response_id}/cancel", responses=ERRORS)
async def cancel_response(response_id: str, request: Request, tenant: Tenant = Depends(auth.tenant_dep)):
    """Only background responses can be cancelled, and there are none here: 404 for an unknown id, else a 400."""
    responses.stored(request.app.state.responses, response_id, tenant)
    raise ServingError(400, "only background responses can be cancelled (this server runs none)",
                       param="response_id")


@router.get("/v1/responses/{response_id}", responses=ERRORS)
async def get_response(response_id: str, request: Request, tenant: Tenant = Depends(auth.tenant_dep)):
    return responses.stored(request.app.state.responses, response_id, tenant).response


@router.get("/v1/responses/{response_id}/input_items", responses=ERRORS)
async def response_input_items(response_id: str, request: Request, tenant: Tenant = Depends(auth.tenant_dep),
                               order: str = "desc", limit: str = "20", after: str | None = None):
    """A stored response's input items (this request's, not those of the responses before it)."""
    return responses.page(responses.stored(request.app.state.responses, response_id, tenant).inputs, order, limit,
                          after)


@router.delete("/v1/responses/{response_id}", responses=ERRORS)
async def delete_response(response_id: str, request: Request, tenant: Tenant = Depends(auth.tenant_dep)):
    responses.stored(request.app.state.responses, response_id, tenant)
    request.app.state.responses.delete(response_id, tenant.owner)
    return {"id": response_id, "object": "response", "deleted": True}


@router.get("/v1/models", response_model=p.ModelList, responses=ERRORS)
async def list_models(request: Request, tenant: Tenant = Depends(auth.tenant_dep)):
    """OpenAI's list; to the `anthropic` client, Anthropic's Models API page (`limit`, `after_id`, `before_id`)."""
    models = request.app.state.serving.models(tenant)
    if anthropic.speaks_anthropic(request):
        return _respond(anthropic.model_page(models.data, request.query_params))
    return models


@router.get("/v1/models/{model:path}", response_model=p.ModelCard, responses=ERRORS)
async def get_model(model: str, request: Request, tenant: Tenant = Depends(auth.tenant_dep)):
    """A model by the name a request would use: its own, or one of its aliases (answered under the name asked)."""
    try:
        card = request.app.state.serving.card(tenant, model)
    except ServingError as e:
        request.app.state.controller.count_refusal(model, tenant.name, e.status)
        e.counted = True  # type: ignore[attr-defined]
        raise
    return _respond(anthropic.model_info(card)) if anthropic.speaks_anthropic(request) else card


@router.post("/tokenize", response_model=p.TokenizeResponse, responses=ERRORS)
async def tokenize(body: p.TokenizeRequest, request: Request, tenant: Tenant = Depends(auth.tenant_dep)):
    """vLLM's: the token ids of a prompt or of chat messages, as a completion or chat request would feed them."""
    return await _refusals_counted(request, request.app.state.serving.tokenize(body, tenant), body.model, tenant)


@router.post("/detokenize", response_model=p.DetokenizeResponse, responses=ERRORS)
async def detokenize(body: p.DetokenizeRequest, request: Request, tenant: Tenant = Depends(auth.tenant_dep)):
    return await _refusals_counted(request, request.app.state.serving.detokenize(body, tenant), body.model, tenant)


# The metadata routes that name a model (no generation): their refusals are counted (`_refusals_counted`), a body
# refused before the route ran (the app's validation handler) too
REFUSALS_COUNTED = frozenset({count_message_tokens, response_input_tokens, get_model, tokenize, detokenize})


@router.post("/v1/load_lora_adapter", responses=ERRORS, dependencies=[Depends(auth.operator)])
async def load_lora_adapter(body: p.LoadLoraAdapterRequest, request: Request) -> PlainTextResponse:
    """vLLM's: serve a LoRA adapter under a model name of its own, over the model it was trained on. The admin
    token, or on a single-user server that user's key."""
    request.app.state.controller.load_lora(body.base_model_name, body.lora_name, body.lora_path)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", responses=ERRORS, dependencies=[Depends(auth.operator)])
async def unload_lora_adapter(body: p.UnloadLoraAdapterRequest, request: Request) -> PlainTextResponse:
    """vLLM's: stop serving an adapter (its requests in flight finish with it)."""
    request.app.state.controller.unload_lora(body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


@router.get("/version")
async def version() -> dict:
    """The server's version (vLLM's route; no key needed)."""
    return {"version": tokenpool.version()}


@router.get("/v1/usage", responses=ERRORS)
async def usage(tenant: Tenant = Depends(auth.tenant_dep)) -> dict:
    """The caller's own usage since the server started (never another tenant's)."""
    return {"tenant": tenant.name, **tenant.usage}
