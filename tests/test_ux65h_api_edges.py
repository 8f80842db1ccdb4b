"""Edges a new user met on the HTTP API (helper ux65h), each through the official client, on one live server of a tiny
model whose context is 128 tokens:

- a path no route serves was a 404 saying only "Not Found": a client whose base URL is the host alone (no /v1),
  OpenAI's audio and images APIs, llama-swap's /logs, /upstream/MODEL/... and /ui. Now OpenAI's "Invalid URL
  (METHOD PATH)", still a 404 (as OpenAI's and vLLM's), with what is there instead: the /v1 route meant, that the
  server serves text models, what stands for llama-swap's route;
- Ollama's options.num_ctx was ignored: now the request runs in that context, as Ollama's runner does (a prompt past
  it cut as one past the model's context is, a conversation losing its oldest messages, the reply's room what the
  prompt leaves, all in the reply's counts); one past the model's context is capped at it;
- /api/pull of a model not served: a 404 saying that nothing is downloaded here, which the `ollama` client shows
  (stream or not) as it shows Ollama's own error line, with the status beside it (Ollama's streamed 200 gives -1).
"""

from __future__ import annotations

import io
import re

import httpx
import ollama
import openai
import pytest

from tests.ports import live_server_on, one_model_cfg

PORTS = range(29500, 29550)
CTX = 128
PROMPT = " ".join(f"word{i}" for i in range(40))


@pytest.fixture(scope="module")
def server(make_tiny, tmp_path_factory):
    cfg = one_model_cfg(make_tiny("qwen2"), CTX)
    with live_server_on(PORTS, cfg, tmp_path_factory.mktemp("ux65h")) as srv:
        yield srv


@pytest.fixture(scope="module")
def oc(server):
    return ollama.Client(host=server.url)


def ids_of(server, **body) -> list[int]:
    r = httpx.post(server.url + "/tokenize", json={"model": "tiny", **body})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def test_a_base_url_without_v1_is_told_the_route_it_meant(server):
    bare = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0)
    with pytest.raises(openai.NotFoundError) as ei:
        bare.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
    msg = ei.value.body["message"]
    assert msg.startswith("Invalid URL (POST /chat/completions): did you mean /v1/chat/completions?"), msg
    assert f"{server.url}/v1" in msg and ei.value.code == "not_found"
    with pytest.raises(openai.NotFoundError, match=r"did you mean /v1/models\?"):
        bare.models.list()


def test_audio_and_images_say_the_server_serves_text(server):
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="serves text models: it has no audio API"):
        oai.audio.speech.create(model="tiny", voice="alloy", input="Hi")
    with pytest.raises(openai.NotFoundError, match="serves text models: it has no images API"):
        oai.images.generate(model="tiny", prompt="a cat")


@pytest.mark.parametrize("path, says", [("/logs", "the dashboard at /dashboard"),
                                        ("/logs/stream", "its stderr"),
                                        ("/upstream/tiny/v1/models", "send the request to /v1/"),
                                        ("/ui", "tokenpool's is the dashboard at /dashboard"),
                                        ("/nothing", "OpenAI's API is under /v1, Ollama's under /api")])
def test_llama_swaps_routes_and_others_say_what_stands_for_them(server, path, says):
    r = httpx.get(server.url + path)
    assert r.status_code == 404, r.text
    err = r.json()["error"]
    assert err["message"].startswith(f"Invalid URL (GET {path}): ") and says in err["message"], err
    assert err["code"] == "not_found" and err["type"] == "invalid_request_error"


def test_a_method_a_route_does_not_take_names_the_one_it_does(server):
    r = httpx.get(server.url + "/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["message"] == \
        "GET /v1/chat/completions is not allowed: it takes POST", r.text


def test_num_ctx_cuts_a_generate_prompt_to_it(server, oc):
    """The prompt past num_ctx (but not past the model's context) is cut as one past the model's context is: its first
    num_keep tokens, then its last, the reply's room num_predict's; the counts are of the prompt as fed."""
    raw = ids_of(server, prompt=PROMPT)
    ctx = 48
    assert ctx < len(raw) < CTX
    r = oc.generate(model="tiny", prompt=PROMPT, raw=True, options={"num_ctx": ctx, "num_predict": 5, "temperature": 0})
    fed = ctx - 5
    assert r.prompt_eval_count == fed and r.context[:fed] == raw[:4] + raw[-(fed - 4):], r
    assert 0 < r.eval_count <= 5
    # no num_predict: the reply's room is what is left of num_ctx (the model's would leave 128 - fed)
    r = oc.generate(model="tiny", prompt=PROMPT, raw=True, options={"num_ctx": ctx, "temperature": 0, "top_k": 1,
                                                                     "num_keep": 0})
    half = ctx // 2
    assert r.prompt_eval_count == ctx - half and r.context[:ctx - half] == raw[-(ctx - half):], r
    assert r.prompt_eval_count + r.eval_count <= ctx
    # a prompt that fits: fed whole, the reply held to what it leaves
    short = ids_of(server, prompt="word1 word2")
    r = oc.generate(model="tiny", prompt="word1 word2", raw=True, options={"num_ctx": len(short) + 3,
                                                                           "num_predict": 50, "temperature": 0})
    assert r.prompt_eval_count == len(short) and r.eval_count <= 3, r
    assert r.done_reason == "length" or r.eval_count < 3
    bad = httpx.post(server.url + "/api/generate", json={"model": "tiny", "prompt": PROMPT, "raw": True, "stream": False,
                                                         "truncate": False, "options": {"num_ctx": ctx}}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"].startswith("The context is 48 tokens (options.num_ctx"), \
        bad.text  # (`truncate: false`, which the client does not send: the 400)


def test_num_ctx_past_the_models_context_is_capped_at_it(server, oc):
    long = " ".join(f"word{i}" for i in range(150))
    raw = ids_of(server, prompt=long)
    assert len(raw) > CTX
    for n in (CTX * 64, None):  # (as the model's context, none sent)
        r = oc.generate(model="tiny", prompt=long, raw=True, options={"num_ctx": n, "num_predict": 5})
        assert r.prompt_eval_count == CTX - 5, (n, r)


def test_num_ctx_drops_a_chats_oldest_messages(server, oc):
    """A conversation past num_ctx loses its oldest messages until it fits, the system message and the last kept, as
    one past the model's context; streamed, its last line counts the same."""
    ctx = 48
    system = {"role": "system", "content": "Be brief."}
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message number {i} is here"}
             for i in range(7)]
    assert len(ids_of(server, messages=[system, *turns])) < CTX  # (the model's context takes it whole)
    kept = 1
    while len(ids_of(server, messages=[system, *turns[-(kept + 1):]])) < ctx:
        kept += 1
    assert kept < len(turns)
    opts = {"num_ctx": ctx, "num_predict": 50, "temperature": 0}
    fed = len(ids_of(server, messages=[system, *turns[-kept:]]))
    r = oc.chat(model="tiny", messages=[system, *turns], options=opts)
    assert r.prompt_eval_count == fed and r.prompt_eval_count + r.eval_count <= ctx, (kept, r)
    last = list(oc.chat(model="tiny", messages=[system, *turns], options=opts, stream=True))[-1]
    assert last.done and last.prompt_eval_count == fed
    # its last message alone past num_ctx: its tokens cut, as a generate prompt's
    r = oc.chat(model="tiny", messages=[{"role": "user", "content": PROMPT}], options={**opts, "num_predict": 5})
    assert r.prompt_eval_count == ctx - 5, r
    bad = httpx.post(server.url + "/api/chat", json={"model": "tiny", "messages": [system, *turns], "stream": False,
                                                     "truncate": False, "options": opts}, timeout=60)
    assert bad.status_code == 400 and "(options.num_ctx" in bad.json()["error"], bad.text


@pytest.mark.parametrize("stream", [False, True])
def test_pull_of_a_model_not_served_is_shown_by_the_client(oc, stream):
    with pytest.raises(ollama.ResponseError) as ei:
        got = oc.pull("nope", stream=stream)
        if stream:
            list(got)
    assert ei.value.status_code == 404
    assert ei.value.error.startswith("model 'nope' is not served here, and this server downloads nothing"), ei.value
    assert [p.status for p in oc.pull("tiny", stream=True)] == ["success"] and oc.pull("tiny").status == "success"


def test_the_cli_still_names_a_url_the_server_has_no_route_for(server):
    """`tokenpool ls --url HOST/dashboard` (a path the server has no route for): the URL asked and the server's
    no-route answer, as before its 404 said more than "Not Found" (chat_cli.no_route reads it so)."""
    from typer.testing import CliRunner

    from controller.cli import app

    r = CliRunner().invoke(app, ["ls", "--url", server.url + "/dashboard"], env={"COLUMNS": "300"})
    assert r.exit_code == 1, r.output
    assert r.output.strip().startswith(f"tokenpool ls: {server.url}/dashboard/v1/models: HTTP 404: Invalid URL (GET "
                                       "/dashboard/v1/models)"), r.output


@pytest.mark.parametrize("verbose", [True, False])
def test_tokenpool_run_takes_set_parameter_num_ctx(server, capsys, verbose):
    """`/set parameter num_ctx N` in a `tokenpool run` conversation (refused before, the server ignoring num_ctx):
    the turns after it go over the server's Ollama API with options.num_ctx, as `ollama run` sends it; the counts
    --verbose shows are of the prompt as cut to it."""
    from controller.chat_cli import run
    from tests.http_stub import Terminal

    out = io.StringIO()
    typed = ("/set verbose\n" if verbose else "") + f"/set parameter num_ctx 24\n{PROMPT}\n/show parameters\n/bye\n"
    run(server.url, None, "tiny", None, None, {"max_tokens": 3, "temperature": 0}, Terminal(typed), out)
    assert "Set parameter 'num_ctx' to '24'" in out.getvalue() and "num_ctx         24" in out.getvalue()
    assert "error" not in out.getvalue(), out.getvalue()
    if verbose:
        assert re.search(r"^prompt eval count: +21 token\(s\)$", capsys.readouterr().err, re.M)
