"""A resource flapping between Degraded and Ready (ux64d): each flip posted a Kubernetes Event of its own (a Warning
on turning Degraded, a Normal on recovering), a `kubectl describe` line each, without end (kopf makes each a new Event
object, and the operator's Role may only create events: no `count` to bump on the one before, as client-go's recorder
does). Now an event that repeats one posted for the object within EVENT_REPEAT_S (10 minutes) is counted, not posted:
the first Degraded and the first recovery are posted; past the window, a round that finds the object still in the
state the last flip turned it to posts that flip's event, saying how many went unposted, so the last event never
tells a recovery that did not last. The status conditions follow every flip. On kmock's emulator with a fake
controller, the operator run by kopf in-process (as tests/test_ux62d_operator.py); and rounds as kopf runs them."""

from __future__ import annotations

import threading
import uuid

import pytest

kopf = pytest.importorskip("kopf")
kmock = pytest.importorskip("kmock")

from tests.kmock_util import SECRETS, operator_world, pace_model_serving  # noqa: E402
from tests.operator_events import captured, posted  # noqa: E402
from tests.test_operator_e2e import Operator, _until  # noqa: E402
from tests.test_operator_lifecycle import _reason, _true  # noqa: E402

PORTS = range(28640, 28660)
FLIPS = 6
LIVE_FLIPS = 2  # (on kmock: each flip waits for the operator's round, ~1 s; the second is counted, not posted)


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_a_model_flapping_between_degraded_and_ready_posts_its_first_turns_and_then_its_count(
        tmp_path, monkeypatch):
    """A PooledModel whose load fails, then succeeds, twice (an engine that runs out of memory loading it, then
    not): its condition follows each flip (LoadFailed, Serving), and `kubectl describe` shows its first Ready, its
    first Warning and its first recovery, not 3 more lines. Left Degraded a third time, a round past the window
    (shortened here) posts the Warning again with the count: the last event is not the recovery."""
    from controller.operator import handlers

    async with operator_world(tmp_path, monkeypatch, port_range=PORTS, secrets=SECRETS) as w:
        kube, fake = w.kube, w.fake
        async with Operator():
            await pace_model_serving(kube)

            async def fail() -> None:
                fake.models["m"].update(engines=[], load_error="CUDA out of memory")
                m = await _until("m LoadFailed", lambda: _reason(kube, "pooledmodels", "m", "LoadFailed"))
                assert _true(m)["type"] == "Degraded" and m["status"]["ready"] is False, m["status"]

            for _ in range(LIVE_FLIPS):
                await fail()
                fake.models["m"].update(engines=["e0"], load_error=None)
                m = await _until("m Serving", lambda: _reason(kube, "pooledmodels", "m", "Serving"))
                assert _true(m)["type"] == "Ready" and m["status"]["ready"] is True, m["status"]
            await fail()
            warning = "registered, but its last load failed: CUDA out of memory"
            assert [(e["type"], e["reason"], e["message"]) for e in posted(kube, "m")] == [
                ("Normal", "Serving", "on 1 engine(s)"),
                ("Warning", "LoadFailed", warning),
                ("Normal", "Serving", "on 1 engine(s) (no longer Degraded: LoadFailed)")]

            monkeypatch.setattr(handlers, "EVENT_REPEAT_S", 0.0)  # (the window past)
            await _until("the Warning again", lambda: _at_least(kube, "m", 4))
            last = posted(kube, "m")[3]
            assert (last["type"], last["reason"], last["message"]) == (
                "Warning", "LoadFailed", f"{warning} ({LIVE_FLIPS} more times since the last such event, not posted)")


async def _at_least(kube, name: str, n: int) -> bool:
    return len(posted(kube, name)) >= n


def test_flapping_rounds_post_each_turn_once_a_window_and_the_state_it_stays_in(monkeypatch):
    """Rounds as kopf runs them: a model Ready, then Degraded and Ready six times. Posted: its Ready, the first
    Warning, the first recovery; the condition is each round's. Rounds that stay Degraded post nothing within the
    window; past it, one posts the Warning with its count, once; a Warning of another reason is posted at once."""
    from controller.operator import handlers

    events = captured(monkeypatch)
    body = {"kind": "PooledModel", "metadata": {"name": "m", "uid": str(uuid.uuid4())}}
    status: dict = {}

    def round_(state: str, reason: str) -> None:
        patch = kopf.Patch()
        handlers._write_status(body, patch, status, {}, state, reason, f"{reason}!", 1)
        status.update(patch.status)
        assert [(c["type"], c["reason"]) for c in status["conditions"] if c["status"] == "True"] == [(state, reason)]

    round_("Ready", "Serving")
    for _ in range(FLIPS):
        round_("Degraded", "ControllerUnavailable")
        round_("Ready", "Serving")
    round_("Degraded", "ControllerUnavailable")
    round_("Degraded", "ControllerUnavailable")  # (a round within the window: nothing)
    assert events == [("Normal", "Serving", "Serving!"),
                      ("Warning", "ControllerUnavailable", "ControllerUnavailable!"),
                      ("Normal", "Serving", "Serving! (no longer Degraded: ControllerUnavailable)")]

    monkeypatch.setattr(handlers, "EVENT_REPEAT_S", 0.0)
    round_("Degraded", "ControllerUnavailable")
    round_("Degraded", "ControllerUnavailable")  # (told: not again)
    assert events[3:] == [("Warning", "ControllerUnavailable",
                           f"ControllerUnavailable! ({FLIPS} more times since the last such event, not posted)")]
    monkeypatch.setattr(handlers, "EVENT_REPEAT_S", 600.0)
    round_("Degraded", "Unauthorized")  # (another reason: another event)
    assert events[4:] == [("Warning", "Unauthorized", "Unauthorized!")]
    uid = body["metadata"]["uid"]
    handlers._forget(kopf.Memo(locks_guard=threading.Lock()), uid)
    assert uid not in handlers._POSTED and uid not in handlers._UNTOLD
