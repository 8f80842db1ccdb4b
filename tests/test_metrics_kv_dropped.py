"""/metrics' preemption counters from the engines' cumulative counts: `tokenpool_num_preemptions_total` and, of
those, `tokenpool_kv_dropped_total` (KV dropped where the host KV pages were full), parsed by prometheus_client."""

from prometheus_client.parser import text_string_to_metric_families

from controller.metrics import Metrics


def _values(m: Metrics) -> dict[tuple[str, str, str], float]:
    return {(s.name, s.labels["engine"], s.labels["model"]): s.value
            for f in text_string_to_metric_families(m.render().decode())
            for s in f.samples if s.name in ("tokenpool_num_preemptions_total", "tokenpool_kv_dropped_total")}


def test_dropped_kv_is_counted_apart_and_survives_an_engine_restart():
    m = Metrics()
    m.engine_stats("w0", "a", {"num_preemptions": 0})  # a worker without the count: the series exists at 0
    assert _values(m)[("tokenpool_kv_dropped_total", "w0", "a")] == 0
    m.engine_stats("w0", "a", {"num_preemptions": 3, "num_kv_dropped": 1})
    m.engine_stats("w0", "b", {"num_preemptions": 2, "num_kv_dropped": 2})
    m.engine_stats("w0", "a", {"num_preemptions": 5, "num_kv_dropped": 2})
    m.engine_stats("w0", "a", {"num_preemptions": 1, "num_kv_dropped": 0})  # restarted: counts anew
    v = _values(m)
    assert v[("tokenpool_num_preemptions_total", "w0", "a")] == 6
    assert v[("tokenpool_kv_dropped_total", "w0", "a")] == 2
    assert v[("tokenpool_kv_dropped_total", "w0", "b")] == 2
    m.forget_engine_model("w0", "a")
    m.engine_stats("w0", "a", {"num_preemptions": 4, "num_kv_dropped": 3})  # its first Stats again: all of it
    v = _values(m)
    assert (v[("tokenpool_num_preemptions_total", "w0", "a")], v[("tokenpool_kv_dropped_total", "w0", "a")]) == (4, 3)
