"""Gaps found in review, checked on one live server (two tiny models: `tiny`, a licence file in its folder, no
thinking; `think`, a GGUF conversion's folder with the licence beside its GGUF file and a template that thinks, as
Qwen3's `enable_thinking` switch, opening the think block in the prompt as thinking models' templates do):

- `tokenpool show MODEL` printed the model's facts and capabilities only: it prints the server's parameters (stop,
  num_ctx, sampling) and the head of the licence, as `ollama show` lays them out; --parameters, --license and
  --modelfile print that one alone, as ollama show's;
- /api/show had no `license`: the model folder's LICENSE / LICENSE.txt / LICENSE.md (any case) text, or for a GGUF
  conversion the one beside its GGUF file; left out where there is none, as Ollama's; the Modelfile's LICENSE too;
- Messages `thinking` other than disabled was a 400 "extended thinking is not supported", which broke Claude Code
  (it sends {"type": "adaptive"}): `disabled` turns the template's thinking off, `adaptive` thinks where the model
  can, `enabled` (budget_tokens) thinks or is a 400 for a model that cannot; the thinking comes as a `thinking`
  block (streamed as thinking_delta and signature_delta events).
"""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
from typer.testing import CliRunner

from tests.ports import live_server_on

PORTS = range(25300, 25400)
AH = {"anthropic-version": "2023-06-01", "x-api-key": "x"}
LICENSE = "Apache License\nVersion 2.0, January 2004\n\n   TERMS AND CONDITIONS\nline four\n"
GGUF_LICENSE = "MIT License\n\nCopyright (c) someone\n"
# Qwen3's switch: off, the reply starts after an empty think block; on, the prompt opens the block (as Qwen3's
# Thinking-2507 and DeepSeek-R1 templates do), so the reply is its thinking until </think>
THINKING_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else %}{{- '<think>\\n' }}{%- endif %}{%- endif %}")


@pytest.fixture(scope="module")
def server(make_varied, tmp_path_factory):
    from controller.real_model import MARKER

    work = tmp_path_factory.mktemp("ux59c")
    tiny, think, src = work / "tiny", work / "think", work / "gguf-src"
    shutil.copytree(make_varied("qwen2"), tiny)
    (tiny / "LICENSE.md").write_text(LICENSE)
    shutil.copytree(make_varied("qwen2"), think)
    (think / "chat_template.jinja").write_text(THINKING_TEMPLATE)
    src.mkdir()
    (src / "LICENSE").write_text(GGUF_LICENSE)  # (beside the GGUF file the folder was converted from)
    (think / MARKER).write_text(json.dumps({"source": str(src / "think.Q8_0.gguf"), "gguf": "think.Q8_0.gguf",
                                            "file_type": "Q8_0"}))
    cfg = {"workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "models": [{"name": "tiny", "path": str(tiny), "engine": {"max_num_seqs": 8}},
                      {"name": "think", "path": str(think), "engine": {"max_num_seqs": 8}}]}
    with live_server_on(PORTS, cfg, work) as srv:
        yield srv


def shown(srv, model: str) -> dict:
    r = httpx.post(srv.url + "/api/show", json={"model": model}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_show_gives_the_models_license(server):
    """/api/show's `license`: the folder's LICENSE.md, or a GGUF conversion's from beside its GGUF file, as the
    `ollama` client reads it; the Modelfile ends with it. A model without one has no field (as Ollama's)."""
    from types import SimpleNamespace

    import ollama

    from controller.api.ollama import _license

    c = ollama.Client(host=server.url, timeout=30)
    assert c.show("tiny").license == LICENSE.strip()
    got = c.show("think")
    assert got.license == GGUF_LICENSE.strip() and got.details.format == "gguf"
    assert shown(server, "tiny")["modelfile"].endswith(f'LICENSE """{LICENSE.strip()}"""\n')
    bare = shown(server, "tiny")["modelfile"].split("LICENSE", 1)[0]  # (the rest as it was)
    assert bare.count("PARAMETER num_ctx") == 1
    assert _license(SimpleNamespace(spec=SimpleNamespace(path=str(server.workdir)))) is None  # (a folder without)


def test_show_cli_prints_parameters_and_license(server):
    """`tokenpool show` lays out the server's parameters (a name and its value a row, the names' column as wide as
    the longest and 4 spaces) after the capabilities, then the licence's first two lines and "...", as `ollama show`;
    --parameters, --license and --modelfile print that field alone; two of them is a usage error."""
    from controller.cli import app

    got = shown(server, "tiny")
    params = [line.split(None, 1) for line in got["parameters"].splitlines()]
    assert ["num_ctx", str(got["model_info"]["context_length"])] in params and any(k == "stop" for k, _ in params)
    width = max(len(k) for k, _ in params) + 4
    r = CliRunner().invoke(app, ["show", "tiny", "--url", server.url])
    assert r.exit_code == 0, r.output
    out = r.output.splitlines()
    at = out.index("  Parameters")
    assert out[at - 2:at] == ["    completion", ""]
    assert out[at + 1:at + 1 + len(params)] == [f"    {k:<{width}}{v}" for k, v in params]
    assert out[at + 1 + len(params):] == ["", "  License", "    Apache License", "    Version 2.0, January 2004",
                                          "    ..."], r.output
    for flag, want in (("--parameters", got["parameters"]), ("--license", LICENSE.strip()),
                       ("--modelfile", got["modelfile"])):
        r = CliRunner().invoke(app, ["show", "tiny", flag, "--url", server.url])
        assert (r.exit_code, r.output) == (0, want + "\n"), (flag, r.output)
    r = CliRunner().invoke(app, ["show", "tiny", "--license", "--template", "--url", server.url])
    assert r.exit_code == 2 and "only one of" in r.output, r.output


def messages(srv, body: dict, path: str = "/v1/messages") -> httpx.Response:
    return httpx.post(srv.url + path, json={"max_tokens": 8, "temperature": 0, **body}, headers=AH, timeout=60)


def tokens(srv, model: str, msgs: list[dict], on: bool) -> int:
    r = httpx.post(srv.url + "/tokenize", json={"model": model, "messages": msgs,
                                                "chat_template_kwargs": {"enable_thinking": on}}, timeout=30)
    assert r.status_code == 200, r.text
    return len(r.json()["tokens"])


HI = [{"role": "user", "content": "Hello there"}]


def test_messages_thinking_as_the_model_can(server):
    """`disabled` and `adaptive` are taken of any model (tiny: no thinking, the same reply); `enabled` of a model
    whose template cannot think is a 400 naming it. Of `think`: disabled renders the template's switch off (the
    prompt /tokenize renders with enable_thinking false, count_tokens the same) and the reply is text; adaptive (and
    enabled) render it on, and adaptive's reply (all thinking here: the prompt opened the block, and max_tokens ends it) is a
    thinking block, the chat completion's text, with a signature; streamed through the `anthropic` client it is the
    same message, as thinking_delta and signature_delta events. display "omitted" leaves the block's text empty."""
    import anthropic
    import openai

    plain = [messages(server, {"model": "tiny", "messages": HI, "thinking": t})
             for t in ({"type": "disabled"}, {"type": "adaptive"})]
    assert [r.status_code for r in plain] == [200, 200], plain[1].text
    assert plain[0].json()["content"] == plain[1].json()["content"] and plain[1].json()["content"][0]["type"] == "text"
    r = messages(server, {"model": "tiny", "messages": HI, "max_tokens": 16,
                          "thinking": {"type": "enabled", "budget_tokens": 8}})
    assert r.status_code == 400 and '"tiny" does not support thinking' in r.json()["error"]["message"], r.text

    off, on = tokens(server, "think", HI, False), tokens(server, "think", HI, True)
    r = messages(server, {"model": "think", "messages": HI, "thinking": {"type": "disabled"}})
    use = r.json()["usage"]
    assert r.status_code == 200 and use["input_tokens"] + use["cache_read_input_tokens"] == off, r.text
    assert [b["type"] for b in r.json()["content"]] in ([], ["text"])
    for t, want in (({"type": "disabled"}, off), ({"type": "adaptive"}, on)):
        r = messages(server, {"model": "think", "messages": HI, "thinking": t}, "/v1/messages/count_tokens")
        assert r.json() == {"input_tokens": want}, (t, r.text)
    chat = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0).chat.completions.create(
        model="think", messages=HI, max_tokens=8, temperature=0)
    assert chat.usage.prompt_tokens == on and chat.choices[0].finish_reason == "length"
    c = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0, timeout=60)
    for t in ({"type": "adaptive"},):  # (`enabled`'s budget_tokens cuts the thinking: test_ux60b_thinking_budget)
        got = c.messages.create(model="think", messages=HI, max_tokens=8, thinking=t, extra_body={"temperature": 0})
        assert [b.type for b in got.content] == ["thinking"] and got.stop_reason == "max_tokens", got
        assert got.content[0].thinking == chat.choices[0].message.content.strip() and got.content[0].signature
        assert got.usage.input_tokens + got.usage.cache_read_input_tokens == on and got.usage.output_tokens == 8
        with c.messages.stream(model="think", messages=HI, max_tokens=8, thinking=t,
                               extra_body={"temperature": 0}) as s:
            kinds = [(e.type, getattr(getattr(e, "delta", None), "type", None)) for e in s]
            streamed = s.get_final_message()
        assert [b.model_dump() for b in streamed.content] == [b.model_dump() for b in got.content]
        assert ("content_block_delta", "thinking_delta") in kinds and ("content_block_delta", "signature_delta") in kinds
    r = messages(server, {"model": "think", "messages": HI, "thinking": {"type": "adaptive", "display": "omitted"}})
    assert [(b["type"], b["thinking"], bool(b["signature"])) for b in r.json()["content"]] == [("thinking", "", True)]


def test_messages_thinking_refusals(server):
    """`enabled` held to Anthropic's rules (budget_tokens given and below max_tokens; a call forced by tool_choice
    refused with Anthropic's words), a type that is none of the three a 400, budget_tokens only with `enabled`."""
    tool = {"name": "f", "input_schema": {"type": "object", "properties": {}}}
    for thinking, extra, words in (
            ({"type": "enabled"}, {}, "thinking.budget_tokens: Field required"),
            ({"type": "enabled", "budget_tokens": 8}, {}, "max_tokens must be greater than thinking.budget_tokens"),
            ({"type": "enabled", "budget_tokens": 4}, {"tools": [tool], "tool_choice": {"type": "any"}},
             "Thinking may not be enabled when tool_choice forces tool use."),
            ({"type": "on"}, {}, "thinking.type: 'on' is not one of enabled, disabled, adaptive"),
            ({"type": "adaptive", "budget_tokens": 4}, {}, "only with thinking type 'enabled'")):
        r = messages(server, {"model": "think", "messages": HI, "thinking": thinking, **extra})
        assert r.status_code == 400 and words in r.json()["error"]["message"], (thinking, r.text)
    r = messages(server, {"model": "think", "messages": HI, "thinking": {"type": "adaptive"}, "tools": [tool],
                          "tool_choice": {"type": "any"}})  # (adaptive: the forced call, without thinking)
    assert r.status_code == 200 and [b["type"] for b in r.json()["content"]] == ["tool_use"], r.text


def test_thinking_block_then_text_streamed_and_not():
    """A reply that thinks then answers (the model's own <think> block, in pieces that split its tags): a thinking
    block (index 0: its thinking_delta parts, then its signature_delta, stopped before the text opens) then a text
    block (index 1), the same as the reply unstreamed; not given (thinking not asked), the text alone."""
    import asyncio

    from controller.api import anthropic as am
    from controller.api import protocol as p
    from controller.api.thinking import Split
    from tests.scripted_gen import bare_serving, generation, in_pieces

    whole = "<think>\nThe user greets me.\n</think>\n\nHello!"
    req = p.MessagesRequest.model_validate({"model": "m", "max_tokens": 99, "messages": HI, "stream": True})

    def sse(shown: bool) -> list[dict]:
        serving = bare_serving()
        reply = am._Reply(serving, req, None, Split(), shown)

        async def run():
            return b"".join([b async for b in am._stream(serving, generation(in_pieces(whole, 2)), reply)])

        return [json.loads(x.split("data: ", 1)[1]) for x in asyncio.run(run()).decode().split("\n\n") if "data: " in x]

    events = sse(True)
    blocks: dict[int, dict] = {}
    for e in events:
        if e["type"] == "content_block_start":
            blocks[e["index"]] = dict(e["content_block"])
        elif e["type"] == "content_block_delta":
            d, b = e["delta"], blocks[e["index"]]
            key = {"thinking_delta": "thinking", "signature_delta": "signature", "text_delta": "text"}[d["type"]]
            b[key] = b.get(key, "") + d[key]
    assert [blocks[0]["type"], blocks[0]["thinking"], blocks[1]] == [
        "thinking", "The user greets me.", {"type": "text", "text": "Hello!"}]
    kinds = [(e["type"], e.get("index"), e.get("delta", {}).get("type")) for e in events]
    assert kinds.index(("content_block_delta", 0, "signature_delta")) < kinds.index(("content_block_stop", 0, None)) \
        < kinds.index(("content_block_start", 1, None))
    reply = am._Reply(bare_serving(), req, None, Split(), True)
    reply.thinking, reply.text, reply.finish = "The user greets me.", "Hello!", "stop"
    assert reply.thinking_blocks() == [blocks[0]] and reply.blocks() == ([blocks[1]], "end_turn")
    starts = [e["content_block"] for e in sse(False) if e["type"] == "content_block_start"]
    assert starts == [{"type": "text", "text": ""}]


def test_ollama_think_reads_a_block_the_template_opened(server):
    """Ollama's `think` on a model whose template opens the think block in the prompt: the reply starts inside it, so
    what it writes (8 tokens: no `</think>` yet) is `thinking`, not `content`, streamed or not."""
    body = {"model": "think", "messages": HI, "think": True, "options": {"num_predict": 8, "temperature": 0}}
    r = httpx.post(server.url + "/api/chat", json={**body, "stream": False}, timeout=60)
    assert r.status_code == 200, r.text
    msg = r.json()["message"]
    assert msg["thinking"] and msg["content"] == "", msg
    lines = [json.loads(x) for x in httpx.post(server.url + "/api/chat", json={**body, "stream": True},
                                               timeout=60).text.splitlines() if x.strip()]
    assert "".join(x["message"].get("thinking", "") for x in lines) == msg["thinking"]
    assert "".join(x["message"]["content"] for x in lines) == ""
