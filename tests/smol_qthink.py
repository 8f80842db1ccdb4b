"""The API tests' live server (tests/test_ux62c_api_gaps.py, tests/test_ux63e_api.py; each had its copy): one
`tokenpool serve` of the real SmolLM2 as `smol` (its own template) and as `qthink` (test_ux61i_agents' Qwen3-style
thinking template), both reading hermes tool calls, and the official clients on it. A test module imports the
fixtures (`from tests.smol_qthink import claude, oai, server`) and sets PORTS, the range its server keeps to: one
server a module, as before."""

from __future__ import annotations

import anthropic
import openai
import pytest

from tests.ports import live_server_on
from tests.test_ux61i_agents import THINKING_TEMPLATE, templated
from tests.ux66c_at_once import BURSTS


@pytest.fixture(scope="module")
def server(request, smollm2, tmp_path_factory):
    work = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    qthink = templated(smollm2, work / "qthink", THINKING_TEMPLATE)  # (test_ux61i_agents' server's)
    cfg = {"workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25}, **BURSTS,
           "models": [{"name": m, "path": str(path), "tool_call_parser": "hermes", "engine": {"max_num_seqs": 8}}
                      for m, path in (("smol", smollm2), ("qthink", qthink))]}
    with live_server_on(request.module.PORTS, cfg, work) as srv:
        yield srv


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def claude(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0, timeout=120)
