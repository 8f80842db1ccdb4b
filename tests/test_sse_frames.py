"""Streamed chunks rendered from byte templates are byte for byte what the pydantic chunk models render."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from controller.api import protocol as p
from controller.api.sse import EMPTY, ROLE, ROLE_CALLS, ChunkFrames, content, sse

texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)  # no lone surrogates: not UTF-8
names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20)
finish = st.sampled_from([None, "stop", "length", "abort"])
stops = st.one_of(st.none(), st.integers(0, 2**31 - 1), texts)  # vLLM's stop_reason: a stop token id or string


def _stop(fin, stop) -> dict:
    """A finishing choice's stop_reason, as the frames write it (set: written even when None); none in the others."""
    return {"stop_reason": stop} if fin is not None else {}


@settings(max_examples=300, deadline=None)
@given(rid=names, model=names, created=st.integers(0, 2**40), index=st.integers(0, 15), text=texts,
       fin=finish, usage=st.booleans(), stop=stops)
def test_completion_frames_match_pydantic(rid, model, created, index, text, fin, usage, stop):
    extra = {"usage": None} if usage else {}
    want = sse(p.CompletionChunk(object="text_completion", id=rid, created=created, model=model, **extra,
                                 choices=[p.CompletionChoice(index=index, text=text, logprobs=None, finish_reason=fin,
                                                             **_stop(fin, stop))]))
    got = ChunkFrames("text_completion", rid, created, model, usage).text(index, text, finish_reason=fin,
                                                                          stop_reason=stop)
    assert got == want


@settings(max_examples=300, deadline=None)
@given(rid=names, model=names, created=st.integers(0, 2**40), index=st.integers(0, 15), text=texts,
       fin=finish, usage=st.booleans(), stop=stops)
def test_chat_frames_match_pydantic(rid, model, created, index, text, fin, usage, stop):
    extra = {"usage": None} if usage else {}
    fr = ChunkFrames("chat.completion.chunk", rid, created, model, usage)

    def want(delta: p.ChatDelta, finish_reason: str | None = None, **kw) -> bytes:
        choice = p.ChatChunkChoice(index=index, delta=delta, finish_reason=finish_reason, logprobs=None, **kw)
        return sse(p.ChatCompletionChunk(object="chat.completion.chunk", id=rid, created=created, model=model,
                                         choices=[choice], **extra))

    assert fr.delta(index, ROLE) == want(p.ChatDelta(role="assistant", content=""))
    assert fr.delta(index, ROLE_CALLS) == want(p.ChatDelta(role="assistant", content=None))
    assert fr.delta(index, content(text)) == want(p.ChatDelta(content=text))
    assert fr.delta(index, EMPTY, finish_reason=fin, stop_reason=stop) == want(p.ChatDelta(), fin, **_stop(fin, stop))


def test_usage_frame_matches_pydantic():
    u = p.Usage(prompt_tokens=3, completion_tokens=5, total_tokens=8,
                prompt_tokens_details=p.PromptTokensDetails(cached_tokens=2))  # (as the server makes it)
    for obj, cls in (("text_completion", p.CompletionChunk), ("chat.completion.chunk", p.ChatCompletionChunk)):
        want = sse(cls(object=obj, id="x-1", created=7, model="m", choices=[], usage=u))
        assert ChunkFrames(obj, "x-1", 7, "m", True).usage(u.model_dump_json().encode()) == want


def test_completion_logprobs_frame_carries_every_list():
    lp = p.CompletionLogprobs(tokens=["a"], token_logprobs=[-0.5], top_logprobs=[{"a": -0.5}], text_offset=[0])
    frame = ChunkFrames("text_completion", "x", 1, "m", False).text(0, "a", lp.model_dump_json().encode())
    body = json.loads(frame[len(b"data: "):])
    assert body["choices"][0]["logprobs"] == {"tokens": ["a"], "token_logprobs": [-0.5],
                                              "top_logprobs": [{"a": -0.5}], "text_offset": [0]}
