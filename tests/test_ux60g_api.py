"""Found by using the server through the official clients (helper ux60g), on one live server of a tiny model:

- Ollama's `format` with a JSON schema the grammar cannot use was a 400 naming `response_format` (the OpenAI field
  it is translated to, which the client never sent): now it names `format`, /api/chat (with `tools` beside it, or
  not) and /api/generate, streamed or not.
"""

from __future__ import annotations

import ollama
import pytest

from tests.ports import live_server_on

PORTS = range(26040, 26060)
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
HI = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def server(make_tiny, tmp_path_factory):
    work = tmp_path_factory.mktemp("ux60g_api")
    cfg = {"workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "models": [{"name": "tiny", "path": str(make_tiny("qwen2")), "tool_call_parser": "hermes",
                       "engine": {"max_num_seqs": 8}}]}
    with live_server_on(PORTS, cfg, work) as srv:
        yield srv


def test_ollama_format_errors_name_format(server):
    c = ollama.Client(host=server.url, timeout=60)
    bogus = {"type": "bogus"}
    calls = [lambda: c.chat(model="tiny", messages=HI, format=bogus),
             lambda: c.chat(model="tiny", messages=HI, format=bogus, tools=TOOLS),
             lambda: list(c.chat(model="tiny", messages=HI, format=bogus, tools=TOOLS, stream=True)),
             lambda: c.generate(model="tiny", prompt="Hello there", format=bogus),
             lambda: list(c.generate(model="tiny", prompt="Hello there", format=bogus, stream=True))]
    for call in calls:
        with pytest.raises(ollama.ResponseError) as ei:
            call()
        assert ei.value.status_code == 400, ei.value
        assert ei.value.error.startswith("format: the schema cannot be used"), ei.value.error
        assert "response_format" not in ei.value.error
    # (a schema that compiles: the reply is JSON of it)
    r = c.chat(model="tiny", messages=HI, format={"type": "object", "properties": {"a": {"type": "integer"}},
                                                   "required": ["a"]}, options={"num_predict": 40, "temperature": 0})
    assert r.message.content.startswith('{"a": ')
