"""The HTTP API as a user from vLLM or OpenAI meets it (helper ux67a), through the official client, on one live server
of a tiny model:

- OpenAI's deprecated `functions` and `function_call` (the `openai` client still sends them) were ignored unsaid: a
  request forcing `function_call={"name": "f"}` got plain text and no call. Now a 400 naming the field and saying
  to send `tools` and `tool_choice` (a `function` message was refused already).
"""

from __future__ import annotations

import openai
import pytest

from tests.ports import live_server_on

PORTS = range(29800, 29850)
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
FUNCTION = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


@pytest.fixture(scope="module")
def server(make_tiny, tmp_path_factory):
    cfg = {"workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "models": [{"name": "tiny", "path": str(make_tiny("qwen2")), "engine": {"max_num_seqs": 8,
                                                                                   "max_model_len": 128}}]}
    with live_server_on(PORTS, cfg, tmp_path_factory.mktemp("ux67a")) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


@pytest.mark.parametrize("legacy", [{"functions": [FUNCTION]},
                                    {"functions": [FUNCTION], "function_call": {"name": "get_weather"}},
                                    {"function_call": "auto"}],
                         ids=["functions", "forced", "function_call-alone"])
def test_deprecated_functions_are_refused_naming_the_field(client, legacy):
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="tiny", messages=ASK, max_tokens=4, **legacy)
    err = ei.value.body
    assert err["param"] == next(iter(legacy)), err
    assert "deprecated" in err["message"] and "send tools" in err["message"] and "tool_choice" in err["message"]
    assert ei.value.type == "invalid_request_error"


def test_the_same_request_with_tools_calls_the_function(client):
    """What the refusal says to send works: the call held to the function's schema."""
    r = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=40, temperature=0,
                                       tools=[{"type": "function", "function": FUNCTION}],
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and r.choices[0].finish_reason in ("stop", "length")
