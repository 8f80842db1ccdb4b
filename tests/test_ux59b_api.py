"""Gaps found in review, checked on one live server (a tiny model, varied, with two aliases and the hermes tool-call
parser) as the official `openai` client and Anthropic-shaped requests over httpx meet it:

- /v1/models listed a model under its own name only: each alias is now its own card, as vLLM lists every
  `--served-model-name`, their `root` the model's name (vLLM's served names share their model's root).
"""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.ports import live_server_on

PORTS = range(25200, 25300)
AH = {"anthropic-version": "2023-06-01", "x-api-key": "x"}


@pytest.fixture(scope="module")
def server(make_varied, tmp_path_factory):
    cfg = {"workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "models": [{"name": "tiny", "path": str(make_varied("qwen2")), "aliases": ["nick", "nick-2"],
                       "tool_call_parser": "hermes", "engine": {"max_num_seqs": 8}}]}
    with live_server_on(PORTS, cfg, tmp_path_factory.mktemp("ux59b")) as srv:
        yield srv


def oai(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)


def test_models_lists_every_alias(server):
    """Each name a model is served under is a card of its own (the OpenAI list and Anthropic's Models API page),
    every one's `root` the model; GET /v1/models/{alias} answers under the alias with that root."""
    c = oai(server)
    cards = c.models.list().data
    assert [(m.id, m.model_extra.get("root"), m.model_extra.get("parent")) for m in cards] == [
        ("tiny", "tiny", None), ("nick", "tiny", None), ("nick-2", "tiny", None)]
    got = c.models.retrieve("nick-2")
    assert got.id == "nick-2" and got.model_extra["root"] == "tiny"
    page = httpx.get(server.url + "/v1/models", headers=AH, timeout=30).json()
    assert [m["id"] for m in page["data"]] == ["tiny", "nick", "nick-2"] and page["has_more"] is False
    r = c.completions.create(model="nick-2", prompt="Hi", max_tokens=1)  # (each listed name serves)
    assert r.model == "nick-2" and r.usage.completion_tokens == 1
