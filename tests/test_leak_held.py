"""The fault suite's `held()` (what the controller and the engines still hold) reads the state as it is when it is
asked, not the engines' view of a heartbeat or two before: the parts poll it until it is all zero, and a stale zero
(taken before the requests started) or a stale count (taken before they ended) made them pass or wait wrongly."""

from __future__ import annotations

import asyncio

from load_tests import faults
from load_tests.faults import Stream, open_stream


def test_held_reads_the_state_after_it_is_asked():
    # a 2 s heartbeat: a view taken before the question is seconds old (the engines' stats come with it)
    workers = {"local": "cpu", "heartbeat_s": 2.0, "dead_after_s": 20.0, "standby": False}
    with faults.target(pace_s=0.02, max_num_seqs=8, ttft_s=60.0, workers=workers) as t:
        async def body():
            ss = [Stream() for _ in range(4)]
            # ~4 s each at 20 ms a token: two heartbeats, so a view a heartbeat old is not the one asked for
            tasks = [asyncio.ensure_future(open_stream(t, 200, s=s)) for s in ss]
            assert await faults._until(lambda: all(s.t_first is not None for s in ss), 60) is not None
            during = await asyncio.to_thread(t.held)
            done = await asyncio.gather(*tasks)
            after = await asyncio.to_thread(t.held)
            return done, during, after

        done, during, after = asyncio.run(body())
    assert all(s.done and not s.error and s.tokens == 200 for s in done), [(s.error, s.tokens) for s in done]
    assert during["inflight"] == 4 and during["running"] == 4 and during["kv_blocks_used"] > 0, during
    assert during["tenant_inflight"] == 4, during  # the suite tenant's concurrency slots
    assert not any(after.values()), after
