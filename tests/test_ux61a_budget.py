"""Budget forcing's edges (the Messages API's `thinking.budget_tokens`: thinking.Budgeted, Controller.go_on), and
Ollama's load request in the event stream:

- a stop sequence that begins in what the first engine request wrote and ends in what its continuation writes ends
  the reply there (stop_reason stop_sequence, the text cut before it), as one within either part does; before, each
  engine matched its own text only and the stop was missed;
- an operator's cancel in the instant between the two parts, where no continuation follows after all, ends the reply
  as cancelled (the cancel had answered "cancelled 1" and the reply then came whole);
- the model's used_fraction (the share of max_tokens its replies use: admission's decode estimate) reads a budgeted
  reply against its whole max_tokens, not its first part's budget nor its continuation's rest;
- a seeded continuation draws with a seed of its own (not the first's draws again from their start), the same each
  time;
- a load (an empty prompt to Ollama's /api/generate) publishes no "admit" event: it is no request of the tenant's.

Live: a tiny model whose template thinks as Qwen3's hybrid ones do (the `enable_thinking` switch; the model opens the
block itself): its random weights never write `<think>`, so a budget that runs out cuts the answer and the
continuation goes on from where the first stopped, no tag between (where a stop can span the cut). What the reply
should be is built from the engine's own greedy continuations (/v1/completions over the same token ids).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from types import SimpleNamespace

import httpx
import pytest

from controller import messages as m
from controller.keys import hash_key
from controller.service import Ended
from tests.ports import live_server_on
from tests.test_ux60b_thinking_budget import AH, HI, THINKING_TEMPLATE
from tests.test_worker_death_retry import _collect, _controller, _sent_to, _tokens
from token_scheduler.request import SamplingParams

PORTS = range(26200, 26300)
ADMIN = "admin-ux61a-budget"
ADM = {"Authorization": f"Bearer {ADMIN}"}
# Qwen3's hybrid template's shape: thinking off writes an empty block in the prompt; on, the model opens its own (the
# thinking template of the budget's first tests, less the block it opens)
HYBRID_TEMPLATE = THINKING_TEMPLATE.replace("{%- else %}{{- '<think>\\n' }}", "")
assert HYBRID_TEMPLATE != THINKING_TEMPLATE


@pytest.fixture(scope="module")
def server(make_varied, tmp_path_factory):
    work = tmp_path_factory.mktemp("ux61a")
    hy = work / "hy"
    shutil.copytree(make_varied("qwen2"), hy)
    (hy / "chat_template.jinja").write_text(HYBRID_TEMPLATE)
    cfg = {"admin_token_hash": hash_key(ADMIN),
           "workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "models": [{"name": "hy", "path": str(hy), "engine": {"max_num_seqs": 8}}]}
    with live_server_on(PORTS, cfg, work) as srv:
        yield srv


def post(srv, path: str, body: dict) -> httpx.Response:
    r = httpx.post(srv.url + path, json=body, headers=AH, timeout=60)
    assert r.status_code == 200, r.text
    return r


def greedy(srv, prompt: list[int], max_tokens: int) -> tuple[list[int], str, str]:
    """The engine's greedy continuation of `prompt`: (its token ids, its text, its finish reason)."""
    c = post(srv, "/v1/completions", {"model": "hy", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                      "logprobs": 0, "return_tokens_as_token_ids": True}).json()["choices"][0]
    return [int(t.split(":", 1)[1]) for t in c["logprobs"]["tokens"]], c["text"], c["finish_reason"]


def text_of(msg) -> str:
    return "".join(b["text"] for b in msg["content"] if b["type"] == "text")


def test_a_stop_sequence_spanning_the_cut_ends_the_reply(server):
    """budget_tokens 6 of max_tokens 16, the answer cut by the budget (no think block: the continuation goes on from
    the first's 6 tokens): a stop sequence made of the first's last characters and the continuation's first ends the
    reply there -- stop_reason stop_sequence, the text the budget-less reply's up to the stop, fewer than 16 tokens --
    unstreamed, and streamed through the `anthropic` client."""
    import anthropic

    budget, most = 6, 16
    prompt = post(server, "/tokenize", {"model": "hy", "messages": HI,
                                        "chat_template_kwargs": {"enable_thinking": True}}).json()["tokens"]
    ids, first, why = greedy(server, prompt, budget)
    assert why == "length" and "<think>" not in first, first
    _, then, _ = greedy(server, [*prompt, *ids], most - budget)
    whole = first + then
    kw = dict(model="hy", messages=HI, max_tokens=most, thinking={"type": "enabled", "budget_tokens": budget},
              extra_body={"temperature": 0})
    c = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0, timeout=60)
    plain = c.messages.create(**kw).model_dump()
    assert plain["stop_reason"] == "max_tokens" and plain["usage"]["output_tokens"] == most, plain
    assert text_of(plain) == whole.strip(), (plain, whole)  # (the reply is the two greedy parts joined)
    # the stop: the first's last characters and the continuation's first, found nowhere before the cut
    stop = next((s for n in range(2, 10) for j in range(1, n) if len(first) >= j and len(then) >= n - j
                 and (s := first[-j:] + then[:n - j]).strip() and whole.find(s) == len(first) - j), None)
    assert stop is not None, (first, then)
    want = whole[:whole.find(stop)].strip()
    got = c.messages.create(**kw, stop_sequences=[stop]).model_dump()
    assert (got["stop_reason"], got["stop_sequence"]) == ("stop_sequence", stop), (got, stop)
    assert text_of(got) == want, (got, want, stop)
    assert budget < got["usage"]["output_tokens"] < most, got
    with c.messages.stream(**kw, stop_sequences=[stop]) as s:
        streamed = s.get_final_message().model_dump()
    assert (streamed["stop_reason"], streamed["stop_sequence"], text_of(streamed)) == ("stop_sequence", stop, want)
    assert streamed["usage"]["output_tokens"] == got["usage"]["output_tokens"]


def test_an_ollama_load_publishes_no_admit(server):
    """An empty prompt to /api/generate (Ollama's load request) brings the model in and publishes no "admit" event
    (it is not admitted as a request: neither charged nor counted); a generation after it does."""
    load = httpx.post(server.url + "/api/generate", json={"model": "hy", "prompt": ""}, timeout=60)
    assert load.status_code == 200 and load.json()["done_reason"] == "load", load.text
    gen = httpx.post(server.url + "/api/generate", json={"model": "hy", "prompt": "Hi", "stream": False,
                                                         "options": {"num_predict": 1}}, timeout=60)
    assert gen.status_code == 200, gen.text
    loaded, marker = load.headers["x-request-id"], gen.headers["x-request-id"]
    admits: list[dict] = []
    deadline = time.monotonic() + 20
    with httpx.stream("GET", server.url + "/admin/events", params={"since": 0}, headers=ADM, timeout=20) as s:
        for line in s.iter_lines():
            if line.startswith("data:") and (ev := json.loads(line[5:]))["kind"] == "admit":
                admits.append(ev)
                if ev.get("request_id") == marker:
                    break
            assert time.monotonic() < deadline, admits
    assert admits and admits[-1]["request_id"] == marker
    assert [ev for ev in admits if ev.get("request_id") == loaded] == [], admits


# --- the controller, built by hand (tests/test_worker_death_retry.py) ---

def test_a_cancel_between_the_parts_where_none_follows_ends_the_reply():
    """The first part ended (its end read by the controller, not yet by the reply's reader), an operator's cancel
    answers that it ended the request; the reader then finds no continuation to make (the first ended the reply,
    or max_tokens is spent): the reply ends as cancelled all the same, not whole. Where nothing was cancelled it ends
    as it was."""
    async def go():
        ctl, _ = await _controller()
        tenant = ctl.tenants.authenticate(None)
        gen = await ctl.generate(ctl.models["m"], tenant, [[1, 2, 3]], SamplingParams(max_tokens=2), 1, "msg-x",
                                 stream=True, whole=8)
        (first,) = gen.subs
        _tokens(ctl, await _sent_to(ctl, first), first.rid, ["a", "b"], finish=True)
        await _collect(gen)
        assert ctl.cancel("msg-x") == ("m", tenant.name, 1)
        with pytest.raises(Ended) as ei:
            await ctl.go_on(gen, 0, None)
        assert ei.value.code == "request_cancelled" and ei.value.status == 503
        assert ctl.cancel("msg-x") is None  # (over: nothing more to end)
        gen.close(503)
        gen = await ctl.generate(ctl.models["m"], tenant, [[1, 2, 3]], SamplingParams(max_tokens=2), 1, "msg-y",
                                 stream=True, whole=8)
        (first,) = gen.subs
        _tokens(ctl, await _sent_to(ctl, first), first.rid, ["a", "b"], finish=True)
        await _collect(gen)
        await ctl.go_on(gen, 0, None)  # (not cancelled: the reply stands)
        gen.close(200)
        assert tenant.inflight == 0

    asyncio.run(go())


def test_used_fraction_reads_a_budgeted_reply_against_its_whole_max_tokens():
    """max_tokens 10, a first part of 3: gone on and ended after 1 more token, the reply used 4 of 10 (it read 4 of
    the continuation's 7); ended within its first part after 2 tokens, 2 of 10 (it read 2 of 3)."""
    async def run(first_words: list[str], then: list[str] | None) -> float:
        ctl, _ = await _controller()
        tenant = ctl.tenants.authenticate(None)
        gen = await ctl.generate(ctl.models["m"], tenant, [[1, 2, 3]], SamplingParams(max_tokens=3), 1, "msg-u",
                                 stream=True, whole=10)
        (first,) = gen.subs
        e = await _sent_to(ctl, first)
        if then is None:  # (its end of turn within the budget)
            ds = [m.Delta(first.rid, text=w, token_ids=[10 + i]) for i, w in enumerate(first_words)]
            ds[-1] = m.Delta(first.rid, text=first_words[-1], token_ids=[99], finished=True, finish_reason="stop")
            ctl.pool._outputs(e, m.Outputs(ds))
        else:
            _tokens(ctl, e, first.rid, first_words, finish=True)
        await _collect(gen)
        await ctl.go_on(gen, 0, None if then is None else [1, 2, 3, 10, 11, 12], 7)
        if then is not None:
            (second,) = gen.subs
            ds = [m.Delta(second.rid, text=w, token_ids=[20]) for w in then]
            ds[-1] = m.Delta(second.rid, text=then[-1], token_ids=[20], finished=True, finish_reason="stop")
            ctl.pool._outputs(await _sent_to(ctl, second), m.Outputs(ds))
            await _collect(gen)
        gen.close(200)
        return ctl.models["m"].used_fraction

    assert asyncio.run(run(["a", "b", "c"], ["d"])) == pytest.approx(0.4)
    assert asyncio.run(run(["a", "b"], None)) == pytest.approx(0.2)


def test_a_seeded_continuation_draws_with_a_seed_of_its_own():
    """A seeded request's continuation is sent with a seed no engine request of the request has (the engine seeds
    each engine request's generator at its start: under the first's seed it drew the first's draws again), the same
    each time; an unseeded one stays unseeded."""
    async def second_seed(seed: int | None) -> tuple[int | None, int | None]:
        ctl, _ = await _controller()
        tenant = ctl.tenants.authenticate(None)
        gen = await ctl.generate(ctl.models["m"], tenant, [[1, 2, 3]],
                                 SamplingParams(max_tokens=2, temperature=1.0, seed=seed), 1, "msg-s",
                                 stream=True, whole=8)
        (first,) = gen.subs
        e = await _sent_to(ctl, first)
        _tokens(ctl, e, first.rid, ["a", "b"], finish=True)
        await _collect(gen)
        await ctl.go_on(gen, 0, [1, 2, 3, 10, 11], 6)
        (second,) = gen.subs
        e2 = await _sent_to(ctl, second)
        sent = {x.request_id: x.params.seed for w in (e, e2) for x in w.writer.sent if isinstance(x, m.NewRequest)}
        gen.close(200)
        return sent[first.rid], sent[second.rid]

    one, two = asyncio.run(second_seed(41))
    assert one == 41 and two is not None and two != 41
    assert asyncio.run(second_seed(41)) == (one, two)
    assert asyncio.run(second_seed(None)) == (None, None)


# --- thinking.Budgeted, scripted: a stop sequence across the cut, streamed and not ---

class _Tok:
    def encode(self, text, add_special_tokens=False):
        return [ord(ch) for ch in text]


class _Gen:
    """A generation of given text pieces (a token a character), the first part's last finishing "length", the
    continuation's `then` (its last finishing `why`); `buffered`: the continuation's tokens are all counted before
    its first delta is given (a reply not streamed: Generation.buffered)."""

    def __init__(self, first: list[str], then: list[str], stop: list[str], include: bool = False,
                 buffered: bool = False):
        self.pieces, self.why, self.then, self.buffered = first, "length", then, buffered
        self.prompt_ids, self.prompt_tokens, self.cached_tokens, self.completion_tokens = [1, 2], 2, 0, 0
        self.subs = [SimpleNamespace(params=SamplingParams(max_tokens=4, stop=stop,
                                                           include_stop_str_in_output=include))]
        self.finish: dict[int, str | None] = {}

    async def events(self):
        held = self.buffered and self.why != "length"  # (the continuation, not streamed)
        if held:
            self.completion_tokens += sum(len(p) for p in self.pieces)
        for k, piece in enumerate(self.pieces):
            last = k == len(self.pieces) - 1
            if not held:
                self.completion_tokens += len(piece)
            d = m.Delta("r", text=piece, token_ids=[ord(ch) for ch in piece], finished=last,
                        finish_reason=self.why if last else None)
            if last:
                self.finish[0] = d.finish_reason
            yield 0, d


def _reply(gen: _Gen) -> tuple[str, str | None, object, int]:
    """(the reply's text, its finish reason, its stop reason, its tokens) of `gen` held to a budget of 4 of 12."""
    from controller.api.thinking import Budgeted

    async def go_on(g, prompt, max_tokens=0):
        if prompt is not None:
            g.pieces, g.why = g.then, "stop"

    budgeted = Budgeted(SimpleNamespace(active=set(), go_on=go_on), SimpleNamespace(tokenizer=_Tok(),
                                                                                    max_model_len=4096),
                        gen, 12, False)
    text, finish, stop = "", None, None

    async def run():
        nonlocal text, finish, stop
        async for _, d in budgeted.events():
            text += d.text
            if d.finished:
                finish, stop = d.finish_reason, d.stop_reason

    asyncio.run(run())
    return text, finish, stop, budgeted.completion_tokens


def test_scripted_a_stop_across_the_cut():
    """The first part "ab He" (cut by the budget), the continuation "ll", "o w", "orld": the stop "Hello" ends the
    reply at "ab " (its tokens those read up to the stop: the first's 5 and the continuation's first 5), kept where
    include_stop_str_in_output; the same not streamed (the continuation's tokens all counted as they came) counts
    the same; a stop that turns out not to be there ("Help"), or a continuation that ends before it could tell,
    releases what was held: the reply whole."""
    first, then = ["ab", " He"], ["ll", "o w", "orld"]
    assert _reply(_Gen(first, then, ["Hello"])) == ("ab ", "stop", "Hello", 5 + 5)
    assert _reply(_Gen(first, then, ["Hello"], buffered=True)) == ("ab ", "stop", "Hello", 5 + 5)
    assert _reply(_Gen(first, then, ["Hello"], include=True)) == ("ab Hello", "stop", "Hello", 5 + 5)
    assert _reply(_Gen(first, then, ["zz", "Help"])) == ("ab Hello world", "stop", None, 5 + 9)
    assert _reply(_Gen(first, ["l"], ["Hello"])) == ("ab Hel", "stop", None, 5 + 1)
