"""A request's grammar is compiled off the event loop (in the tokenize pool, as templates and prompts are).

128 large tools took ~2.1 s to compile before their "schema too large" 400, on the event loop: /health and every
tenant's streams stopped meanwhile. (llguidance holds the GIL while it reads a whole schema, ~0.1-0.2 s of it for
these tools, and the request's body is parsed on the loop: it waits that long at most.)"""

from __future__ import annotations

import time

import openai
import pytest

from load_tests.live_server import LiveServer
from tests.health_poll import health_waits

PORT = 30651


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    cfg = {"workers": {"local": "cpu", "standby": False}, "models": [{"name": "tiny", "path": str(tiny_model)}]}
    with LiveServer(cfg, tmp_path_factory.mktemp("ux68k"), port=PORT) as srv:
        yield srv


def _tools(n: int, props: int) -> list[dict]:
    enum = [f"value-{k}" for k in range(20)]
    return [{"type": "function", "function": {"name": f"tool_{i}", "parameters": {
        "type": "object", "properties": {f"p{j}": {"type": "string", "enum": enum} for j in range(props)},
        "required": [f"p{j}" for j in range(props)]}}} for i in range(n)]


def test_health_answers_while_many_large_tools_are_compiled_and_refused(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    tools = _tools(128, 100)
    with health_waits(server.url) as waits:
        t0 = time.perf_counter()
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=1,
                                           tools=tools, tool_choice="required")
        took = time.perf_counter() - t0
    assert "too large" in str(e.value), e.value
    # (on the event loop, /health waited about as long as the refusal took: 1.2-1.4 s of 1.4-1.6 s; now what is
    # left on the loop, the body's parsing and llguidance's hold of the GIL, ~0.1-0.2 s each)
    assert len(waits) > 5 and max(waits) < took / 2, (took, max(waits), len(waits))
