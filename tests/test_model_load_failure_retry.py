"""A model whose registration (load) failed: its requests hear why and when it is tried again (a 503 with
Retry-After), without loading it again each; it is tried again after a backoff that doubles while it keeps failing.

Controller state built by hand, as in tests/test_worker_death_retry.py: an engine whose writer records what the
controller sends, its answers given through the pool's own calls.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from controller import messages as m
from controller.config import SLO, ModelSpec, ServerConfig
from controller.errors import ServingError
from controller.pool import EngineHandle
from controller.service import LOAD_RETRY_S, Controller
from tests.fake_worker import Wire
from token_scheduler.request import SamplingParams


def _loads(e: EngineHandle) -> int:
    return sum(isinstance(x, m.LoadModel) for x in e.writer.sent)


async def _ask(ctl: Controller, e: EngineHandle, fail_with: str | None) -> ServingError:
    """A request for "m": its registration answered with `fail_with` if one is sent; the 503 it gets."""
    before = _loads(e)
    task = asyncio.ensure_future(ctl.generate(ctl.models["m"], ctl.tenants.authenticate(None), [[1, 2]],
                                              SamplingParams(max_tokens=2), 1, "cmpl-x", stream=False))
    for _ in range(100):
        if task.done() or _loads(e) > before:
            break
        await asyncio.sleep(0.01)
    if _loads(e) > before:
        assert fail_with is not None, "the failing model was loaded again"
        ctl.pool._loaded(e, m.ModelLoaded("m", False, error=fail_with))
    with pytest.raises(ServingError) as ei:
        await task
    return ei.value


def test_requests_for_a_model_that_failed_to_load_hear_why_and_when_without_loading_it_again():
    async def go():
        ctl = Controller(ServerConfig(models=[], workers={"local": "none"}))
        await ctl.add_model(ModelSpec(name="m", path=None, engine={"kind": "pace"}, slo=SLO(ttft_s=5, tpot_s=1)))
        e = EngineHandle("w0", 0, "cpu", "node", 1000, 8 << 30, Wire())
        ctl.pool.engines["w0"] = e

        err = await _ask(ctl, e, "OSError: unexpected end of file")
        assert _loads(e) == 1
        assert err.status == 503 and err.code == "model_load_failed"
        assert "unexpected end of file" in err.message and f"tried again in {LOAD_RETRY_S:.0f} s" in err.message
        assert err.retry_after == LOAD_RETRY_S

        again = await _ask(ctl, e, None)  # within the backoff: answered at once, nothing loaded
        assert _loads(e) == 1 and again.code == "model_load_failed" and "unexpected end of file" in again.message
        assert 1 <= again.retry_after <= LOAD_RETRY_S
        assert "tried again in" in ctl.load_errors()["m"]  # (/health, /admin/models' load_error)

        ctl._failures["m"]["w0"] = time.monotonic()  # the backoff is over: the next request loads it again
        third = await _ask(ctl, e, "OSError: still broken")
        assert _loads(e) == 2 and "still broken" in third.message
        assert third.retry_after == 2 * LOAD_RETRY_S  # failing again: the next try waits twice as long

    asyncio.run(go())
