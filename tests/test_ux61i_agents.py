"""Agentic clients pointed at tokenpool (helper ux61i): the official `anthropic` client on /v1/messages as Claude
Code drives it, and the official `openai` client's Responses API as Codex CLI drives it, on one live server of the
real SmolLM2 (greedy, so each reply is known):

- a request whose prompt and max_tokens together pass the context was refused in vLLM's words ("This model's
  maximum context length is ... However, you requested ..."), which Claude Code cannot read: it sends max_tokens
  32000 and, from Anthropic's own words ("input length and `max_tokens` exceed context limit: I + M > C"), retries
  with a max_tokens that fits; a prompt past the context alone is Anthropic's "prompt is too long: N tokens > M
  maximum", which it takes as the conversation to compact. Streamed or not.
"""

from __future__ import annotations

import re

import anthropic
import pytest

from tests.ports import live_server_on

PORTS = range(27050, 27100)
HI = [{"role": "user", "content": "Say hi"}]
# Claude Code's reading of Anthropic's refusals (the numbers it retries or compacts with)
OVER = re.compile(r"input length and `max_tokens` exceed context limit: (\d+) \+ (\d+) > (\d+)")
TOO_LONG = re.compile(r"prompt is too long: (\d+) tokens > (\d+) maximum")


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    cfg = {"workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "models": [{"name": "smol", "path": str(smollm2), "engine": {"max_num_seqs": 8}}]}
    with live_server_on(PORTS, cfg, tmp_path_factory.mktemp("ux61i")) as srv:
        yield srv


@pytest.fixture(scope="module")
def claude(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0, timeout=120)


def _send(claude: anthropic.Anthropic, stream: bool, **kw):
    """The Message of a greedy request, streamed (the client's stream helper, as Claude Code reads one) or not."""
    kw = {"model": "smol", "extra_body": {"temperature": 0}, **kw}
    if not stream:
        return claude.messages.create(**kw)
    with claude.messages.stream(**kw) as s:
        return s.get_final_message()


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_past_the_context_is_refused_in_anthropics_words(claude, stream):
    """Claude Code's 32000 max_tokens against an 8K model: the 400 says input + max_tokens > limit as Anthropic's
    does, and the max_tokens it retries with (the limit less the input, less a margin) is answered."""
    with pytest.raises(anthropic.BadRequestError) as ei:
        _send(claude, stream, max_tokens=32000, messages=HI)
    err = ei.value.body["error"]
    assert err["type"] == "invalid_request_error", err
    m = OVER.search(err["message"])
    assert m is not None, err["message"]
    prompt, asked, limit = map(int, m.groups())
    assert asked == 32000 and limit == 8192
    assert prompt == claude.messages.count_tokens(model="smol", messages=HI).input_tokens
    got = _send(claude, stream, max_tokens=limit - prompt - 1000, messages=HI)
    assert got.stop_reason == "end_turn" and got.content[0].text


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_past_the_context_is_too_long_in_anthropics_words(claude, stream):
    long = [{"role": "user", "content": "word " * 9000}]
    n = claude.messages.count_tokens(model="smol", messages=long).input_tokens
    with pytest.raises(anthropic.BadRequestError) as ei:
        _send(claude, stream, max_tokens=10, messages=long)
    m = TOO_LONG.search(ei.value.body["error"]["message"])
    assert m is not None, ei.value.body
    assert int(m.group(1)) == n and int(m.group(2)) == 8191  # (a token's room at least is left for the reply)
