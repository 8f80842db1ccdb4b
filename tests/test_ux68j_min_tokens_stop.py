"""vLLM's `min_tokens` with `stop` (helper ux68j): a stop string ending in the text of the first `min_tokens` tokens
is no stop, as vLLM's detokenizer looks for a stop only in the text each step adds once `min_tokens` are out. Here
the first look after them searched the held-back text too, found the early match and cut the reply to before it,
below what had been streamed already: SmolLM2 asked the capital of France with `stop=["France"]`, `min_tokens=5`
answered "The capital of Fran" (the characters sent before the cut), finish `stop`."""

from __future__ import annotations

import openai
import pytest

from tests.ports import live_server_on, one_model_cfg

PORTS = range(30600, 30650)
PROMPT = "The weather today is"
MIN = 6


@pytest.fixture(scope="module")
def client(make_varied, tmp_path_factory):
    cfg = one_model_cfg(make_varied("qwen2"), 128)
    with live_server_on(PORTS, cfg, tmp_path_factory.mktemp("ux68j_stop")) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)


def _complete(client, stream: bool, **kw) -> tuple[str, str | None]:
    args = dict(model="tiny", prompt=PROMPT, temperature=0, **kw)
    if not stream:
        choice = client.completions.create(**args).choices[0]
        return choice.text, choice.finish_reason
    text, finish = "", None
    for chunk in client.completions.create(stream=True, **args):
        for c in chunk.choices:
            text, finish = text + c.text, c.finish_reason or finish
    return text, finish


def test_a_stop_string_within_min_tokens_is_no_stop(client):
    early = _complete(client, False, max_tokens=MIN)[0]  # the first MIN tokens' text (greedy)
    full = _complete(client, False, max_tokens=24, extra_body={"ignore_eos": True})[0]
    stop = early.rstrip()[-3:]
    assert full.startswith(early) and len(stop) == 3 and stop.strip(), (early, full)
    # vLLM's: the first match that ends past the first MIN tokens' text, else none
    at = full.find(stop, len(early) - len(stop) + 1)
    want = (full, "length") if at < 0 else (full[:at], "stop")
    for stream in (False, True):
        got = _complete(client, stream, max_tokens=24, stop=[stop],
                        extra_body={"min_tokens": MIN, "ignore_eos": True})
        assert got == want, (stream, stop, early, full)
