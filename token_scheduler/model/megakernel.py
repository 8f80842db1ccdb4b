"""A batch-1 decode step as one persistent CUDA kernel (megakernel.cu): every layer, the final norm and the LM head in
one launch, one CTA an SM, a producer warp an SM streaming that SM's share of the step's weights into shared memory
while its consumer warps wait on the step's data dependencies (see the .cu file for the layout).

Compiled at first use with NVRTC (`torch.cuda._compile_kernel`: no nvcc needed), for Hopper (sm_90: bulk copies and
transaction-counted mbarriers). Off by default until measured (TOKENPOOL_MEGAKERNEL=1: batch-1 decode graphs of the
models `reason_not` accepts take it).
"""

from __future__ import annotations

import struct
from pathlib import Path

import torch

from model_swapper.model_config import ModelConfig
from tokenpool import env

SRC = Path(__file__).with_name("megakernel.cu")
USE = env.MEGAKERNEL.on()
D, KP, RG, NCW, SPL, NBIAS = 128, 1536, 8, 8, 128, 64  # as in megakernel.cu
SLOT = RG * KP * 2
THREADS = NCW * 32 + 32
P_NAMES = ("G L HID INTER NH NKV VOCAB BS KVB KVL KV2 KVT KVH EPS SCALE NSLOT HAS_BIAS SMAX FLAGS PFGU "
           "TOK POS SB SO CTX BT KV COS SIN EMBED NORM HEAD LOGITS CNT QKV OOUT ACT DOUT PART LAYERS TRACE").split()
P = {n: i for i, n in enumerate(P_NAMES)}
W_KEYS = ("qkv", "qkv_b", "o", "gate_up", "down", "ln1", "ln2")

# gate and up rows a CTA asks L2 for as a layer's qkv is streamed (0: none; see the .cu's producer)
PF_ROWS = 16

# compile-time constants of the .cu (-D): V rows an attention warp loads at once (8: few spills at 168 registers);
# diag_megakernel also tries SPL (cached positions of an attention item) and VL1 (V prefetched into L1)
DEFINES = {"VB": 8}

_kernels: dict[tuple, object] = {}


def reason_not(cfg: ModelConfig, weights: dict[str, torch.Tensor], kv: torch.Tensor) -> str | None:
    """Why this model's batch-1 steps cannot take the kernel (None: they can)."""
    if not kv.is_cuda or torch.cuda.get_device_capability(kv.device) < (9, 0):
        return "needs a Hopper GPU (sm_90)"
    if kv.dtype != torch.bfloat16 or weights["l0.qkv"].dtype != torch.bfloat16:
        return "bf16 only"
    if cfg.head_dim != D or cfg.qk_norm or cfg.sliding_window or cfg.num_heads % cfg.num_kv_heads:
        return "llama-family attention with head_dim 128, no q/k norm, no sliding window"
    if cfg.hidden_size % 8 or cfg.intermediate_size % 8 or cfg.hidden_size > 16 * NCW * 32:
        return f"hidden and intermediate sizes multiples of 8, hidden at most {16 * NCW * 32}"
    if any(f"l0.{k}" not in weights for k in ("qkv", "o", "gate_up", "down")):
        return "fused qkv and gate_up weights"
    return None


def _kernel(device: torch.device):
    idx = device.index if device.index is not None else torch.cuda.current_device()
    key = (idx, *sorted(DEFINES.items()))
    k = _kernels.get(key)
    if k is None:
        with torch.cuda.device(idx):
            cc = "".join(map(str, torch.cuda.get_device_capability(idx)))
            k = torch.cuda._compile_kernel(SRC.read_text(), "tp_decode_step", compute_capability=cc,
                                           nvcc_options=["-std=c++17", *(f"-D{k}={v}" for k, v in DEFINES.items())])
        _kernels[key] = k
    return k


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


def smem_layout(cfg: ModelConfig, smem_limit: int) -> tuple[int, int]:
    """(ring slots, dynamic shared memory bytes) of the kernel's layout within `smem_limit`."""
    kmax = max(cfg.hidden_size, cfg.num_heads * D, cfg.intermediate_size)
    fixed = _align(kmax * 2, 128) + _align(cfg.hidden_size * 2, 128) + 4 * (3 * D + NCW * (D + 2) + NCW + 2 * RG + NBIAS)
    fixed = _align(fixed, 8)
    nslot = (smem_limit - fixed) // (SLOT + 16)
    if nslot < 2:
        raise ValueError(f"the decode kernel needs {fixed + 2 * (SLOT + 16)} bytes of shared memory, the GPU has "
                         f"{smem_limit}")
    return nslot, fixed + nslot * (SLOT + 16)


def _f32_bits(x: float) -> int:
    return struct.unpack("<i", struct.pack("<f", x))[0]


class DecodeStep:
    """One batch-1 decode graph's kernel: its parameters point at the graph's input buffers (token, position, cache
    slot, context length, block table), the model's weights, KV cache and RoPE tables, and scratch of its own.
    Calling it launches the step (on the current stream, capturable) and returns its bf16 logits [1, vocab]."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], kv: torch.Tensor, rope, tokens: torch.Tensor,
                 positions: torch.Tensor, slot_blocks: torch.Tensor, slot_offsets: torch.Tensor,
                 context_lens: torch.Tensor, block_tables: torch.Tensor, flags: int = 0,
                 pf_rows: int = PF_ROWS):
        dev = kv.device
        self.kernel = _kernel(dev)
        props = torch.cuda.get_device_properties(dev)
        self.grid = props.multi_processor_count
        nslot, self.smem = smem_layout(cfg, props.shared_memory_per_block_optin)
        self.kernel.set_shared_memory_config(self.smem)
        L, hid, inter, nh, nkv = (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                                  cfg.num_kv_heads)
        vocab = cfg.vocab_size
        bs = kv.shape[3]
        spl = DEFINES.get("SPL", SPL)
        smax = -(-rope.cos.shape[0] // spl)  # an attention item's partial a head: spl cached positions each
        bf = dict(dtype=torch.bfloat16, device=dev)
        self.cnt = torch.zeros(L * 5 + 1, dtype=torch.int32, device=dev)
        self.qkv = torch.empty((nh + 2 * nkv) * D, **bf)
        self.o_out = torch.empty(hid, **bf)
        self.act = torch.empty(inter, **bf)
        self.d_out = torch.empty(hid, **bf)
        self.part = torch.empty(nh * smax * (D + 2), dtype=torch.float32, device=dev)
        self.logits = torch.empty(1, vocab, **bf)
        # diagnostics (`flags` 2): each CTA's start and end time (ns) of each op: [CTA, layer op (5 a layer, then the
        # LM head), start/end]; 1: the weight stream without waiting on the dependencies (wrong outputs)
        self.trace = torch.zeros(self.grid, L * 5 + 1, 2, dtype=torch.int64, device=dev)
        zero = self.o_out  # any valid address: the bias pointer when the model has none
        ptr = [[(weights.get(f"l{n}.{k}") if weights.get(f"l{n}.{k}") is not None else zero).data_ptr()
                for k in W_KEYS] for n in range(L)]
        self.layers = torch.tensor(ptr, dtype=torch.int64, device=dev)
        head = weights.get("lm_head", weights["embed"])
        s = kv.stride()  # [blocks, layers, 2, block_size, kv_heads, head_dim]
        vals = dict(G=self.grid, L=L, HID=hid, INTER=inter, NH=nh, NKV=nkv, VOCAB=vocab, BS=bs,
                    KVB=s[0], KVL=s[1], KV2=s[2], KVT=s[3], KVH=s[4],
                    EPS=_f32_bits(cfg.rms_norm_eps), SCALE=_f32_bits(D ** -0.5), NSLOT=nslot,
                    HAS_BIAS=int("l0.qkv_b" in weights), SMAX=smax, FLAGS=flags, PFGU=pf_rows)
        tensors = dict(TOK=tokens, POS=positions, SB=slot_blocks, SO=slot_offsets, CTX=context_lens, BT=block_tables,
                       KV=kv, COS=rope.cos, SIN=rope.sin, EMBED=weights["embed"], NORM=weights["norm"], HEAD=head,
                       LOGITS=self.logits, CNT=self.cnt, QKV=self.qkv, OOUT=self.o_out, ACT=self.act, DOUT=self.d_out,
                       PART=self.part, LAYERS=self.layers, TRACE=self.trace)
        for t in (tokens, positions, slot_blocks, slot_offsets):
            assert t.dtype == torch.int64, t.dtype
        assert context_lens.dtype == torch.int32 and block_tables.dtype == torch.int32
        assert rope.cos.dtype == torch.float32 and rope.cos.is_contiguous() and kv.is_contiguous()
        params = [0] * len(P_NAMES)
        for k, v in vals.items():
            params[P[k]] = int(v)
        for k, t in tensors.items():
            params[P[k]] = t.data_ptr()
        self.params = torch.tensor(params, dtype=torch.int64, device=dev)
        self.keep = (weights, kv, rope, tokens, positions, slot_blocks, slot_offsets, context_lens, block_tables)

    def __call__(self) -> torch.Tensor:
        self.cnt.zero_()
        self.kernel(grid=(self.grid, 1, 1), block=(THREADS, 1, 1), args=[self.params], shared_mem=self.smem)
        return self.logits
