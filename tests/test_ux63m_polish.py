"""Found by session 63's user pass. A local worker whose controller closes the connection before letting it join (a first run stopped while it makes
its models: the controller holds the worker's registration until then) ends quietly: it logged a WARNING,
"controller connection: 0 bytes read on a total of 4 expected bytes", after the server's own "stopped"."""

from __future__ import annotations

import asyncio
import logging

import pytest

from controller.worker import Worker


async def _closing_controller(join: bool = False):
    """A controller that reads a worker's registration, then closes its connection unanswered (`join`: after letting
    it join, a moment later)."""
    from controller import messages as m

    async def handle(reader, writer):
        await m.read_message(reader)
        if join:
            m.write_message(writer, m.Registered(worker_id="w0", heartbeat_s=30.0, settings={"budget_gb": 0.1}))
            await writer.drain()
            await asyncio.sleep(0.3)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize("slot", [0, None])
def test_a_connection_closed_before_joining(slot, caplog):
    async def go():
        server, port = await _closing_controller()
        w = Worker(("127.0.0.1", port), "cpu", slot=slot)
        if slot is None:  # a remote worker retries: stop it once it has met the closed connection
            w._signalled = True
        with caplog.at_level(logging.INFO, logger="tokenpool"):
            await asyncio.wait_for(w.run(), 30)
        server.close()

    asyncio.run(go())
    said = [(r.levelname, r.getMessage()) for r in caplog.records if "controller" in r.getMessage()]
    if slot is not None:  # a local worker: its controller's stop is its own end
        assert said == [("INFO", "controller closed the connection before this worker joined: stopping")], said
    else:  # a remote worker's controller that goes away is worth a warning
        assert [lvl for lvl, _ in said] == ["WARNING"], said


def test_a_local_worker_whose_controller_goes_after_it_joined_warns(caplog):
    """The quiet end is only for a controller that never let the worker join: one lost after that is a WARNING."""
    async def go():
        server, port = await _closing_controller(join=True)
        w = Worker(("127.0.0.1", port), "cpu", slot=0)
        with caplog.at_level(logging.INFO, logger="tokenpool"):
            await asyncio.wait_for(w.run(), 30)
        server.close()

    asyncio.run(go())
    said = [(r.levelname, r.getMessage()) for r in caplog.records if "controller" in r.getMessage()]
    assert [lvl for lvl, _ in said] == ["WARNING"], said


def test_a_warm_default_start_is_said_as_checking_not_making(tmp_path, monkeypatch):
    """The log's "accepting connections on URL: ... first" line: a warm start of the default said "making the
    default's models (on a first run)", which it does not."""
    from pathlib import Path

    from controller import serve
    from controller.config import default_config
    from controller.real_model import MARKER

    monkeypatch.setenv("TOKENPOOL_CACHE", str(tmp_path))
    cfg = default_config()
    assert serve.default_doing(cfg) == "making the default's models (on a first run)"
    for m in cfg.models:
        Path(m.path).mkdir()
        (Path(m.path) / "config.json").write_text("{}")
    (Path(cfg.models[0].path) / MARKER).write_text("{}")
    assert serve.default_doing(cfg) == "checking the default's models"
