"""Two processes (two servers on a first run, the suite's xdist workers) asking for the default's conversion at
once: one converts, the other waits and finds the folder made (it had removed the first's finished folder to
rename its own over it)."""

from __future__ import annotations

import threading
import time

from controller import real_model


def test_one_conversion_at_a_time(tmp_path, monkeypatch):
    out = tmp_path / "cache" / "smollm2"
    calls: list[float] = []

    def convert(gguf, dst):
        calls.append(time.monotonic())
        time.sleep(0.3)  # (the second asks meanwhile)
        dst.mkdir()
        (dst / "config.json").write_text("{}")
        (dst / real_model.MARKER).write_text("{}")
        return dst

    monkeypatch.setattr(real_model, "find_gguf", lambda folder: folder / "x.gguf")
    monkeypatch.setattr(real_model, "convert_gguf", convert)
    got: list = []
    threads = [threading.Thread(target=lambda: got.append(real_model.ensure_smollm2(out))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert got == [out, out] and len(calls) == 1


def test_a_folder_not_writable_still_gives_the_conversions_own_error(tmp_path, monkeypatch):
    """No lock file can be made there: the conversion goes on without one (its own error, as before)."""
    import pytest

    monkeypatch.setattr(real_model, "find_gguf", lambda folder: folder / "x.gguf")

    def convert(gguf, dst):
        raise PermissionError(13, "Permission denied", str(dst.parent))

    monkeypatch.setattr(real_model, "convert_gguf", convert)
    monkeypatch.setattr("builtins.open", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "no")))
    with pytest.raises(PermissionError, match="Permission denied"):
        real_model.ensure_smollm2(tmp_path / "smollm2")
