"""Outputs held to a shape: OpenAI's `response_format` and `tools`, as llguidance grammars the engine's sampler
masks each token with (SamplingParams.grammar).

- `response_format` `json_object` (any JSON object) or `json_schema` (an instance of its schema).
- `tools` with `tool_choice` "required" (a JSON list of calls, `[{"name": ..., "parameters": {...}}]`, as vLLM
  constrains it) or one named function (its arguments object): the output is parsed into `tool_calls`. "auto":
  text, or calls in the model's own syntax (hermes' `<tool_call>` blocks, where its chat template writes them), or
  text, then such calls (the text the content, as vLLM's hermes parser reads it);
  for a model whose syntax this server cannot read, a 400, as vLLM answers without `--enable-auto-tool-choice`.
  "none": the tools are left out of the prompt. OpenAI's `allowed_tools`: its mode ("auto", "required") with the
  calls held to the tools it lists, every tool still declared in the prompt.
- both: with "auto" (the model's own call syntax) the output is either calls or text held to the response_format
  (`ToolPlan.answering`: an alternation of the two), as vLLM and Anthropic's structured outputs take both; a call
  forced ("required", a named function) is held to the call alone; "none", to the response_format alone.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from controller.errors import ServingError

# JSON as the model writes it: no free whitespace (a model could pad forever), Python's separators; `oneOf` is
# generated as `anyOf` (as vLLM's backends do: llguidance otherwise refuses a oneOf whose branches it cannot prove
# disjoint, and an output matching two overlapping branches is the approximation's one difference)
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "coerce_one_of": True}


def json_grammar(schema: dict[str, Any], param: str) -> str:
    """The llguidance grammar of a JSON schema; a 400 on `param` if it cannot be compiled."""
    from llguidance import LLMatcher

    try:
        grammar = LLMatcher.grammar_from_json_schema(schema, overrides=JSON_LAYOUT)
    except ValueError as e:
        raise ServingError(400, f"{param}: {e}", param=param) from None
    return _compiled(grammar, param, "the schema cannot be used: ")


def response_grammar(rf: dict[str, Any] | None) -> str | None:
    """The grammar of OpenAI's response_format (None: free text): `json_object` any JSON object, `json_schema` its
    `json_schema.schema`. A 400 naming the field for anything else or a schema it cannot compile."""
    schema = response_schema(rf)
    return None if schema is None else json_grammar(schema, "response_format")


def response_schema(rf: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON schema OpenAI's response_format holds the output to (None: free text): `json_object` any JSON
    object, `json_schema` its `json_schema.schema`, closed. A 400 naming the field for anything else (not compiled:
    response_grammar's)."""
    kind = (rf or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        raise ServingError(400, f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                           param="response_format.type")
    spec = rf.get("json_schema")  # type: ignore[union-attr]
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise ServingError(400, "response_format type 'json_schema' needs json_schema.schema, a JSON schema object",
                           param="response_format.json_schema")
    # (closed, as vLLM's default backend reads a schema, xgrammar's strict mode: vLLM's documented example sends a
    # pydantic model_json_schema(), which says nothing of additionalProperties, and gets its model's keys alone)
    return closed_schema(schema)


def _compiled(grammar: str, param: str, what: str = "") -> str:
    """`grammar` if llguidance can use it; else a 400 on `param` saying why (after `what`)."""
    from llguidance import LLMatcher

    err = LLMatcher.validate_grammar(grammar)
    if err:  # (its first line, and the reason a parser adds below a drawing of where: "error: ...")
        lines = [x.strip() for x in err.strip().splitlines()]
        why = " ".join([lines[0], *(x.removeprefix("error: ") for x in lines[1:] if x.startswith("error: "))])
        raise ServingError(400, f"{param}: {what}{why}", param=param)
    return grammar


_SO_SHAPES = ("json", "regex", "choice", "grammar", "json_object")
# vLLM's options beside a shape that change nothing here: the JSON layout has no free whitespace already, and
# there is no other backend to fall back to
_SO_OPTIONS = frozenset({"disable_any_whitespace", "whitespace_pattern", "disable_fallback",
                         "disable_additional_properties"})  # (the last: see closed_schema)


_GUIDED = ("json", "regex", "choice", "grammar")  # vLLM's older guided_* fields


def asks_shape(req: Any) -> bool:
    """Whether a request's sampling fields ask for a shape (`response_format`, vLLM's structured outputs): where they
    do not, it has no grammar to compile (tools aside: `tool_plan`'s)."""
    return (getattr(req, "response_format", None) is not None or getattr(req, "structured_outputs", None) is not None
            or any(getattr(req, f"guided_{k}", None) is not None for k in _GUIDED))


def vllm_grammar(req: Any) -> str | None:
    """The grammar of vLLM's structured outputs (`structured_outputs`, or the older `guided_json`, `guided_regex`,
    `guided_choice`, `guided_grammar`; a grammar is Lark or GBNF/EBNF); None when none is asked; a 400 when more than one is, or one cannot compile."""
    from llguidance import LLMatcher

    asked = {f"guided_{k}": v for k in _GUIDED if (v := getattr(req, f"guided_{k}", None)) is not None}
    so = req.structured_outputs or {}
    if not isinstance(so, dict):
        raise ServingError(400, "structured_outputs must be an object", param="structured_outputs")
    for k in so:  # a shape this server cannot hold to (structural_tag, a misspelt key) is refused, not ignored
        if k not in _SO_SHAPES and k not in _SO_OPTIONS:
            raise ServingError(400, f"structured_outputs.{k} is not supported: one of {', '.join(_SO_SHAPES)}",
                               param=f"structured_outputs.{k}")
    for k in _SO_SHAPES:
        if so.get(k) not in (None, False):
            asked[f"structured_outputs.{k}"] = so[k]
    if not asked:
        return None
    if len(asked) > 1:
        raise ServingError(400, f"one structured output at a time: {', '.join(asked)} were given", param=next(iter(asked)))
    (param, v), = asked.items()
    kind = param.rsplit(".", 1)[-1].removeprefix("guided_")
    if kind == "json_object":
        return json_grammar({"type": "object"}, param)
    if kind == "json":
        if isinstance(v, str):
            try:
                v = json.loads(v)
            except (ValueError, RecursionError) as e:  # (RecursionError: nested past the parser, was a 500)
                raise ServingError(400, f"{param}: not a JSON schema ({e})", param=param) from None
        if not isinstance(v, dict):
            raise ServingError(400, f"{param}: a JSON schema is an object", param=param)
        return json_grammar(closed_schema(v, param) if so.get("disable_additional_properties") else v, param)
    if kind == "regex":
        if not isinstance(v, str):
            raise ServingError(400, f"{param}: a regular expression is a string", param=param)
        return _compiled(LLMatcher.grammar_from_regex(v), param)
    if kind == "choice":
        if not (isinstance(v, list) and v and all(isinstance(c, str) and c for c in v)):
            raise ServingError(400, f"{param}: a list of non-empty strings", param=param)
        return _compiled(LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in v)), param)
    if not isinstance(v, str):
        raise ServingError(400, f"{param}: a grammar (Lark, or GBNF/EBNF) is a string", param=param)
    return _compiled(LLMatcher.grammar_from_lark(_as_lark(v, param)), param)


def _as_lark(grammar: str, param: str) -> str:
    """A grammar as Lark: GBNF/EBNF (`root ::= ...`, llama.cpp's and xgrammar's, as vLLM's examples write them)
    converted, as vLLM's guidance backend does; Lark (a `start:` rule) as it is."""
    from llguidance.gbnf_to_lark import any_to_lark

    try:
        return any_to_lark(grammar)
    except Exception as e:  # noqa: BLE001 - the converter's parse errors are of several kinds
        raise ServingError(400, f"{param}: not a Lark or GBNF grammar ({e})", param=param) from None


MAX_SCHEMA_DEPTH = 256  # JSON levels `closed_schema` goes down (llguidance takes fewer: some 120)


def closed_schema(schema: Any, param: str = "response_format", close: bool = True, depth: int = 0) -> Any:
    """`schema` with every object schema that lists properties and does not say otherwise taking no others
    (`additionalProperties: false`), as vLLM's structured_outputs option disable_additional_properties makes it, and
    as vLLM's default backend (xgrammar's strict mode) and Ollama's (llama.cpp's grammar) read a schema. The parts of
    an `allOf` of several are left open themselves (each lists only some of the object's properties; closed, no
    object could match them all); what they hold is closed. A schema nested past MAX_SCHEMA_DEPTH is a 400 on
    `param` (the grammar could not take it; the recursion here would end in a RecursionError, a 500)."""
    if depth > MAX_SCHEMA_DEPTH:
        raise ServingError(400, f"{param}: the schema is nested too deeply", param=param)
    if isinstance(schema, list):
        return [closed_schema(x, param, close, depth + 1) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in ("enum", "const", "default", "examples") else
           closed_schema(v, param, not (k == "allOf" and isinstance(v, list) and len(v) > 1), depth + 1)
           for k, v in schema.items()}
    if close and "additionalProperties" not in out and ("properties" in out or "patternProperties" in out):
        out["additionalProperties"] = False
    return out


HERMES_OPEN, HERMES_CLOSE = "<tool_call>\n", "\n</tool_call>"


def _head(key: str) -> re.Pattern[str]:
    """A call's beginning as the grammar lays it out, up to its arguments: `{"name": N, "KEY": ` (N: group 1)."""
    return re.compile(r'\{"name": ("(?:[^"\\]|\\.)*"), "' + key + r'": ')


_NAMED = re.compile(r'\{"name": ("(?:[^"\\]|\\.)*")')  # (a call's beginning up to its name, whole: N group 1)


def _list_items(text: str) -> tuple[list[str], str | None]:
    """The grammar's list of calls (`[{"name": N, "parameters": {...}}, {...}]`, maybe cut short): the items written
    whole, as written, and the one cut short (None: none)."""
    whole, last, at, dec = [], None, 1, json.JSONDecoder()
    while text.startswith("[") and at < len(text):
        at += len(text) - at - len(text[at:].lstrip(", "))
        try:
            _, end = dec.raw_decode(text, at)
        except ValueError:
            last = text[at:]
            break
        whole.append(text[at:end])
        at = end
        if text[at:at + 1] == "]":
            break
    return whole, last


@dataclass
class ToolPlan:
    """How a chat request's tools shape its output."""

    made: str | None  # the grammar (`grammar`); None ("auto") until it is first asked for
    named: str | None  # tool_choice named this function: the whole output is its arguments
    template_tools: list[dict[str, Any]]  # the tools as chat templates take them
    hermes: bool = False  # "auto" with the hermes syntax: text, or <tool_call> blocks (`opening` tells which)
    schemas: dict[str, dict[str, Any]] | None = None  # ("auto") each tool's arguments' schema, by name
    parallel: bool | None = None  # ("auto") parallel_tool_calls
    answer: dict[str, Any] | None = None  # ("auto") the schema its text is held to (`answering`)
    # ("auto", free text) a model whose template thinks: the reply may open a `<think>...</think>` block (False), or
    # begins inside one its prompt opened (True); None: no think block is read (`thinking`)
    think: bool | None = None
    allowed: frozenset[str] | None = None  # ("auto") the tools it may call (tool_choice allowed_tools); None: all

    @property
    def grammar(self) -> str:
        """The output's grammar: the calls, or ("auto") text or the calls. An "auto" plan's is compiled when first
        asked for, not when planned: beside a response_format the grammar used is `answering`'s, and compiling the
        plan's own first compiled the calls twice a request; a prompt's count (count_tokens, input_tokens) uses
        none. (A tool's schema the grammar cannot take is a 400 then, as the request's sampling is made, before it is
        admitted, naming the tool: `_named_failure`.)"""
        if self.made is None:
            self.made = _hermes_grammar(self.schemas or {}, self.parallel, self.answer, self.think, self.allowed)
        return self.made

    def answering(self, schema: dict[str, Any]) -> ToolPlan:
        """The plan with its text held to `schema` (a response_format's, a Messages output_config.format's) beside
        the calls the model may make ("auto": the output is either its calls or JSON text of the schema, whichever
        the model takes, as Anthropic's structured outputs with tools and vLLM's response_format with tools serve
        them); a call forced (tool_choice required or named) is held to the call alone (the schema is the final
        answer's, which a later turn gives)."""
        if not self.hermes:
            return self
        return dataclasses.replace(self, made=None, answer=schema)

    def thinking(self, opened: bool) -> ToolPlan:
        """The plan of a model whose template thinks (`thinking.thinks`), its prompt opening the think block or not
        (`opened`): the grammar leaves the block free and holds only what follows it to text or calls, as vLLM's
        hermes parser reads the content its reasoning parser leaves (and its structured outputs hold a reply only
        once its reasoning has ended). A `<tool_call>` the model writes while it thinks (weighing a call) is
        thinking: the grammar forced it to go on as a call there, the block never closed, and the chat reply parsed
        it as one. (Text held to a schema, `answering`'s, is the whole output: unchanged.)"""
        if not self.text_then_calls or self.think == opened:
            return self
        return dataclasses.replace(self, made=None, think=opened)

    def calls(self, text: str) -> list[dict[str, Any]] | None:
        """The `tool_calls` of a whole output (a hermes one's after its text, `lead`'s); None when it has none (text,
        or cut short by max_tokens). Each
        call's arguments are the text the model wrote (`_whole`: what CallStream streams), as OpenAI and vLLM give
        them, not the JSON re-written (`\\u00e9` and `1E5` stay so)."""
        try:
            if self.hermes:
                _, text = self.lead(text)
                if not text:
                    return None
                pairs = [self._whole(b.split(HERMES_CLOSE)[0], "arguments") for b in text.split(HERMES_OPEN)[1:]]
            elif self.named:
                json.loads(text)
                pairs = [(self.named, text.rstrip(" \t\n\r"))]  # (the whole output; the stream's end is its value's)
            else:
                if not isinstance(json.loads(text), list):
                    return None
                pairs = [self._whole(b, "parameters") for b in _list_items(text)[0]]
        except (ValueError, KeyError, TypeError):
            return None
        return [self._call(n, a) for n, a in pairs]

    @staticmethod
    def _whole(call: str, key: str) -> tuple[str, str]:
        """A call written whole (`{"name": N, KEY: {...}}`): its name and its arguments as the model wrote them (the
        text CallStream sends), checked as JSON; ValueError, KeyError or TypeError where it is not a call."""
        c = json.loads(call)
        name, args = c["name"], c[key]
        m = _head(key).match(call)
        if m is None or json.loads(m[1]) != name:  # (not the grammar's layout: the arguments re-written)
            return name, json.dumps(args, ensure_ascii=False)
        _, end = json.JSONDecoder().raw_decode(call, m.end())
        return name, call[m.end():end]

    def cut_calls(self, text: str) -> tuple[list[dict[str, Any]], dict[str, Any] | None] | None:
        """The calls of an output cut short (its client left, max_tokens ended it): those written whole (as `calls`
        gives them) and the one being written (its arguments the text so far; None when there is none, or its name
        is not whole yet); a hermes reply's text before them is `lead`'s. None when the output is text (a hermes
        reply that has no call)."""
        if self.hermes:
            head, text = self.lead(text)
            if not text:
                return None if self.opening(head) is False else ([], None)
            blocks = text.split(HERMES_OPEN)[1:]
            whole = [b.split(HERMES_CLOSE)[0] for b in blocks if HERMES_CLOSE in b]
            last = blocks[-1] if HERMES_CLOSE not in blocks[-1] else None
            key = "arguments"
        elif self.named:
            try:
                json.loads(text)
                return self.calls(text), None
            except ValueError:
                return [], self._call(self.named, text) if text else None
        else:  # (the grammar's layout: `[{"name": N, "parameters": {...}}, {...}]`)
            (whole, last), key = _list_items(text), "parameters"
        calls = []
        for b in whole:
            try:
                calls.append(self._call(*self._whole(b, key)))
            except (ValueError, KeyError, TypeError):
                pass
        return calls, self._named(last, key) if last is not None else None

    @staticmethod
    def _named(call: str, key: str) -> dict[str, Any] | None:
        """The call being written (`{"name": N, "KEY": ...`, cut short) once its name is whole, its arguments what
        was written of them ("" before they begin), as CallStream opens it; None before its name is whole."""
        m = _head(key).match(call)
        if m is not None:
            return ToolPlan._call(json.loads(m[1]), call[m.end():])
        m = _NAMED.match(call)
        return ToolPlan._call(json.loads(m[1]), "") if m is not None else None

    @staticmethod
    def _call(name: str, arguments: str) -> dict[str, Any]:
        return {"id": f"call_{secrets.token_hex(12)}", "type": "function",
                "function": {"name": name, "arguments": arguments}}

    def lead(self, text: str) -> tuple[str, str]:
        """A hermes output as (its text before its first call, the calls from their opening on: "" where it has
        none), as vLLM's hermes parser reads one: the text the content, the calls after it `tool_calls`."""
        if not self.hermes:
            return "", text
        at = text.find(HERMES_OPEN) if self.text_then_calls else 0 if text.startswith(HERMES_OPEN) else -1
        if at < 0:
            return text, ""
        # (whitespace alone before the calls, as a template's "\n\n" after a think block leaves it, is no text: the
        # reply is its calls, content null, as `opening` streams it)
        return "" if text[:at].isspace() else text[:at], text[at:]

    def cut_text(self, text: str) -> str | None:
        """The reply's text where max_tokens cut a hermes output inside its first call before the call's name was
        whole: the text before it ("" where there is none), the call dropped, not its `<tool_call>\\n{"` as text:
        nothing of a call is given before its name (OpenAI's first delta of a call is its name; vLLM's streaming
        hermes parser holds the call back until it has it), and a call whose name is whole is given as one
        (`cut_calls`). None for any other output. The one rule of the chat reply (`OpenAIServing._reply`), the chat
        stream's end and Ollama's (`ollama._CallLines`)."""
        if not self.hermes:
            return None
        head, rest = self.lead(text)
        cut = self.cut_calls(text) if rest else None
        return head if cut is not None and not cut[0] and cut[1] is None else None

    @property
    def text_then_calls(self) -> bool:
        """Whether a text output may go on to calls (`_hermes_grammar`'s `lead`): hermes "auto" whose text is free
        (text held to a schema, `answering`'s, is the whole output: a `<tool_call>` in a JSON string stays text)."""
        return self.hermes and self.answer is None

    def opening(self, start: str) -> bool | None:
        """Whether an output beginning `start` is tool calls (True), text (False: calls may follow it, `Lead`), or not
        known yet (None: `start` is a proper prefix of the call's opening, held back while streamed); the grammar
        lets no text reply begin as a call does."""
        if not self.hermes:
            return True
        if self.text_then_calls:  # (whitespace before the opening is no text: `lead`; held while it may be so)
            start = start.lstrip()
        if start.startswith(HERMES_OPEN):
            return True
        return None if HERMES_OPEN.startswith(start) else False


class Lead:
    """A hermes reply that began as text, read as it streams: its text goes out as it comes, but for what may begin
    a call's opening (held until the next part tells, or the end), up to its first call's opening (the grammar lets
    the text go on to calls: `_hermes_grammar`), where its calls begin."""

    def __init__(self) -> None:
        self.held = ""

    def feed(self, text: str, end: bool = False) -> tuple[str, str | None]:
        """(the text to send now, the output from the first call's opening on: None until it comes)."""
        said, self.held = self.held + text, ""
        at = said.find(HERMES_OPEN)
        if at >= 0:
            return said[:at], said[at:]
        if not end:
            keep = next((n for n in range(len(HERMES_OPEN) - 1, 0, -1) if said.endswith(HERMES_OPEN[:n])), 0)
            said, self.held = said[:len(said) - keep], said[len(said) - keep:]
        return said, None


class CallStream:
    """A choice's tool calls read as its output is made (the chat stream's): each call opens once its name is whole
    (its id, type and name go out, as OpenAI's first delta of a call), then its arguments go out as they are
    written. The grammar's layout (JSON_LAYOUT: `{"name": N, "parameters": {...}}` items of a list, or hermes'
    `{"name": N, "arguments": {...}}` blocks, the arguments an object) is what lets the text be read so, a character
    at a time, without parsing partial JSON; a named choice's whole output is its one call's arguments."""

    def __init__(self, plan: ToolPlan):
        self._head = _head("arguments" if plan.hermes else "parameters")
        self.calls: list[dict[str, Any]] = []  # the calls opened so far: ToolPlan._call's, their arguments so far
        self._state, self._pending = "seek", ""  # seek (the next call's `{`), head (its name), args
        self._depth, self._in_str, self._esc = 0, False, False
        self._told = 0  # the calls `feed` has said are open
        if plan.named:
            self._open(plan.named)

    def _open(self, name: str) -> None:
        self.calls.append(ToolPlan._call(name, ""))
        self._state, self._depth, self._in_str, self._esc = "args", 0, False, False

    def feed(self, text: str, end: bool = False) -> list[tuple[int, str, bool]]:
        """What `text` (the output's next part) adds: (call index, arguments fragment, whether it opens the call), in
        order, a call's first entry once it opens (opening True; its fragment "" when only its name is known yet: its
        id and name are in `self.calls`), the fragments a call gets in one part joined. The calls opened so far are
        `len(self.calls)`. `end`: the output ends there (max_tokens or a stop sequence cut it): a call whose name is
        whole but whose arguments had not begun opens, its arguments "", as ToolPlan.cut_calls gives it."""
        out = self._feed(text)
        if end and self._state == "head" and (m := _NAMED.match(self._pending)) is not None:
            self._open(json.loads(m[1]))
            out.append((len(self.calls) - 1, "", True))
            self._told = len(self.calls)
        return out

    def _feed(self, text: str) -> list[tuple[int, str, bool]]:
        out: list[tuple[int, str, bool]] = [(k, "", True) for k in range(self._told, len(self.calls))]
        i = 0
        while i < len(text):
            if self._state == "seek":
                j = text.find("{", i)
                if j < 0:
                    break
                self._state, self._pending, i = "head", "", j
            elif self._state == "head":
                self._pending += text[i:]
                m = self._head.match(self._pending)
                if m is None:
                    break
                self._open(json.loads(m[1]))
                out.append((len(self.calls) - 1, "", True))
                text, i = self._pending[m.end():], 0
            else:
                end = self._value_end(text, i)
                k, frag = len(self.calls) - 1, text[i:end]
                self.calls[k]["function"]["arguments"] += frag
                if out and out[-1][0] == k:
                    out[-1] = (k, out[-1][1] + frag, out[-1][2])
                elif frag:
                    out.append((k, frag, False))
                i = end
        self._told = len(self.calls)
        return out

    def _value_end(self, text: str, i: int) -> int:
        """Where the arguments being read end in `text` from `i` (past its end: they go on); their end sets the
        state to seek the next call."""
        for k in range(i, len(text)):
            c = text[k]
            if self._in_str:
                if self._esc:
                    self._esc = False
                elif c == "\\":
                    self._esc = True
                elif c == '"':
                    self._in_str = False
            elif c == '"':
                self._in_str = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if self._depth <= 0:
                    self._state = "seek"
                    return k + 1
        return len(text)


def _esc(s: str) -> str:
    """`s` as a grammar's regex matches it (re.escape writes a newline as backslash + newline; the grammar's line
    needs "\\n")."""
    return re.escape(s).replace("\n", "n")


def _not_starting_with(prefix: str) -> str:
    """A regex of every string that does not begin with `prefix` (llguidance's regexes have no lookahead): the empty
    string, each proper prefix's continuation by another character, and the proper prefixes themselves."""
    alts = [""]
    for i, ch in enumerate(prefix):
        alts.append(f"{_esc(prefix[:i])}[^{_esc(ch)}][\\s\\S]*")
        if i:
            alts.append(_esc(prefix[:i]))
    return "(" + "|".join(alts) + ")"


def _before(word: str) -> str:
    """A regex of text that does not begin with `word`, up to and with the first `word` in it (a lazy lexeme's: it
    ends there): text that leaves `word`'s start (a proper prefix, then another character) and anything after, or
    a proper prefix alone, then `word`. (`word`, hermes' opening, has no proper prefix that is also its suffix: the
    text before it never ends inside a `word`.)"""
    alts = [f"{_esc(word[:i])}[^{_esc(ch)}][\\s\\S]*" for i, ch in enumerate(word)]
    alts += [_esc(word[:i]) for i in range(1, len(word))]
    return f"(?:{'|'.join(alts)}){_esc(word)}"


def _hermes_grammar(schemas: dict[str, dict[str, Any]], parallel: bool | None,
                    answer: dict[str, Any] | None = None, think: bool | None = None,
                    allowed: frozenset[str] | None = None) -> str:
    """Text (not beginning as a call does; with `answer`, JSON of that schema, which never begins with the call's
    `<`), or one or more `<tool_call>` blocks of {"name", "arguments"} JSON, or text and then such blocks (not with
    `answer`), as Qwen2.5's and Hermes' replies write a sentence before their calls (vLLM's hermes parser reads the
    calls wherever they begin): the text is a lazy lexeme, ending at the first call's opening, where the calls are
    held to their schemas; text never opens one later unsaid (a greedy text lexeme would run past it).

    `think` (`ToolPlan.think`; not with `answer`): before all that, a think block left free (a lazy lexeme ending at
    its first `</think>`): one the reply may open (False: text that does not open one is as above, and a block may
    be left unclosed at the end, as a reply may end while it thinks), or one the prompt opened (True: the reply
    begins inside it).

    `allowed` (`ToolPlan.allowed`): the calls are of those tools alone."""
    only = _only(schemas, allowed)
    held = {n: s for n, s in schemas.items() if allowed is None or n in allowed}
    calls = {"anyOf": [{"type": "object", "properties": {"name": {"const": n}, "arguments": {"$ref": f"#/$defs/{n}"}},
                        "required": ["name", "arguments"], "additionalProperties": False}
                       for n in held], "$defs": _rooted_defs(held), "x-guidance": JSON_LAYOUT}
    more = "" if parallel is False else ' ("\\n" call)*'
    close = f"obj {json.dumps(HERMES_CLOSE)}{more}"
    if answer is None:  # text, which may go on to calls (`lead`: the text, then the first call's opening)
        text, lead = [f"text: /{_not_starting_with(HERMES_OPEN)}/", f"lead[lazy]: /{_before(HERMES_OPEN)}/"], \
            f" | lead {close}"
    else:
        text, lead, think = [f"text: %json {json.dumps({**answer, 'x-guidance': JSON_LAYOUT})}"], "", None
    body = "text | call" + more + lead
    if think is not None:
        # (what the think block holds is never a call: `thought` is free text to its close, THINKING a block never
        # closed; where the reply may open one, the text and lead that begin it are those that do not open one,
        # else a lazy lead would end at a `<tool_call>` inside the block and force a call there)
        opening = "" if think else "\\s*<think>"  # (thinking.OPEN and CLOSE, as a grammar's regex writes them)
        unclosed = "~/(?s:.*)<\\/think>(?s:.*)/"
        text += [f"thought[lazy]: /{opening}(?s:.*)<\\/think>/",
                 f"THINKING: /{opening}(?s:.*)/ & {unclosed}", "body: " + body]
        body = "thought body | THINKING"
        if not think:
            opens = f"~/{opening}(?s:.*)/"
            text += ["text0: TEXT0", f"TEXT0: /{_not_starting_with(HERMES_OPEN)}/ & {opens}",
                     "lead0[lazy]: LEAD0", f"LEAD0: /{_before(HERMES_OPEN)}/ & {opens}"]
            body += f" | text0 | call{more} | lead0 {close}"
    return _named_failure(lambda: _compiled("\n".join([
        "start: " + body,
        *text,
        f"call: {json.dumps(HERMES_OPEN)} obj {json.dumps(HERMES_CLOSE)}",
        f"obj: %json {json.dumps(calls)}"]), "tools"), only)


def _arguments_schema(params: dict[str, Any] | None, param: str) -> dict[str, Any]:
    """A tool's `parameters` as the schema of its arguments, which are a JSON object (as OpenAI requires: a 400 on
    `param` for a schema of anything else; one that names no type is held to objects). Its objects that list
    properties take no others unless it says `additionalProperties` (`closed_schema`), as vLLM's default backend
    holds a tool's parameters and OpenAI's strict functions require: open, a model could add keys of its own making
    that a client's own model of the arguments (a pydantic one that forbids extras) refuses."""
    if not params:
        return {"type": "object", "properties": {}, "additionalProperties": False}
    if "type" not in params:
        params = {**params, "type": "object"}
    if params["type"] != "object":
        raise ServingError(400, f"{param}: a function's parameters are a JSON schema of type 'object', got "
                           f"{params['type']!r}", param=param)
    return closed_schema(params, param)


def _only(schemas: dict[str, dict[str, Any]], held: Any) -> dict[str, dict[str, Any]]:
    """`schemas` as `_named_failure` takes them where only the tools named in `held` are compiled (None: all): the
    others' schemas `{}`, in their places, so a failure names a tool by its place among all of them."""
    return {n: (s if held is None or n in held else {}) for n, s in schemas.items()}


def _allowed(choice: Any, schemas: dict[str, dict[str, Any]]) -> frozenset[str]:
    """The tools tool_choice allowed_tools (protocol.AllowedToolChoice) lets the model call, each a function among
    the tools; else a 400 naming the entry."""
    names = []
    for i, t in enumerate(choice.allowed_tools.tools):
        fn = t.get("function") if t.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        param = f"tool_choice.allowed_tools.tools.{i}"
        if not isinstance(name, str):
            raise ServingError(400, f"{param}: an allowed tool is {{'type': 'function', 'function': {{'name': ...}}}}",
                               param=param)
        if name not in schemas:
            raise ServingError(400, f"{param}: {name!r} is not among the tools", param=param)
        names.append(name)
    return frozenset(names)


def _named_failure(compile_: Callable[[], str], schemas: dict[str, dict[str, Any]]) -> str:
    """The calls' grammar; where it cannot compile, the 400 names the tool whose parameters it is
    (`tools.N.function.parameters`, N its place among the tools), each compiled alone to find it (only then: one
    compile when all is well)."""
    try:
        return compile_()
    except ServingError as e:
        for i, s in enumerate(schemas.values()):
            json_grammar(s, f"tools.{i}.function.parameters")  # (raises, naming it)
        raise e from None


def _rerooted(schema: Any, root: str) -> Any:
    """`schema` with its local references (`#`, `#/...`) pointing below `root`, where it is placed in a larger
    schema; values (enum, const, default, examples) are left as they are."""
    if isinstance(schema, list):
        return [_rerooted(x, root) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for k, v in schema.items():
        if k == "$ref" and isinstance(v, str) and v.startswith("#"):
            out[k] = root + v[1:]
        elif k in ("enum", "const", "default", "examples"):
            out[k] = v
        else:
            out[k] = _rerooted(v, root)
    return out


def _rooted_defs(schemas: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The tools' argument schemas as `$defs` of one schema holding every call (each at `#/$defs/NAME`, its own
    `$defs` and `$ref`s, as pydantic writes nested models, still resolving)."""
    return {n: _rerooted(s, f"#/$defs/{n}") for n, s in schemas.items()}


def tool_plan(tools: list | None, choice: Any, parallel: bool | None, parser: str | None = None) -> ToolPlan | None:
    """`tools` (protocol.Tool), `tool_choice` ("none" | "auto" | "required" | protocol.NamedToolChoice |
    protocol.AllowedToolChoice | None),
    `parallel_tool_calls` and the model's tool-call syntax (`parser`: ModelSpec.tool_call_parser): the plan, or None
    when the output is free text."""
    if choice is None:
        choice = "auto" if tools else "none"
    if choice == "none":
        return None
    allowed_choice = None
    if getattr(choice, "type", None) == "allowed_tools":  # (OpenAI's: every tool declared, these alone callable)
        allowed_choice, choice = choice, choice.allowed_tools.mode
    if not tools:
        raise ServingError(400, f"tool_choice {choice if isinstance(choice, str) else 'function'!r} needs tools",
                           param="tool_choice")
    if choice == "auto" and parser is None:
        raise ServingError(400, "tool_choice 'auto' (the default with tools) needs the model's tool-call syntax, "
                           "which its configuration does not name (tool_call_parser: hermes, for a model that writes "
                           "hermes calls as Qwen2.5 does; tokenpool serve MODEL_DIR --tool-call-parser hermes): send tool_choice 'required' or {'type': 'function', 'function': "
                           "{'name': ...}} (the output is then held to the call's JSON), or 'none'", param="tool_choice")
    schemas: dict[str, dict[str, Any]] = {}
    for i, t in enumerate(tools):
        if t.function.name in schemas:
            raise ServingError(400, f"tools: the name {t.function.name!r} is given twice", param=f"tools.{i}")
        schemas[t.function.name] = _arguments_schema(t.function.parameters, f"tools.{i}.function.parameters")
    allowed = None if allowed_choice is None else _allowed(allowed_choice, schemas)
    if choice == "auto":  # the model's own syntax: text, or calls in it, each held to its tool's schema
        return ToolPlan(None, None, [t.model_dump(exclude_none=True) for t in tools], hermes=True, schemas=schemas,
                        parallel=parallel, allowed=allowed)  # (its grammar compiled once asked for: ToolPlan.grammar)
    named = None
    if isinstance(choice, str):  # "required": one call or more, of any of the tools (allowed_tools': of those)
        held = {n: s for n, s in schemas.items() if allowed is None or n in allowed}
        items = [{"type": "object", "properties": {"name": {"const": n}, "parameters": {"$ref": f"#/$defs/{n}"}},
                  "required": ["name", "parameters"], "additionalProperties": False} for n in held]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items},
                                  "$defs": _rooted_defs(held)}
        if parallel is False:
            schema["maxItems"] = 1
    else:
        named = choice.function.name
        if named not in schemas:
            raise ServingError(400, f"tool_choice names {named!r}, which is not among the tools",
                               param="tool_choice.function.name")
        schema = schemas[named]
    only = _only(schemas, allowed if named is None else {named})
    return ToolPlan(_named_failure(lambda: json_grammar(schema, "tools"), only), named,
                    [t.model_dump(exclude_none=True) for t in tools])
