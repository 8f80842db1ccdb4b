"""An engine worker: one process per GPU (or one CPU worker), driven by the controller over TCP.

    python -m controller.worker --controller HOST:PORT [--device cuda:0] [--join-token TOKEN]

It registers, then loads the models the controller places on it (one engine per model; the worker steps
the engines that have work in turn) and streams each step's deltas back. Engine calls never overlap: the step
runs in one executor thread while the event loop keeps the socket (requests, aborts, heartbeats) moving;
adds and aborts queued by the loop are applied between steps, so an abort frees its KV before the next step.
A local worker (started with --slot) exits when the controller goes away; a remote one reconnects.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from controller import messages as m
from controller.heap import collect_all, freeze_long_lived

log = logging.getLogger("tokenpool.worker")


def build_engine(path: str | None, opts: dict[str, Any], device: str):
    """An LLMEngine (or a PaceEngine when opts['kind'] == 'pace') for one model on `device`."""
    if opts.get("kind") == "pace":
        from load_tests.pace_engine import PaceEngine

        return PaceEngine(path, s_per_token=opts.get("pace_s_per_token", 0.02),
                          prefill_s_per_token=opts.get("pace_prefill_s_per_token", 0.0),
                          max_num_seqs=opts.get("max_num_seqs", 64), max_model_len=opts.get("max_model_len") or 4096,
                          seed=opts.get("seed", 0), stamp=opts.get("pace_stamp", False))
    from token_scheduler import EngineConfig, LLMEngine

    dtype = opts.get("dtype") or "auto"
    if dtype == "auto":
        dtype = "fp32" if device == "cpu" else "bf16"
    kw = {k: opts[k] for k in ("block_size", "num_kv_blocks", "max_num_seqs", "max_num_batched_tokens",
                               "max_model_len", "kv_cache_memory_gb", "cuda_graphs", "seed")
          if opts.get(k) is not None}
    return LLMEngine(EngineConfig(model=path, device=device, dtype=dtype, **kw))


def sampling_params(d: dict[str, Any]):
    from token_scheduler.request import SamplingParams

    return SamplingParams(**d)


def to_delta(out, num_prompt_tokens: int) -> m.Delta:
    c = out.outputs[0]
    lps = None
    if c.logprobs is not None and out.delta_token_ids:
        lps = []
        for tid, lp in zip(out.delta_token_ids, c.logprobs[-len(out.delta_token_ids):]):
            pairs = [[tid, lp.get(tid, float("nan"))]] + [[k, v] for k, v in lp.items() if k != tid]
            lps.append(pairs)
    return m.Delta(request_id=out.request_id, text=out.delta_text, token_ids=list(out.delta_token_ids),
                   logprobs=lps, finished=out.finished, finish_reason=c.finish_reason if out.finished else None,
                   num_prompt_tokens=num_prompt_tokens)


def _seqs(eng, msg: m.LoadModel) -> int:
    n = getattr(eng, "max_num_seqs", None) or getattr(getattr(eng, "config", None), "max_num_seqs", None)
    return int(n or msg.engine.get("max_num_seqs") or 0)


def device_memory(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_properties(int(device.split(":")[1] if ":" in device else 0)).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 16 << 30


class Worker:
    def __init__(self, controller: tuple[str, int], device: str = "cpu", slot: int | None = None,
                 join_token: str | None = None):
        self.controller = controller
        self.device = device
        self.slot = slot
        self.join_token = join_token
        self.engines: dict[str, Any] = {}
        self._owner: dict[str, str] = {}  # request id -> model
        self._prompt_len: dict[str, int] = {}
        self._pending: list[m.Message] = []
        self._wake = asyncio.Event()
        self._step_pool = ThreadPoolExecutor(1, thread_name_prefix="step")
        self._load_pool = ThreadPoolExecutor(1, thread_name_prefix="load")
        self._writer: asyncio.StreamWriter | None = None
        self.step_s = 0.0  # EWMA of one round over every busy engine
        self.model_step_s: dict[str, float] = {}  # EWMA of one step of each model's engine
        self.steps = 0
        self.tokens = 0

    def send(self, msg: m.Message) -> None:
        if self._writer is not None and not self._writer.is_closing():
            m.write_message(self._writer, msg)

    async def run(self) -> None:
        delay = 0.5
        while True:
            try:
                await self._session()
                delay = 0.5
            except (OSError, asyncio.IncompleteReadError, m.ProtocolError) as e:
                log.warning("controller connection: %s", e)
            if self.slot is not None:  # a local worker lives and dies with its controller
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def _session(self) -> None:
        reader, writer = await asyncio.open_connection(*self.controller)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._writer = writer
        m.write_message(writer, m.Register(host=socket.gethostname(), pid=os.getpid(), device=self.device,
                                           memory_bytes=device_memory(self.device), slot=self.slot,
                                           join_token=self.join_token, loaded=sorted(self.engines)))
        reply = await m.read_message(reader)
        if isinstance(reply, m.Rejected):
            raise SystemExit(f"controller refused this worker: {reply.reason}")
        assert isinstance(reply, m.Registered)
        log.info("registered as %s", reply.worker_id)
        tasks = [asyncio.create_task(self._step_loop()), asyncio.create_task(self._beat(reply.heartbeat_s))]
        try:
            while True:
                msg = await m.read_message(reader)
                if isinstance(msg, m.Shutdown):
                    return
                if isinstance(msg, m.LoadModel):
                    asyncio.create_task(self._load(msg))
                elif isinstance(msg, m.Heartbeat):
                    pass
                else:  # NewRequest, Abort, UnloadModel: applied between steps
                    self._pending.append(msg)
                    self._wake.set()
        finally:
            for t in tasks:
                t.cancel()
            self._abort_all()
            writer.close()
            self._writer = None

    async def _load(self, msg: m.LoadModel) -> None:
        if msg.model in self.engines:
            e = self.engines[msg.model]
            self.send(m.ModelLoaded(msg.model, True, max_model_len=e.max_model_len, max_num_seqs=_seqs(e, msg)))
            return
        t0 = time.monotonic()
        try:
            eng = await asyncio.get_running_loop().run_in_executor(
                self._load_pool, build_engine, msg.path, msg.engine, self.device)
        except Exception as e:  # noqa: BLE001 - any load failure is reported, the worker lives on
            log.exception("loading %s failed", msg.model)
            self.send(m.ModelLoaded(msg.model, False, error=f"{type(e).__name__}: {e}"))
            return
        self.engines[msg.model] = eng
        freeze_long_lived()  # the engine's objects live until it is unloaded
        self.send(m.ModelLoaded(msg.model, True, max_model_len=eng.max_model_len, max_num_seqs=_seqs(eng, msg),
                                load_s=time.monotonic() - t0))

    def _apply_pending(self) -> list[m.Delta]:
        errors: list[m.Delta] = []
        pending, self._pending = self._pending, []
        for msg in pending:
            if isinstance(msg, m.NewRequest):
                eng = self.engines.get(msg.model)
                if eng is None:
                    errors.append(m.Delta(msg.request_id, finished=True, finish_reason="error",
                                          error=f"model {msg.model} is not loaded here", error_kind="engine"))
                    continue
                try:
                    eng.add_request(msg.request_id, msg.prompt_token_ids, sampling_params(msg.params))
                except (ValueError, TypeError) as e:
                    errors.append(m.Delta(msg.request_id, finished=True, finish_reason="error", error=str(e),
                                          error_kind="invalid"))
                    continue
                self._owner[msg.request_id] = msg.model
                self._prompt_len[msg.request_id] = len(msg.prompt_token_ids)
            elif isinstance(msg, m.Abort):
                for rid in msg.request_ids:
                    model = self._owner.pop(rid, None)
                    self._prompt_len.pop(rid, None)
                    if model in self.engines:
                        self.engines[model].abort_request(rid)
            elif isinstance(msg, m.UnloadModel):
                eng = self.engines.pop(msg.model, None)
                if eng is not None:
                    for rid in [r for r, mm in self._owner.items() if mm == msg.model]:
                        self._owner.pop(rid)
                        errors.append(m.Delta(rid, finished=True, finish_reason="error",
                                              error="model unloaded", error_kind="engine"))
                    del eng
                    collect_all()  # its memory (device memory included) must not wait in the frozen heap
        return errors

    def _step_all(self, engines: list[tuple[str, Any]]) -> list[m.Delta]:
        t0 = time.monotonic()
        deltas = []
        for name, eng in engines:
            t1 = time.monotonic()
            outs = eng.step()
            dt1 = time.monotonic() - t1
            prev = self.model_step_s.get(name)
            self.model_step_s[name] = dt1 if prev is None else 0.8 * prev + 0.2 * dt1
            for out in outs:
                if out.request_id not in self._owner:  # aborted by the controller: it needs no answer
                    continue
                deltas.append(to_delta(out, self._prompt_len.get(out.request_id, 0)))
                self.tokens += len(out.delta_token_ids)
                if out.finished:
                    self._owner.pop(out.request_id, None)
                    self._prompt_len.pop(out.request_id, None)
        dt = time.monotonic() - t0
        self.step_s = dt if self.steps == 0 else 0.9 * self.step_s + 0.1 * dt
        self.steps += 1
        return deltas

    async def _step_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            errors = self._apply_pending()
            if errors:
                self.send(m.Outputs(errors))
            busy = [(n, e) for n, e in self.engines.items() if e.has_unfinished_requests()]
            if not busy:
                self._wake.clear()
                if not self._pending:
                    await self._wake.wait()
                continue
            try:
                deltas = await loop.run_in_executor(self._step_pool, self._step_all, busy)
            except Exception as e:  # noqa: BLE001 - an engine crash fails its requests, then the process exits
                log.exception("engine step failed")
                self.send(m.Outputs([m.Delta(r, finished=True, finish_reason="error", error=f"engine failed: {e}",
                                             error_kind="engine") for r in self._owner]))
                await asyncio.sleep(0.1)
                os._exit(3)
            if deltas:
                self.send(m.Outputs(deltas))
                if self._writer is not None:
                    await self._writer.drain()

    async def _beat(self, period: float) -> None:
        while True:
            self.send(m.Heartbeat(time.time()))
            models = {k: dict(e.stats(), step_s=self.model_step_s.get(k, 0.0)) for k, e in self.engines.items()}
            self.send(m.Stats(models=models, step_s=self.step_s,
                              steps=self.steps, tokens=self.tokens))
            await asyncio.sleep(period)

    def _abort_all(self) -> None:
        # A step may still be running in the executor: queue the aborts for the next step boundary.
        self._pending = [m.Abort(list(self._owner))]
        self._wake.set()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m controller.worker", description=__doc__.split("\n\n")[0])
    ap.add_argument("--controller", required=True, help="HOST:PORT of the controller's worker listener")
    ap.add_argument("--device", default="cpu", help="cpu | cuda:N")
    ap.add_argument("--slot", type=int, default=None, help=argparse.SUPPRESS)  # set by the local supervisor
    ap.add_argument("--join-token", default=os.environ.get("TOKENPOOL_JOIN_TOKEN"),
                    help="the controller's worker join token, if it has one (default: $TOKENPOOL_JOIN_TOKEN)")
    a = ap.parse_args(argv)
    host, _, port = a.controller.rpartition(":")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker[%(process)d] %(levelname)s %(message)s",
                        stream=sys.stderr)
    worker = Worker((host or "127.0.0.1", int(port)), a.device, a.slot, a.join_token)
    try:  # uvloop: each step's outputs wait on the executor-to-loop handoff; it is ~60 us cheaper there
        import uvloop
    except ImportError:
        asyncio.run(worker.run())
    else:
        uvloop.run(worker.run())


if __name__ == "__main__":
    main()
