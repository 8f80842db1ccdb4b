"""Read safetensors straight into a model's host region.

Safetensors is an 8-byte header length, a JSON header ({name: dtype, shape, data_offsets}) and raw
row-major bytes. We parse the header ourselves and `preadv` each source tensor directly into its place in the
destination region: no intermediate tensor, no Python copy, for tensors already in the target dtype (the
common case: bf16 checkpoints served in bf16). Fused weights (q|k|v, gate|up) are concatenations along dim 0,
so each source is one contiguous byte range of its destination. Reads are split into <= 64 MiB pieces and
run on a thread pool, one thread per CPU by default (preadv releases the GIL); only a dtype conversion goes
through one temporary buffer. The region's pages need not exist: a read into a page that does not exist yet
makes it (allocate, zero, map) and copies into it while it is still in cache, and on a full tmpfs the read
fails with EFAULT instead of a SIGBUS. Only the conversion's store comes from user space, so its range is
made first (`make_pages`).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch

from gpu_pool.pinned import io_threads
from model_swapper.layout import ModelLayout
from model_swapper.weights import safetensors_files

PIECE = 64 << 20

ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}

Progress = Callable[[int, int], None]  # (bytes done, bytes total), called on the loading thread


@dataclass(frozen=True)
class StTensor:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first byte
    nbytes: int


def read_header(path: Path) -> dict[str, StTensor]:
    """The tensors of a safetensors file. A file that is not one, or is cut short (a copy or download that did not
    finish), is a ValueError naming the file, not a JSON or struct error from deep in a load."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 2 <= n <= size - 8:
            raise ValueError(f"{path}: not a safetensors file (its first 8 bytes do not give a header length that "
                             f"fits its {size} bytes)")
        try:
            header = json.loads(f.read(n))
            base = 8 + n
            out = {}
            for name, h in header.items():
                if name == "__metadata__":
                    continue
                b, e = h["data_offsets"]
                if base + e > size:
                    raise ValueError(f"{path}: cut short: tensor {name!r} ends at byte {base + e}, the file has "
                                     f"{size} (a copy or download that did not finish?)")
                out[name] = StTensor(path, ST_DTYPES[h["dtype"]], tuple(h["shape"]), base + b, e - b)
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a safetensors file (its header does not parse: {e})") from None
    return out


@dataclass(frozen=True)
class _Piece:
    src: StTensor
    src_off: int  # bytes into the source tensor
    nbytes: int  # source bytes
    dst_off: int  # bytes into the region


def plan(model_dir: Path, layout: ModelLayout) -> list[_Piece]:
    """Every byte range to read, checked against the layout's shapes."""
    tensors: dict[str, StTensor] = {}
    for f in safetensors_files(Path(model_dir)):
        tensors.update(read_header(f))
    pieces = []
    esz = layout.dtype.itemsize
    for p in layout.places:
        spec, rows_done = p.spec, 0
        row_elems = 1
        for d in spec.shape[1:]:
            row_elems *= d
        for src in spec.sources:
            t = tensors.get(src)
            if t is None:
                raise KeyError(f"{model_dir}: missing tensor {src} (needed for {spec.name})")
            if tuple(t.shape[1:]) != tuple(spec.shape[1:]) or rows_done + (t.shape[0] if t.shape else 1) > (
                    spec.shape[0] if spec.shape else 1):
                raise ValueError(f"{src} has shape {t.shape}, which does not fit {spec.name} {spec.shape}")
            rows = t.shape[0] if t.shape else 1
            dst = p.offset + rows_done * row_elems * esz
            # split along rows so a conversion never needs more than one piece of scratch
            src_row = row_elems * t.dtype.itemsize
            step = max(1, PIECE // max(1, src_row))
            for r in range(0, rows, step):
                k = min(step, rows - r)
                pieces.append(_Piece(t, r * src_row, k * src_row, dst + r * row_elems * esz))
            rows_done += rows
        if rows_done != (spec.shape[0] if spec.shape else 1):
            raise ValueError(f"{spec.name}: sources cover {rows_done} rows of {spec.shape}")
    return pieces


def _pread_into(fd: int, buf: memoryview, offset: int) -> None:
    while len(buf):
        n = os.preadv(fd, [buf], offset)
        if n <= 0:
            raise OSError(f"unexpected end of file at offset {offset}")
        buf, offset = buf[n:], offset + n


def load_into_region(model_dir: Path, layout: ModelLayout, region: torch.Tensor, threads: int | None = None,
                     progress: Progress | None = None, make_pages: Callable[[int, int], None] | None = None) -> int:
    """Fill `region` (1-D uint8, CPU) with the model's weights in `layout` on `threads` threads (default: one
    per CPU). `make_pages(offset, nbytes)`, if given, runs before a dtype conversion stores into that range
    (a region whose pages may not exist yet). Returns bytes read."""
    if region.device.type != "cpu" or region.dtype != torch.uint8 or region.numel() < layout.nbytes:
        raise ValueError(f"region must be a CPU uint8 tensor of >= {layout.nbytes} bytes")
    pieces = plan(Path(model_dir), layout)
    mv = memoryview(region.numpy()).cast("B")
    fds = {p: os.open(p, os.O_RDONLY) for p in {pc.src.path for pc in pieces}}
    total = sum(pc.nbytes for pc in pieces)

    def run(pc: _Piece) -> int:
        fd = fds[pc.src.path]
        if pc.src.dtype == layout.dtype:
            _pread_into(fd, mv[pc.dst_off:pc.dst_off + pc.nbytes], pc.src.start + pc.src_off)
        else:  # one scratch copy, then a cast into place
            scratch = bytearray(pc.nbytes)
            _pread_into(fd, memoryview(scratch), pc.src.start + pc.src_off)
            src = torch.frombuffer(scratch, dtype=pc.src.dtype)
            n_out = src.numel() * layout.dtype.itemsize
            if make_pages is not None:
                make_pages(pc.dst_off, n_out)
            region[pc.dst_off:pc.dst_off + n_out].view(layout.dtype).copy_(src)
        return pc.nbytes

    done = 0
    try:
        with ThreadPoolExecutor(max(1, threads or io_threads()), thread_name_prefix="st-load") as ex:
            for fut in as_completed([ex.submit(run, pc) for pc in pieces]):
                done += fut.result()
                if progress is not None:
                    progress(done, total)
    finally:
        for fd in fds.values():
            os.close(fd)
    return done
