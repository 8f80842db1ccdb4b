"""The Messages API's `thinking: {"type": "enabled", "budget_tokens": N}` held to (budget forcing): thinking that has
used N tokens without ending is closed there (`</think>`, as the template writes a finished block) and the reply goes
on with its answer from the prompt, those N tokens and the closing tag, within max_tokens in all; usage counts every
token generated once, the input the original prompt's. Before, budget_tokens was taken and ignored (the reply of a
model that kept thinking was all thinking, up to max_tokens).

Live: one tiny model (`think`) whose template opens the think block in the prompt (Qwen3's `enable_thinking` switch,
as Qwen3's Thinking-2507 and DeepSeek-R1 templates open it): its random weights never close the block, so every
budget below max_tokens cuts its thinking. What the reply should be is built from the engine's own greedy
continuations (/v1/completions over the same token ids). Scripted (no server): a reply whose thinking closes within
the budget goes on from where the budget stopped it, no tag added; one that ends within it is left as it was.
"""

from __future__ import annotations

import asyncio
import json
import shutil

import httpx
import pytest

from tests.ports import live_server_on

PORTS = range(25500, 25600)
AH = {"anthropic-version": "2023-06-01", "x-api-key": "x"}
THINKING_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else %}{{- '<think>\\n' }}{%- endif %}{%- endif %}")
HI = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def server(make_varied, tmp_path_factory):
    work = tmp_path_factory.mktemp("ux60b")
    think = work / "think"
    shutil.copytree(make_varied("qwen2"), think)
    (think / "chat_template.jinja").write_text(THINKING_TEMPLATE)
    cfg = {"workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "models": [{"name": "think", "path": str(think), "engine": {"max_num_seqs": 8}}]}
    with live_server_on(PORTS, cfg, work) as srv:
        yield srv


def post(srv, path: str, body: dict) -> httpx.Response:
    r = httpx.post(srv.url + path, json=body, headers=AH, timeout=60)
    assert r.status_code == 200, r.text
    return r


def messages(srv, **body) -> dict:
    return post(srv, "/v1/messages", {"model": "think", "messages": HI, "temperature": 0, **body}).json()


def greedy(srv, prompt: list[int], max_tokens: int) -> tuple[list[int], str, str]:
    """The engine's greedy continuation of `prompt`: (its token ids, its text, its finish reason)."""
    c = post(srv, "/v1/completions", {"model": "think", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                      "logprobs": 0, "return_tokens_as_token_ids": True}).json()["choices"][0]
    return [int(t.split(":", 1)[1]) for t in c["logprobs"]["tokens"]], c["text"], c["finish_reason"]


def forced(srv, budget: int, max_tokens: int) -> tuple[int, str, str, str]:
    """Budget forcing done by hand: (the prompt's tokens, the thinking: `budget` tokens' text, the answer that follows
    the closing tag, its finish reason)."""
    prompt = post(srv, "/tokenize", {"model": "think", "messages": HI,
                                     "chat_template_kwargs": {"enable_thinking": True}}).json()["tokens"]
    ids, thought, why = greedy(srv, prompt, budget)
    assert len(ids) == budget and why == "length" and "</think>" not in thought  # (the block still open)
    close = ("" if thought.endswith("\n") else "\n") + "</think>\n\n"
    tag = post(srv, "/tokenize", {"model": "think", "prompt": close, "add_special_tokens": False}).json()["tokens"]
    _, answer, why = greedy(srv, [*prompt, *ids, *tag], max_tokens - budget)
    return len(prompt), thought, answer, why


def test_budget_cuts_the_thinking_then_the_answer_follows(server):
    """budget_tokens 5 of max_tokens 12: a thinking block of exactly the first 5 tokens' text, then a text block,
    the model's continuation after the closing tag; stop_reason max_tokens, output_tokens 12 (5 + 7), input_tokens
    the prompt's. A larger budget thinks longer (the block is the first N tokens' text each time)."""
    n_prompt, thought, answer, why = forced(server, 5, 12)
    got = messages(server, max_tokens=12, thinking={"type": "enabled", "budget_tokens": 5})
    assert [b["type"] for b in got["content"]] == ["thinking", "text"], got
    assert got["content"][0]["thinking"] == thought.strip() and got["content"][0]["signature"]
    assert got["content"][1] == {"type": "text", "text": answer.lstrip()}
    assert why == "length" and got["stop_reason"] == "max_tokens" and got["stop_sequence"] is None
    use = got["usage"]
    assert use["output_tokens"] == 12 and use["input_tokens"] + use["cache_read_input_tokens"] == n_prompt, use
    _, longer, answer9, _ = forced(server, 9, 12)
    got = messages(server, max_tokens=12, thinking={"type": "enabled", "budget_tokens": 9})
    assert [(b["type"], b.get("thinking", b.get("text"))) for b in got["content"]] == [
        ("thinking", longer.strip()), ("text", answer9.lstrip())]
    assert got["usage"]["output_tokens"] == 12 and len(longer) > len(thought)
    # (display "omitted": the same reply, the block's text left out)
    hidden = messages(server, max_tokens=12, thinking={"type": "enabled", "budget_tokens": 9, "display": "omitted"})
    assert [b.get("thinking", b.get("text")) for b in hidden["content"]] == ["", answer9.lstrip()]


def test_budget_not_reached_leaves_the_reply_as_it_was(server):
    """A reply that ends inside the budget (a stop sequence its second token writes) is the one `adaptive` gives,
    block for block, stop_sequence and usage; the same request without the stop sequence runs past the budget and
    is cut there."""
    prompt = post(server, "/tokenize", {"model": "think", "messages": HI,
                                        "chat_template_kwargs": {"enable_thinking": True}}).json()["tokens"]
    _, two, _ = greedy(server, prompt, 2)
    _, one, _ = greedy(server, prompt, 1)
    stop = two[len(one):].strip() or two.strip()
    assert stop, two
    plain = messages(server, max_tokens=16, stop_sequences=[stop], thinking={"type": "adaptive"})
    assert plain["stop_reason"] == "stop_sequence" and plain["usage"]["output_tokens"] <= 2, plain
    got = messages(server, max_tokens=16, stop_sequences=[stop], thinking={"type": "enabled", "budget_tokens": 8})
    for b in (plain, got):
        for block in b["content"]:
            block.pop("signature", None)
        b.pop("id")
    assert got == plain
    cut = messages(server, max_tokens=16, thinking={"type": "enabled", "budget_tokens": 8})
    assert [b["type"] for b in cut["content"]] == ["thinking", "text"] and cut["usage"]["output_tokens"] == 16, cut


def test_budget_streamed_as_unstreamed(server):
    """Streamed through the `anthropic` client, the budgeted reply is the same message (thinking block, then text
    block; stop_reason, usage): the thinking as thinking_delta events, its signature_delta and stop before the text
    block opens, message_start with the prompt's usage, message_delta with output_tokens max_tokens. The raw SSE
    events say the same."""
    import anthropic

    c = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0, timeout=60)
    kw = dict(model="think", messages=HI, max_tokens=12, thinking={"type": "enabled", "budget_tokens": 5},
              extra_body={"temperature": 0})
    whole = c.messages.create(**kw)
    assert [b.type for b in whole.content] == ["thinking", "text"], whole
    with c.messages.stream(**kw) as s:
        kinds = [(e.type, getattr(e, "index", None), getattr(getattr(e, "delta", None), "type", None)) for e in s]
        streamed = s.get_final_message()
    assert [b.model_dump() for b in streamed.content] == [b.model_dump() for b in whole.content]
    assert (streamed.stop_reason, streamed.usage.output_tokens) == (whole.stop_reason, whole.usage.output_tokens) \
        == ("max_tokens", 12)
    assert streamed.usage.input_tokens + streamed.usage.cache_read_input_tokens == \
        whole.usage.input_tokens + whole.usage.cache_read_input_tokens
    assert kinds.index(("content_block_delta", 0, "signature_delta")) < kinds.index(("content_block_stop", 0, None)) \
        < kinds.index(("content_block_start", 1, None)) < kinds.index(("content_block_delta", 1, "text_delta"))
    assert ("content_block_delta", 0, "thinking_delta") in kinds
    raw = httpx.post(server.url + "/v1/messages", headers=AH, timeout=60, json={
        "model": "think", "messages": HI, "max_tokens": 12, "temperature": 0, "stream": True,
        "thinking": {"type": "enabled", "budget_tokens": 5}}).text
    events = [json.loads(x.split("data: ", 1)[1]) for x in raw.split("\n\n") if "data: " in x]
    assert [e["type"] for e in events].count("message_start") == 1 and events[-1]["type"] == "message_stop"
    text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta"
                   and e["delta"]["type"] == "text_delta")
    assert text == whole.content[1].text
    end = next(e for e in events if e["type"] == "message_delta")
    assert end["delta"]["stop_reason"] == "max_tokens" and end["usage"]["output_tokens"] == 12


def test_budget_tokens_must_be_a_positive_integer_below_max_tokens(server):
    """budget_tokens other than a positive integer below max_tokens is a 400 invalid_request_error in Anthropic's
    error shape (small budgets are taken: local models think in few tokens); 1 is, and thinks one token."""
    for budget in (0, -3, 2.5, "4", True, None, 12, 13):
        r = httpx.post(server.url + "/v1/messages", headers=AH, timeout=60, json={
            "model": "think", "messages": HI, "max_tokens": 12,
            "thinking": {"type": "enabled", "budget_tokens": budget}})
        assert r.status_code == 400, (budget, r.text)
        assert r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error", r.text
        assert "budget_tokens" in r.json()["error"]["message"], r.text
    _, thought, answer, _ = forced(server, 1, 4)
    got = messages(server, max_tokens=4, thinking={"type": "enabled", "budget_tokens": 1})
    assert [b.get("thinking", b.get("text")) for b in got["content"]] == [thought.strip(), answer.lstrip()]


# --- scripted: what the live model cannot write (a think block it closes) ---

class _Tok:
    """A tokenizer of one token a character."""

    def encode(self, text, add_special_tokens=False):
        return [ord(ch) for ch in text]


class _Gen:
    """A generation of given (text, token ids) deltas, the last finishing `why`."""

    def __init__(self, pieces: list[str], why: str, prompt: list[int]):
        self.pieces, self.why, self.prompt_ids = pieces, why, prompt
        self.prompt_tokens, self.cached_tokens, self.completion_tokens = len(prompt), 0, 0
        self.tenant, self.asked, self.closed = "t", "think", None

    async def events(self):
        from controller.messages import Delta

        for k, piece in enumerate(self.pieces):
            last = k == len(self.pieces) - 1
            self.completion_tokens += len(piece)
            yield 0, Delta("r", text=piece, token_ids=[ord(ch) for ch in piece], finished=last,
                           finish_reason=self.why if last else None)

    def pending(self):
        return False

    def close(self, status):
        self.closed = status


def _budgeted(first: _Gen, then: list[str], max_tokens: int, opened: bool):
    """The reply (thinking, text, finish) of `first` held to its budget, the second generation's (started from what
    prompt, if one was) writing `then`."""
    from types import SimpleNamespace

    from controller.api.thinking import Budgeted, Split

    started = []

    async def go_on(gen, prompt, max_tokens=0):  # (the same request goes on: its events the continuation's next)
        if prompt is not None:
            started.append((prompt, max_tokens))
            gen.pieces, gen.why = then, "stop"

    serving = SimpleNamespace(active=set(), go_on=go_on)
    me = SimpleNamespace(tokenizer=_Tok(), max_model_len=4096)
    gen = Budgeted(serving, me, first, max_tokens, opened)
    split, thinking, text, finish = Split(opened), "", "", None

    async def run():
        nonlocal thinking, text, finish
        async for _, d in gen.events():
            t, x = split.feed(d.text, d.finished)
            thinking, text = thinking + t, text + x
            if d.finished:
                finish = d.finish_reason

    asyncio.run(run())
    return thinking, text, finish, started, gen.completion_tokens


def test_scripted_budget_forcing():
    """Thinking that closes within the budget, the answer then cut by it: the second generation goes on from the
    prompt and all the first wrote (no tag added), for the rest of max_tokens. Thinking the budget cuts: the block
    closed ("\\n</think>\\n\\n" after it), the second from the prompt, the thinking and the tag. A reply that ends
    within the budget: no second generation. A reply cut while writing its opening tag: the tag finished, the block
    empty. Usage: each generated token once (the added tag none)."""
    p = [1, 2, 3]
    first = "<think>\nShort.\n</think>\n\nHel"
    got = _budgeted(_Gen([first[:9], first[9:]], "length", p), ["lo!"], 40, False)
    assert got == ("Short.", "Hello!", "stop", [([*p, *map(ord, first)], 40 - len(first))], len(first) + 3)
    got = _budgeted(_Gen(["The user", " greets"], "length", p), ["Hi!"], 30, True)
    tag = "\n</think>\n\n"
    assert got == ("The user greets", "Hi!", "stop", [([*p, *map(ord, "The user greets" + tag)], 15)], 18)
    got = _budgeted(_Gen(["Done.\n</think>\n\nOk"], "stop", p), ["never"], 30, True)
    assert got == ("Done.", "Ok", "stop", [], 18)
    got = _budgeted(_Gen(["<thi"], "length", p), ["Hey"], 10, False)
    assert got[1:4] == ("Hey", "stop", [([*p, *map(ord, "<think>\n</think>\n\n")], 6)]) and got[0] == ""
