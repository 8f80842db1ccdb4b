"""Ollama's model lifecycle against one live single-user server, through the official `ollama` client: an empty
prompt (or no messages) is Ollama's load request, answered once the model is in memory (done_reason "load") and
listed by /api/ps at once; keep_alive 0 with it is the unload, and the model leaves /api/ps at once."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.ports import live_server_on

PORTS = range(25100, 25120)


@pytest.fixture(scope="module")
def server(make_tiny, tmp_path_factory):
    tiny = str(make_tiny("qwen2"))
    # dead_after_s past the 5 s beat: at its 3 s default the worker was declared dead (and killed) 3 s after each
    # registration, again and again (~15 s of the setup) until one lived through its warm-up
    cfg = {"workers": {"local": "cpu", "standby": False, "heartbeat_s": 5.0, "dead_after_s": 30},
           "models": [{"name": m, "path": tiny, "engine": {"max_num_seqs": 4, "max_model_len": 128}}
                      for m in ("ga", "ch")]}
    with live_server_on(PORTS, cfg, tmp_path_factory.mktemp("ux59a_load")) as srv:
        yield srv


def ps(server) -> list[str]:
    r = httpx.get(server.url + "/api/ps", timeout=30)
    assert r.status_code == 200, r.text
    return [m["name"] for m in r.json()["models"]]


def test_an_empty_prompt_or_no_messages_loads_the_model(server):
    """/api/generate with no prompt and /api/chat with no messages bring the model's weights in before they answer
    "load" (they answered at once and loaded nothing): /api/ps lists it as soon as the answer comes (the heartbeat
    here is 5 s: no Stats brings it meanwhile)."""
    import ollama

    oc = ollama.Client(host=server.url)
    assert ps(server) == []
    r = oc.generate(model="ga", prompt="")
    assert r.done_reason == "load" and r.done and r.response == ""
    assert ps(server) == ["ga:latest"]
    c = oc.chat(model="ch:latest", messages=[])
    assert c.done_reason == "load" and c.message.content == "" and c.message.role == "assistant"
    assert sorted(ps(server)) == ["ch:latest", "ga:latest"]
    # (streamed, as the client sends it by default: one object, as Ollama's)
    assert [x.done_reason for x in oc.generate(model="ga", prompt="", stream=True)] == ["load"]
    with pytest.raises(ollama.ResponseError) as ei:
        oc.generate(model="nope", prompt="")
    assert ei.value.status_code == 404


def test_an_unloaded_model_leaves_ps_at_once(server):
    """keep_alive 0 (`ollama stop`: a load request with it) frees the model's weights, and /api/ps drops it as the
    answer comes, not a heartbeat later; on a request that generates, as its reply ends (the evict waits for it).
    The model is loaded again by the next request and listed again."""
    import ollama

    oc = ollama.Client(host=server.url)
    assert oc.generate(model="ga", prompt="").done_reason == "load"
    assert "ga:latest" in ps(server)
    assert oc.generate(model="ga", prompt="", keep_alive=0).done_reason == "unload"
    assert "ga:latest" not in ps(server)
    assert oc.generate(model="ga", prompt="").done_reason == "load"
    assert "ga:latest" in ps(server)
    r = oc.generate(model="ga", prompt="Hi", keep_alive=0, options={"num_predict": 2, "temperature": 0})
    assert r.done and r.eval_count >= 1
    assert "ga:latest" not in ps(server)
    r = oc.chat(model="ga", messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 1})
    assert r.done and "ga:latest" in ps(server)


def test_show_gives_a_modelfile_and_the_parameters_the_server_uses(server, make_tiny):
    """Ollama's show: `parameters` lists the tokens generation stops at (`stop`, one line each, Go-quoted, from the
    generation_config's eos_token_id as the engine reads it) and the context the model runs with (`num_ctx`) for a
    model whose generation_config has no sampling values (it was empty); `modelfile` is one (it was empty): FROM
    the model's folder (a single user's server), its TEMPLATE, a PARAMETER line for each parameter."""
    import ollama
    from transformers import AutoTokenizer

    folder = make_tiny("qwen2")
    eos = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    tok = AutoTokenizer.from_pretrained(folder)
    stops = [tok.decode([i], skip_special_tokens=False) for i in (eos if isinstance(eos, list) else [eos])]
    assert stops and all(stops)
    got = ollama.Client(host=server.url).show("ga:latest")
    assert got.parameters.splitlines() == [*(f"{'stop':<30} {json.dumps(t)}" for t in stops), f"{'num_ctx':<30} 128"]
    lines = got.modelfile.splitlines()
    assert f"FROM {folder}" in lines and "# FROM ga:latest" in lines
    assert f"TEMPLATE {got.template}" in lines and "{%" in got.template  # (one line: no quotes needed)
    assert [x for x in lines if x.startswith("PARAMETER ")] == [*(f"PARAMETER stop {t}" for t in stops),
                                                                 "PARAMETER num_ctx 128"]
