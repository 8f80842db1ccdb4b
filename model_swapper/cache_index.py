"""The node-wide index of the shared host model cache: one JSON file guarded by an flock.

Layout of a cache directory (default /dev/shm/tokenpool-<namespace>/):
    index.lock          flock'd around every read-modify-write of index.json
    index.json          {"tick": n, "entries": {key: entry}}
    <key>.seg           one model's weights, laid out by ModelLayout

An entry: {"model_dir", "dtype", "nbytes", "state": "loading" | "ready", "owner": holder id of the loader,
"holders": [holder ids], "tick": last use}. A holder id is "<pid>:<process start time>:<n>"; a holder is alive
while a process with that pid *and* that start time exists, so a crashed engine's holds disappear at the next
locked access (pid reuse cannot resurrect them), and a half-loaded segment of a dead loader is unlinked.
flock is released by the kernel when its holder dies, so a crash never wedges the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

from gpu_pool.pinned import remove_region
from tokenpool.holders import live, loader_died


class CacheIndex:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.lock_path = self.root / "index.lock"
        self.path = self.root / "index.json"

    def seg_path(self, key: str) -> Path:
        return self.root / f"{key}.seg"

    @contextlib.contextmanager
    def locked(self) -> Iterator[dict]:
        """Yield the index (pruned of dead holders and dead loaders) under the lock; write it back after.
        Setting `data["remove_dir"] = True` removes the directory itself if nothing is left in it."""
        while True:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_CREAT | os.O_RDWR, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:  # another process may have removed the directory between our open and our flock: retry
                if os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        try:
            data = self._read()
            self._prune(data)
            yield data
            remove_dir = data.pop("remove_dir", False) and not data["entries"]
            if remove_dir:
                self._remove_all()
            else:
                tmp = self.path.with_suffix(f".tmp{os.getpid()}")
                tmp.write_text(json.dumps(data))
                os.replace(tmp, self.path)  # atomic: a crash leaves the old or the new index, never half
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            data = {}
        data.setdefault("tick", 0)
        data.setdefault("entries", {})
        return data

    def _prune(self, data: dict) -> None:
        entries = data["entries"]
        for key, e in list(entries.items()):
            e["holders"] = live(e["holders"])
            if loader_died(e):
                remove_region(self.seg_path(key))  # a loader died mid-load
                del entries[key]
        for seg in self.root.glob("*.seg"):  # segments without an entry: leftovers of a crash
            if seg.stem not in entries:
                remove_region(seg)

    def _remove_all(self) -> None:
        for p in self.root.iterdir():
            if p.name != self.lock_path.name:
                remove_region(p)
        self.lock_path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.root.rmdir()
