"""Found by pointing clients at tokenpool, against one live server of a tiny model (no authentication, as
`tokenpool serve DIR`):

- `/api/tags` (and `/api/ps`) listed `tiny` where Ollama lists `tiny:latest`: LangChain's ChatOllama
  (`validate_model_on_init`, langchain_ollama's `validate_model`: a listed `model` equal to the name, or beginning
  `NAME:`) refused `model="tiny:latest"`; now each model is listed as Ollama names it (a name with its own tag, as
  `qwen:7b`, keeps it), so `tiny` and `tiny:latest` both validate; `/v1/models` keeps the served names, and
  `tokenpool ls` still finds each model's size;
- a Responses `function_call_output` whose call_id no `function_call` has (in the input or the
  previous_response_id chain) was taken: now OpenAI's 400, naming `input[N].call_id`;
- `tokenpool suite corpus --url` of a server without authentication counted its "no key" and "wrong key" cases as
  failures (and skipped every case that needs a key when none was given): now those are reported skipped (auth off)
  and the others run without a key; a suite part's "cannot reach URL" line begins `tokenpool suite PART:`, as
  `bench serve`'s does.
"""

from __future__ import annotations

import socket

import httpx
import ollama
import pytest
from typer.testing import CliRunner

from tests import ports


@pytest.fixture(scope="module")
def server(make_tiny, tmp_path_factory):
    work = tmp_path_factory.mktemp("ux57i")
    cfg = {"workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "models": [{"name": "tiny", "path": str(make_tiny("qwen2")), "engine": {"max_num_seqs": 8}},
                      {"name": "qwen:7b", "path": str(make_tiny("qwen2")), "engine": {"max_num_seqs": 8}}]}
    with ports.live_server_on(range(19050, 19100), cfg, work) as srv:
        yield srv


def _langchain_validates(client: ollama.Client, name: str) -> bool:
    """langchain_ollama's validate_model (ChatOllama's validate_model_on_init), as it reads the client's list."""
    names = [m["model"] for m in client.list()["models"]]
    return any(name == m or m.startswith(f"{name}:") for m in names)


def test_tags_name_models_as_ollama_does(server):
    c = ollama.Client(host=server.url, timeout=30)
    listed = c.list().models
    assert sorted(m.model for m in listed) == ["qwen:7b", "tiny:latest"]
    raw = httpx.get(server.url + "/api/tags").json()["models"]
    assert sorted(m["name"] for m in raw) == ["qwen:7b", "tiny:latest"] and all(m["name"] == m["model"] for m in raw)
    for name in ("tiny", "tiny:latest", "qwen:7b", "qwen"):
        assert _langchain_validates(c, name), name
    assert not _langchain_validates(c, "tin")
    # the OpenAI list keeps the served names; the Ollama routes take either
    assert sorted(m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]) == ["qwen:7b", "tiny"]
    for name in ("tiny", "tiny:latest", "qwen:7b"):
        r = c.generate(model=name, prompt="hi", options={"num_predict": 1})
        assert r.model == name and r.done


def test_ps_names_models_as_tags_does(server):
    c = ollama.Client(host=server.url, timeout=30)
    c.generate(model="tiny", prompt="hi", options={"num_predict": 1})
    import time
    deadline = time.monotonic() + 0.8
    while "tiny:latest" not in (got := {m.model for m in c.ps().models}) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "tiny:latest" in got and "tiny" not in got


def test_ls_still_sizes_each_model(server):
    from controller.cli import app

    r = CliRunner().invoke(app, ["ls", "--url", server.url], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    rows = {line.split()[0]: line for line in r.output.splitlines()[1:] if line.strip()}
    assert set(rows) == {"tiny", "qwen:7b"} and all(" - " not in f" {v} " for v in rows.values()), r.output


def _responses(server, **body):
    return httpx.post(server.url + "/v1/responses", json={"model": "tiny", "max_output_tokens": 1, **body}, timeout=30)


def test_a_function_call_output_without_its_call_is_a_400(server):
    call = {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"}
    r = _responses(server, input=[{"role": "user", "content": "x"}, call,
                                  {"type": "function_call_output", "call_id": "call_2", "output": "done"}])
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "input[2].call_id" and "call_2" in err["message"] \
        and "no tool call found for function call output" in err["message"], err
    ok = _responses(server, input=[{"role": "user", "content": "x"}, call,
                                   {"type": "function_call_output", "call_id": "call_1", "output": "done"}])
    assert ok.status_code == 200, ok.text


def test_a_call_in_the_previous_responses_chain_answers():
    """A call the stored conversation made (the previous response's) is one the output may answer."""
    from controller.api import protocol as p
    from controller.api.responses import chat_request
    from controller.api.serving import ServingError

    history = [{"role": "user", "content": "x"},
               {"role": "assistant", "content": None,
                "tool_calls": [{"id": "call_9", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]
    out = [{"type": "function_call_output", "call_id": "call_9", "output": "done"}]
    chat, conversation = chat_request(p.ResponsesRequest(model="m", input=out), history)
    assert conversation[-1] == {"role": "tool", "tool_call_id": "call_9", "content": "done"}
    with pytest.raises(ServingError) as e:
        chat_request(p.ResponsesRequest(model="m", input=out), history[:1])
    assert e.value.status == 400 and e.value.param == "input[0].call_id"


def test_suite_corpus_of_a_server_without_auth_skips_the_key_cases(server):
    from load_tests.faults import Target, run_corpus

    got = run_corpus(Target(server.url, None, None, "tiny", None))
    skipped = {s["case"]: s["skipped"] for s in got.get("skipped", [])}
    assert skipped == {"no key": "auth off", "wrong key": "auth off", "not json, no key": "auth off",
                       "metrics without token": "auth off"}, got  # (/metrics: open on loopback without auth)
    ran = {r["case"]: r for r in got["results"]}
    assert not set(skipped) & set(ran)
    assert ran["ok completion"]["ok"] and ran["missing model"]["ok"] and ran["not json"]["ok"], ran


def test_suite_cannot_reach_is_said_with_the_command():
    from controller.cli import app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    r = CliRunner().invoke(app, ["suite", "corpus", "--url", f"127.0.0.1:{closed}"])
    assert r.exit_code == 1 and str(r.exception).startswith(
        f"tokenpool suite corpus: cannot reach http://127.0.0.1:{closed}: "), (r.exception, r.output)
