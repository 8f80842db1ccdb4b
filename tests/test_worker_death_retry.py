"""A request whose engine fails it mid-generation: one not streamed runs again from its start on another engine
(nothing of it was sent), a bounded number of times; a stream that already had tokens ends with the error.

Controller state built by hand: engines are EngineHandles in the pool, as a worker's registration makes them, whose
writer records what the controller sends; their outputs and deaths are the pool's own calls (`_outputs`, `_dead`).
"""

from __future__ import annotations

import asyncio

import pytest

from controller import messages as m
from controller.config import SLO, ModelSpec, ServerConfig
from controller.errors import ServingError
from controller.pool import EngineHandle, Replica
from controller.service import CRASH_ATTEMPTS, MAX_ATTEMPTS, Controller
from tests.fake_worker import Wire
from token_scheduler.request import SamplingParams


def _engine(ctl: Controller, eid: str, slot: int) -> EngineHandle:
    e = EngineHandle(eid, slot, "cpu", "node", 1000 + slot, 8 << 30, Wire())
    e.replicas["m"] = Replica("m", state="ready")
    e.replicas["m"].ready.set()
    ctl.pool.engines[eid] = e
    return e


async def _controller() -> tuple[Controller, list[EngineHandle]]:
    ctl = Controller(ServerConfig(models=[], workers={"local": "none"}))
    await ctl.add_model(ModelSpec(name="m", path=None, engine={"kind": "pace"}, slo=SLO(ttft_s=5, tpot_s=1)))
    return ctl, [_engine(ctl, f"w{i}", i) for i in range(MAX_ATTEMPTS + 1)]


async def _sent_to(ctl: Controller, sub, other_than: str | None = None) -> EngineHandle:
    """The engine `sub` is on now (after a retry: once it was placed again)."""
    for _ in range(200):
        if sub.engine_id not in (None, other_than) and sub.rid in ctl.pool.engines[sub.engine_id].subs:
            return ctl.pool.engines[sub.engine_id]
        await asyncio.sleep(0.01)
    raise AssertionError(f"{sub.rid} was not sent again")


def _tokens(ctl: Controller, e: EngineHandle, rid: str, words: list[str], finish: bool) -> None:
    ds = [m.Delta(rid, text=w, token_ids=[10 + i]) for i, w in enumerate(words)]
    if finish:
        ds[-1] = m.Delta(rid, text=words[-1], token_ids=[10 + len(words) - 1], finished=True, finish_reason="length")
    ctl.pool._outputs(e, m.Outputs(ds))


async def _collect(gen) -> tuple[str, list]:
    text, finishes = "", []
    async for _, d in gen.events():
        text += d.text
        if d.finished:
            finishes.append(d.finish_reason)
    return text, finishes


def test_a_request_not_streamed_runs_again_from_its_start_when_its_worker_dies_mid_generation():
    async def go():
        ctl, _ = await _controller()
        tenant = ctl.tenants.authenticate(None)
        params = SamplingParams(max_tokens=4, seed=7)
        gen = await ctl.generate(ctl.models["m"], tenant, [[1, 2, 3]], params, 1, "cmpl-a", stream=False)
        (sub,) = gen.subs
        first = await _sent_to(ctl, sub)
        _tokens(ctl, first, sub.rid, ["dup", "licated"], finish=False)  # two tokens made, then the worker dies
        ctl.pool._dead(first)
        second = await _sent_to(ctl, sub, other_than=first.id)
        (again,) = [x for x in second.writer.sent if isinstance(x, m.NewRequest)]
        assert again.prompt_token_ids == [1, 2, 3] and again.params.seed == 7  # the same request, from its start
        _tokens(ctl, second, sub.rid, ["a", "b", "c", "d"], finish=True)
        text, finishes = await _collect(gen)
        assert text == "abcd" and finishes == ["length"]  # nothing of the dead run, nothing twice
        assert gen.completion_tokens == 4
        gen.close(200)

    asyncio.run(go())


def test_a_request_not_streamed_gets_a_503_after_every_try_failed():
    async def go():
        ctl, _ = await _controller()
        gen = await ctl.generate(ctl.models["m"], ctl.tenants.authenticate(None), [[1, 2]],
                                 SamplingParams(max_tokens=4), 1, "cmpl-b", stream=False)
        (sub,) = gen.subs
        seen = []
        for _ in range(MAX_ATTEMPTS):
            e = await _sent_to(ctl, sub, other_than=seen[-1] if seen else None)
            seen.append(e.id)
            _tokens(ctl, e, sub.rid, ["x"], finish=False)
            ctl.pool._dead(e)
        assert len(set(seen)) == MAX_ATTEMPTS
        with pytest.raises(ServingError) as ei:
            await _collect(gen)
        assert ei.value.status == 503 and "died" in ei.value.message
        assert ei.value.body()["error"]["message"] == ei.value.message  # OpenAI's error JSON
        gen.close(503)

    asyncio.run(go())


def test_a_stream_that_had_tokens_ends_with_the_error_and_is_not_run_again():
    async def go():
        ctl, _ = await _controller()
        gen = await ctl.generate(ctl.models["m"], ctl.tenants.authenticate(None), [[1, 2]],
                                 SamplingParams(max_tokens=4), 1, "chatcmpl-c")
        (sub,) = gen.subs
        e = await _sent_to(ctl, sub)
        _tokens(ctl, e, sub.rid, ["sent"], finish=False)
        got = []
        with pytest.raises(ServingError) as ei:
            async for _, d in gen.events():
                got.append(d.text)
                if len(got) == 1:
                    ctl.pool._dead(e)
        assert got == ["sent"] and ei.value.status == 503
        await asyncio.sleep(0.05)
        assert not any(sub.rid in x.subs for x in ctl.pool.engines.values())  # not sent again
        gen.close(503)

    asyncio.run(go())


def test_an_engine_crash_that_fails_a_request_not_streamed_sends_it_again():
    """A worker whose step crashed answers its requests with an engine error before it exits: as a death."""
    async def go():
        ctl, _ = await _controller()
        gen = await ctl.generate(ctl.models["m"], ctl.tenants.authenticate(None), [[1, 2]],
                                 SamplingParams(max_tokens=2), 1, "cmpl-d", stream=False)
        (sub,) = gen.subs
        e = await _sent_to(ctl, sub)
        _tokens(ctl, e, sub.rid, ["x"], finish=False)
        ctl.pool._outputs(e, m.Outputs([m.Delta(sub.rid, finished=True, finish_reason="error",
                                                error="engine failed: boom", error_kind="engine")]))
        second = await _sent_to(ctl, sub, other_than=e.id)
        _tokens(ctl, second, sub.rid, ["o", "k"], finish=True)
        assert (await _collect(gen)) == ("ok", ["length"])
        gen.close(200)

    asyncio.run(go())


def test_a_request_whose_engines_crash_twice_is_not_sent_to_a_third():
    """A crashed step may be the request's own doing (each crash ends every stream of that worker): one more engine,
    then the error."""
    async def go():
        ctl, _ = await _controller()
        gen = await ctl.generate(ctl.models["m"], ctl.tenants.authenticate(None), [[1, 2]],
                                 SamplingParams(max_tokens=2), 1, "cmpl-h", stream=False)
        (sub,) = gen.subs
        e = None
        for _ in range(CRASH_ATTEMPTS):
            e = await _sent_to(ctl, sub, other_than=e.id if e is not None else None)
            ctl.pool._outputs(e, m.Outputs([m.Delta(sub.rid, finished=True, finish_reason="error",
                                                    error="engine failed: boom", error_kind="engine")]))
        with pytest.raises(ServingError) as ei:
            await _collect(gen)
        assert ei.value.status == 503 and "boom" in ei.value.message and sub.attempts == CRASH_ATTEMPTS
        gen.close(503)

    asyncio.run(go())


def test_a_request_waiting_for_its_model_to_load_goes_elsewhere_when_that_engine_dies():
    """The engine a request waits on (its model loading there) dies: the request is placed again (here on the
    other engine), not refused with 503 'could not be registered ... died' while another engine could serve it."""
    async def go():
        ctl = Controller(ServerConfig(models=[], workers={"local": "none"}))
        await ctl.add_model(ModelSpec(name="m", path=None, engine={"kind": "pace"}, slo=SLO(ttft_s=5, tpot_s=1)))
        w0 = EngineHandle("w0", 0, "cpu", "node", 1000, 8 << 30, Wire())
        ctl.pool.engines["w0"] = w0
        task = asyncio.ensure_future(ctl.generate(ctl.models["m"], ctl.tenants.authenticate(None), [[1, 2]],
                                                  SamplingParams(max_tokens=2), 1, "cmpl-e", stream=False))
        for _ in range(100):
            if "m" in w0.replicas:
                break
            await asyncio.sleep(0.01)
        assert w0.replicas["m"].state == "loading" and not task.done()
        w1 = _engine(ctl, "w1", 1)  # another engine, the model ready there
        ctl.pool._dead(w0)
        gen = await asyncio.wait_for(task, 5)
        (sub,) = gen.subs
        assert sub.engine_id == "w1" and sub.rid in w1.subs
        gen.close(499)

    asyncio.run(go())


def test_requests_wait_for_a_local_worker_being_replaced_but_not_for_a_crash_loop():
    """EnginePool.replacing: a local slot whose worker died or is stopping (signalled) will have one again: a request
    waits for it; a slot whose workers keep dying at start may never: its requests are answered."""
    async def go():
        ctl = Controller(ServerConfig(models=[], workers={"local": "none"}))
        pool = ctl.pool
        pool.local_slots = 1
        assert pool.replacing()  # (no worker on slot 0 yet)
        e = _engine(ctl, "w0", 0)
        assert not pool.replacing()
        e.retiring = True
        assert pool.replacing()
        e.retiring, e.alive = False, False
        assert pool.replacing()
        pool._looping[0] = True
        assert not pool.replacing()

    asyncio.run(go())


def test_a_signalled_worker_is_let_go_once_idle_and_what_outlives_its_grace_is_handed_off():
    """A worker's STOPPING event (its SIGTERM): no new request goes there; it is told to stop (Shutdown) once it has
    none; after shutdown_grace_s what it still runs is aborted there and handed to another engine where nothing of
    it was sent (a queued request), else ended (a stream with tokens)."""
    from controller.worker import STOPPING

    async def go():
        ctl, (w0, w1, *_) = await _controller()
        for e in ctl.pool.engines.values():
            e.draining = e is not w0  # (both requests go to w0)
        tenant = ctl.tenants.authenticate(None)
        streamed = await ctl.generate(ctl.models["m"], tenant, [[1]], SamplingParams(max_tokens=9), 1, "chatcmpl-f")
        queued = await ctl.generate(ctl.models["m"], tenant, [[2]], SamplingParams(max_tokens=9), 1, "chatcmpl-g")
        for e in ctl.pool.engines.values():
            e.draining = False
        (s1,), (s2,) = streamed.subs, queued.subs
        assert s1.engine_id == s2.engine_id == "w0"
        _tokens(ctl, w0, s1.rid, ["a"], finish=False)
        ctl.pool._stats(w0, m.Stats({}, 0.0, 0, 0, events=[{"kind": STOPPING, "signal": 15}]))
        assert w0.retiring and w0.draining and not any(isinstance(x, m.Shutdown) for x in w0.writer.sent)
        ctl._hand_off(w0)  # (its grace is over)
        (abort,) = [x for x in w0.writer.sent if isinstance(x, m.Abort)]
        assert sorted(abort.request_ids) == sorted([s1.rid, s2.rid])
        assert isinstance(w0.writer.sent[-1], m.Shutdown)  # nothing left there: let go
        moved = await _sent_to(ctl, s2, other_than="w0")
        assert moved is not w0
        with pytest.raises(ServingError):
            async for _ in streamed.events():
                pass
        streamed.close(503)
        queued.close(499)

        idle = ctl.pool.engines["w2"]
        ctl.pool._stats(idle, m.Stats({}, 0.0, 0, 0, events=[{"kind": STOPPING, "signal": 15}]))
        assert isinstance(idle.writer.sent[-1], m.Shutdown)  # idle: let go at once

    asyncio.run(go())


def test_a_signalled_worker_waits_for_its_controller_as_long_as_the_controllers_grace():
    """The controller tells its workers how long a signalled one may wait for its word (stop_wait_s in Registered's
    settings): a shutdown_grace_s over 60 s used to be cut at the worker's own 60 s in a stop of the whole server."""
    from controller.worker import LOCAL_STOP_WAIT_S, stop_wait

    ctl = Controller(ServerConfig(models=[], workers={"local": "none"}, shutdown_grace_s=120))
    settings = ctl.pool.gpu_settings(m.Register(host="h", pid=1, device="cpu", memory_bytes=1 << 30))
    assert stop_wait(settings) == 150.0 > LOCAL_STOP_WAIT_S
    assert stop_wait({}) == stop_wait({"stop_wait_s": -1}) == stop_wait({"stop_wait_s": True}) == LOCAL_STOP_WAIT_S
