"""Anthropic's Messages API over the chat path: `POST /v1/messages` and `POST /v1/messages/count_tokens`, as the
official `anthropic` client (and the tools built on it) sends them to a local server, which llama.cpp's server and
llama-swap also answer.

A request's `system` (its text blocks as one, less Claude Code's billing block, as vLLM's), `messages` (a message's
text blocks, and a tool_result's, a line apart, as vLLM's and the chat path's text parts; `tool_use` and
`tool_result`: a failed call's, `is_error`, as its text after "Error: "; each tool_use answered by a tool_result
of its id in the next message, and each tool_result answering one of the message before, else a 400 as Anthropic's;
consecutive turns of a role as one, as Anthropic combines them), `max_tokens`,
`stop_sequences`, sampling fields, `tools` (name, description, input_schema) and `tool_choice` become the chat
completion they mean; it is validated, templated, admitted and generated as that one would be. The reply is a
Message: `text` or `tool_use` content blocks (a text block before tool_use blocks where the reply's text went on to
calls, tool_choice auto; none for a reply of no text; calls max_tokens cut short are the
whole ones' tool_use blocks and the cut one's, input {}), its `stop_reason` (end_turn, max_tokens, stop_sequence, tool_use) and usage (the
prompt tokens found in the prefix cache as `cache_read_input_tokens`). Streamed, the Messages API's server-sent
events (message_start ... message_stop; text as it comes; tool calls as they are written, as the chat path's: a
`tool_use` block starts once its name is whole, its input follows in `input_json_delta` parts; a call max_tokens
cuts streams what was written, which the client's accumulated input parses as far as it goes).
Structured outputs (`output_config.format`, or the beta's `output_format`: `{"type": "json_schema", "schema":
{...}}`) hold the reply's text to the schema as the chat path's response_format does (not with a prefill: a 400
says so); beside tools the model may call (tool_choice auto) the reply is either tool_use blocks or text of the
schema, whichever the model takes; a forced call (any, tool) is held to the call alone. A field Anthropic's request does not have, inside a block, a tool, `tool_choice`, `metadata` or `thinking`, is a
400 naming its path, as Anthropic's; those its clients send that are not used here (`cache_control`, ...) are taken.
Images and documents are refused with a 400 naming the field. Extended thinking (`thinking`) follows the model's
chat template (`thinking.py`): `disabled`, no thinking (Qwen3's `enable_thinking` off); `adaptive`, thinking where
the template can, none where it cannot; `enabled` (with `budget_tokens`, less than max_tokens, as Anthropic's),
thinking, or a 400 for a model whose template has none. The reply's `<think>` block is then a `thinking` content
block (its `signature` made here: opaque, as Anthropic's), streamed as `thinking_delta` and `signature_delta`
events; its `display` "omitted" leaves the block's text empty. The budget is held to (budget forcing,
`thinking.Budgeted`): thinking that has used budget_tokens tokens without ending is closed there (the template's
`</think>`) and the reply goes on with its answer, within max_tokens in all; usage counts every token generated once.
Thinking is off where the output is held to a shape from its first token (a call
forced by tool_choice any or tool, structured outputs) or continues a prefill: `adaptive` then does not think,
`enabled` is a 400, as Anthropic refuses thinking with a forced tool. An earlier turn's thinking blocks, sent back
whole by clients, are ignored, as Anthropic strips them. Without `thinking`, a model whose template thinks unasked
(Qwen3's) has its reply's think block left out, as one not asked for, and the calls after it read. Errors take Anthropic's shape.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request

from controller.api import protocol as p
from controller.api.serving import OpenAIServing, Tracked
from controller.api.structured import CallStream, Lead, ToolPlan
from controller.api.thinking import Budgeted, Split, opened, switch, thinks
from controller.errors import ServingError
from controller.tenants import Tenant

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


def error_body(e: ServingError) -> dict[str, Any]:
    """An error as the Messages API writes it."""
    # (a status Anthropic gives no type of its own, 405 say: the client's fault below 500, as ServingError types it)
    kind = ERROR_TYPES.get(e.status, "invalid_request_error" if e.status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": e.message}}


def speaks_anthropic(request: Request) -> bool:
    """Whether a request is the Messages API's, or the `anthropic` client's (it sends `anthropic-version` with every
    call, `models.list()` too, and `beta.files.list()` for a path not served here): its errors and model cards take
    Anthropic's shape."""
    return request.url.path.startswith("/v1/messages") or "anthropic-version" in request.headers


def model_info(card: p.ModelCard) -> dict[str, Any]:
    """A served model as Anthropic's Models API describes one."""
    created = datetime.fromtimestamp(card.created, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"type": "model", "id": card.id, "display_name": card.id, "created_at": created}


def model_page(cards: list[p.ModelCard], query: Any) -> dict[str, Any]:
    """Anthropic's `GET /v1/models` page: `limit` (1-1000, default 20) cards after `after_id` or before `before_id`."""
    try:
        limit = int(query.get("limit", 20))
    except ValueError:
        raise _bad("limit must be an integer", "limit") from None
    if not 1 <= limit <= 1000:
        raise _bad("limit must be between 1 and 1000", "limit")
    ids = [c.id for c in cards]
    lo, hi = 0, len(cards)
    for key in ("after_id", "before_id"):
        if (at := query.get(key)) is not None:
            if at not in ids:
                raise ServingError(404, f"no model {at!r}", param=key)
            if key == "after_id":
                lo = ids.index(at) + 1
            else:
                hi = ids.index(at)
    window = cards[lo:hi]
    page = window[max(0, len(window) - limit):] if "before_id" in query and "after_id" not in query else window[:limit]
    data = [model_info(c) for c in page]
    return {"data": data, "has_more": len(page) < len(window), "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


def _bad(msg: str, param: str) -> ServingError:
    return ServingError(400, msg, param=param)


# The fields each object of a request takes, as Anthropic's API (and the `anthropic` client's params, its beta's too)
# have them: any other is a 400 naming it, as Anthropic's "Extra inputs are not permitted" (a misspelt field was
# ignored unsaid). Taken though not used here: `cache_control` (the prefix cache needs no marks), `citations`,
# `caller`, `toolset_name`, a tool's `strict` (its input is held to its schema anyway), `input_examples`,
# `defer_loading`, `allowed_callers`, `eager_input_streaming`; `metadata.user_id`
BLOCK_FIELDS = {
    "text": frozenset({"type", "text", "cache_control", "citations"}),
    "tool_use": frozenset({"type", "id", "name", "input", "cache_control", "caller", "toolset_name"}),
    "tool_result": frozenset({"type", "tool_use_id", "content", "is_error", "cache_control", "toolset_name"}),
    "thinking": frozenset({"type", "thinking", "signature"}),
    "redacted_thinking": frozenset({"type", "data"}),
}
TOOL_FIELDS = frozenset({"type", "name", "description", "input_schema", "cache_control", "strict", "input_examples",
                         "defer_loading", "allowed_callers", "eager_input_streaming"})
TOOL_CHOICE_FIELDS = {"auto": frozenset({"type", "disable_parallel_tool_use"}),
                      "any": frozenset({"type", "disable_parallel_tool_use"}),
                      "tool": frozenset({"type", "name", "disable_parallel_tool_use"}), "none": frozenset({"type"})}
THINKING_FIELDS = frozenset({"type", "budget_tokens", "display", "block_binding"})
METADATA_FIELDS = frozenset({"user_id"})
OUTPUT_CONFIG_FIELDS = frozenset({"format", "effort", "task_budget"})  # (effort, task_budget: taken, not used)
# output_config.effort's values (the `anthropic` client's OutputConfigParam): another is Anthropic's 400, not taken
EFFORTS = ("low", "medium", "high", "xhigh", "max")
OUTPUT_FORMAT_FIELDS = frozenset({"type", "schema"})
CACHE_CONTROL_FIELDS = frozenset({"type", "ttl"})
CACHE_CONTROL_VALUES = {"type": ("ephemeral",), "ttl": ("5m", "1h")}  # (the client's CacheControlEphemeralParam)


def _only(obj: dict[str, Any], fields: frozenset[str], where: str) -> None:
    """A 400 naming the first field of `obj` (at `where`) not among `fields`, as Anthropic's; its `cache_control`'s
    too."""
    for k in obj:
        if k not in fields:
            raise _bad(f"{where}.{k}: Extra inputs are not permitted", f"{where}.{k}")
    if isinstance(cc := obj.get("cache_control"), dict):
        _only(cc, CACHE_CONTROL_FIELDS, f"{where}.cache_control")
        for k, values in CACHE_CONTROL_VALUES.items():
            if k in cc:
                _one_of(cc[k], values, f"{where}.cache_control.{k}")


def _one_of(value: Any, values: tuple[str, ...], where: str) -> None:
    """Anthropic's 400 for a value its API's enum (`values`) does not have, in its words (pydantic's)."""
    if value not in values:
        said = f"{', '.join(repr(v) for v in values[:-1])} or {values[-1]!r}" if len(values) > 1 else repr(values[0])
        raise _bad(f"{where}: Input should be {said}", where)


# Claude Code's first system block: its version and a hash that changes with every request, which would make every
# prompt differ from its first tokens on (no prefix-cache hit, ever); left out, as vLLM's Messages API leaves it out
BILLING_HEADER = "x-anthropic-billing-header"


def _text(content: Any, where: str, sep: str = p.PARTS_SEP) -> str:
    """A system prompt or tool result's text: a string, or text blocks (a tool result's a line apart, as the chat
    path's text parts; the system's `sep` "", as vLLM's, which also leaves out Claude Code's BILLING_HEADER block)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, b in enumerate(content):
            if isinstance(b, dict) and b.get("type") in ("image", "document"):  # (said as a message's are)
                raise _bad(f"{where}: {b['type']} blocks are not supported: the served models take text", where)
            if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
                raise _bad(f"{where}: only text blocks are supported", where)
            _only(b, BLOCK_FIELDS["text"], f"{where}.{i}")
            if not (where == "system" and b["text"].startswith(BILLING_HEADER)):
                parts.append(b["text"])
        return sep.join(parts)
    raise _bad(f"{where} must be a string or a list of text blocks", where)


TOOL_ERROR = "Error: "  # (before a failed call's result, `is_error`: the model reads that the call failed)


def _result(b: dict[str, Any], where: str) -> str:
    """A tool_result block's text as its tool message says it: with `is_error` true (the call failed, its content the
    error), after "Error: ", since a chat template has no field for it; "Error" alone when the block has no content."""
    text = _text(b.get("content", ""), f"{where}.content")
    is_error = b.get("is_error")
    if is_error is not None and not isinstance(is_error, bool):
        raise _bad(f"{where}.is_error: Input should be a valid boolean", f"{where}.is_error")
    if not is_error:
        return text
    return TOOL_ERROR + text if text else TOOL_ERROR.rstrip(": ")


def _check_call(b: dict[str, Any], where: str) -> None:
    """A tool_use block sent back has its id (which its tool_result names), the tool's name and the input object, as
    Anthropic's 400s hold it to: one without went to the template as a call of tool None, or of arguments that are
    no object."""
    for field, ok, what in (("id", lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
                            ("name", lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
                            ("input", lambda v: isinstance(v, dict), "an object (the call's arguments)")):
        if field not in b:
            raise _bad(f"{where}.{field}: Field required (a tool_use block's {field} is {what})", f"{where}.{field}")
        if not ok(b[field]):
            raise _bad(f"{where}.{field}: a tool_use block's {field} must be {what}", f"{where}.{field}")


def _messages(req: p.MessagesRequest) -> list[dict[str, Any]]:
    """The conversation as chat messages: text blocks joined, tool_use blocks as the assistant's calls, tool_result
    blocks as tool messages."""
    out: list[dict[str, Any]] = []
    if req.system is not None:
        out.append({"role": "system", "content": _text(req.system, "system", "")})
    asked: dict[str, None] = {}  # the ids of the previous message's tool_use blocks: what a tool_result may answer
    for i, m in enumerate(req.messages):
        where = f"messages.{i}.content"
        answerable, asked = asked, {}
        if not m.content and not (m.role == "assistant" and i == len(req.messages) - 1):  # ("" or [], as Anthropic)
            raise _bad(f"messages.{i}: all messages must have non-empty content except for the optional final "
                       "assistant message", where)
        if isinstance(m.content, str):
            _all_answered(answerable, m, i)
            out.append({"role": m.role, "content": m.content})
            continue
        texts, calls = [], []
        for j, b in enumerate(m.content):
            kind = b.get("type") if isinstance(b, dict) else None
            if isinstance(kind, str) and kind in BLOCK_FIELDS:  # (a type not a string, [] say: the 400 below)
                _only(b, BLOCK_FIELDS[kind], f"{where}.{j}")
            if kind in ("thinking", "redacted_thinking") and m.role == "assistant":
                continue  # (an earlier turn's thinking, another model's: ignored, as Anthropic strips it)
            if kind == "text":
                if not isinstance(b.get("text"), str):
                    raise _bad(f"{where}.{j}.text: a text block's text must be a string", f"{where}.{j}.text")
                if not b["text"]:
                    raise _bad(f"{where}.{j}.text: text content blocks must be non-empty", f"{where}.{j}.text")
                texts.append(b["text"])
            elif kind == "tool_use" and m.role == "assistant":
                _check_call(b, f"{where}.{j}")
                calls.append({"id": b["id"], "type": "function", "function": {
                    "name": b["name"], "arguments": json.dumps(b["input"])}})
                asked[b["id"]] = None
            elif kind == "tool_result" and m.role == "user":
                if not isinstance(b.get("tool_use_id"), str) or not b["tool_use_id"]:
                    raise _bad(f"{where}.{j}.tool_result.tool_use_id: Field required (the id of the tool_use "
                               "block it answers)", f"{where}.{j}.tool_use_id")
                if b["tool_use_id"] not in answerable:  # (as Anthropic's 400: a template would render a result of
                    # no call, which some refuse and the others show the model as an answer to nothing it asked)
                    raise _bad(f"{where}.{j}: unexpected `tool_use_id` found in `tool_result` blocks: "
                               f"{b['tool_use_id']}. Each `tool_result` block must have a corresponding `tool_use` "
                               "block in the previous message.", f"{where}.{j}.tool_use_id")
                if texts:  # (text before a result: its own user message, in order)
                    out.append({"role": "user", "content": p.PARTS_SEP.join(texts)})
                    texts = []
                out.append({"role": "tool", "tool_call_id": b["tool_use_id"],
                            "content": _result(b, f"{where}.{j}")})
            elif kind in ("image", "document"):
                raise _bad(f"{where}: {kind} blocks are not supported: the served models take text", where)
            else:
                raise _bad(f"{where}: a block of type {kind!r} is not supported here", where)
        _all_answered(answerable, m, i)  # (after its blocks: a tool_result of no such call is named first)
        if calls:
            out.append({"role": "assistant", "content": p.PARTS_SEP.join(texts) or None, "tool_calls": calls})
        elif texts or m.role == "assistant":
            out.append({"role": m.role, "content": p.PARTS_SEP.join(texts)})
    # (a conversation that ends with the assistant's tool_use blocks: no message answers them, as Anthropic's 400 for
    # one ending so says; taken, the template wrote the calls and a new assistant turn, and the model answered as if
    # it had their results)
    _all_answered(asked, None, len(req.messages))
    return _one_turn_a_role(out)


def _all_answered(asked: dict[str, None], m: p.AnthropicMessage | None, i: int) -> None:
    """A 400 where message `i`, the one after tool_use blocks (`asked`, their ids in order), lacks a tool_result of
    each (`m` None: there is none, the tool_use blocks' message was the last), as Anthropic's (in any order; a
    tool_result of an earlier turn is `_messages`' own 400): the template rendered calls never answered, and the
    model read on as if it had the results."""
    if not asked:
        return
    got = {b.get("tool_use_id") for b in m.content if isinstance(b, dict) and b.get("type") == "tool_result"} \
        if m is not None and isinstance(m.content, list) and m.role == "user" else set()
    if missing := [t for t in asked if t not in got]:
        raise _bad(f"messages.{i - 1}: `tool_use` ids were found without `tool_result` blocks immediately after: "
                   f"{', '.join(missing)}. Each `tool_use` block must have a corresponding `tool_result` block in the "
                   "next message.", f"messages.{i - 1}.content")


def _one_turn_a_role(msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive user (or assistant) texts as one turn, as the Messages API combines them: a chat template that
    holds the roles to alternate (Gemma's, Mistral's, Llama 2's) would refuse two user turns in a row, and those that
    do not would show the model a turn it never took. A blank line between them; a tool call's or result's turn
    stays its own."""
    out: list[dict[str, Any]] = []
    for m in msgs:
        last = out[-1] if out else None
        if (last is not None and m["role"] == last["role"] and m["role"] in ("user", "assistant")
                and not m.get("tool_calls") and not last.get("tool_calls")):
            last["content"] = "\n\n".join(t for t in (last["content"], m["content"]) if t)
        else:
            out.append(m)
    return out


def prefills(msgs: list[dict[str, Any]]) -> bool:
    """Whether chat messages end with an assistant's text (no tool calls): a prefill, the start of the reply that the
    model continues rather than a finished turn followed by a new one (the Messages API's, and Ollama's)."""
    last = msgs[-1] if msgs else {}
    return (last.get("role") == "assistant" and not last.get("tool_calls")
            and isinstance(last.get("content"), str) and bool(last["content"].strip()))


def output_format(req: p.MessagesRequest) -> tuple[dict[str, Any], str] | None:
    """The JSON schema structured outputs hold the reply's text to (`output_config.format`, or the beta's
    `output_format`: `{"type": "json_schema", "schema": {...}}`) and the field it came in; None when none is asked."""
    if req.output_config is not None:
        _only(req.output_config, OUTPUT_CONFIG_FIELDS, "output_config")
        if (effort := req.output_config.get("effort")) is not None:
            _one_of(effort, EFFORTS, "output_config.effort")
    asked = [(where, f) for where, f in (("output_config.format", (req.output_config or {}).get("format")),
                                         ("output_format", req.output_format)) if f is not None]
    if not asked:
        return None
    if len(asked) > 1:
        raise _bad("output_format: output_config.format's older name; give one of them", "output_format")
    (where, fmt), = asked
    if not isinstance(fmt, dict):
        raise _bad(f"{where}: must be an object", where)
    _only(fmt, OUTPUT_FORMAT_FIELDS, where)
    if fmt.get("type") != "json_schema":
        raise _bad(f"{where}.type: must be 'json_schema'", f"{where}.type")
    if not isinstance(fmt.get("schema"), dict):
        raise _bad(f"{where}.schema: Field required (a JSON schema object)", f"{where}.schema")
    return fmt["schema"], where


THINKING_TYPES = ("enabled", "disabled", "adaptive")
THINKING_DISPLAYS = ("summarized", "omitted")


def thinking_type(req: p.MessagesRequest) -> str | None:
    """The request's `thinking` type (enabled, disabled, adaptive), its fields held to Anthropic's; None without."""
    t = req.thinking
    if t is None:
        return None
    _only(t, THINKING_FIELDS, "thinking")
    kind = t.get("type")
    if kind is None:
        raise _bad("thinking.type: Field required (enabled, disabled or adaptive)", "thinking.type")
    if kind not in THINKING_TYPES:
        raise _bad(f"thinking.type: {kind!r} is not one of {', '.join(THINKING_TYPES)}", "thinking.type")
    if kind == "enabled":
        budget = t.get("budget_tokens")
        if budget is None:
            raise _bad("thinking.budget_tokens: Field required (with thinking type 'enabled')", "thinking.budget_tokens")
        # (Anthropic's API takes 1024 at least: its models think long. A small local model's budget may be a few
        # tokens -- budget forcing holds any -- so any positive budget is taken here, as the README says)
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
            raise _bad("thinking.budget_tokens: must be a positive integer", "thinking.budget_tokens")
        if req.max_tokens is not None and budget >= req.max_tokens:  # (as Anthropic's 400)
            raise _bad("max_tokens must be greater than thinking.budget_tokens", "thinking.budget_tokens")
    elif "budget_tokens" in t:
        raise _bad(f"thinking.budget_tokens: only with thinking type 'enabled', not {kind!r}", "thinking.budget_tokens")
    if (shown := t.get("display")) is not None and shown not in THINKING_DISPLAYS:
        raise _bad(f"thinking.display: {shown!r} is not one of {', '.join(THINKING_DISPLAYS)}", "thinking.display")
    return kind


def with_thinking(serving: OpenAIServing, req: p.MessagesRequest, tenant: Tenant,
                  chat: p.ChatCompletionRequest) -> tuple[p.ChatCompletionRequest, bool]:
    """The chat request as the `thinking` asked of the model has it (its template's switch, Qwen3's
    `enable_thinking`, set either way when `thinking` is sent) and whether the reply's thinking is given as thinking
    blocks. Without `thinking` the template's own default stands (the request as it was)."""
    kind = thinking_type(req)
    if kind is None:
        return chat, False
    me = serving.lookup(tenant, req.model)
    forced = (req.tool_choice or {}).get("type") in ("any", "tool")
    held = chat.response_format is not None
    if kind == "enabled":
        if not thinks(me):
            raise _bad(f'"{req.model}" does not support thinking: its chat template has none (send thinking '
                       '{"type": "adaptive"}, which thinks where the model can, or {"type": "disabled"})', "thinking")
        if forced:  # (Anthropic's words)
            raise _bad("Thinking may not be enabled when tool_choice forces tool use.", "thinking")
        if held:
            raise _bad(f"thinking: not supported with structured outputs ({output_format(req)[1]}) here: the output "
                       "is held to the schema from its first token", "thinking")
        if chat.continue_final_message:
            raise _bad("thinking: not supported with a prefill (a final assistant message)", "thinking")
    wants = kind != "disabled" and thinks(me) and not (forced or held or chat.continue_final_message)
    if switch(me):
        chat = chat.model_copy(update={"chat_template_kwargs": {**(chat.chat_template_kwargs or {}),
                                                                "enable_thinking": wants}})
    return chat, wants


def chat_request(req: p.MessagesRequest) -> p.ChatCompletionRequest:
    if req.metadata is not None:
        _only(req.metadata, METADATA_FIELDS, "metadata")
    thinking_type(req)
    msgs = _messages(req)
    body: dict[str, Any] = {"model": req.model, "messages": msgs, "max_tokens": req.max_tokens}
    if prefills(msgs):  # (the reply continues it, as the Messages API's prefill does)
        body["continue_final_message"] = True
    if (shaped := output_format(req)) is not None:  # (the chat path's response_format: the same grammar)
        schema, where = shaped
        if prefills(msgs):  # (the grammar would hold the continuation alone, not the reply it ends)
            raise _bad(f"{where}: cannot be used with a prefill (a final assistant message)", where)
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    for ours, theirs in (("temperature", req.temperature), ("top_p", req.top_p), ("top_k", req.top_k)):
        if theirs is not None:
            body[ours] = theirs
    if req.stop_sequences:
        body["stop"] = req.stop_sequences
    tc = {"type": "auto"} if req.tool_choice is None else req.tool_choice
    kind = tc.get("type")
    if kind is None:  # ({}: no choice at all, which Anthropic refuses rather than reading as auto)
        raise _bad("tool_choice.type: Field required (auto, any, tool or none)", "tool_choice.type")
    if kind not in ("auto", "any", "tool", "none"):
        raise _bad(f"tool_choice type {kind!r} is not one of auto, any, tool, none", "tool_choice")
    _only(tc, TOOL_CHOICE_FIELDS[kind], "tool_choice")
    if kind in ("any", "tool") and not req.tools:  # (a call asked for, and no tool to call)
        raise _bad(f"tool_choice {kind!r} needs tools", "tool_choice")
    if kind == "tool" and (not isinstance(tc.get("name"), str) or not tc["name"]):
        raise _bad("tool_choice.name: Field required (the tool to call, with tool_choice type 'tool')",
                   "tool_choice.name")
    if req.tools:
        tools = []
        for i, t in enumerate(req.tools):
            if "input_schema" not in t or "name" not in t:  # (server tools: web search, code execution, ...)
                raise _bad(f"tools.{i}: only client tools (name, input_schema) are supported", f"tools.{i}")
            _only(t, TOOL_FIELDS, f"tools.{i}")
            tools.append({"type": "function", "function": {"name": t["name"], "description": t.get("description", ""),
                                                           "parameters": t["input_schema"]}})
        body["tools"] = tools
        choice: Any = {"auto": "auto", "any": "required", "none": "none"}.get(kind)
        if kind == "tool":
            choice = {"type": "function", "function": {"name": tc.get("name")}}
        body["tool_choice"] = choice
        if tc.get("disable_parallel_tool_use"):
            body["parallel_tool_calls"] = False
    try:
        return p.ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise _bad(f"{where}: {err['msg']}", where).reworded(_CHAT_TERMS) from None


# The chat path's names for a tool's fields, in an error about a tool, as the Messages API names them: a tool's
# `input_schema` and `name`, not the chat request's `function.parameters` and `function.name` (never sent)
_CHAT_TERMS = ((re.compile(r"\btools\.(\d+)\.function\.parameters\b"), r"tools.\1.input_schema"),
               (re.compile(r"\btools\.(\d+)\.function\.(\w+)"), r"tools.\1.\2"),
               (re.compile(r"a function's parameters are"), "a tool's input_schema is"))


# The chat path's context errors (vLLM's words: service.py, serving.py) and Anthropic's for the same refusals, which
# its clients read: Claude Code (max_tokens 32000 by default) parses "input length and `max_tokens` exceed context
# limit: I + M > C" and retries with max_tokens C - I less a margin, and takes "prompt is too long: N tokens > M
# maximum" as the conversation to compact; in vLLM's words against a local model's 8K or 32K context every request
# was a 400 it could do nothing with
_OVER_CONTEXT = re.compile(r"maximum context length is (\d+) tokens\. However, you requested \d+ tokens \((\d+) in the "
                           r"prompt, (\d+) for the completion\)")
_PROMPT_OVER = re.compile(r"maximum context length is (\d+) tokens; the prompt(?: \d+)? has (\d+) tokens")


def _in_context_terms(e: ServingError) -> ServingError:
    """A context-length error as Anthropic words it (its status, type and param stay)."""
    if e.code != "context_length_exceeded":
        return e
    if (m := _OVER_CONTEXT.search(e.message)) is not None:
        ctx, prompt, asked = m.groups()
        e.message = (f"input length and `max_tokens` exceed context limit: {prompt} + {asked} > {ctx}, decrease "
                     "input length or `max_tokens` and try again")
    elif (m := _PROMPT_OVER.search(e.message)) is not None:
        ctx, n = (int(x) for x in m.groups())  # (a prompt leaves a token's room at least: ctx - 1 is its maximum)
        e.message = f"prompt is too long: {n} tokens > {ctx - 1} maximum"
    e.args = (e.message,)
    return e


def _terms(req: p.MessagesRequest) -> tuple[tuple[re.Pattern[str], str], ...]:
    """_CHAT_TERMS, and the chat path's `response_format` as the field the schema came in (output_config.format)."""
    shaped = output_format(req)
    return _CHAT_TERMS if shaped is None else (*_CHAT_TERMS, (re.compile(r"\bresponse_format\b"), shaped[1]))


def check_tool_choice(serving: OpenAIServing, req: p.MessagesRequest, tenant: Tenant) -> None:
    """Tools with tool_choice auto (the default) need the model's own call syntax (its tool_call_parser); without
    one the chat path refuses them, and this says so in the Messages API's terms (the choices that hold the output
    to a call's JSON are `any` and `tool` here, not the chat path's `required` and `function`)."""
    if not req.tools or (req.tool_choice or {}).get("type", "auto") != "auto":
        return
    if not serving.lookup(tenant, req.model).spec.tool_call_parser:
        raise _bad("tool_choice auto (the default with tools) needs the model's tool-call syntax, which its "
                   "configuration does not name (tool_call_parser: hermes, for a model that writes hermes calls as "
                   "Qwen2.5 does; tokenpool serve MODEL_DIR --tool-call-parser hermes): send "
                   'tool_choice {"type": "any"} or {"type": "tool", "name": ...} (the output is then held to a '
                   'call in JSON), or {"type": "none"}', "tool_choice")


class _Reply:
    def __init__(self, serving: OpenAIServing, req: p.MessagesRequest, tools: ToolPlan | None,
                 split: Split | None = None, shown: bool = False):
        self.serving, self.req, self.tools = serving, req, tools
        self.id = f"msg_{secrets.token_hex(12)}"
        self.text, self.finish, self.stop = "", None, None
        # the reply's thinking (its <think> block, `split` from its text), given as a thinking block where `shown`
        self.split, self.shown, self.thinking = split, shown, ""
        self.omitted = (req.thinking or {}).get("display") == "omitted"

    def feed(self, text: str, end: bool) -> tuple[str, str]:
        """A delta's text as (thinking, the reply's text), not yet added to either."""
        return self.split.feed(text, end) if self.split is not None else ("", text)

    def signature(self) -> str:
        """The thinking block's signature: opaque, as Anthropic's (a digest of the thinking here; clients send it
        back with the block, which is then ignored)."""
        return base64.b64encode(hashlib.sha256(self.thinking.encode()).digest()).decode()

    def thinking_blocks(self) -> list[dict[str, Any]]:
        """The reply's thinking block, where it thought and the thinking is given; none else."""
        if not (self.shown and self.thinking):
            return []
        return [{"type": "thinking", "thinking": "" if self.omitted else self.thinking, "signature": self.signature()}]

    def blocks(self) -> tuple[list[dict[str, Any]], str]:
        """The content blocks and the stop reason."""
        msg, why = self.serving._reply(self.text, self.finish, self.tools)
        if msg.tool_calls:  # (a text block of the text before them, as Claude's "I'll check." then its tool_use)
            return [*([{"type": "text", "text": msg.content}] if msg.content else []),
                    *({"type": "tool_use", "id": f"toolu_{secrets.token_hex(12)}", "name": c.function.name,
                       "input": json.loads(c.function.arguments)} for c in msg.tool_calls)], "tool_use"
        if why == "length" and (cut := self.cut_calls()):  # (the calls written whole, the cut one's input {})
            return cut, "max_tokens"
        cut = self.cut_calls() if why == "stop" else []
        if any(b["type"] == "tool_use" for b in cut):  # (a stop sequence inside a call: its blocks, as streamed)
            return cut, "tool_use"
        if why == "length":
            reason = "max_tokens"
        elif isinstance(self.stop, str) and self.stop in (self.req.stop_sequences or []):
            reason = "stop_sequence"
        else:
            reason = "end_turn"
        # (no text: no block, as Anthropic's `content: []`; a text block is never empty, and one sent back is a 400)
        return [{"type": "text", "text": self.text}] if self.text else [], reason

    def cut_calls(self) -> list[dict[str, Any]]:
        """The tool_use blocks of calls that max_tokens (or a stop sequence) cut short: each call written whole, with
        its input, then the one being written (`cut_call`'s); none where the output is text."""
        got = self.tools.cut_calls(self.text) if self.tools is not None else None
        if got is None:
            return []
        whole, part = got
        blocks = [{"type": "tool_use", "id": f"toolu_{secrets.token_hex(12)}", "name": c["function"]["name"],
                   "input": json.loads(c["function"]["arguments"])} for c in whole]
        name = part["function"]["name"] if part is not None else None if whole else self.cut_call()
        if name is not None:
            blocks.append({"type": "tool_use", "id": f"toolu_{secrets.token_hex(12)}", "name": name, "input": {}})
        lead = self.tools.lead(self.text)[0] if blocks else ""  # (the text before the calls)
        return [{"type": "text", "text": lead}, *blocks] if lead else blocks

    def cut_call(self) -> str | None:
        """The tool of a call that max_tokens cut short: Anthropic's reply then ends in that call's tool_use block (its
        input incomplete; the client retries with more max_tokens), not in a text block of the call's JSON as far as
        it got. None where the output is text, or the call's tool is not known (its name not reached, of tools)."""
        t = self.tools
        if t is None or (t.hermes and not t.lead(self.text)[1]):
            return None
        if t.named:
            return t.named
        names = [x.get("name") for x in self.req.tools or []]
        said = re.search(r'"name"\s*:\s*"([^"]+)"', t.lead(self.text)[1])
        if said is not None and said.group(1) in names:
            return said.group(1)
        return names[0] if len(names) == 1 else None

    def usage(self, gen: Tracked, output: int | None = None, cached: int | None = None) -> dict[str, Any]:
        """The Messages API's usage: the prompt's tokens read from the prefix cache (`cached`, else as the generation
        has them) apart from the rest (input_tokens), and the output's."""
        cached = gen.cached_tokens if cached is None else cached
        return {"input_tokens": gen.prompt_tokens - cached, "cache_read_input_tokens": cached,
                "cache_creation_input_tokens": 0,
                "output_tokens": gen.completion_tokens if output is None else output}

    def message(self, gen: Tracked, content: list[dict[str, Any]], reason: str | None) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.req.model, "content": content,
                "stop_reason": reason, "stop_sequence": self.stop if reason == "stop_sequence" else None,
                "usage": self.usage(gen)}


async def create(serving: OpenAIServing, req: p.MessagesRequest, tenant: Tenant,
                 request: Request) -> dict[str, Any] | AsyncIterator[bytes]:
    if req.max_tokens is None:
        raise _bad("max_tokens: Field required", "max_tokens")
    chat = chat_request(req)
    check_tool_choice(serving, req, tenant)
    chat, shown = with_thinking(serving, req, tenant, chat)
    # `enabled`'s budget_tokens, held to where the reply thinks: the first generation makes that many tokens at most,
    # the rest of max_tokens follows (Budgeted: the block closed where the budget ran out inside it)
    budget = (req.thinking or {}).get("budget_tokens") if shown and thinking_type(req) == "enabled" else None
    try:
        me, tools, gen = await serving.start_chat(chat, tenant, serving.ctl.new_id("msg"), req.stream, first=budget)
    except ServingError as e:
        raise _in_context_terms(e.reworded(_terms(req))) from None
    # (the reply's <think> block split off where it is given, or where the prompt opened one the model writes in
    # whatever was asked, or where the model's template thinks unasked (Qwen3's, `thinking` not sent, as Claude Code
    # sends none for a model it does not know): its thinking, not asked for, is then left out, and the tool_use
    # after it read as one; the block was the text block's start, and the call after it text, end_turn)
    begun = opened(me, getattr(gen, "prompt_tail", None))
    if budget is not None:
        gen = Budgeted(serving, me, gen, req.max_tokens, begun)
    reply = _Reply(serving, req, tools, Split(begun) if shown or begun or thinks(me) else None, shown)
    if req.stream:
        return _stream(serving, gen, reply)

    async def collect() -> dict[str, Any]:
        async for _, d in gen.events():
            thought, text = reply.feed(d.text, d.finished)
            reply.thinking += thought
            reply.text += text
            if d.finished:
                reply.finish, reply.stop = d.finish_reason, d.stop_reason
        content, reason = reply.blocks()
        return reply.message(gen, reply.thinking_blocks() + content, reason)

    return await serving._collect(request, gen, collect())


def _event(kind: str, **fields: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields}, ensure_ascii=False)}\n\n".encode()


async def _stream(serving: OpenAIServing, gen: Tracked, reply: _Reply) -> AsyncIterator[bytes]:
    """The Messages API's events; always closes `gen`. A failure once streaming is an `error` event.

    `message_start` goes with the engine's first delta, not before: its usage is the prompt's (input_tokens, and
    cache_read_input_tokens the prompt tokens the prefix cache held), as Anthropic's, and the engine knows the
    cache's part once it has started the request. It reports that part with the first delta that carries it (today
    the last: before it, the cached tokens count in message_start's input_tokens); `message_delta`'s usage is the
    whole cumulative usage, exact, which the `anthropic` client's accumulated message takes."""
    status = 499
    # text streams as it comes; with tool_choice auto (the model's own call syntax) a reply streams once it shows it
    # is text, as the chat path's does. Calls stream as they are written (CallStream, as the chat path's): a
    # tool_use block starts once its name is whole (input {}), its input goes as input_json_delta parts, and it
    # stops once the next starts or the output ends, as Anthropic streams one
    live = reply.tools is None
    auto = reply.tools is not None and reply.tools.hermes
    # (auto) a reply that turned out to be text: its calls may follow it, its text sent up to their opening (held
    # while it may be one); its text block then stops and the tool_use blocks follow it
    lead = Lead() if auto and reply.tools.text_then_calls else None
    said = ""  # (its text before its calls, once they began)
    out: list[bytes] = []
    started = False
    calls: CallStream | None = None
    closed = 0  # the tool_use blocks stopped (those started: `calls.calls`)
    # the thinking block, where the reply thinks and it is given: index 0, its thinking as it comes, stopped (with
    # its signature, as Anthropic's ends one) once the reply's text begins; the blocks after it from index `base`
    base, thought_open = 0, False

    def end_thinking() -> list[bytes]:
        nonlocal thought_open
        if not thought_open:
            return []
        thought_open = False
        return [_event("content_block_delta", index=0, delta={"type": "signature_delta",
                                                              "signature": reply.signature()}),
                _event("content_block_stop", index=0)]

    def call_events(fresh: str) -> list[bytes]:
        nonlocal closed
        ev = []
        for k, frag, opens in calls.feed(fresh):
            if opens:
                ev += [_event("content_block_stop", index=base + j) for j in range(closed, k)]  # (those before it)
                closed = k
                ev.append(_event("content_block_start", index=base + k, content_block={
                    "type": "tool_use", "id": f"toolu_{secrets.token_hex(12)}",
                    "name": calls.calls[k]["function"]["name"], "input": {}}))
            if frag:
                ev.append(_event("content_block_delta", index=base + k, delta={"type": "input_json_delta",
                                                                                "partial_json": frag}))
        return ev
    try:
        async for _, d in gen.events():
            if not started:
                started = True
                cached = max(d.num_cached_tokens, gen.cached_tokens)
                out.append(_event("message_start", message={**reply.message(gen, [], None),
                                                            "usage": reply.usage(gen, 0, cached)}))
            thought, text = reply.feed(d.text, d.finished)
            if thought and reply.shown:
                if not base:
                    base, thought_open = 1, True
                    out.append(_event("content_block_start", index=0, content_block={
                        "type": "thinking", "thinking": "", "signature": ""}))
                if not reply.omitted:
                    out.append(_event("content_block_delta", index=0, delta={"type": "thinking_delta",
                                                                             "thinking": thought}))
            reply.thinking += thought
            if text:
                out += end_thinking()
            if live and text and not reply.text:  # (the text block opens with its first text: none, no block)
                out.append(_event("content_block_start", index=base, content_block={"type": "text", "text": ""}))
            reply.text += text
            if d.finished:
                reply.finish, reply.stop = d.finish_reason, d.stop_reason
            if auto and not live and calls is None and reply.text and reply.tools.opening(reply.text) is False:
                live, text = True, reply.text  # (what was held, then as it comes)
                out.append(_event("content_block_start", index=base, content_block={"type": "text", "text": ""}))
            if live and lead is not None and (text or d.finished):
                text, rest = lead.feed(text, d.finished)
                if rest is not None:  # (its calls begin: the text before them, its block stopped)
                    if text:
                        out.append(_event("content_block_delta", index=base, delta={"type": "text_delta",
                                                                                     "text": text}))
                    out.append(_event("content_block_stop", index=base))
                    live, lead, base, text, said = False, None, base + 1, "", reply.tools.lead(reply.text)[0]
                    calls = CallStream(reply.tools)
                    out += call_events(rest)
            if live and text:
                out.append(_event("content_block_delta", index=base, delta={"type": "text_delta", "text": text}))
            elif not live:
                if calls is None and reply.text and reply.tools.opening(reply.text):
                    calls, text = CallStream(reply.tools), reply.text
                if calls is not None:
                    out += call_events(text)
            if out and not gen.pending():
                yield b"".join(out)
                out.clear()
        content, reason = reply.blocks()
        told = len(calls.calls) if calls is not None else 0
        if told and reason != "max_tokens":  # (calls sent that the whole output is not, as a stop sequence inside
            # one leaves it: the blocks sent stand, and say what the reply is, as the chat stream's finish does)
            reason = "tool_use"
        out += end_thinking()  # (a reply all thinking: max_tokens cut it)
        if live:
            if reply.text:
                out.append(_event("content_block_stop", index=base))
        elif told:  # (the calls told stand: a cut one's input is what was written, as Anthropic streams one)
            out += [_event("content_block_stop", index=base + j) for j in range(closed, told)]
        else:  # (no call began: what the output is, whole; a cut call's block of input {}, as unstreamed)
            if content and content[0]["type"] == "text" and said:  # (less the text before the calls, sent)
                rest = content[0]["text"][len(said):]
                content = [{"type": "text", "text": rest}, *content[1:]] if rest else content[1:]
            for i, b in enumerate(content, base):
                if b["type"] == "text":
                    out += [_event("content_block_start", index=i, content_block={"type": "text", "text": ""}),
                            _event("content_block_delta", index=i, delta={"type": "text_delta", "text": b["text"]})]
                else:
                    out += [_event("content_block_start", index=i, content_block={**b, "input": {}}),
                            _event("content_block_delta", index=i, delta={"type": "input_json_delta",
                                                                          "partial_json": json.dumps(b["input"])})]
                out.append(_event("content_block_stop", index=i))
        out += [_event("message_delta", delta={"stop_reason": reason,
                                               "stop_sequence": reply.stop if reason == "stop_sequence" else None},
                       usage=reply.usage(gen)),
                _event("message_stop")]
        yield b"".join(out)
        status = 200
    except ServingError as e:
        status = e.status
        yield b"".join(out) + _event("error", error=error_body(e)["error"])
    except Exception:  # noqa: BLE001 - a bug mid-stream: the client hears an error event, the metrics a 500
        status = 500
        yield b"".join(out) + _event("error", error={"type": "api_error", "message": "internal error while streaming"})
    finally:
        serving.active.discard(gen)
        gen.close(status)


async def count_tokens(serving: OpenAIServing, req: p.MessagesRequest, tenant: Tenant) -> dict[str, Any]:
    """The prompt's tokens as /v1/messages would feed them (the template, with the tools' declarations)."""
    chat = chat_request(req)
    check_tool_choice(serving, req, tenant)
    chat, _ = with_thinking(serving, req, tenant, chat)  # (the template's switch as /v1/messages sets it)
    try:
        return {"input_tokens": await serving.chat_prompt_tokens(tenant, chat)}
    except ServingError as e:
        raise e.reworded(_terms(req)) from None
