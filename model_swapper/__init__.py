"""Moving models and KV between host and GPU at link speed.

    cache = HostModelCache("60GB", namespace="node")        # one pinned copy per node, shared by engines
    host = cache.get(model_dir, torch.bfloat16)              # loads once, later processes attach
    sw = Swapper(Arena.reserve(0.9, "cuda:0"))
    rm = sw.swap_in(host)                                    # async, on the copy stream
    rm.ready.wait(compute_stream)                            # or rm.ready.wait_layer(i, compute_stream)
    ... decode with rm.weights ...
    sw.release(rm)                                           # free: the host copy stays

Prefetch (`Prefetcher.prefetch / poll / take / cancel`) and KV swap (`KVSwapper.swap_out / swap_in` over a
`HostKVPool`) follow the same pattern: enqueue on a copy stream, hand back a handle to wait on.
"""

from model_swapper.host_cache import HostCacheFull, HostCacheTooSmall, HostModel, HostModelCache
from model_swapper.kv_swap import HostKVFull, HostKVPool, KVHandle, KVSwapper
from model_swapper.layout import ModelLayout
from model_swapper.prefetch import Prefetch, Prefetcher
from model_swapper.swapper import ResidentModel, SwapHandle, Swapper

__all__ = ["HostCacheFull", "HostCacheTooSmall", "HostKVFull", "HostKVPool", "HostModel", "HostModelCache",
           "KVHandle", "KVSwapper", "ModelLayout", "Prefetch", "Prefetcher", "ResidentModel", "SwapHandle",
           "Swapper"]
