"""OpenAI's Responses API over the chat path: `POST /v1/responses`, `GET` and `DELETE /v1/responses/{id}`.

A request's input (a string, or items: messages with text parts, `function_call` and `function_call_output`, each
call answered by an output of its call_id and each output by a call, else a 400 as OpenAI's) and its `instructions`
become chat messages; tools, `tool_choice` and `text.format` become the chat request's tools and
response_format; it is validated, templated, admitted and generated as that chat completion would be. The reply is
a Response object: one `message` item of `output_text`, or `function_call` items; status `incomplete` when
max_output_tokens cut it (a call being written is an `incomplete` function_call item, its arguments so far). A model
whose template thinks (Qwen3's) has its reply's `<think>` block as a `reasoning` item before them (its text a
`reasoning_text` part, streamed as `response.reasoning_text.delta` events; its tokens usage's `reasoning_tokens`),
the calls after it read as calls; reasoning items sent back in an input are skipped, as the templates drop an
earlier turn's thinking. `reasoning.effort` is the chat request's `reasoning_effort` (thinking.effort_kwargs: "none"
turns a thinking template's switch off). A field OpenAI's request does not have, at the top level or inside
`reasoning`, `text`, `text.format`, a function tool, tool_choice, an input item or its parts, is OpenAI's 400
("Unknown parameter: 'input[0].content[0].foo'.": `known`), and so is a value OpenAI's enum does not have of a field
taken and not used (`reasoning.summary`, `text.verbosity`: "Invalid value: ..."). With tool_choice "auto" a reply's
text may go on to calls (a message item, then function_call items).
Streamed, Responses' typed server-sent events, from `response.created` to `response.completed` (text deltas as they
come, with tool_choice "auto" once the reply shows it is text; calls as they are written, as the chat path's: a
function_call item is added once its name is whole, its arguments follow in `response.function_call_arguments.delta`
parts, and it is done before the next is added, the final output's items keeping the ids and arguments told; one
that fails once streaming ends with an `error` event and `response.failed`,
with what was made until then: its text, or its function_call items). Responses with `store` (OpenAI's default) are
kept in memory, per tenant and bounded (ResponseStore), so `previous_response_id` continues a conversation (its
instructions are not carried over, as OpenAI documents); a restart forgets them. A response whose
client left before its end (streamed or not) is kept `incomplete`, with what was made until then.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request

from controller.api import protocol as p
from controller.api.serving import ClientGone, OpenAIServing, Tracked
from controller.api.structured import CallStream, Lead, ToolPlan, response_schema
from controller.api.thinking import Split, opened, thinks
from controller.errors import ServingError, field_path, invalid_value
from controller.tenants import Tenant

STORE_ENTRIES = 1024  # stored responses kept (the oldest go first)
STORE_BYTES = 64 << 20  # their conversations' JSON, all together
TEXT_PARTS = ("input_text", "output_text", "text")
ROLES = ("user", "assistant", "system", "developer")  # (a message item's: tool results are function_call_output)


@dataclass
class Stored:
    tenant: str  # its tenant's `Tenant.owner` (the name and lineage: a later namesake is another tenant)
    messages: list[dict[str, Any]]  # the conversation as chat messages, the reply last (previous_response_id's)
    response: dict[str, Any]  # the Response object
    inputs: list[dict[str, Any]]  # this request's input items, with ids (GET .../input_items)
    size: int  # their JSON's bytes, all together


class ResponseStore:
    """Stored responses by id, oldest first; at most `entries` of them and `max_bytes` of their JSON, all tenants
    together. Past either bound the tenant holding the most (responses, or bytes) loses its oldest: a tenant's
    flood of stored responses takes its own, never those of a tenant holding fewer."""

    def __init__(self, entries: int = STORE_ENTRIES, max_bytes: int = STORE_BYTES):
        self.entries, self.max_bytes = entries, max_bytes
        self._items: OrderedDict[str, Stored] = OrderedDict()
        self._owned: dict[str, OrderedDict[str, None]] = {}  # tenant -> its ids, oldest first
        self._owned_bytes: dict[str, int] = {}
        self.bytes = 0

    def put(self, rid: str, tenant: str, messages: list[dict[str, Any]], response: dict[str, Any],
            inputs: list[dict[str, Any]] | None = None) -> None:
        inputs = inputs or []
        size = len(json.dumps(messages)) + len(json.dumps(response)) + len(json.dumps(inputs))
        if rid in self._items:
            self._drop(rid)
        self._items[rid] = Stored(tenant, messages, response, inputs, size)
        self._owned.setdefault(tenant, OrderedDict())[rid] = None
        self._owned_bytes[tenant] = self._owned_bytes.get(tenant, 0) + size
        self.bytes += size
        while len(self._items) > self.entries:
            self._drop(next(iter(self._owned[max(self._owned, key=lambda t: len(self._owned[t]))])))
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._owned[max(self._owned_bytes, key=self._owned_bytes.__getitem__)])))

    def _drop(self, rid: str) -> None:
        got = self._items.pop(rid)
        self.bytes -= got.size
        owned = self._owned[got.tenant]
        del owned[rid]
        self._owned_bytes[got.tenant] -= got.size
        if not owned:
            del self._owned[got.tenant], self._owned_bytes[got.tenant]

    def get(self, rid: str, tenant: str) -> Stored | None:
        got = self._items.get(rid)
        return got if got is not None and got.tenant == tenant else None

    def delete(self, rid: str, tenant: str) -> bool:
        if self.get(rid, tenant) is None:
            return False
        self._drop(rid)
        return True


def _bad(message: str, param: str) -> ServingError:
    return ServingError(400, message, param=param)


# Fields are held to the ones OpenAI's Responses API knows, as OpenAI's API holds them ("Unknown parameter:
# 'reasoning.foo'.", a 400 of code unknown_parameter), at the top level as inside `reasoning`, `text`, `text.format`,
# a function tool and a function tool_choice. Unlike the chat route, which ignores a field it does not know as
# vLLM's does (clients written for other servers send their extras to chat completions and expect them dropped): the
# `openai` client sends a Responses request's own fields only (any other only through extra_body, on purpose), and a
# field ignored here was a setting silently not applied -- chat completions' `max_tokens` or `response_format` sent
# to /v1/responses left the reply uncapped or unshaped, a misspelt `reasoning.efort` left thinking on.
# The fields OpenAI's request has (the `openai` client's ResponseCreateParams, and input_tokens.count's) that this
# server takes and does not use; `seed` (vLLM's) is one of the request model's own.
RESPONSES_UNUSED = frozenset({
    "access_programs", "background_options", "context_management", "image", "max_tool_calls", "moderation",
    "personality", "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention", "safety_identifier",
    "service_tier", "stream_options"})
# Chat completions' names of Responses fields: the 400 says which one is meant
MOVED = {"max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens",
         "response_format": "text.format", "reasoning_effort": "reasoning.effort"}
# (`summary` and `generate_summary`, `context`, `mode`: taken, not used; `effort`: thinking.effort_kwargs)
REASONING_FIELDS = frozenset({"effort", "summary", "generate_summary", "context", "mode"})
TEXT_FIELDS = frozenset({"format", "verbosity"})  # (verbosity: taken, not used; VALUES)
FORMAT_FIELDS = {"text": frozenset({"type"}), "json_object": frozenset({"type"}),
                 "json_schema": frozenset({"type", "name", "schema", "strict", "description"})}
# (a function tool's fields of the client's FunctionToolParam; those past parameters and strict: taken, not used)
FUNCTION_FIELDS = frozenset({"type", "name", "description", "parameters", "strict", "defer_loading", "allowed_callers",
                             "output_schema", "async"})
TOOL_CHOICE_FIELDS = frozenset({"type", "name"})
ALLOWED_TOOLS_FIELDS = frozenset({"type", "mode", "tools"})  # (tool_choice allowed_tools; each function: type, name)
# An input item's fields, of each item type read here, and its parts' (the `openai` client's ResponseInputItemParam
# and content params; ids, statuses, a call's caller and namespace, a message's phase, a part's cache breakpoint or
# annotations: taken, not used). A list of parts is held by its part's type; a type not here is left to the 400 of
# input_messages, which names it
ITEM_FIELDS = {
    "message": frozenset({"type", "role", "content", "status", "id", "phase"}),
    "function_call": frozenset({"type", "id", "call_id", "name", "arguments", "status", "caller", "namespace",
                                "async"}),
    "function_call_output": frozenset({"type", "id", "call_id", "output", "status", "caller", "name", "namespace"}),
    "reasoning": frozenset({"type", "id", "summary", "content", "encrypted_content", "status"})}
ITEM_PARTS = {"message": ("content",), "function_call_output": ("output",), "reasoning": ("summary", "content")}
PART_FIELDS = {
    "input_text": frozenset({"type", "text", "prompt_cache_breakpoint"}),
    "output_text": frozenset({"type", "text", "annotations", "logprobs"}),
    "text": frozenset({"type", "text"}),  # (chat completions' text part, taken here too: TEXT_PARTS)
    "refusal": frozenset({"type", "refusal"}),
    "input_image": frozenset({"type", "image_url", "file_id", "detail", "prompt_cache_breakpoint"}),
    "input_file": frozenset({"type", "file_data", "file_id", "file_url", "filename", "detail",
                             "prompt_cache_breakpoint"}),
    "summary_text": frozenset({"type", "text"}), "reasoning_text": frozenset({"type", "text"})}
# The values OpenAI's API holds fields taken and not used here to (the `openai` client's Reasoning and
# ResponseTextConfigParam): another is OpenAI's 400 invalid_value (a misspelt `text.verbosity` was taken unsaid)
SUMMARIES = ("auto", "concise", "detailed")
VALUES = {("reasoning", "summary"): SUMMARIES, ("reasoning", "generate_summary"): SUMMARIES,
          ("reasoning", "context"): ("auto", "current_turn", "all_turns"), ("text", "verbosity"): p.VERBOSITIES}


def _unknown(where: str) -> ServingError:
    moved = f" In the Responses API, this parameter is '{MOVED[where]}'." if where in MOVED else ""
    return ServingError(400, f"Unknown parameter: '{where}'.{moved}", param=where, code="unknown_parameter")


def _only(obj: Any, fields: frozenset[str], where: str) -> None:
    """OpenAI's 400 for the first field of `obj` (at `where`) not among `fields`."""
    for k in obj if isinstance(obj, dict) else ():
        if k not in fields:
            raise _unknown(f"{where}.{k}")


def _typed(obj: Any, fields: dict[str, frozenset[str]], where: str) -> str | None:
    """`obj`'s type (None where it has none of `fields`' types), OpenAI's 400 for a field its type does not have."""
    kind = obj.get("type") if isinstance(obj, dict) else None
    if not isinstance(kind, str) or kind not in fields:  # (a type not a string, [] say, is no key to look up)
        return None
    _only(obj, fields[kind], where)
    return kind


def known(req: p.ResponsesRequest) -> None:
    """A 400 as OpenAI's for a field the Responses request does not have, where its objects are held to theirs, and
    for a value of a field taken here (not used) that OpenAI's enum does not have."""
    for k in req.model_extra or ():
        if k not in RESPONSES_UNUSED:
            raise _unknown(k)
    _only(req.reasoning, REASONING_FIELDS, "reasoning")
    _only(req.text, TEXT_FIELDS, "text")
    fmt = (req.text or {}).get("format")
    if isinstance(fmt, dict) and isinstance(fmt.get("type"), str) and fmt["type"] in FORMAT_FIELDS:
        # (another type: the chat path's 400 names it; a type not a string, [] say, is no key to look up)
        _only(fmt, FORMAT_FIELDS[fmt["type"]], "text.format")
    for i, t in enumerate(req.tools or ()):
        if t.get("type") == "function":
            _only(t, FUNCTION_FIELDS, f"tools[{i}]")
    if isinstance(req.tool_choice, dict) and req.tool_choice.get("type") == "function":
        _only(req.tool_choice, TOOL_CHOICE_FIELDS, "tool_choice")
    if isinstance(req.tool_choice, dict) and req.tool_choice.get("type") == "allowed_tools":
        _only(req.tool_choice, ALLOWED_TOOLS_FIELDS, "tool_choice")
        allowed = req.tool_choice.get("tools")
        for i, t in enumerate(allowed if isinstance(allowed, list) else ()):
            if isinstance(t, dict) and t.get("type") == "function":
                _only(t, TOOL_CHOICE_FIELDS, f"tool_choice.tools[{i}]")
    for i, item in enumerate(req.input if isinstance(req.input, list) else ()):
        kind = _typed({"type": "message", **item}, ITEM_FIELDS, f"input[{i}]")  # (a message's type may be left out)
        for field in ITEM_PARTS.get(kind, ()):
            parts = item.get(field)
            for j, part in enumerate(parts if isinstance(parts, list) else ()):
                _typed(part, PART_FIELDS, f"input[{i}].{field}[{j}]")
    for (obj, field), values in VALUES.items():
        if (v := (getattr(req, obj) or {}).get(field)) is not None and v not in values:
            raise invalid_value(v, values, f"{obj}.{field}")


# The chat request's fields (as the chat path's errors name them) and the Responses fields they came from.
_CHAT_PATHS = ((re.compile(r"^messages\b[.\w]*"), "input"),
               (re.compile(r"\bmax_(?:completion_)?tokens\b"), "max_output_tokens"),
               (re.compile(r"\bresponse_format\.json_schema\.(\w+)"), r"text.format.\1"),
               (re.compile(r"\b(?:response_format\.)?json_schema\.schema\b"), "text.format.schema"),
               (re.compile(r"\bresponse_format\.json_schema\b"), "text.format.schema"),
               (re.compile(r"\bresponse_format\b"), "text.format"),
               (re.compile(r"\btool_choice\.function\.name\b"), "tool_choice.name"),
               (re.compile(r"\btool_choice\.allowed_tools\.tools\.(\d+)"), r"tool_choice.tools[\1]"),
               (re.compile(r"\breasoning_effort\b"), "reasoning.effort"),
               (re.compile(r"\btools\.(\d+)\.function\.(\w+)"), r"tools[\1].\2"),
               (re.compile(r"\btools\.(\d+)"), r"tools[\1]"),
               (re.compile(r"\{'type': 'function', 'function': \{'name': \.\.\.\}\}"),
                "{'type': 'function', 'name': ...}"))


def _as_responses(e: ServingError) -> ServingError:
    """The chat path's error in the Responses request's terms: its param and message name the fields the client
    sent (`input`, `max_output_tokens`, `text.format`, `tool_choice.name`), not the chat request's."""
    return e.reworded(_CHAT_PATHS)


def _text(content: Any, where: str) -> str:
    """A message's content: a string, or its text parts joined as the chat path joins them (protocol.PARTS_SEP; other
    parts, images say, are refused)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"{where}.content must be a string or a list of text parts", f"{where}.content")
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS or not isinstance(part.get("text"), str):
            raise _bad(f"{where}.content[{j}]: only text parts ({', '.join(TEXT_PARTS)}) are supported, got "
                       f"{kind!r}", f"{where}.content")
        out.append(part["text"])
    return p.PARTS_SEP.join(out)


def input_messages(raw: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chat messages of a Responses input: messages, a model's earlier calls (one assistant message for calls in
    a row) and their outputs (tool messages); reasoning items are skipped."""
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    msgs: list[dict[str, Any]] = []
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            if item.get("role") not in ROLES:
                raise _bad(f"{where}.role must be one of {', '.join(ROLES)}, got {item.get('role')!r}",
                           f"{where}.role")
            msgs.append({"role": item["role"], "content": _text(item.get("content"), where)})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
            if not all(isinstance(x, str) for x in (call["id"], item.get("name"), item.get("arguments"))):
                raise _bad(f"{where}: a function_call needs call_id, name and arguments (strings)", where)
            last = msgs[-1] if msgs else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") and not last["content"]:
                last["tool_calls"].append(call)
            else:
                msgs.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out = item.get("output")
            if not isinstance(item.get("call_id"), str) or not isinstance(out, (str, list)):
                raise _bad(f"{where}: a function_call_output needs its call_id and output (a string or text "
                           "parts)", where)
            msgs.append({"role": "tool", "tool_call_id": item["call_id"],
                         "content": out if isinstance(out, str) else _text(out, where)})
        elif kind != "reasoning":
            raise _bad(f"{where}: input items of type {kind!r} are not supported (message, function_call and "
                       "function_call_output are)", where)
    return msgs


def _tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    out = []
    for i, t in enumerate(tools):
        if t.get("type") != "function":
            raise _bad(f"tools[{i}]: only function tools are supported, got {t.get('type')!r}", "tools")
        out.append({"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters", "strict")
                                                     if t.get(k) is not None}})
    return out


def _tool_choice(choice: str | dict[str, Any] | None) -> Any:
    if not isinstance(choice, dict):
        return choice
    if choice.get("type") == "allowed_tools" and isinstance(choice.get("tools"), list):  # (the chat path's form)
        return {"type": "allowed_tools", "allowed_tools": {"mode": choice.get("mode"), "tools": [
            {"type": t.get("type"), "function": {"name": t.get("name")}} if isinstance(t, dict) else t
            for t in choice["tools"]]}}
    if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
        raise _bad("tool_choice must be none, auto, required, {\"type\": \"function\", \"name\": ...} or "
                   "{\"type\": \"allowed_tools\", \"mode\": ..., \"tools\": [...]}", "tool_choice")
    return {"type": "function", "function": {"name": choice["name"]}}


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    fmt = (text or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise _bad("text.format must be an object", "text.format")
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}}
    return fmt


def chat_request(req: p.ResponsesRequest, history: list[dict[str, Any]]) -> tuple[p.ChatCompletionRequest,
                                                                                 list[dict[str, Any]]]:
    """The chat request a Responses request means, and its conversation (without the instructions) to store."""
    if req.background:
        raise _bad("background responses are not supported", "background")
    if req.conversation is not None:
        raise _bad("conversations are not supported: chain responses with previous_response_id", "conversation")
    if req.prompt is not None:
        raise _bad("stored prompt templates are not supported: send input and instructions", "prompt")
    conversation = [*history, *input_messages(req.input)]
    _calls_paired(req.input, history)
    return _chat(req, conversation), conversation


def _calls_paired(raw: str | list[dict[str, Any]], history: list[dict[str, Any]]) -> None:
    """A 400, as OpenAI's, for a function_call_output whose call_id no function_call has, in the input or in the
    conversation before previous_response_id ("No tool call found for function call output with call_id ...": the
    model read an answer to a call it never made), and for a function_call, in the input or the chain's last calls,
    that no function_call_output answers ("No tool output found for function call ...": the model read on from a call
    with no result, as if it had one); answers in any order."""
    items = [] if isinstance(raw, str) else raw
    calls = {c.get("id") for m in history for c in m.get("tool_calls") or ()}
    calls |= {item.get("call_id") for item in items if item.get("type") == "function_call"}
    outputs = {m.get("tool_call_id") for m in history if m.get("role") == "tool"}
    outputs |= {item.get("call_id") for item in items if item.get("type") == "function_call_output"}
    for i, item in enumerate(items):
        if item.get("type") == "function_call_output" and item.get("call_id") not in calls:
            raise _bad(f"input[{i}]: no tool call found for function call output with call_id "
                       f"{item.get('call_id')!r}: no function_call in the input, or in the previous_response_id "
                       "chain, has it", f"input[{i}].call_id")
    for c in (c for m in history for c in m.get("tool_calls") or ()):
        if c.get("id") not in outputs:
            raise _bad(f"input: no tool output found for function call {c.get('id')!r}: the previous_response_id "
                       "response's call has no function_call_output in the input", "input")
    for i, item in enumerate(items):
        if item.get("type") == "function_call" and item.get("call_id") not in outputs:
            raise _bad(f"input[{i}]: no tool output found for function call {item.get('call_id')!r}: no "
                       "function_call_output in the input has its call_id", f"input[{i}].call_id")


def _chat(req: p.ResponsesRequest, conversation: list[dict[str, Any]]) -> p.ChatCompletionRequest:
    """The chat request of `conversation` under the request's instructions and options."""
    system = [{"role": "system", "content": req.instructions}] if req.instructions else []
    logprobs = wants_logprobs(req)
    body: dict[str, Any] = {"model": req.model, "messages": [*system, *conversation],
                            "max_completion_tokens": req.max_output_tokens, "temperature": req.temperature,
                            "top_p": req.top_p, "seed": req.seed, "tools": _tools(req.tools),
                            "tool_choice": _tool_choice(req.tool_choice), "parallel_tool_calls": req.parallel_tool_calls,
                            "response_format": _response_format(req.text),
                            "reasoning_effort": (req.reasoning or {}).get("effort"),
                            "logprobs": True if logprobs else None, "top_logprobs": req.top_logprobs if logprobs else None}
    try:
        return p.ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(field_path(err["loc"]))  # (less a union branch's tag: `tool_choice`, not its literal's)
        raise _as_responses(_bad(f"{where}: {err['msg']}", where)) from None


def wants_logprobs(req: p.ResponsesRequest) -> bool:
    """Whether the output text carries its tokens' logprobs (OpenAI's include "message.output_text.logprobs";
    top_logprobs alone asks for them too)."""
    return "message.output_text.logprobs" in (req.include or []) or req.top_logprobs is not None


async def _fewest_dropped(serving: OpenAIServing, tenant: Tenant, req: p.ResponsesRequest,
                          conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`truncation: "auto"`: the conversation without the fewest oldest turns (each with the tool results that
    answered its calls) that leave room for max_output_tokens (a token at least), found by a binary search over
    tokenize-only renders (a few for a long stored conversation, not one a turn); its last turn alone when none
    fits (whose start_chat then gives the error)."""
    starts, i = [], 0  # where each shorter conversation starts
    while True:
        i += 1
        while i < len(conversation) and conversation[i].get("role") == "tool":
            i += 1
        if i >= len(conversation):
            break
        starts.append(i)
    if not starts:
        return conversation
    ctx, mt = serving.lookup(tenant, req.model).max_model_len, req.max_output_tokens

    async def fits(start: int) -> bool:
        n = await serving.chat_prompt_tokens(tenant, _chat(req, conversation[start:]))
        return n < ctx and (mt is None or n + mt <= ctx)

    lo, hi = 0, len(starts) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if await fits(starts[mid]):
            hi = mid
        else:
            lo = mid + 1
    return conversation[starts[lo]:]


def _item_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


class _Reply:
    """One response as it is built: its Response object's fields and output items."""

    def __init__(self, serving: OpenAIServing, req: p.ResponsesRequest, rid: str, tools: ToolPlan | None,
                 defaults: dict[str, float] | None = None, split: Split | None = None):
        self.serving, self.req, self.rid, self.tools = serving, req, rid, tools
        # the reply's thinking (its <think> block, `split` from its text: a reasoning item before the others),
        # its tokens, and the last delta's (thinking, text)
        self.split, self.thinking, self.reasoning_tokens, self.fresh = split, "", 0, ("", "")
        self.rs_id = _item_id("rs")
        self._held: list[dict[str, Any]] = []  # (with logprobs) those of tokens the split holds back
        self._held_tokens = 0  # how many
        self.defaults = defaults or {}  # (the model's sampling defaults: what temperature and top_p were, unsent)
        self.created = int(time.time())
        self.msg_id = _item_id("msg")
        self.text, self.finish = "", None
        self.logprobs: list[dict[str, Any]] = []  # (with wants_logprobs) each output token's, in order
        self.me = serving.ctl.resolve(req.model) if wants_logprobs(req) else None  # (started: it exists)
        # (streamed) the calls as their events told them, as they were written: the output's function_call items
        # keep their call_ids and arguments (the argument deltas joined), whatever ends the response
        self.streamed: CallStream | None = None
        self.fc_ids: list[str] = []  # the function_call items' ids, by their place in the output

    def call_item(self, k: int, call: dict[str, Any], status: str) -> dict[str, Any]:
        """The output's `k`th item, a chat tool call, as the Responses API's function_call item."""
        while len(self.fc_ids) <= k:
            self.fc_ids.append(_item_id("fc"))
        return {"type": "function_call", "id": self.fc_ids[k], "call_id": call["id"],
                "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": status}

    def as_streamed(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The output's chat tool calls, those the stream told with the id and arguments it told them."""
        told = self.streamed.calls if self.streamed is not None else []
        return [{**c, "id": told[k]["id"], "function": dict(told[k]["function"])}
                if k < len(told) and told[k]["function"]["name"] == c["function"]["name"] else c
                for k, c in enumerate(calls)]

    def add(self, d: Any) -> list[dict[str, Any]]:
        """Take one delta of the generation: its text (its thinking apart: `fresh`), its finish, and (when asked) its
        tokens' logprobs, returned."""
        self.fresh = self.split.feed(d.text, d.finished) if self.split is not None else ("", d.text)
        thought, text = self.fresh
        reasoned = bool(thought) or self.split is not None and self.split.state in ("open", "think", "close")
        # (tokens the split holds back, that may begin a <think> tag: the text's or the thinking's, once one tells)
        held = self.split is not None and not (thought or text) and self.split.state == "start"
        if held:
            self._held_tokens += len(d.token_ids)
        elif reasoned:
            self.reasoning_tokens += len(d.token_ids) + self._held_tokens
        if not held:
            self._held_tokens = 0
        self.thinking += thought
        self.text += text
        if d.finished:
            self.finish = d.finish_reason
        if self.me is None:
            return []
        lps = [lp.model_dump() for lp in self.serving._chat_logprobs(self.me, d, self.req.top_logprobs or 0)]
        if d.finished and d.finish_reason == "stop" and not isinstance(d.stop_reason, str):
            # (the token that ended the reply, EOS or a stop token id, is no part of the output text, as the
            # detokenizer leaves it out: its logprob was the text's last, "<|im_end|>", where the stream, whose
            # last delta carries no text, sent none)
            lps = lps[:-1]
        if held:
            self._held += lps
            return []
        lps, self._held = ([] if reasoned else self._held) + lps, []
        if reasoned and not text:  # (the output text's logprobs: not its thinking's tokens)
            return []
        self.logprobs += lps
        return lps

    def response(self, gen: Tracked, status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
        r = self.req
        usage = None
        if status != "in_progress":
            # (cache_write_tokens, which OpenAI's Response requires: none are billed as written here, the prefix
            # cache keeps every prompt's blocks unasked)
            usage = {"input_tokens": gen.prompt_tokens,
                     "input_tokens_details": {"cached_tokens": gen.cached_tokens, "cache_write_tokens": 0},
                     "output_tokens": gen.completion_tokens,
                     "output_tokens_details": {"reasoning_tokens": min(self.reasoning_tokens, gen.completion_tokens)},
                     "total_tokens": gen.prompt_tokens + gen.completion_tokens}
        return {"id": self.rid, "object": "response", "created_at": self.created, "status": status, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "instructions": r.instructions, "max_output_tokens": r.max_output_tokens, "model": r.model,
                "output": output, "parallel_tool_calls": r.parallel_tool_calls is not False,
                "previous_response_id": r.previous_response_id,
                "temperature": self.defaults.get("temperature", 1.0) if r.temperature is None else r.temperature,
                "top_p": self.defaults.get("top_p", 1.0) if r.top_p is None else r.top_p, "tool_choice": r.tool_choice or "auto",
                "tools": r.tools or [], "text": {"format": {"type": "text"}, **(r.text or {})}, "store": r.store,
                "metadata": r.metadata or {}, "usage": usage, "user": r.user,
                "truncation": r.truncation or "disabled",
                "reasoning": {"effort": None, "summary": None, **(r.reasoning or {})}}

    def reasoning(self, status: str) -> list[dict[str, Any]]:
        """The reasoning item of the reply's thinking (none where it did not think), as OpenAI's for an open-weight
        model: its text in `content` (`reasoning_text`), no summary."""
        if not self.thinking:
            return []
        return [{"type": "reasoning", "id": self.rs_id, "summary": [],
                 "content": [{"type": "reasoning_text", "text": self.thinking}], "status": status}]

    def thought_only(self) -> bool:
        """Whether the reply so far is all thinking: its thinking stands alone, no empty message after it."""
        return bool(self.thinking) and not self.text

    def message(self, status: str, text: str | None = None) -> dict[str, Any]:
        """The message item of the output's text (`text`: the text before its calls, and its tokens' logprobs)."""
        lps = self.logprobs
        if text is not None:  # (the first tokens' that make it)
            n, lps = 0, []
            for lp in self.logprobs:
                if n >= len(text):
                    break
                lps.append(lp)
                n += len(lp["token"])
        return {"type": "message", "id": self.msg_id, "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": self.text if text is None else text, "annotations": [],
                             "logprobs": lps}]}

    def output(self) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
        """The output items, the assistant's chat message (for the stored conversation) and the status."""
        msg, _ = self.serving._reply(self.text, self.finish, self.tools)
        told = self.streamed is not None and bool(self.streamed.calls)
        if self.tools is not None and (self.finish == "length" or told and not msg.tool_calls):
            # (calls cut by max_output_tokens; or, streamed, calls told that the whole output is not, as the
            # grammar should never let it end: the items told, as a cut output's)
            items, assistant = self.cut()
            return items or [self.message("incomplete")], assistant, "incomplete"
        status = "incomplete" if self.finish == "length" else "completed"
        think = self.reasoning("incomplete" if status == "incomplete" and not self.text else "completed")
        if not msg.tool_calls:
            return [*think, *([] if self.thought_only() else [self.message(status)])], {
                "role": "assistant", "content": self.text}, status
        calls = self.as_streamed([c.model_dump() for c in msg.tool_calls])
        said = [self.message("completed", msg.content)] if msg.content else []  # (the text before the calls)
        return [*think, *said, *(self.call_item(k, c, "completed") for k, c in enumerate(calls))], {
            "role": "assistant", "content": msg.content, "tool_calls": calls}, status

    def cut(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The output items of a response cut short (its client left, the server ended it, max_output_tokens) and its
        assistant message for the stored conversation: its text so far; with tools, the calls written whole
        (`completed`) and the one being written (`incomplete`, its arguments so far), as OpenAI's function_call
        items have them; the stored conversation holds the whole ones only (a call half written has no arguments
        to answer)."""
        think = self.reasoning("completed" if self.text else "incomplete")
        got = self.tools.cut_calls(self.text) if self.tools is not None else None
        if got is None:
            return [*think, *([self.message("incomplete")] if self.text else [])], {"role": "assistant",
                                                                                   "content": self.text}
        whole, part = got
        whole = self.as_streamed(whole)
        lead = self.tools.lead(self.text)[0]  # (the text before the calls)
        items = [*think, *([self.message("completed", lead)] if lead else []),
                 *(self.call_item(k, c, "completed") for k, c in enumerate(whole))]
        if part:
            items.append(self.call_item(len(whole), self.as_streamed([*whole, part])[-1], "incomplete"))
        return items, ({"role": "assistant", "content": lead or None, "tool_calls": whole} if whole else
                       {"role": "assistant", "content": lead})


def _history(store: ResponseStore, req: p.ResponsesRequest, tenant: Tenant) -> list[dict[str, Any]]:
    """The conversation before `previous_response_id` ([] without one); 404 when it is not stored."""
    if req.previous_response_id is None:
        return []
    prev = store.get(req.previous_response_id, tenant.owner)
    if prev is None:
        raise ServingError(404, f"Previous response with id '{req.previous_response_id}' not found.",
                           param="previous_response_id", code="not_found")
    return prev.messages


async def create(serving: OpenAIServing, store: ResponseStore, req: p.ResponsesRequest, tenant: Tenant,
                 request: Request) -> dict[str, Any] | AsyncIterator[bytes]:
    known(req)  # (before its previous response is looked up: the request as sent is checked first, as OpenAI's)
    chat, conversation = chat_request(req, _history(store, req, tenant))
    rid = serving.ctl.new_id("resp").replace("-", "_", 1)  # (OpenAI's ids: resp_...)
    truncated = False
    while True:
        try:
            me, tools, gen = await serving.start_chat(chat, tenant, rid, req.stream)
            break
        except ServingError as e:
            if truncated or req.truncation != "auto" or e.code != "context_length_exceeded":
                raise _as_responses(e) from None
            # (the stored conversation stays whole: a later turn truncates it again)
            try:
                chat, truncated = _chat(req, await _fewest_dropped(serving, tenant, req, conversation)), True
            except ServingError as e2:
                raise _as_responses(e2) from None
    ran = gen.subs[0].params  # (the sampling it runs with: the model's defaults for what was not sent; no 2nd stat)
    # a model whose template thinks (Qwen3's): the reply's <think> block (or the one the prompt opened) is a
    # reasoning item, and the calls after it are read as function_call items; it was the output text's start, and
    # a call after it text (Codex CLI ran no tool). Not where the output is held to a shape from its first token
    # (a call forced, text.format of a schema): no block begins it. text.format "text" (clients send it for plain
    # text) holds nothing: the think block and the calls after it were the output text there
    held = response_schema(chat.response_format) is not None or tools is not None and not tools.hermes
    split = Split(opened(me, getattr(gen, "prompt_tail", None))) if thinks(me) and not held else None
    reply = _Reply(serving, req, rid, tools, {"temperature": ran.temperature, "top_p": ran.top_p}, split)

    def finish() -> dict[str, Any]:
        items, assistant, status = reply.output()
        out = reply.response(gen, status, items)
        if req.store:
            store.put(rid, tenant.owner, [*conversation, assistant], out, input_items(req.input))
        return out

    def cut() -> None:
        """A response its client left (streamed or not; or the server ended its stream) before its end: with
        `store`, what was made until then is kept as an incomplete response (GET /v1/responses/{id} finds it,
        previous_response_id continues from it): its text, or its calls (`_Reply.cut`)."""
        if not req.store:
            return
        output, assistant = reply.cut()
        out = {**reply.response(gen, "incomplete", output), "incomplete_details": {"reason": "interrupted"}}
        store.put(rid, tenant.owner, [*conversation, assistant], out, input_items(req.input))

    if req.stream:
        return _stream(serving, gen, reply, finish, cut)

    async def collect() -> dict[str, Any]:
        async for _, d in gen.events():
            reply.add(d)
        return finish()

    try:
        return await serving._collect(request, gen, collect())
    except (ClientGone, asyncio.CancelledError):  # (the client left: its own watch, or the route's around it)
        for d in gen.held():  # (not streamed, its deltas were held for the whole answer)
            reply.add(d)
        cut()
        raise


def _event(seq: list[int], kind: str, **fields: Any) -> bytes:
    seq[0] += 1
    body = json.dumps({"type": kind, "sequence_number": seq[0] - 1, **fields}, ensure_ascii=False)
    return f"event: {kind}\ndata: {body}\n\n".encode()


def _item_events(seq: list[int], index: int, item: dict[str, Any]) -> list[bytes]:
    """A whole item's events, as a stream that held it to the end sends them."""
    iid = item["id"]
    if item["type"] == "function_call":
        return [_event(seq, "response.output_item.added", output_index=index,
                       item={**item, "arguments": "", "status": "in_progress"}),
                _event(seq, "response.function_call_arguments.delta", item_id=iid, output_index=index,
                       delta=item["arguments"]),
                *_call_done(seq, index, item)]
    part = item["content"][0]
    return [_event(seq, "response.output_item.added", output_index=index,
                   item={**item, "status": "in_progress", "content": []}),
            _event(seq, "response.content_part.added", item_id=iid, output_index=index, content_index=0,
                   part={**part, "text": ""}),
            *([_event(seq, "response.output_text.delta", item_id=iid, output_index=index, content_index=0,
                      delta=part["text"], logprobs=part["logprobs"])] if part["text"] else []),
            *_text_done(seq, index, item)]


def _call_done(seq: list[int], index: int, item: dict[str, Any]) -> list[bytes]:
    """The events that end a function_call item: its whole arguments, the item."""
    return [_event(seq, "response.function_call_arguments.done", item_id=item["id"], output_index=index,
                   name=item["name"], arguments=item["arguments"]),
            _event(seq, "response.output_item.done", output_index=index, item=item)]


def _text_done(seq: list[int], index: int, item: dict[str, Any]) -> list[bytes]:
    part = item["content"][0]
    return [_event(seq, "response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                   text=part["text"], logprobs=part["logprobs"]),
            _event(seq, "response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                   part=part),
            _event(seq, "response.output_item.done", output_index=index, item=item)]


async def _stream(serving: OpenAIServing, gen: Tracked, reply: _Reply, finish, cut=None) -> AsyncIterator[bytes]:
    """Responses' events; always closes `gen`. A failure once streaming is an `error` event (the status has gone).
    `cut`: called when the stream ends before its end (its client went away): the response so far is kept."""
    seq, status = [0], 499
    # text streams as it comes; with tool_choice "auto" (the model's own call syntax) a reply streams once it shows
    # it is text, as the chat path's does. Calls stream as they are written (CallStream, as the chat path's): a
    # function_call item is added once its name is whole, its arguments go as deltas, and it is done (arguments
    # done, item done) once the next opens or the output ends, as OpenAI streams one
    live = reply.tools is None
    auto = reply.tools is not None and reply.tools.hermes
    # ("auto") a reply that turned out to be text: its calls may follow it, its text sent up to their opening (held
    # while it may be one); its message item is then done and the calls' items follow it
    lead = Lead() if auto and reply.tools.text_then_calls else None
    closed = [0]  # the calls whose item is done (those added: `reply.streamed.calls`)
    # the reasoning item, where the reply thinks: output index 0, its text as it comes, done once the reply's text
    # begins (or at the end); the items after it from output index `base`. The message item opens with the reply's
    # first text where the reply may think first, else at once
    base, thinking, shown = 0, False, False

    def calls(fresh: str) -> list[bytes]:
        cs, ev = reply.streamed, []
        for k, frag, opens in cs.feed(fresh):
            if opens:
                for j in range(closed[0], k):  # (those before it are whole)
                    ev += _call_done(seq, base + j, reply.call_item(j, cs.calls[j], "completed"))
                closed[0] = k
                ev.append(_event(seq, "response.output_item.added", output_index=base + k,
                                 item={**reply.call_item(k, cs.calls[k], "in_progress"), "arguments": ""}))
            if frag:
                ev.append(_event(seq, "response.function_call_arguments.delta", item_id=reply.fc_ids[k],
                                 output_index=base + k, delta=frag))
        return ev

    def opened() -> list[bytes]:
        nonlocal shown
        shown = True
        return [_event(seq, "response.output_item.added", output_index=base, item={**reply.message("in_progress"),
                                                                                   "content": []}),
                _event(seq, "response.content_part.added", item_id=reply.msg_id, output_index=base, content_index=0,
                       part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})]

    def thought(delta: str) -> list[bytes]:
        nonlocal base, thinking
        ev = []
        if not base:
            base, thinking = 1, True
            ev.append(_event(seq, "response.output_item.added", output_index=0,
                             item={**reply.reasoning("in_progress")[0], "content": []}))
        return [*ev, _event(seq, "response.reasoning_text.delta", item_id=reply.rs_id, output_index=0,
                            content_index=0, delta=delta)]

    def thought_done(item: dict[str, Any] | None = None) -> list[bytes]:
        nonlocal thinking
        if not thinking:
            return []
        thinking = False
        item = item or reply.reasoning("completed")[0]
        return [_event(seq, "response.reasoning_text.done", item_id=reply.rs_id, output_index=0, content_index=0,
                       text=reply.thinking),
                _event(seq, "response.output_item.done", output_index=0, item=item)]

    try:
        start = reply.response(gen, "in_progress", [])
        out = [_event(seq, "response.created", response=start), _event(seq, "response.in_progress", response=start)]
        if live and reply.split is None:
            out += opened()
        yield b"".join(out)
        out.clear()
        async for _, d in gen.events():
            lps = reply.add(d)
            think, text = reply.fresh
            if think:
                out += thought(think)
            if text:
                out += thought_done()
            if live and text and not shown:
                out += opened()
            if (auto and not live and reply.streamed is None and reply.text
                    and reply.tools.opening(reply.text) is False):
                live, text, lps = True, reply.text, list(reply.logprobs)  # (what was held, then as it comes)
                out += opened()
            if live and lead is not None and (text or d.finished):
                text, rest = lead.feed(text, d.finished)
                if rest is not None:  # (its calls begin: the text before them, its message item done)
                    if text:
                        out.append(_event(seq, "response.output_text.delta", item_id=reply.msg_id,
                                          output_index=base, content_index=0, delta=text, logprobs=lps))
                    out += _text_done(seq, base, reply.message("completed", reply.tools.lead(reply.text)[0]))
                    live, lead, base, text = False, None, base + 1, ""
                    reply.streamed = CallStream(reply.tools)
                    out += calls(rest)
            if live and text:
                out.append(_event(seq, "response.output_text.delta", item_id=reply.msg_id, output_index=base,
                                  content_index=0, delta=text, logprobs=lps))
            elif not live:
                if reply.streamed is None and reply.text and reply.tools.opening(reply.text):
                    reply.streamed, text = CallStream(reply.tools), reply.text
                if reply.streamed is not None:
                    out += calls(text)
            if out and not gen.pending():
                yield b"".join(out)
                out.clear()
        done = finish()
        out += thought_done(done["output"][0] if base else None)  # (a reply all thinking)
        if live and shown:
            out += _text_done(seq, base, done["output"][base])
        elif live:  # (the message item not opened: no text came; an empty reply's, unless it all thought)
            for i, item in enumerate(done["output"][base:], base):
                out += _item_events(seq, i, item)
        else:  # (the calls not done yet, told or not; or what the output is, where none was told)
            told = len(reply.streamed.calls) if reply.streamed is not None else 0
            for i, item in enumerate(done["output"][base + closed[0]:], base + closed[0]):
                out += _call_done(seq, i, item) if i - base < told else _item_events(seq, i, item)
        kind = "response.incomplete" if done["status"] == "incomplete" else "response.completed"
        out.append(_event(seq, kind, response=done))
        yield b"".join(out)
        status = 200
    except ServingError as e:
        status = e.status
        yield b"".join(out) + _event(seq, "error", code=e.code or str(e.status), message=e.message,
                                     param=e.param) + _failed(seq, reply, gen, e.status, e.message)
    except Exception:  # noqa: BLE001 - a bug mid-stream: the client hears an error event, the metrics a 500
        status = 500
        yield b"".join(out) + _event(seq, "error", code="internal_error", message="internal error while streaming",
                                     param=None) + _failed(seq, reply, gen, 500, "internal error while streaming")
    finally:
        serving.active.discard(gen)
        gen.close(status)
        if status == 499 and cut is not None:
            cut()


def _failed(seq: list[int], reply: _Reply, gen: Tracked, status: int, message: str) -> bytes:
    """The stream's last event when the response failed (an engine's error, an operator's cancel, shutdown):
    `response.failed`, whose response is `failed` with its error and what was made until then (`_Reply.cut`: its
    text, or its function_call items, as response.incomplete and a stored cut response hold them), as OpenAI ends
    such a stream (clients wait for one of response.completed, incomplete or failed; the `error` event before it
    alone ended nothing)."""
    code = "rate_limit_exceeded" if status == 429 else "server_error" if status >= 500 else "invalid_prompt"
    output, _ = reply.cut()  # (its text, or its calls: the whole ones completed, the one being written incomplete)
    return _event(seq, "response.failed", response={**reply.response(gen, "failed", output),
                                                    "error": {"code": code, "message": message}})


async def input_tokens(serving: OpenAIServing, store: ResponseStore, req: p.ResponsesRequest,
                       tenant: Tenant) -> dict[str, Any]:
    """POST /v1/responses/input_tokens: the tokens the request's input would be, as it would be fed (its
    instructions, the conversation before previous_response_id, the tools' declarations); nothing is generated."""
    known(req)
    chat, _ = chat_request(req, _history(store, req, tenant))
    try:
        n = await serving.chat_prompt_tokens(tenant, chat)
    except ServingError as e:
        raise _as_responses(e) from None
    return {"object": "response.input_tokens", "input_tokens": n}


def stored(store: ResponseStore, rid: str, tenant: Tenant) -> Stored:
    """A stored response (another tenant's, or one forgotten: 404)."""
    got = store.get(rid, tenant.owner)
    if got is None:
        raise ServingError(404, f"Response with id '{rid}' not found.", param="response_id", code="not_found")
    return got


def input_items(raw: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A request's input as Responses' items with ids (GET .../input_items): a string is one user message; a
    message's string content is one text part (output_text for the assistant's, input_text for the others')."""
    items = [{"type": "message", "role": "user", "content": raw}] if isinstance(raw, str) else raw
    out = []
    for item in items:
        item = {"type": "message", **item} if "type" not in item else dict(item)
        if item["type"] == "message":
            if isinstance(item.get("content"), str):
                kind = "output_text" if item.get("role") == "assistant" else "input_text"
                item["content"] = [{"type": kind, "text": item["content"]}]
            item.setdefault("status", "completed")
        item.setdefault("id", _item_id("msg" if item["type"] == "message" else "fc" if item["type"] == "function_call"
                                       else "fco"))
        out.append(item)
    return out


def page(items: list[dict[str, Any]], order: str, limit: int | str, after: str | None) -> dict[str, Any]:
    """A list page as OpenAI's list endpoints give it (`order` desc: newest first, their default); `limit` as the
    query string has it."""
    if order not in ("asc", "desc"):
        raise _bad("order must be 'asc' or 'desc'", "order")
    try:
        limit = int(limit)
    except ValueError:
        raise _bad(f"limit must be an integer, got {limit!r}", "limit") from None
    if not 1 <= limit <= 100:
        raise _bad("limit must be between 1 and 100", "limit")
    seq = items[::-1] if order == "desc" else list(items)
    if after is not None:
        at = next((i for i, x in enumerate(seq) if x.get("id") == after), None)
        if at is None:
            raise _bad(f"no item with id '{after}'", "after")
        seq = seq[at + 1:]
    data = seq[:limit]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(seq) > limit}
