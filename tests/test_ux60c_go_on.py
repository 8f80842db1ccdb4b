"""Controller.go_on: an admitted request's choice goes on in a second engine request (thinking.Budgeted's continuation
after a thinking budget), part of the same request -- in its place in `gen.subs`, its deltas from `gen.events()`
again, its tokens counted with the first's, the tenant reserved for the whole max_tokens once and released once. An
operator's cancel that comes between the two engine requests (the first ended, the continuation not yet placed) is
kept and ends the continuation as it starts: it is never sent to an engine.

Controller state built by hand, as tests/test_worker_death_retry.py builds it.
"""

from __future__ import annotations

import asyncio

import pytest

from controller import messages as m
from controller.service import Ended
from tests.test_worker_death_retry import _collect, _controller, _sent_to, _tokens
from token_scheduler.request import SamplingParams


def test_a_continuation_is_the_same_request():
    async def go():
        ctl, _ = await _controller()
        tenant = ctl.tenants.authenticate(None)
        gen = await ctl.generate(ctl.models["m"], tenant, [[1, 2, 3]], SamplingParams(max_tokens=3), 1, "msg-a",
                                 stream=True, whole=10)
        assert gen.charged == 3 + 10 and gen.goes_on  # (the tokens/min reservation: the whole max_tokens)
        (first,) = gen.subs
        e = await _sent_to(ctl, first)
        _tokens(ctl, e, first.rid, ["a", "b", "c"], finish=True)
        assert (await _collect(gen)) == ("abc", ["length"])
        await ctl.go_on(gen, 0, [1, 2, 3, 10, 11, 12, 99], 7)
        (second,) = gen.subs
        assert second is not first and second.rid == "msg-a-0.next" and not gen.goes_on
        e2 = await _sent_to(ctl, second)
        (new,) = [x for x in e2.writer.sent if isinstance(x, m.NewRequest) and x.request_id == second.rid]
        assert new.prompt_token_ids == [1, 2, 3, 10, 11, 12, 99] and new.params.max_tokens == 7
        ds = [m.Delta(second.rid, text="d", token_ids=[1], num_cached_tokens=6),
              m.Delta(second.rid, text="e", token_ids=[2], finished=True, finish_reason="stop")]
        ctl.pool._outputs(e2, m.Outputs(ds))
        assert (await _collect(gen)) == ("de", ["stop"])
        assert gen.completion_tokens == 5 and gen.cached_tokens == 0  # (the continuation's prompt is not the request's)
        assert ctl.activity.live == {"msg-a": gen}
        gen.close(200)
        assert tenant.inflight == 0 and tenant.usage["requests"] == 1 and tenant.usage["completion_tokens"] == 5
        assert ctl.activity.live == {}

    asyncio.run(go())


def test_a_cancel_between_the_two_engine_requests_ends_the_continuation():
    async def go():
        ctl, _ = await _controller()
        tenant = ctl.tenants.authenticate(None)
        gen = await ctl.generate(ctl.models["m"], tenant, [[1, 2, 3]], SamplingParams(max_tokens=2), 1, "msg-b",
                                 stream=True, whole=8)
        (first,) = gen.subs
        e = await _sent_to(ctl, first)
        _tokens(ctl, e, first.rid, ["a", "b"], finish=True)
        await _collect(gen)
        assert first.done
        assert ctl.cancel("msg-b") == ("m", tenant.name, 1)  # (found, though no engine request of it runs now)
        await ctl.go_on(gen, 0, [1, 2, 3, 10, 11], 6)
        (second,) = gen.subs
        assert second.done and second.engine_id is None  # never sent
        with pytest.raises(Ended) as ei:
            await _collect(gen)
        assert ei.value.code == "request_cancelled"
        gen.close(503)
        assert tenant.inflight == 0 and tenant.usage["requests"] == 1
        # a request that goes on no more (its first part was the whole reply): a cancel then finds nothing to end
        gen = await ctl.generate(ctl.models["m"], tenant, [[1, 2, 3]], SamplingParams(max_tokens=2), 1, "msg-c",
                                 stream=True, whole=8)
        (first,) = gen.subs
        _tokens(ctl, await _sent_to(ctl, first), first.rid, ["a", "b"], finish=True)
        await _collect(gen)
        await ctl.go_on(gen, 0, None)
        assert ctl.cancel("msg-c") is None
        gen.close(200)
        assert tenant.inflight == 0 and tenant.usage["requests"] == 2

    asyncio.run(go())


def test_a_continuation_may_take_its_own_grammar():
    """go_on's `grammar` (OpenAIServing.go_on's, a thinking budget's continuation of a reply with tools whose prompt
    opened the think block: the continuation starts after the block, so the grammar is the one for text after it)
    is the continuation's; the first engine request's params stay as they were (they were changed in place before);
    left out, the continuation keeps the first's grammar."""
    async def go():
        ctl, _ = await _controller()
        tenant = ctl.tenants.authenticate(None)
        for rid, more, want in (("msg-g", {"grammar": "after"}, "after"), ("msg-h", {}, "inside")):
            gen = await ctl.generate(ctl.models["m"], tenant, [[1, 2]], SamplingParams(max_tokens=2, grammar="inside"),
                                     1, rid, stream=True, whole=6)
            (first,) = gen.subs
            e = await _sent_to(ctl, first)
            _tokens(ctl, e, first.rid, ["a", "b"], finish=True)
            await _collect(gen)
            await ctl.go_on(gen, 0, [1, 2, 10, 11, 99], 4, **more)
            (second,) = gen.subs
            e2 = await _sent_to(ctl, second)
            (new,) = [x for x in e2.writer.sent if isinstance(x, m.NewRequest) and x.request_id == second.rid]
            assert (new.params.grammar, new.params.max_tokens, first.params.grammar) == (want, 4, "inside")
            ctl.pool._outputs(e2, m.Outputs([m.Delta(second.rid, text="c", token_ids=[3], finished=True,
                                                     finish_reason="stop")]))
            await _collect(gen)
            gen.close(200)

    asyncio.run(go())
