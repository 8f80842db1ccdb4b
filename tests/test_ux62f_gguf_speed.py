"""A GGUF's conversion reads its metadata arrays in bulk (controller.real_model._bulk_arrays): the reader gguf's
GGUFReader makes, the same fields and the same converted folder, byte for byte, in a fraction of the time (gguf read
the default model's tokenizer arrays element by element, ~3.7 M numpy memmap slices, 2.5 s on 2 cores)."""

from __future__ import annotations

import struct

import pytest

from controller import real_model


def _same_fields(a, b) -> None:
    """Two GGUFReaders' fields and tensors alike: names, offsets, types, data indexes and every part's dtype, shape
    and bytes."""
    assert list(a.fields) == list(b.fields)
    for name, fa in a.fields.items():
        fb = b.fields[name]
        assert (fa.offset, fa.name, fa.data, fa.types) == (fb.offset, fb.name, fb.data, fb.types), name
        assert len(fa.parts) == len(fb.parts), name
        for pa, pb in zip(fa.parts, fb.parts):
            assert (pa.dtype, pa.shape, pa.tobytes()) == (pb.dtype, pb.shape, pb.tobytes()), name
        assert fa.contents() == fb.contents(), name
    assert a.data_offset == b.data_offset and a.alignment == b.alignment
    assert [(t.name, t.tensor_type, t.shape.tolist(), t.data_offset, t.n_bytes) for t in a.tensors] == \
        [(t.name, t.tensor_type, t.shape.tolist(), t.data_offset, t.n_bytes) for t in b.tensors]


def _read(path):
    """(gguf's own reader of `path`, the conversion's)"""
    import gguf

    own = gguf.GGUFReader(path)
    with real_model._gguf_read_once():
        return own, gguf.GGUFReader(path)


def _handmade_gguf(path, order: str) -> None:
    """A GGUF of every metadata kind gguf reads, in byte order `order` ("<" or ">"): scalars, strings (empty,
    multi-byte UTF-8), arrays of each number type and of strings, empty arrays, an array of arrays (GGUFWriter makes
    no empty array)."""
    def num(fmt, v):
        return struct.pack(order + fmt, v)

    def text(s):
        return num("Q", len(s.encode())) + s.encode()

    def array(itype, items):
        return num("I", itype) + num("Q", len(items)) + b"".join(items)

    numbers = {0: ("B", [0, 7, 255]), 1: ("b", [-128, 5]), 2: ("H", [65535]), 3: ("h", [-3, 3]), 4: ("I", [1, 2]),
               5: ("i", [-1]), 6: ("f", [0.5, -2.25]), 7: ("?", [True, False, True]), 10: ("Q", [2**63]),
               11: ("q", [-(2**40)]), 12: ("d", [3.141592653589793])}
    kv = [("general.architecture", 8, text("llama")), ("general.alignment", 4, num("I", 64)),
          ("general.empty", 8, text("")), ("a.flag", 7, num("?", True)), ("a.f64", 12, num("d", 1e-9))]
    kv += [(f"a.array{t}", 9, array(t, [num(f, v) for v in vs])) for t, (f, vs) in numbers.items()]
    kv += [("tokenizer.ggml.tokens", 9, array(8, [text(s) for s in ("<s>", "", "héllo", "日本", " Ġthe", "\n")])),
           ("a.no_strings", 9, array(8, [])), ("a.no_numbers", 9, array(5, [])),
           ("a.arrays", 9, array(9, [array(5, [num("i", 1), num("i", 2)]), array(8, [text("x")])]))]
    with open(path, "wb") as f:
        f.write(b"GGUF" + num("I", 3) + num("Q", 0) + num("Q", len(kv)))
        for key, kind, payload in kv:
            f.write(text(key) + num("I", kind) + payload)


@pytest.mark.parametrize("order", ["<", ">"])
def test_every_metadata_kind_read_as_gguf_reads_it(tmp_path, order):
    """Each kind of metadata value, in a file of either byte order (the other one is gguf's own reading), gives the
    fields gguf gives: the hand-written reading covers arrays of numbers and of strings, empty ones included."""
    path = tmp_path / "kinds.gguf"
    _handmade_gguf(path, order)
    own, bulk = _read(path)
    _same_fields(own, bulk)
    assert bulk.fields["tokenizer.ggml.tokens"].contents() == ["<s>", "", "héllo", "日本", " Ġthe", "\n"]
    assert bulk.fields["a.array7"].contents() == [True, False, True]
    assert bulk.fields["a.no_strings"].contents() == [] and bulk.fields["a.array10"].contents() == [2**63]


def test_a_truncated_array_is_an_error(tmp_path):
    """A string array whose last string runs past the end of the file: an error, not a short string."""
    path = tmp_path / "kinds.gguf"
    _handmade_gguf(path, "<")
    data = path.read_bytes()
    cut = data.index("日本".encode()) + 2
    path.write_bytes(data[:cut])
    with pytest.raises(ValueError, match="past the end of the file"), real_model._gguf_read_once():
        import gguf

        gguf.GGUFReader(path)


def test_the_default_models_gguf_read_alike(tmp_path):
    """SmolLM2's GGUF (its tokenizer's 49,152 tokens and 48,900 merges): the conversion's reader gives gguf's fields
    and tensors. (Its speed, 2.5 s -> 0.18 s on 2 cores, is a benchmark's: bench/results/gguf_convert_cpu2_*.json.)"""
    import gguf

    path = real_model.find_gguf(tmp_path)
    own = gguf.GGUFReader(path)
    with real_model._gguf_read_once():
        bulk = gguf.GGUFReader(path)
    _same_fields(own, bulk)
    assert len(bulk.fields["tokenizer.ggml.tokens"].data) == 49152 and len(bulk.tensors) == 272


def test_the_conversion_is_byte_for_byte_the_old_one(gguf_conversion, tmp_path, monkeypatch):
    """The default model converted with the bulk reader (the session's conversion, `gguf_conversion`) and with gguf's
    own (the conversion before it): every file of the folder alike, byte for byte -- the safetensors (every tensor),
    config.json, the tokenizer's files, the generation config, the marker."""
    path, new, _ = gguf_conversion
    monkeypatch.setattr(real_model, "_bulk_arrays", lambda reader: reader)
    old = real_model.convert_gguf(path, tmp_path / "old")
    names = sorted(p.name for p in new.iterdir())
    assert names == sorted(p.name for p in old.iterdir())
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            real_model.MARKER} <= set(names)
    for name in names:
        assert (new / name).read_bytes() == (old / name).read_bytes(), name

    from safetensors.numpy import load_file

    tensors = load_file(str(new / "model.safetensors"))
    assert len(tensors) == 272 and tensors["model.embed_tokens.weight"].shape == (49152, 576)
