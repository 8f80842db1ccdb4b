"""OpenAI completions and chat: turn protocol requests into engine requests and engine deltas into responses.

Returns a response model, or an async iterator of server-sent-event frames (the route wraps it); raises
ServingError for anything the client must hear as an HTTP error. Once a stream has started, failures become an
`data: {"error": ...}` event followed by `data: [DONE]`, as OpenAI does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import os
import re
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from starlette.requests import Request

from controller.api import protocol as p
from controller.api.sse import DONE, EMPTY, NULL, ROLE, ROLE_CALLS, ChunkFrames, content, sse
from controller.api.structured import (
    CallStream,
    Lead,
    ToolPlan,
    asks_shape,
    response_grammar,
    response_schema,
    tool_plan,
    vllm_grammar,
)
from controller.api.thinking import Split, effort_kwargs, opened, thinks
from controller.errors import ServingError, invalid_value
from controller.heap import give_back_free_memory
from controller.messages import Delta
from controller.ollama_names import pick
from controller.service import Controller, Generation, ModelEntry
from controller.tenants import KEY_USED, Tenant
from token_scheduler.request import SamplingParams

log = logging.getLogger("tokenpool.serving")
# a request's sampling fields left out: the model's generation_config.json's values (`generation_defaults`), else these
SAMPLING_DEFAULTS = (("temperature", 1.0), ("top_p", 1.0), ("top_k", -1), ("min_p", 0.0), ("repetition_penalty", 1.0),
                     ("presence_penalty", 0.0), ("frequency_penalty", 0.0))
# transformers' own defaults: a generation_config.json value equal to one is no recommendation (vLLM reads the file's
# difference from them), so it is not taken; min_p has none
_HF_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}
_HF_RANGES = {"temperature": (0.0, 2.0), "top_p": (1e-9, 1.0), "top_k": (-1, 1 << 20), "min_p": (0.0, 1.0),
              "repetition_penalty": (1e-9, 2.0)}
T = TypeVar("T")
TOKENIZE_THREADS = 2  # tokenizing and template rendering run here, never on the event loop
TRIM_AFTER_TOKENS = 1 << 16  # an encoding this long gives its freed memory back to the system (heap.py)
# chat_template_kwargs reach the model's (trusted) template as plain values only: a client must not swap in its
# own Jinja template, nor pass the arguments apply_chat_template itself takes
RESERVED_TEMPLATE_KWARGS = frozenset({
    "chat_template", "tools", "documents", "conversation", "messages", "tokenize", "add_generation_prompt",
    "continue_final_message", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs", "padding",
    "truncation", "max_length", "return_tensors"})
TEMPLATE_KWARG_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
MAX_TEMPLATE_KWARGS, MAX_TEMPLATE_KWARG_STR = 16, 1024


def _byte_level_chars() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's `bytes_to_unicode`, which Qwen, Llama 3, SmolLM share): the character
    each byte is written as in a token's piece, mapped back to the byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


BYTE_LEVEL = _byte_level_chars()
BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte tokens


def token_bytes(tok: Any, tid: int, text: str) -> list[int]:
    """The UTF-8 bytes of token `tid`, which decodes alone to `text`: its text's, unless the token is part of a
    character (it decodes to U+FFFD), whose own bytes are read from its piece (byte-level BPE's alphabet or
    SentencePiece's `<0xNN>`), as OpenAI's logprobs give them so a client can join tokens into text."""
    if "\ufffd" in text:
        piece = tok.convert_ids_to_tokens(int(tid))
        if isinstance(piece, str) and piece:
            if m := BYTE_FALLBACK.fullmatch(piece):
                return [int(m[1], 16)]
            if all(c in BYTE_LEVEL for c in piece):
                return [BYTE_LEVEL[c] for c in piece]
    return list(text.encode())


class ClientGone(Exception):
    """The client of a non-streamed request disconnected; the route answers 499 to nobody, quietly."""


def check_template_kwargs(kw: dict[str, Any] | None) -> dict[str, Any]:
    """The client's chat_template_kwargs if they are plain, bounded values under non-reserved names."""
    if not kw:
        return {}
    if len(kw) > MAX_TEMPLATE_KWARGS:
        raise ServingError(400, f"at most {MAX_TEMPLATE_KWARGS} chat_template_kwargs", param="chat_template_kwargs")
    for k, v in kw.items():
        if k in RESERVED_TEMPLATE_KWARGS:
            raise ServingError(400, f"chat_template_kwargs may not set {k!r} (the server's template is used)",
                               param="chat_template_kwargs")
        if not TEMPLATE_KWARG_NAME.fullmatch(k):
            raise ServingError(400, "chat_template_kwargs names must be identifiers", param="chat_template_kwargs")
        if not (v is None or isinstance(v, (bool, int, float)) or
                (isinstance(v, str) and len(v) <= MAX_TEMPLATE_KWARG_STR)):
            raise ServingError(400, f"chat_template_kwargs.{k} must be a boolean, number, null or a string of at "
                               f"most {MAX_TEMPLATE_KWARG_STR} characters", param="chat_template_kwargs")
    return kw


class PromptTooLong(Exception):
    def __init__(self, n: int):
        self.n = n


def encode(tok: Any, text: str, limit: int | None = None) -> list[int]:
    """Token ids of `text` (no special tokens added); PromptTooLong when there are `limit` or more.

    A Hugging Face fast tokenizer goes through its backend's `encode_batch`, which releases the GIL while it
    works (its plain `encode` holds it: a 4 MB prompt would stall every thread, the event loop's included).
    The count is read before the ids become a Python list, which holds the GIL (~35 ns a token): a prompt
    that cannot fit never pays it. A backend that pads or truncates (set in its tokenizer.json) goes through
    the tokenizer's own `encode`, which turns both off as a plain encode must.
    """
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        enc = backend.encode_batch([text], add_special_tokens=False)[0]
        n = len(enc)
        ids = None if limit is not None and n >= limit else enc.ids
        if n >= TRIM_AFTER_TOKENS:
            del enc
            give_back_free_memory()
        if ids is None:
            raise PromptTooLong(n)
        return ids
    ids = tok.encode(text, add_special_tokens=False)
    if limit is not None and len(ids) >= limit:
        raise PromptTooLong(len(ids))
    return ids


_AFFIXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> its special_affixes


def special_affixes(tok: Any) -> tuple[list[int], list[int]]:
    """The special tokens `tok` adds before and after a text it encodes with them (Llama 3's, Mistral's, Gemma's:
    ([BOS], []); Qwen's: none), found once a tokenizer from a probe's two encodings."""
    try:
        return _AFFIXES[tok]
    except (KeyError, TypeError):
        pass
    plain, full = tok.encode("x", add_special_tokens=False), tok.encode("x", add_special_tokens=True)
    out: tuple[list[int], list[int]] = ([], [])
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            out = (list(full[:i]), list(full[i + len(plain):]))
            break
    try:
        _AFFIXES[tok] = out
    except TypeError:  # (an object that takes no weak reference: found again next time)
        pass
    return out


def encode_prompt(tok: Any, text: str, limit: int | None = None, special: bool = True) -> list[int]:
    """A prompt text's ids as vLLM encodes a completion's or /tokenize's (add_special_tokens, true there; `special`)
    and Ollama a raw prompt: `encode`'s, inside the special tokens the tokenizer adds (`special_affixes`: a Llama's
    BOS, which the model was trained to see first); PromptTooLong counts them. (A chat template writes its own.)"""
    pre, post = special_affixes(tok) if special else ([], [])
    extra = len(pre) + len(post)
    try:
        ids = encode(tok, text, None if limit is None else max(1, limit - extra))
    except PromptTooLong as e:
        raise PromptTooLong(e.n + extra) from None
    return [*pre, *ids, *post] if extra else ids


def too_long(me: ModelEntry, n: int, param: str, index: int | None = None) -> ServingError:
    """The error Controller.generate gives a prompt that leaves no room, for one found while tokenizing."""
    which = f" {index}" if index is not None else ""
    return ServingError(400, f"This model's maximum context length is {me.max_model_len} tokens; the prompt{which} "
                        f"has {n} tokens.", param=param, code="context_length_exceeded")


async def unless_disconnected(request: Request, aw: Awaitable[T]) -> T:
    """Await `aw`, cancelling it if the client goes away first (non-streaming requests: raises ClientGone)."""
    task = asyncio.ensure_future(aw)

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # (cancelled itself, by an outer watch say: `aw` goes with it, not left running alone)
        task.cancel()
        raise
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        raise ClientGone()
    return task.result()


class Tracked:
    """A Generation as the serving layer sees it: notes each choice's finish reason and when the engines had the
    request, and records the request's metrics (finish reason, queue/prefill/decode time, lengths) on close."""

    def __init__(self, gen: Generation, metrics, asked: str | None = None):
        self.gen, self.metrics = gen, metrics
        self.asked = asked or gen.entry.spec.name  # the model's name as the client asked for it
        self.subs = gen.subs
        self.t_handed = time.monotonic()  # generate() returns once every choice is on an engine
        self.finish: dict[int, str | None] = {}
        # an echo with max_tokens 0 (OpenAI's prompt scoring): the one token made for the prompt's logprobs is no
        # completion's, so its usage counts none (as OpenAI's and vLLM's)
        self.prompt_only = False

    async def events(self) -> AsyncIterator[tuple[int, Delta]]:
        try:
            async for i, d in self.gen.events():
                if d.finished:
                    self.finish[i] = d.finish_reason
                yield i, d
        except ServingError as e:
            raise as_asked(e, self.gen.entry.spec.name, self.asked) from None

    def pending(self) -> bool:
        return self.gen.pending()

    def __getattr__(self, name: str):  # the rest of the Generation (token counts, sink, closed, entry, ...)
        return getattr(self.gen, name)

    def close(self, status: int) -> None:
        g = self.gen
        # (a load that succeeded, Ollama's load request, made nothing: no choice finished, no prompt or generation
        # length; its queue time is the model's load. One that failed is a failure a client met, counted as any)
        if not g.closed and not (g.load and status == 200):
            cut = "abort" if status == 499 else "error"
            reasons = [self.finish.get(i) or cut for i in range(len(g.subs))]
            ok = status == 200 and g.t_first is not None
            self.metrics.request_done(
                g.entry.spec.name, reasons, g.prompt_tokens, g.completion_tokens,
                queue_s=self.t_handed - g.t_arrival, prefill_s=g.t_first - self.t_handed if ok else None,
                decode_s=g.t_last - g.t_first if ok and g.t_last is not None else None, cached_tokens=g.cached_tokens)
        g.close(status)



def as_asked(e: ServingError, real: str, asked: str) -> ServingError:
    """`e` naming the model as the client asked for it (an alias, a LoRA adapter's name) where it names the model's
    own: a tenant allowed a model only by an alias, or an adapter alone, must not learn the name behind it (the
    controller and the engines word their errors with it: "model 'NAME' is overloaded")."""
    if real == asked or real not in e.message:
        return e
    # (the name whole: not inside a longer one, which may end a sentence: "... model qwen2.5.")
    e.message = re.sub(rf"(?<![\w.-]){re.escape(real)}(?![\w-])(?!\.\w)", lambda _: asked, e.message)
    e.args = (e.message,)
    return e


def lora_of(me: ModelEntry, name: str) -> str | None:
    """The LoRA adapter a request for `name` runs with on model `me` (None: `name` is the model or an alias)."""
    return name if name in me.spec.lora_names else None


def generation_defaults(me: ModelEntry) -> dict[str, float]:
    """The sampling the model's creator recommends in its folder's generation_config.json (temperature, top_p, top_k,
    min_p, repetition_penalty), which a request that leaves those fields out gets, as vLLM serves by default
    (`--generation-config auto`): Qwen2.5-Instruct's temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.05,
    say. Values equal to transformers' defaults, or out of range, are not taken. Read again when the file changes:
    it is stat'ed at most once every GENERATION_CONFIG_RECHECK_S a folder (a stat per request would be a blocking
    syscall on the event loop each time, a slow one on a network volume such as a Kubernetes /models). The model's
    `generation_config` (vLLM's --generation-config) "vllm" takes none, a folder that folder's file instead."""
    path = getattr(me.spec, "path", None)
    source = getattr(me.spec, "generation_config", "auto")
    if source != "auto":
        path = None if source == "vllm" else source
    if not path:
        return {}
    file = os.path.join(path, "generation_config.json")
    now = _clock()
    seen = _generation_checked.get(file)
    if seen is not None and now - seen[0] < GENERATION_CONFIG_RECHECK_S:
        return seen[1]
    try:
        out = _read_generation_defaults(file, os.stat(file).st_mtime_ns)
    except OSError:
        out = {}
    if len(_generation_checked) >= 256:  # (folders of models long gone)
        _generation_checked.clear()
    _generation_checked[file] = (now, out)
    return out


GENERATION_CONFIG_RECHECK_S = 5.0
_clock = time.monotonic  # (a test's to advance)
_generation_checked: dict[str, tuple[float, dict[str, float]]] = {}  # file -> (when it was stat'ed, its defaults)


@functools.lru_cache(maxsize=256)
def _read_generation_defaults(file: str, mtime: int) -> dict[str, float]:
    try:
        with open(file, encoding="utf-8") as f:
            g = json.load(f)
    except (OSError, ValueError):
        return {}
    out: dict[str, float] = {}
    for key, (lo, hi) in _HF_RANGES.items():
        v = g.get(key) if isinstance(g, dict) else None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v == _HF_DEFAULTS.get(key) or not lo <= v <= hi:
            continue
        if key == "top_k" and (not float(v).is_integer()):
            continue
        out[key] = int(v) if key == "top_k" else float(v)
    if out:
        log.info("sampling defaults from %s: %s (a request's own fields override them)", file, out)
    return out

def _calls_finish(tools: ToolPlan) -> str:
    """The finish reason of a whole output of tool calls: "tool_calls", or "stop" when tool_choice named the function
    (OpenAI answers so, streamed or not, and vLLM with it: its PR #25054)."""
    return "stop" if tools.named else "tool_calls"


def _calls_answered(msgs: list[p.ChatMessage]) -> None:
    """A 400 where an assistant message's tool calls are not each answered by the tool messages right after it (in
    any order), as OpenAI's: the template rendered calls with no result, and the model read on as if it had them
    (vLLM takes it unsaid). An assistant message that ends the conversation is left alone (the reply continues it:
    continue_final_message), as is a call with no id (none to answer), an empty one too (`"id": ""`, as some servers
    and client adapters write a call the model gave none: a tool message of tool_call_id "" is a 400 of its own, so
    the conversation could not go on, the 400 naming no id)."""
    for i, m in enumerate(msgs[:-1]):
        ids = [c["id"] for c in m.tool_calls or () if isinstance(c.get("id"), str) and c["id"]] \
            if m.role == "assistant" else []
        got: set[str | None] = set()
        for after in msgs[i + 1:]:
            if after.role != "tool":
                break
            got.add(after.tool_call_id)
        if missing := [t for t in ids if t not in got]:
            raise ServingError(400, "An assistant message with 'tool_calls' must be followed by tool messages "
                               "responding to each 'tool_call_id'. The following tool_call_ids did not have response "
                               f"messages: {', '.join(missing)}", param=f"messages.{i}.tool_calls")


def thinks_first(me: ModelEntry, gen: Tracked, req: p.ChatCompletionRequest, tools: ToolPlan | None) -> bool | None:
    """Where a chat reply's calls may come after a think block (hermes "auto", a model whose template thinks, as
    Qwen3's; no response_format of a schema, which holds the text to its shape): whether the prompt opened the block
    (`thinking.opened`: the reply starts inside it); None elsewhere. The reply's start (`<think>`) made it text, and
    the <tool_call> after the block text with it, no `tool_calls`: vLLM's hermes parser reads the calls wherever
    they begin, the text before the first (the think block, no reasoning parser) the content. A response_format of
    type "text" (as clients send for plain text) shapes nothing: the calls after the block were left as text there.
    The one rule of the chat reply, its stream and Ollama's chat whose thinking is not apart (`think` off, to a
    template with no switch: it thinks all the same), each reading the block with `Thought`."""
    if tools is None or not tools.hermes or response_schema(req.response_format) is not None or not thinks(me):
        return None
    return opened(me, getattr(gen, "prompt_tail", None))


def _after_thought(text: str, begun: bool) -> tuple[str, str]:
    """A whole reply's leading think block as it was written (with the whitespace after it), and the rest."""
    head, rest = Thought(begun).feed(text, True)
    return head, rest or ""


class Thought:
    """A `thinks_first` reply's leading think block as it was written (with the whitespace after it), apart from the
    rest, as it streams: the block is content, the calls are read in the rest (`Split` finds where the block ends).
    The chat reply's and its stream's, and Ollama's chat with `think` off (its template thinks all the same)."""

    def __init__(self, begun: bool) -> None:
        self.split, self.said = Split(begun), ""

    @property
    def held(self) -> bool:
        """Whether what came so far may yet open a think block (held back, not sent)."""
        return self.split.state == "start"

    def feed(self, text: str, end: bool = False) -> tuple[str, str | None]:
        """(the block's text to send now, as written; the rest of the reply once the block is over, None until
        then); `end`: the reply is over."""
        self.said += text
        _, rest = self.split.feed(text, end)
        if self.held:
            return "", None
        said, self.said = self.said, ""
        if self.split.state != "content":
            return said, None
        return said[:len(said) - len(rest)], rest


class OpenAIServing:
    def __init__(self, ctl: Controller):
        self.ctl = ctl
        self._tokenize_pool = ThreadPoolExecutor(TOKENIZE_THREADS, thread_name_prefix="tokenize")
        # key hash -> (its turns in the pool, the offloads holding or awaiting one), while it has any (`offload`)
        self._tokenize_turns: dict[str, tuple[asyncio.Semaphore, int]] = {}
        self.active: set[Tracked] = set()  # admitted requests not yet finished (graceful shutdown waits)
        self.draining = False  # set on SIGTERM: new requests get 503 + Retry-After
        self.drain_retry_after = 5
        self.last_used: dict[str, float] = {}  # model name -> wall-clock time of its latest request (tokenpool ps)

    async def offload(self, fn: Callable[..., T], *args: Any) -> T:
        """Run CPU-bound request work (tokenizing, template rendering) off the event loop. On a server with tenants
        a key's work takes all the pool's threads but one: four 4 MB prompts of one tenant (7-25 s each, their 400s)
        held both threads, and another tenant's "hi" waited 28 s behind them."""
        loop = asyncio.get_running_loop()
        key = KEY_USED.get()
        if key is None or self.ctl.tenants.single_user:
            return await loop.run_in_executor(self._tokenize_pool, functools.partial(fn, *args))
        turns, users = self._tokenize_turns.get(key) or (asyncio.Semaphore(TOKENIZE_THREADS - 1), 0)
        self._tokenize_turns[key] = (turns, users + 1)
        try:
            async with turns:
                return await loop.run_in_executor(self._tokenize_pool, functools.partial(fn, *args))
        finally:
            turns, users = self._tokenize_turns[key]
            if users == 1:
                del self._tokenize_turns[key]
            else:
                self._tokenize_turns[key] = (turns, users - 1)

    def close(self) -> None:
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)

    def abort_all(self, reason: str) -> int:
        """End every admitted request with an engine-side error (its stream: an error event and [DONE])."""
        n = 0
        for gen in list(self.active):
            if gen.subs and not gen.closed:
                self.ctl.pool.abort(gen.subs)
                s = gen.subs[0]
                gen.sink.put_nowait((s, Delta(s.rid, finished=True, finish_reason="error", error=reason,
                                              error_kind="shutdown")))
                n += 1
        return n

    # --- shared ---
    def lookup(self, tenant: Tenant, model: str) -> ModelEntry:
        """The model `tenant` asks for by its name, one of its aliases or one of its LoRA adapters' (whose requests the
        model's engines run with the adapter: `lora_of`); 404 when there is none it may use."""
        me = self.ctl.resolve(model)
        if me is None or not (tenant.may_use(me.spec.name) or tenant.may_use(model)):
            # one answer for both: a tenant learns nothing of the others' models
            meant = self.ollama_pick(tenant, model)
            hint = (f" Did you mean `{meant}`? (Ollama's routes read `{model}` as that model; this API takes the "
                    "names /v1/models lists.)") if meant is not None else ""
            raise ServingError(404, f"The model `{model}` does not exist.{hint}", param="model")
        return me

    def ollama_pick(self, tenant: Tenant | None, name: str) -> str | None:
        """The served name Ollama's name `name` means to `tenant` (ollama_names.pick): one of the tenant's models'
        names, aliases or adapters; None where it means none."""
        ctl = self.ctl

        def usable() -> list[str]:  # (only where no model answers to the name as written: most requests name one)
            return [n for me in ctl.models.values() for n in (me.spec.name, *me.spec.aliases, *me.spec.lora_names)
                    if tenant is not None and (tenant.may_use(me.spec.name) or tenant.may_use(n))]

        def known(n: str) -> bool:  # (as `lookup` finds it for the tenant: another's model is its 404, never a pick)
            me = ctl.resolve(n)
            return me is not None and tenant is not None and (tenant.may_use(me.spec.name) or tenant.may_use(n))

        return pick(name, known, usable)

    def entry(self, tenant: Tenant, model: str) -> ModelEntry:
        if self.draining:
            raise ServingError(503, "the server is shutting down", code="shutting_down",
                               retry_after=self.drain_retry_after)
        me = self.lookup(tenant, model)
        if me.draining:
            raise ServingError(503, f"model `{model}` is being drained (no new requests)", code="model_draining",
                               retry_after=5)
        self.last_used[me.spec.name] = time.time()
        return me

    @staticmethod
    def names_for(tenant: Tenant, me: ModelEntry) -> list[str]:
        """The names `tenant` may ask for model `me` by (`lookup`): its own, else those of its aliases it is allowed
        (a tenant allowed a model only by an alias uses it under that name)."""
        if tenant.may_use(me.spec.name):
            return [me.spec.name]
        return [a for a in me.spec.aliases if tenant.may_use(a)]

    def parent_for(self, tenant: Tenant, me: ModelEntry) -> str | None:
        """A LoRA adapter's `parent` as `tenant` is shown it: its model under the first name the tenant may use it by
        (an alias, for a tenant allowed the model only so); None for a tenant allowed the adapter alone (the model's
        name is not the tenant's to know)."""
        return next(iter(self.names_for(tenant, me)), None)

    @staticmethod
    def served_names(tenant: Tenant, me: ModelEntry) -> list[str]:
        """Every name `tenant` may ask for model `me` by (`lookup`): its own and all its aliases, else (allowed the
        model only by aliases) those aliases, as vLLM lists each `--served-model-name` of a model."""
        if tenant.may_use(me.spec.name):
            return [me.spec.name, *me.spec.aliases]
        return [a for a in me.spec.aliases if tenant.may_use(a)]

    def models(self, tenant: Tenant, aliases: bool = True) -> p.ModelList:
        """The models `tenant` may use, each under every name it may use it by (`served_names`: the model's and its
        aliases', each its own card, their `root` the model's first such name, as vLLM's served names share their
        model's root; `aliases` False: the first name alone), then the LoRA adapters over them (an adapter's `parent`:
        its model, as vLLM's cards have it, by a name the tenant knows: `parent_for`; its `root` its own name)."""
        cards = []
        for me in self.ctl.models.values():
            names = self.served_names(tenant, me) if aliases else self.names_for(tenant, me)
            for n in names:
                cards.append(p.ModelCard(id=n, created=me.created, max_model_len=me.max_model_len,
                                         root=self.parent_for(tenant, me)))
        for n, me in self.ctl.models.items():
            for lm in me.spec.lora_modules:
                if tenant.may_use(n) or tenant.may_use(lm.name):
                    cards.append(p.ModelCard(id=lm.name, created=me.created, max_model_len=me.max_model_len,
                                             root=lm.name, parent=self.parent_for(tenant, me)))
        return p.ModelList(data=cards)

    def card(self, tenant: Tenant, model: str) -> p.ModelCard:
        """A model's card by the name a request would use (answered under the name asked; its `root` as `models`
        gives it)."""
        me = self.lookup(tenant, model)
        adapter = lora_of(me, model) is not None
        return p.ModelCard(id=model, created=me.created, max_model_len=me.max_model_len,
                           root=model if adapter else self.parent_for(tenant, me) or model,
                           parent=self.parent_for(tenant, me) if adapter else None)

    @staticmethod
    def _refuse_unsupported(req: p._Sampling) -> None:
        if getattr(req, "suffix", None):
            raise ServingError(400, "suffix is not supported", param="suffix")
        best_of = getattr(req, "best_of", None)
        if best_of is not None and best_of != req.n:
            raise ServingError(400, "best_of other than n is not supported", param="best_of")
        if req.stream_options is not None and not req.stream:
            raise ServingError(400, "stream_options is only allowed when stream is true", param="stream_options")
        if req.prompt_logprobs is not None:
            raise ServingError(400, "prompt_logprobs is not supported (on /v1/completions, echo with logprobs scores "
                               "the prompt's tokens)", param="prompt_logprobs")
        if req.use_beam_search:
            raise ServingError(400, "beam search is not supported", param="use_beam_search")

    @staticmethod
    def _params(me: ModelEntry, req: p._Sampling, max_tokens: int | None, logprobs: int | None,
                prompt_logprobs: int | None = None) -> SamplingParams:
        """The request's sampling, but for the shape its output is held to (`_shaped` adds it)."""
        if max_tokens is not None and req.min_tokens > max_tokens:
            raise ServingError(400, f"min_tokens ({req.min_tokens}) must be at most max_tokens ({max_tokens})",
                               param="min_tokens")
        bias = None
        if req.logit_bias:
            bias = {int(k): v for k, v in req.logit_bias.items()}
            OpenAIServing._check_vocab(me, list(bias), "logit_bias", "logit_bias: ")
        if req.allowed_token_ids:
            OpenAIServing._check_vocab(me, req.allowed_token_ids, "allowed_token_ids", "allowed_token_ids: ")
        kw = dict(n=1, max_tokens=max_tokens, logprobs=logprobs, seed=req.seed, stop=req.stop, lora=lora_of(me, req.model),
                  stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
                  skip_special_tokens=req.skip_special_tokens, logit_bias=bias, prompt_logprobs=prompt_logprobs,
                  allowed_token_ids=req.allowed_token_ids, include_stop_str_in_output=req.include_stop_str_in_output,
                  bad_words=req.bad_words,
                  cache_salt=req.cache_salt)
        model_defaults = generation_defaults(me)
        for f, default in SAMPLING_DEFAULTS:
            v = getattr(req, f)
            kw[f] = model_defaults.get(f, default) if v is None else v
        try:
            return SamplingParams(**kw)
        except ValueError as e:
            raise ServingError(400, str(e)) from None

    async def _shaped(self, params: SamplingParams, req: p._Sampling, tools: ToolPlan | None = None) -> SamplingParams:
        """`params` with the grammar the output is held to (`_grammar`), where the request asks for one: compiled in
        the tokenize pool (`offload`), as it may take seconds (128 large tools took 2.1 s to be refused: on the event
        loop, /health and every tenant's streams stopped meanwhile)."""
        if tools is None and not asks_shape(req):
            return params
        return dataclasses.replace(params, grammar=await self.offload(self._grammar, req, tools))

    async def _tool_plan(self, me: ModelEntry, req: p.ChatCompletionRequest) -> ToolPlan | None:
        """`tool_plan` of the request's tools; in the tokenize pool where there are any (a call forced, "required"
        or a named function, compiles its grammar there: see `_shaped`)."""
        args = (req.tools, req.tool_choice, req.parallel_tool_calls, me.spec.tool_call_parser)
        return await self.offload(tool_plan, *args) if req.tools else tool_plan(*args)

    @staticmethod
    def _grammar(req: p._Sampling, tools: ToolPlan | None) -> str | None:
        """The shape the output is held to: the tools' calls, response_format's, or vLLM's structured output; tools
        and a response_format together, the calls or text of the format ("auto": `ToolPlan.answering`), the calls
        alone where one is forced (the format is the final answer's, as vLLM's and Anthropic's take both)."""
        shaped = response_grammar(req.response_format)  # (compiled alone too: its errors name response_format)
        vllm = vllm_grammar(req)
        if vllm is not None and (tools is not None or shaped is not None):
            raise ServingError(400, "tools, response_format and structured outputs cannot shape one output together",
                               param="response_format" if shaped is not None else "structured_outputs")
        if tools is not None and shaped is not None:
            return tools.answering(response_schema(req.response_format)).grammar  # type: ignore[arg-type]
        return tools.grammar if tools else shaped or vllm

    @staticmethod
    def _check_vocab(me: ModelEntry, ids: list[int], param: str, what: str = "") -> None:
        """A 400 on `param` when a token id of `ids` is past the model's vocabulary, or negative (Ollama's `context`,
        which no schema bounds, reached the engine so: a streamed reply's 200 and an error line)."""
        vocab = len(me.tokenizer) if hasattr(me.tokenizer, "__len__") else me.tokenizer.vocab_size
        if ids and (max(ids) >= vocab or min(ids) < 0):
            bad = max(ids) if max(ids) >= vocab else min(ids)
            raise ServingError(400, f"{what}token id {bad} is outside the vocabulary (size {vocab})", param=param)

    @staticmethod
    def _check_ids(me: ModelEntry, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise ServingError(400, "the prompt is empty (it must contain at least one token)", param=param)
        OpenAIServing._check_vocab(me, ids, param)
        return ids

    def _live_usage(self, gen: Tracked, req: p._Sampling) -> Callable[[], bytes] | None:
        """vLLM's stream_options.continuous_usage_stats (with include_usage): every chunk carries the usage so far."""
        so = req.stream_options
        if so is None or not (so.include_usage and so.continuous_usage_stats):
            return None
        return lambda: self._usage(gen).model_dump_json().encode()

    def _usage(self, gen: Tracked) -> p.Usage:
        completion = 0 if gen.prompt_only else gen.completion_tokens
        return p.Usage(prompt_tokens=gen.prompt_tokens, completion_tokens=completion,
                       prompt_tokens_details=p.PromptTokensDetails(cached_tokens=gen.cached_tokens),
                       total_tokens=gen.prompt_tokens + completion)

    def _tok(self, me: ModelEntry, tid: int, as_ids: bool = False) -> str:
        """A token as logprobs write it: its text, or (vLLM's return_tokens_as_token_ids) "token_id:N"."""
        if as_ids:
            return f"token_id:{int(tid)}"
        return me.tokenizer.decode([int(tid)], skip_special_tokens=False)

    # --- /v1/completions ---
    async def completions(self, req: p.CompletionRequest, tenant: Tenant,
                          request: Request) -> p.CompletionResponse | AsyncIterator[bytes]:
        me = self.entry(tenant, req.model)
        self._refuse_unsupported(req)
        # OpenAI's echo with logprobs: the prompt's tokens have logprobs too (the first null)
        scored = req.logprobs if req.echo else None
        # echo with max_tokens 0, OpenAI's legacy way (and vLLM's) to score a prompt: the prompt comes back (with
        # its logprobs), nothing generated (one token is, for the prompt's logprobs, and left out of the choice)
        if req.max_tokens == 0 and not req.echo:
            raise ServingError(400, "max_tokens 0 is only for echo (the prompt returned, and scored with logprobs, "
                                    "nothing generated); otherwise it must be at least 1", param="max_tokens")
        prompt_only = req.max_tokens == 0
        params = await self._shaped(self._params(me, req, 1 if prompt_only else req.max_tokens, req.logprobs, scored),
                                    req)
        texts, prompts, echo = await self.offload(self._completion_prompts, me, req)
        rid = self.ctl.new_id("cmpl")
        gen = await self.generate(me, tenant, req.model, prompts, params, req.n, rid, req.stream)
        gen.prompt_only = prompt_only
        firsts = [ids[0] for ids in prompts] if scored is not None else None
        if req.stream:
            return self._stream_completion(gen, req, rid, me, echo, firsts, prompt_only)
        return await self._collect(request, gen, self._collect_completion(gen, req, rid, me, echo, firsts,
                                                                          prompt_only))

    def _completion_prompts(self, me: ModelEntry, req: p.CompletionRequest
                            ) -> tuple[list[str | None], list[list[int]], list[str]]:
        """(texts, token ids, echo text) of each prompt; runs in the tokenize pool."""
        raw = req.prompt
        if isinstance(raw, str):
            texts: list[str | None] = [raw]
        elif raw and isinstance(raw[0], str):
            texts = list(raw)  # type: ignore[arg-type]
        elif raw and isinstance(raw[0], int):
            texts, prompts = [None], [list(raw)]  # type: ignore[list-item]
        else:
            texts, prompts = [None] * len(raw), [list(x) for x in raw]  # type: ignore[union-attr]
        keep = self._kept_tokens(me, req)
        if texts[0] is not None:
            prompts = []
            for i, t in enumerate(texts):
                try:
                    prompts.append(encode_prompt(me.tokenizer, t,  # type: ignore[arg-type]
                                                 None if keep is not None else me.max_model_len,
                                                 req.add_special_tokens))
                except PromptTooLong as e:
                    raise too_long(me, e.n, "prompt", i if len(texts) > 1 else None) from None
        if keep is not None:  # (a cut prompt is echoed as it was fed)
            texts = [t if len(ids) <= keep else None for t, ids in zip(texts, prompts)]
            prompts = [ids[len(ids) - keep:] if len(ids) > keep else ids for ids in prompts]
        prompts = [self._check_ids(me, ids, "prompt") for ids in prompts]
        echo = [(t if t is not None else me.tokenizer.decode(ids)) if req.echo else "" for t, ids in
                zip(texts, prompts)]
        return texts, prompts, echo

    @staticmethod
    def _kept_tokens(me: ModelEntry, req: Any) -> int | None:
        """How many of a prompt's last tokens vLLM's truncate_prompt_tokens keeps (-1: as many as the context takes,
        leaving one to generate); None: the prompt is fed whole. Past the context: a 400, as vLLM answers it."""
        n = getattr(req, "truncate_prompt_tokens", None)
        if n is None:
            return None
        if n > me.max_model_len:
            raise ServingError(400, f"truncate_prompt_tokens ({n}) is greater than the model's maximum context length "
                               f"({me.max_model_len})", param="truncate_prompt_tokens")
        return me.max_model_len - 1 if n == -1 else n

    def _track(self, gen: Generation, asked: str | None = None) -> Tracked:
        t = Tracked(gen, self.ctl.metrics, asked)
        self.active.add(t)
        return t

    async def generate(self, me: ModelEntry, tenant: Tenant, asked: str, prompts: list[list[int]],
                       params: SamplingParams, n: int, rid: str, stream: bool, load: bool = False,
                       whole: int | None = None) -> Tracked:
        """Controller.generate, tracked; its refusals (and the engines' errors after) name the model as `asked`.
        `stream`: the reply goes out as it is made; else once whole (then a choice whose engine fails mid-generation
        runs again elsewhere: nothing of it was sent). `whole`: Controller.generate's (the request's max_tokens
        where `params` has its first part's; the rest goes on by `go_on`)."""
        more = {"whole": whole} if whole is not None else {}
        try:
            gen = await self.ctl.generate(me, tenant, prompts, params, n, rid, stream=stream, load=load, **more)
        except ServingError as e:
            if e.code == "model_load_failed" and not self.ctl.tenants.single_user:
                # why a load failed is the worker's exception, with the server's paths in it: the operator's to
                # read (/admin/models' load_error), not another tenant's; when it is tried again stays
                e.message = (f"model {asked!r} could not be loaded; it is tried again in {e.retry_after} s (the "
                             "operator sees why)")
                e.args = (e.message,)
            raise as_asked(e, me.spec.name, asked) from None
        return self._track(gen, asked)

    async def go_on(self, gen: Tracked, prompt: list[int] | None, max_tokens: int = 0) -> None:
        """Controller.go_on of `gen`'s one choice: it goes on from `prompt` for `max_tokens` more, the same request
        (its deltas from `gen.events()` again); None: it does not."""
        more = {}
        if prompt is not None:
            gen.finish.pop(0, None)  # (the first's "length" is not the request's: the continuation's end is)
            plan = getattr(gen, "tools", None)
            if plan is not None and plan.think:  # (its prompt opened the think block, which the continuation's
                # closes: what it writes comes after the block, where the grammar that began inside it would leave
                # the calls free)
                more["grammar"] = await self.offload(lambda: plan.thinking(False).grammar)  # (`_shaped`)
        try:
            await self.ctl.go_on(gen.gen, 0, prompt, max_tokens, **more)
        except ServingError as e:
            raise as_asked(e, gen.gen.entry.spec.name, gen.asked) from None

    async def _collect(self, request, gen, collect):
        """Await a non-streamed response; the generation is closed with the status it ended with (499 when
        the client went away, 500 on a bug: then the route must not count it again)."""
        status = 499
        try:
            resp = await unless_disconnected(request, collect)
            status = 200
            return resp
        except ServingError as e:
            status = e.status
            e.counted = True  # type: ignore[attr-defined]  # (by gen.close below: the route must not count it again)
            raise
        except Exception as e:  # noqa: BLE001 - counted here, answered by the app's handler
            if not isinstance(e, ClientGone):
                status = 500
                e.counted = True  # type: ignore[attr-defined]
            raise
        finally:
            self.active.discard(gen)
            gen.close(status)

    @staticmethod
    def _offset_after(lp: p.CompletionLogprobs, offset: int) -> int:
        """The text_offset of the token after `lp`'s (`offset` when it has none): its last token's offset plus that
        token's length. Offsets follow the tokens, not the text sent so far, which a stop string can hold back."""
        return lp.text_offset[-1] + len(lp.tokens[-1]) if lp.tokens else offset

    @staticmethod
    def _top_with_sampled(pairs: list, k: int) -> list[tuple[int, float]]:
        """A completions token's top_logprobs: the `k` most likely of `pairs` ([token id, logprob], the sampled one
        first) and the sampled token, most likely first (up to k + 1: "the API will always return the logprob of
        the sampled token", as OpenAI's legacy API and vLLM give them)."""
        best: dict[int, float] = {}
        for t, v in sorted(pairs, key=lambda x: -x[1]):
            if len(best) == k:
                break
            best.setdefault(int(t), v)
        best.setdefault(int(pairs[0][0]), pairs[0][1])
        return sorted(best.items(), key=lambda x: -x[1])

    def _completion_logprobs(self, me: ModelEntry, d: Delta, k: int, offset: int,
                             first: int | None = None, as_ids: bool = False) -> p.CompletionLogprobs:
        """The logprobs of `d`'s tokens, their text at `offset` on; with `first` (echo: the prompt's first token id),
        those of the prompt's tokens before them, from offset 0 (the first token's null)."""
        out = p.CompletionLogprobs()
        pairs_of = d.logprobs or []
        if first is not None:
            s = self._tok(me, first, as_ids)
            out.tokens.append(s)
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            out.text_offset.append(0)
            offset = len(s)
            pairs_of = [*(d.prompt_logprobs or []), *pairs_of]
        for pairs in pairs_of:
            tid, lp = pairs[0]
            s = self._tok(me, tid, as_ids)
            out.tokens.append(s)
            out.token_logprobs.append(lp)
            out.top_logprobs.append({self._tok(me, t, as_ids): v for t, v in self._top_with_sampled(pairs, k)})
            out.text_offset.append(offset)
            offset += len(s)
        return out

    @staticmethod
    def _prompt_part(d: Delta) -> Delta:
        """A delta of an echo with max_tokens 0: its prompt's logprobs and its finish, not the token generated."""
        return dataclasses.replace(d, text="", token_ids=[], logprobs=None, stop_reason=None,
                                   finish_reason="length" if d.finished and not d.error else d.finish_reason)

    async def _collect_completion(self, gen: Tracked, req: p.CompletionRequest, rid: str, me: ModelEntry,
                                  echo: list[str], firsts: list[int] | None,
                                  prompt_only: bool = False) -> p.CompletionResponse:
        k = len(gen.subs)
        text = [echo[i // req.n] for i in range(k)]
        finish: list[str | None] = [None] * k
        stops: list[int | str | None] = [None] * k
        lps = [p.CompletionLogprobs() if req.logprobs is not None else None for _ in range(k)]
        offsets = [len(t) for t in text]  # (each choice's next token's text_offset)
        async for i, d in gen.events():
            if prompt_only:
                d = self._prompt_part(d)
            lp = lps[i]
            if lp is not None and (d.logprobs or d.prompt_logprobs is not None):
                first = None if firsts is None or d.prompt_logprobs is None else firsts[i // req.n]
                part = self._completion_logprobs(me, d, req.logprobs or 0, offsets[i], first,
                                                 req.return_tokens_as_token_ids)
                offsets[i] = self._offset_after(part, offsets[i])
                for f in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                    getattr(lp, f).extend(getattr(part, f))
            text[i] += d.text
            if d.finished:
                finish[i], stops[i] = d.finish_reason, d.stop_reason
        choices = [p.CompletionChoice(index=i, text=text[i], logprobs=lps[i], finish_reason=finish[i],
                                      stop_reason=stops[i]) for i in range(k)]
        return p.CompletionResponse(id=rid, model=req.model, choices=choices, usage=self._usage(gen))

    def _stream_completion(self, gen: Tracked, req: p.CompletionRequest, rid: str, me: ModelEntry,
                           echo: list[str], firsts: list[int] | None,
                           prompt_only: bool = False) -> AsyncIterator[bytes]:
        usage = req.stream_options is not None and req.stream_options.include_usage
        fr = ChunkFrames("text_completion", rid, int(time.time()), req.model, usage, self._live_usage(gen, req))
        offsets = [len(echo[i // req.n]) for i in range(len(gen.subs))]
        # the echoed prompt leads; with its logprobs (`firsts`), it goes with the first tokens, which bring them
        lead = [] if firsts is not None else [fr.text(i, echo[i // req.n]) for i in range(len(gen.subs))
                                              if echo[i // req.n]]

        def frame(i: int, d: Delta) -> bytes:
            if prompt_only:
                d = self._prompt_part(d)
            lp, text = NULL, d.text
            if req.logprobs is not None:  # rare: built as a model (all four lists, as OpenAI sends them)
                first = None if firsts is None or d.prompt_logprobs is None else firsts[i // req.n]
                if first is not None:
                    text = echo[i // req.n] + text
                part = self._completion_logprobs(me, d, req.logprobs, offsets[i], first, req.return_tokens_as_token_ids)
                offsets[i] = self._offset_after(part, offsets[i])
                lp = part.model_dump_json().encode()
            return fr.text(i, text, lp, d.finish_reason if d.finished else None, d.stop_reason)

        return self._stream(gen, lead, frame, fr, usage)

    # --- /v1/chat/completions ---
    async def chat(self, req: p.ChatCompletionRequest, tenant: Tenant,
                   request: Request) -> p.ChatCompletionResponse | AsyncIterator[bytes]:
        for i, m in enumerate(req.messages):  # (OpenAI's rule; Ollama's tool messages, which carry none, come apart)
            if m.role == "tool" and not m.tool_call_id:
                raise ServingError(400, "a tool message needs tool_call_id, the id of the call it answers",
                                   param=f"messages.{i}.tool_call_id")
        _calls_answered(req.messages)
        for legacy in ("functions", "function_call"):
            if getattr(req, legacy) is not None:
                raise ServingError(400, f"{legacy} (OpenAI's deprecated form of tools) is not supported: send tools "
                                   "(each function as {\"type\": \"function\", \"function\": FUNCTION}) and "
                                   "tool_choice", param=legacy)
        if req.verbosity is not None and req.verbosity not in p.VERBOSITIES:
            raise invalid_value(req.verbosity, p.VERBOSITIES, "verbosity")
        for m in req.modalities or ():
            if m not in p.MODALITIES:
                raise invalid_value(m, p.MODALITIES, "modalities")
            if m == "audio":
                raise ServingError(400, "audio output is not supported: the served models write text (modalities "
                                   "[\"text\"])", param="modalities")
        if req.echo and req.tools and req.tool_choice != "none":
            raise ServingError(400, "echo is not supported with tools", param="echo")
        rid = self.ctl.new_id("chatcmpl")
        me, tools, gen = await self.start_chat(req, tenant, rid, req.stream)
        if req.stream:
            return self._stream_chat(gen, req, rid, me, tools)
        return await self._collect(request, gen, self._collect_chat(gen, req, rid, me, tools))

    @staticmethod
    def _echoed(req: p.ChatCompletionRequest) -> str:
        """vLLM's chat `echo`: the last message's text, which each choice's content starts with, when it is of the
        reply's role (the assistant's, or with no generation prompt -- continue_final_message -- the last
        message's own: the start of the answer it continues); else nothing."""
        if not req.echo:
            return ""
        last = req.messages[-1]
        gen_prompt = req.add_generation_prompt and not (req.continue_final_message
                                                        and "add_generation_prompt" not in req.model_fields_set)
        return last.text() if last.role == ("assistant" if gen_prompt else last.role) else ""

    async def start_chat(self, req: p.ChatCompletionRequest, tenant: Tenant, rid: str, stream: bool,
                         fit: Callable[[list[int]], list[int]] | None = None, first: int | None = None,
                         prompt: list[int] | None = None) -> tuple[ModelEntry, ToolPlan | None, Tracked]:
        """A chat request's model, tool plan and admitted generation (tracked: whoever reads it closes it).
        `stream`: whether the API request (chat, Messages, Responses, Ollama) sends its reply as it is made. `fit`:
        the prompt's ids as they are fed, the caller's own cut of one past the context (Ollama's), else a 400.
        `first`: the generation's max_tokens where the request's is met in parts (a thinking budget, then the rest:
        thinking.Budgeted), the context held to the request's whole max_tokens all the same, the tenant charged for
        it once, the rest made in the same request (`go_on`). `prompt`: the prompt's ids where the caller rendered
        them already (`chat_prompt_ids`: Ollama's, held to its num_ctx), fed through `fit` or as they are (the caller
        has held them to the context), not rendered again."""
        me = self.entry(tenant, req.model)
        self._refuse_unsupported(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise ServingError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        tools = await self._tool_plan(me, req)
        if tools is not None and thinks(me):  # (its think block left free by the grammar: ToolPlan.thinking)
            tools = tools.thinking(False)
        params = await self._shaped(self._params(me, req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None),
                                    req, tools)
        if tools is not None and (schema := response_schema(req.response_format)) is not None:
            tools = tools.answering(schema)  # (as the grammar has it: its text, JSON, is the whole output)
        if not getattr(me.tokenizer, "chat_template", None):
            raise ServingError(400, f"model `{req.model}` has no chat template; use /v1/completions")
        kwargs = effort_kwargs(me, req.reasoning_effort, check_template_kwargs(req.chat_template_kwargs))
        if tools is not None:
            kwargs = {**kwargs, "tools": tools.template_tools}
        if fit is None and prompt is None:
            ids = await self.offload(self._chat_prompt, me, req, kwargs)
        else:
            if prompt is None:
                prompt = await self.offload(self._chat_prompt, me, req, kwargs, False)
            ids = self._check_ids(me, fit(prompt) if fit is not None else prompt, "messages")
        if tools is not None and tools.think is False and opened(me, ids[-16:]):  # (the reply begins inside it)
            tools = tools.thinking(True)
            params = dataclasses.replace(params, grammar=await self.offload(lambda: tools.grammar))  # (`_shaped`)
        if first is not None:
            room = me.max_model_len - len(ids)
            if max_tokens is not None and max_tokens > room:  # (the engine's check, of the whole: as generate's)
                raise ServingError(400, f"This model's maximum context length is {me.max_model_len} tokens. However, "
                                   f"you requested {len(ids) + max_tokens} tokens ({len(ids)} in the prompt, "
                                   f"{max_tokens} for the completion). Please reduce the prompt or max_tokens.",
                                   param="max_tokens", code="context_length_exceeded")
            params = dataclasses.replace(params, max_tokens=first)
        whole = None if first is None else max_tokens if max_tokens is not None else me.max_model_len - len(ids)
        gen = await self.generate(me, tenant, req.model, [ids], params, req.n, rid, stream, whole=whole)
        gen.prompt_tail = ids[-16:]  # (whether the template opened a think block the reply starts inside: thinking.opened)
        gen.prompt_ids = ids  # (a continuation's prompt starts with it: thinking.Budgeted)
        gen.tools = tools  # (its grammar's think block: `go_on`)
        return me, tools, gen

    @staticmethod
    def _template_message(mm: p.ChatMessage) -> dict[str, Any]:
        """A message as chat templates take it: an assistant's tool calls with their arguments as objects (as vLLM
        gives them: templates write them with `tojson`), a tool message's call id, a participant's name."""
        d: dict[str, Any] = {"role": "system" if mm.role == "developer" else mm.role, "content": mm.text()}
        if mm.tool_calls:
            calls = []
            for c in mm.tool_calls:
                fn = c.get("function")
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                    try:
                        fn = {**fn, "arguments": json.loads(fn["arguments"])}
                    except (ValueError, RecursionError):  # (no JSON, or nested past the parser: left as text)
                        pass
                calls.append({**c, "function": fn})
            d["tool_calls"] = calls
        if mm.tool_call_id is not None:
            d["tool_call_id"] = mm.tool_call_id
        if mm.name is not None:  # (templates that know participants' names write it)
            d["name"] = mm.name
        return d

    # --- /tokenize, /detokenize (vLLM's) ---
    async def tokenize(self, req: p.TokenizeRequest, tenant: Tenant) -> p.TokenizeResponse:
        """The token ids a request would feed the model (no length limit: a count is what callers often want)."""
        me = self.lookup(tenant, req.model)
        if req.messages is None:
            ids = await self.offload(encode_prompt, me.tokenizer, req.prompt, None,
                                     req.add_special_tokens)
        else:
            if not getattr(me.tokenizer, "chat_template", None):
                raise ServingError(400, f"model `{req.model}` has no chat template", param="messages")
            kwargs = check_template_kwargs(req.chat_template_kwargs)
            ids = await self.offload(self._chat_prompt, me, req, kwargs, False)
        strs = None
        if req.return_token_strs:  # (a paced model's byte tokenizer has no pieces: each token's text)
            tok = me.tokenizer
            strs = (list(tok.convert_ids_to_tokens(ids)) if hasattr(tok, "convert_ids_to_tokens")
                    else [tok.decode([i], skip_special_tokens=False) for i in ids])
        return p.TokenizeResponse(count=len(ids), max_model_len=me.max_model_len, tokens=ids, token_strs=strs)

    async def detokenize(self, req: p.DetokenizeRequest, tenant: Tenant) -> p.DetokenizeResponse:
        me = self.lookup(tenant, req.model)
        self._check_vocab(me, req.tokens, "tokens")
        return p.DetokenizeResponse(prompt=await self.offload(me.tokenizer.decode, req.tokens))

    async def chat_prompt_tokens(self, tenant: Tenant, chat: p.ChatCompletionRequest) -> int:
        """How many tokens a chat request's prompt is, as it would be fed (the template, with its tools'
        declarations); nothing is generated (Anthropic's count_tokens, Responses' input_tokens)."""
        return len(await self.chat_prompt_ids(tenant, chat))

    async def chat_prompt_ids(self, tenant: Tenant, chat: p.ChatCompletionRequest) -> list[int]:
        """A chat request's prompt's ids as start_chat renders them (no length limit), which it takes (`prompt`)."""
        me = self.lookup(tenant, chat.model)
        tools = await self._tool_plan(me, chat)
        # (as start_chat renders it)
        kwargs = effort_kwargs(me, chat.reasoning_effort, check_template_kwargs(chat.chat_template_kwargs))
        if tools is not None:
            kwargs = {**kwargs, "tools": tools.template_tools}
        return await self.offload(self._chat_prompt, me, chat, kwargs, False)

    def _chat_prompt(self, me: ModelEntry, req: p.ChatCompletionRequest | p.TokenizeRequest, kwargs: dict[str, Any],
                     limit: bool = True) -> list[int]:
        """The prompt's token ids: the model's own chat template, rendered and tokenized in the tokenize pool
        (`limit`: a prompt that leaves no room to generate is a 400)."""
        if req.chat_template is not None:  # (vLLM's field: a template of the client's own would run server-side)
            raise ServingError(400, "chat_template is not supported: the model's own chat template is used "
                               "(chat_template_kwargs pass values to it)", param="chat_template")
        msgs = [self._template_message(mm) for mm in req.messages]
        gen_prompt = req.add_generation_prompt
        if req.continue_final_message:  # (add_generation_prompt left at its default: off, as the two exclude)
            if gen_prompt and "add_generation_prompt" in req.model_fields_set:
                raise ServingError(400, "continue_final_message and add_generation_prompt cannot both be true",
                                   param="continue_final_message")
            gen_prompt = False
            kwargs = {**kwargs, "continue_final_message": True}
        try:
            text = me.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt, **kwargs)
        except Exception as e:  # noqa: BLE001 - template errors (role order, ...) are the client's
            raise ServingError(400, f"cannot apply the chat template: {e}", param="messages") from None
        if not limit:
            return encode(me.tokenizer, text)
        keep = self._kept_tokens(me, req)
        if keep is not None:
            ids = encode(me.tokenizer, text)
            return self._check_ids(me, ids[len(ids) - keep:] if len(ids) > keep else ids, "messages")
        try:
            ids = encode(me.tokenizer, text, me.max_model_len)
        except PromptTooLong as e:
            raise too_long(me, e.n, "messages") from None
        return self._check_ids(me, ids, "messages")

    def _chat_logprobs(self, me: ModelEntry, d: Delta, k: int, as_ids: bool = False) -> list[p.TokenLogprob]:
        out = []
        for pairs in d.logprobs or []:
            tid, lp = pairs[0]
            s = self._tok(me, tid, as_ids)
            top = sorted(pairs, key=lambda x: -x[1])[:k]
            out.append(p.TokenLogprob(token=s, logprob=lp, bytes=token_bytes(me.tokenizer, tid, s), top_logprobs=[
                p.TopLogprob(token=(ts := self._tok(me, t, as_ids)), logprob=v, bytes=token_bytes(me.tokenizer, t, ts))
                for t, v in top]))
        return out

    @staticmethod
    def _reply(text: str, finish: str | None, tools: ToolPlan | None,
               cut: bool = False) -> tuple[p.AssistantMessage, str | None]:
        """A choice's message and finish reason: with tools, a whole output is its tool calls (finish reason
        "tool_calls"; "stop" for a call tool_choice named, as OpenAI's and vLLM's), a hermes one's text before them
        its content (vLLM's hermes parser's); one cut short stays text, but for a call cut before its name (the text
        before it: `ToolPlan.cut_text`) and, with `cut` (the chat reply's), calls max_tokens cut: the calls written
        whole and the one being written once its name is whole, its arguments what was written (finish `length`);
        so are calls a stop sequence cuts, finishing as whole calls do, as the chat stream ends them.

        That is OpenAI's reply to a call max_tokens cuts (its arguments cut short, finish_reason "length") and what
        the chat stream sends of one (vLLM's streaming hermes parser's too: the call once its name is known, then its
        arguments as they come), so the reply is the same streamed or not; vLLM's reply not streamed gives the raw
        text as content instead (its JSON does not parse), which this was, and its client then got a `<tool_call>`
        as the model's words. The other APIs' callers keep to whole calls here and read cut ones their own way."""
        calls = tools.calls(text) if tools is not None and finish == "stop" else None
        if calls is not None:
            return p.AssistantMessage(content=tools.lead(text)[0] or None, tool_calls=calls), _calls_finish(tools)
        if tools is None or finish not in ("length", "stop"):
            return p.AssistantMessage(content=text), finish
        if finish == "length" and (said := tools.cut_text(text)) is not None:  # (a call cut before its name: the text
            return p.AssistantMessage(content=said or None), finish  # before it, as streamed)
        if cut and (got := tools.cut_calls(text)) is not None and (got[0] or got[1] is not None):
            whole, part = got
            return p.AssistantMessage(content=tools.lead(text)[0] or None,
                                      tool_calls=[*whole, *([] if part is None else [part])]), \
                finish if finish == "length" else _calls_finish(tools)
        return p.AssistantMessage(content=text), finish

    async def _collect_chat(self, gen: Tracked, req: p.ChatCompletionRequest, rid: str,
                            me: ModelEntry, tools: ToolPlan | None) -> p.ChatCompletionResponse:
        k = len(gen.subs)
        text = [""] * k
        finish: list[str | None] = [None] * k
        stops: list[int | str | None] = [None] * k
        lps: list[list[p.TokenLogprob]] = [[] for _ in range(k)]
        async for i, d in gen.events():
            text[i] += d.text
            if req.logprobs:
                lps[i].extend(self._chat_logprobs(me, d, req.top_logprobs or 0, req.return_tokens_as_token_ids))
            if d.finished:
                finish[i], stops[i] = d.finish_reason, d.stop_reason
        replies = [self._reply(text[i], finish[i], tools, cut=True) for i in range(k)]
        if (begun := thinks_first(me, gen, req, tools)) is not None:
            for i in range(k):  # (the calls after a think block, which stays the content, as vLLM's; a <tool_call>
                # inside the block is thinking, not a call, as the stream reads it: the reply is read past the block)
                head, rest = _after_thought(text[i], begun)
                msg, why = self._reply(rest, finish[i], tools, cut=True)
                if head:
                    msg.content = head + (msg.content or "")
                replies[i] = msg, why
        if echo := self._echoed(req):
            for msg, _ in replies:
                msg.content = echo + (msg.content or "")
        choices = [p.ChatChoice(index=i, message=msg, finish_reason=why, stop_reason=stops[i],
                                logprobs=p.ChoiceLogprobs(content=lps[i]) if req.logprobs else None)
                   for i, (msg, why) in enumerate(replies)]
        return p.ChatCompletionResponse(id=rid, model=req.model, choices=choices, usage=self._usage(gen))

    def _stream_chat(self, gen: Tracked, req: p.ChatCompletionRequest, rid: str,
                     me: ModelEntry, tools: ToolPlan | None) -> AsyncIterator[bytes]:
        usage = req.stream_options is not None and req.stream_options.include_usage
        fr = ChunkFrames("chat.completion.chunk", rid, int(time.time()), req.model, usage, self._live_usage(gen, req))
        # each choice opens with the role: with text `content: ""`, with tool calls `content: null` (as OpenAI's
        # streams do); a choice of "auto" (hermes) opens once its output shows which it is
        hermes = tools is not None and tools.hermes
        lead = [] if hermes else [fr.delta(i, ROLE if tools is None else ROLE_CALLS) for i in range(len(gen.subs))]
        if echo := self._echoed(req):  # (vLLM's: the echoed text a chunk of its own, after the role's)
            lead += [fr.delta(i, content(echo)) for i in range(len(gen.subs))]
        opened = [not hermes] * len(gen.subs)
        held = [""] * len(gen.subs)  # (tools) a choice's text so far
        held_lps: list[list[p.TokenLogprob]] = [[] for _ in gen.subs]  # (tools) its logprobs not sent yet
        text_reply = [False] * len(gen.subs)  # ("auto") the choice turned out to be text: streamed as it comes
        # (tools) a choice's calls as they are written: each opens with a delta of its index, id, type, name and
        # arguments "" (or their first part), then its arguments go in parts as they come, as OpenAI streams them
        calls: list[CallStream | None] = [None] * len(gen.subs)
        # (a thinking model's hermes choice) its think block, sent as content as it comes, before its calls are
        # looked for in what follows (`thinks_first`)
        begun = thinks_first(me, gen, req, tools)
        splits = [Thought(begun) if begun is not None else None for _ in gen.subs]
        # ("auto") a choice that turned out to be text: its calls may follow it (the grammar's `lead`), its text sent
        # up to their opening, which is held while it may be one
        leads = [Lead() if hermes and tools.text_then_calls else None for _ in gen.subs]

        def role(i: int, calls: bool) -> bytes:
            if opened[i]:
                return b""
            opened[i] = True
            return fr.delta(i, ROLE_CALLS if calls else ROLE)

        def logprobs(i: int) -> bytes:
            if not req.logprobs or not held_lps[i]:
                return NULL
            lps, held_lps[i] = held_lps[i], []
            return p.ChoiceLogprobs(content=lps).model_dump_json().encode()

        def call_frames(i: int, fresh: str, cut: bool) -> bytes:
            cs, out = calls[i], b""
            for k, frag, opens in cs.feed(fresh, cut):  # (`cut`: max_tokens or a stop ended it, `_reply`'s cut calls)
                if opens:  # (its opening delta)
                    c = cs.calls[k]
                    tc = {"index": k, "id": c["id"], "type": "function",
                          "function": {"name": c["function"]["name"], "arguments": frag}}
                else:
                    tc = {"index": k, "function": {"arguments": frag}}
                body = json.dumps({"tool_calls": [tc]}, ensure_ascii=False, separators=(",", ":")).encode()
                out += fr.delta(i, body, logprobs(i))
            return out

        def frame(i: int, d: Delta) -> bytes:
            out = b""
            lp = self._chat_logprobs(me, d, req.top_logprobs or 0, req.return_tokens_as_token_ids) if req.logprobs else None
            if (sp := splits[i]) is not None:
                head, rest = sp.feed(d.text, d.finished)
                if sp.held:  # (it may be <think>; its logprobs with it)
                    held_lps[i] += lp or []
                    return b""
                if rest is None:  # (in the block: its text as it comes)
                    lp, held_lps[i] = (held_lps[i] + lp if lp is not None else None), []
                    lpj = NULL if lp is None else p.ChoiceLogprobs(content=lp).model_dump_json(exclude_unset=True).encode()
                    out = role(i, False) + fr.delta(i, content(head), lpj)
                    return out + (fr.delta(i, EMPTY, NULL, d.finish_reason, d.stop_reason) if d.finished else b"")
                splits[i] = None  # (past it: the rest read as before)
                if head:
                    out = role(i, False) + fr.delta(i, content(head))
                d = dataclasses.replace(d, text=rest)
            if tools is not None and not text_reply[i]:
                held[i] += d.text
                held_lps[i] += lp or []
                fresh = d.text
                if calls[i] is None:
                    opening = tools.opening(held[i]) if held[i] else None
                    if opening is False:  # text after all: what was held, then as it comes
                        text_reply[i] = True
                        d = dataclasses.replace(d, text=held[i])
                        lp, held_lps[i] = (held_lps[i] if req.logprobs else None), []
                    elif opening:
                        calls[i], fresh = CallStream(tools), held[i]
                    elif not d.finished:
                        return out
            if text_reply[i] and (lead := leads[i]) is not None:
                shown, rest = lead.feed(d.text, d.finished)
                if rest is not None:  # (its calls begin: the text before them, then the calls as above)
                    if shown or lp:
                        out += role(i, False) + fr.delta(i, content(shown), NULL if lp is None else p.ChoiceLogprobs(
                            content=lp).model_dump_json(exclude_unset=True).encode())
                    leads[i], text_reply[i], calls[i], held[i], fresh = None, False, CallStream(tools), rest, rest
                    held_lps[i], lp = [], None
                d = dataclasses.replace(d, text=shown)
            if tools is not None and not text_reply[i]:
                out += role(i, calls[i] is not None)
                if calls[i] is not None:
                    out += call_frames(i, fresh, d.finished and d.finish_reason in ("length", "stop"))
                if not d.finished:
                    return out
                why = d.finish_reason
                if calls[i] is None or not calls[i].calls:  # no call began: the text, as before; a call max_tokens
                    # cut before its name is dropped, the text before it the reply's (ToolPlan.cut_text: `_reply`'s)
                    kept = tools.cut_text(held[i]) if why == "length" else None
                    if kept is None or kept:
                        out += role(i, False) + fr.delta(i, content(held[i] if kept is None else kept), logprobs(i))
                elif why == "stop":  # (the calls sent say what the reply is, whole or not: a stop sequence inside
                    # one leaves it unparsable, and its client has the calls, not text, to answer)
                    why = _calls_finish(tools)
                return out + fr.delta(i, EMPTY, logprobs(i), why, d.stop_reason)
            out += role(i, False)
            if d.text or lp:
                lpj = NULL if lp is None else p.ChoiceLogprobs(content=lp).model_dump_json(exclude_unset=True).encode()
                out += fr.delta(i, content(d.text), lpj)
            if d.finished:
                out += fr.delta(i, EMPTY, NULL, d.finish_reason, d.stop_reason)
            return out

        return self._stream(gen, lead, frame, fr, usage)

    # --- the stream both endpoints share ---
    async def _stream(self, gen: Tracked, lead: list[bytes], frame: Callable[[int, Delta], bytes],
                      fr: ChunkFrames, usage: bool) -> AsyncIterator[bytes]:
        """Lead frames, a frame per delta, the usage chunk if asked, `[DONE]`; always closes `gen`.

        Deltas already queued when one is rendered go out in the same write (a stream that fell behind
        catches up in one send instead of one per token). Once streaming, a failure is an error event and
        `[DONE]` (the status line has gone).
        """
        status = 499
        out: list[bytes] = []
        try:
            if lead:
                yield b"".join(lead)
            async for i, d in gen.events():
                b = frame(i, d)
                if b:
                    out.append(b)
                if out and not gen.pending():
                    yield b"".join(out)
                    out.clear()
            if usage:
                out.append(fr.usage(self._usage(gen).model_dump_json().encode()))
            out.append(DONE)
            yield b"".join(out)
            status = 200
        except ServingError as e:
            status = e.status
            yield b"".join(out) + sse(e.body()) + DONE
        except Exception:  # noqa: BLE001 - a bug mid-stream: the client hears an error event, the metrics a 500
            status = 500
            err = ServingError(500, "internal error while streaming")
            log.exception("stream failed")
            yield b"".join(out) + sse(err.body()) + DONE
        finally:
            self.active.discard(gen)
            gen.close(status)
