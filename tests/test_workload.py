"""Seeded workload generator and its JSONL round trip."""

from __future__ import annotations

import statistics

from load_tests.workload import generate, parse_models, read_jsonl, write_jsonl


def test_parse_models():
    m = parse_models("4x7b,6x1.5b")
    assert len(m) == 10 and m[0].name == "qwen2-7b-0" and m[-1].size == "1.5b"
    assert parse_models("2xllama:8b")[1].name == "llama-8b-1"


def test_seeded_lengths_and_rates(tmp_path):
    names = [f"m{i}" for i in range(5)]
    a = generate(names, 0.5, 2000, seed=3)
    assert a == generate(names, 0.5, 2000, seed=3)
    assert a != generate(names, 0.5, 2000, seed=4)
    assert all(x.time <= y.time for x, y in zip(a, a[1:], strict=False))
    assert abs(len(a) - 5 * 0.5 * 2000) < 4 * (5 * 0.5 * 2000) ** 0.5  # Poisson count
    assert 200 < statistics.mean(w.prompt_len for w in a) < 300
    assert 200 < statistics.mean(w.output_len for w in a) < 300
    assert max(w.output_len for w in a) > 4 * 256  # long tail
    assert all(w.prompt_len + w.output_len < 4096 for w in a)
    path = tmp_path / "w.jsonl"
    write_jsonl(a, path)
    assert read_jsonl(path) == a


def test_common_random_numbers_across_rates():
    lo = generate(["m"], 0.5, 100, seed=0)
    hi = generate(["m"], 1.0, 100, seed=0)
    assert [w.prompt_len for w in lo] == [w.prompt_len for w in hi[: len(lo)]]
    assert all(abs(h.time * 2 - w.time) < 1e-9 for w, h in zip(lo, hi, strict=False))
