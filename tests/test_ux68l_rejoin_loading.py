"""A remote worker whose connection drops while the step thread hosts a model (a LoadModel under way) loads that
model when the controller registers it again after the worker rejoins. The hosting future, already taken off the
worker's queue, was never resolved: the model stayed "loading" on the worker, which ignored the rejoined controller's
LoadModel of it, so the registration never became ready and its requests hung (seen in test_placement_live's log).

These tests play the controller's side of the protocol against a real `controller.worker.Worker`, its `host()` held
on a threading.Event while the connection drops."""

from __future__ import annotations

import asyncio
import threading

import pytest

from controller import messages as m
from controller.config import EngineOptions
from controller.hosting import HostedModels
from controller.worker import Worker
from load_tests.worker_harness import FakeController

PACE = EngineOptions(kind="pace", pace_s_per_token=0.001, max_model_len=64)


@pytest.fixture
def held_host(monkeypatch):
    """HostedModels.host held until `release` is set, its first call only; `entered` is set as it starts."""
    entered, release = threading.Event(), threading.Event()
    host = HostedModels.host

    def slow(self, *args, **kwargs):
        if not entered.is_set():
            entered.set()
            assert release.wait(10)
        return host(self, *args, **kwargs)

    monkeypatch.setattr(HostedModels, "host", slow)
    return entered, release


async def _until(check, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)


async def _rejoin_loads(entered: threading.Event, release: threading.Event, finish_before_rejoin: bool) -> None:
    ctl = FakeController()
    server = await asyncio.start_server(ctl.handle, "127.0.0.1", 0)
    worker = Worker(("127.0.0.1", server.sockets[0].getsockname()[1]), "cpu")
    loop = asyncio.get_running_loop()
    session = asyncio.create_task(worker._session())
    try:
        await asyncio.wait_for(ctl.connected.wait(), 10)
        ctl.send(m.LoadModel("a", None, PACE))
        assert await loop.run_in_executor(None, entered.wait, 10)  # the step thread hosts it, held
        ctl.connected.clear()
        ctl.writer.close()  # the connection drops meanwhile
        with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
            await asyncio.wait_for(session, 10)
        if finish_before_rejoin:  # its host() ends before the worker joins again
            release.set()
            await _until(lambda: "a" in worker.models)
        pool = worker.models
        session = asyncio.create_task(worker._session())  # the worker joins again
        await asyncio.wait_for(ctl.connected.wait(), 10)
        ctl.send(m.LoadModel("a", None, PACE))  # and the controller registers the model there again
        if not finish_before_rejoin:
            await asyncio.sleep(0.2)  # (the new LoadModel reaches the worker while the old host() still runs)
            release.set()
        loaded = await ctl.expect(m.ModelLoaded, timeout=5)
        assert loaded.ok and loaded.model == "a", loaded
        assert "a" in worker.models and not worker._loading
        assert worker.models is pool  # the pool kept: no second one, the first unclosed, its model in no view
    finally:
        release.set()
        if not session.done():
            ctl.send(m.Shutdown())
        await asyncio.wait_for(asyncio.gather(session, return_exceptions=True), 10)
        worker.models.close()
        worker._step_thread.shutdown(wait=True)
        worker._load_thread.shutdown(wait=True)
        server.close()
        await server.wait_closed()


def test_a_model_hosted_while_the_connection_dropped_is_loaded_on_rejoin(held_host):
    """Its host() ended before the worker joined again (the worker says it holds the model; the controller
    registers it there): answered at once."""
    asyncio.run(_rejoin_loads(*held_host, finish_before_rejoin=True))


def test_a_model_still_hosting_when_the_worker_rejoins_is_loaded_once_it_is_hosted(held_host):
    """The rejoined controller's LoadModel comes while the dropped connection's host() still runs: answered once
    that host() ends, with its engine, in the pool the worker kept (a new pool was made beside the one that host()
    went on in; hosting it a second time in one pool failed: "already hosted")."""
    asyncio.run(_rejoin_loads(*held_host, finish_before_rejoin=False))
