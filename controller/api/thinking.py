"""A model's thinking, as the APIs that give it apart from the reply read it: whether its chat template thinks
(Qwen3's `enable_thinking` switch, or a `<think>` block it writes), and a reply's `<think>...</think>` block split
from its content as it streams (Ollama's `thinking`, the Messages API's thinking blocks)."""

from __future__ import annotations

from typing import Any

OPEN, CLOSE = "<think>", "</think>"


def thinks(me: Any) -> bool:
    """Whether a model's chat template thinks: Qwen3's `enable_thinking` switch, or a `<think>` block it writes."""
    tpl = getattr(me.tokenizer, "chat_template", None)
    return isinstance(tpl, str) and ("enable_thinking" in tpl or OPEN in tpl)


def switch(me: Any) -> bool:
    """Whether a model's chat template turns its thinking on and off (Qwen3's `enable_thinking`)."""
    tpl = getattr(me.tokenizer, "chat_template", None)
    return isinstance(tpl, str) and "enable_thinking" in tpl


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
