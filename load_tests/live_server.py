"""A real server in a subprocess on 127.0.0.1 and a free port, for tests and the load test."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def terminal_signals(ignore_hangup: bool = False):
    """A child's preexec_fn: SIGINT, SIGQUIT and SIGHUP as a terminal gives them (their default action), whatever
    this process inherited. A child inherits an ignored signal, and a test run started in the background has SIGINT
    and SIGQUIT ignored (under nohup SIGHUP too): its Ctrl-C and hang-up tests then failed, the child never seeing
    the signal. `ignore_hangup`: SIGHUP ignored, as nohup starts a process."""
    def reset() -> None:
        for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        if ignore_hangup:
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return reset


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


class LiveServer:
    """`with LiveServer(config_dict, workdir) as srv:` -> srv.url; the config gets listen 127.0.0.1:free port.

    `config=None` starts `tokenpool serve` without a configuration (the embedded default, or the `args`'
    model directories), on 127.0.0.1 and a free port (`port`: that one instead)."""

    def __init__(self, config: dict | None, workdir: Path, ready_timeout: float = 120.0, wait_ready: bool = True,
                 args: list[str] | None = None, env: dict[str, str] | None = None, ignore_hangup: bool = False,
                 port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.args = list(args or [])
        self.extra_env = dict(env or {})
        if config is None:
            self.config_path = None
            self.args += ["--host", "127.0.0.1", "--port", str(self.port)]
        else:
            cfg = dict(config, listen={"host": "127.0.0.1", "port": self.port})
            self.config_path = self.workdir / "config.yaml"
            self.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            self.args += ["--config", str(self.config_path)]
        self.log_path = self.workdir / "server.log"
        self.ready_timeout = ready_timeout
        self.wait_ready = wait_ready
        self.proc: subprocess.Popen | None = None
        self._sigterm = None
        self.ignore_hangup = ignore_hangup  # the server starts with SIGHUP ignored, as under nohup

    def __enter__(self) -> LiveServer:
        # The server runs in its own session (its workers with it), so a SIGTERM to this process (a `timeout`
        # around a benchmark) does not reach it; Python's default SIGTERM exits without unwinding, which left
        # the server and its workers running on the GPU beside the next benchmark. Unwind instead: __exit__
        # stops the session.
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            self._sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
                   TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                   **self.extra_env)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "controller.serve", *self.args],
                                     cwd=REPO_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=terminal_signals(self.ignore_hangup))
        if self.wait_ready:
            try:
                self.wait_healthy(self.ready_timeout)
            except BaseException:  # a server that never got healthy is stopped too, not left running
                self.__exit__()
                raise
        return self

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        # one client for all the polls: httpx.get() builds a client (and its SSL context) each time, CPU that the
        # starting server then lacks; polled each 0.05 s (a test waits for each start: 0.2 s cost it 0.1 s on average)
        with httpx.Client(timeout=2, trust_env=False) as client:
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log()}")
                try:
                    if client.get(self.url + "/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
        raise TimeoutError(f"server not healthy after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""

    def __exit__(self, *exc) -> None:
        if self._sigterm is not None:
            signal.signal(signal.SIGTERM, self._sigterm)
            self._sigterm = None
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server and the workers it started (its session)
            self.proc.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(5)
        self._log.close()
