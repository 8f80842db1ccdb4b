"""The sampling a model's generation_config.json recommends is what a request that leaves those fields out gets, as
vLLM serves by default (`--generation-config auto`); a request's own fields override it."""

from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import ollama
import openai
import pytest

from controller.api import serving
from controller.api.serving import generation_defaults
from load_tests.live_server import LiveServer


@pytest.fixture(scope="module")
def server(make_varied, tmp_path_factory):
    work = tmp_path_factory.mktemp("genconfig")
    greedy = work / "greedy"
    shutil.copytree(make_varied("qwen2"), greedy)
    cfg_file = greedy / "generation_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "top_k": 1, "top_p": 0.9}))  # (greedy)
    cfg = {"workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "models": [{"name": "plain", "path": str(make_varied("qwen2")), "engine": {"max_num_seqs": 8}},
                      {"name": "greedy", "path": str(greedy), "engine": {"max_num_seqs": 8}}]}
    with LiveServer(cfg, work) as srv:
        yield srv


def test_a_request_without_sampling_fields_takes_the_models_generation_config(server):
    """`greedy`'s generation_config says top_k 1: sampled at temperature 1 with any seed its replies are the greedy
    one, on the chat, completions and Ollama routes; `top_k` sent overrides it (the replies vary again), as they do
    for the same weights without the recommendation."""
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    msgs = [{"role": "user", "content": "Tell me a story"}]
    want = c.chat.completions.create(model="plain", messages=msgs, max_tokens=8, temperature=0).choices[0].message.content

    def replies(model: str, **kw) -> set[str]:
        return {c.chat.completions.create(model=model, messages=msgs, max_tokens=8, seed=seed, **kw)
                .choices[0].message.content for seed in range(4)}

    assert replies("greedy") == {want}
    assert replies("greedy", extra_body={"top_k": -1}) - {want}
    assert replies("plain") - {want}
    prompt = "Once upon a time"
    first = c.completions.create(model="plain", prompt=prompt, max_tokens=8, temperature=0).choices[0].text
    assert {c.completions.create(model="greedy", prompt=prompt, max_tokens=8, seed=s).choices[0].text
            for s in range(3)} == {first}


def test_a_response_echoes_the_sampling_it_ran_with(server):
    """The Responses API's Response says the top_p it ran with: the model's recommendation when none was sent."""
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    got = {m: c.responses.create(model=m, input="Hi", max_output_tokens=2, store=False) for m in ("greedy", "plain")}
    assert (got["greedy"].top_p, got["plain"].top_p, got["greedy"].temperature) == (0.9, 1.0, 1.0)
    assert c.responses.create(model="greedy", input="Hi", max_output_tokens=2, top_p=0.5).top_p == 0.5


def test_which_generation_config_values_are_taken(tmp_path, monkeypatch):
    """As vLLM reads the file (its difference from transformers' defaults): a value equal to transformers' default,
    out of range, or no number is not taken; the file is read again once it changes, seen within
    GENERATION_CONFIG_RECHECK_S (it is not stat'ed on every request: a blocking syscall on the event loop, slow on a
    network volume); no file, no defaults."""
    now = [1000.0]
    monkeypatch.setattr(serving, "_clock", lambda: now[0])
    me = SimpleNamespace(spec=SimpleNamespace(path=str(tmp_path)))
    assert generation_defaults(me) == {}
    f = tmp_path / "generation_config.json"
    f.write_text(json.dumps({"temperature": 1.0, "top_k": 50, "top_p": 0.8, "min_p": 0.05, "repetition_penalty": 9,
                             "do_sample": True, "eos_token_id": 2}))
    assert generation_defaults(me) == {}  # (within the window: not stat'ed again)
    now[0] += serving.GENERATION_CONFIG_RECHECK_S
    assert generation_defaults(me) == {"top_p": 0.8, "min_p": 0.05}
    f.write_text(json.dumps({"temperature": 0.7, "top_k": 20, "top_p": "high", "repetition_penalty": 1.05}))
    os.utime(f, ns=(os.stat(f).st_atime_ns, os.stat(f).st_mtime_ns + 10**9))
    now[0] += serving.GENERATION_CONFIG_RECHECK_S - 0.5
    assert generation_defaults(me) == {"top_p": 0.8, "min_p": 0.05}
    now[0] += 0.5
    assert generation_defaults(me) == {"temperature": 0.7, "top_k": 20, "repetition_penalty": 1.05}
    f.write_text("not json")
    os.utime(f, ns=(os.stat(f).st_atime_ns, os.stat(f).st_mtime_ns + 2 * 10**9))
    now[0] += serving.GENERATION_CONFIG_RECHECK_S
    assert generation_defaults(me) == {}


def test_ollamas_show_lists_the_models_parameters(server):
    """Ollama's `show` lists the sampling defaults as a Modelfile's parameters (name, value; one a line), which the
    `ollama` client returns as they are; none for a model without them (its stop tokens and num_ctx, which every
    model has, aside: test_ux59a_ollama_load)."""
    c = ollama.Client(host=server.url, timeout=60)
    sampling = lambda name: {k: v for k, v in (line.split() for line in c.show(name).parameters.splitlines())  # noqa: E731
                             if k not in ("stop", "num_ctx")}
    assert sampling("greedy") == {"top_k": "1", "top_p": "0.9"}
    assert sampling("plain") == {}
