"""The Responses API's truncation "auto": how many oldest turns go is a binary search over tokenize-only renders."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from controller.api import protocol as p
from controller.api.responses import _fewest_dropped


class CountingServing:
    """A serving layer whose prompts are a token a character of their messages' text; counts its renders."""

    def __init__(self, ctx: int):
        self.ctx, self.renders = ctx, 0

    def lookup(self, tenant, model):
        return SimpleNamespace(max_model_len=self.ctx)

    async def chat_prompt_tokens(self, tenant, chat: p.ChatCompletionRequest) -> int:
        self.renders += 1
        return sum(len(m.text()) for m in chat.messages)


def test_a_long_conversation_loses_the_fewest_oldest_turns_in_a_few_renders():
    """A stored conversation of 1000 turns past the context loses exactly the oldest turns it must (with the tool
    results that answered them), room left for max_output_tokens, in ~log2(1000) renders, not one a dropped turn
    (each render is of the whole conversation: a long chain of previous_response_id was quadratic)."""
    turns = []
    for _ in range(500):
        turns.append({"role": "user", "content": "u" * 10})
        turns.append({"role": "assistant", "content": "a" * 10})
    turns[-2:] = [{"role": "assistant", "content": "c" * 10}, {"role": "tool", "content": "t" * 10},
                  {"role": "user", "content": "q" * 10}]
    req = p.ResponsesRequest.model_validate({"model": "m", "input": "x", "max_output_tokens": 25,
                                             "truncation": "auto"})
    serving = CountingServing(ctx=100)
    kept = asyncio.run(_fewest_dropped(serving, None, req, turns))
    assert kept == turns[-7:] and sum(len(m["content"]) for m in kept) == 70  # (70 + 25 <= 100; 80 + 25 is not)
    assert serving.renders <= 11, serving.renders
    # a turn's tool results go with it: the conversation never starts with one
    serving = CountingServing(ctx=45)  # ([tool, q] would fit: 20 + 25)
    assert asyncio.run(_fewest_dropped(serving, None, req, turns)) == turns[-1:]
