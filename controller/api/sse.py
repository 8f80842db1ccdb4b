"""Server-sent-event frames of OpenAI streams, rendered from byte templates built once per stream.

A streamed token costs one frame. Building `CompletionChunk`/`ChatCompletionChunk` models and dumping them costs
~5 us a frame; here a frame is the stream's constant head, one choice object and the constant tail, joined as
bytes. The bytes are exactly what `sse(chunk_model)` (pydantic, `exclude_unset=True`) writes for the same
chunk: fields in model order, strings escaped as pydantic escapes them (UTF-8 kept, control characters as
\\uXXXX); tests/test_sse_frames.py holds the two renderings equal.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from json.encoder import encode_basestring  # the C escaper json.dumps(ensure_ascii=False) uses

from controller.api import protocol as p

DONE = b"data: [DONE]\n\n"
NULL = b"null"


def sse(obj: p.BaseModel | dict) -> bytes:
    """One frame from a model (unset fields left out) or a dict: for the frames that come once a stream."""
    body = obj.model_dump_json(exclude_unset=True) if isinstance(obj, p.BaseModel) else json.dumps(obj)
    return b"data: " + (body.encode() if isinstance(body, str) else body) + b"\n\n"


def js(s: str) -> bytes:
    """A JSON string literal, byte for byte as pydantic writes it."""
    return encode_basestring(s).encode()


def opt(s: str | None) -> bytes:
    return NULL if s is None else js(s)


class ChunkFrames:
    """The frames of one stream: `object` is "text_completion" or "chat.completion.chunk"."""

    def __init__(self, obj: str, rid: str, created: int, model: str, include_usage: bool,
                 live_usage: Callable[[], bytes] | None = None):
        self.head = (b'data: {"id":' + js(rid) + b',"object":' + js(obj) + b',"created":' + str(int(created)).encode()
                     + b',"model":' + js(model) + b',"choices":[')
        # include_usage: every chunk but the last carries "usage": null, as OpenAI sends it; `live_usage` (vLLM's
        # continuous_usage_stats): the usage so far instead, the JSON it returns
        self._tail = b'],"usage":null}\n\n' if include_usage else b"]}\n\n"
        self.live_usage = live_usage

    @property
    def tail(self) -> bytes:
        return self._tail if self.live_usage is None else b'],"usage":' + self.live_usage() + b"}\n\n"

    def usage(self, usage: bytes) -> bytes:
        """The last chunk when include_usage: no choices, the request's Usage (JSON)."""
        return self.head + b'],"usage":' + usage + b"}\n\n"

    def text(self, index: int, text: str, logprobs: bytes = NULL, finish_reason: str | None = None,
             stop_reason: int | str | None = None) -> bytes:
        """A completions chunk; `logprobs` is the JSON of its CompletionLogprobs (or null); a finishing one (with
        `finish_reason`) carries vLLM's `stop_reason` too."""
        return b'%b{"index":%d,"text":%b,"logprobs":%b,"finish_reason":%b%b}%b' % (
            self.head, index, js(text), logprobs, opt(finish_reason), _stop(finish_reason, stop_reason), self.tail)

    def delta(self, index: int, delta: bytes, logprobs: bytes = NULL, finish_reason: str | None = None,
              stop_reason: int | str | None = None) -> bytes:
        """A chat chunk; `delta` is the JSON of its Delta (see `content`, ROLE, EMPTY); a finishing one (with
        `finish_reason`) carries vLLM's `stop_reason` too."""
        return b'%b{"index":%d,"delta":%b,"logprobs":%b,"finish_reason":%b%b}%b' % (
            self.head, index, delta, logprobs, opt(finish_reason), _stop(finish_reason, stop_reason), self.tail)


def _stop(finish_reason: str | None, stop_reason: int | str | None) -> bytes:
    """vLLM's `stop_reason` member of a finishing chunk's choice (nothing in the others)."""
    if finish_reason is None:
        return b""
    return b',"stop_reason":' + (NULL if stop_reason is None else b"%d" % stop_reason if isinstance(stop_reason, int)
                                 else js(stop_reason))


ROLE = b'{"role":"assistant","content":""}'  # the first delta of every chat choice (of text)
ROLE_CALLS = b'{"role":"assistant","content":null}'  # the first delta of a choice of tool calls (as OpenAI's)
EMPTY = b"{}"  # the delta of a chat choice's last chunk, which carries only finish_reason


def content(text: str) -> bytes:
    return b'{"content":' + js(text) + b"}"
