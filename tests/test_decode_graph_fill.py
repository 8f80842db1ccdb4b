"""`_DecodeGraph.fill`, the host side of a decode graph's replay: a step's rows written into the pinned buffers
(through their numpy views) and uploaded to the graph's static inputs (read in place, or copied). Checked on CPU tensors standing in for the
pinned and device buffers (the capture itself needs CUDA: tests/test_gpu_engine.py replays it)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.triton_interp import interpret
from token_scheduler.runner import _DecodeGraph


def _graph(batch: int, max_blocks: int, scratch: int, views: bool = True, fused: bool = False) -> _DecodeGraph:
    g = _DecodeGraph.__new__(_DecodeGraph)  # the buffers __init__ makes, on CPU, without the capture
    g.batch, g.turn, g.fused = batch, 0, fused
    g.hosts = [torch.full((5, batch), -7, dtype=torch.long) for _ in range(2)]
    g.host_bts = [torch.full((batch, max_blocks), -7, dtype=torch.int32) for _ in range(2)]
    g.hosts_np = [h.numpy() for h in g.hosts]
    g.host_bts_np = [h.numpy() for h in g.host_bts]
    g.pad = [[0], [0], [scratch], [0], [1]]
    g.dev = torch.zeros(5, batch, dtype=torch.long)
    g.bt = torch.full((batch, max_blocks), scratch, dtype=torch.int32)
    g.ctx32 = torch.ones(batch, dtype=torch.int32)
    # the pinned buffers as the device reads them in place (on CUDA `device_view`s at the same address; here the
    # CPU tensors themselves), or None: uploaded by copies
    g.views = [(h, b) for h, b in zip(g.hosts, g.host_bts)] if views else None
    g.lora = None  # (a graph of the model alone; `test_fill_writes_each_rows_adapter_slot` sets one)
    return g


def _req(tokens: list[int], blocks: list[int]):
    return SimpleNamespace(token_at=lambda p: tokens[p], block_ids=blocks)


def _step(reqs_pos):
    return SimpleNamespace(chunks=[SimpleNamespace(request=r, start=p) for r, p in reqs_pos])


@pytest.mark.parametrize("views", [True, False], ids=["in_place", "copies"])
def test_fill_writes_each_row_and_pads_the_rest(views):
    runner = SimpleNamespace(block_size=4, scratch_block=99)
    g = _graph(batch=4, max_blocks=6, scratch=99, views=views)
    a = _req(list(range(100, 110)), [5, 6, 7])  # position 9: block 7 (9 // 4 = 2), offset 1
    b = _req(list(range(200, 205)), [11, 12])  # position 4: block 12, offset 0
    g.fill(_step([(a, 9), (b, 4)]), runner)
    assert g.dev.tolist() == [[109, 204, 0, 0], [9, 4, 0, 0], [7, 12, 99, 99], [1, 0, 0, 0], [10, 5, 1, 1]]
    assert g.ctx32.tolist() == [10, 5, 1, 1]
    # real rows' tables up to the longest (shorter ones padded with the scratch block); padded rows untouched
    assert g.bt[:2, :3].tolist() == [[5, 6, 7], [11, 12, 99]]
    assert g.bt[2:].eq(99).all()
    assert g.turn == 1
    # the next step fills the other buffer, three rows now, one of them with the ids already on the device
    c = _req(list(range(300, 320)), [1, 2, 3, 4, 8])
    g.fill(_step([(c, 17), (a, 10), (b, 5)]), runner, ids=torch.tensor([7, 8, 9]))
    assert g.dev.tolist() == [[7, 8, 9, 0], [17, 10, 5, 0], [8, 7, 12, 99], [1, 2, 1, 0], [18, 11, 6, 1]]
    assert g.bt[:3, :5].tolist() == [[1, 2, 3, 4, 8], [5, 6, 7, 99, 99], [11, 12, 99, 99, 99]]
    assert g.turn == 0
    # a full batch: no padded column; the first buffer again, its old padding overwritten
    g.fill(_step([(a, 0), (b, 1), (c, 2), (a, 3)]), runner)
    assert g.dev.tolist() == [[100, 201, 302, 103], [0, 1, 2, 3], [5, 11, 1, 5], [0, 1, 2, 3], [1, 2, 3, 4]]
    # a continued step that lost a request: row i's input is the id the step before sampled at rows[i]
    g.fill(_step([(b, 6), (a, 11)]), runner, ids=torch.tensor([40, 41, 42]), rows=[2, 0])
    assert g.dev[:, :2].tolist() == [[42, 40], [6, 11], [12, 7], [2, 3], [7, 12]]


def test_fill_rows_writes_a_prefills_rows_and_the_sampled_rows():
    """A row graph's inputs (prefill steps): each prompt position a row with its request's table (runs of rows of one
    request written together), a sixth input row naming the rows whose logits the graph keeps, zeros after them."""
    runner = SimpleNamespace(block_size=4, scratch_block=99)
    g = _graph(batch=8, max_blocks=4, scratch=99)
    g.hosts = [torch.full((6, 8), -7, dtype=torch.long) for _ in range(2)]
    g.hosts_np = [h.numpy() for h in g.hosts]
    g.views = [(h, b) for h, b in zip(g.hosts, g.host_bts)]
    g.pad = [[0], [0], [99], [0], [1], [0]]
    g.dev = torch.zeros(6, 8, dtype=torch.long)
    a = _req(list(range(100, 110)), [5, 6])  # a prompt of 5 (positions 0-4), then b's decode row, then a's again
    b = _req(list(range(200, 210)), [11, 12, 13])
    reqs, pos = [a] * 5 + [b, a], [0, 1, 2, 3, 4, 9, 5]
    g.fill_rows(reqs, pos, runner, sel=[5, 6])
    assert g.dev[0].tolist() == [100, 101, 102, 103, 104, 209, 105, 0]
    assert g.dev[2].tolist() == [5, 5, 5, 5, 6, 13, 6, 99] and g.dev[3].tolist() == [0, 1, 2, 3, 0, 1, 1, 0]
    assert g.ctx32.tolist() == [1, 2, 3, 4, 5, 10, 6, 1]
    assert g.dev[5].tolist() == [5, 6, 0, 0, 0, 0, 0, 0]
    assert g.bt[:7, :3].tolist() == [[5, 6, 99]] * 5 + [[11, 12, 13], [5, 6, 99]]


FUSED = """
import torch
from types import SimpleNamespace
from tests.test_decode_graph_fill import _graph, _req, _step
from token_scheduler.model.triton_ops import fill_inputs
runner = SimpleNamespace(block_size=4, scratch_block=99)
a = _req(list(range(100, 110)), [5, 6, 7])
b = _req(list(range(200, 205)), [11, 12])
c = _req(list(range(300, 320)), [1, 2, 3, 4, 8])
steps = [([(a, 9), (b, 4)], None, None), ([(c, 17), (a, 10), (b, 5)], torch.tensor([7, 8, 9]), None),
         ([(a, 0), (b, 1), (c, 2), (a, 3)], None, None), ([(b, 6), (a, 11)], torch.tensor([40, 41, 42]), [2, 0]),
         ([(c, 18)], torch.tensor([5, 6]), [1])]
ref, ours = _graph(4, 6, 99), _graph(4, 6, 99, fused=True)
for i, (rp, ids, rows) in enumerate(steps):
    for g in (ref, ours):
        g.fill(_step(rp), runner, ids=ids, rows=rows)
    n, nb = len(rp), max(len(r.block_ids) for r, _ in rp)
    assert torch.equal(ref.dev, ours.dev) and torch.equal(ref.ctx32, ours.ctx32), i
    # the columns a step's rows read; the rest of the table (past the longest row, padded rows) untouched
    assert torch.equal(ref.bt[:n, :nb], ours.bt[:n, :nb]), i
assert ours.dev[0, :1].tolist() == [6]
fresh = _graph(2, 6, 99, fused=True)
fresh.fill(_step([(c, 18)]), runner)
assert fresh.bt[1].eq(99).all() and fresh.bt[0, 5].item() == 99  # neither a padded row nor a column past nb
# a fill of no rows (the warm-up at capture) copies the padded columns and no table row
g3 = _graph(3, 6, 99, fused=True)
g3.hosts[0][:] = torch.tensor(g3.pad)
g3.dev.fill_(-1)
g3.bt.fill_(-1)
fill_inputs(g3.dev, g3.bt, g3.ctx32, *g3.views[0], 0, 0, torch.tensor([9]))
assert g3.dev.tolist() == [[0] * 3, [0] * 3, [99] * 3, [0] * 3, [1] * 3] and g3.ctx32.tolist() == [1] * 3
assert g3.bt.eq(-1).all()
# a row graph's six input rows
rg, rr = _graph(8, 4, 99, fused=True), _graph(8, 4, 99)
for g in (rg, rr):
    g.hosts = [torch.full((6, 8), -7, dtype=torch.long) for _ in range(2)]
    g.hosts_np = [h.numpy() for h in g.hosts]
    g.views = [(h, bt) for h, bt in zip(g.hosts, g.host_bts)]
    g.pad = [[0], [0], [99], [0], [1], [0]]
    g.dev = torch.zeros(6, 8, dtype=torch.long)
    g.fill_rows([a] * 5 + [b, a], [0, 1, 2, 3, 4, 3, 5], runner, sel=[5, 6])
assert torch.equal(rg.dev, rr.dev) and torch.equal(rg.ctx32, rr.ctx32) and torch.equal(rg.bt[:7, :3], rr.bt[:7, :3])
for bad in (dict(n=4), dict(cols=7), dict(ctx=torch.ones(2, dtype=torch.int32))):
    kw = dict(n=1, cols=1, ctx=g3.ctx32) | bad
    try:
        fill_inputs(g3.dev, g3.bt, kw["ctx"], *g3.views[0], kw["n"], kw["cols"])
        raise SystemExit(f"fill_inputs must refuse {bad}")
    except ValueError:
        pass
print("ok")
"""


def test_one_kernel_fills_what_the_copies_fill_in_the_interpreter():
    """(runner.STEP_IO) `triton_ops.fill_inputs`, the inputs in one Triton launch, leaves the graph's buffers as the
    kernel copies, the gather and the int32 copy leave them, over steps with host ids, ids on the device in the same
    rows and gathered from other rows, and a row graph's inputs."""
    interpret(FUSED)


@pytest.mark.parametrize("views", [True, False], ids=["in_place", "copies"])
def test_fill_writes_each_rows_adapter_slot(views):
    """A graph over the adapter slots takes each row's slot as one more input, this turn's buffer as the others do,
    padded rows -1 (no adapter); decode and row graphs alike."""
    runner = SimpleNamespace(block_size=4, scratch_block=99)
    g = _graph(batch=4, max_blocks=6, scratch=99, views=views)
    g.lora = object()
    g.host_slots = [torch.full((4,), -7, dtype=torch.long) for _ in range(2)]
    g.slot_views = g.host_slots if views else None
    g.slot_ids = torch.full((4,), -5, dtype=torch.long)
    a, b = _req(list(range(100, 110)), [5, 6, 7]), _req(list(range(200, 205)), [11, 12])
    g.fill(_step([(a, 9), (b, 4)]), runner, slots=[3, -1])
    assert g.slot_ids.tolist() == [3, -1, -1, -1] and g.host_slots[0].tolist() == [3, -1, -1, -1]
    g.fill(_step([(b, 3), (a, 8), (b, 2)]), runner, slots=[0, 2, 0])
    assert g.slot_ids.tolist() == [0, 2, 0, -1] and g.host_slots[1].tolist() == [0, 2, 0, -1]
    g.hosts = [torch.full((6, 4), -7, dtype=torch.long) for _ in range(2)]  # (a row graph: the sampled-rows input)
    g.hosts_np = [h.numpy() for h in g.hosts]
    g.views = [(h, bt) for h, bt in zip(g.hosts, g.host_bts)] if views else None
    g.pad = [[0], [0], [99], [0], [1], [0]]
    g.dev = torch.zeros(6, 4, dtype=torch.long)
    g.fill_rows([a, a], [0, 1], runner, sel=[1], slots=[1, 1])
    assert g.slot_ids.tolist() == [1, 1, -1, -1]
