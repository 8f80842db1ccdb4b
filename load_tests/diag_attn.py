"""Issue 20: the paged-decode attention alone (triton_decode.paged_decode, with its combine), against the KV bytes it
reads at the device-to-device copy rate. A 7B batch-32 step at context 512 spends ~410 us of its 4.74 ms in this
kernel against a ~110 us floor, and the 1.5B's ~280 us against ~55 (profile_decode at a3a756a): the largest gap
left in batched steps. Each configuration (splits, cache blocks an iteration, warps, pipeline stages, whether the
first cache tile is loaded before q and RoPE; with `--rope`, RoPE and the new K/V write folded in) is timed as 28
layers' calls back to back in one CUDA graph, the paging scattered as a served cache's is.

    python -m load_tests.diag_attn --models 1.5b,7b --batch 8,32 --context 512
"""

from __future__ import annotations

import argparse
import itertools
import math

import torch

from controller.model_factory import model_shape
from load_tests.bench_common import graph_replay_us as replay_us
from load_tests.bench_common import hbm_bandwidth
from token_scheduler.model import triton_decode as td

# (q heads, kv heads) of the bench models (the model factory's qwen2 1.5b and 7b); head dim 128, 28 layers, 16-token
# cache blocks
HEADS = {m: (s.heads, s.kv_heads) for m, s in ((m, model_shape("qwen2", m)) for m in ("1.5b", "7b"))}
LAYERS, D, BS = 28, 128, 16


def _cache(model: str, batch: int, context: int, seed: int = 0, layout: str = "block", order: str = "scattered"):
    """`layout` "block": the engine's cache, [blocks, layers, ...] (a block's layers together, 1.8 MB apart for the
    7B); "layer": the same shape viewed over layer-major storage ([layers, blocks, ...] permuted: a layer's blocks
    together). `order` "scattered": each row's blocks a random permutation; "sequential": rows' blocks in order."""
    h, kvh = HEADS[model]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    per = math.ceil(context / BS)
    nb = batch * per + 1
    if layout == "layer":
        kv = torch.randn(LAYERS, nb, 2, BS, kvh, D, generator=gen, device="cuda").to(torch.bfloat16)
        kv = kv.permute(1, 0, 2, 3, 4, 5)
    else:
        kv = torch.randn(nb, LAYERS, 2, BS, kvh, D, generator=gen, device="cuda").to(torch.bfloat16)
    perm = torch.randperm(nb - 1, generator=gen, device="cuda") + 1
    if order == "sequential":
        perm = torch.arange(1, nb, device="cuda")
    bt = perm[: batch * per].view(batch, per).to(torch.int32)
    ctx = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, h, D, generator=gen, device="cuda").to(torch.bfloat16)
    return q, kv, bt, ctx


def _rope(batch: int, context: int, bt: torch.Tensor, h: int, kvh: int, seed: int = 1):
    """A fused qkv projection's output for each row's new token (at position context - 1) and the RoPE tables, as a
    batched decode step with RoPE folded into the attention (llama.ATTN_ROPE) passes them."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(batch, (h + 2 * kvh) * D, generator=gen, device="cuda").to(torch.bfloat16)
    inv = 1.0 / (1e6 ** (torch.arange(0, D, 2, device="cuda", dtype=torch.float32) / D))
    ang = torch.outer(torch.arange(context, device="cuda", dtype=torch.float32), inv)
    cos, sin = torch.cat([ang.cos(), ang.cos()], 1).contiguous(), torch.cat([ang.sin(), ang.sin()], 1).contiguous()
    pos = torch.full((batch,), context - 1, dtype=torch.long, device="cuda")
    return qkv, (cos, sin, pos, bt[:, (context - 1) // BS].long(), pos % BS)


def sweep(models: list[str], batches: list[int], context: int, splits: list[int], nbis: list[int],
          warps: list[int], stages: list[int], rope: bool = False, earlies: tuple = (False, True),
          pipes: tuple = (False, True), layouts: tuple = ("block",), orders: tuple = ("scattered",)) -> None:
    rate = hbm_bandwidth()
    print(f"copy rate {rate / 1e12:.3f} TB/s", flush=True)
    saved = (td.BLOCKS_PER_ITER, td.DECODE_WARPS, td.DECODE_STAGES, td.PIPELINE_IDS, td.PIPE_STAGES)
    try:
        for model, batch, layout, order in itertools.product(models, batches, layouts, orders):
            q, kv, bt, ctx = _cache(model, batch, context, layout=layout, order=order)
            kvh = kv.shape[4]
            folded = None
            if rope:  # q is then the qkv projection; RoPE and the new K/V write happen in the kernel
                q, folded = _rope(batch, context, bt, q.shape[1], kvh)
            floor = LAYERS * batch * context * kvh * D * 2 * 2 / rate * 1e6
            scale = D ** -0.5
            default_s = td.num_splits_for(batch, kvh)
            here = [s or default_s for s in splits]  # 0: the engine's default
            print(f"{model} batch {batch} context {context}, {layout}-major cache, {order} blocks: {LAYERS} layers' KV floor {floor:.1f} us; the engine's "
                  f"default: {default_s} splits, {saved[0]} blocks an iteration, {saved[1]} warps, {saved[2]} stages",
                  flush=True)
            rows = []
            for s, nbi, w, st, early, pipe in itertools.product(here, nbis, warps, stages, earlies, pipes):
                # (pipe: the block ids an iteration ahead, PIPELINE_IDS; its stages are PIPE_STAGES)
                td.BLOCKS_PER_ITER, td.DECODE_WARPS, td.DECODE_STAGES, td.PIPELINE_IDS, td.PIPE_STAGES = (
                    nbi, w, st, pipe, st)

                def run(s=s, early=early, args=(q, kv), bt=bt, ctx=ctx, scale=scale, folded=folded):
                    for layer in range(LAYERS):
                        td.paged_decode(*args, layer, bt, ctx, scale, num_splits=s, prefetch=early, rope=folded)
                try:
                    us = replay_us(run)
                except Exception as e:  # noqa: BLE001 - a config past the shared memory: say so, go on
                    print(f"  splits {s} nbi {nbi} warps {w} stages {st} early {early} pipe {pipe}: "
                          f"{type(e).__name__}")
                    continue
                rows.append((us, s, nbi, w, st, early, pipe))
                print(f"  splits {s:2d} nbi {nbi} warps {w} stages {st} early {int(early)} pipe {int(pipe)}: {us:7.1f} us "
                      f"({us / floor:.2f}x floor)", flush=True)
            best = sorted(rows)[:5]
            print(f"{model} b{batch} best: " + "; ".join(
                f"{us:.1f} us s{s} nbi{n} w{w} st{st} e{int(e)} p{int(p)}" for us, s, n, w, st, e, p in best), flush=True)
    finally:
        td.BLOCKS_PER_ITER, td.DECODE_WARPS, td.DECODE_STAGES, td.PIPELINE_IDS, td.PIPE_STAGES = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="1.5b,7b")
    ap.add_argument("--batch", default="8,32")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--splits", default="2,4,8,16")
    ap.add_argument("--nbi", default="2,4,8")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--stages", default="2")
    ap.add_argument("--rope", action="store_true", help="RoPE and the new K/V write folded in, as batched steps run")
    ap.add_argument("--early", default="0,1", help="the first cache tile loaded before q: 0, 1 or both")
    ap.add_argument("--layout", default="block", help="block, layer or both (block,layer): see _cache")
    ap.add_argument("--order", default="scattered", help="scattered, sequential or both")
    ap.add_argument("--pipe", default="0,1", help="block ids an iteration ahead (triton_decode.PIPELINE_IDS): 0, 1 "
                    "or both")
    a = ap.parse_args()
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    sweep(a.models.split(","), ints(a.batch), a.context, ints(a.splits), ints(a.nbi), ints(a.warps), ints(a.stages),
          a.rope, tuple(bool(e) for e in ints(a.early)), tuple(bool(p) for p in ints(a.pipe)),
          tuple(a.layout.split(",")), tuple(a.order.split(",")))


if __name__ == "__main__":
    main()
