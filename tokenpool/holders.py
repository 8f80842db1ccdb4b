"""Who holds a host copy of a model (model_swapper's cache index): a holder is "PID:START:N", START its process's
start time in clock ticks since boot (so a PID reused by another process is no holder). Apart from the cache's
code, which imports torch, so that the controller can read an index without it (`pool.drop_unheld_host_copies`)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

_serial = itertools.count()


def start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: starttime, in clock ticks since boot


def new_holder_id() -> str:
    pid = os.getpid()
    return f"{pid}:{start_time(pid)}:{next(_serial)}"


def holder_alive(holder: str) -> bool:
    pid_s, start, _ = holder.split(":", 2)
    pid = int(pid_s)
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return start == "None" or start_time(pid) == start


def live(holders: list[str]) -> list[str]:
    """The holders of an index entry whose processes still run."""
    return [h for h in holders if holder_alive(h)]


def loader_died(entry: dict) -> bool:
    """An index entry still loading whose loader is gone: its segment is half written, for no one."""
    return entry["state"] != "ready" and not holder_alive(entry["owner"])
