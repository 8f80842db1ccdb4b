"""Ollama's API over the same serving layer, for the clients and GUIs that speak it (the `ollama` Python and
JavaScript libraries, Open WebUI, editors' assistants): `POST /api/chat`, `POST /api/generate`, `POST /api/embed`
(and the older `/api/embeddings`), `GET /api/tags`, `POST /api/show`, `GET /api/ps`, `GET /api/version`.

A request is translated into the OpenAI request it means (options -> sampling fields, `format` -> response_format)
and validated as that one, then generated as it would be; the replies are Ollama's: newline-delimited JSON objects
when streamed (Ollama's default), the last with `done: true`, the token counts and durations in nanoseconds; errors
are `{"error": "..."}` with the HTTP status. Models are the served ones, named as /v1/models names them; the key is
the same bearer key.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import re
import secrets
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

import tokenpool
from controller.api import auth, embeddings
from controller.api import protocol as p
from controller.api.anthropic import prefills
from controller.api.serving import (
    ClientGone,
    OpenAIServing,
    Thought,
    Tracked,
    encode,
    encode_prompt,
    generation_defaults,
    lora_of,
    thinks_first,
    too_long,
    unless_disconnected,
)
from controller.api.structured import (
    HERMES_CLOSE,
    JSON_LAYOUT,
    Lead,
    ToolPlan,
    closed_schema,
    response_grammar,
    response_schema,
)
from controller.api.thinking import OPEN as THINK_OPEN
from controller.api.thinking import Split as _Split
from controller.api.thinking import opened as _opened
from controller.api.thinking import switch as _switch
from controller.api.thinking import thinks as _thinks
from controller.dashboard.views import resident_models
from controller.errors import ServingError, field_path, json_kind, telling_error
from controller.ollama_names import LATEST
from controller.real_model import MARKER as GGUF_MARKER
from token_scheduler.request import SamplingParams
from tokenpool.models import gguf_file_type, safetensors_tensors

router = APIRouter(prefix="/api")
log = logging.getLogger("tokenpool.ollama")


class _Loose(BaseModel):
    """An Ollama request: unknown fields ignored, JSON types not coerced (Go's decoder refuses `"stream": "no"` and
    `"context": [true]`, where coercion read them as false and [1])."""

    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:  # (Ollama's Go fields are pointers: null is "not sent")
        return p.null_is_default(cls, data)


OLLAMA_MAX_STOP = 64  # stop strings an Ollama request may carry (Ollama sets no number; this bounds the work)


class Options(_Loose):
    """The sampling options Ollama clients send, and num_ctx (`_context`); others (num_gpu, mirostat, ...) are
    ignored. Typed as Ollama's Options.FromMap takes them: a string for a number is refused ("num_predict": "0" was
    read as 0, no limit), and a JSON number with a fraction for an integer option is truncated (Go's int64(f))."""

    @model_validator(mode="before")
    @classmethod
    def _whole(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: int(v) if k in _INT_OPTIONS and isinstance(v, float) and abs(v) < 2 ** 63 else v
                    for k, v in data.items()}
        return data

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    num_predict: int | None = None  # -1: until the context is full
    num_keep: int | None = None  # a prompt past the context keeps this many first tokens (NUM_KEEP; -1: all it can)
    num_ctx: int | None = None  # the context the request runs in, up to the model's (`_context`)
    seed: int | None = None
    # (Ollama sets no number; the OpenAI request's MAX_STOP, 8, refused the lists code assistants send: Continue's
    # autocomplete for Qwen2.5-Coder sends its 9 FIM tokens and 3 more. Taken past it: `_run`)
    stop: list[p.StopStr] | None = Field(None, max_length=OLLAMA_MAX_STOP)
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


_INT_OPTIONS = frozenset({"top_k", "num_predict", "num_keep", "num_ctx", "seed"})


class Message(_Loose):
    role: str
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's: [{"id", "function": {"name", "arguments": {...}}}]
    tool_name: str | None = None  # a tool message's: the function whose result it is
    tool_call_id: str | None = None  # a tool message's: the id of the call it answers (Ollama 0.12.10 on)


class _Base(_Loose):
    model: str
    stream: bool = True
    options: Options | None = None
    format: str | dict[str, Any] | None = None  # "json" or a JSON schema
    keep_alive: Any = None  # (`_ask`; checked by `_keep_alive_s`)
    # Ollama's: true/false, or a level ("high", "medium", "low"); a model whose template has no thinking is a 400
    # when it is asked for (`_thinking`)
    think: bool | str | None = None
    logprobs: bool = False  # Ollama's: each generated token's log probability, and its top_logprobs alternatives
    top_logprobs: int | None = None
    # Ollama's: a conversation longer than the context loses its oldest messages, a prompt its tokens after the
    # first num_keep (false: an error instead)
    truncate: bool | None = None


class ChatRequest(_Base):
    messages: list[Message] = []
    tools: list[dict[str, Any]] | None = None  # OpenAI's function tools; the model decides ("auto")


class GenerateRequest(_Base):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    suffix: str | None = None
    images: list[str] | None = None
    # (Ollama's, deprecated there but still sent) the `context` a previous /api/generate returned: its prompt and
    # reply as token ids, which this prompt continues (on the KV the prefix cache kept of them)
    context: list[int] | None = None
    # Ollama's: the prompt template to use instead of the model's (`render_template`'s subset of Go's templates)
    template: str | None = None


_ACTION = re.compile(r"\{\{(-\s)?\s*(.*?)\s*(\s-)?\}\}", re.S)
_TEMPLATE_FIELDS = ("System", "Prompt", "Response")
TEMPLATE_HELP = ("{{ .System }}, {{ .Prompt }}, {{ .Response }} and {{ if .System }}...{{ else }}...{{ end }} "
                 "(with {{- -}} trimming)")


def render_template(template: str, fields: dict[str, str]) -> str:
    """An Ollama `template` (a Go text/template) rendered over a generate request's fields, in the subset its simple
    templates use: `{{ .System }}`, `{{ .Prompt }}`, `{{ .Response }}`, `{{ if .X }}`/`{{ else }}`/`{{ end }}`
    blocks, comments, and the `{{-`/`-}}` markers that trim the whitespace beside them. Anything else (a range over
    .Messages, a function) is a 400 naming it, rather than a prompt rendered wrong."""
    parts: list[str | tuple[str, str]] = []  # text, or (kind, arg) of an action
    pos = 0
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        parts.append(text)
        act = m.group(2)
        if act.startswith("/*") and act.endswith("*/"):
            parts.append(("comment", ""))
        elif act in {f".{f}" for f in _TEMPLATE_FIELDS}:
            parts.append(("field", act[1:]))
        elif (cond := re.fullmatch(r"if\s+\.(\w+)", act)) and cond.group(1) in _TEMPLATE_FIELDS:
            parts.append(("if", cond.group(1)))
        elif act in ("else", "end"):
            parts.append((act, ""))
        else:
            raise ServingError(400, f"template: {{{{ {act} }}}} is not supported: a template here may use "
                                    f"{TEMPLATE_HELP}", param="template")
        pos = m.end()
        if m.group(3):
            rest = template[pos:]
            pos += len(rest) - len(rest.lstrip(" \t\r\n"))
    if "{{" in template[pos:]:
        raise ServingError(400, "template: an action {{ ... }} is not closed", param="template")
    parts.append(template[pos:])
    out: list[str] = []
    # (the enclosing blocks write, this branch is taken): the top's pair says whether text is written now (it was
    # all() over the stack at each part: 30,000 nested ifs, 0.75 MB, held the event loop 99 s)
    stack: list[tuple[bool, bool]] = []

    def writing() -> bool:
        return not stack or stack[-1][0] and stack[-1][1]

    for part in parts:
        if isinstance(part, str):
            if writing():
                out.append(part)
            continue
        kind, arg = part
        if kind == "field" and writing():
            out.append(fields.get(arg, ""))
        elif kind == "if":
            stack.append((writing(), bool(fields.get(arg))))
        elif kind == "else":
            if not stack:
                raise ServingError(400, "template: {{ else }} outside an {{ if }}", param="template")
            w, t = stack.pop()
            stack.append((w, not t))
        elif kind == "end":
            if not stack:
                raise ServingError(400, "template: {{ end }} without an {{ if }}", param="template")
            stack.pop()
    if stack:
        raise ServingError(400, "template: an {{ if }} has no {{ end }}", param="template")
    return "".join(out)


class EmbedRequest(_Loose):
    model: str
    # (bounded as /v1/embeddings' input: 100,000 inputs held the server, every tenant's requests, for minutes)
    input: str | Annotated[list[str], Field(max_length=p.MAX_EMBED_INPUTS)] = ""
    truncate: bool = True  # an input longer than the context keeps its start (False: a 400)
    dimensions: int | None = None
    options: Options | None = None  # (num_ctx: the context an input is cut to, `_embed`; the rest change nothing)
    keep_alive: Any = None


class EmbeddingsRequest(_Loose):  # the older endpoint's
    model: str
    prompt: str = ""
    options: Options | None = None
    keep_alive: Any = None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _error(status: int, message: str, e: ServingError | None = None) -> JSONResponse:
    """Ollama's error; `e`'s headers go with it (a 429's or a drain's 503's Retry-After, as the OpenAI routes send)."""
    return JSONResponse({"error": message}, status_code=status, headers=e.headers() if e is not None else None)


def served(request: Request, tenant: Any, name: Any) -> Any:
    """The served name an Ollama model name means, for `tenant` (`ollama_names.pick`: the CLI's `run`, `show`,
    `stop` and `pull` read a name so too). Ollama names every model with a tag, `:latest` when none is given
    (`smollm2` and `smollm2:latest` are one model there, and clients and scripts send either); served names have
    none here, so `:latest` is dropped unless a model answers to the whole name. Its names may carry its own
    registry's host and namespace (`library/smollm2`, `registry.ollama.ai/library/smollm2`: the name in full, as its
    manifests are kept), dropped so too; another host or namespace is another model. And they are matched ignoring
    the case of their ASCII letters (`Llama3` finds `llama3`: its model.Name compares with EqualFold and its server
    looks a name up among the manifests so), where a served name is exact (the OpenAI routes keep that, as vLLM's
    do): the one name the tenant may use that equals it ignoring case; two such names, differing only in case, and
    none exact: neither (the 404, each still found by its exact name). Replies still echo the name as sent."""
    if not isinstance(name, str) or not name:
        return name
    return request.app.state.serving.ollama_pick(tenant, name) or name  # (none: the 404 to come)


# the OpenAI request's fields that Ollama's options set, and the option each is (an error names the one sent)
OPTION_OF = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "seed": "seed",
             "stop": "stop", "repetition_penalty": "repeat_penalty", "presence_penalty": "presence_penalty",
             "frequency_penalty": "frequency_penalty", "max_tokens": "num_predict"}


# `format` as the chat path's errors name it (response_format, a JSON schema's json_schema.schema)
_FORMAT_TERMS = ((re.compile(r"\bresponse_format(?:\.json_schema(?:\.schema)?)?\b"), "format"),)


def _sampling(body: _Base, model: str) -> dict[str, Any]:
    """The OpenAI request fields `body`'s options and format mean (for `model`, the served name it asks for)."""
    o = body.options or Options()
    out: dict[str, Any] = {"model": model}
    for ours, theirs in OPTION_OF.items():
        if ours not in ("max_tokens", "stop") and (v := getattr(o, theirs)) is not None:
            out[ours] = v
    if out.get("seed") == -1:  # (Ollama's sampler seeds no generator for -1, its default: a random draw each
        # request, where the engine took -1 as a fixed seed and gave one reply to every request sending it)
        del out["seed"]
    # Ollama's sampler takes any value, clamped: a temperature below 0 is 0 (greedy), top_k at or below 0 is off,
    # top_p and min_p are held to [0, 1], and top_p 0 keeps the likeliest token alone (greedy), where the OpenAI
    # request's ranges would make each a 400
    if out.get("temperature", 0) < 0:
        out["temperature"] = 0.0
    if out.get("top_k", 1) <= 0:
        out["top_k"] = -1
    if "min_p" in out:
        out["min_p"] = min(max(out["min_p"], 0.0), 1.0)
    if "top_p" in out:
        out["top_p"] = min(out["top_p"], 1.0)
        if out["top_p"] <= 0:
            del out["top_p"]
            out["top_k"] = 1
    if o.num_predict is not None and o.num_predict > 0:
        out["max_tokens"] = o.num_predict
    if body.format == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(body.format, dict):
        # (closed, as Ollama's grammar is: llama.cpp's json-schema-to-grammar takes an object schema that does not
        # say otherwise to allow only its own properties, so a pydantic model_json_schema(), which says nothing,
        # parses back into its model; an open one let the model write keys of its own until num_predict cut it)
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "format",
                                                                         "schema": closed_schema(body.format, "format")}}
    elif body.format not in (None, ""):
        raise ServingError(400, f"format must be \"json\" or a JSON schema, got {body.format!r}")
    return out


def _as(model: type[BaseModel], data: Any) -> Any:
    """`data` validated as `model` (an Ollama request, or the OpenAI request it means): its errors are the client's
    (400), naming the Ollama option a field of the OpenAI request came from (`OPTION_OF`)."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = telling_error(e.errors())
        where = ".".join(field_path(err["loc"]))
        head, dot, rest = where.partition(".")
        if model in (p.ChatCompletionRequest, p.CompletionRequest) and head in OPTION_OF:
            where = f"options.{OPTION_OF[head]}{dot}{rest}"
        if not where and not isinstance(data, dict):  # (not pydantic's words, which name this module's class)
            raise ServingError(400, f"the request body must be a JSON object, not {json_kind(data)}") from None
        if err["type"] == "missing" and where:  # (Ollama's words: "model is required")
            raise ServingError(400, f"{where} is required") from None
        raise ServingError(400, f"{where}: {err['msg']}" if where else err["msg"]) from None


def _parsed(raw: bytes) -> Any:
    """A request body's JSON (none: an empty object); a 400 when it is not JSON, or nested deeper than the parser
    goes (its RecursionError was a 500)."""
    try:
        return json.loads(raw or b"{}")
    except RecursionError:
        raise ServingError(400, "the request body is not valid JSON: it is nested too deeply") from None
    except ValueError as e:
        raise ServingError(400, f"the request body is not valid JSON: {e}") from None


async def _body(request: Request, model: type[BaseModel], counted: bool = False) -> Any:
    """The request's body as `model`. `counted` (a route that runs a generation): a body refused is a refused
    request, counted under its key's tenant as the route's other refusals are, after the key (a 401 first, as the
    OpenAI routes answer a caller without one whatever its body holds)."""
    raw = await request.body()
    try:
        return _as(model, _parsed(raw))
    except ServingError as e:
        if counted:
            tenant = auth.tenant(request)  # (its 401 counts itself)
            try:
                name = json.loads(raw).get("model")
            except (ValueError, RecursionError, AttributeError):
                name = None
            request.app.state.controller.count_refusal(name if isinstance(name, str) else None, tenant.name,
                                                       e.status)
        raise


def _stats(gen: Tracked) -> dict[str, Any]:
    """Ollama's closing counts; durations in nanoseconds (load: the time it waited for its model to be loaded, its
    registration on the engine and its weights' load into VRAM, as Ollama's is the scheduler's wait for a runner;
    prompt: arrival to first token, less the load; eval: first token to now, as Ollama's runner times it until its
    final response: never 0 once a token is made, where clients divide by it for a tokens-per-second rate; first
    to last token made a one-token reply's 0). total = load + prompt + eval."""
    end = time.monotonic()
    first = gen.t_first or end
    load = min(max(0.0, gen.load_s), max(0.0, first - gen.t_arrival))
    ns = lambda s: int(max(0.0, s) * 1e9)  # noqa: E731
    return {"total_duration": ns(end - gen.t_arrival), "load_duration": ns(load),
            "prompt_eval_count": gen.prompt_tokens, "prompt_eval_duration": ns(first - gen.t_arrival - load),
            "eval_count": gen.completion_tokens, "eval_duration": ns(end - first)}


THINK_LEVELS = ("high", "medium", "low")


def _think(me: Any, body: _Base) -> tuple[dict[str, Any], bool]:
    """What a request's `think` means for model `me`: the chat template's switch (Qwen3's `enable_thinking`, set
    either way when `think` is sent) and whether the reply's thinking goes apart from its content (`thinking`), as
    Ollama gives it. Asked of a model whose template has no thinking: a 400, as Ollama answers."""
    think = body.think
    if isinstance(think, str) and think not in THINK_LEVELS:
        raise ServingError(400, f"think must be true, false or one of {', '.join(THINK_LEVELS)}, got {think!r}")
    wants = think is not None and think is not False
    if wants and not _thinks(me):
        raise ServingError(400, f'"{body.model}" does not support thinking')
    if think is None and _thinks(me):
        # not sent, to a model that thinks: on, as Ollama's chat and generate handlers default it for a model with
        # the thinking capability (its `thinking` apart; the reply's `<think>` block was left in the content, and
        # one the template opened in the prompt left a stray `</think>` there). With a `format` too, as Ollama's
        # (its default does not look at the format): the think block, then the JSON (`_format_after_thinking`);
        # it was left as the template has it, the grammar holding the reply to the JSON from its first token
        think, wants = True, True
    kwargs = {"enable_thinking": wants} if think is not None and _switch(me) else {}
    return kwargs, wants


def _format_after_thinking(req: Any, opened: bool) -> Any:
    """`req` (its response_format: the request's `format`) held to a think block, then the format's JSON: asked with
    `think` of a model that thinks, the format's grammar held the reply to the JSON from its first token, so where
    the template opens the block in the prompt (Qwen3's Thinking-2507, DeepSeek-R1: the reply starts inside it) the
    JSON was read as the thinking and the content was empty. As vLLM's reasoning parser holds a reply to its
    structured output only once its reasoning has ended (and Ollama, which applies the format after the thinking):
    free text up to `</think>` (`opened`), or an optional `<think>...</think>` block the reply writes itself, then
    the JSON. (As a vLLM structured output's Lark grammar: `OpenAIServing._grammar` takes it.)"""
    response_grammar(req.response_format)  # (compiled alone first: its 400 names `format`, as without `think`)
    schema = response_schema(req.response_format)
    block = "/(?s:.*)<\\/think>/" if opened else f"/{re.escape(THINK_OPEN)}(?s:.*)<\\/think>/"
    grammar = "\n".join([
        f"start: think SPACE body{'' if opened else ' | body'}",
        f"think[lazy]: {block}",  # (lazy: it ends at the first `</think>`)
        "SPACE: /[ \\t\\r\\n]{0,8}/",  # (after the block, as templates write it: bounded, not padding)
        f"body: %json {json.dumps({**schema, 'x-guidance': JSON_LAYOUT})}"])
    return req.model_copy(update={"response_format": None, "structured_outputs": {"grammar": grammar}})


async def _run(request: Request, body: _Base, chat: bool) -> Response:
    serving: OpenAIServing = request.app.state.serving
    ctl = request.app.state.controller
    tenant, model = None, body.model
    try:
        tenant = auth.tenant(request)
        _keep_alive_s(body.keep_alive)  # (a 400 before anything is done when it is no duration)
        model = served(request, tenant, body.model)
        if not (body.messages if chat else body.prompt):  # Ollama's "load the model" request: nothing to generate
            return await _load(request, tenant, model, body, chat)
        asked = serving.lookup(tenant, model)
        think_kwargs, thinking = _think(asked, body)
        extra: dict[str, Any] = {"chat_template_kwargs": think_kwargs} if think_kwargs else {}
        if body.top_logprobs is not None and not 0 <= body.top_logprobs <= 20:
            raise ServingError(400, "top_logprobs must be between 0 and 20")
        k = (body.top_logprobs or 0) if body.logprobs else None  # (None: no logprobs)
        if chat:
            if any(m.images for m in body.messages):
                raise ServingError(400, "images are not supported: the served models take text")
            msgs = [_message(m) for m in body.messages]
            if prefills(msgs):  # (a last assistant message is continued, as Ollama's template leaves it open)
                extra["continue_final_message"] = True
            req = _as(p.ChatCompletionRequest, {**_sampling(body, model), "messages": msgs,
                                                **({"tools": body.tools} if body.tools else {}), **extra,
                                                **({"logprobs": True, "top_logprobs": k} if k is not None else {})})
        else:
            if body.images:  # (as the chat's; the one sent named, not both)
                raise ServingError(400, "images are not supported: the served models take text")
            if body.suffix:  # (Ollama's words for a model whose template has no fill-in-the-middle)
                raise ServingError(400, f'"{body.model}" does not support insert (suffix): the served models '
                                        "complete a prompt, with no fill-in-the-middle")
            if body.raw and (body.system or body.template):  # (Ollama's 400: they were dropped without a word;
                # a `context` is taken, continued as a raw prompt's ids)
                raise ServingError(400, "raw mode does not support template or system: a raw prompt is fed as it is "
                                        "(put the system text in the prompt, or leave raw out)")
            if body.raw:
                req = _as(p.CompletionRequest, {"max_tokens": None, **_sampling(body, model), "prompt": body.prompt})
            elif body.template or not getattr(asked.tokenizer, "chat_template", None):
                # the request's own template over the system message and the prompt, fed as it is; for a model with no
                # chat template (a base model), Ollama's default one, `{{ .Prompt }}`: the prompt as it is (it was a
                # 400 saying to send raw, where Ollama's generate completes a text model's prompt)
                prompt = await serving.offload(render_template, body.template or "{{ .Prompt }}",
                                               {"System": body.system or "", "Prompt": body.prompt})
                req = _as(p.CompletionRequest, {"max_tokens": None, **_sampling(body, model), "prompt": prompt})
            else:  # the model's template over the system message and the prompt, as Ollama applies it
                msgs = ([{"role": "system", "content": body.system}] if body.system else [])
                req = _as(p.ChatCompletionRequest, {**_sampling(body, model), "messages": [
                    *msgs, {"role": "user", "content": body.prompt}], **extra,
                    **({"logprobs": True, "top_logprobs": k} if k is not None else {})})
        if body.options is not None and body.options.stop:  # (checked by Options, past the OpenAI request's number)
            req = req.model_copy(update={"stop": list(body.options.stop)})
        if thinking and req.response_format is not None and not (chat and body.tools):
            # (with tools the format is the answer's beside the calls: `ToolPlan.answering`, left as it was)
            if isinstance(req, p.ChatCompletionRequest):  # (whether the template opens the block: its prompt's end)
                ids = await serving.offload(serving._chat_prompt, asked, req, think_kwargs, False)
                opened = _opened(asked, ids[-16:])
            else:  # (a raw prompt, or the request's own template's)
                opened = req.prompt.rstrip().endswith(THINK_OPEN)
            req = await serving.offload(_format_after_thinking, req, opened)  # (its grammar compiled: `_shaped`)
        me = serving.entry(tenant, req.model)
        ctx = _context(me, body.options)
        context = None if chat else body.context
        if context is not None and not all(isinstance(t, int) and not isinstance(t, bool) for t in context):
            raise ServingError(400, "context must be the token ids a previous /api/generate returned")
        templated = isinstance(req, p.ChatCompletionRequest)

        async def begin(req: Any, cut: bool = False) -> tuple[Any, ToolPlan | None, Tracked]:
            if templated and not getattr(me.tokenizer, "chat_template", None):  # (Ollama's answers first)
                raise ServingError(400, f"model '{req.model}' has no chat template: use /api/generate, which "
                                        "completes a prompt")
            # the ids of a raw prompt (with the BOS its tokenizer adds, as Ollama's runner; after `context`, which
            # starts with it, none) or of the template's, after the earlier turns' (`context`)
            if not chat:
                params = await serving._shaped(serving._params(me, req, req.max_tokens, k), req)
                new = await (serving.offload(serving._chat_prompt, me, req, think_kwargs, False) if templated else
                             serving.offload(encode_prompt if not context else encode, me.tokenizer, req.prompt))
                what = "context" if context else "prompt"
                ids = serving._check_ids(me, _truncated(me, [*(context or []), *new], body, what, ctx), what)
                if ctx < me.max_model_len:  # (num_ctx: the reply's room is what the prompt leaves of it)
                    params = dataclasses.replace(params, max_tokens=min(params.max_tokens or ctx, ctx - len(ids)))
                gen = await serving.generate(me, tenant, req.model, [ids], params, 1, ctl.new_id("ollama"), body.stream)
                # (as start_chat's: whether the prompt opened a think block the reply starts inside, `thinking.opened`;
                # without it a generate's thinking, `think` sent or not, all went to `response`)
                gen.prompt_tail = ids[-16:]
                return me, None, gen
            # (then as the chat endpoint admits it)
            if req.tools and not me.spec.tool_call_parser:  # (Ollama's answer for a model whose template has none)
                raise ServingError(400, f"{req.model} does not support tools (serve it with a tool-call parser: "
                                        "tokenpool serve MODEL_DIR --tool-call-parser hermes, or tool_call_parser: hermes in "
                                        "its configuration, for a model that writes hermes calls as Qwen2.5 does)")
            prompt: list[int] | None = None
            if ctx < me.max_model_len:  # num_ctx: the prompt (rendered first, for the reply's room) held to it
                prompt = await serving.chat_prompt_ids(tenant, req)
                n = len(prompt)
                if n >= ctx and not cut:
                    raise _too_long(me, n, "messages", ctx)
                room = ctx - n if n < ctx else _cut(ctx, n, body)[1]
                req = req.model_copy(update={"max_tokens": min(req.max_tokens or room, room)})
            return await serving.start_chat(req, tenant, ctl.new_id("ollama"), body.stream,
                                            (lambda ids: _truncated(me, ids, body, "messages", ctx)) if cut else None,
                                            prompt=prompt)  # (that rendering fed, not rendered again)

        cut = False  # (chat) its last message alone is past the context: its prompt's tokens are cut
        while True:
            try:
                me, tools, gen = await begin(req, cut)
                break
            except ServingError as e:
                if e.code != "context_length_exceeded":
                    raise
                if e.param == "max_tokens" and req.max_tokens is not None:
                    # num_predict past the context the prompt leaves: Ollama generates on until the context is full,
                    # so the reply takes the room there is (done_reason "length"), where max_tokens would be a 400
                    req = req.model_copy(update={"max_tokens": None})
                    continue
                if not chat or body.truncate is False or e.param == "max_tokens" or cut:
                    raise
                # a conversation longer than the context: Ollama drops its oldest messages until it fits, keeping
                # the system messages and the last one, then its runner cuts the prompt's tokens as a generate
                # prompt's when that is still too long (`truncate: false`, Ollama's too: the error instead)
                shortest, cut = await _fewest_drops(serving, tenant, me, req, ctx)
                req = req.model_copy(update={"messages": shortest})
        _ask(ctl, me.spec.name, body.keep_alive)  # (after the request: 0 evicts once it is done)
    except ServingError as e:
        if e.status != 401 and not getattr(e, "counted", False):  # (auth counts its own; a generation its own)
            ctl.count_refusal(model, tenant.name if tenant else "-", e.status)  # (under the model it means)
        e.reworded(_FORMAT_TERMS)  # (the chat path's error names the field sent: `format`, not `response_format`)
        return _error(e.status, e.message if e.status != 404 else f"model '{body.model}' not found", e)
    key = "message" if chat else "response"
    out_ids: list[int] = []  # (generate) the reply's ids, for the `context` of its last line

    def line(text: str, done: bool = False, reason: str | None = None, calls: list | None = None,
             thought: str = "", logprobs: list | None = None) -> bytes:
        msg: dict[str, Any] = {"role": "assistant", "content": text}
        if thought and chat:
            msg["thinking"] = thought
        if calls:
            msg["tool_calls"] = calls
        d: dict[str, Any] = {"model": body.model, "created_at": _now(), key: msg if chat else text, "done": done}
        if thought and not chat:
            d["thinking"] = thought
        if logprobs:  # (Ollama's: the tokens this line carries, each with its top_logprobs)
            d["logprobs"] = logprobs
        if done:
            d.update(done_reason=reason or "stop", **_stats(gen))
            # (Ollama's since its runners report it: of prompt_eval_count, which counts the whole prompt whatever
            # was cached, the tokens whose KV the prefix cache held)
            d["prompt_eval_cached_count"] = gen.cached_tokens
            if not chat:  # (Ollama's: what a next /api/generate passes back as `context` to continue)
                d["context"] = [*gen.subs[0].prompt_ids, *out_ids]
        return json.dumps(d, ensure_ascii=False).encode() + b"\n"

    def logprobs_of(d: Any) -> list[dict[str, Any]]:
        return [lp.model_dump() for lp in serving._chat_logprobs(me, d, k)] if k is not None else []

    # (a template that opens the think block in the prompt: the reply starts inside it)
    begun = thinking and _opened(me, getattr(gen, "prompt_tail", None))
    # (`think` off, to a template that thinks all the same, no switch turning it off: the think block the reply may
    # write is content, and its calls are read past it, as the chat reply's: a <tool_call> in it is thinking)
    past = None if thinking else thinks_first(me, gen, req, tools)
    if body.stream:
        return StreamingResponse(_stream(serving, gen, line, tools, out_ids, _Split(begun) if thinking else None,
                                         logprobs_of, past), media_type="application/x-ndjson")
    status = 499
    try:
        lps: list[dict[str, Any]] = []
        text, reason = await unless_disconnected(request, _collect(gen, out_ids, lambda d: lps.extend(logprobs_of(d))))
        status = 200
        thought, text = _Split(begun).feed(text, True) if thinking else ("", text)
        if tools is not None:  # (what the stream gives, its lines put together: the whole calls, and the rest
            # as content (a call cut by num_predict or a stop string), as Ollama's reply not streamed is its stream's)
            text, calls = _CallLines(serving, tools, past).feed(text, True, reason)
            return Response(line(text, True, reason, calls, thought, lps), media_type="application/json")
        return Response(line(text, True, reason, thought=thought, logprobs=lps), media_type="application/json")
    except ClientGone:
        return Response(status_code=499)
    except ServingError as e:
        status = e.status
        return _error(e.status, e.message, e)
    finally:
        serving.active.discard(gen)
        gen.close(status)


# Go's time.ParseDuration, as Ollama parses a keep_alive string: [-+]?, then one or more number+unit ("5m", "1h30m",
# "-1m", "300ms", ".5h"), or "0"; no "d", no spaces, no bare number ("300" is Go's "missing unit"). A JSON number is
# seconds. Negative: forever.
GO_UNITS_NS = {"ns": 1, "us": 10**3, "\u00b5s": 10**3, "\u03bcs": 10**3, "ms": 10**6, "s": 10**9, "m": 60 * 10**9,
               "h": 3600 * 10**9}
_GO_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([^\d.]*)")
_GO_MAX_NS = (1 << 63) - 1


def go_duration_s(text: str) -> float:
    """Seconds from a Go duration string (time.ParseDuration's grammar and its 292-year bound); ValueError, worded as
    Go words it, for anything Go refuses."""
    body = text[1:] if text[:1] in ("-", "+") else text
    if body == "0":
        return 0.0
    if not body:
        raise ValueError(f"invalid duration {json.dumps(text)}")
    ns, at = Decimal(0), 0  # (exact: Go's bound is to the nanosecond)
    while at < len(body):
        m = _GO_PART.match(body, at)
        if m is None:
            raise ValueError(f"invalid duration {json.dumps(text)}")
        number, unit = m.groups()
        if not unit:
            raise ValueError(f"missing unit in duration {json.dumps(text)}")
        if unit not in GO_UNITS_NS:
            raise ValueError(f"unknown unit {json.dumps(unit)} in duration {json.dumps(text)}")
        ns += Decimal(number) * GO_UNITS_NS[unit]
        at = m.end()
    if ns > _GO_MAX_NS + (text[0] == "-"):
        raise ValueError(f"invalid duration {json.dumps(text)}")
    return float(-ns if text[0] == "-" else ns) / 1e9


def _keep_alive_s(keep_alive: Any) -> float | None:
    """An Ollama keep_alive in seconds (None: not sent): a JSON number of seconds, or a Go duration string (not the
    configuration file's spellings: "1d" is Go's error, so Ollama's); negative means forever. Anything else: a 400,
    as Ollama answers one."""
    if keep_alive is None:
        return None
    if isinstance(keep_alive, (int, float)) and not isinstance(keep_alive, bool):
        return float(keep_alive if keep_alive < 0 else int(keep_alive))  # (whole seconds, as Go's int(t): 0.5 is 0)
    if not isinstance(keep_alive, str):
        raise ServingError(400, f"keep_alive: a number of seconds or a duration string such as \"5m\", not "
                                f"{json.dumps(keep_alive)}")
    try:
        return go_duration_s(keep_alive)
    except ValueError as e:
        raise ServingError(400, f"keep_alive: {e} (a Go duration string, units ns, us, ms, s, m, h: \"5m\", "
                                "\"1h30m\", \"-1m\" for ever; or a JSON number of seconds, unquoted: 300, -1)") from None


def _zero(keep_alive: Any) -> bool:
    """Whether an Ollama keep_alive means "unload now": a duration of zero (0, "0", "0s", "0m", ...)."""
    return _keep_alive_s(keep_alive) == 0.0


def _unloads(ctl: Any, keep_alive: Any) -> bool:
    """Whether a request's keep_alive frees its model's VRAM once its requests finish (Ollama's keep_alive 0; `ollama
    stop` is a load request with it): on a single-user server only (`_ask`)."""
    return _zero(keep_alive) and ctl.tenants.single_user


def _ask(ctl: Any, name: str, keep_alive: Any) -> None:
    """A request's keep_alive applied to its model, as Ollama's replaces the loaded model's (`Controller.
    ask_keep_alive`): 0 frees its VRAM once its requests finish, any other holds it (its weights, a `replicas.min: 0`
    model's registration) that long after its last use instead of its configured keep_alive; none sent leaves it.
    A single user's call: on a server with several tenants one must not evict, nor hold, the others' models, so
    there it is ignored (operators use `tokenpool stop`, or the admin API's keep_alive)."""
    seconds = _keep_alive_s(keep_alive)
    if seconds is not None and ctl.tenants.single_user:
        ctl.ask_keep_alive(name, seconds)


async def _load(request: Request, tenant: Any, model: str, body: _Base, chat: bool) -> Response:
    """A request with nothing to generate: Ollama's load, answered once the model's weights are in memory, as
    Ollama's is once its runner has the model (`_make_resident`); with keep_alive 0 its unload (`_unloads`), at once
    (Ollama's: expired before any load)."""
    ctl = request.app.state.controller
    serving: OpenAIServing = request.app.state.serving
    me = serving.entry(tenant, model)
    unload = _unloads(ctl, body.keep_alive)
    if not unload:
        await _make_resident(request, serving, tenant, me, model)
    _ask(ctl, me.spec.name, body.keep_alive)
    key = "message" if chat else "response"
    return JSONResponse({"model": body.model, "created_at": _now(),
                         key: {"role": "assistant", "content": ""} if chat else "", "done": True,
                         "done_reason": "unload" if unload else "load"})


async def _make_resident(request: Request, serving: OpenAIServing, tenant: Any, me: Any, model: str) -> None:
    """Bring `me`'s weights into memory as a request for it does: residency is the pool's, which loads a model's
    weights for a step of it (evicting others as it must), so a one-token greedy generation of a one-token prompt
    is run and waited for (placed and admitted as any request: it is the engine's work). Its reply is dropped, and
    nothing of it is charged to the tenant or counted in its usage (Controller.generate's `load`): it generated
    nothing for the caller. An error is the load's (a 503 of a load that failed; a tenant's 429: one over its rate
    limits may not load, though a load takes nothing from them)."""
    tok = me.tokenizer
    first = next((t for t in (getattr(tok, "bos_token_id", None), getattr(tok, "eos_token_id", None))
                  if isinstance(t, int) and not isinstance(t, bool)), None)
    ids = [first] if first is not None else (encode(tok, " ")[:1] if tok is not None else []) or [0]
    params = SamplingParams(max_tokens=1, temperature=0.0, lora=lora_of(me, model))
    gen = await serving.generate(me, tenant, model, [ids], params, 1, request.app.state.controller.new_id("ollama"),
                                 False, load=True)
    status = 499
    try:
        await _collect(gen)
        status = 200
    except ServingError as e:
        status = e.status
        e.counted = True  # type: ignore[attr-defined]  # (by gen.close: `_run` must not count it again)
        raise
    finally:
        serving.active.discard(gen)
        gen.close(status)


async def _collect(gen: Tracked, ids: list[int] | None = None, each: Any = None) -> tuple[str, str | None]:
    """The reply's text and finish reason (its token ids appended to `ids`; `each` called with each delta)."""
    parts, reason = [], None
    async for _, d in gen.events():
        parts.append(d.text)
        if each is not None:
            each(d)
        if ids is not None:
            ids += d.token_ids
        if d.finished:
            reason = d.finish_reason
            if d.error:
                raise ServingError(503 if d.error_kind != "invalid" else 400, d.error)
    return "".join(parts), reason


NUM_KEEP = 4  # Ollama's default num_keep
MIN_CTX = 4  # Ollama's least num_ctx (its scheduler raises a smaller one to it)
_capped: set[tuple[str, int]] = set()  # (model, num_ctx) pairs warned of (`_context`): once each


def _context(me: Any, options: Options | None) -> int:
    """The context a request runs in: Ollama's options.num_ctx, at least MIN_CTX, at most the model's max_model_len (a
    larger one is capped, with Ollama's warning, once per model and value); none sent (or not above 0): the model's.
    Ollama loads its runner with num_ctx; here the engine's context stays the model's, and the request is held to
    num_ctx: its prompt cut to fit as one past the model's context is (`_truncated`), its reply's room what is left;
    an input to embed cut to it as well, or with `truncate: false` a 400 (`_embed`)."""
    n = options.num_ctx if options is not None else None
    if n is None or n <= 0:
        return me.max_model_len
    if n > me.max_model_len:
        if (me.spec.name, n) not in _capped:
            _capped.add((me.spec.name, n))
            log.warning("requested context size too large for model: model=%s num_ctx=%d max_model_len=%d",
                        me.spec.name, n, me.max_model_len)
        return me.max_model_len
    return max(n, MIN_CTX)


def _too_long(me: Any, n: int, what: str, limit: int) -> ServingError:
    """The 400 of a prompt of `n` tokens that leaves no room in the context `limit` (`truncate: false`)."""
    if limit >= me.max_model_len:
        return too_long(me, n, what)
    return embeddings.num_ctx_too_long(me, limit, f"the {what}", n, what)


def _cut(limit: int, n: int, body: _Base) -> tuple[int, int]:
    """(its first tokens kept, the reply's room) of a prompt of `n` tokens cut to the context `limit` (`_truncated`)."""
    o = body.options or Options()
    keep = NUM_KEEP if o.num_keep is None else n if o.num_keep < 0 else o.num_keep
    keep = max(0, min(keep, limit - 2))  # (a token of the prompt's end and one of the reply's fit)
    room = (limit - keep) // 2
    if o.num_predict is not None and o.num_predict > 0:
        room = min(room, o.num_predict)
    return keep, max(room, 1)


def _truncated(me: Any, ids: list[int], body: _Base, what: str, limit: int) -> list[int]:
    """A prompt's ids (a generate's, or a chat's whose last message alone is too long) as Ollama's runner cuts one past
    the context (`limit`: `_context`'s): its first num_keep tokens (the template's start), then its last ones,
    dropping those between, with a warning (`truncate: false`: the 400 instead). Ollama cuts it to the whole context
    and its context shift frees half of what follows the kept tokens at the first generated token; here there is no
    shift, so the reply's room is left at once: num_predict's, at most that half."""
    if len(ids) < limit:  # (room for a token at least: num_predict past the room fills it, `_run`)
        return ids
    if body.truncate is False:
        raise _too_long(me, len(ids), what, limit)
    keep, room = _cut(limit, len(ids), body)
    new = [*ids[:keep], *ids[len(ids) - (limit - room - keep):]]
    log.warning("truncating input prompt: limit=%d prompt=%d keep=%d new=%d", limit, len(ids), keep, len(new))
    return new


async def _fewest_drops(serving: OpenAIServing, tenant: Any, me: Any, req: p.ChatCompletionRequest,
                        limit: int) -> tuple[list[Any], bool]:
    """The conversation of `req` (past the context) without the fewest oldest messages (`_drop_oldest`) that leave
    its prompt room to generate, found by a binary search over how many go, each try rendered and tokenized only (a
    few dozen for thousands of messages); and whether even the shortest (its system messages and last one) is too
    long, so its prompt's tokens must be cut too (`_truncated`)."""
    msgs = req.messages
    droppable = sum(m.role not in ("system", "developer") for m in msgs[:-1])

    async def fits(n: int) -> bool:
        count = await serving.chat_prompt_tokens(tenant, req.model_copy(update={"messages": _drop_oldest(msgs, n)}))
        return count < limit

    if droppable == 0:
        return msgs, True
    if not await fits(droppable):
        return _drop_oldest(msgs, droppable), True  # type: ignore[return-value]
    lo, hi = 1, droppable  # (dropping hi fits; dropping none does not: the error that brought it here)
    while lo < hi:
        mid = (lo + hi) // 2
        if await fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return _drop_oldest(msgs, lo), False  # type: ignore[return-value]


def _drop_oldest(msgs: list[Any], n: int = 1) -> list[Any] | None:
    """A conversation without its `n` oldest messages that are neither system messages nor the last (as many as
    there are; None: none left to drop), as Ollama shortens a chat that does not fit its context."""
    drop = [i for i, m in enumerate(msgs[:-1]) if m.role not in ("system", "developer")][:n]
    if not drop:
        return None
    gone = set(drop)
    return [m for i, m in enumerate(msgs) if i not in gone]


def _message(m: Message) -> dict[str, Any]:
    """An Ollama chat message as the chat request takes it: an assistant's calls with their arguments as JSON text
    (each with the id it came back with, as Ollama's replies give them since 0.12.10; one made up for a call sent
    without), a tool message's function as its name and the call it answers as its `tool_call_id`."""
    d: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        calls = []
        for i, c in enumerate(m.tool_calls):
            fn = c.get("function") if isinstance(c.get("function"), dict) else {}
            args = fn.get("arguments", {})
            cid = c.get("id") if isinstance(c.get("id"), str) and c.get("id") else f"call_{i}"
            calls.append({"id": cid, "type": "function", "function": {
                "name": fn.get("name"), "arguments": args if isinstance(args, str) else json.dumps(args)}})
        d["tool_calls"] = calls
    if m.tool_name is not None:
        d["name"] = m.tool_name
    if m.tool_call_id:
        d["tool_call_id"] = m.tool_call_id
    return d


def _call_id() -> str:
    """A tool call's id as Ollama's chat gives each call since 0.12.10 (its server's toolCallId: `call_` and 8
    lower-case letters or digits), which a client sends back as the tool message's `tool_call_id`."""
    return "call_" + "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(8))


def _calls(serving: OpenAIServing, text: str, reason: str | None, tools: ToolPlan) -> list[dict[str, Any]] | None:
    """A whole output's tool calls as Ollama writes them (arguments as objects), or None when it is text."""
    msg, _ = serving._reply(text, reason, tools)
    if not msg.tool_calls:
        return None
    return [{"id": _call_id(), "function": {"index": i, "name": c.function.name,
                                            "arguments": json.loads(c.function.arguments)}}
            for i, c in enumerate(msg.tool_calls)]


class _CallLines:
    """A streamed reply's tool calls as Ollama's chat stream gives them: each call in a line of its own as soon as it
    is whole (Ollama's tool parser emits `message.tool_calls` once it has parsed a call), not the reply held to its
    end. With the hermes syntax ("auto": text, or `<tool_call>` blocks; `ToolPlan.opening` tells which once the
    reply's start does) a text reply streams as it comes, as Ollama's does, and calls after it are read as calls
    (`Lead`); the grammar's other layouts (a call named, a list of calls) are read whole at the end. `past`
    (`serving.thinks_first`'s, not None): a think block the reply begins with goes as content as it comes, and its
    calls are read past it (`Thought`)."""

    def __init__(self, serving: OpenAIServing, tools: ToolPlan, past: bool | None = None):
        self.serving, self.tools = serving, tools
        self.thought = Thought(past) if past is not None else None
        self.text, self.mode = "", None if tools.hermes else "held"  # None: not known yet; "text"; "calls"
        self.sent = 0  # the whole calls sent
        self.closes = 0  # the closing tags seen (a call may be whole only where one more came)
        self.lead = Lead()  # (a text reply) its calls may follow it: its text sent up to their opening

    def feed(self, text: str, done: bool, reason: str | None) -> tuple[str, list[dict[str, Any]]]:
        """(content to send, calls to send) for the reply's next `text`; `done`: the reply is over."""
        if self.thought is not None:
            head, rest = self.thought.feed(text, done)
            if rest is None:
                return head, []
            self.thought = None
            content, calls = self.feed(rest, done, reason)
            return head + content, calls
        self.text += text
        if self.mode is None:
            opening = self.tools.opening(self.text)
            if opening is None and not done:
                return "", []
            self.mode = "calls" if opening else "text"
            if self.mode == "text":
                text = self.text  # (what was held, then as it comes)
        if self.mode == "text" and not self.tools.text_then_calls:
            return text, []
        if self.mode == "text":
            shown, rest = self.lead.feed(text, done)
            if rest is None:
                return shown, []
            self.mode, self.text = "calls", ""  # (the calls after the text: from their opening on)
            content, calls = self.feed(rest, done, reason)
            return shown + content, calls
        if self.mode == "held":
            if not done:
                return "", []
            calls = _calls(self.serving, self.text, reason, self.tools)
            return ("", calls) if calls else (self.text, [])
        new: list[dict[str, Any]] = []
        closes = self.text.count(HERMES_CLOSE)
        if closes > self.closes or done:
            self.closes = closes
            cut = self.tools.cut_calls(self.text)
            whole = cut[0] if cut is not None else []
            new = [_ollama_call(self.sent + i, c) for i, c in enumerate(whole[self.sent:])]
            self.sent = len(whole)
        if not done:
            return "", new
        # the end: what no whole call holds (a call cut by num_predict, say) goes as content, as Ollama's parser
        # gives back what it could not parse; an output of no call at all, as its text
        if self.sent == 0:  # (a call num_predict cut before its name was whole is dropped, not its
            # `<tool_call>\n{"` as content: ToolPlan.cut_text, the chat reply's rule too; one whose name is whole
            # goes as content, as any call this parser could not read whole)
            kept = self.tools.cut_text(self.text) if reason == "length" else None
            return (self.text if kept is None else kept), new
        rest = self.text.split(HERMES_CLOSE)[-1] if self.text.count(HERMES_CLOSE) >= self.sent else ""
        return ("" if not rest.strip() else rest), new


def _ollama_call(index: int, call: dict[str, Any]) -> dict[str, Any]:
    """A call (ToolPlan's) as Ollama writes it: its id (`_call_id`), its arguments an object."""
    fn = call["function"]
    return {"id": _call_id(), "function": {"index": index, "name": fn["name"], "arguments": json.loads(fn["arguments"])}}


async def _stream(serving: OpenAIServing, gen: Tracked, line, tools: ToolPlan | None = None,
                  ids: list[int] | None = None, split: _Split | None = None,
                  logprobs_of: Any = None, past: bool | None = None) -> AsyncIterator[bytes]:
    """The NDJSON lines, the last `done`; with tools each call goes in a line of its own once it is whole
    (`_CallLines`), a text reply as it comes. An engine error once streaming is an `{"error": ...}` line (the status
    has gone). The reply's token ids are appended to `ids` before its last line is made. `split`: the thinking goes
    apart from the content; `logprobs_of`: a delta's logprobs, which go with the line its text goes in (with tools,
    held with it); `past`: `_CallLines`'."""
    status, held_lps = 499, []
    reader = _CallLines(serving, tools, past) if tools is not None else None
    try:
        async for _, d in gen.events():
            if ids is not None:
                ids += d.token_ids
            held_lps += logprobs_of(d) if logprobs_of is not None else []
            thought, text = split.feed(d.text, d.finished) if split else ("", d.text)
            calls: list[dict[str, Any]] = []
            if reader is not None:
                text, calls = reader.feed(text, d.finished, d.finish_reason)
            if calls:
                yield line(text, calls=calls, thought=thought, logprobs=held_lps)
                held_lps = []
            elif text or thought or (held_lps and (reader is None or reader.mode == "text")):
                yield line(text, thought=thought, logprobs=held_lps)
                held_lps = []
            if d.finished:
                if held_lps:  # (held with a call still being written: they go with the last line)
                    yield line("", logprobs=held_lps)
                yield line("", True, d.finish_reason)
        status = 200
    except ServingError as e:
        status = e.status
        yield json.dumps({"error": e.message}).encode() + b"\n"
    finally:
        serving.active.discard(gen)
        gen.close(status)


# (a ServingError raised here is answered in Ollama's shape by the app's handler, as every error under /api/)
@router.post("/chat")
async def chat(request: Request) -> Response:
    return await _unless_gone(request, _run(request, await _body(request, ChatRequest, counted=True), chat=True))


@router.post("/generate")
async def generate(request: Request) -> Response:
    return await _unless_gone(request, _run(request, await _body(request, GenerateRequest, counted=True), chat=False))


async def _unless_gone(request: Request, run: Any) -> Response:
    """A request's run, cancelled once its client has gone, while it waits to be admitted too (its model's load):
    it was placed after the wait and ran on the engine for nobody (the ollama CLI's Ctrl-C during a load, say)."""
    try:
        return await unless_disconnected(request, run)
    except ClientGone:
        return Response(status_code=499)


async def _embed(request: Request, model: str, raw: str | list[str], truncate: bool, dimensions: int | None,
                 normalize: bool, keep_alive: Any = None,
                 options: Options | None = None) -> tuple[list[list[float]], Tracked | None] | JSONResponse:
    """The embeddings of `raw`, each input held to the context `options` ask (num_ctx: `_context`), or the error
    response (refusals before the generation counted here, as `_run`'s)."""
    serving: OpenAIServing = request.app.state.serving
    tenant = None
    try:
        tenant = auth.tenant(request)
        # (a keep_alive that is no duration: a 400 before any work, after the key's 401, counted as the others)
        _keep_alive_s(keep_alive)
        return await embeddings.ollama_embed(serving, tenant, request, served(request, tenant, model), raw, truncate,
                                             dimensions, normalize, lambda me: _context(me, options))
    except ClientGone:
        return JSONResponse({}, status_code=499)
    except ServingError as e:
        if e.status != 401 and not getattr(e, "counted", False):
            request.app.state.controller.count_refusal(model, tenant.name if tenant else "-", e.status)
        return _error(e.status, e.message if e.status != 404 else f"model '{model}' not found", e)


def _ask_for(request: Request, model: str, keep_alive: Any) -> None:
    """`_ask` for the model an embedding request (done) named."""
    tenant = auth.tenant(request)
    _ask(request.app.state.controller, request.app.state.serving.lookup(tenant, served(request, tenant, model)).spec.name,
         keep_alive)


@router.post("/embed")
async def embed(request: Request) -> Response:
    """Ollama's: each input's embedding, L2-normalized, and the prompt's token count."""
    body = await _body(request, EmbedRequest, counted=True)
    got = await _embed(request, body.model, body.input, body.truncate, body.dimensions, normalize=True,
                       keep_alive=body.keep_alive, options=body.options)
    if isinstance(got, Response):
        return got
    vecs, gen = got
    if body.keep_alive is not None:  # (its requests are done: a keep_alive 0 evicts at once)
        _ask_for(request, body.model, body.keep_alive)
    stats = _stats(gen) if gen is not None else {}
    counts = {k: stats.get(k, 0) for k in ("total_duration", "load_duration", "prompt_eval_count")}  # (Ollama's)
    return JSONResponse({"model": body.model, "embeddings": vecs, **counts})


@router.post("/embeddings")
async def embeddings_legacy(request: Request) -> Response:
    """Ollama's older endpoint: one prompt's embedding, unnormalized (an empty prompt: an empty one)."""
    body = await _body(request, EmbeddingsRequest, counted=True)
    got = await _embed(request, body.model, body.prompt, True, None, normalize=False, keep_alive=body.keep_alive,
                       options=body.options)
    if isinstance(got, Response):
        return got
    if body.keep_alive is not None:
        _ask_for(request, body.model, body.keep_alive)
    return JSONResponse({"embedding": got[0][0] if got[0] else []})


def _digest(name: str, me: Any) -> str:
    """A model's digest as Ollama lists it (64 hex digits): the served name over its folder and when it was registered,
    so it stays while the model does. Ollama keeps its manifest's; the `ollama` CLI cuts it to 12 for its ID column
    (`m.Digest[:12]`), and panicked on the empty one this was (`ollama ls`, `ollama ps` with OLLAMA_HOST here)."""
    return hashlib.sha256(f"{name}\0{me.spec.path or ''}\0{me.created}".encode()).hexdigest()


def _parameter_count(me: Any) -> int | None:
    """The model's parameters, summed over its safetensors files' headers (their tensors' shapes; no weights read),
    as Ollama gives `general.parameter_count`; None for a model without such files (a paced one)."""
    return _weights(me)[0]


def _gguf_marker(me: Any) -> dict[str, Any] | None:
    """The conversion marker of a model converted from a GGUF file (`tokenpool serve FILE.gguf`, the default model):
    None for any other model; {} where it cannot be read."""
    folder = Path(me.spec.path) if me.spec.path else None
    if folder is None or not (folder / GGUF_MARKER).is_file():
        return None
    try:
        marker = json.loads((folder / GGUF_MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def _gguf_type(me: Any) -> str | None:
    """For a model converted from a GGUF file (`_gguf_marker`), the GGUF's own weights type as Ollama's
    `quantization_level` names it ("Q4_K_M", "Q8_0", "F16": the marker's, or read from the file it names; "" where
    neither gives one); None for any other model."""
    marker = _gguf_marker(me)
    if marker is None:
        return None
    kind = marker.get("file_type")
    if not kind and (src := _gguf_source(me, marker)):
        kind = gguf_file_type(src)  # (a conversion made before its marker kept the type)
    return kind if isinstance(kind, str) else ""


def _weights(me: Any) -> tuple[int | None, str]:
    """(parameter count, the dtype most of them have) over the model's safetensors headers; (None, "") without."""
    folder = Path(me.spec.path) if me.spec.path else None
    files = sorted(folder.glob("*.safetensors")) if folder is not None and folder.is_dir() else []
    if not files:
        return None, ""
    try:
        return _counted(tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files))
    except (OSError, ValueError):
        return None, ""


@functools.lru_cache(maxsize=256)
def _counted(files: tuple[tuple[str, int, int], ...]) -> tuple[int, str]:
    by_dtype: dict[str, int] = {}
    for name, _, _ in files:
        for dtype, shape in safetensors_tensors(name).values():
            by_dtype[dtype] = by_dtype.get(dtype, 0) + math.prod(shape)
    return sum(by_dtype.values()), max(by_dtype, key=by_dtype.__getitem__, default="")


def _human_number(n: int) -> str:
    """A parameter count as Ollama's format.HumanNumber writes its parameter_size: 135M, 134.52M, 7.6B, 8B."""
    for unit, scale, places in (("B", 1e9, 1), ("M", 1e6, 2)):
        if n >= scale:
            v = n / scale
            return f"{v:.0f}{unit}" if v == math.floor(v) else f"{v:.{places}f}{unit}"
    return f"{n / 1e3:.0f}K" if n >= 1000 else str(n)


def _details(me: Any) -> dict[str, Any]:
    """Ollama's `details` of a model (/api/tags, /api/ps, /api/show): parameter_size from its safetensors headers;
    format and quantization_level the model's own: `gguf` and the GGUF's type for one converted from a GGUF file (as
    Ollama lists that file), else `safetensors` and the dtype most of its parameters have ("BF16", "F16", "F32"; ""
    for a model without such files, a paced one)."""
    arch = me.architecture or ""
    n, dtype = _weights(me)
    gguf = _gguf_type(me)
    return {"parent_model": "", "format": "safetensors" if gguf is None else "gguf", "family": arch,
            "families": [arch] if arch else None, "parameter_size": _human_number(n) if n else "",
            "quantization_level": gguf or dtype}


def tagged(name: str) -> str:
    """A served name as Ollama lists a model, with its tag: `NAME:latest` for one without (`qwen:7b` keeps its own).
    Clients check a model against /api/tags this way: LangChain's ChatOllama (validate_model_on_init) takes `tiny`
    where `tiny:latest` is listed (an exact match, or a listed name that begins `tiny:`), but refused `tiny:latest`
    where only `tiny` was listed."""
    return name if ":" in name.rsplit("/", 1)[-1] else name + LATEST


def _models(request: Request, aliases: bool = True) -> list[dict[str, Any]]:
    """The served models as /api/tags lists them (a model under each of its names; `aliases` False: its first)."""
    tenant = auth.tenant(request)
    ctl = request.app.state.controller
    out = []
    for card in request.app.state.serving.models(tenant, aliases).data:
        me = ctl.resolve(card.id)  # (a LoRA adapter: its model's; an alias: the model's)
        out.append({"name": tagged(card.id), "model": tagged(card.id), "served": card.id,
                    "modified_at": datetime.fromtimestamp(card.created, timezone.utc).isoformat(),
                    "size": me.info.size_bytes, "digest": _digest(card.id, me), "details": _details(me)})
    return out


@router.get("/tags")
async def tags(request: Request) -> dict:
    """The served models the key may use, with their weights' size (digests made up: `_digest`)."""
    return {"models": [{k: v for k, v in m.items() if k != "served"} for m in _models(request)]}


# Ollama's expiry of a model kept for ever (keep_alive negative): now plus Go's longest duration, some 292 years on
FOREVER_S = ((1 << 63) - 1) / 1e9


_WALL_MINUS_MONOTONIC = time.time() - time.monotonic()  # (a monotonic instant on the wall clock: _expires_at)


def _expires_at(serving: OpenAIServing, me: Any) -> str:
    """When a resident model's weights are freed, as Ollama's ps gives it: its keep_alive (a request's, else its
    configured one: `ModelEntry.keep_alive`) after the end of its latest request (now, while one runs); for ever,
    some 292 years on as Ollama writes it, when it is pinned or has none (the pool evicts it only when the memory is
    needed). (Go's zero time, which this was, is no "never" to Ollama's clients: `ollama ps` shows a model whose
    expiry has passed as "Stopping...".)"""
    now = time.time()
    keep = me.keep_alive
    if me.pinned or keep is None or keep == math.inf:
        at = now + FOREVER_S
    elif me.last_used is None or any(g.entry.spec.name == me.spec.name and not g.closed for g in serving.active):
        at = now + keep
    else:  # (from a fixed clock offset: two calls give the same instant, where now - idle moved by microseconds)
        at = me.last_used + _WALL_MINUS_MONOTONIC + keep
    return datetime.fromtimestamp(at, timezone.utc).isoformat().replace("+00:00", "Z")


@router.get("/ps")
async def ps(request: Request) -> dict:
    """Like Ollama's: the models whose weights are in VRAM now, on some live engine (residency is the pool's, token
    by token; `tokenpool ps` shows where), with when they are freed (`_expires_at`)."""
    ctl = request.app.state.controller
    engines = list(ctl.pool.engines.values())
    resident = resident_models(engines)
    # (size_vram: the model's size where it is in some GPU's memory, 0 where only CPU engines hold it, as Ollama's
    # ps has it for a model in system memory: `ollama ps` shows "100% CPU", where it said "100% GPU" on a CPU worker)
    on_gpu = resident_models(e for e in engines if e.device != "cpu")
    out = []
    # (a model once, under the name the key uses: a model allowed only by an alias, under that alias)
    for m in _models(request, aliases=False):
        me = ctl.resolve(m.pop("served"), adapters=False)
        if me is not None and me.spec.name in resident:
            out.append({**m, "size_vram": m["size"] if me.spec.name in on_gpu else 0,
                        "expires_at": _expires_at(request.app.state.serving, me),
                        "context_length": me.max_model_len})  # (Ollama's: the context the model runs with)
    return {"models": out}


@router.post("/show")
async def show(request: Request) -> Response:
    tenant, name = None, None
    try:
        tenant = auth.tenant(request)
        data = _parsed(await request.body())
        name = data.get("model") or data.get("name") if isinstance(data, dict) else None
        if not isinstance(name, str) or not name:
            raise ServingError(400, "model is required")
        me = request.app.state.serving.lookup(tenant, served(request, tenant, name))
    except ServingError as e:
        if tenant is not None:  # (a refusal counted as the generating routes' are, under the model if one has the
            # name: "-" for any other; the 401 counts itself)
            request.app.state.controller.count_refusal(served(request, tenant, name) if isinstance(name, str) else None,
                                                       tenant.name, e.status)
        return _error(e.status, e.message if e.status != 404 else f"model '{name}' not found", e)
    tpl = getattr(me.tokenizer, "chat_template", None)
    # model_info as Ollama names its keys (clients read "<architecture>.context_length"), the plain one kept too
    arch = me.architecture or "unknown"
    info: dict[str, Any] = {"general.architecture": arch, f"{arch}.context_length": me.max_model_len,
                            "context_length": me.max_model_len}
    if me.hidden_size:
        info[f"{arch}.embedding_length"] = me.hidden_size
    if n := _parameter_count(me):  # (the `ollama` CLI's show prints it as "parameters", as do GUIs)
        info["general.parameter_count"] = n
    params = _parameters(me)
    ctl = request.app.state.controller
    lic = _license(me)
    return JSONResponse({"modelfile": _modelfile(me, name, tpl if isinstance(tpl, str) else "", params,
                                                 ctl.tenants.single_user, lic),
                         **({"license": lic} if lic else {}),  # (none: no field, as Ollama's for a model without)
                         "parameters": "\n".join(f"{k:<30} {_go_value(v)}" for k, v in params),
                         "template": tpl if isinstance(tpl, str) else "",
                         "details": {**_details(me), "family": arch, "families": [arch]},  # (as /api/tags's)
                         "modified_at": datetime.fromtimestamp(me.created, timezone.utc).isoformat(),
                         "model_info": info,
                         # (tools: the model's own call syntax is configured, so tool_choice "auto" works, as Ollama's;
                         # thinking: its template thinks, so `think` is taken)
                         "capabilities": ["completion", *(["tools"] if me.spec.tool_call_parser else []),
                                          *(["thinking"] if _thinks(me) else [])]})


# Ollama's names for the sampling fields a model's generation_config recommends (`generation_defaults`'s keys)
OLLAMA_PARAMETER = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                    "repetition_penalty": "repeat_penalty"}


def _parameters(me: Any) -> list[tuple[str, Any]]:
    """A model's parameters as Ollama's Modelfile lists them (name, value; `stop` once per value), from what this
    server does with its requests: `stop`, the tokens its generation ends at (its generation_config's eos_token_id,
    else its config's, else its tokenizer's, as the engine takes them; none for a paced model); `num_ctx`, the
    context it runs with; and the sampling its generation_config recommends, which a request that leaves those
    options out gets (`generation_defaults`), under Ollama's names."""
    out: list[tuple[str, Any]] = [("stop", t) for t in _stop_tokens(me)]
    out.append(("num_ctx", me.max_model_len))
    out += sorted((OLLAMA_PARAMETER.get(k, k), v) for k, v in generation_defaults(me).items())
    return out


def _stop_tokens(me: Any) -> list[str]:
    """The text of the tokens `me`'s generation ends at (model_swapper's ModelConfig.eos_token_ids, read as it reads
    them, else its tokenizer's eos_token_id, the engine's fallback)."""
    tok = me.tokenizer
    if me.spec.engine.kind == "pace" or tok is None or not hasattr(tok, "decode"):
        return []
    eos: Any = None
    folder = Path(me.spec.path) if me.spec.path else None
    for file in ("config.json", "generation_config.json"):  # (the latter's, where it says, over the former's)
        try:
            cfg = json.loads((folder / file).read_text()) if folder is not None else {}
        except (OSError, ValueError):
            cfg = {}
        if isinstance(cfg, dict) and "eos_token_id" in cfg:
            eos = cfg["eos_token_id"]
    ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    if not ids and isinstance(getattr(tok, "eos_token_id", None), int):
        ids = [tok.eos_token_id]
    out: list[str] = []
    for i in ids:
        if isinstance(i, int) and not isinstance(i, bool):
            try:
                text = tok.decode([i], skip_special_tokens=False)
            except (ValueError, TypeError, IndexError, OverflowError):
                continue
            if text and text not in out:
                out.append(text)
    return out


def _go_value(v: Any) -> str:
    """A parameter's value as Ollama's show writes it (Go's %#v of the JSON value): a string quoted, a whole number
    without a fraction (40, not 40.0)."""
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _modelfile_arg(text: str) -> str:
    """A Modelfile command's argument as Ollama's parser writes one back: as it is, or in quotes where it has a line
    break or spaces at either end (triple quotes where it has a quote too)."""
    if "\n" in text or text != text.strip():
        return f'"""{text}"""' if '"' in text else f'"{text}"'
    return text


def _modelfile(me: Any, name: str, template: str, params: list[tuple[str, Any]], single_user: bool,
               license: str | None = None) -> str:
    """The model as a Modelfile, as Ollama's show gives one: FROM its weights (the model's folder, or its GGUF file,
    on a single user's server; its served name on a server with tenants, whose paths are the operator's), its
    TEMPLATE (the chat template this server applies: Jinja, as the model's tokenizer has it, where Ollama's is a Go
    template), its PARAMETER lines (`_parameters`) and its LICENSE (`_license`), where it has one."""
    source = me.spec.path
    if source and (gguf := _gguf_source(me)):
        source = gguf
    lines = ['# Modelfile generated by "ollama show" (a tokenpool server)',
             "# To build a new Modelfile based on this, replace FROM with:", f"# FROM {tagged(name)}", "",
             f"FROM {source if single_user and source else tagged(name)}"]
    if template:
        lines += ["# (TEMPLATE: the model's chat template, Jinja, as the server applies it)",
                  f"TEMPLATE {_modelfile_arg(template)}"]
    lines += [f"PARAMETER {k} {_modelfile_arg(v if isinstance(v, str) else _go_value(v))}" for k, v in params]
    if license:  # (as Ollama writes it: triple-quoted)
        lines.append(f'LICENSE """{license}"""')
    return "\n".join(lines) + "\n"


# A model's licence file, as Hugging Face repositories name it (any case): what /api/show gives as `license`
LICENSE_FILES = ("license", "license.txt", "license.md", "licence", "licence.txt", "licence.md")
LICENSE_MAX_BYTES = 1 << 20  # (a licence is some kilobytes; more is no licence text, and not read whole)


def _license(me: Any) -> str | None:
    """The text of the model's licence file (LICENSE, LICENSE.txt, LICENSE.md: `LICENSE_FILES`) in its folder, else,
    for a model converted from a GGUF file (whose folder is the conversion's, with no licence), beside that file, as
    Ollama's show gives the licence a Modelfile's LICENSE named; None where there is none (the field left out)."""
    folders = [Path(me.spec.path)] if me.spec.path else []
    if folders and (gguf := _gguf_source(me)):
        folders.append(Path(gguf).parent)
    for folder in folders:
        try:
            found = [f for f in folder.iterdir() if f.name.lower() in LICENSE_FILES and f.is_file()]
        except OSError:
            continue
        for f in sorted(found, key=lambda f: LICENSE_FILES.index(f.name.lower())):
            try:
                with f.open("rb") as fh:
                    text = fh.read(LICENSE_MAX_BYTES).decode("utf-8", "replace").strip()
            except OSError:
                continue
            if text:
                return text
    return None


def _gguf_source(me: Any, marker: dict[str, Any] | None = None) -> str | None:
    """The GGUF file a converted model's folder was made from (its conversion marker's `source`), if it names one."""
    marker = _gguf_marker(me) if marker is None else marker
    src = marker.get("source") if marker else None
    return src if isinstance(src, str) and src.endswith(".gguf") else None


# The Ollama release whose API the /api routes follow (think levels, truncate, logprobs, ps's context_length): what
# /api/version answers, for the clients that check it against the Ollama they need (VS Code's Copilot Chat refuses
# an Ollama older than 0.6.4; Open WebUI warns below 0.1.16). tokenpool's own version went there, 0.1.0: too old.
OLLAMA_API_VERSION = "0.12.0"


@router.get("/version")
async def version() -> dict:
    """Ollama's: the Ollama version this API is (OLLAMA_API_VERSION); tokenpool's own beside it, and at /version."""
    return {"version": OLLAMA_API_VERSION, "tokenpool_version": tokenpool.version()}


class PullRequest(_Loose):
    model: str = ""
    name: str = ""  # (older clients' field)
    stream: bool = True


@router.post("/pull")
async def pull(request: Request) -> Response:
    """Ollama's pull, for a model already served (clients pull before they use one): success, as Ollama answers a
    model it has. This server downloads nothing: any other name is a 404 saying how models get here."""
    body = await _body(request, PullRequest, counted=True)
    name = body.model or body.name
    tenant = auth.tenant(request)
    try:
        request.app.state.serving.lookup(tenant, served(request, tenant, name))
    except ServingError as e:
        request.app.state.controller.count_refusal(served(request, tenant, name), tenant.name, e.status)
        if e.status != 404:
            return _error(e.status, e.message, e)
        return _error(404, f"model '{name}' is not served here, and this server downloads nothing: serve a model "
                           "folder (tokenpool serve DIR) or register one through the admin API (POST /admin/models)")
    done = {"status": "success"}
    if body.stream:
        return StreamingResponse(iter([json.dumps(done).encode() + b"\n"]), media_type="application/x-ndjson")
    return JSONResponse(done)


@router.api_route("/{action}", methods=["GET", "POST", "DELETE", "PUT", "PATCH"], include_in_schema=False)
async def manage(action: str, request: Request) -> Response:
    """Ollama's model management (create, copy, delete, push, ...): not this server's; models are the configured ones
    and those registered through the admin API. One naming a model that is not served is Ollama's 404. An endpoint
    served here asked with another method: a 405 naming the one it takes."""
    tenant = auth.tenant(request)
    method = SERVED.get(action) or ("DELETE" if action == "delete" else "POST" if action in MANAGEMENT else None)
    if method is None:
        return _error(404, f"no such endpoint: /api/{action}")
    if request.method != method and not (action == "delete" and request.method == "POST"):
        return JSONResponse({"error": f"/api/{action} takes {method}, not {request.method}"}, status_code=405,
                            headers={"Allow": method})
    try:
        data = _parsed(await request.body())
    except ServingError as e:
        return _error(e.status, e.message)
    if action != "create" and isinstance(data, dict):  # (create names a new model)
        name = data.get("source") if action == "copy" else data.get("model") or data.get("name")
        if isinstance(name, str) and name:
            try:
                request.app.state.serving.lookup(tenant, served(request, tenant, name))
            except ServingError as e:
                return _error(e.status, f"model '{name}' not found" if e.status == 404 else e.message, e)
    return _not_managed(f"/api/{action}")


def _not_managed(what: str) -> Response:
    return _error(501, f"{what} is not supported: tokenpool serves the models in its configuration and those "
                       "registered through the admin API (POST /admin/models, DELETE /admin/models/NAME)")


@router.api_route("/blobs/{digest}", methods=["HEAD", "POST"], include_in_schema=False)
async def blobs(digest: str, request: Request) -> Response:
    """Ollama's blob upload, the first step of a create from files (`ollama create` with a GGUF, the client's
    create_blob): no blob is kept here (HEAD: 404, as Ollama's for one it lacks, so the client goes on to upload),
    and the upload is create's 501, saying how models get here (it was a bare 404 "Not Found")."""
    auth.tenant(request)
    if request.method == "HEAD":
        return Response(status_code=404)
    return _not_managed("/api/blobs (model creation)")


MANAGEMENT = frozenset({"create", "copy", "delete", "push"})
SERVED = {"chat": "POST", "generate": "POST", "embed": "POST", "embeddings": "POST", "show": "POST", "pull": "POST",
          "tags": "GET", "ps": "GET", "version": "GET"}  # (the routes above, by the method each takes)
