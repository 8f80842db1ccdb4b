"""Two gaps against current Ollama, seen as a new user comparing the two:

- `/api/chat`'s tool calls carried no `id`: Ollama gives each call one since 0.12.10 (its server's `toolCallId()`,
  `call_` and 8 lower-case letters or digits, set on every parsed call, streamed or not) and takes it back as a tool
  message's `tool_call_id`; a call sent back with its id had it replaced by a made-up `call_N`, and the tool
  message's `tool_call_id` was dropped;
- `details.format` said `safetensors` for a model converted from a GGUF file, whose `quantization_level` is the
  GGUF's own type (`Q4_1`): Ollama lists that file as `gguf`, and a `safetensors`/`Q4_1` pair names no file anywhere.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from types import SimpleNamespace

from controller.api import protocol as p
from controller.api.ollama import Message, _calls, _details, _message, _stream
from controller.api.serving import OpenAIServing
from controller.api.structured import HERMES_CLOSE, HERMES_OPEN, ToolPlan, tool_plan
from controller.messages import Delta
from controller.real_model import MARKER

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ID = re.compile(r"call_[a-z0-9]{8}")


def _call(city: str) -> str:
    return HERMES_OPEN + "\n" + json.dumps({"name": "get_weather", "arguments": {"city": city}}) + "\n" + HERMES_CLOSE


def test_a_reply_s_calls_carry_ollama_s_ids():
    """Unstreamed: each call has an id as Ollama's (`call_` + 8 of [a-z0-9]), a different one per call."""
    plan = tool_plan([p.Tool.model_validate(WEATHER)], None, None, "hermes")
    calls = _calls(OpenAIServing, _call("Paris") + _call("Rome"), "stop", plan)
    assert [c["function"]["arguments"] for c in calls] == [{"city": "Paris"}, {"city": "Rome"}]
    assert all(ID.fullmatch(c.get("id", "")) for c in calls), calls
    assert len({c["id"] for c in calls}) == 2


class _Gen:
    def __init__(self, pieces: list[str]):
        self.pieces = pieces

    async def events(self):
        for i, text in enumerate(self.pieces):
            last = i == len(self.pieces) - 1
            yield 0, Delta("r", text=text, token_ids=[1], finished=last, finish_reason="stop" if last else None)

    def close(self, status: int) -> None:
        pass


class _Serving:
    active: set = set()


def test_streamed_calls_carry_ids():
    """Streamed: each call's line (one call each, as soon as it is whole) carries its id."""
    got: list = []

    def line(text: str, done: bool = False, reason: str | None = None, calls: list | None = None,
             thought: str = "", logprobs: list | None = None) -> bytes:
        return json.dumps({"calls": calls or []}).encode()

    async def read():
        async for b in _stream(_Serving(), _Gen([_call("Paris"), _call("Rome")]), line,
                               ToolPlan("", None, [], hermes=True)):
            got.extend(json.loads(b)["calls"])

    asyncio.run(read())
    assert [c["function"]["arguments"]["city"] for c in got] == ["Paris", "Rome"]
    assert all(ID.fullmatch(c.get("id", "")) for c in got), got
    assert len({c["id"] for c in got}) == 2


def test_a_call_sent_back_keeps_its_id_and_the_tool_message_its_call_id():
    """A conversation sent back as Ollama's clients send it (the assistant's call with the id it came with, the tool
    message's `tool_call_id`): the chat request the route makes keeps both (templates that write ids see them); a call
    sent without an id still gets one."""
    asst = _message(Message.model_validate({"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_ab12cd34", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]}))
    assert [c["id"] for c in asst["tool_calls"]] == ["call_ab12cd34", "call_1"]
    tool = _message(Message.model_validate({"role": "tool", "content": "sunny", "tool_name": "get_weather",
                                            "tool_call_id": "call_ab12cd34"}))
    assert tool == {"role": "tool", "content": "sunny", "name": "get_weather", "tool_call_id": "call_ab12cd34"}


def _me(folder: Path) -> SimpleNamespace:
    return SimpleNamespace(architecture="llama", spec=SimpleNamespace(path=str(folder)))


def test_format_is_gguf_for_a_model_converted_from_one(tmp_path):
    """A folder with the conversion's marker: `gguf` beside its GGUF type; a plain folder: `safetensors`."""
    conv, plain = tmp_path / "conv", tmp_path / "plain"
    conv.mkdir()
    plain.mkdir()
    (conv / MARKER).write_text(json.dumps({"source": "x.gguf", "file_type": "Q4_1"}))
    d = _details(_me(conv))
    assert (d["format"], d["quantization_level"]) == ("gguf", "Q4_1")
    assert _details(_me(plain))["format"] == "safetensors"
