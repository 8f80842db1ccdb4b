"""A real `controller.worker.Worker` against an in-process controller end, for tests and benchmarks of the
worker protocol without a controller."""

from __future__ import annotations

import asyncio

from controller import messages as m
from controller.worker import Worker


class FakeController:
    """The controller's end of one worker connection: frames in, frames out."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.writer: asyncio.StreamWriter | None = None
        self.connected = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reg = await m.read_message(reader)
        assert isinstance(reg, m.Register)
        m.write_message(writer, m.Registered("w0", heartbeat_s=5.0, settings={}))
        self.writer = writer
        self.connected.set()
        try:
            while True:
                msg = await m.read_message(reader)
                if not isinstance(msg, (m.Heartbeat, m.Stats)):
                    await self.inbox.put(msg)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    def send(self, *msgs: m.Message) -> None:
        """All in one write: the worker reads them back to back, as it does when the controller sends in one tick."""
        assert self.writer is not None
        self.writer.write(b"".join(m.encode(x) for x in msgs))

    async def expect(self, cls: type, timeout: float = 10.0):
        while True:
            msg = await asyncio.wait_for(self.inbox.get(), timeout)
            if isinstance(msg, cls):
                return msg

    async def quiet(self, s: float) -> list:
        out = []
        try:
            while True:
                out.append(await asyncio.wait_for(self.inbox.get(), s))
        except asyncio.TimeoutError:
            return out


async def with_worker(body, device: str = "cpu") -> None:
    """Run `await body(controller, worker)` with a worker connected to a FakeController; shut both down after."""
    ctl = FakeController()
    server = await asyncio.start_server(ctl.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    worker = Worker(("127.0.0.1", port), device)
    session = asyncio.create_task(worker._session())
    try:
        await asyncio.wait_for(ctl.connected.wait(), 30)
        await body(ctl, worker)
    finally:
        ctl.send(m.Shutdown())
        await asyncio.wait_for(session, 30)
        worker.models.close()
        worker._step_thread.shutdown(wait=True)
        worker._load_thread.shutdown(wait=True)
        server.close()
        await server.wait_closed()
