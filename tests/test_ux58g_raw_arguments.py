"""A tool call's `arguments` are the text the model wrote, streamed or not, as OpenAI and vLLM give them: the
stream sent the model's JSON as written (CallStream), the unstreamed reply (ToolPlan.calls: chat completions, and the
Responses API's function_call items over it) the JSON re-written by json.dumps, so `"Caf\\u00e9"` came back as
`"Café"` and `1E5` as `100000.0`. The chat stream's and the unstreamed reply's own code over one scripted output,
for each of the grammar's layouts (hermes blocks for "auto", a list for "required", the bare object for a named
choice): the streamed arguments joined are the unstreamed ones, byte for byte, and are what the model wrote."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from controller.api import protocol as p
from controller.api.structured import HERMES_CLOSE, HERMES_OPEN, tool_plan
from tests.scripted_gen import bare_serving, generation, in_pieces

NO_THOUGHT = SimpleNamespace(tokenizer=None)  # (the model: its template does not think)

ARGS = '{"city": "Caf\\u00e9", "n": 1E5, "xs": [-0.0, 2e-3]}'  # (as the model wrote them: an escape, number forms)
ARGS_2 = '{"city": "\\"Z\\u00fcrich\\"", "n": 10}'
TOOLS = [p.Tool.model_validate({"type": "function", "function": {"name": n, "parameters": {"type": "object"}}})
         for n in ("get_weather", "put")]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
OUTPUTS = {  # (tool_choice, parser): the output, the arguments of its calls
    ("auto", "hermes"): (HERMES_OPEN + '{"name": "get_weather", "arguments": ' + ARGS + "}" + HERMES_CLOSE + "\n" +
                         HERMES_OPEN + '{"name": "put", "arguments": ' + ARGS_2 + "}" + HERMES_CLOSE, [ARGS, ARGS_2]),
    ("required", None): ('[{"name": "get_weather", "parameters": ' + ARGS + '}, {"name": "put", "parameters": ' +
                         ARGS_2 + "}]", [ARGS, ARGS_2]),
    ("named", None): (ARGS, [ARGS]),
}


def _chat(text: str, plan, stream: bool):
    serving = bare_serving()
    req = p.ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                  "stream": stream})

    async def run():
        if not stream:
            return await serving._collect_chat(generation([(text, True)]), req, "id", NO_THOUGHT, plan)
        return b"".join([b async for b in serving._stream_chat(generation(in_pieces(text, 2)), req, "id", NO_THOUGHT, plan)])

    return asyncio.run(run())


@pytest.mark.parametrize("choice,parser", list(OUTPUTS))
def test_streamed_and_unstreamed_arguments_are_the_models_text(choice, parser):
    text, want = OUTPUTS[(choice, parser)]
    plan = tool_plan(TOOLS, p.NamedToolChoice.model_validate(NAMED) if choice == "named" else choice, None, parser)
    reply = _chat(text, plan, stream=False)
    whole = [c.function.arguments for c in reply.choices[0].message.tool_calls]
    chunks = [json.loads(x[6:])["choices"][0] for x in _chat(text, plan, stream=True).decode().split("\n\n")
              if x.startswith("data: {")]
    parts = [tc for ch in chunks for tc in ch["delta"].get("tool_calls", [])]
    streamed = ["".join(tc["function"]["arguments"] for tc in parts if tc["index"] == k) for k in range(len(want))]
    assert streamed == whole == want, (streamed, whole)
    assert json.loads(whole[0]) == {"city": "Café", "n": 100000.0, "xs": [-0.0, 0.002]}  # (still JSON: Messages and
    # Ollama give them as this object)
    # an output cut short (Responses' and Messages' incomplete calls): the calls written whole, as the model wrote
    if choice != "named":
        whole_cut, _ = plan.cut_calls(text[:-3])
        assert [c["function"]["arguments"] for c in whole_cut] == want[:1]
