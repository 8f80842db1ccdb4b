"""Compile a Triton kernel for a GPU this machine does not have (sm_90: H100/H200) and report what the compiler
made of it: registers, stack/local bytes (spills), shared memory, and whether its loop was software-pipelined
(async copies into shared memory). No GPU needed: Triton compiles to a cubin with its bundled ptxas, and
cuobjdump reads the resource usage.

    python -m load_tests.triton_offline rows    # gemv_rows as the 1.5B's batch-8 projections call it
    python -m load_tests.triton_offline gemv    # the one-token GEMV as the 1.5B's batch-1 projections call it
    python -m load_tests.triton_offline decode  # the paged-decode attention, with and without RoPE folded in

Pointers are marked 16-byte aligned (and the integers listed in `aligned` divisible by 16), as the runtime
specialises them for torch's allocations: without that, no load is wide enough for an async copy and no loop is
pipelined, which is not what runs on the GPU.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def inspect_kernel(fn, types: dict[str, str], constexprs: dict, aligned: tuple[str, ...] = (), num_warps: int = 4,
                   num_stages: int = 3, arch: int = 90) -> dict:
    """`types`: each non-constexpr argument's Triton type ("*bf16", "i32", "fp32", ...)."""
    sig, attrs = {}, {}
    for i, a in enumerate(fn.arg_names):
        sig[a] = "constexpr" if a in constexprs else types[a]
        if sig[a].startswith("*") or a in aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    ck = triton.compile(ASTSource(fn, sig, constexprs=constexprs, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                        options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(ck.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    try:
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)

    def field(k: str) -> int:
        m = re.search(k + r":(\d+)", usage)
        return int(m.group(1)) if m else -1
    ttgir = ck.asm["ttgir"]
    # global loads issued before the PDL wait (-1: no wait): what a kernel fetches while the one before drains
    ptx = ck.asm["ptx"]
    wait = ptx.find("griddepcontrol.wait")
    early = -1 if wait < 0 else len(re.findall(r"\bld\.global|\bcp\.async\.", ptx[:wait]))
    return {"registers": field("REG"), "stack_bytes": field("STACK"), "local_bytes": field("LOCAL"),
            "shared_bytes": ck.metadata.shared, "async_copies": ttgir.count("async_copy_global_to_local"),
            "mma": "warp_group_dot" if "warp_group_dot" in ttgir else "mma_v2" if "tt.dot" in ttgir else "none",
            "loads_before_wait": early}


def _types(fn) -> dict[str, str]:
    types = {a: "*bf16" for a in ("X", "R", "NW", "XOUT", "W", "B", "Y", "KV")}
    types.update({"COS": "*fp32", "SIN": "*fp32", "POS": "*i64", "SB": "*i64", "SO": "*i64", "eps": "fp32"})
    types.update({a: "i32" for a in fn.arg_names if a not in types})
    return types


_ALIGNED = ("N", "s_kvb", "s_kvt", "s_kvh", "off_k", "off_v")


def gemv_variants() -> dict[str, dict]:
    """The one-token GEMV as qwen2-1.5b's and qwen2-7b's batch-1 projections call it (the configs config_for gives),
    compiled for sm_90, the MODE_NORM ones both with their scale pass in BLOCK_K tiles and in one tile
    (triton_gemv.NORM_ONE_PASS, the default; label " one-pass"); gate_up and down as llama.GEMV_GLU has them
    (SiLU*mul in gate_up's epilogue, down plain) or not (down's prologue): label -> resources."""
    from controller.model_factory import model_shape
    from token_scheduler.model import triton_gemv as g

    fn = g._gemv_kernel
    types = _types(fn)
    out = {}
    # the model factory's qwen2 1.5b and 7b; each projection's (name, N, K, MODE, HAS_R, ROPE, GLU)
    for model in ("1.5b", "7b"):
        s = model_shape("qwen2", model)
        h, kvh, hid, inter = s.heads, s.kv_heads, s.hidden, s.intermediate
        qkv = (h + 2 * kvh) * 128
        for name, n, k, mode, has_r, rope, glu in (
                ("qkv", qkv, hid, 1, True, True, False), ("o", hid, hid, 0, False, False, False),
                ("gate_up", 2 * inter, hid, 1, True, False, False), ("down", hid, inter, 2, False, False, False),
                ("gate_up glu", 2 * inter, hid, 1, True, False, True), ("down plain", hid, inter, 0, False, False, False)):
            bn, bk, nw = g.config_for(n, k)
            for nb in (bk, triton.next_power_of_2(k)) if mode == 1 else (bk,):
                c = dict(K=k, MODE=mode, HAS_R=has_r, HAS_B=False, BLOCK_N=bn, BLOCK_K=bk, PDL=True, ROPE=rope, H=h,
                         KVH=kvh, D=128, NORM_BLOCK=nb, GLU=glu)
                label = f"{model} {name} {(bn, bk, nw)}" + (" one-pass" if nb != bk else "")
                out[label] = inspect_kernel(fn, types, c, aligned=_ALIGNED, num_warps=nw, num_stages=1)
    return out


def _gemv():
    for label, r in gemv_variants().items():
        print(f"{label:34s} {r}", flush=True)


def _rows(configs, persist: bool = False):
    from token_scheduler.model import triton_gemv as g

    fn = g._gemv_rows_kernel
    types = _types(fn)
    # qwen2-1.5b at batch 8 (16 padded rows): (name, K, MODE, HAS_R, EPI)
    for name, k, mode, has_r, epi in (("qkv", 1536, 1, True, 1), ("o", 1536, 0, False, 0),
                                      ("gate_up", 1536, 1, True, 2), ("down", 8960, 0, False, 0)):
        for bn, bk, nw, ns in configs:
            c = dict(K=k, MODE=mode, HAS_R=has_r, HAS_B=False, EPI=epi, M_PAD=16, BLOCK_N=bn, BLOCK_K=bk, IEEE=False,
                     SWAP=False, PDL=True, H=12, KVH=2, D=128, PERSIST=persist)
            r = inspect_kernel(fn, types, c, aligned=_ALIGNED, num_warps=nw, num_stages=ns)
            print(f"{name:8s} {(bn, bk, nw, ns)} {r}", flush=True)


def decode_variants() -> dict[str, dict]:
    """The paged-decode kernel's variants as the bench models run them (the module's blocks an iteration, warps and
    stages), compiled for sm_90: label -> resources."""
    from token_scheduler.model import triton_decode as t

    fn = t._paged_decode_kernel
    types = {a: "i32" for a in fn.arg_names}
    types.update(Q="*bf16", KV="*bf16", BT="*i32", CTX="*i32", M="*fp32", L="*fp32", scale="fp32", COS="*fp32",
                 SIN="*fp32", POS="*i64", SB="*i64", SO="*i64")
    # qwen2-1.5b (12 heads, 2 kv heads) and qwen2-7b (28, 4), bf16, 16-token blocks: split-K (fp32 partials) and one
    # split (the result written directly), with and without RoPE and the KV write folded in (TOKENPOOL_ATTN_ROPE),
    # and a decode step's one row loading its first cache tile before the PDL wait (TOKENPOOL_ATTN_PREFETCH)
    out = {}
    for name, h, kvh in (("1.5b", 12, 2), ("7b", 28, 4)):
        for splits in (16, 1):
            for rope, prefetch in ((False, False), (True, False), (False, True)):
                c = dict(NUM_SPLITS=splits, GROUP=h // kvh, GROUP_PAD=16, BLOCK=16, D=128, IEEE=False, PDL=True,
                         NBI=t.BLOCKS_PER_ITER, DIRECT=splits == 1, ROPE=rope, H=h if rope else 0, KVH=kvh if rope else 0,
                         PREFETCH=prefetch, PIPE=t.PIPELINE_IDS)
                if not rope:
                    c.update(COS=None, SIN=None, POS=None, SB=None, SO=None)
                tt = dict(types, Out="*bf16" if splits == 1 else "*fp32")
                out[f"{name} splits {splits} rope {rope}" + (" prefetch" if prefetch else "")] = inspect_kernel(
                    fn, tt, c, aligned=("s_kvb", "s_kvt", "s_kvh", "off_k", "off_v"),
                    num_warps=t.DECODE_WARPS or 4,
                    num_stages=(t.PIPE_STAGES if t.PIPELINE_IDS else t.DECODE_STAGES) or 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["rows", "gemv", "decode"])
    ap.add_argument("--persist", action="store_true", help="rows: the persistent grid (triton_gemv.ROWS_PERSIST)")
    a = ap.parse_args()
    if a.what == "gemv":
        _gemv()
    elif a.what == "decode":
        for label, r in decode_variants().items():
            print(f"{label:28s} {r}", flush=True)
    else:
        _rows([(16, 256, 4, 4), (64, 256, 4, 3), (16, 512, 8, 3), (64, 256, 8, 3)], a.persist)


if __name__ == "__main__":
    main()
