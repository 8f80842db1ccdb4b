"""A model's thinking, as the APIs that give it apart from the reply read it: whether its chat template thinks
(Qwen3's `enable_thinking` switch, or a `<think>` block it writes), a reply's `<think>...</think>` block split
from its content as it streams (Ollama's `thinking`, the Messages API's thinking blocks), and a thinking budget held
to (the Messages API's `budget_tokens`: `Budgeted`)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from controller.errors import invalid_value
from controller.messages import Delta

if TYPE_CHECKING:
    from controller.api.serving import OpenAIServing, Tracked
    from controller.service import ModelEntry

OPEN, CLOSE = "<think>", "</think>"


def thinks(me: Any) -> bool:
    """Whether a model's chat template thinks: Qwen3's `enable_thinking` switch, or a `<think>` block it writes."""
    tpl = getattr(me.tokenizer, "chat_template", None)
    return isinstance(tpl, str) and ("enable_thinking" in tpl or OPEN in tpl)


def switch(me: Any) -> bool:
    """Whether a model's chat template turns its thinking on and off (Qwen3's `enable_thinking`)."""
    tpl = getattr(me.tokenizer, "chat_template", None)
    return isinstance(tpl, str) and "enable_thinking" in tpl


# OpenAI's reasoning efforts (Responses' `reasoning.effort`, chat completions' `reasoning_effort`; the `openai`
# client's ReasoningEffort, "max" its newest): "none" asks for no reasoning (gpt-5.1's default), the others for
# some, more or less
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")


def effort_kwargs(me: Any, effort: str | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The chat template's kwargs (`kwargs`, the client's chat_template_kwargs) as a request's reasoning effort asks,
    as vLLM maps it: "none" turns a template's thinking switch off (Qwen3's `enable_thinking`; the effort was
    ignored and the model thought all the same), any other effort on; a client's own `enable_thinking` stands; the
    effort itself goes to the template too, as vLLM passes it (templates that read it, gpt-oss's). A template with
    no switch thinks as it does (vLLM's too). A value OpenAI's API does not know: its 400, naming the field (Responses'
    `reasoning.effort`: responses._as_responses)."""
    if effort is None:
        return kwargs
    if effort not in EFFORTS:
        raise invalid_value(effort, EFFORTS, "reasoning_effort")
    out = {"reasoning_effort": effort, **kwargs}
    if switch(me):
        out.setdefault("enable_thinking", effort != "none")
    return out


def opened(me: Any, tail: list[int] | None) -> bool:
    """Whether a prompt (the ids it ends with, `tail`) opens the think block itself, as the templates of thinking-only
    models do (Qwen3's Thinking-2507, DeepSeek-R1: the generation prompt ends `<think>\\n`): the reply then starts
    inside it, with no opening tag of its own, and its `</think>` ends it."""
    if not tail or not hasattr(me.tokenizer, "decode"):
        return False
    try:
        return me.tokenizer.decode(list(tail), skip_special_tokens=False).rstrip().endswith(OPEN)
    except (ValueError, TypeError, IndexError, OverflowError):
        return False


class Split:
    """A reply's thinking (a leading `<think>...</think>` block) apart from its content, chunk by chunk: a piece that
    may be a tag's start is held until the next chunk tells; whitespace around the tags is dropped. `opened`: the
    prompt opened the block (`opened()`), so the reply starts inside it."""

    OPEN, CLOSE = OPEN, CLOSE

    def __init__(self, opened: bool = False) -> None:
        self.state, self.buf = "open" if opened else "start", ""

    def feed(self, text: str, end: bool = False) -> tuple[str, str]:
        """The (thinking, content) to send for `text`; `end`: the reply is over, nothing is held back."""
        self.buf += text
        thinking = ""
        if self.state == "start":
            head = self.buf.lstrip()
            if head.startswith(self.OPEN):
                self.state, self.buf = "open", head[len(self.OPEN):]
            elif self.OPEN.startswith(head) and not end:
                return "", ""
            else:
                self.state = "content"
        if self.state == "open":  # (the whitespace after <think>)
            self.buf = self.buf.lstrip()
            if not self.buf:
                return "", ""
            self.state = "think"
        if self.state == "think":
            i = self.buf.find(self.CLOSE)
            if i < 0:  # (held: what may be the closing tag's start, and the whitespace before it)
                tag = 0 if end else next((n for n in range(len(self.CLOSE) - 1, 0, -1)
                                          if self.buf.endswith(self.CLOSE[:n])), 0)
                n = len(self.buf[:len(self.buf) - tag].rstrip())
                thinking, self.buf = self.buf[:n], "" if end else self.buf[n:]
                return thinking, ""
            thinking, self.buf, self.state = self.buf[:i].rstrip(), self.buf[i + len(self.CLOSE):], "close"
        if self.state == "close":  # (the whitespace after </think>)
            self.buf = self.buf.lstrip()
            if not self.buf:
                return thinking, ""
            self.state = "content"
        content, self.buf = self.buf, ""
        return thinking, content

    def closing(self, said: str) -> str | None:
        """The text that ends the think block from where the reply is (`said`: the reply so far), as a chat template
        writes a finished one (Qwen3's: the thinking, a newline, `</think>`, a blank line), with the rest of the
        opening tag where the reply was still writing it; None where the reply is in no think block (it opened
        none, or closed it)."""
        if self.state == "start":
            head = self.buf.lstrip()
            if not head or not self.OPEN.startswith(head):
                return None
            return self.OPEN[len(head):] + "\n" + self.CLOSE + "\n\n"
        if self.state in ("open", "think"):
            return ("" if said.endswith("\n") else "\n") + self.CLOSE + "\n\n"
        return None


def _may_begin(text: str, stops: list[str], lo: int, hi: int) -> int | None:
    """The first place in text[lo:hi] where a stop string may begin: the rest of `text` is the stop's start, or holds
    it whole. None where none may."""
    for k in range(max(0, lo), hi):
        if any(text[k:k + len(s)] == s[:len(text) - k] for s in stops):
            return k
    return None


def _recount(gen: Any, made: int) -> None:
    """`gen`'s generated tokens `made`: those its events gave past a stop the reply ended at were never its (a reply
    not streamed gets the second engine request's deltas at its end, all counted as they came)."""
    gen = getattr(gen, "gen", gen)  # (a Tracked's Generation)
    gen.completion_tokens = made


class Budgeted:
    """A reply whose thinking is held to a budget (the Messages API's `budget_tokens`), by budget forcing at the
    front, the engine unchanged: the first generation (`first`) makes at most `budget` tokens; where they run out
    inside the think block, the block is closed there (`Split.closing`'s text, given as the reply's next delta) and a
    second engine request continues from the prompt, those tokens and the closing tag, for the rest of `max_tokens`;
    where they run out past the block (it closed within the budget) or in a reply that never opened one, the second
    goes on from where the first stopped. A first that ended otherwise (its end of turn, a stop sequence) is the whole
    reply.

    The second is a continuation of the same request (`OpenAIServing.go_on`): admitted, charged and counted once
    (the tenant's rates and usage, the metrics, the admin API's list and cancel under its one id). Read as the
    generation it stands for (`events`, `pending`, `close`, the token counts): the deltas of both, the first's finish
    held back where the second follows; its usage the prompt's (the first's: its cached tokens too) and every token
    generated, each once (the closing tag was not generated: it counts in neither). A stop sequence that begins in
    the first and ends in the second ends the reply there, as one in either does."""

    def __init__(self, serving: OpenAIServing, me: ModelEntry, first: Tracked, max_tokens: int, opened: bool):
        self.serving, self.me, self.first = serving, me, first
        self.max_tokens, self.opened = max_tokens, opened
        self.prompt_only = False

    @property
    def prompt_tokens(self) -> int:
        return self.first.prompt_tokens

    @property
    def cached_tokens(self) -> int:
        return self.first.cached_tokens

    @property
    def completion_tokens(self) -> int:
        return self.first.completion_tokens

    def __getattr__(self, name: str):  # (the rest as the generation has it: its subs, entry, prompt_tail, ...)
        return getattr(self.first, name)

    def pending(self) -> bool:
        return self.first.pending()

    def close(self, status: int) -> None:
        self.serving.active.discard(self.first)
        self.first.close(status)

    async def events(self) -> AsyncIterator[tuple[int, Delta]]:
        split, said, ids, then, held = Split(self.opened), "", [], None, ""
        stops, keep = self._stops()
        async for i, d in self.first.events():
            said += d.text
            ids += d.token_ids
            split.feed(d.text)
            if d.finished:
                then = self._then(split.closing(said), ids) if d.finish_reason == "length" else None
                # (placed before the first's end goes out: the request is never without an engine request an
                # operator's cancel reaches)
                await self.serving.go_on(self.first, *((then[0], then[2]) if then is not None else (None,)))
            if then is None:
                yield i, d
                continue
            # A stop sequence may begin in what the first wrote (and the closing text) and end in what the second
            # writes: the second's engine matches its own text only. Held here (an engine holds back a stop's length
            # less one until a request's end, so the first's last delta has it) until the second's text tells.
            text, whole = d.text + then[1], said + then[1]
            k = _may_begin(whole, stops, len(whole) - len(text), len(whole))
            held = "" if k is None else whole[k:]
            yield i, dataclasses.replace(d, text=text[:len(text) - len(held)], finished=False, finish_reason=None,
                                         stop_reason=None)
        if then is None:
            return
        made = self.first.completion_tokens  # (the first's: its tokens were all read)
        ahead: list[Delta] = []  # the second's deltas held while a stop may begin in `held`
        async for i, d in self.first.events():
            d = dataclasses.replace(d, num_cached_tokens=0)  # (the prompt's part the cache held: the first's)
            if not held:
                yield i, d
                continue
            ahead.append(d)
            look = held + "".join(x.text for x in ahead)
            hit = min(((k, s) for s in stops if 0 <= (k := look.find(s)) < len(held)), default=None)
            if hit is not None:  # (ended there, as the engine ends a reply at a stop: its text cut, its tokens made)
                k, s = hit
                _recount(self.first, made + sum(len(x.token_ids) for x in ahead))
                if isinstance(finish := getattr(self.first, "finish", None), dict):
                    finish[i] = "stop"  # (the request's metrics: Tracked.close)
                yield i, dataclasses.replace(d, text=look[:k + len(s) if keep else k],
                                             token_ids=[t for x in ahead for t in x.token_ids], logprobs=None,
                                             finished=True, finish_reason="stop", stop_reason=s)
                return
            if d.finished or _may_begin(look, stops, 0, len(held)) is None:  # (none can begin there now)
                first, *rest = ahead
                yield i, dataclasses.replace(first, text=held + first.text)
                for x in rest:
                    yield i, x
                held, ahead = "", []

    def _stops(self) -> tuple[list[str], bool]:
        """The request's stop strings, and whether its text keeps the one it ends at (include_stop_str_in_output)."""
        subs = getattr(self.first, "subs", None)  # (a scripted generation may have none)
        params = subs[0].params if subs else None
        return list(getattr(params, "stop", None) or ()), bool(getattr(params, "include_stop_str_in_output", False))

    def _then(self, close: str | None, ids: list[int]) -> tuple[list[int], str, int] | None:
        """Where the first generation, cut by the budget having written `ids`, goes on: (the second's prompt, the
        closing text added to the reply, its max_tokens); None where max_tokens is spent or the context is full."""
        from controller.api.serving import encode

        prompt = [*self.first.prompt_ids, *ids, *(encode(self.me.tokenizer, close) if close else [])]
        rest = min(self.max_tokens - len(ids), self.me.max_model_len - len(prompt))
        return (prompt, close or "", rest) if rest >= 1 else None
