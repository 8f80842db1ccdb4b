"""Ollama's chat stream with tools, as real Ollama gives it: its ChatHandler feeds each piece of the reply to its tool
parser and sends a chunk with `message.tool_calls` as soon as a call is parsed (content "" in it), and text as it
comes; here the reply was held to its end, then sent as one line of all its calls (or all its text).

Driven through the route's own stream (`_stream`) with the hermes tool plan a served model with
`tool_call_parser: hermes` gets, over a scripted reply: the tiny random models never open a call under the hermes
"auto" grammar (none in 40 seeds), so a live server cannot be made to write one on cue.
"""

from __future__ import annotations

import asyncio
import json

from controller.api.ollama import _stream
from controller.api.structured import HERMES_CLOSE, HERMES_OPEN, ToolPlan
from controller.messages import Delta


class _Gen:
    """A generation whose events are the scripted pieces, logging each as it is handed out."""

    def __init__(self, pieces: list[str], log: list, reason: str = "stop"):
        self.pieces, self.log, self.reason = pieces, log, reason

    async def events(self):
        for i, text in enumerate(self.pieces):
            last = i == len(self.pieces) - 1
            self.log.append(("piece", i))
            yield 0, Delta("r", text=text, token_ids=[1], finished=last, finish_reason=self.reason if last else None)

    def close(self, status: int) -> None:
        self.log.append(("closed", status))


class _Serving:
    active: set = set()


def _run(pieces: list[str], reason: str = "stop") -> list:
    log: list = []

    def line(text: str, done: bool = False, reason: str | None = None, calls: list | None = None,
             thought: str = "", logprobs: list | None = None) -> bytes:
        return json.dumps({"content": text, "done": done, "calls": calls or []}).encode()

    async def read():
        async for b in _stream(_Serving(), _Gen(pieces, log, reason), line,
                               ToolPlan("", None, [], hermes=True)):
            log.append(("line", json.loads(b)))

    asyncio.run(read())
    return log


def _call(city: str) -> str:
    return json.dumps({"name": "get_weather", "arguments": {"city": city}})


def test_each_call_goes_out_as_soon_as_it_is_whole():
    """Two calls written over several pieces: the first call's line comes before the second call is read, each
    line one call (Ollama's arguments as an object), content "" in them; then the done line."""
    log = _run([HERMES_OPEN, _call("Paris")[:20], _call("Paris")[20:], HERMES_CLOSE, "\n" + HERMES_OPEN,
                _call("Rome") + HERMES_CLOSE])
    lines = [(i, x[1]) for i, x in enumerate(log) if x[0] == "line"]
    with_calls = [(i, x) for i, x in lines if x["calls"]]
    assert [[c["function"]["arguments"] for c in x["calls"]] for _, x in with_calls] == [[{"city": "Paris"}],
                                                                                          [{"city": "Rome"}]]
    assert all(x["content"] == "" for _, x in with_calls)
    assert [c["function"]["index"] for _, x in with_calls for c in x["calls"]] == [0, 1]
    assert with_calls[0][0] < log.index(("piece", 4))  # (sent before the second call was written)
    assert lines[-1][1]["done"] and not lines[-1][1]["calls"]
    assert log[-1] == ("closed", 200)


def test_a_text_reply_streams_as_it_comes():
    """With tools, a reply that is no call goes out piece by piece, as Ollama streams content (it was held to the
    end): each piece's line before the next piece is read."""
    log = _run(["The", " weather", " is", " fine"])
    lines = [x[1]["content"] for x in log if x[0] == "line" and not x[1]["done"]]
    assert lines == ["The", " weather", " is", " fine"]
    assert log.index(("line", {"content": "The", "done": False, "calls": []})) < log.index(("piece", 1))


def test_a_call_cut_short_gives_the_whole_ones_and_the_rest_as_content():
    """num_predict ends the reply inside a second call: the whole first call went out at once; what no whole call
    holds goes as content, as Ollama's parser gives back what it could not parse."""
    log = _run([HERMES_OPEN + _call("Paris") + HERMES_CLOSE, "\n" + HERMES_OPEN + '{"name": "get_w'], "length")
    lines = [x[1] for x in log if x[0] == "line"]
    assert lines[0]["calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert lines[1]["content"] == "\n" + HERMES_OPEN + '{"name": "get_w' and not lines[1]["calls"]
    assert lines[-1]["done"]
