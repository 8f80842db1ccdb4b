"""Ollama's load timing and /api/ps, as a user of real Ollama (and its official `ollama` client) expects, against one
live server of tiny models whose worker reports its pool only every 2 s (a heartbeat long enough to see a lag):

- `load_duration` was always 0, the wait for the model's load counted in `prompt_eval_duration`: now the time the
  request waited for its model to be registered on its engine and its weights brought into VRAM (the engine says
  how long it waited, on the request's first delta), as Ollama's is its wait for a runner; total_duration stays
  load + prompt_eval + eval (chat and generate, streamed and not, and /api/embed);
- `/api/ps` missed a model just loaded until the worker's next Stats (a heartbeat): a model whose engine made a
  token is resident there at once.
"""

from __future__ import annotations

import ollama
import pytest

from tests import ports


@pytest.fixture(scope="module")
def server(make_tiny, tmp_path_factory):
    work = tmp_path_factory.mktemp("ux58a_load")
    tiny = str(make_tiny("qwen2"))
    cfg = {"workers": {"local": "cpu", "standby": False, "heartbeat_s": 2.0, "dead_after_s": 30},
           "models": [{"name": n, "path": tiny, "engine": {"max_num_seqs": 4}} for n in ("a", "b", "c", "d", "e")]}
    with ports.live_server_on(range(24130, 24160), cfg, work) as srv:
        yield srv


def oc(srv) -> ollama.Client:
    return ollama.Client(host=srv.url, timeout=60)


def _consistent(r) -> None:
    assert r.total_duration >= r.load_duration + r.prompt_eval_duration + r.eval_duration - 1000, r
    assert r.prompt_eval_duration >= 0 and r.eval_duration > 0


def _chat(c, model, stream):
    kw = dict(model=model, messages=[{"role": "user", "content": "hi"}], options={"num_predict": 2})
    return list(c.chat(stream=True, **kw))[-1] if stream else c.chat(**kw)


def _generate(c, model, stream):
    kw = dict(model=model, prompt="hi", options={"num_predict": 2})
    return list(c.generate(stream=True, **kw))[-1] if stream else c.generate(**kw)


@pytest.mark.parametrize("model, call, stream", [("a", _chat, False), ("b", _chat, True),
                                                 ("c", _generate, False), ("d", _generate, True)])
def test_load_duration_is_the_wait_for_the_models_load(server, model, call, stream):
    """A model's first request waits for its weights to come into VRAM: load_duration > 0; the next finds them
    there: 0. total = load + prompt_eval + eval."""
    c = oc(server)
    first = call(c, model, stream)
    assert first.done and first.load_duration > 0, first
    _consistent(first)
    again = call(c, model, stream)
    assert again.load_duration == 0, again
    _consistent(again)


def test_ps_shows_a_model_as_soon_as_it_is_loaded(server):
    """Right after a model's first reply, before the worker's next Stats (2 s away at most): listed by ps."""
    c = oc(server)
    assert "e:latest" not in {m.model for m in c.ps().models}
    r = c.embed(model="e", input="hi")
    assert r.load_duration > 0 and r.total_duration >= r.load_duration
    assert "e:latest" in {m.model for m in c.ps().models}
    c.generate(model="a", prompt="hi", options={"num_predict": 1})
    assert {"a:latest", "e:latest"} <= {m.model for m in c.ps().models}
