"""Anthropic Messages requests as the chat request they mean (controller.api.anthropic.chat_request): blocks that a
client sends and the conversion used to drop or mistake."""

from __future__ import annotations

import pytest

from controller.api import protocol as p
from controller.api.anthropic import chat_request
from controller.errors import ServingError


def _chat(messages: list[dict]) -> p.ChatCompletionRequest:
    return chat_request(p.MessagesRequest.model_validate({"model": "m", "max_tokens": 8, "messages": messages}))


def test_an_empty_content_list_is_named_not_dropped():
    """A user message of no blocks was dropped: alone, the 400 said `messages` had no item ("List should have at
    least 1 item"), and beside others it vanished from the conversation. Anthropic's 400 names the message."""
    for msgs in ([{"role": "user", "content": []}],
                 [{"role": "user", "content": []}, {"role": "assistant", "content": "a"},
                  {"role": "user", "content": "b"}]):
        with pytest.raises(ServingError) as e:
            _chat(msgs)
        assert e.value.status == 400 and "messages.0: all messages must have non-empty content" in e.value.message
    # (the final assistant message may be empty: a prefill of nothing)
    assert [m.role for m in _chat([{"role": "user", "content": "x"}, {"role": "assistant", "content": []}]).messages] \
        == ["user", "assistant"]


def test_empty_text_is_refused_as_anthropic_refuses_it():
    """A user message whose content is "" (or a turn before the last that is), and a text block of "", went to the
    model as an empty turn (a 200); Anthropic's 400s name them. The final assistant message may still be empty."""
    for msgs, said in (([{"role": "user", "content": ""}], "messages.0: all messages must have non-empty content"),
                       ([{"role": "user", "content": "a"}, {"role": "assistant", "content": ""},
                         {"role": "user", "content": "b"}], "messages.1: all messages must have non-empty content"),
                       ([{"role": "user", "content": [{"type": "text", "text": ""}]}],
                        "messages.0.content.0.text: text content blocks must be non-empty")):
        with pytest.raises(ServingError) as e:
            _chat(msgs)
        assert e.value.status == 400 and said in e.value.message, e.value.message
    assert _chat([{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]).messages[-1].role == \
        "assistant"


def test_an_earlier_turns_thinking_blocks_are_ignored():
    """A conversation carried over from a thinking model (its assistant turns hold `thinking` / `redacted_thinking`
    blocks, which clients send back whole) was a 400; Anthropic strips earlier turns' thinking, and so does this."""
    chat = _chat([{"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": "s"},
                                                    {"type": "redacted_thinking", "data": "xyz"},
                                                    {"type": "text", "text": "Hello"}]},
                  {"role": "user", "content": "more"}])
    assert [(m.role, m.text()) for m in chat.messages] == [("user", "Hi"), ("assistant", "Hello"), ("user", "more")]


def test_a_tool_result_needs_its_tool_use_id():
    """A tool_result without tool_use_id became a tool message answering call "" (a 200); Anthropic's is a 400."""
    with pytest.raises(ServingError) as e:
        _chat([{"role": "user", "content": [{"type": "tool_result", "content": "21C"}]}])
    assert e.value.status == 400 and "tool_use_id" in e.value.message
