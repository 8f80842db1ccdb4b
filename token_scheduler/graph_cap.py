"""How many captured CUDA graphs a runner's `graphs` dict keeps per graph key, and which one goes first.

A captured decode graph holds its output (the logits: batch x vocabulary x 4 B, ~20 MB at bucket 32 for a 152k
vocabulary) in its shape's graph memory pool, outside the VRAM arena, for as long as it lives. A pooled engine
captures one graph per (shape, weight-slot offset, bucket) it meets, so without a bound that memory grows with
every offset a shape ever lands at. At most `cap` graphs of a key are kept: before a capture over the cap, the
least recently replayed graph of the key goes -- never one a step in flight replayed (a launched decode whose
tokens the host has not read yet). Dropping the dict entry drops the last reference to the graph and its tensors,
so its memory goes back to the pool, where the capture that follows reuses it.

Plain Python over the dict (unit-tested without a GPU). Graph entries are the dict's 3-tuple keys (graph key,
weight slot, bucket: `ModelRunner._graph_id`); every other key is shorter (`CAPTURES`, ("warm", key),
("pool", key)). A graph value has `nbytes` (its output bytes), `last_replay` (set by `touch`) and `in_flight`
(launched steps that replayed it and are not read yet).
"""

from __future__ import annotations

import itertools

CAPTURES = ("captures",)  # the key of the capture counters in a `graphs` dict
# the counters: captures and their host seconds, those of them that were a shape's first at that bucket (with
# warm-up forwards, and any first-use compile), the output bytes the graphs kept now hold, graphs evicted
CAPTURES_ZERO = (0, 0.0, 0, 0.0, 0, 0)

_tick = itertools.count(1)  # recency: a global counter, cheaper than a clock and never equal twice


def counters(graphs: dict) -> list:
    return graphs.setdefault(CAPTURES, list(CAPTURES_ZERO))


def graph_ids(graphs: dict, graph_key: object) -> list[tuple]:
    return [k for k in graphs if len(k) == 3 and k[0] == graph_key]


def touch(g) -> None:
    """`g` was just replayed (or captured): the last of its key to be evicted."""
    g.last_replay = next(_tick)


def make_room(graphs: dict, graph_key: object, cap: int) -> list[tuple]:
    """Evict the least recently replayed graphs of `graph_key` not in flight until fewer than `cap` remain (room
    for one capture); the ids evicted. When every one left is in flight the count stays over: the cap is met
    again at a later capture, once they are read."""
    ids = graph_ids(graphs, graph_key)
    over = len(ids) - cap + 1
    if over <= 0:
        return []
    idle = sorted((k for k in ids if not graphs[k].in_flight), key=lambda k: graphs[k].last_replay)
    gone = idle[:over]
    done = counters(graphs)
    for k in gone:
        done[4] -= graphs.pop(k).nbytes
        done[5] += 1
    return gone


def added(graphs: dict, gid: tuple, g, seconds: float, first: bool) -> None:
    """Keep a graph just captured under `gid` and count it."""
    graphs[gid] = g
    touch(g)
    done = counters(graphs)
    done[0] += 1
    done[1] += seconds
    if first:
        done[2] += 1
        done[3] += seconds
    done[4] += g.nbytes


def rows_key(graph_key: object) -> tuple:
    """The key a shape's row graphs (prefill steps, `ModelRunner._row_piece`) are kept and capped under: apart from its
    decode graphs, so neither kind evicts the other's working set (each slot a shape lands in has a few of each)."""
    return ("rows", graph_key)


def lane_key(graph_key: object, lane: int) -> object:
    """The key of a shape's graphs on co-stepping lane `lane` (`ModelRunner.lane`): lane 0's is the shape's own;
    lane 1's are kept, capped and pooled apart, so a step on one lane never shares graph memory with one on the
    other that runs at the same time."""
    return graph_key if lane == 0 else ("lane", lane, graph_key)


def drop_key(graphs: dict, graph_key: object) -> None:
    """Forget every graph of `graph_key` (decode and row graphs, on every lane) and their pools (no model of that shape
    is left); not counted as evictions."""
    keys = [lane_key(k, lane) for k in (graph_key, rows_key(graph_key)) for lane in (0, 1)]
    for key in keys:
        for k in graph_ids(graphs, key):
            counters(graphs)[4] -= graphs.pop(k).nbytes
        graphs.pop(("pool", key), None)
        graphs.pop(("warm", key), None)
