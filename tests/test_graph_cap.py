"""The bound on CUDA graphs per graph key (token_scheduler/graph_cap.py), over a `graphs` dict of fake graphs: what
ModelRunner._capture / _decode_graph / launch_decode / read do to it, without a GPU (tests/test_gpu_engine.py runs
the real graphs under a tiny cap)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from token_scheduler import graph_cap
from token_scheduler.graph_cap import CAPTURES
from token_scheduler.runner import LaunchedDecode, ModelRunner

KEY, OTHER = ("qwen2", "bf16"), ("llama", "bf16")
MB = 1 << 20


def capture(graphs: dict, cap: int, key, slot: int, bucket: int, nbytes: int = MB):
    """What ModelRunner._capture does around the capture itself."""
    evicted = graph_cap.make_room(graphs, key, cap)
    g = SimpleNamespace(nbytes=nbytes, in_flight=0, last_replay=0)
    graph_cap.added(graphs, (key, slot, bucket), g, 0.01, first=slot == 0)
    return g, evicted


def held(graphs: dict, key) -> set[tuple]:
    return set(graph_cap.graph_ids(graphs, key))


def test_a_capture_over_the_cap_evicts_the_least_recently_replayed():
    graphs = {("warm", KEY): {1, 2}, ("pool", KEY): object()}
    for b in (1, 2, 4):
        capture(graphs, 3, KEY, 0, b)
    assert held(graphs, KEY) == {(KEY, 0, 1), (KEY, 0, 2), (KEY, 0, 4)}
    _, evicted = capture(graphs, 3, KEY, 0, 8)
    assert evicted == [(KEY, 0, 1)]  # the oldest, never replayed since its capture
    assert held(graphs, KEY) == {(KEY, 0, 2), (KEY, 0, 4), (KEY, 0, 8)}
    assert ("warm", KEY) in graphs and ("pool", KEY) in graphs  # the shape's pool and warm set stay


def test_a_replay_refreshes_recency():
    graphs: dict = {}
    g1, _ = capture(graphs, 3, KEY, 0, 1)
    capture(graphs, 3, KEY, 0, 2)
    capture(graphs, 3, KEY, 0, 4)
    graph_cap.touch(g1)  # bucket 1 replayed: bucket 2 is now the least recently used
    _, evicted = capture(graphs, 3, KEY, 1, 1)
    assert evicted == [(KEY, 0, 2)]
    assert (KEY, 0, 1) in graphs


def test_graphs_in_flight_are_never_evicted():
    graphs: dict = {}
    g1, _ = capture(graphs, 2, KEY, 0, 1)
    capture(graphs, 2, KEY, 0, 2)
    g1.in_flight = 1  # a launched step replayed it and its tokens are not read yet
    _, evicted = capture(graphs, 2, KEY, 0, 4)
    assert evicted == [(KEY, 0, 2)]  # the next least recent instead
    g3 = graphs[(KEY, 0, 4)]
    g3.in_flight = 1
    _, evicted = capture(graphs, 2, KEY, 0, 8)  # every graph of the key in flight: none goes, the count is over
    assert evicted == [] and len(held(graphs, KEY)) == 3
    g1.in_flight = g3.in_flight = 0  # read
    _, evicted = capture(graphs, 2, KEY, 0, 16)  # the cap is met again: room for one more, so two go
    assert evicted == [(KEY, 0, 1), (KEY, 0, 4)]
    assert held(graphs, KEY) == {(KEY, 0, 8), (KEY, 0, 16)}


def test_the_cap_is_per_graph_key():
    graphs: dict = {}
    for b in (1, 2):
        capture(graphs, 2, OTHER, 0, b)
    for b in (1, 2, 4, 8):
        capture(graphs, 2, KEY, 0, b)
    assert len(held(graphs, OTHER)) == 2 and held(graphs, KEY) == {(KEY, 0, 4), (KEY, 0, 8)}


def test_counters_hold_the_bytes_kept_and_count_evictions():
    graphs: dict = {}
    capture(graphs, 2, KEY, 0, 1, nbytes=1 * MB)
    capture(graphs, 2, KEY, 0, 32, nbytes=32 * MB)
    capture(graphs, 2, OTHER, 0, 8, nbytes=8 * MB)
    assert graphs[CAPTURES][4] == 41 * MB and graphs[CAPTURES][5] == 0
    capture(graphs, 2, KEY, 1, 16, nbytes=16 * MB)  # bucket 1 goes
    captures, _, first, _, nbytes, evictions = graphs[CAPTURES]
    assert (captures, first, nbytes, evictions) == (4, 3, 56 * MB, 1)
    assert nbytes == sum(graphs[k].nbytes for k in held(graphs, KEY) | held(graphs, OTHER))
    graph_cap.drop_key(graphs, KEY)  # the shape's last model unregistered: its graphs go, not as evictions
    assert held(graphs, KEY) == set() and graphs[CAPTURES][4] == 8 * MB and graphs[CAPTURES][5] == 1


def test_an_evicted_graph_is_no_longer_referenced():
    """Eviction drops the dict's reference, the only one the runner keeps: the graph (and the tensors it holds)
    is freed at once, its memory back to the pool for the capture that follows."""
    import gc
    import weakref

    class Graph:  # (a SimpleNamespace cannot be weakly referenced)
        def __init__(self):
            self.nbytes, self.in_flight, self.last_replay = MB, 0, 0
            self.logits = torch.zeros(4)

    graphs: dict = {}
    g = Graph()
    graph_cap.added(graphs, (KEY, 0, 1), g, 0.0, True)
    ref = weakref.ref(g)
    del g
    capture(graphs, 1, KEY, 0, 2)
    gc.collect()
    assert ref() is None


def test_read_releases_the_graph_a_launched_step_replayed():
    """launch_decode marks the graph it replayed in flight (LaunchedDecode.graph); read unmarks it, once."""
    g = SimpleNamespace(nbytes=MB, in_flight=2, last_replay=0)  # two steps of it launched
    ids = torch.tensor([3, 4])
    step = LaunchedDecode(SimpleNamespace(chunks=[]), ids, ids, None, g)
    ModelRunner.read(step)
    assert g.in_flight == 1 and step.graph is None
    ModelRunner.read(step)  # (a second read of the same step changes nothing)
    assert g.in_flight == 1


def test_row_graphs_are_capped_apart_from_decode_graphs_and_dropped_with_their_shape():
    """A shape's row graphs (prefill steps) are kept under their own key: capturing them never evicts a decode graph
    (nor the reverse), each kind is held to the cap, and dropping the shape drops both kinds."""
    runner = SimpleNamespace(graph_key=KEY, slot_key=0, lane=0)
    ids = {b: ModelRunner._graph_id(runner, b) for b in (1, 2, ("rows", 64), ("rows", 256))}
    assert ids[1] == (KEY, 0, 1) and ids[("rows", 64)][0] == graph_cap.rows_key(KEY) != KEY
    graphs: dict = {}
    for slot in (0, 1):
        runner.slot_key = slot
        for b in (1, 2, ("rows", 64), ("rows", 256)):
            gid = ModelRunner._graph_id(runner, b)
            graph_cap.make_room(graphs, gid[0], 4)
            graph_cap.added(graphs, gid, SimpleNamespace(nbytes=MB, in_flight=0, last_replay=0), 0.01, first=slot == 0)
    assert len(held(graphs, KEY)) == 4 and len(held(graphs, graph_cap.rows_key(KEY))) == 4  # nothing evicted
    runner.slot_key = 2
    gid = ModelRunner._graph_id(runner, ("rows", 64))
    assert graph_cap.make_room(graphs, gid[0], 4) == [(graph_cap.rows_key(KEY), 0, ("rows", 64))]
    assert len(held(graphs, KEY)) == 4  # the decode graphs stay
    # co-stepping's lane 1: the same shape's graphs under a key of their own, capped apart (a second set may run
    # beside the first), dropped with the shape
    runner.lane = 1
    lane1 = graph_cap.lane_key(KEY, 1)
    assert lane1 != KEY and graph_cap.lane_key(KEY, 0) == KEY
    for b in (1, 2):
        gid = ModelRunner._graph_id(runner, b)
        assert gid == (lane1, 2, b) and graph_cap.make_room(graphs, gid[0], 4) == []
        graph_cap.added(graphs, gid, SimpleNamespace(nbytes=MB, in_flight=0, last_replay=0), 0.01, first=True)
    assert len(held(graphs, lane1)) == 2 and len(held(graphs, KEY)) == 4
    graphs[("pool", lane1)] = graphs[("warm", lane1)] = object()
    capture(graphs, 4, OTHER, 0, 1)
    graph_cap.drop_key(graphs, KEY)
    assert not held(graphs, KEY) and not held(graphs, graph_cap.rows_key(KEY)) and held(graphs, OTHER)
    assert not held(graphs, lane1) and ("pool", lane1) not in graphs and ("warm", lane1) not in graphs
    assert graph_cap.counters(graphs)[4] == MB  # OTHER's one graph
