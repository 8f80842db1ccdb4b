"""Ollama's model lifecycle against one live single-user server, through the official `ollama` client: an empty
prompt (or no messages) is Ollama's load request, answered once the model is in memory (done_reason "load") and
listed by /api/ps at once; keep_alive 0 with it is the unload, and the model leaves /api/ps at once."""

from __future__ import annotations

import httpx
import pytest

from tests.ports import live_server_on

PORTS = range(25100, 25120)


@pytest.fixture(scope="module")
def server(make_tiny, tmp_path_factory):
    tiny = str(make_tiny("qwen2"))
    cfg = {"workers": {"local": "cpu", "standby": False, "heartbeat_s": 5.0},
           "models": [{"name": m, "path": tiny, "engine": {"max_num_seqs": 4, "max_model_len": 128}}
                      for m in ("ga", "ch", "gone")]}
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
    assert oc.generate(model="gone", prompt="").done_reason == "load"
    assert "gone:latest" in ps(server)
    assert oc.generate(model="gone", prompt="", keep_alive=0).done_reason == "unload"
    assert "gone:latest" not in ps(server)
    assert oc.generate(model="gone", prompt="").done_reason == "load"
    assert "gone:latest" in ps(server)
    r = oc.generate(model="gone", prompt="Hi", keep_alive=0, options={"num_predict": 2, "temperature": 0})
    assert r.done and r.eval_count >= 1
    assert "gone:latest" not in ps(server)
    r = oc.chat(model="gone", messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 1})
    assert r.done and "gone:latest" in ps(server)
