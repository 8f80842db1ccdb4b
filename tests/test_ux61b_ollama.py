"""Ollama's load request in the metrics, and structured output beside tools on the Ollama and Responses routes, as a
user of the official `ollama` and `openai` clients (and of Ollama's API) meets them on one live server (a tiny
random-weights model, varied, with the hermes tool-call parser):

- an Ollama load (`/api/generate` or `/api/chat` with nothing to generate: the model's weights brought in) that
  succeeded was counted in `tokenpool_requests_total`, so in the dashboard's Tenants requests/s, though it served
  nobody (a client that warms each model before use doubled its rate): it is counted in
  `tokenpool_load_requests_total{model,tenant,status}` now, and among the requests only when it failed;
- tools (tool_choice auto) beside a structured output compiled the calls' grammar twice per request (the plan's
  own, text or calls, then the one used, calls or JSON of the schema: `ToolPlan.answering`): once now;
- the combined grammar (a valid call or JSON of the schema, whichever the model takes) was tested on the chat and
  Messages routes (tests/test_ux60e_structured_tools.py), not on Ollama's `/api/chat` (`tools` with `format`) nor
  on `/v1/responses` (`tools` with `text.format`): both checked here, streamed and not.
"""

from __future__ import annotations

import json
import shutil

import httpx
import jsonschema
import ollama
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller.keys import hash_key
from tests.ports import live_server_on
from tests.test_ux60e_structured_tools import OAI_TOOLS, SCHEMA, SCHEMAS

PORTS = range(26300, 26400)
ADMIN = "admin-ux61b-ollama"

# (the schemas and tools of the chat and Messages routes' tests of the combined grammar)
RESP_TOOLS = [{"type": "function", "name": n, "description": n.replace("_", " "), "parameters": s, "strict": True}
              for n, s in SCHEMAS.items()]
ANON = "anonymous"  # (the tenant everyone is on a server without auth)
PROMPTS = [f"Question {k}: {w}" for k, w in enumerate(
    ["weather in Paris?", "add two numbers", "what is it?", "tell me", "hello", "sum 3 and 4", "rain?", "name one",
     "go", "help", "why?", "list"])]


@pytest.fixture(scope="module")
def server(make_varied, tmp_path_factory):
    cfg = {"admin_token_hash": hash_key(ADMIN), "workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "models": [{"name": "tiny", "path": str(make_varied("qwen2")), "tool_call_parser": "hermes",
                       "engine": {"max_num_seqs": 8}}]}
    with live_server_on(PORTS, cfg, tmp_path_factory.mktemp("ux61b")) as srv:
        yield srv


def _call_ok(name: str, args: dict) -> None:
    assert name in SCHEMAS, name
    jsonschema.validate(args, SCHEMAS[name])


# --- the load request in the metrics ---

def oc(srv) -> ollama.Client:
    return ollama.Client(host=srv.url, timeout=120)


def _samples(srv, name: str, labels: tuple[str, ...] = ("model", "tenant", "status")) -> dict[tuple[str, ...], float]:
    """`name`'s samples in /metrics, read with prometheus_client's own parser: the values of its `labels` -> value."""
    text = httpx.get(srv.url + "/metrics", timeout=30).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                out[tuple(s.labels[k] for k in labels)] = s.value
    return out


def _grew(before: dict, after: dict) -> dict:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


def test_a_load_is_counted_as_a_load_not_a_served_request(server, make_tiny, tmp_path):
    """An Ollama load (the `ollama` client's generate() and chat() with nothing to ask) that loaded the model is not
    in tokenpool_requests_total (nor the dashboard's requests/s, its rate): it is in tokenpool_load_requests_total
    with status 200. One whose model cannot be loaded (its weights unreadable) is a 503 counted in both: a failure
    a client met. A request that generates is counted among the requests, as before, and not among the loads."""
    c = oc(server)
    req0, load0 = _samples(server, "tokenpool_requests_total"), _samples(server, "tokenpool_load_requests_total")
    done0 = _samples(server, "tokenpool_request_success_total", ("model", "finished_reason"))
    glen0 = _samples(server, "tokenpool_request_generation_tokens_count", ("model",))
    for r in (c.generate(model="tiny", prompt=""), c.chat(model="tiny", messages=[])):
        assert r.done and r.done_reason == "load", r
    assert _grew(load0, _samples(server, "tokenpool_load_requests_total")) == {("tiny", ANON, "200"): 2.0}
    assert _grew(req0, _samples(server, "tokenpool_requests_total")) == {}
    # (nor among the finished choices, nor in the length histograms: a load counted as a choice ended "length")
    assert _grew(done0, _samples(server, "tokenpool_request_success_total", ("model", "finished_reason"))) == {}
    assert _grew(glen0, _samples(server, "tokenpool_request_generation_tokens_count", ("model",))) == {}
    c.generate(model="tiny", prompt="hi", options={"num_predict": 2})
    assert _grew(req0, _samples(server, "tokenpool_requests_total")) == {("tiny", ANON, "200"): 1.0}
    assert _grew(load0, _samples(server, "tokenpool_load_requests_total")) == {("tiny", ANON, "200"): 2.0}

    bad = tmp_path / "bw"  # (weights cut short: the worker's load fails)
    shutil.copytree(make_tiny("qwen2"), bad)
    w = next(bad.glob("*.safetensors"))
    w.write_bytes(w.read_bytes()[:1000])
    r = httpx.post(server.url + "/admin/models", json={"name": "bw", "path": str(bad)}, timeout=60,
                   headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 201, r.text
    req1, load1 = _samples(server, "tokenpool_requests_total"), _samples(server, "tokenpool_load_requests_total")
    with pytest.raises(ollama.ResponseError) as ei:
        c.generate(model="bw", prompt="")
    assert ei.value.status_code == 503, ei.value
    assert _grew(load1, _samples(server, "tokenpool_load_requests_total")) == {("bw", ANON, "503"): 1.0}
    assert _grew(req1, _samples(server, "tokenpool_requests_total")) == {("bw", ANON, "503"): 1.0}
    help_ = {f.name: f.documentation for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)}
    assert "Ollama load" in help_["tokenpool_requests"] and "Ollama load" in help_["tokenpool_load_requests"], help_


# --- the tool grammar, compiled once ---

def test_tools_beside_a_format_compile_the_calls_grammar_once(tiny_model, monkeypatch):
    """tool_choice auto beside a structured output, on each route that takes both (chat's response_format, the
    Responses API's text.format, the Messages API's output_config.format, Ollama's format), sent to the app as
    `tokenpool serve` builds it, in process (no engine runs: a request past every check is a 503): llguidance
    compiles the calls' grammar (the one with `<tool_call>`) once per request, where the plan's own (text or calls)
    was compiled first and dropped; the schema's alone once (its errors name the format's field)."""
    import asyncio

    import llguidance

    from controller.app import build_app
    from controller.config import ModelSpec, ServerConfig

    real, compiled = llguidance.LLMatcher, []

    class Counting:  # (structured.py imports LLMatcher where it compiles: this one then)
        @staticmethod
        def validate_grammar(grammar, *a, **kw):
            compiled.append(grammar)
            return real.validate_grammar(grammar, *a, **kw)

        grammar_from_json_schema = staticmethod(real.grammar_from_json_schema)
        grammar_from_lark = staticmethod(real.grammar_from_lark)
        grammar_from_regex = staticmethod(real.grammar_from_regex)

    monkeypatch.setattr(llguidance, "LLMatcher", Counting)
    hi = [{"role": "user", "content": "hi"}]
    ant_tools = [{"name": n, "input_schema": s} for n, s in SCHEMAS.items()]
    routes = [("/v1/chat/completions", {"messages": hi, "max_tokens": 8, "tools": OAI_TOOLS, "response_format": {
                  "type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}}),
              ("/v1/responses", {"input": "hi", "max_output_tokens": 8, "tools": RESP_TOOLS,
                                 "text": {"format": {"type": "json_schema", "name": "answer", "schema": SCHEMA}}}),
              ("/v1/messages", {"messages": hi, "max_tokens": 8, "tools": ant_tools,
                                "output_config": {"format": {"type": "json_schema", "schema": SCHEMA}}}),
              ("/api/chat", {"messages": hi, "tools": OAI_TOOLS, "format": SCHEMA, "stream": False})]

    async def go():
        app = build_app(ServerConfig.model_validate({"auth": False}))
        await app.state.controller.add_model(ModelSpec.model_validate(
            {"name": "tiny", "path": str(tiny_model), "tool_call_parser": "hermes"}))
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                 base_url="http://test")
        out = {}
        try:
            for path, body in routes:
                compiled.clear()
                r = await http.post(path, json={"model": "tiny", **body})
                calls = sum(json.dumps("<tool_call>\n") in g for g in compiled)
                out[path] = (r.status_code, calls, len(compiled) - calls)
        finally:
            await http.aclose()
            getattr(app.state.serving, "close", lambda: None)()
        return out

    got = asyncio.run(go())
    # (503: past every check, the grammar's included, then no engine in this test)
    assert got == {path: (503, 1, 1) for path, _ in routes}, got


# --- the combined grammar on the Ollama and Responses routes ---

def _ollama_outcome(msg: dict, done_reason: str | None) -> str:
    """"call" or "text", after checking the reply is valid calls of the declared tools or JSON text of the schema."""
    if msg.get("tool_calls"):
        assert not msg["content"], msg
        for tc in msg["tool_calls"]:
            _call_ok(tc["function"]["name"], tc["function"]["arguments"])
        return "call"
    assert done_reason == "stop", (done_reason, msg)
    jsonschema.validate(json.loads(msg["content"]), SCHEMA)
    return "text"


def _ollama_chat(srv, prompt: str, stream: bool) -> tuple[dict, str | None]:
    """The /api/chat reply's message (the streamed lines put together: content and calls) and done_reason. Sent as
    JSON, not with the `ollama` client: its Tool model keeps only a property's type, description, enum and items,
    so the schemas' bounds (maxLength, minimum) never reach the server (the model wrote a city until num_predict
    ended it), where Ollama's API takes the schema as written."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "tools": OAI_TOOLS, "format": SCHEMA,
            "options": {"temperature": 0, "num_predict": 120}, "stream": stream}
    if not stream:
        r = httpx.post(srv.url + "/api/chat", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["message"], r.json()["done_reason"]
    content, calls, last = "", [], None
    with httpx.stream("POST", srv.url + "/api/chat", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line:
                last = json.loads(line)
                content += last["message"].get("content") or ""
                calls += last["message"].get("tool_calls") or []
    assert last is not None and last["done"], last
    return {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}, last["done_reason"]


def test_ollama_chat_format_beside_tools(server):
    """/api/chat with `tools` and `format` (a JSON schema): each reply is calls of the declared tools, arguments
    valid under their schemas, or content that is JSON valid under the format, streamed the same as not; over the
    prompts both come."""
    seen = set()
    for prompt in PROMPTS:
        msg, reason = _ollama_chat(server, prompt, False)
        outcome = _ollama_outcome(msg, reason)
        seen.add(outcome)
        smsg, sreason = _ollama_chat(server, prompt, True)
        assert _ollama_outcome(smsg, sreason) == outcome, prompt
        if outcome == "text":
            assert smsg["content"] == msg["content"]
        else:
            assert [c["function"] for c in smsg["tool_calls"]] == [c["function"] for c in msg["tool_calls"]]
    assert seen == {"call", "text"}, seen


def _responses_outcome(r) -> str:
    """"call" or "text", after checking the Response is one valid function_call or a message of the schema's JSON."""
    assert r.status == "completed", r
    kinds = [o.type for o in r.output]
    if "function_call" in kinds:
        assert kinds == ["function_call"], r  # (parallel_tool_calls false: one)
        _call_ok(r.output[0].name, json.loads(r.output[0].arguments))
        return "call"
    assert kinds == ["message"], r
    jsonschema.validate(json.loads(r.output_text), SCHEMA)
    return "text"


def test_responses_text_format_beside_tools(server):
    """/v1/responses with function tools (tool_choice auto) and text.format json_schema: each Response is a
    function_call of a declared tool, arguments valid under its schema, or a message whose text is JSON valid under
    the format, streamed the same as not (the stream's completed Response); over the prompts both come."""
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    kw = dict(model="tiny", tools=RESP_TOOLS, parallel_tool_calls=False, temperature=0, max_output_tokens=120,
              text={"format": {"type": "json_schema", "name": "answer", "schema": SCHEMA, "strict": True}})
    seen = set()
    for prompt in PROMPTS:
        r = c.responses.create(input=prompt, **kw)
        outcome = _responses_outcome(r)
        seen.add(outcome)
        done = [e.response for e in c.responses.create(input=prompt, stream=True, **kw)
                if e.type == "response.completed"]
        assert len(done) == 1 and _responses_outcome(done[0]) == outcome, prompt
        if outcome == "text":
            assert done[0].output_text == r.output_text
        else:
            assert (done[0].output[0].name, json.loads(done[0].output[0].arguments)) == \
                (r.output[0].name, json.loads(r.output[0].arguments))
    assert seen == {"call", "text"}, seen
