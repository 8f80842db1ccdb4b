"""Where the batch-1 decode megakernel's time goes (token_scheduler/model/megakernel.py), on random weights of a public
model's shape (no model folder): its graph replay against the weight floor of the same run, the weight stream alone
(FLAGS 1: no waits on the dependencies, wrong outputs), and a per-op timeline from its trace (FLAGS 2).

    python -m load_tests.diag_megakernel --size 1.5b [--context 512] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from controller.model_factory import model_shape
from model_swapper.model_config import ModelConfig
from token_scheduler.model import llama, megakernel

OPS = ("qkv", "attn", "o", "gate_up", "down")


def build(size: str, context: int):
    s = model_shape("qwen2", size)
    cfg = ModelConfig(arch="qwen2", hidden_size=s.hidden, num_layers=s.layers, num_heads=s.heads,
                      num_kv_heads=s.kv_heads, head_dim=s.hidden // s.heads, intermediate_size=s.intermediate,
                      vocab_size=s.vocab, max_position_embeddings=4096, rms_norm_eps=s.rms_eps,
                      rope_theta=s.rope_theta, rope_scaling=None, tie_word_embeddings=s.tied, qkv_bias=True,
                      qk_norm=False, torch_dtype=torch.bfloat16, eos_token_ids=(0,))
    bf = dict(device="cuda", dtype=torch.bfloat16)
    nq = (cfg.num_heads + 2 * cfg.num_kv_heads) * 128
    w = {"embed": torch.randn(cfg.vocab_size, cfg.hidden_size, **bf), "norm": torch.ones(cfg.hidden_size, **bf)}
    for n in range(cfg.num_layers):
        w |= {f"l{n}.ln1": torch.ones(cfg.hidden_size, **bf), f"l{n}.ln2": torch.ones(cfg.hidden_size, **bf),
              f"l{n}.qkv": torch.randn(nq, cfg.hidden_size, **bf) * 0.02, f"l{n}.qkv_b": torch.zeros(nq, **bf),
              f"l{n}.o": torch.randn(cfg.hidden_size, cfg.q_size, **bf) * 0.02,
              f"l{n}.gate_up": torch.randn(2 * cfg.intermediate_size, cfg.hidden_size, **bf) * 0.02,
              f"l{n}.down": torch.randn(cfg.hidden_size, cfg.intermediate_size, **bf) * 0.02}
    if not cfg.tie_word_embeddings:
        w["lm_head"] = torch.randn(cfg.vocab_size, cfg.hidden_size, **bf) * 0.02
    bs = 16
    nb = -(-context // bs) + 1
    kv = torch.randn(nb, cfg.num_layers, 2, bs, cfg.num_kv_heads, 128, **bf)
    rope = llama.RopeCache.build(cfg, 4097, "cuda")
    i64 = dict(dtype=torch.int64, device="cuda")
    pos = context - 1
    dev = [torch.tensor([7], **i64), torch.tensor([pos], **i64), torch.tensor([pos // bs], **i64),
           torch.tensor([pos % bs], **i64)]
    bt = torch.arange(4096 // bs, dtype=torch.int32, device="cuda").clamp(max=nb - 1)[None]
    ctx = torch.tensor([context], dtype=torch.int32, device="cuda")
    weight_bytes = sum(t.numel() * t.element_size() for k, t in w.items() if k != "embed") + (
        w["embed"].numel() * 2 if cfg.tie_word_embeddings else 0)
    return cfg, w, kv, rope, dev, ctx, bt, weight_bytes


def replay_ms(step, reps: int = 50) -> float:
    step()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(5):
            step()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps / 5


def timeline(trace: torch.Tensor, layers: int) -> dict:
    """From [CTA, op, start/end] ns: per op kind, the mean over layers (skipping the first two) of: the critical
    path's share (last CTA's end minus the last end of the op before), the spread of starts, and mean duration."""
    seen = trace[:, :, 0] > 0  # (attention: only the CTAs with items)
    t = trace.double()
    t = t - t[t > 0].min()
    ends = t[:, :, 1].max(0).values  # [ops]
    starts_max = t[:, :, 0].max(0).values
    starts_min = t[:, :, 0].masked_fill(~seen, float("inf")).min(0).values
    out = {}
    for k, name in enumerate(OPS):
        crit, spread, dur = [], [], []
        for layer in range(2, layers):
            i = layer * 5 + k
            crit.append(float(ends[i] - ends[i - 1]) / 1e3)
            spread.append(float(starts_max[i] - starts_min[i]) / 1e3)
            sel = seen[:, i]
            dur.append(float((t[sel, i, 1] - t[sel, i, 0]).mean()) / 1e3)
        out[name] = {"critical_us": sum(crit) / len(crit), "start_spread_us": sum(spread) / len(spread),
                     "mean_duration_us": sum(dur) / len(dur)}
    out["head_us"] = float(ends[-1] - ends[-2]) / 1e3
    out["total_us"] = float(ends[-1]) / 1e3
    return out


def main() -> None:
    import sys

    from load_tests.bench_common import hbm_bandwidth, header

    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1.5b")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--json")
    a = ap.parse_args()
    cfg, w, kv, rope, dev, ctx, bt, nbytes = build(a.size, a.context)
    bw = hbm_bandwidth()
    floor = nbytes / bw * 1e3
    res = header() | {"bench": "diag_megakernel", "command": " ".join(["python3 -m load_tests.diag_megakernel", *sys.argv[1:]]),
                      "size": a.size, "context": a.context, "weight_bytes": nbytes,
           "copy_rate_tb_s": bw / 1e12, "floor_ms": floor}
    res["variants"] = []
    base = dict(megakernel.DEFINES)
    # flags: 1 no waits, 4 attention skipped (wrong outputs, diagnostics); SIGNAL_FENCE 2: counts without ordering
    # SPL: cached positions an attention item (more, shorter items: fewer dependent V loads a warp); VL1: its V rows
    # prefetched into L1 before the wait
    for name, flags, pf, defs in (("step", 0, None, {}), ("stream_only", 1, None, {}),
                                  ("spl 128", 0, None, {"SPL": 128}), ("spl 64", 0, None, {"SPL": 64}),
                                  ("spl 64 vl1", 0, None, {"SPL": 64, "VL1": 1}), ("spl 32", 0, None, {"SPL": 32}),
                                  ("spl 32 vl1", 0, None, {"SPL": 32, "VL1": 1}), ("vl1", 0, None, {"VL1": 1}),
                                  ("no attention", 4, None, {}), ("step again", 0, None, {})):
        megakernel.DEFINES.clear()
        megakernel.DEFINES.update(base | defs)
        kw = {} if pf is None else {"pf_rows": pf}
        ms = replay_ms(megakernel.DecodeStep(cfg, w, kv, rope, *dev, ctx, bt, flags=flags, **kw))
        res["variants"].append({"name": name, "flags": flags, "pf_rows": pf, "defines": dict(megakernel.DEFINES),
                                "ms": ms, "x_floor": ms / floor})
        print(f"{name:12s} {ms:.4f} ms  {ms / floor:.3f}x floor ({floor:.4f} ms at {bw / 1e12:.2f} TB/s)", flush=True)
    megakernel.DEFINES.clear()
    megakernel.DEFINES.update(base)
    st = megakernel.DecodeStep(cfg, w, kv, rope, *dev, ctx, bt, flags=2)
    for _ in range(3):
        st()
    torch.cuda.synchronize()
    res["timeline"] = tl = timeline(st.trace.cpu(), cfg.num_layers)
    st4 = megakernel.DecodeStep(cfg, w, kv, rope, *dev, ctx, bt, flags=6)
    for _ in range(3):
        st4()
    torch.cuda.synchronize()
    res["timeline_no_attention"] = tl4 = timeline(st4.trace.cpu(), cfg.num_layers)
    print("no attention:", {k: (round(v["critical_us"], 1), round(v["mean_duration_us"], 1)) if isinstance(v, dict)
                            else round(v, 1) for k, v in tl4.items()})
    tr = st.trace.cpu()
    t0 = tr[tr > 0].min()
    res["trace_layers_9_11_ns"] = (tr[:, 45:60] - t0).clamp(min=-1).tolist()  # [CTA, op, start/end], -1: none
    print(json.dumps(tl, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
