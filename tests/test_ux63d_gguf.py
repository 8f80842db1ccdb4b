"""A GGUF's conversion dequantises ahead (controller.real_model._dequantized_ahead): the legacy block types (Q4_0,
Q4_1, Q8_0) whole tensors at a time (_dequantize, the same bits as gguf's own), on a thread of their own that works
while torch and transformers are imported; transformers' loop finds each tensor made. The converted folder is the
one gguf's own dequantisation, tensor by tensor, gave (AHEAD off), byte for byte."""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import pytest

from controller import real_model


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_each_block_type_dequantised_as_gguf_does(monkeypatch, qtype):
    """Random blocks (every f16 scale: NaN, infinite and subnormal ones too), in one row, in rows, and over several
    steps (a small step size, one step ending inside the last row): gguf's array, bit for bit, dtype and shape."""
    import gguf

    q = gguf.GGMLQuantizationType[qtype]
    per_block, size = gguf.GGML_QUANT_SIZES[q]
    rng = np.random.default_rng(63)
    monkeypatch.setattr(real_model, "_CHUNK", 7)
    for shape in [(size,), (3, 4 * size), (50, 2 * size), (2, 3, 5 * size)]:
        data = rng.integers(0, 256, size=shape, dtype=np.uint8)
        with np.errstate(invalid="ignore"):  # (an infinite scale times 0: NaN, in both)
            ours, theirs = real_model._dequantize(data, q), gguf.quants.dequantize(data, q)
        assert (ours.dtype, ours.shape) == (theirs.dtype, theirs.shape) == \
            (np.float32, (*shape[:-1], shape[-1] // size * per_block))
        assert ours.tobytes() == theirs.tobytes(), (qtype, shape)
    with pytest.raises(ValueError, match="not a multiple"):  # (gguf's own error)
        real_model._dequantize(np.zeros((2, size + 1), np.uint8), q)


def test_the_conversion_dequantises_ahead_and_byte_for_byte_the_old_one(gguf_conversion, tmp_path, monkeypatch):
    """The default model converted with AHEAD on (the session's conversion, `gguf_conversion`): every tensor made on
    the conversion's own thread, and none by gguf where transformers asked for it (the thread read the file through
    the conversion's reader: the same memory map); each file of the folder alike, by sha256, to the conversion with
    AHEAD off (gguf's dequantisation, each tensor where transformers asks for it)."""
    import gguf

    path, new, made_on = gguf_conversion
    assert made_on["ours"] == ["gguf-dequantize"] * 272
    assert made_on["gguf"] == ["gguf-dequantize"] * 61  # (the F32 tensors, views of the file; on the thread)
    assert made_on["left"] == []  # (ended with the conversion)

    ours, theirs = [], []

    def recorded(made, into):
        def dequantize(data, qtype):
            into.append(threading.current_thread().name)
            return made(data, qtype)
        return dequantize

    monkeypatch.setattr(real_model, "_dequantize", recorded(real_model._dequantize, ours))
    gguf_own = recorded(gguf.quants.dequantize, theirs)
    monkeypatch.setattr(gguf, "dequantize", gguf_own)  # (transformers': gguf's name, not the module's)
    monkeypatch.setattr(gguf.quants, "dequantize", gguf_own)
    monkeypatch.setattr(real_model, "AHEAD", False)
    old = real_model.convert_gguf(path, tmp_path / "old")
    assert ours == [] and theirs == ["MainThread"] * 272

    def digests(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}

    assert digests(new) == digests(old)
    assert {"model.safetensors", "config.json", "tokenizer.json", real_model.MARKER} <= set(digests(new))


def test_an_error_on_the_thread_is_raised_where_asked_and_the_thread_ends(tmp_path, monkeypatch):
    """A tensor the thread cannot dequantise: transformers' call makes it itself and gets the error (no wait for a
    tensor never made); and leaving early (an error before the loop) ends the thread and gives gguf back its
    dequantize."""
    import gguf

    path = real_model.find_gguf(tmp_path)
    own = gguf.dequantize
    dequantize = real_model._dequantize

    def failing(data, qtype):
        if qtype == gguf.GGMLQuantizationType.Q8_0:
            raise ValueError("cannot dequantise")
        return dequantize(data, qtype)

    monkeypatch.setattr(real_model, "_dequantize", failing)
    with real_model._gguf_read_once(), real_model._dequantized_ahead(path):
        tensors = gguf.GGUFReader(str(path)).tensors
        with pytest.raises(ValueError, match="cannot dequantise"):
            gguf.dequantize(tensors[0].data, tensors[0].tensor_type)  # (token_embd.weight, the file's only Q8_0)
        assert gguf.dequantize(tensors[2].data, tensors[2].tensor_type).shape == (576, 1536)
    assert gguf.dequantize is own

    with pytest.raises(RuntimeError), real_model._gguf_read_once(), real_model._dequantized_ahead(path):
        raise RuntimeError("before the loop")
    assert gguf.dequantize is own
    assert not [t for t in threading.enumerate() if t.name == "gguf-dequantize"]
