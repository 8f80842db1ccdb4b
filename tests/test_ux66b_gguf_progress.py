"""`tokenpool serve FILE.gguf`'s conversion (`real_model.ensure_gguf`, a child process) draws its progress bar when
the server's stderr is a terminal: the child's stderr was a pipe, read only for its last line, so the bar (drawn at a
terminal only, 3b73213) never showed, where the default's first run (its maker's stderr the server's) showed it. In a
log nothing of the child's comes out, and a conversion that fails is one reason (through a pipe of its own), at a
terminal too, without the child's traceback."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from controller import real_model
from load_tests.live_server import REPO_ROOT

# ensure_gguf as `tokenpool serve FILE.gguf` runs it (convert_gguf_files), in a process of its own whose stderr the test
# gives; what it raises printed to stdout
CONVERT = """
import sys
from pathlib import Path
from controller import real_model
try:
    print(real_model.ensure_gguf(Path(sys.argv[1]), Path(sys.argv[2])))
except RuntimeError as e:
    print("RuntimeError:", e)
"""


def _convert(gguf: Path, cache: Path, terminal: bool) -> tuple[str, str]:
    """(stdout, stderr) of CONVERT, its stderr a terminal of 30 rows and 100 columns (tqdm draws nothing on a
    terminal of no size, as `script` makes one without a terminal of its own) or a pipe."""
    cmd = [sys.executable, "-c", CONVERT, str(gguf), str(cache)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    if not terminal:
        r = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)
        return r.stdout, r.stderr
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    p = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    seen = b""
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # (EIO: every writer of the terminal gone)
                break
            if not chunk:
                break
            seen += chunk
        out = p.communicate(timeout=180)[0].decode()
    finally:
        os.close(master)
        if p.poll() is None:
            p.kill()
            p.wait()
    return out, seen.decode(errors="replace")


def test_a_conversion_at_a_terminal_draws_its_bar(tmp_path):
    gguf = real_model.find_gguf(tmp_path)
    out, term = _convert(gguf, tmp_path / "cache", terminal=True)
    folder = real_model.gguf_folder(gguf, tmp_path / "cache")
    assert out.strip() == str(folder) and real_model.converted(folder), (out, term)
    assert "Converting and de-quantizing GGUF tensors" in term and "272/272" in term, term


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "pipe"])
def test_a_failed_conversion_is_its_reason_and_the_converting_line_only(tmp_path, terminal):
    """A file that begins as a GGUF and is none (version 0): the error its reader raises, as the server's start-up
    line says it (`cannot be converted: ...`); on stderr only the line that says it converts, no traceback."""
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(60))
    out, err = _convert(bad, tmp_path / "cache", terminal)
    assert out.strip() == (f"RuntimeError: {bad} cannot be converted: ValueError: {bad} is GGUF v0; this reader "
                           "handles v2 and v3."), (out, err)
    folder = real_model.gguf_folder(bad, tmp_path / "cache")
    assert [x for x in err.splitlines() if x.strip()] == [
        f"converting {bad} to a safetensors folder at {folder} (once)"], err
