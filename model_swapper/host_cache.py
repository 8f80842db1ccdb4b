"""The pinned host model cache: each model's weights once per node, in shared page-locked memory.

`HostModelCache.get(model_dir)` returns a `HostModel`: a region laid out exactly like an arena slot
(`ModelLayout`), so swapping in is a flat byte copy. The first process to ask loads the model from
safetensors into a new /dev/shm segment; every other process on the node (one engine per GPU) attaches to
that segment by name and adds nothing to the node's memory. Budget and LRU are node-wide (the index is
shared); eviction drops the host copy (the model goes "back to disk") and only touches entries that no live
process holds and that this process is not using (`pin`: a swap or a prefetch in flight).

Shortage raises: `HostCacheTooSmall` if a model can never fit the budget, `HostCacheFull` if it fits but
everything evictable is in use. The scheduler decides what to release.

A cold load (`fill_region`) is one pass on every CPU: the reads copy the bytes straight into the region's
unmade pages, each page made (allocated, zeroed, mapped) by the read that first lands in it, while a background
thread registers the region with CUDA from the start, making whatever pages it reaches before the reads do.
Before, every page was made in a pass of its own and the reads came after: each byte was touched twice, and the
registration waited for the first pass (on the 2-vCPU dev VM, 3.1 GB with a registration's page walk beside:
1.38 s then, 1.16 s now). Each load's timings (`LoadStats`) are logged and kept on the `HostModel`.

On the 16-core H200 host that one-file load took 7.1 s for a 15.2 GB 7B: the reads' page making queued on the
file's locks, and the registration's walk beside them made it worse (page making alone: 3.75 s one file, 1.26 s
over 64 files; with a registration beside it, 7 s either way: bench/results/shm_fill_probe_h200.json). So a
model's region is one file per PART_BYTES (at most MAX_PARTS), and a region of several parts is registered once
its pages are made, not beside the reads.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gpu_pool.arena import parse_budget
from gpu_pool.pinned import PinnedRegion, default_shm_dir, io_threads, remove_region, shm_huge_pages
from model_swapper.cache_index import CacheIndex
from model_swapper.layout import ModelLayout
from model_swapper.loader import Progress, load_into_region
from model_swapper.model_config import ModelConfig
from model_swapper.weights import safetensors_files
from tokenpool.holders import holder_alive, new_holder_id

log = logging.getLogger(__name__)


class HostCacheFull(RuntimeError):
    def __init__(self, msg: str, needed: int, budget: int, used: int):
        super().__init__(msg)
        self.needed, self.budget, self.used = needed, budget, used


class HostCacheTooSmall(HostCacheFull):
    """The model is larger than the whole budget: it can never be cached."""


@dataclass(frozen=True)
class LoadStats:
    """Where a cold load's time went (seconds). total = create + fill + pin_wait: the registration (`pin_s`)
    of a one-file region runs beside the fill, and only what outlasts it (`pin_wait_s`) adds; a region of
    several parts is registered after the fill (pin_wait_s = pin_s)."""

    nbytes: int
    threads: int
    create_s: float  # create the shared file and map it
    fill_s: float  # read the bytes in from the page cache, making each page on the way, on `threads` threads
    pin_s: float  # cudaHostRegister of the whole region (0: not pinned), beside the fill or after it
    pin_wait_s: float  # waiting for the registration after the fill finished
    total_s: float
    pinned: bool
    shm_huge: str  # the tmpfs's huge= policy ("never": 4 KiB pages; "" for private memory): see gpu_pool.pinned
    parts: int = 1  # shm files behind the region (region_parts)

    @property
    def gbs(self) -> float:
        return self.nbytes / self.total_s / 1e9 if self.total_s else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "gbs": self.gbs}

    def __str__(self) -> str:
        return (f"{self.nbytes / 2**30:.2f} GiB in {self.total_s:.2f} s ({self.gbs:.2f} GB/s; {self.threads} "
                f"threads; {self.parts} part(s); huge={self.shm_huge or '-'}): create {self.create_s:.2f}, "
                f"fill {self.fill_s:.2f}, pin {self.pin_s:.2f} {'beside the fill' if self.parts == 1 else 'after it'}, "
                f"{self.pin_wait_s:.2f} waited")


PART_BYTES = 256 << 20  # a host copy is one shm file per this many bytes ...
MAX_PARTS = 64  # ... up to this many (the module docstring says why)


def region_parts(nbytes: int) -> int:
    return max(1, min(MAX_PARTS, nbytes // PART_BYTES))


def fill_region(region: PinnedRegion, model_dir: Path, layout: ModelLayout, pin: bool, threads: int | None = None,
                progress: Progress | None = None, create_s: float = 0.0) -> LoadStats:
    """Load a model into a fresh, unwritten `region` (from `PinnedRegion.create(reserve=False)` or
    `anonymous`) and, with `pin`, register it: beside the reads for a region of one file, after them for one of
    several parts (the module docstring says why)."""
    threads = threads or io_threads()
    t0 = time.perf_counter()
    # one registration of the whole region. Of one file: started before any page exists (it takes references
    # to pages, not their bytes, and pages it reaches first are made by its walk). Of several parts: once the
    # reads have made the pages, whose making it would otherwise slow down (the module docstring)
    beside = pin and region.parts == 1
    pinning = region.pin_async() if beside else None
    load_into_region(Path(model_dir), layout, region.tensor, threads, progress,
                     make_pages=lambda off, n: region.populate(1, off, n))
    t1 = time.perf_counter()
    if pin and not beside:
        pinning = region.pin_async()
    pin_s = pinning.result() if pinning is not None else 0.0
    t2 = time.perf_counter()
    return LoadStats(layout.nbytes, threads, create_s, t1 - t0, pin_s, t2 - t1, create_s + (t2 - t0),
                     region.pinned, shm_huge_pages(region.path) if region.path is not None else "", region.parts)


@dataclass
class HostModel:
    key: str
    model_dir: Path
    layout: ModelLayout
    region: PinnedRegion
    loaded_here: bool  # this process read it from disk (False: attached to another process's copy)
    pins: int = field(default=0, repr=False)
    load_stats: LoadStats | None = field(default=None, repr=False)  # set when loaded_here

    @property
    def cfg(self) -> ModelConfig:
        return self.layout.cfg

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes

    @property
    def buffer(self) -> torch.Tensor:
        """The whole region as 1-D uint8 (page-locked when CUDA is present)."""
        return self.region.tensor[: self.layout.nbytes]

    def weights(self) -> dict[str, torch.Tensor]:
        """Host views of the engine tensors (for checks and CPU engines; the GPU path copies `buffer`)."""
        return self.layout.views(self.buffer)


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB"


class HostModelCache:
    def __init__(self, budget: int | float | str, namespace: str = "default", root: str | Path | None = None,
                 pin: bool | None = None, threads: int | None = None, wait_timeout_s: float = 600.0):
        from gpu_pool.inventory import host_memory_bytes

        # a fraction is of the host's memory as this process may use it: a container's cgroup limit where lower (the
        # /dev/shm copies are charged to it: 60% of the host's MemTotal in a smaller container was an OOM kill)
        self.budget = parse_budget(budget, host_memory_bytes())
        self.index = CacheIndex(Path(root) if root else default_shm_dir() / f"tokenpool-{namespace}")
        self.pin, self.threads, self.wait_timeout_s = pin, threads, wait_timeout_s
        self.me = new_holder_id()
        self.models: dict[str, HostModel] = {}  # attached in this process
        self._lock = threading.RLock()
        self._keys: dict[tuple[str, torch.dtype | None], str] = {}

    @staticmethod
    def key_for(model_dir: str | Path, dtype: torch.dtype) -> str:
        """Same directory contents and dtype -> same key, on every process of the node."""
        d = Path(model_dir).resolve()
        h = hashlib.sha1(f"{d}|{dtype}".encode())
        for f in safetensors_files(d):
            st = f.stat()
            h.update(f"|{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in d.name)[:40]
        return f"{safe}-{str(dtype).removeprefix('torch.')}-{h.hexdigest()[:12]}"

    # -- public API ---------------------------------------------------------------------------------------
    def get(self, model_dir: str | Path, dtype: torch.dtype | None = None,
            progress: Progress | None = None) -> HostModel:
        """The model's host copy: already attached, attached from another process, or loaded from disk."""
        with self._lock:
            memo = self._keys.get((str(model_dir), dtype))
            if memo is not None and memo in self.models:  # hot path: a switch to an attached model
                with self.index.locked() as data:
                    self._touch(data, memo)
                return self.models[memo]
            cfg = ModelConfig.from_pretrained(model_dir)
            layout = ModelLayout.build(cfg, dtype or cfg.torch_dtype)
            key = self._keys[(str(model_dir), dtype)] = self.key_for(model_dir, layout.dtype)
            if key in self.models:
                with self.index.locked() as data:
                    self._touch(data, key)
                return self.models[key]
            deadline = time.monotonic() + self.wait_timeout_s
            while True:
                with self.index.locked() as data:
                    e = data["entries"].get(key)
                    if e is None:
                        self._make_room(data, layout.nbytes, key)
                        data["entries"][key] = {"model_dir": str(Path(model_dir).resolve()),
                                                "dtype": str(layout.dtype), "nbytes": layout.nbytes,
                                                "state": "loading", "owner": self.me, "holders": [self.me]}
                        self._touch(data, key)
                        action = "load"
                    elif e["state"] == "ready":
                        e["holders"].append(self.me)
                        self._touch(data, key)
                        action = "attach"
                    else:
                        action = "wait"  # another process is loading it: never load the same model twice
                if action != "wait":
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{model_dir}: still being loaded by another process after "
                                       f"{self.wait_timeout_s:.0f} s")
                time.sleep(0.05)
            m = self._load(key, model_dir, layout, progress) if action == "load" else \
                HostModel(key, Path(model_dir), layout, PinnedRegion.attach(self.index.seg_path(key), self.pin), False)
            self.models[key] = m
            return m

    def pin_model(self, m: HostModel) -> None:
        """Protect `m` from eviction by this process while a copy out of it is in flight (counted)."""
        m.pins += 1

    def unpin_model(self, m: HostModel) -> None:
        m.pins = max(0, m.pins - 1)

    def release(self, m: HostModel | str) -> None:
        """Stop holding a model in this process (unmap it). The host copy stays cached for others / later."""
        key = m if isinstance(m, str) else m.key
        with self._lock:
            hm = self.models.pop(key, None)
            if hm is None:
                return
            if hm.pins:
                self.models[key] = hm
                raise RuntimeError(f"{key} is in use by {hm.pins} swap(s) in flight; release it after they finish")
            hm.region.close()
            with self.index.locked() as data:
                e = data["entries"].get(key)
                if e is not None:
                    e["holders"] = [h for h in e["holders"] if h != self.me]

    def evict(self, key: str) -> None:
        """Drop a model's host copy now (it must not be held by another live process)."""
        with self._lock, self.index.locked() as data:
            e = data["entries"].get(key)
            if e is None:
                return
            others = [h for h in e["holders"] if h != self.me]
            if others or (key in self.models and self.models[key].pins):
                raise HostCacheFull(f"{key} is in use ({len(others)} other holder(s)); cannot evict", 0,
                                    self.budget, self._used(data))
            self._drop(data, key)

    def used_bytes(self) -> int:
        with self.index.locked() as data:
            return self._used(data)

    def entries(self) -> dict[str, dict]:
        """A snapshot of the node-wide index (for status pages and tests)."""
        with self.index.locked() as data:
            return {k: dict(v) for k, v in data["entries"].items()}

    def close(self, unlink_unused: bool = True) -> None:
        """Release every model; with `unlink_unused`, drop host copies no live process holds any more and
        remove the cache directory once it is empty (no /dev/shm leftovers after shutdown)."""
        with self._lock:
            for hm in self.models.values():
                hm.region.close()
            self.models.clear()
            with self.index.locked() as data:
                for key, e in list(data["entries"].items()):
                    e["holders"] = [h for h in e["holders"] if h != self.me]
                    if e.get("owner") == self.me and e["state"] != "ready":
                        self._drop(data, key)
                    elif unlink_unused and not e["holders"]:
                        self._drop(data, key)
                data["remove_dir"] = unlink_unused

    # -- internals (call with the index locked) ---------------------------------------------------------
    def _load(self, key: str, model_dir, layout: ModelLayout, progress: Progress | None) -> HostModel:
        region = None
        try:
            t = time.perf_counter()
            region = PinnedRegion.create(self.index.seg_path(key), layout.nbytes, pin=False, reserve=False,
                                         parts=region_parts(layout.nbytes))
            stats = fill_region(region, Path(model_dir), layout, torch.cuda.is_available() if self.pin is None
                                else self.pin, self.threads, progress, create_s=time.perf_counter() - t)
        except BaseException:
            if region is not None:
                region.close()  # waits for a registration in flight, then unregisters
            with self.index.locked() as data:
                self._drop(data, key)
            raise
        with self.index.locked() as data:
            data["entries"][key]["state"] = "ready"
        log.info("%s: loaded %s", key, stats)
        return HostModel(key, Path(model_dir), layout, region, True, load_stats=stats)

    @staticmethod
    def _touch(data: dict, key: str) -> None:
        data["tick"] += 1
        data["entries"][key]["tick"] = data["tick"]

    @staticmethod
    def _used(data: dict) -> int:
        return sum(e["nbytes"] for e in data["entries"].values())

    def _evictable(self, data: dict, key: str) -> bool:
        e = data["entries"][key]
        if e["state"] != "ready" or any(h != self.me and holder_alive(h) for h in e["holders"]):
            return False
        return not (key in self.models and self.models[key].pins)

    def _make_room(self, data: dict, nbytes: int, for_key: str) -> None:
        if nbytes > self.budget:
            raise HostCacheTooSmall(f"{for_key} needs {_gib(nbytes)} but the host cache budget is "
                                    f"{_gib(self.budget)}: it can never fit", nbytes, self.budget, self._used(data))
        while self._used(data) + nbytes > self.budget:
            victims = [k for k in data["entries"] if self._evictable(data, k)]
            if not victims:
                used = self._used(data)
                raise HostCacheFull(f"{for_key} needs {_gib(nbytes)}; cache holds {_gib(used)} of "
                                    f"{_gib(self.budget)} and every entry is in use", nbytes, self.budget, used)
            self._drop(data, min(victims, key=lambda k: data["entries"][k].get("tick", 0)))

    def _drop(self, data: dict, key: str) -> None:
        hm = self.models.pop(key, None)
        if hm is not None:
            hm.region.close()
        data["entries"].pop(key, None)
        remove_region(self.index.seg_path(key))
