"""An engine worker: one process per GPU (or one CPU worker), driven by the controller over TCP.

    python -m controller.worker --controller HOST:PORT [--device cuda:0] [--join-token TOKEN]

It registers, then hosts the models the controller places on it -- all of them in one MultiModelEngine whose
token-level policy picks the model of every step (controller/hosting.py) -- and streams each step's deltas
back. Engine calls never overlap: the step runs in one executor thread while the event loop keeps the socket
(requests, aborts, heartbeats) moving and detokenizes and sends the previous step's token ids; adds, aborts,
stop-string ends and model loads queued by the loop are applied between steps, so an abort frees its KV before
the next step. A local worker (started with --slot) exits when the controller goes away; a remote one
reconnects (unless it was signalled to stop: then it exits). A SIGTERM/SIGINT drains either kind (see
`Worker.run`). A local standby (--standby, controller/pool.py) does a worker's start-up, then waits on stdin for
its turn."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from controller import messages as m
from controller.heap import collect_all, freeze_long_lived
from controller.hosting import GpuSettings, HostedModels, import_torch, warm_up
from tokenpool import env

log = logging.getLogger("tokenpool.worker")
_promoted_at: float | None = None  # monotonic: when this process, a standby, took over its slot
_warming: threading.Thread | None = None  # the warm-up thread (start_warm_up, standby): it may still run after the join
_stopping = threading.Event()  # set once the worker stops: a warm-up still importing then fails as the process ends


def _pairs(ids, lps) -> list[list[list[float]]]:
    """Each token's logprobs as [[token_id, logprob], ...], the token's own first."""
    return [[[tid, lp.get(tid, float("nan"))]] + [[k, v] for k, v in lp.items() if k != tid]
            for tid, lp in zip(ids, lps)]


def to_delta(out) -> m.Delta:
    c = out.outputs[0]
    lps = None
    if out.delta_logprobs is not None and out.delta_token_ids:
        lps = _pairs(out.delta_token_ids, out.delta_logprobs)
    plp = None if out.prompt_logprobs is None else _pairs(out.prompt_token_ids[1:], out.prompt_logprobs[1:])
    # the prefix cache's part of the prompt, known from the start: on the first delta (Anthropic's message_start,
    # OpenAI's continuous usage) and the last
    cached = (out.num_cached_tokens or 0) if out.finished or out.first else 0
    # how long it waited for its model's weights to load: on its first delta (an embedding's one), said once
    load_s = out.metrics.get("load_s", 0.0) if out.first or out.embedding is not None else 0.0
    if out.embedding is not None:  # (an embedding: the token its step drew is not an output)
        return m.Delta(request_id=out.request_id, finished=True, finish_reason="stop",
                       num_prompt_tokens=len(out.prompt_token_ids), embedding=out.embedding, num_cached_tokens=cached,
                       load_s=load_s)
    return m.Delta(request_id=out.request_id, text=out.delta_text, token_ids=list(out.delta_token_ids),
                   logprobs=lps, finished=out.finished, finish_reason=c.finish_reason if out.finished else None,
                   num_prompt_tokens=len(out.prompt_token_ids), prompt_logprobs=plp, num_cached_tokens=cached,
                   stop_reason=c.stop_reason if out.finished else None, load_s=load_s)


def _seqs(eng, msg: m.LoadModel) -> int:
    n = getattr(eng, "max_num_seqs", None) or getattr(getattr(eng, "config", None), "max_num_seqs", None)
    return int(n or msg.engine.max_num_seqs)


def device_memory(device: str) -> tuple[int, int]:
    """(total, free) bytes of the device (host memory for a CPU worker)."""
    if device.startswith("cuda"):
        torch = import_torch()  # (the warm-up thread may be importing it: waited for, never imported beside it)
        free, total = torch.cuda.mem_get_info(int(device.split(":")[1] if ":" in device else 0))
        return total, free
    from gpu_pool.inventory import cpu_device  # the host's memory, or a container's limit where lower

    d = cpu_device()
    return (d.memory_total, d.memory_free) if d.memory_total else (16 << 30, 16 << 30)


class _ClosedBeforeJoin(Exception):
    """A local worker's controller closed the connection before answering its registration."""


class Worker:
    def __init__(self, controller: tuple[str, int], device: str = "cpu", slot: int | None = None,
                 join_token: str | None = None, settings: dict[str, Any] | None = None,
                 drain_grace_s: float | None = None):
        self.controller = controller
        self.device = device
        self.slot = slot
        self.join_token = join_token
        self.settings = {k: v for k, v in (settings or {}).items() if v is not None}  # overrides of the controller's
        self.models = HostedModels(device)
        self._owner: dict[str, str] = {}  # request id -> model: the worker's one registry of a request
        self._stops: list = []  # requests a stop string ended (answered already), for the engine at the next boundary
        self._pending: list[m.Message] = []
        self._hosting: list[tuple[m.LoadModel, asyncio.Future]] = []  # loads the step loop runs between steps
        self._loras_later: dict[str, dict[str, str]] = {}  # (SetLoras while loading) adapters to set once hosted
        self._retune_later: dict[str, m.RetuneModel] = {}  # (RetuneModel while loading) applied once hosted
        self._loading: set[str] = set()
        self._unload_when_loaded: set[str] = set()  # unloaded by the controller while their load was under way
        self._garbage = False  # a model was unloaded since the last heap collection (`_collect`)
        # EvictModel messages applied per model on this connection (Stats.pool["evicts"]): a Stats taken once it counts
        # the controller's every evict of a model shows what they left (evicted, or kept: pinned, not hosted yet)
        self._evicts: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._step_thread = ThreadPoolExecutor(1, thread_name_prefix="step", initializer=bind_device, initargs=(device,))
        self._load_thread = ThreadPoolExecutor(1, thread_name_prefix="load", initializer=bind_device, initargs=(device,))
        self._writer: asyncio.StreamWriter | None = None
        self._memory: tuple[int, int] | None = None
        self.steps = 0  # worker steps that ran (step times are measured once, per model, in HostedModels)
        # seconds of the step thread in steps and of the event loop making and sending their outputs (the pool's
        # view: where a served step's time goes, beside the engines' own counters)
        self.loop_s = {"step_thread_s": 0.0, "emit_s": 0.0, "collect_s": 0.0}
        self.collections = 0  # heap collections after unloads (`_collect`), each a full pass of the heap
        self._emitting: asyncio.Future | None = None  # the latest emit `_steps` handed the loop
        self._stats: asyncio.Future | None = None  # the latest snapshot asked of the step thread (`_take_stats`)
        self.tokens = 0
        self._signalled = False  # (a local worker) a first SIGTERM/SIGINT came: it stops at its controller's word
        self._notices: list[dict[str, Any]] = []  # the worker's own events for the next Stats (STOPPING)
        self.stop_wait_s = LOCAL_STOP_WAIT_S  # (signalled) the longest wait for the controller's word: its setting
        # (a remote worker, signalled) how long its requests in flight get before they are handed off or ended (the
        # controller's word); it stops on its own STOP_MARGIN_S after that at most (a pod's grace period is short)
        self.drain_grace_s = max(0.0, float(env.WORKER_DRAIN_S.number() if drain_grace_s is None else drain_grace_s))
        self._joined = False  # registered with the controller, in this session (until it ends)

    def send(self, msg: m.Message) -> None:
        if self._writer is not None and not self._writer.is_closing():
            m.write_message(self._writer, msg)

    async def run(self) -> None:
        """Serve until the controller goes (a local worker) or SIGTERM/SIGINT; then give back the pool: VRAM,
        pinned memory and the node's /dev/shm host copies no other process holds.

        A local worker connected to its controller takes a first SIGTERM/SIGINT as "stop once my requests are done":
        it tells the controller (a `worker_stopping` event in its next Stats, sent at once), which sends it no new
        request and tells it to stop (Shutdown) as soon as none of its own is left -- at once when it has none, after
        the controller's `shutdown_grace_s` at most (what is left then is handed to other engines where that is safe,
        else ended) -- and a standby takes the slot. It serves on meanwhile, `stop_wait_s` at most (a controller
        that never answers: the controller's shutdown_grace_s + 30 s, by default 60 s); a second signal stops it at
        once, its requests ended with an error saying so (those nothing was sent of yet go to another engine).

        A remote worker (a Kubernetes worker pod: a node drain, a DaemonSet rollout) drains the same way, but on its
        own grace (`drain_grace_s`, --drain-grace-s, $TOKENPOOL_WORKER_DRAIN_S, 45 s), which its STOPPING event
        tells the controller: the controller routes new requests elsewhere and registers the worker's models on other
        engines (their minimum replicas), lets the requests in flight finish, hands off or ends what is left when the
        grace is over, then tells it to stop; it exits (status 0) at that word, or on its own STOP_MARGIN_S after the
        grace (ending what it still runs with an error), never reconnecting. It used to stop at once on SIGTERM:
        every stream on the node ended with an error. A stop that signals every process of the server at once (systemd's default KillMode=control-group)
        used to end the workers at once, while the controller began its graceful drain: every stream in flight ended
        with "engine died" instead of finishing; now they finish (the controller, draining, starts no new worker). A single signal to one worker used to wait the whole
        LOCAL_STOP_WAIT_S (60 s) for a controller that was not stopping."""
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, me, sig)
        try:
            delay = 0.5
            while True:
                try:
                    await self._session()
                    delay = 0.5
                except _ClosedBeforeJoin:  # a local worker's controller that stopped before letting it join (a
                    # first run stopped while it makes its models): its end, no fault (it was a WARNING, "0 bytes read
                    # on a total of 4 expected bytes", after the server's own "stopped")
                    log.info("controller closed the connection before this worker joined: stopping")
                except (OSError, asyncio.IncompleteReadError, m.ProtocolError) as e:
                    log.warning("controller connection: %s", e)
                if self.slot is not None or self._signalled:  # a local worker lives and dies with its controller;
                    return  # a signalled one stops at its word (or when it goes: its requests went with it)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        except asyncio.CancelledError:
            log.info("stopping")
        finally:
            _stopping.set()
            # a step may still run in the executor: close after it, on the step thread
            self._step_thread.submit(self.models.close).result(timeout=60)
            self._step_thread.shutdown(wait=False)
            self._load_thread.shutdown(wait=False)

    def _on_signal(self, me: asyncio.Task, sig: int) -> None:
        if not self._joined:  # (not connected: no request to let finish)
            me.cancel()
            return
        if self._signalled:
            self._stop_now(me, f"a second signal ({int(sig)}) stopped its worker")
            return
        self._signalled = True
        notice: dict[str, Any] = {"kind": STOPPING, "t": time.time(), "signal": int(sig)}
        if self.slot is None:  # a remote worker: its own grace, which the controller is told
            wait, notice["grace_s"] = self.drain_grace_s + STOP_MARGIN_S, self.drain_grace_s
        else:
            wait = self.stop_wait_s
        log.info("signal %d: stopping once this worker's requests are done (at the controller's word, when it goes, "
                 "or in %.0f s; signal again to stop now)", sig, wait)
        loop = asyncio.get_running_loop()
        loop.call_later(wait, self._stop_now, me, f"its worker's drain grace ({wait:.0f} s) ran out")
        self._notices.append(notice)
        self._take_stats(loop)  # told now, not at the next beat

    def _stop_now(self, me: asyncio.Task, why: str) -> None:
        """Stop without waiting for the requests in flight: each ends with an error saying why (the controller sends
        one that nothing was sent of yet to another engine), then the worker stops."""
        if self._owner and self._writer is not None:
            log.warning("stopping now (%s): ending %d request(s) in flight", why, len(self._owner))
            said = f"{why} before the request finished"
            self.send(m.Outputs([m.Delta(r, finished=True, finish_reason="error", error=said, error_kind="engine")
                                 for r in self._owner]))
            self._owner.clear()
        writer = self._writer

        async def stop() -> None:
            if writer is not None and not writer.is_closing():
                try:  # (the ends reach the controller before the connection closes)
                    await asyncio.wait_for(writer.drain(), 2.0)
                except (OSError, asyncio.TimeoutError):
                    pass
            me.cancel()

        asyncio.ensure_future(stop())

    async def _session(self) -> None:
        reader, writer = await asyncio.open_connection(*self.controller)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._writer = writer
        total, free = self._memory or device_memory(self.device)
        self._memory = (total, free)  # measured once: later the arena itself takes the device's memory
        m.write_message(writer, m.Register(host=socket.gethostname(), pid=os.getpid(), device=self.device,
                                           memory_bytes=total, free_bytes=free, slot=self.slot, settings=self.settings,
                                           join_token=self.join_token, loaded=self.models.names()))
        try:
            reply = await m.read_message(reader)
        except asyncio.IncompleteReadError as e:
            if self.slot is not None and not e.partial:
                raise _ClosedBeforeJoin from None
            raise
        if isinstance(reply, m.Rejected):
            raise SystemExit(f"controller refused this worker: {reply.reason}")
        assert isinstance(reply, m.Registered)
        self._joined = True
        self._evicts = {}  # (counted per connection, as the controller counts what it sent)
        # a reconnecting worker keeps its pool: the models in it, and a kind's engine (its arena) made for a model the
        # dropped connection was loading, whose host() may still run on the step thread (a new pool beside it left
        # that one unclosed, and the model hosted there in no view)
        if not self.models.kinds:
            self.models = HostedModels(self.device, GpuSettings.from_dict(reply.settings), free)
        self.stop_wait_s = stop_wait(reply.settings)
        log.info("registered as %s (arena %.1f GB) %.2f s after the process %s", reply.worker_id,
                 self.models.budget_bytes / 1e9, *_age())
        tasks = [asyncio.create_task(self._step_loop()), asyncio.create_task(self._beat(reply.heartbeat_s))]
        try:
            while True:
                msg = await m.read_message(reader)
                if isinstance(msg, m.Shutdown):
                    return
                if isinstance(msg, m.LoadModel):
                    self._cancel_unload(msg.model)
                    if msg.model not in self._loading:  # else the load under way answers
                        self._loading.add(msg.model)
                        asyncio.create_task(self._load(msg))
                elif isinstance(msg, m.Heartbeat):
                    pass
                else:  # NewRequest, Abort, UnloadModel: applied between steps
                    if isinstance(msg, m.UnloadModel) and msg.model in self._loading:
                        self._unload_when_loaded.add(msg.model)
                    self._pending.append(msg)
                    self._wake.set()
        finally:
            for t in tasks:
                t.cancel()
            for _, fut in self._hosting:
                fut.cancel()
            self._hosting.clear()
            self._abort_all()
            writer.close()
            self._writer = None
            self._joined = False

    def _cancel_unload(self, model: str) -> None:
        """The controller registers a model again that it unregistered a moment ago: the unload not yet
        applied between steps is void (messages take effect in the order they came, so the answer to this
        load must not be followed by the older unload)."""
        self._unload_when_loaded.discard(model)
        self._pending = [p for p in self._pending if not (isinstance(p, m.UnloadModel) and p.model == model)]

    async def _load(self, msg: m.LoadModel) -> None:
        """Register a model (the read loop has put it in `_loading`, so a second LoadModel waits for this answer)."""
        t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        phases: dict[str, float] = {}
        try:
            if msg.model in self.models:
                eng = self.models.engines[msg.model]
            else:  # into its kind's multi-model engine, between steps (see controller/hosting.py)
                # what it needs (host copy, tokenizer) is read here, beside the steps; registering it on the step
                # thread is quick. After a takeover, not before the warm-up's imports are done (see standby()),
                # unless it needs none of them (a paced model without a tokenizer: the fault suite's, the bench's)
                needs = msg.path is not None or msg.engine.kind != "pace"
                if needs and _warming is not None and _warming.is_alive():
                    await loop.run_in_executor(self._load_thread, _warming.join)
                if self._garbage and msg.engine.kind not in self.models.kinds:
                    self._collect()  # (a closed engine's arena freed before its kind makes another)
                phases = await loop.run_in_executor(self._load_thread, self.models.prepare, msg.path, msg.engine)
                t1 = time.monotonic()
                fut = loop.create_future()
                self._hosting.append((msg, fut))
                self._wake.set()
                eng = await fut
                phases = {**phases, "wait_host_s": time.monotonic() - t1, **self.models.add_s(msg.model)}
        except asyncio.CancelledError:  # its connection ended: the next one's LoadModel loads it again
            self._loras_later.pop(msg.model, None)  # (what that one sent; the next LoadModel carries its own)
            self._retune_later.pop(msg.model, None)
            raise
        except Exception as e:  # noqa: BLE001 - any load failure is reported, the worker lives on
            if isinstance(e, (OSError, ValueError)):  # its files gone or unreadable, a model that cannot fit: said
                # in one line (it is retried, 10 s then doubling: a traceback each time buried the log), as the
                # controller's own line says it; anything else is a bug, with its traceback
                log.error("loading %s failed: %s: %s", msg.model, type(e).__name__, e)
            else:
                log.exception("loading %s failed", msg.model)
            self._loras_later.pop(msg.model, None)
            self._retune_later.pop(msg.model, None)
            self.send(m.ModelLoaded(msg.model, False, error=f"{type(e).__name__}: {e}"))
            return
        finally:
            self._loading.discard(msg.model)
        if msg.model in self._unload_when_loaded:  # unregistered while it loaded: no answer, it goes again
            self._unload_when_loaded.discard(msg.model)
            self._pending.append(m.UnloadModel(msg.model))
            self._wake.set()
            return
        freeze_long_lived()  # the engine's objects live until it is unloaded
        log.info("hosting %s took %.2f s (%.2f s after the process %s): %s", msg.model, time.monotonic() - t0,
                 *_age(), " ".join(f"{k} {v:.3f}" for k, v in phases.items()))
        self.send(m.ModelLoaded(msg.model, True, max_model_len=eng.max_model_len, max_num_seqs=_seqs(eng, msg),
                                load_s=time.monotonic() - t0))

    async def _host_pending(self) -> None:
        loop = asyncio.get_running_loop()
        while self._hosting:
            msg, fut = self._hosting.pop(0)
            try:
                try:
                    eng = await loop.run_in_executor(self._step_thread, self._host, msg)
                except Exception as e:  # noqa: BLE001 - reported by _load
                    if not fut.done():
                        fut.set_exception(e)
                else:
                    await self._stats_taken()
                    self.models.residency(msg.model, pinned=msg.pinned, keep_alive_s=msg.keep_alive_s,
                                          preload=msg.preload)
                    if (rt := self._retune_later.pop(msg.model, None)) is not None:
                        self.models.retune(msg.model, rt.slo, rt.keep_alive_s)
                    if (loras := self._loras_later.pop(msg.model, None)) is not None:
                        for why in await loop.run_in_executor(self._step_thread, self.models.set_loras, msg.model,
                                                              loras):
                            log.error("%s: %s", msg.model, why)
                    if not fut.done():
                        fut.set_result(eng)
            finally:  # this loop ended meanwhile (its connection dropped): `_load` ends, the model leaves `_loading`
                if not fut.done():  # (taken off `_hosting`, its future waited forever: the model stayed `_loading`,
                    fut.cancel()  # and the next connection's LoadModel of it was ignored, never answered)

    def _host(self, msg: m.LoadModel):
        """(step thread) Host `msg`'s model; or, hosted already, its engine: a connection that dropped while it was
        hosted left its `host()` running here, and the next connection's LoadModel may come before it ends."""
        if msg.model in self.models:
            return self.models.engines[msg.model]
        return self.models.host(msg.model, msg.path, msg.engine, msg.slo, msg.loras)

    def _apply_pending(self) -> list[m.Delta]:
        errors: list[m.Delta] = []
        if self._stops:  # first: their KV is freed before the next step, and their ids are free for reuse
            stops, self._stops = self._stops, []
            self.models.stop_requests(stops)
        pending, self._pending = self._pending, []
        for msg in pending:
            if isinstance(msg, m.NewRequest):
                if msg.model not in self.models:
                    errors.append(m.Delta(msg.request_id, finished=True, finish_reason="error",
                                          error=f"model {msg.model} is not loaded here", error_kind="engine"))
                    continue
                try:
                    self.models.add_request(msg.model, msg.request_id, msg.prompt_token_ids, msg.params)
                except (ValueError, TypeError) as e:
                    errors.append(m.Delta(msg.request_id, finished=True, finish_reason="error", error=str(e),
                                          error_kind="invalid"))
                    continue
                self._owner[msg.request_id] = msg.model
            elif isinstance(msg, m.Abort):
                for rid in msg.request_ids:
                    model = self._owner.pop(rid, None)
                    if model is not None:
                        self.models.abort(model, rid)
            elif isinstance(msg, m.PinModel):
                if msg.model in self.models:
                    self.models.set_pinned(msg.model, msg.pinned)
            elif isinstance(msg, m.RetuneModel):
                if msg.model in self.models:
                    self.models.retune(msg.model, msg.slo, msg.keep_alive_s)
                elif msg.model in self._loading:  # (its LoadModel carried the old values: these apply once hosted)
                    self._retune_later[msg.model] = msg
            elif isinstance(msg, m.EvictModel):
                self.models.evict_when_idle(msg.model)
                self._evicts[msg.model] = self._evicts.get(msg.model, 0) + 1  # (once applied: see `_snapshot`)
            elif isinstance(msg, m.SetLoras):
                if msg.model not in self.models and msg.model in self._loading:  # (its LoadModel named the adapters
                    self._loras_later[msg.model] = msg.loras  # of before: these are set once it is hosted)
                for why in self.models.set_loras(msg.model, msg.loras):
                    log.error("%s: %s", msg.model, why)
            elif isinstance(msg, m.UnloadModel):
                if msg.model in self.models:
                    for rid in [r for r, mm in self._owner.items() if mm == msg.model]:
                        self._owner.pop(rid)
                        errors.append(m.Delta(rid, finished=True, finish_reason="error",
                                              error="model unloaded", error_kind="engine"))
                    self.models.unload(msg.model)
                    self._garbage = True  # (`_collect`: once for all the unloads applied here)
        return errors

    def _collect(self) -> None:
        """Free what unloaded models left in the frozen heap (their memory, device memory included): a full pass of
        the heap on the event loop (~0.2 s on an idle 2-core CPU, ~1 s on a loaded one), once for all the unloads
        applied since the last (an engine drain unloads all its models at once; a pass each held a resume's
        registrations, and the first request after it, for as many passes)."""
        t0 = time.perf_counter()
        self._garbage = False
        collect_all()
        self.collections += 1
        self.loop_s["collect_s"] += time.perf_counter() - t0

    def _steps(self, loop: asyncio.AbstractEventLoop, unsent: list | None) -> tuple[list, bool]:
        """Steps back to back on the step thread while the loop has nothing for the engines (no message, load or
        stop string waiting), for at most BURST_S: handing each step back to the event loop and out again cost
        ~0.15 ms a step on the CPU (bench_worker_loop), time the GPU waits. Each step's outputs (`unsent`: the
        step's before these) go to the loop to be emitted once the step after them has launched -- under the
        GIL, text made while this thread prepares a step would delay its launch by as much -- all from this
        thread, so in order; the last step's come back."""
        deadline = time.perf_counter() + BURST_S
        prev = unsent
        while True:
            sent = []  # whether this step launched, and so handed `prev` on

            def launched(prev=prev, sent=sent):
                # once a step: a worker hosting two kinds (a pooled and a paced model) launches twice in it, and
                # `prev` emitted twice sent each token twice (its text too, where the text is made per token)
                if sent:
                    return
                sent.append(True)
                if prev:
                    loop.call_soon_threadsafe(self._emit_later, prev)

            stepped, ran = self._step_all(launched)
            if prev and not sent:  # it launched nothing to overlap the emit with
                loop.call_soon_threadsafe(self._emit_later, prev)
            if not (ran and not (self._pending or self._hosting or self._stops) and self.models.busy()
                    and time.perf_counter() < deadline):
                return stepped, ran
            prev = stepped

    def _emit_later(self, stepped: list) -> None:
        """`_emit` on the loop, after the emits before it (their order is the tokens' order)."""
        prev = self._emitting

        async def emit():
            if prev is not None:
                await prev
            await self._emit(stepped)

        self._emitting = asyncio.ensure_future(emit())

    def _step_all(self, on_launch) -> tuple[list, bool]:
        """The step thread's whole share of a step: token ids (their text is `_emit`'s, beside the next step)."""
        t0 = time.perf_counter()
        stepped, ran = self.models.step_tokens(on_launch)
        if ran:
            self.steps += 1
        self.loop_s["step_thread_s"] += time.perf_counter() - t0
        return stepped, ran

    async def _emit(self, stepped: list) -> None:
        """Send a step's outputs: their text is made here, on the event loop, while the step thread runs the next
        step. Stop strings found here end their requests' answers now; the engine frees them at the next step
        boundary (`_stops`), after the step under way, whose token for them is not emitted."""
        t0 = time.perf_counter()
        try:
            outs, stops = self.models.outputs(stepped)
        except Exception as e:  # noqa: BLE001 - as an engine crash: the step's outputs are lost
            await self._crash("detokenizing failed", e)
        self._stops += stops
        deltas = []
        for out in outs:
            if out.request_id not in self._owner:  # aborted by the controller: it needs no answer
                continue
            deltas.append(to_delta(out))
            self.tokens += len(out.delta_token_ids)
            if out.finished:
                self._owner.pop(out.request_id, None)
        if deltas:
            self.send(m.Outputs(deltas))
        self.loop_s["emit_s"] += time.perf_counter() - t0
        if deltas and self._writer is not None:
            await self._writer.drain()

    async def _crash(self, what: str, e: Exception) -> None:
        """An engine crash fails its requests, then the process exits (its supervisor starts another). The requests
        hear the exception's type only: its text may name the server's paths, devices or other tenants' shapes; the
        log has it whole."""
        log.error("%s: %s: %s", what, type(e).__name__, e, exc_info=e)
        said = f"engine failed ({type(e).__name__}; the server's log has the detail)"
        self.send(m.Outputs([m.Delta(r, finished=True, finish_reason="error", error=said,
                                     error_kind="engine") for r in self._owner]))
        await asyncio.sleep(0.1)
        os._exit(3)

    async def _step_loop(self) -> None:
        """Step while there is work: runs of steps on the step thread (`_steps`), pipelined: step N+1 is on the
        device while step N's outputs are detokenized and sent here, so the host's work on outputs does not
        stand between two steps. Between runs: registrations, messages, stop strings."""
        loop = asyncio.get_running_loop()
        idle_since = None
        unsent = None  # the latest step's outputs, not yet emitted
        while True:
            await self._host_pending()
            await self._stats_taken()
            errors = self._apply_pending()
            if errors:
                self.send(m.Outputs(errors))
            if self._garbage and not self._hosting:  # (once the unloads just applied are answered; a registration
                self._collect()  # waiting to be hosted goes first)
            if not self.models.busy():
                if unsent:  # nothing to overlap with: send them now (they may end requests)
                    await self._emit(unsent)
                    unsent = None
                    continue
                idle_since = None
                self._wake.clear()
                if not self._pending and not self._hosting:
                    try:  # idle: wake now and then for time-based residency (keep_alive)
                        await asyncio.wait_for(self._wake.wait(), 1.0)
                    except asyncio.TimeoutError:
                        await loop.run_in_executor(self._step_thread, self.models.tick)
                continue
            step = loop.run_in_executor(self._step_thread, self._steps, loop, unsent)
            try:
                unsent, ran = await step
            except Exception as e:  # noqa: BLE001 - reported to the controller, then the process exits
                await self._crash("engine step failed", e)
            if self._emitting is not None:  # the burst's emits (they may end requests) before the next look
                await self._emitting
                self._emitting = None
            if ran:
                idle_since = None
            else:  # the policy planned no step although requests wait (no room by its estimate): do not spin
                now = time.monotonic()
                if idle_since is None:
                    idle_since = now
                elif now - idle_since > 5.0:
                    log.warning("the multi-model policy has planned no step for %.0f s with requests waiting",
                                now - idle_since)
                    idle_since = now
                await asyncio.sleep(0.001)

    def _snapshot(self) -> m.Stats:
        """Stats of the pool, taken on the step thread between steps while the loop changes no engine (the engines'
        queues are not shared: `_stats_taken`)."""
        hm = self.models
        # the evicts applied before the view is read (`_apply_pending` runs on the loop thread, counting each once it
        # is applied): the controller believes this view of a model it evicted once it counts them all. One still
        # waiting for its model's last request to end (or its copy to land) is not counted yet: a view taken between
        # that request's last output and the evict listed the model resident with every evict counted, and the
        # controller, which had taken it out of its view as the request ended, listed it again (/api/ps after a
        # keep_alive 0 generate: test_ux59a, once in CI)
        waiting = hm.evicting()
        evicts = {k: n - (k in waiting) for k, n in self._evicts.items()}
        # step_s for the router is a round: the time a model waits between two of its steps
        pool = hm.snapshot()
        if evicts:
            pool["evicts"] = evicts
        # a KV page's bytes, once carved (at the first model's registration): the controller refuses a model one
        # token of whose KV no engine's page holds (Controller.add_model), rather than let its loads fail
        wp = hm.arena_engine
        if wp is not None and wp.memory.page_bytes:
            pool["kv_page_bytes"] = wp.memory.page_bytes
        # t: when it was taken (wall clock), so a reader can tell a view taken after its own question
        pool["loop"] = {**self.loop_s, "steps": self.steps, "collections": self.collections, "t": time.time()}
        return m.Stats(models=hm.stats(), step_s=hm.round_estimate_s, steps=self.steps, tokens=self.tokens,
                       pool=pool, events=[*hm.drain_events(), *self._take_notices()])

    def _take_notices(self) -> list[dict[str, Any]]:
        out, self._notices = self._notices, []
        return out

    async def _beat(self, period: float) -> None:
        """Heartbeats from the loop (never behind a step or a registration); stats from the step thread, sent as
        soon as they are taken (they used to wait for the next beat: the controller's view was a beat late)."""
        loop = asyncio.get_running_loop()
        while True:
            self.send(m.Heartbeat(time.time()))
            if self._stats is None or self._stats.done():  # (one at a time: a long burst does not queue them up)
                self._take_stats(loop)
            await asyncio.sleep(period)

    def _take_stats(self, loop: asyncio.AbstractEventLoop) -> None:
        """A snapshot on the step thread, sent once taken. It reads the engines' queues, as a step does: the loop
        changes them only once it is done (`_stats_taken`)."""
        self._stats = loop.run_in_executor(self._step_thread, self._snapshot)
        self._stats.add_done_callback(self._send_stats)

    async def _stats_taken(self) -> None:
        """Wait for the snapshot the step thread is taking, if any (queued behind a step, it runs as soon as the step
        ends: the loop's adds and aborts then mutated the queues it iterated, "deque mutated during iteration").
        The loop's changes to the engines follow this with no await between. Snapshots run in the order they were
        asked for (one step thread), so the latest done is all of them done; a beat may ask for one more while this
        waits."""
        while self._stats is not None and not self._stats.done():
            await asyncio.wait([self._stats])

    def _send_stats(self, fut: asyncio.Future) -> None:
        if fut.cancelled():
            return
        if fut.exception() is not None:
            log.error("worker stats failed: %r", fut.exception())
        else:
            self.send(fut.result())

    def _abort_all(self) -> None:
        # A step may still be running in the executor: queue the aborts for the next step boundary.
        self._pending = [m.Abort(list(self._owner))]
        self._wake.set()


def bind_device(device: str) -> None:
    """Make the worker's GPU the current device of the calling thread (a thread's current device is its own, 0
    unless set). Triton launches, CUDA-graph capture streams and new streams follow the current device, not the
    tensors': a worker on cuda:1 whose threads kept device 0 would capture its decode graphs on a stream of
    device 0 and launch its Triton kernels there."""
    if device.startswith("cuda"):
        torch = import_torch()  # (the step and load threads start while the warm-up may be importing it)
        dev = torch.device(device)
        if dev.index is not None:
            torch.cuda.set_device(dev)


# a local worker signalled while its controller is connected serves on this long at most, waiting for the
# controller's word, unless the controller says otherwise (`stop_wait`: its shutdown_grace_s + 30 s, the drain of a
# stop of the whole server and the stop after it); systemd's SIGKILL comes after 90 s
LOCAL_STOP_WAIT_S = 60.0
# after a signalled remote worker's grace for its requests in flight (Worker.drain_grace_s, $TOKENPOOL_WORKER_DRAIN_S,
# 45 s), the margin for the controller's hand-off and word: 45 + 5 s, under the 60 s terminationGracePeriodSeconds of
# the operator's worker pods
STOP_MARGIN_S = 5.0
STOPPING = "worker_stopping"  # the event (in Stats.events) by which a signalled worker asks the controller to let it go


def stop_wait(settings: dict[str, Any] | None) -> float:
    """A signalled local worker's longest wait for its controller's word: the controller's `stop_wait_s` (its
    shutdown_grace_s and a margin: a configured grace over 60 s used to be cut at LOCAL_STOP_WAIT_S), else
    LOCAL_STOP_WAIT_S; a day at most."""
    v = (settings or {}).get("stop_wait_s")
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 86400
    return float(v) if ok else LOCAL_STOP_WAIT_S


# the longest run of steps without a look at the loop (stats, heartbeats' snapshots wait behind it)
BURST_S = env.WORKER_BURST_S.number()


def standby(device: str) -> bool:
    """A local spare: pay a worker's start-up ahead (`hosting.warm_up`: imports, the CUDA context) and wait for
    the supervisor's word on stdin. True: "go", this process becomes the slot's worker; False: stdin closed
    (the controller stopped or died), exit. Nothing else is taken while waiting: no arena, no host copy, no
    connection (the slot's worker holds them; a spare must not halve its VRAM).

    The warm-up runs on a thread, so a takeover never waits for it: the worker registers at once, and its model
    loads wait for the rest of the warm-up (`Worker._load`). They used to run beside it, on the strength of
    Python's import locks; but a package's lazy module imported on two threads at once came back half made
    (transformers: "cannot import name 'AutoConfig'"), and every model of the slot failed to register."""
    global _promoted_at
    t0 = time.monotonic()
    warm = _start_warming(device, t0, "standby")
    if sys.stdin.readline().strip() != "go":
        return False
    _promoted_at = time.monotonic()
    log.info("standby: taking over after %.1f s in standby (%s)", _promoted_at - t0,
             "still warming up" if warm.is_alive() else "warm")
    return True


def start_warm_up(device: str) -> None:
    """A cold start warms up as a standby does, on a thread (see standby()), so its imports run beside its join
    and the controller's own start-up rather than in its first registration, which waits for them (`Worker._load`):
    ~3 s of a 2-core host's time to ready. A GPU's memory is measured first, on this thread (the device's first
    use, its imports with it, on two threads at once is what standby() avoids)."""
    if device.startswith("cuda"):
        device_memory(device)
    _start_warming(device, time.monotonic(), "cold start")


def _start_warming(device: str, t0: float, who: str) -> threading.Thread:
    """`_warm_up` on its thread, which `Worker._load` waits for (`_warming`)."""
    global _warming
    _warming = threading.Thread(target=_warm_up, args=(device, t0, who), name="warm-up", daemon=True)
    _warming.start()
    return _warming


def _warm_up(device: str, t0: float, who: str) -> None:
    # The cyclic collector is off during the imports, and what they made is frozen after them (as after a load):
    # the ~300k objects of torch and transformers, made with it on, were scanned again and again as they grew (~600
    # young and 5 full collections: ~0.45 s of the warm-up's ~2.9 s on a 2-core host), for the ~1 MB of import-time
    # cycles among them, which are frozen with the rest. Frozen, a first collection does not rescan them either.
    was_on = gc.isenabled()
    gc.disable()
    try:
        warm_up(device)  # (looked up here, at call time: a test puts a slow one in its place)
    except Exception:  # noqa: BLE001 - a spare that cannot warm up is still a worker: it starts up on its turn
        if _stopping.is_set():  # (its imports cut by the process's end: a stop during a first run, no fault)
            log.debug("%s: warm-up cut short by the worker's stop", who, exc_info=True)
        else:
            log.exception("%s: warm-up failed", who)
        return
    finally:
        freeze_long_lived()
        if was_on:
            gc.enable()
    log.info("%s: warm %.2f s after it started (%.2f s after the process started)", who, time.monotonic() - t0,
             _process_age_s())


def _age() -> tuple[float, str]:
    """(seconds, since what) for the log: a restart's time split into start-up and each registration."""
    if _promoted_at is not None:
        return time.monotonic() - _promoted_at, "took over from standby"
    return _process_age_s(), "started"


def _process_age_s() -> float:
    """Seconds since this process started (Linux; -1 elsewhere): a restart's time, split in the log into
    start-up (imports, device) and each registration."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            return float(f.read().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return -1.0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m controller.worker", description=__doc__.split("\n\n")[0])
    ap.add_argument("--controller", required=True, help="HOST:PORT of the controller's worker listener")
    ap.add_argument("--device", default="cpu", help="cpu | cuda:N")
    ap.add_argument("--slot", type=int, default=None, help=argparse.SUPPRESS)  # set by the local supervisor
    ap.add_argument("--join-token", default=env.JOIN_TOKEN.get(),
                    help="the controller's worker join token, if it has one (default: $TOKENPOOL_JOIN_TOKEN)")
    ap.add_argument("--gpu-budget-gb", type=float, default=None,
                    help="this worker's arena (weights + KV) in GB, overriding the controller's gpus.budget_gb")
    ap.add_argument("--kv-cache-gb", type=float, default=None, help="the KV region inside it (gpus.kv_cache_gb)")
    ap.add_argument("--host-cache-gb", type=float, default=None, help="the node's host weight cache (gpus.host_cache_gb)")
    ap.add_argument("--policy", choices=("token", "aegaeon", "request", "static"), default=None,
                    help="the multi-model policy of this worker's pooled engine (gpus.policy)")
    ap.add_argument("--drain-grace-s", type=float, default=None,
                    help="on SIGTERM, how long requests in flight get to finish before they are handed off or ended "
                         f"(default: $TOKENPOOL_WORKER_DRAIN_S, {env.WORKER_DRAIN_S.default}); the worker exits at "
                         f"most {STOP_MARGIN_S:.0f} s later")
    ap.add_argument("--standby", action="store_true", help=argparse.SUPPRESS)  # a local spare (controller/pool.py)
    a = ap.parse_args(argv)
    host, _, port = a.controller.rpartition(":")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker[%(process)d] %(levelname)s %(message)s",
                        stream=sys.stderr)
    # torch's loggers at torch's own default from the start: a stop while the warm-up still imported torch left them
    # at INFO, and its atexit "FakeTensor cache stats" lines came out in the server's log (model_factory's too)
    logging.getLogger("torch").setLevel(logging.WARNING)
    if a.standby:
        if not standby(a.device):
            _stopping.set()  # (let go unused: its warm-up may still be importing)
            return
    else:
        start_warm_up(a.device)
    if env.SWITCH_INTERVAL_S.get():
        sys.setswitchinterval(env.SWITCH_INTERVAL_S.number())
    worker = Worker((host or "127.0.0.1", int(port)), a.device, a.slot, a.join_token,
                    {"budget_gb": a.gpu_budget_gb, "kv_cache_gb": a.kv_cache_gb, "host_cache_gb": a.host_cache_gb,
                     "policy": a.policy}, a.drain_grace_s)
    try:  # uvloop: each step's outputs wait on the executor-to-loop handoff; it is ~60 us cheaper there
        import uvloop
    except ImportError:
        asyncio.run(worker.run())
    else:
        uvloop.run(worker.run())
    _exit_now(worker)


def _exit_now(worker: Worker) -> None:
    """Exit 0 without the interpreter's teardown: ~0.6 s of a 2-core host's CPU with torch imported (its modules
    and objects freed one by one, which the process's end frees at once), which the controller's stop waited for
    (`EnginePool.stop` reaps its workers): an idle local worker exited ~0.5 s after the controller's Shutdown, now
    at once. What the teardown does that matters is done first: the worker's own threads joined (a load or a step
    still running finishes, as the exit's join let it), the atexit functions run, the logs flushed. Its models, host
    copies and connection were given back by `Worker.run`."""
    from controller import children

    for pool in (worker._load_thread, worker._step_thread):
        pool.shutdown(wait=True)
    children.exit_now(0)


if __name__ == "__main__":
    main()
