"""A worker's Stats go out as soon as they are taken, not one heartbeat later.

The step thread takes the snapshot (the engines' queues are not shared); `_beat` used to send the snapshot it had
asked for at the previous beat, so what the controller showed (/admin/engines, /metrics, the router's view of
each model's queue and KV) was a heartbeat late: at the default 1 s, a server that had just freed every KV block
said it held them for up to two seconds more."""

from __future__ import annotations

import asyncio
import time

from controller import messages as m
from controller.worker import Worker


def test_stats_are_sent_when_the_snapshot_is_taken_not_a_beat_later():
    async def body() -> list[tuple[float, m.Message]]:
        w = Worker(("127.0.0.1", 1))
        sent: list[tuple[float, m.Message]] = []
        w.send = lambda msg: sent.append((time.monotonic(), msg))  # type: ignore[method-assign]
        w._snapshot = lambda: m.Stats({"a": {"num_running": 1.0}}, 0.0, 0, 0)  # type: ignore[method-assign]
        t0 = time.monotonic()
        beat = asyncio.create_task(w._beat(60.0))  # one beat a minute: the first Stats must not wait for the second
        try:
            deadline = time.monotonic() + 20
            while not any(isinstance(x, m.Stats) for _, x in sent) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        finally:
            beat.cancel()
            w._step_thread.shutdown(wait=True)
            w._load_thread.shutdown(wait=True)
        return [(t - t0, x) for t, x in sent]

    sent = asyncio.run(body())
    stats = [(t, x) for t, x in sent if isinstance(x, m.Stats)]
    assert stats, f"no Stats within 20 s of the first heartbeat (sent: {[type(x).__name__ for _, x in sent]})"
    assert stats[0][1].models == {"a": {"num_running": 1.0}}
    assert isinstance(sent[0][1], m.Heartbeat)
