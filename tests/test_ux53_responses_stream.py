"""A streamed Responses request that fails once streaming (an operator's cancel, an engine's error, shutdown) ends
with `response.failed`, as OpenAI's streams end a failed response, not with a bare `error` event."""

from __future__ import annotations

import asyncio
import json

from controller.api import protocol as p
from controller.api import responses
from controller.errors import ServingError
from controller.messages import Delta


class _Gen:
    """A generation that makes one token, then fails as an operator's cancel makes it fail."""

    prompt_tokens, completion_tokens, cached_tokens = 3, 1, 0

    def __init__(self):
        self.closed: int | None = None

    async def events(self):
        yield 0, Delta("r-0", text="Hel")
        raise ServingError(503, "cancelled by an operator")

    def pending(self) -> bool:
        return False

    def close(self, status: int) -> None:
        self.closed = status


class _Serving:
    active: set = set()


def test_a_stream_that_fails_ends_with_response_failed():
    req = p.ResponsesRequest.model_validate({"model": "m", "input": "hi", "stream": True})
    gen = _Gen()
    reply = responses._Reply(_Serving(), req, "resp_1", None)

    async def read() -> list[dict]:
        body = b"".join([b async for b in responses._stream(_Serving(), gen, reply, lambda: {})])
        return [json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: ")]

    events = asyncio.run(read())
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and "response.output_text.delta" in kinds
    assert kinds[-2:] == ["error", "response.failed"], kinds
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    failed = events[-1]["response"]
    assert failed["id"] == "resp_1" and failed["status"] == "failed"
    assert failed["error"] == {"code": "server_error", "message": "cancelled by an operator"}
    assert failed["output"][0]["content"][0]["text"] == "Hel" and failed["usage"]["output_tokens"] == 1
    assert gen.closed == 503
