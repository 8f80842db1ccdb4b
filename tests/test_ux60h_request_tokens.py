"""A request's tokens in flight (GET /admin/requests, the dashboard's Requests view) are every choice's: a request of
n choices counted only its choices still generating, so as each ended its tokens left the count, which went down
(and its tokens/s with it), and at the end showed the last choice's alone. Seen live: n=2 through the API, the count
went 4, 3, ... 50 where the reply's usage said 55."""

from __future__ import annotations

import time
from types import SimpleNamespace

from controller.dashboard import views
from controller.dashboard.activity import Activity


def _sub(rid: str, generated: int, done: bool, earlier: int = 0) -> SimpleNamespace:
    return SimpleNamespace(rid=rid, generated=generated, earlier=earlier, done=done, engine_id="w0", model="m",
                           params=SimpleNamespace(lora=None))


def test_a_requests_tokens_count_its_choices_already_done():
    done, live = _sub("req-1-0", 5, True), _sub("req-1-1", 3, False, earlier=2)
    gen = SimpleNamespace(subs=[done, live], tenant=SimpleNamespace(name="t"), t_first=time.monotonic() - 2.0)
    act = Activity()
    act.started(gen, "req-1")
    ctl = SimpleNamespace(activity=act, pool=SimpleNamespace(engines={"w0": SimpleNamespace(subs={live.rid: live})}))
    [r] = views.requests_view(ctl)
    assert (r["id"], r["tokens"], r["state"], r["engines"], r["choices"]) == ("req-1", 5 + 3 + 2, "running", ["w0"], 1)
    assert 4.0 < r["tokens_per_s"] < 5.5, r
    live.done = True  # (the request's last choice ended: it is no longer listed)
    assert views.requests_view(ctl) == []


def test_a_models_tokens_do_not_dip_as_a_requests_choices_end():
    """The pool view's tokens/s per model is the rate of `model_tokens`: ended requests' (the tokens counter, counted
    as a request ends) and those in flight. It counted only the engine requests still on an engine, so as one of a
    request's n choices ended its tokens left the count until the whole request ended (the rate dipped, then jumped).
    Every choice's count now, a continuation's earlier tokens too, and never an Ollama load's."""
    from controller.metrics import Metrics

    done, live = _sub("req-1-0", 5, True), _sub("req-1-1", 3, False, earlier=2)
    gen = SimpleNamespace(subs=[done, live], tenant=SimpleNamespace(name="t"), t_first=time.monotonic(), load=False)
    load = SimpleNamespace(subs=[_sub("load-1-0", 1, False)], tenant=SimpleNamespace(name="t"), t_first=None, load=True)
    act, metrics = Activity(), Metrics()
    act.started(gen, "req-1")
    act.started(load, "load-1")
    engines = {"w0": SimpleNamespace(subs={live.rid: live, "load-1-0": load.subs[0]})}
    ctl = SimpleNamespace(activity=act, metrics=metrics, pool=SimpleNamespace(engines=engines))
    assert views.model_tokens(ctl, act) == {"m": 5 + 3 + 2}
    live.generated += 4  # the other choice goes on
    assert views.model_tokens(ctl, act) == {"m": 5 + 7 + 2}
    # the request ends: its tokens move to the counter, the same total
    metrics.generation_tokens.labels("m", "t").inc(5 + 7 + 2)
    live.done = True
    del engines["w0"].subs[live.rid]
    act.live.pop("req-1")
    assert views.model_tokens(ctl, act) == {"m": 5 + 7 + 2}
