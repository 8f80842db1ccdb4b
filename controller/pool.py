"""The controller's side of the engine workers: a TCP listener, one handle per worker, local worker processes.

Workers connect (local ones are started here, one per GPU or one on CPU; remote ones start themselves with
`python -m controller.worker --controller HOST:PORT`) and register. A worker is dead when its connection
closes or it is silent for `dead_after_s`; its in-flight requests are handed to `on_dead` and, if it was a
local one, its slot gets a process again. Decisions (what to load where, what to retry) are the controller's.

A restarted worker used to pay its whole start-up again: the interpreter, torch and the engine's imports, on a
GPU the CUDA context (seconds, before the first model could even be registered). So each local slot keeps a
warm standby (`workers.standby`): a second worker process started once the slot's worker has joined (and done its
first loads, then served no request for a moment: not beside a first request), which does that start-up and then
waits, unregistered and holding no arena, host copy or KV, on its stdin. When the slot's worker dies the spare is
told "go" and registers at once; the controller sends it the predecessor's models as soon as it joins, and the next
spare is started then. On a GPU the spare costs one CUDA context (~0.5 GB), which the arena's default margin
(hosting.GPU_MARGIN_BYTES) already leaves free. A spare never outlives the pool: `stop()` ends it, and if the
controller itself dies its stdin closes and it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import re
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller import messages as m
from controller.admission import ewma
from controller.config import EngineOptions, GPUSettings, WorkerSettings
from controller.keys import verify_key
from controller.worker import STOPPING
from token_scheduler.policies.slo import ModelSLO
from token_scheduler.request import SamplingParams
from tokenpool import env
from tokenpool.holders import live, loader_died

log = logging.getLogger("tokenpool.pool")
STEP_FLOOR_S = 1e-3  # no engine step is believed faster than this
STEP_CEIL_S = 60.0
MAX_DEVICE_BYTES = 1 << 41  # 2 TiB: a claimed device larger than this is not believed
POOL_VIEW_MAX = 256 << 10  # bytes of a worker's pool view kept (it reaches /admin and the dashboard)
MAX_EVENTS = 1024  # events per Stats
# how long the pool view keeps a model out after an evict or unload while the worker's Stats still list it resident (a
# view taken before the worker applied it), where the Stats cannot tell (an unload; a worker that does not count its
# evicts: Stats.pool["evicts"]); past this the worker's word is taken (it kept the weights, after all)
GONE_TRUST_S = 10.0
REPO_ROOT = Path(__file__).resolve().parent.parent
JOIN_GRACE_S = 300.0  # at start-up, how long the server waits for every local worker before it is ready without
QUICK_DEATH_S = 30.0  # a local worker that dies sooner after it started is restarted with a growing backoff
# a local worker must join this long after it started (a cold start: imports; on a GPU the device measured first) or
# after its standby was told to take over (its start-up done: it registers at once); else it is killed and replaced
COLD_JOIN_S = 300.0
PROMOTED_JOIN_S = 30.0
SPARE_BACKOFF_MAX_S = 60.0  # a standby that keeps exiting is started again at most this often
SPARE_WAIT_S = 120.0  # a standby starts once its worker has done its first loads, or this long after it joined
# ... and once the slot has then served no request for SPARE_IDLE_S, or SPARE_BUSY_S after those loads at most
SPARE_IDLE_S = 2.0
SPARE_BUSY_S = 10.0
LOOPING_DEATHS = 3  # a slot whose workers died this many times in a row before they joined is in a crash loop


@dataclass
class Replica:
    """A model on an engine."""

    model: str
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # set when loaded or failed
    state: str = "loading"  # loading | ready | failed | dropped (unregistered while it loaded)
    error: str | None = None
    max_model_len: int = 0
    max_num_seqs: int = 0
    draining: bool = False
    t_load: float = field(default_factory=time.monotonic)


@dataclass
class Sub:
    """One engine request: choice `index` of an API request. Deltas for it go to `sink` as (sub, Delta)."""

    rid: str
    model: str
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    sink: asyncio.Queue
    generated: int = 0
    engine_id: str | None = None
    # seconds it waited for its model to be loaded: its registration on the engine (Controller._place), and the
    # weights' load the engine said it waited for (its first delta's load_s)
    load_s: float = 0.0
    attempts: int = 0  # engines it was sent to (a request whose engine failed is sent again, MAX_ATTEMPTS in all)
    done: bool = False
    # its deltas reach no client before it ends (a request not streamed: the Generation holds them), so it may be run
    # again from its start after its engine failed mid-generation, not only before its first token
    restartable: bool = False
    prefix_hashes: list | None = None  # (prefix-aware routing) its prompt's block hashes, made once for its n choices
    follows: bool = False  # a continuation of its choice's earlier engine request (Controller.go_on)
    earlier: int = 0  # tokens its choice's earlier engine requests made (a continuation's: the views count them)


@dataclass
class EngineHandle:
    id: str
    slot: int | None
    device: str
    host: str
    pid: int
    memory_bytes: int
    writer: asyncio.StreamWriter
    replicas: dict[str, Replica] = field(default_factory=dict)
    subs: dict[str, Sub] = field(default_factory=dict)
    alive: bool = True
    draining: bool = False
    retiring: bool = False  # its worker was signalled to stop (STOPPING): stopped (Shutdown) once it has no request
    stop_grace_s: float | None = None  # (retiring, a remote worker) the grace its STOPPING event asked for its requests
    last_seen: float = field(default_factory=time.monotonic)
    step_s: float = 0.0
    stats: dict[str, dict[str, float]] = field(default_factory=dict)
    pool: dict[str, Any] = field(default_factory=dict)  # the worker's pooled-engine state (Stats.pool)
    observed_step_s: float = 0.0  # the controller's own measure: EWMA gap between Outputs while busy
    t_last_out: float = 0.0
    t_dead: float | None = None
    t_start: float = field(default_factory=time.time)
    # models told to evict (`EnginePool.evict`) whose requests here still run: out of the pool view once they end
    evicting: set[str] = field(default_factory=set)
    # models the pool view says are out since an evict, until the worker's Stats agree or were taken after it: the
    # time, and how many EvictModel of it were sent by then (None: an unload's); see `EnginePool._keep_gone`
    gone: dict[str, tuple[float, int | None]] = field(default_factory=dict)
    evicts: dict[str, int] = field(default_factory=dict)  # EvictModel messages sent per model
    held: list[str] = field(default_factory=list)  # the models its worker hosted as it joined (Register.loaded)

    def send(self, msg: m.Message) -> None:
        if self.alive and not self.writer.is_closing():
            m.write_message(self.writer, msg)


class EnginePool:
    def __init__(self, settings: WorkerSettings, gpus: GPUSettings, *,
                 on_registered: Callable[[EngineHandle, EngineHandle | None], None],
                 on_dead: Callable[[EngineHandle, list[Sub]], None],
                 on_loaded: Callable[[EngineHandle, Replica, float], None],
                 on_stats: Callable[[EngineHandle], None],
                 on_events: Callable[[EngineHandle, list[dict[str, Any]]], None] | None = None,
                 on_failed: Callable[[EngineHandle, Sub, str], None] | None = None,
                 on_stopping: Callable[[EngineHandle], None] | None = None):
        self.s = settings
        self.gpus = gpus
        self.engines: dict[str, EngineHandle] = {}
        self._on_registered, self._on_dead, self._on_loaded, self._on_stats = on_registered, on_dead, on_loaded, on_stats
        self._on_events = on_events
        self._on_failed = on_failed  # a request its engine failed (error_kind "engine"): the controller may send it again
        self._on_stopping = on_stopping  # a worker signalled to stop asks to be let go: the controller decides how
        self._on_pruned: Callable[[EngineHandle], None] | None = None
        self._local_token = secrets.token_urlsafe(24)  # local workers prove they are ours with it
        self._server: asyncio.base_events.Server | None = None
        self.local_slots, self.t_start = 0, time.monotonic()  # local worker slots started, and when (start)
        self._procs: dict[int, asyncio.subprocess.Process] = {}  # slot -> its worker process
        self.starting = False  # the controller is registering its configured models (their loads come next)
        self._spares: dict[int, asyncio.subprocess.Process] = {}  # slot -> its standby (see the module docstring)
        self._looping: dict[int, bool] = {}  # slot -> its workers keep dying before they join (a crash loop)
        self._unjoined: dict[int, int] = {}  # slot -> its workers in a row that died (or were killed) before joining
        self._tasks: list[asyncio.Task] = []
        self._stopping = False
        self.quiet = False  # the server is draining to stop (shutdown.py): a local worker that exits is not replaced
        # how long a signalled local worker waits for this controller's word before it stops on its own (sent in
        # Registered.settings; None: the worker's LOCAL_STOP_WAIT_S)
        self.stop_wait_s: float | None = None
        self.port = 0
        self.restarts = 0
        # the largest KV elements a token of the models served (tokenpool.models.kv_elems_per_token), sent to the workers:
        # their KV pages are sized to hold a few such tokens (controller.hosting.min_page_bytes)
        self.kv_elems_per_token = 0
        # (start(hold_joins=True) until open_joins) a worker's registration waits for it: `tokenpool serve` starts the
        # local workers while it makes its models, whose KV sizes (kv_elems_per_token) a join's settings carry
        self._joins_held: asyncio.Event | None = None

    # --- lifecycle ---
    async def start(self, devices: list[str], hold_joins: bool = False) -> None:
        """Listen for workers and start the local ones. `hold_joins`: a worker that connects is answered (its settings
        sent) only at `open_joins`; the local workers do their start-up (imports, on a GPU the device) meanwhile."""
        if hold_joins:
            self._joins_held = asyncio.Event()
        self._server = await asyncio.start_server(self._serve_conn, self.s.listen.host, self.s.listen.port)
        self.port = self._server.sockets[0].getsockname()[1]
        if self.s.join_token_hash is None and not _is_loopback(self.s.listen.host):
            log.warning("worker listener on %s has no join token: only this controller's own workers can "
                        "register; set workers.join_token_hash to admit remote ones", self.s.listen.host)
        if not devices:  # (else the log said only "listening" while /health said "starting", waiting for them)
            log.info("waiting for workers on %s:%d (none local)", self.s.listen.host, self.port)
        self.local_slots, self.t_start = len(devices), time.monotonic()
        for slot, dev in enumerate(devices):
            self._tasks.append(asyncio.create_task(self._supervise(slot, dev)))
        self._tasks.append(asyncio.create_task(self._watchdog()))

    def open_joins(self) -> None:
        """Let the workers held by `start(hold_joins=True)` register, with the settings of now; the join deadlines
        (COLD_JOIN_S, JOIN_GRACE_S) count from here."""
        held, self._joins_held = self._joins_held, None
        if held is not None:
            self.t_start = time.monotonic()
            held.set()

    async def stop(self) -> None:
        self._stopping = True
        if self._joins_held is not None:  # (a start-up stopped while it made its models, by a signal or its error)
            # the workers held there let go, to end (`_serve_conn`): a connection's task still waiting when the loop
            # closed was cancelled, which Python 3.11's asyncio says as an "Exception in callback ... CancelledError"
            # traceback
            self._joins_held.set()
        for e in list(self.engines.values()):
            e.send(m.Shutdown("controller stopping"))
        for t in self._tasks:
            t.cancel()
        procs = [*self._procs.values(), *self._spares.values()]
        for p in procs:
            _signal(p, signal.SIGTERM)
        for p in procs:
            try:
                await asyncio.wait_for(p.wait(), 5)
            except asyncio.TimeoutError:
                _signal(p, signal.SIGKILL)
                with contextlib.suppress(asyncio.TimeoutError):  # reaped: a zombie would still hold its copies
                    await asyncio.wait_for(p.wait(), 5)
        if self._server is not None:
            self._server.close()
        if self.local_slots:
            await asyncio.to_thread(drop_unheld_host_copies, self.gpus.host_cache_namespace)

    async def _supervise(self, slot: int, device: str) -> None:
        """Keep one local worker process alive for `slot`: when it dies its standby takes over at once, else a
        new one is started. A worker that dies within QUICK_DEATH_S of its start doubles the backoff (a crash
        loop): it delays a cold start, and a spare never starts sooner after its worker, nor before that
        worker has joined (one that never joins gets none). A GPU worker joins after its own start-up (it
        measures the device first), so the two start-ups do not compete for the host's cores. One that has not
        joined COLD_JOIN_S after it started (PROMOTED_JOIN_S after a standby was told to take over) is killed: a
        stopped or hung spare used to hold its slot, with no worker, for good."""
        backoff = 0.2
        while not self._stopping:
            proc = await self._promote(slot)
            promoted = proc is not None
            if proc is None:
                proc = await self._spawn(slot, device)
            self._procs[slot] = proc
            t0 = time.monotonic()
            dead = asyncio.ensure_future(proc.wait())
            try:
                # one that never joins (hung: in its start-up, or stopped) is killed, so the slot gets another
                limit = t0 + (PROMOTED_JOIN_S if promoted else COLD_JOIN_S)
                while self.s.restart and not dead.done() and not self._joined(slot, proc.pid):
                    if self._joins_held is not None:  # (it cannot join yet: its deadline counts from open_joins)
                        limit = time.monotonic() + (PROMOTED_JOIN_S if promoted else COLD_JOIN_S)
                    if time.monotonic() > limit:
                        log.warning("local worker w%d (pid %d) has not joined %.0f s after it %s: killing it", slot,
                                    proc.pid, time.monotonic() - t0, "took over" if promoted else "started")
                        _signal(proc, signal.SIGKILL)
                        break
                    await asyncio.wait({dead}, timeout=0.1)
                # (a crash loop is workers dying before they join, not a worker killed or stopped on purpose)
                self._unjoined[slot] = 0 if self._joined(slot, proc.pid) else self._unjoined.get(slot, 0) + 1
                if self.s.standby and self.s.restart:
                    await asyncio.wait({dead}, timeout=max(0.0, t0 + backoff - time.monotonic()))
                    # After the worker's first loads (or SPARE_WAIT_S): a spare warming up beside them (its imports,
                    # a CUDA context) competes for the host's cores, and on 2 cores slowed a cold start's
                    # registrations by ~40%, which is the server's time to ready.
                    settle = time.monotonic() + SPARE_WAIT_S
                    while (not dead.done() and (self.starting or self._loading(slot))
                           and time.monotonic() < settle):
                        await asyncio.wait({dead}, timeout=0.1)
                    # Then while the slot serves: the loads done is the server's ready, and a spare started then
                    # warmed up beside its first request (on 2 cores: the first token 0.23 -> 0.35 s, the reply
                    # 0.58 -> 0.93 s; bench/results/standby_start_cpu2_*.json). A steady load waits SPARE_BUSY_S.
                    quiet, busy = time.monotonic(), time.monotonic() + SPARE_BUSY_S
                    while not dead.done() and time.monotonic() < busy:
                        e = self.engines.get(f"w{slot}")
                        if e is not None and e.subs:
                            quiet = time.monotonic()
                        elif time.monotonic() - max(quiet, e.t_last_out if e is not None else 0.0) >= SPARE_IDLE_S:
                            break
                        await asyncio.wait({dead}, timeout=0.1)
                    await self._keep_spare(slot, device, dead)
                rc = await dead
            finally:
                dead.cancel()  # stop() cancelled this supervisor: no task left pending
            if self._stopping or self.quiet or not self.s.restart:
                return
            self.restarts += 1
            backoff = 0.2 if time.monotonic() - t0 > QUICK_DEATH_S else min(backoff * 2, 10.0)
            self._looping[slot] = self._unjoined.get(slot, 0) >= LOOPING_DEATHS
            spare = self._spares.get(slot)
            if spare is not None and spare.returncode is None:
                log.warning("local worker w%d (pid %d) exited with %s; its standby (pid %d) takes over", slot,
                            proc.pid, rc, spare.pid)
            else:
                log.warning("local worker w%d (pid %d) exited with %s; restarting in %.1f s", slot, proc.pid, rc,
                            backoff)
                await asyncio.sleep(backoff)

    async def _keep_spare(self, slot: int, device: str, dead: asyncio.Future) -> None:
        """Keep a standby beside the slot's worker until that worker exits (`dead`): one that exits first (killed,
        OOM-killed, crashed) is replaced, 1 s later, doubling to SPARE_BACKOFF_MAX_S while they keep dying. (It was
        not: the slot ran with none, and the worker's next death was a cold start, said only then.)"""
        backoff = 1.0
        while not dead.done() and not self._stopping and not self.quiet:
            spare = self._spares[slot] = await self._spawn(slot, device, standby=True)
            t0, gone = time.monotonic(), asyncio.ensure_future(spare.wait())
            try:
                await asyncio.wait({dead, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
            if dead.done() or self._stopping or self.quiet:
                return
            backoff = 1.0 if time.monotonic() - t0 > QUICK_DEATH_S else min(backoff * 2, SPARE_BACKOFF_MAX_S)
            log.warning("the standby of w%d (pid %d) exited with %s; starting another in %.0f s", slot, spare.pid,
                        spare.returncode, backoff)
            if self._spares.get(slot) is spare:
                del self._spares[slot]
            await asyncio.wait({dead}, timeout=backoff)

    async def _spawn(self, slot: int, device: str, standby: bool = False) -> asyncio.subprocess.Process:
        environ = env.environ_with(**{env.JOIN_TOKEN.name: self._local_token, env.PYTHONPATH.name: os.pathsep.join(
            filter(None, [str(REPO_ROOT), env.PYTHONPATH.get()]))})
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "controller.worker", "--controller", f"127.0.0.1:{self.port}",
            "--device", device, "--slot", str(slot), *(["--standby"] if standby else []), env=environ,
            stdin=asyncio.subprocess.PIPE if standby else asyncio.subprocess.DEVNULL,
            start_new_session=True)  # a Ctrl-C for the server is not the worker's: stop() ends it

    async def _promote(self, slot: int) -> asyncio.subprocess.Process | None:
        """The slot's standby, told to take over; None if there is none alive."""
        spare = self._spares.pop(slot, None)
        if spare is None or spare.stdin is None:
            return None
        try:
            spare.stdin.write(b"go\n")
            await spare.stdin.drain()
            spare.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass
        if spare.returncode is not None:
            log.warning("the standby of w%d (pid %d) had exited with %s", slot, spare.pid, spare.returncode)
            return None
        return spare

    def replacing(self) -> bool:
        """Whether a local slot has no worker that takes requests now but will (its worker died or is stopping, and
        one is being started or promoted): a request waits for it rather than hearing 503. Not a slot in a crash loop
        (LOOPING_DEATHS): its requests would wait for a worker that may never come."""
        if self._stopping or self.quiet or not self.s.restart:
            return False
        return any(not self._looping.get(i) and
                   not any(e.alive and not e.retiring and e.slot == i for e in self.engines.values())
                   for i in range(self.local_slots))

    def local_joined(self) -> bool:
        """Whether every local slot's worker has joined (GPU workers start one by one), or JOIN_GRACE_S has passed
        since the start (a slot that cannot start does not hold the rest back)."""
        if time.monotonic() - self.t_start > JOIN_GRACE_S:
            return True
        return all(any(e.alive and e.slot == i for e in self.engines.values()) for i in range(self.local_slots))

    def _loading(self, slot: int) -> bool:
        """The slot's worker is loading a model."""
        e = self.engines.get(f"w{slot}")
        return e is not None and any(r.state == "loading" for r in e.replicas.values())

    def _joined(self, slot: int, pid: int) -> bool:
        e = self.engines.get(f"w{slot}")
        return e is not None and e.alive and e.pid == pid

    async def _watchdog(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.s.heartbeat_s)
            now = time.monotonic()
            if now - last > self.s.heartbeat_s + self.s.dead_after_s / 2:
                # This process did not run (stopped: Ctrl-Z then fg, SIGSTOP/SIGCONT; or its loop stalled): the
                # workers' beats wait unread in the sockets, so their silence is this process's, not theirs. Every
                # worker was declared dead and killed at the resume, every stream cut and every model loaded again.
                log.warning("the controller did not run for %.1f s: its workers' silence is not held against them",
                            now - last)
                for e in self.engines.values():
                    e.last_seen = max(e.last_seen, now)
            last = now
            for eid, e in list(self.engines.items()):  # dead for long enough: gone from views and metrics
                if not e.alive and e.t_dead is not None and now - e.t_dead > self.s.prune_dead_after_s:
                    del self.engines[eid]
                    if self._on_pruned is not None:
                        self._on_pruned(e)
            for e in list(self.engines.values()):
                if e.alive and now - e.last_seen > self.s.dead_after_s:
                    log.warning("engine %s silent for %.1fs: declaring it dead", e.id, now - e.last_seen)
                    self._dead(e)
                    e.writer.close()
                    if e.slot is not None and e.slot in self._procs:
                        _signal(self._procs[e.slot], signal.SIGKILL)

    # --- connections ---
    def _admit(self, reg: m.Register, peer: str) -> str | None:
        """None if the worker may join, else why not. Local workers prove themselves with this run's random
        token; any other worker must present the configured join token, and without one none may join."""
        tok = reg.join_token if isinstance(reg.join_token, str) else None
        if not isinstance(reg.pid, int) or not isinstance(reg.memory_bytes, int) or not isinstance(reg.device, str):
            return "malformed Register"
        if tok is not None and secrets.compare_digest(tok.encode(), self._local_token.encode()):
            return None
        if reg.slot is not None:
            return "local slots are reserved for workers this controller started"
        if self.s.join_token_hash is None:
            return "this controller admits no remote workers (set workers.join_token_hash to allow them)"
        if not tok:  # (said so: "bad join token" sent a worker started without one looking for a typo in it)
            return "no join token given (--join-token or $TOKENPOOL_JOIN_TOKEN)"
        return None if verify_key(tok, self.s.join_token_hash) else "bad join token"

    async def _serve_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = str(writer.get_extra_info("peername"))
        with contextlib.suppress(OSError):
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            reg = await asyncio.wait_for(m.read_message(reader), 10)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, m.ProtocolError, OSError) as e:
            log.warning("worker connection from %s closed before registering: %s", peer, e or type(e).__name__)
            writer.close()
            return
        why = self._admit(reg, peer) if isinstance(reg, m.Register) else "expected Register"
        if why is not None:
            log.warning("refused worker from %s: %s", peer, why)
            m.write_message(writer, m.Rejected(why))
            writer.close()
            return
        assert isinstance(reg, m.Register)
        if self._joins_held is not None:  # (the models' folders being made: its settings need their KV sizes)
            await self._joins_held.wait()
            if self._stopping:  # (let go by `stop`: never joins)
                writer.close()
                return
        eid = f"w{reg.slot}" if reg.slot is not None else f"{reg.host}-{reg.pid}"
        previous = self.engines.get(eid)
        if previous is not None and previous.alive:
            self._dead(previous)
        settings = self.gpu_settings(reg)
        e = EngineHandle(eid, reg.slot, reg.device, reg.host, reg.pid, _weight_capacity(reg, settings), writer,
                         held=list(reg.loaded))
        self.engines[eid] = e
        m.write_message(writer, m.Registered(eid, self.s.heartbeat_s, settings))
        log.info("engine %s registered (%s on %s, pid %d)", eid, reg.device, reg.host, reg.pid)
        self._on_registered(e, previous)
        try:
            while True:
                msg = await m.read_message(reader)
                e.last_seen = time.monotonic()
                if isinstance(msg, m.Outputs):
                    self._outputs(e, msg)
                elif isinstance(msg, m.ModelLoaded):
                    self._loaded(e, msg)
                elif isinstance(msg, m.Stats):
                    self._stats(e, msg)
        except (asyncio.IncompleteReadError, m.ProtocolError, OSError) as ex:
            if e.alive:  # (at shutdown the workers were told to stop: their pipe closing is the end expected, at
                # DEBUG, as a Ctrl-C printed "connection lost: IncompleteReadError" for each, reading as a fault; so is
                # the end of one that said it was stopping and had no request left (drained: it exits 0, "signalled to
                # stop" said already); one signalled that still had requests is said; any other end is a worker lost)
                level = (logging.DEBUG if self._stopping or (e.retiring and not e.subs)
                         else logging.INFO if e.retiring else logging.WARNING)
                log.log(level, "engine %s connection lost: %s", eid, type(ex).__name__)
        finally:
            self._dead(e)
            writer.close()

    def gpu_settings(self, reg: m.Register) -> dict[str, Any]:
        """How the worker builds its pooled engine: the arena (gpus.budget_gb per GPU, default the device's free
        memory less a margin; cpu_budget_gb on CPU), its KV region, the node's host cache, the policy and its options,
        plan-ahead; and how long a signalled worker waits for the controller's word (`stop_wait_s`)."""
        g = self.gpus
        budget = g.cpu_budget_gb if reg.device == "cpu" else g.budget_gb
        out = {"budget_bytes": int(budget * 1e9) if budget else None, "kv_cache_gb": g.kv_cache_gb,
               "host_cache_gb": g.host_cache_gb, "namespace": g.host_cache_namespace, "policy": g.policy,
               "plan_ahead": g.plan_ahead, "policy_options": g.policy_options,
               "kv_elems_per_token": self.kv_elems_per_token}
        if self.stop_wait_s is not None:  # (not the arena's: a signalled local worker's wait, Worker.run)
            out["stop_wait_s"] = self.stop_wait_s
        return {**out, **worker_settings(reg)}

    def _stats(self, e: EngineHandle, msg: m.Stats) -> None:
        """What a worker says about itself, bounded: a step is never believed faster than the controller saw
        (the gaps between its Outputs while it had requests) nor than STEP_FLOOR_S, so a worker cannot attract
        traffic it has not earned; stats only for models it hosts; the pool view and events size-capped."""
        r = msg.step_s if isinstance(msg.step_s, (int, float)) and msg.step_s == msg.step_s else 0.0
        e.step_s = min(STEP_CEIL_S, max(STEP_FLOOR_S, float(r), e.observed_step_s))
        models = msg.models if isinstance(msg.models, dict) else {}
        e.stats = {k: v for k, v in models.items() if k in e.replicas and isinstance(v, dict)}
        pool = msg.pool if isinstance(msg.pool, dict) else {}
        e.pool = pool if len(m.encode(m.Stats({}, 0.0, 0, 0, pool=pool))) < POOL_VIEW_MAX else {}
        if e.gone:
            self._keep_gone(e)
        cap = e.pool.get("weight_capacity_bytes")
        if isinstance(cap, int) and 0 < cap <= MAX_DEVICE_BYTES:
            e.memory_bytes = cap
        self._on_stats(e)
        events = [x for x in msg.events[:MAX_EVENTS] if isinstance(x, dict)] if isinstance(msg.events, list) else []
        if events and self._on_events is not None:
            self._on_events(e, events)
        stopping = next((x for x in events if x.get("kind") == STOPPING), None)
        if not e.retiring and stopping is not None:
            e.retiring = True
            g = stopping.get("grace_s")  # (a remote worker's own drain grace: its pod's grace period bounds it)
            if isinstance(g, (int, float)) and not isinstance(g, bool) and 0 <= g <= 86400:
                e.stop_grace_s = float(g)
            if self._on_stopping is not None:
                self._on_stopping(e)
            self.release_if_idle(e)

    def release_if_idle(self, e: EngineHandle) -> None:
        """A retiring engine (its worker was signalled) with no request left is told to stop: its process exits and the
        slot's standby takes over."""
        if e.retiring and e.alive and not e.subs:
            log.info("engine %s: signalled to stop and no request left: stopping it", e.id)
            e.send(m.Shutdown("signalled: no request left"))

    def _outputs(self, e: EngineHandle, msg: m.Outputs) -> None:
        now = time.monotonic()
        if e.subs and e.t_last_out:  # a gap between two output batches while requests ran: at least a step (a
            # worker paused between them counts as STALL_FACTOR x the estimate: `ewma`)
            e.observed_step_s = ewma(e.observed_step_s, now - e.t_last_out, 0.1)
        e.t_last_out = now
        subs = e.subs
        for d in msg.deltas:
            sub = subs.get(d.request_id)
            if sub is None:
                continue
            sub.generated += len(d.token_ids)
            if d.token_ids or d.embedding is not None:
                self._stepped(e, sub.model)
            if d.finished:
                del subs[d.request_id]
                if sub.model in e.evicting and not any(s.model == sub.model for s in subs.values()):
                    self._evicted(e, sub.model)  # (its last request here: the worker evicts it now)
                if e.retiring and not subs:
                    self.release_if_idle(e)
                if d.error is not None and d.error_kind == "engine" and self._on_failed is not None:
                    self._on_failed(e, sub, d.error)  # (its engine crashed, or lost its model: sent again, or ended)
                    continue
                sub.done = True
            sub.sink.put_nowait((sub, d))

    @staticmethod
    def _stepped(e: EngineHandle, model: str) -> None:
        """A model engine `e` made a token of: its weights are in VRAM there now. The pool view (`e.pool`, what
        /api/ps, `tokenpool ps` and the dashboard read) says so at once, where it said so only with the worker's
        next Stats, a heartbeat later (a model just loaded was missing from Ollama's ps meanwhile); that Stats
        replaces it, as any."""
        e.gone.pop(model, None)  # (back: the worker's word on it is believed again)
        models = e.pool.get("models") if e.pool else None
        if not isinstance(models, dict):  # (an engine that reports no pool: its registrations say it)
            return
        pm = models.get(model)
        if isinstance(pm, dict) and pm.get("state") == "resident":
            return
        if isinstance(pm, dict):
            pm["state"] = "resident"
        else:  # (registered there since its last Stats)
            models[model] = {"state": "resident"}
        for k, has in (("resident", True), ("prefetching", False)):
            names = e.pool.get(k)
            if isinstance(names, list) and (model in names) != has:
                e.pool[k] = sorted({*names, model}) if has else [n for n in names if n != model]

    @staticmethod
    def _evicted(e: EngineHandle, model: str, unload: bool = False) -> None:
        """`_stepped`'s converse: an evict the worker applies now (the model idle there) takes it out of the pool
        view at once. A Stats the worker took before it applied the evict would list it again a heartbeat long:
        `e.gone` keeps it out until a Stats agrees or was taken after the worker applied every evict of it sent so
        far (`_keep_gone`), its load finishes (`_loaded`), a token of it is made (`_stepped`), or GONE_TRUST_S
        passes. `unload`: unregistered (no evict to count)."""
        e.evicting.discard(model)
        e.gone[model] = (time.monotonic(), None if unload else e.evicts.get(model, 0))
        EnginePool._out_of_view(e, model)

    @staticmethod
    def _out_of_view(e: EngineHandle, model: str) -> None:
        models = e.pool.get("models") if e.pool else None
        if not isinstance(models, dict):
            return
        pm = models.get(model)
        if isinstance(pm, dict) and pm.get("state") in ("resident", "loading"):
            pm["state"] = "host"
        for k in ("resident", "prefetching"):
            names = e.pool.get(k)
            if isinstance(names, list) and model in names:
                e.pool[k] = [n for n in names if n != model]

    @staticmethod
    def _keep_gone(e: EngineHandle) -> None:
        """A Stats's pool view, less the models evicted since (`e.gone`) that it still lists: a view taken before the
        worker applied the evict. Its word is taken again once a Stats no longer lists one, or was taken after the
        worker applied every evict of it sent (its `evicts` count them: it lists the model resident then because
        it was loaded again, or the evict did not happen), or GONE_TRUST_S after the evict (a worker that does not
        count them; an unload)."""
        now = time.monotonic()
        models = e.pool.get("models") if e.pool else None
        applied = e.pool.get("evicts") if e.pool else None
        for model, (t, sent) in list(e.gone.items()):
            pm = models.get(model) if isinstance(models, dict) else None
            n = applied.get(model) if isinstance(applied, dict) else None
            seen = sent is not None and isinstance(n, int) and not isinstance(n, bool) and n >= sent
            if seen or not isinstance(pm, dict) or pm.get("state") != "resident" or now - t > GONE_TRUST_S:
                del e.gone[model]
            else:
                EnginePool._out_of_view(e, model)

    def _loaded(self, e: EngineHandle, msg: m.ModelLoaded) -> None:
        r = e.replicas.get(msg.model)
        if r is None:
            return
        if msg.ok:
            r.state, r.max_model_len, r.max_num_seqs = "ready", msg.max_model_len, msg.max_num_seqs
            # a load finished after the evict or unload that took it out of the view (the worker ignores an evict of a
            # model it does not host yet; a load cancels an unload not yet applied): its Stats are believed again
            e.gone.pop(msg.model, None)
        else:
            r.state, r.error = "failed", msg.error
            del e.replicas[msg.model]
        r.ready.set()
        self._on_loaded(e, r, msg.load_s)

    def _dead(self, e: EngineHandle) -> None:
        if not e.alive:
            return
        e.alive = False
        e.t_dead = time.monotonic()
        orphans = list(e.subs.values())
        e.subs.clear()
        for r in e.replicas.values():
            if not r.ready.is_set():
                r.state, r.error = "failed", f"engine {e.id} died"
                r.ready.set()
        self._on_dead(e, orphans)

    # --- commands ---
    def load(self, e: EngineHandle, model: str, path: str | None, engine_opts: EngineOptions,
             slo: ModelSLO | None = None, pinned: bool = False, keep_alive_s: float | None = None,
             preload: bool = False, loras: dict[str, str] | None = None) -> Replica:
        r = e.replicas.get(model)
        if r is None:
            r = e.replicas[model] = Replica(model)
            e.send(m.LoadModel(model, path, engine_opts, slo, pinned, keep_alive_s, preload, dict(loras or {})))
        return r

    def set_loras(self, e: EngineHandle, model: str, loras: dict[str, str]) -> None:
        if model in e.replicas:
            e.send(m.SetLoras(model, dict(loras)))

    def retune(self, e: EngineHandle, model: str, slo: ModelSLO, keep_alive_s: float | None) -> None:
        if model in e.replicas:
            e.send(m.RetuneModel(model, slo, keep_alive_s))

    def pin(self, e: EngineHandle, model: str, pinned: bool) -> None:
        if model in e.replicas:
            e.send(m.PinModel(model, pinned))

    def evict(self, e: EngineHandle, model: str, view: bool = True) -> None:
        """Tell engine `e` to evict `model`'s weights once its requests there finish. `view` (its weights do go: not
        pinned, a kind that holds weights): the pool view (/api/ps, `tokenpool ps`, the dashboard) says so at once,
        or as its last request here ends, where it said so only with the worker's next Stats, a heartbeat later
        (Ollama's `stop` then `ps` listed the model still)."""
        if model not in e.replicas:
            return
        e.send(m.EvictModel(model))
        e.evicts[model] = e.evicts.get(model, 0) + 1  # (the worker counts those it applied: `_keep_gone`)
        if view:
            if any(s.model == model for s in e.subs.values()):
                e.evicting.add(model)
            else:
                self._evicted(e, model)

    def unload(self, e: EngineHandle, model: str) -> None:
        r = e.replicas.pop(model, None)
        if r is not None:
            e.send(m.UnloadModel(model))
            self._evicted(e, model, unload=True)  # (its weights go with it: out of the pool view at once, as an evict's)
            if not r.ready.is_set():  # dropped while loading: what waits for it is told now (the worker's answer
                # finds no registration, or never comes: they waited out the load timeout, ten minutes)
                r.state, r.error = "dropped", f"unregistered from engine {e.id} while it loaded"
                r.ready.set()

    def submit(self, e: EngineHandle, sub: Sub) -> None:
        sub.engine_id = e.id
        sub.attempts += 1
        if not e.subs:  # (idle until now: the time since its last output is no step; its first output starts the
            # gaps again, where the idle time was taken as one: 0.1 of a minute's pause made step_s 6 s and more)
            e.t_last_out = 0.0
        e.subs[sub.rid] = sub
        e.send(m.NewRequest(sub.rid, sub.model, sub.prompt_ids, sub.params))

    def end(self, subs: list[Sub], error: str, kind: str) -> None:
        """End engine requests from the controller's side (an operator's cancel, a revoked key): each choice's stream
        gets `error` (a Delta of error_kind `kind`), the engines abort them, and one still waiting for its model to
        load is never submitted."""
        for s in subs:
            s.sink.put_nowait((s, m.Delta(s.rid, finished=True, finish_reason="error", error=error, error_kind=kind)))
        self.abort(subs)
        for s in subs:
            s.done = True

    def abort(self, subs: list[Sub]) -> None:
        by_engine: dict[str, list[str]] = {}
        for s in subs:
            if s.done or s.engine_id is None:
                continue
            s.done = True
            e = self.engines.get(s.engine_id)
            if e is not None and e.subs.pop(s.rid, None) is not None:
                by_engine.setdefault(e.id, []).append(s.rid)
        for eid, rids in by_engine.items():
            self.engines[eid].send(m.Abort(rids))
            self.release_if_idle(self.engines[eid])

    def pid_of(self, slot: int) -> int | None:
        p = self._procs.get(slot)
        return p.pid if p is not None and p.returncode is None else None


def drop_unheld_host_copies(namespace: str) -> None:
    """After the local workers have exited: the node's host copies of `namespace` (/dev/shm, or
    $TOKENPOOL_SHM_DIR) that no live process holds are removed, and the cache's directory once it is empty. A
    worker does this as it exits (`HostedModels.close`); one SIGKILLed or crashed cannot, and when the server
    stopped before a next worker had joined (to attach to them, and give them back at its own exit) they stayed
    in RAM after the server. Copies another server's workers hold are left to them."""
    root = Path(env.SHM_DIR.get()) / f"tokenpool-{namespace}"  # (gpu_pool.pinned.default_shm_dir)
    if not _unheld_copies(root):
        return  # (the usual case: the last worker removed them; torch is not imported for nothing)
    try:
        from model_swapper.host_cache import HostModelCache

        HostModelCache(1, namespace=namespace).close(unlink_unused=True)  # (a budget: it loads nothing)
    except Exception:  # noqa: BLE001 - a stop must finish: say so, leave them
        log.exception("could not remove the host copies no worker holds (namespace %s)", namespace)


def _unheld_copies(root: Path) -> bool:
    """Whether the host cache at `root` may hold something `drop_unheld_host_copies` removes: a copy no live process
    holds, a load whose loader died, a segment without an entry, or an empty index (the folder itself). Read without
    the cache's own code, which imports torch (~1 s of a 2-core host's time): the folder is the namespace's, shared
    by every server on the node (the default one, "tokenpool"), so while another server's workers held their copies
    each stop of this one paid that import to find nothing to do. When unsure (an index it cannot read): True."""
    if not root.is_dir():
        return False
    try:
        entries = json.loads((root / "index.json").read_text())["entries"]
        segments = {p.stem for p in root.glob("*.seg")}
        return not entries or not segments <= entries.keys() or any(
            not live(e["holders"]) or loader_died(e) for e in entries.values())  # (CacheIndex._prune's rules)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return True


def _signal(p: asyncio.subprocess.Process, sig: int) -> None:
    """Signal a worker process unless it has been seen to exit. Not `p.terminate()`/`p.kill()`: subprocess's
    send_signal polls first, and a poll that finds the worker just exited reaps it under asyncio's child watcher,
    which then logs "Unknown child process pid ..." and reports exit status 255 (seen on SIGTERM of an idle
    server: the workers exit on the controller's Shutdown message at the same moment)."""
    if p.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, sig)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


# A GPU driver's device node, which every process using its GPUs opens: NVIDIA's, ROCm's (torch.cuda counts its GPUs
# too), WSL's (its CUDA goes through it)
GPU_DRIVER_NODES = ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")
ROCM_NODE = "/dev/kfd"  # (NVML does not see AMD's GPUs: torch counts them)


def _visible_count(var: str | None, n: int, uuids: Callable[[], list[str]]) -> int | None:
    """How many of NVML's `n` GPUs CUDA shows a process under CUDA_VISIBLE_DEVICES=`var`, read as torch reads it
    (torch.cuda._parse_visible_devices and _device_count_nvml): unset, all; empty, none; indices up to the first
    that is not one (strtoul's reading: "1gpu" is 1) or is past the last GPU; UUIDs (GPU-..., a unique prefix of
    one) up to the first that names none; a repeat, none. None for MIG instances (NVML's count is of whole GPUs:
    torch then asks the CUDA runtime, and so do we)."""
    if var is None:
        return n
    if var.startswith("MIG-"):
        return None
    if var.startswith("GPU-"):
        names: list[str] = []
        for e in var.split(","):
            if e in names:
                return 0
            if not e.startswith("GPU-"):
                break
            names.append(e)
        have, seen = uuids(), []
        for e in names:
            hits = [i for i, u in enumerate(have) if u.startswith(e)]
            if len(hits) != 1:  # (none, or a prefix of two: ambiguous)
                break
            if hits[0] in seen:
                return 0
            seen.append(hits[0])
        return len(seen)
    listed: list[int] = []
    for e in var.split(","):
        lead = re.match(r"[+-]?\d+", e.strip())
        i = int(lead.group()) if lead else -1
        if i in listed:
            return 0
        if i < 0:
            break
        listed.append(i)
    return next((k for k, i in enumerate(listed) if i >= n), len(listed))  # (up to the first past the last GPU)


def _nvml_gpu_count() -> int | None:
    """The GPUs torch.cuda would count here, through NVML (the driver's own library, a ctypes binding: no torch, no
    CUDA context); None where it cannot say (no pynvml, no libnvidia-ml, a driver it fails on, MIG instances)."""
    from gpu_pool.inventory import nvml  # (torch-free)

    with nvml() as nv:
        if nv is None:  # (no pynvml, no libnvidia-ml, a driver it fails on: torch may still know)
            return None
        try:
            n = nv.nvmlDeviceGetCount()

            def uuids() -> list[str]:
                out = [nv.nvmlDeviceGetUUID(nv.nvmlDeviceGetHandleByIndex(i)) for i in range(n)]
                return [u.decode() if isinstance(u, bytes) else u for u in out]  # (older bindings answer bytes)

            return _visible_count(env.CUDA_VISIBLE_DEVICES.get(), n, uuids)
        except Exception:  # noqa: BLE001 - a query the driver fails: ask torch
            return None


def local_devices(spec: str | list[int]) -> list[str]:
    """Devices to start local workers on: 'auto' = every GPU, or one CPU worker when there is none."""
    if spec == "none":
        return []
    if spec == "cpu":
        return ["cpu"]
    if isinstance(spec, list):
        return [f"cuda:{i}" for i in spec]
    if not any(Path(d).exists() for d in GPU_DRIVER_NODES):
        return ["cpu"]  # (no GPU driver: torch would count none; not imported for it, ~3 s of a 2-core host's start)
    # NVIDIA's GPUs are counted through NVML: the controller needs no torch otherwise (~3 s of import for a count)
    n = None if Path(ROCM_NODE).exists() else _nvml_gpu_count()
    if n is None:
        from controller.hosting import import_torch

        try:
            # (through hosting's lock: the controller's start-up asks on a thread, and torch imported by two threads
            # at once is not safe)
            n = import_torch().cuda.device_count()
        except Exception:  # noqa: BLE001 - no torch / no driver: CPU
            n = 0
    return [f"cuda:{i}" for i in range(n)] or ["cpu"]


POLICIES = ("token", "aegaeon", "request", "static")


def worker_settings(reg: m.Register) -> dict[str, Any]:
    """A worker's own settings (its command-line flags: a GPUPool's budget and policy in Kubernetes), those that
    are valid: they override the configuration's for that worker. A budget is never more than the device."""
    s = reg.settings if isinstance(reg.settings, dict) else {}
    out: dict[str, Any] = {}
    b = s.get("budget_gb")
    if isinstance(b, (int, float)) and 0 < b and b * 1e9 <= max(reg.memory_bytes, 1):
        out["budget_bytes"] = int(b * 1e9)
    for k in ("kv_cache_gb", "host_cache_gb"):
        v = s.get(k)
        if isinstance(v, (int, float)) and 0 < v < 1e6:
            out[k] = float(v)
    if s.get("policy") in POLICIES:
        out["policy"] = s["policy"]
    return out


def _weight_capacity(reg: m.Register, settings: dict[str, Any]) -> int:
    """What one model's weights must fit on this worker, until its first Stats says exactly."""
    from controller.hosting import GpuSettings, HostedModels

    return HostedModels(reg.device, GpuSettings.from_dict(settings), reg.free_bytes).weight_capacity
