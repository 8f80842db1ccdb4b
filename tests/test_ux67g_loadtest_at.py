"""`tokenpool loadtest` against a real model: a token whose text begins with "@" (an e-mail, a decorator, a tiny
model's random pick) is a token like any other. The PaceEngine's emission stamp is a token's whole text,
"@<seconds>"; the load test read any text beginning with "@" as one, and float() of the rest failed: the raw client
counted an error and closed a healthy stream (a pooled server of tiny models showed one in ~6,500 tokens), the
httpx client's ValueError escaped its stream."""

from __future__ import annotations

import asyncio

from load_tests.loadtest import Stream, _Streams


def _frame(text: str) -> bytes:
    return (b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[{"index":0,'
            b'"text":"' + text.encode() + b'","logprobs":null,"finish_reason":null}]}\n\n')


def test_a_tokens_text_beginning_with_at_is_a_token_and_a_pace_stamp_is_still_read():
    async def feed() -> tuple[_Streams, Stream]:
        s = _Streams(stop_at=float("inf"))
        st = Stream(s, 0.0)
        for i, text in enumerate(("@", "@media", "@1.5e", "@1796675737.166749")):
            st.feed(_frame(text), 1.0 + i, 1796675738.0)
        return s, st

    s, st = asyncio.run(feed())
    assert (s.tokens, s.errors, st.over.done()) == (4, [], False)
    assert [round(x, 6) for x in s.lat] == [0.833251]  # the stamp alone: arrival wall time less its emission
