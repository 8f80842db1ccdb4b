"""The lower bound on the steps a model's SLOs force (load_tests/models_bound.py): the lazy schedule."""

from load_tests.models_bound import bound, lazy_steps


def test_lazy_schedule_steps_only_when_a_token_is_due_and_serves_every_arrived_request():
    # A arrives at 0 (prompt 5, 3 tokens), B at 0.2 (prompt 4, 2 tokens); TTFT 1 s, TPOT 0.5 s.
    steps = lazy_steps([(0.0, 5, 3), (0.2, 4, 2)], ttft=1.0, tpot=0.5)
    assert [t for t, _ in steps] == [1.0, 1.5, 2.0]  # A's first token due at 1.0 forces a step: B rides along
    assert [s[0] for _, s in steps] == [2, 2, 1]  # B's two tokens made by 1.5, ahead of its 1.7 deadline
    assert steps[0][1] == (2, 9, 9, 5 * 5 + 4 * 4)  # both prefills in the first step
    assert steps[1][1] == (2, 2, 5 + 1 + 4 + 1, 0)


def test_a_request_arriving_after_the_others_are_done_starts_its_own_steps():
    steps = lazy_steps([(0.0, 2, 1), (5.0, 2, 2)], ttft=1.0, tpot=0.5)
    assert [t for t, _ in steps] == [1.0, 6.0, 6.5]


def test_the_bound_grows_with_the_models_served():
    small = bound("1x7b,1x1.5b", seed=0, rate=0.1, duration=120)
    big = bound("2x7b,3x1.5b", seed=0, rate=0.1, duration=120)
    assert 0 < small["gpu_s_per_s"] < big["gpu_s_per_s"]
    assert small["weights_floor_s_per_s"] < small["gpu_s_per_s"]


def test_engine_costs_interpolate_the_measured_batches():
    from load_tests.models_bound import EngineCosts
    from load_tests.workload import spec_for
    from token_scheduler.cost_model import StepShape

    ec, spec = EngineCosts(), spec_for("qwen2", "7b")
    t1, t8, t4 = (ec.step_time(spec, StepShape(b, b, 0)) for b in (1, 8, 4))
    pts = dict(ec.size["7b"]["pts"])
    assert (t1, t8) == (pts[1], pts[8]) and t1 < t4 < t8
    assert ec.step_time(spec, StepShape(1, 257, 256)) > t1  # a 256-token prefill costs on top
