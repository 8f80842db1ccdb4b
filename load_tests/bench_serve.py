"""`tokenpool bench serve`: the seeded multi-model workload of `bench pool --real`, replayed through the HTTP API.

The product as a user reaches it: a `tokenpool serve` (started here, one per policy, or a running one given
with --url) and an open-loop client sending the same seeded arrivals (load_tests/workload.py) to
`/v1/completions`, streamed, greedy, `ignore_eos`, `max_tokens` = the item's output length, its prompt as
token ids. Every streamed event is one token (one engine step of that request); its arrival is timestamped when
the bytes reach the client. Scoring is `bench pool`'s (token_scheduler/policies/slo.py): the deadline rule
(every token by its deadline, TTFT + i * TPOT), the mean rule, per model, the p99 longest inter-token gap. A
request refused (429, 503) or broken misses. A run stops `drain_s` after the last arrival, as `bench pool
--real` does, and the JSON has its shape (`sweep`, `policies`, `sustained`, `ratios`), plus what the server
said about itself (its pooled engines' steps and switches, read from the admin API before and after).

Models are made once per (arch, size) as `bench pool --real` makes them, and several served models of one size
share a directory (so one host copy, as Aegaeon's evaluation aliases same-size models).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from pathlib import Path

import httpx

from controller.dashboard.stream import BEAT_S, TICK_BEATS
from load_tests.bench_common import bench_models_dir, checkpoint_size, header, spread, write_json
from load_tests.bench_pool import bracket
from load_tests.bench_pool_real import bound_ratios, make_models, parse_rates, window_arrivals
from load_tests.sse_client import connect
from load_tests.workload import WorkItem, generate, parse_models
from token_scheduler.cost_model import PHASE_KINDS, step_phases
from token_scheduler.policies.slo import ModelSLO, RequestRecord, summarize
from token_scheduler.policies.token import ROUND_TERMS, TURN_ENDS

ENGINE = {"max_num_seqs": 64, "max_model_len": 4096, "max_num_batched_tokens": 2048}  # as bench pool --real


def server_config(dirs: dict[str, Path], *, policy: str, slo: ModelSLO, gpu_budget_gb: float | None,
                  kv_cache_gb: float | None, namespace: str, admin_hash: str, device: str = "cuda",
                  cpu_budget_gb: float = 8.0, admission: bool = True) -> dict:
    """The `tokenpool serve` configuration of a bench run (a user's YAML, as a dict)."""
    gpus = {"policy": policy, "host_cache_namespace": namespace, "kv_cache_gb": kv_cache_gb}
    if device == "cpu":
        gpus["cpu_budget_gb"] = cpu_budget_gb
    elif gpu_budget_gb is not None:
        gpus["budget_gb"] = gpu_budget_gb
    return {
        "admin_token_hash": admin_hash, "metrics_public": True, "auth": False,
        "workers": {"local": "cpu" if device == "cpu" else "auto"},
        "gpus": {k: v for k, v in gpus.items() if v is not None},
        "admission": {"enabled": admission},
        "models": [{"name": n, "path": str(d), "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
                    "engine": dict(ENGINE)} for n, d in dirs.items()],
    }


class _Stream:
    """Counts the SSE events of one streamed completion as they arrive (one event with a choice = one token)."""

    def __init__(self, rec: RequestRecord):
        self.rec, self.buf, self.usage, self.error = rec, b"", None, None

    def on_data(self, data: bytes, now: float, _wall: float) -> None:
        self.buf += data
        *events, self.buf = self.buf.split(b"\n\n")
        for ev in events:
            if not ev.startswith(b"data: ") or ev == b"data: [DONE]":
                continue
            if b'"error"' in ev[:16]:
                self.error = ev[6:].decode(errors="replace")
            elif b'"choices":[]' in ev:
                self.usage = json.loads(ev[6:]).get("usage")
            else:
                self.rec.on_token(now)


async def _one(host: str, port: int, item: WorkItem, rec: RequestRecord, prompt: list[int], stats: dict,
               deadline: float) -> None:
    st = _Stream(rec)
    body = {"model": item.model, "prompt": prompt, "max_tokens": item.output_len, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    conn = None
    try:
        conn = await connect(host, port)
        fut = conn.request("POST", f"{host}:{port}", "/v1/completions", body, on_data=st.on_data)
        status, _, _ = await asyncio.wait_for(fut, max(1.0, deadline - time.perf_counter()))
        key = str(status)
        if status != 200:  # the error body came through on_data as one event-less chunk
            try:
                err = json.loads(st.buf).get("error", {})
                key += ":" + (err.get("code") or err.get("message", "")[:80])
            except ValueError:
                pass
        stats[key] = stats.get(key, 0) + 1
        if st.error:
            stats["stream_errors"] = stats.get("stream_errors", 0) + 1
        if st.usage and st.usage.get("completion_tokens") != rec.n_tokens:
            stats["token_count_mismatch"] = stats.get("token_count_mismatch", 0) + 1
    except asyncio.TimeoutError:
        stats["unfinished_at_horizon"] = stats.get("unfinished_at_horizon", 0) + 1
    except (OSError, ConnectionError) as e:
        stats[f"client_{type(e).__name__}"] = stats.get(f"client_{type(e).__name__}", 0) + 1
    finally:
        if conn is not None:
            conn.close()


class EventLog:
    """The server's admin event stream over a point: events counted by kind, and the "late" ones kept whole
    (a model with a request past its next token's deadline: which, when, its weights' residency, its last step),
    so a miss can be traced to what its model was waiting on."""

    KEEP, MAX = ("late",), 2000

    def __init__(self) -> None:
        self.buf, self.counts, self.kept = b"", {}, []
        self._switch_at: dict[str, float] = {}  # engine -> its latest switch (the engine's clock)
        self.turn_s: list[float] = []  # turn lengths: between an engine's consecutive switches
        self.turn_steps: dict[str, list[int]] = {}  # checkpoint size -> steps of each turn a switch ended

    def on_data(self, data: bytes, _now: float, _wall: float) -> None:
        self.buf += data
        *frames, self.buf = self.buf.split(b"\n\n")
        for f in frames:
            line = next((x for x in f.split(b"\n") if x.startswith(b"data: ")), None)
            if line is None:
                continue
            try:
                ev = json.loads(line[6:])
            except ValueError:
                continue
            kind = ev.get("kind", "?")
            self.counts[kind] = self.counts.get(kind, 0) + 1
            if kind in self.KEEP and len(self.kept) < self.MAX:
                self.kept.append(ev)
            if kind == "switch" and isinstance(ev.get("at"), (int, float)):
                eng, at = ev.get("engine"), float(ev["at"])
                last = self._switch_at.get(eng)
                if last is not None and at >= last:
                    self.turn_s.append(at - last)
                self._switch_at[eng] = at
            if kind == "switch" and isinstance(ev.get("turn_steps"), int) and isinstance(ev.get("previous"), str):
                self.turn_steps.setdefault(checkpoint_size(ev["previous"]), []).append(ev["turn_steps"])

    def to_dict(self, t0_wall: float) -> dict:
        late = [{**e, "t": round(e["t"] - t0_wall, 3)} for e in self.kept]  # seconds into the point
        # steps a turn by checkpoint size ("qwen2-7b-3" -> "qwen2-7b"), over every turn a switch ended: whether a
        # policy's turns come out longer in steps (a pace turn's steps are its round's length x headroom / TPOT)
        steps = {g: {"turns": len(v), **spread(v, "steps")} for g, v in sorted(self.turn_steps.items())}
        return {"counts": dict(sorted(self.counts.items())), "late": late,
                "turns": {**turn_lengths(self.turn_s), "steps_by_size": steps}}


def turn_lengths(secs: list[float]) -> dict:
    """How long turns lasted (seconds between an engine's consecutive switches, its own clock): a policy whose time
    quotas buy seconds-long turns shows here before it shows as misses."""
    return {"turns": len(secs), **spread(secs, "s")} if secs else {"turns": 0}


async def _follow_events(host: str, port: int, token: str, log: EventLog) -> None:
    """Read /admin/events (no snapshots) into `log` until cancelled."""
    conn = await connect(host, port)
    try:
        await conn.request("GET", f"{host}:{port}", "/admin/events", headers={"Authorization": f"Bearer {token}"},
                           on_data=log.on_data)
    finally:
        conn.close()


async def replay_http(url: str, items: list[WorkItem], slo: ModelSLO, vocab: int, drain_s: float,
                      seed: int = 0, admin_token: str | None = None) -> dict:
    """Send `items` at their arrival times (open loop); return the records and what came back (and, with the
    admin token, the server's events over the run)."""
    u = httpx.URL(url)
    host, port = u.host, u.port or 80
    events = EventLog() if admin_token else None
    follow = asyncio.create_task(_follow_events(host, port, admin_token, events)) if events else None
    samples: list = []  # (seconds since t0, the pool's counters) every WINDOW_S, for `windows`
    sampler = asyncio.create_task(_sample_counters(url, admin_token, samples)) if admin_token else None
    t0_wall = time.time()
    rng = random.Random(seed)
    records: list[RequestRecord] = []
    stats: dict = {}
    tasks = []
    t0 = time.perf_counter() + 0.2
    horizon = t0 + (items[-1].time if items else 0.0) + drain_s
    for w in items:
        prompt = [rng.randrange(vocab) for _ in range(w.prompt_len)]
        rec = RequestRecord(w.id, w.model, t0 + w.time, w.prompt_len, w.output_len, slo)
        records.append(rec)
        delay = t0 + w.time - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_one(host, port, w, rec, prompt, stats, horizon)))
    await asyncio.gather(*tasks)
    out = {"records": records, "wall_s": time.perf_counter() - t0, "responses": stats, "t0": t0}
    if admin_token:  # the point's last steps and events come with the engines' next Stats
        await asyncio.to_thread(_wait_fresh, url, admin_token, time.time())
        if follow is not None:  # and the event stream writes routine events (switch, load) once a tick
            await asyncio.sleep(BEAT_S * TICK_BEATS + 0.2)
    if sampler is not None:
        sampler.cancel()
        try:
            await sampler
        except asyncio.CancelledError:
            pass
        out["samples"] = [(t - t0, c) for t, c in samples]
    if follow is not None:
        follow.cancel()
        try:
            await follow
        except asyncio.CancelledError:
            pass
        except Exception as e:  # noqa: BLE001 - the event log is a diagnosis: its failure is said, not raised
            out["events_error"] = repr(e)
        out["events"] = events.to_dict(t0_wall)
    return out


WINDOW_S = 15.0  # bench serve's time series of a point (`windows`): one entry per this many seconds


async def _sample_counters(url: str, token: str, into: list) -> None:
    """The pool's counters every WINDOW_S (off the event loop: the request tasks run on it), until cancelled."""
    while True:
        await asyncio.sleep(WINDOW_S)
        try:
            into.append((time.perf_counter(), await asyncio.to_thread(_pool_counters, url, token)))
        except Exception:  # noqa: BLE001 - a diagnosis: a failed sample leaves a longer window
            pass


def windows(records: list[RequestRecord], samples: list, before: dict, after: dict, t0: float, wall: float) -> list:
    """A point as a time series, WINDOW_S apart: per window, the requests that arrived in it and the share of them
    that met their SLO, and the step loop's counters over it (`where_time_went`): whether misses come from the
    first minute (a cold server working off a backlog) or from all along, and whether steps got cheaper."""
    # a sample less than 0.1 s after the edge before it, or before the point's end, could make a window that rounds
    # to no time (edges are shown to 0.1 s: 2.06-2.14 s is 2.1-2.1; seen in CI on a loaded machine): it joins its
    # neighbour
    edges = [(0.0, before)]
    for t, c in samples:
        if t - edges[-1][0] >= 0.1 and wall - t >= 0.1:
            edges.append((t, c))
    edges.append((wall, after))
    out = []
    for (a, ca), (b, cb) in zip(edges, edges[1:]):
        if b <= a:
            continue
        _, w = window_arrivals(records, t0, a, b)
        if ca and cb:
            steps = cb["steps"] - ca["steps"]
            w.update(steps=steps, steps_per_s=steps / (b - a), **{k: v for k, v in where_time_went(ca, cb, b - a, cb["engines"]).items()
                                                     if k in ("engine_ms_per_step", "policy_us_per_step",
                                                              "engine_busy_frac", "step_thread_busy_frac",
                                                              "late_episodes", "graph_captures", "graph_capture_s",
                                                              "graph_evictions", "round_wall_over_planned",
                                                              "round_planned_mean_s", "need_round_frac",
                                                              "round_terms", "turn_ends", "decode_device_busy_frac")})
        out.append(w)
    return out


def _admin(url: str, token: str, path: str):
    r = httpx.get(url + path, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    r.raise_for_status()
    return r.json()


def _wait_fresh(url: str, token: str, asked: float, timeout: float = 10.0) -> None:
    """Until every live engine's view in /admin/engines was taken after `asked` (`pool.loop.t`, its worker's wall
    clock; an engine that does not say is read as it is), or `timeout`. A point's counters and events read at its
    last response lacked its last heartbeat's steps, switches and loads (up to `workers.heartbeat_s` of them)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ts = [((e.get("pool") or {}).get("loop") or {}).get("t") for e in _admin(url, token, "/admin/engines")
              if e["alive"]]
        if all(not isinstance(t, (int, float)) or t >= asked for t in ts):
            return
        time.sleep(0.02)


def _pool_counters(url: str, token: str | None) -> dict:
    if token is None:
        return {}
    engines = [e for e in _admin(url, token, "/admin/engines") if e["alive"]]
    pools = [e.get("pool") or {} for e in engines]
    out = {"per_engine": {}}
    for e, p in zip(engines, pools):  # the pooled engines' step-loop counters and the workers' loop seconds
        one = {"steps": p.get("steps", 0), "switches": p.get("switches", 0), "engines": 1,
               "kv_swapped_out": p.get("kv_swapped_out", 0),
               **p.get("counters", {}), **{"loop_" + k: v for k, v in p.get("loop", {}).items()}}
        for k, v in one.items():  # summed over GPUs
            out[k] = out.get(k, 0) + v
        out["per_engine"][e["id"]] = {**one, "models": sorted(r["model"] for r in e["models"])}
        steps = out.setdefault("model_steps", {})  # each model's steps (a model on two GPUs: summed)
        priced = out.setdefault("model_priced", {})  # each model's [engine s, s its plans priced the steps at]
        for m, st in (p.get("models") or {}).items():
            steps[m] = steps.get(m, 0) + st.get("steps", 0)
            e, q = priced.get(m, (0.0, 0.0))
            priced[m] = (e + st.get("engine_s", 0.0), q + st.get("priced_s", 0.0))
        if p.get("cost_model"):  # the first engine's learned costs (a result's `cost_model`, as bench pool --real's)
            out.setdefault("cost_model", p["cost_model"])
    out.setdefault("steps", 0), out.setdefault("switches", 0), out.setdefault("kv_swapped_out", 0)
    out.setdefault("engines", 0)
    return out


def where_time_went(before: dict, after: dict, wall: float, gpus: int) -> dict:
    """The served step loop's time over a point, from the pooled engines' counters (as `bench pool --real`'s
    `timing`): per step, the policy's CPU, the plan's memory moves (blocking loads included: `stall_s`), the
    engine's step; and per GPU, how busy the step thread was and the event loop's share making and sending
    outputs. Fractions are of the wall time times the GPUs."""
    d = {k: after[k] - before.get(k, 0) for k in after if isinstance(after[k], (int, float))}
    n = max(1, d.get("steps", 0))
    span = wall * max(1, gpus)
    dev_s = _decode_device_s(d)
    return {
        "policy_us_per_step": 1e6 * d.get("policy_s", 0) / n, "policy_cpu_us_per_step": 1e6 * d.get("policy_cpu_s", 0) / n,
        "memory_ms_per_step": 1e3 * d.get("memory_s", 0) / n,
        "engine_ms_per_step": 1e3 * d.get("engine_s", 0) / n, "stall_s": d.get("stall_s", 0.0),
        "loads_per_s": d.get("loads", 0) / wall, "prefetches_per_s": d.get("prefetches", 0) / wall,
        "load_gb": d.get("load_bytes", 0) / 1e9, "forced_evictions": d.get("forced_evictions", 0),
        "idle_polls": d.get("idle_polls", 0), "late_episodes": d.get("late_episodes", 0),
        "engine_busy_frac": d.get("engine_s", 0) / span, "memory_frac": d.get("memory_s", 0) / span,
        "step_thread_busy_frac": d.get("loop_step_thread_s", 0) / span,
        "emit_ms_per_step": 1e3 * d.get("loop_emit_s", 0) / n,
        "graph_captures": d.get("graph_captures", 0), "graph_capture_s": d.get("graph_capture_s", 0.0),
        "graph_first_captures": d.get("graph_first_captures", 0),
        "graph_first_capture_s": d.get("graph_first_capture_s", 0.0),
        "graph_evictions": d.get("graph_evictions", 0),
        "graph_output_gb": after.get("graph_output_bytes", 0) / 1e9,  # held at the end (a level, not a rate)
        # TOKENPOOL_PLAN_AHEAD / TOKENPOOL_PIPELINE: early plans used, and steps queued before the one in flight
        # was read (the GPU kept busy through the host's work between them)
        "ahead_used_frac": d.get("ahead_used", 0) / n, "pipelined_frac": d.get("pipelined_steps", 0) / n,
        "pipeline_flushes": d.get("pipeline_flushes", 0),
        # TOKENPOOL_CO_STEP: steps launched beside another model's step in flight (two streams at once)
        "co_step_frac": d.get("co_steps", 0) / n,
        # TOKENPOOL_CO_STEP_DEEP: calls that left two models' steps in flight (each queued behind its own step)
        "co_deep_frac": d.get("co_deep_kept", 0) / n,
        # (token policy) rounds' wall time over what they were planned to take, and the share over 1.5x: a step
        # loop whose turns overrun their quotas delays every model queued behind them
        "round_wall_over_planned": (d["round_wall_s"] / d["round_planned_s"]) if d.get("round_planned_s") else None,
        "rounds_overrun_frac": d.get("rounds_overrun", 0) / d["rounds_timed"] if d.get("rounds_timed") else None,
        # how long the rounds were planned to be (the token rule's R, or the deadline rule's): turns of more steps
        # come from longer rounds (a pace turn's steps are R x headroom / TPOT, whatever a step is priced at)
        "round_planned_mean_s": d["round_planned_s"] / d["rounds_timed"] if d.get("rounds_timed") else None,
        # the share of rounds formed under the deadline rule (pace quotas did not fit under the round's cap)
        "need_round_frac": d.get("need_rounds", 0) / d["rounds_formed"] if d.get("rounds_formed") else None,
        "round_terms": round_terms(d),
        # (token policy) why turns ended: out of work, their time spent, or cut at twice their quota still short
        "turn_ends": turn_ends(d),
        "step_phases": step_phases(d),
        # (TOKENPOOL_TIME_STEPS) the share of the wall the device spent in decode steps by CUDA events (graph replay
        # and sampling; a pipelined step from the step before's end): what the host's time between steps leaves it.
        # Prefill steps are left out: their events also span the host's launches of an eager forward.
        "decode_device_busy_frac": None if dev_s is None else dev_s / span,
    }


def round_terms(d: dict) -> dict | None:
    """(token policy) What the rounds formed were made of, per round (TokenPolicy.round_terms): models, the PCIe
    seconds of their weight loads, the cap the least banked slack put on them; and the share of rounds whose length
    each term set (`bound`). None when no round was formed."""
    n = d.get("rounds_formed")
    if not n:
        return None
    return {"models_mean": d.get("round_models", 0) / n, "link_mean_s": d.get("round_link_s", 0.0) / n,
            "cap_mean_s": d.get("round_cap_s", 0.0) / n,
            "bound": {k: d.get(f"round_{k}", 0) / n for k in ROUND_TERMS[3:]}}


def turn_ends(d: dict) -> dict | None:
    """(token policy) The turns that ended over a point, and the share that ended each way (TokenPolicy.turn_ends);
    None when none did."""
    n = sum(d.get(f"turn_end_{k}", 0) for k in TURN_ENDS)
    return {"turns": n, **{k: d.get(f"turn_end_{k}", 0) / n for k in TURN_ENDS}} if n else None


def _decode_device_s(d: dict) -> float | None:
    """The device seconds of the decode steps timed (TOKENPOOL_TIME_STEPS), scaled up to every decode step that ran
    (a step without sampled rows is not timed); None when none was timed."""
    total, timed = 0.0, 0
    for kind in PHASE_KINDS:
        if kind == "prefill" or not d.get(f"ph_{kind}_dev_n"):
            continue
        total += d[f"ph_{kind}_dev_s"] * d.get(f"ph_{kind}_steps", 0) / d[f"ph_{kind}_dev_n"]
        timed += 1
    return total if timed else None


def engine_over_priced(before: dict, after: dict) -> dict:
    """The engine time of the steps that ran over what their plans priced them at (`StepPlan.expected_s`: the cost
    model's prediction the policy sized turns by), over a point: overall, per model, and per checkpoint size (a
    served name less its alias number, "qwen2-1.5b-7" -> "qwen2-1.5b"). Above 1, turns run past the time the round
    planned for them, and every model queued behind waits longer; None where nothing was priced."""

    def ratio(e: float, q: float):
        return e / q if q > 0 else None

    tot, groups, by_model = [0.0, 0.0], {}, {}
    for m, (e, q) in sorted(after.items()):
        e0, q0 = before.get(m, (0.0, 0.0))
        e, q = e - e0, q - q0
        by_model[m] = ratio(e, q)
        g = groups.setdefault(checkpoint_size(m), [0.0, 0.0])
        for acc in (tot, g):
            acc[0] += e
            acc[1] += q
    return {"engine_over_priced": ratio(*tot), "by_size": {g: ratio(*v) for g, v in groups.items()},
            "by_model": by_model}


def run_point(url: str, admin_token: str | None, names: list[str], rate: float, *, slo: ModelSLO, duration: float,
              drain_s: float, seed: int, vocab: int) -> dict:
    items = generate(names, rate, duration, seed=seed)
    before = _pool_counters(url, admin_token)
    r = asyncio.run(replay_http(url, items, slo, vocab, drain_s, seed, admin_token))
    after = _pool_counters(url, admin_token)
    s = summarize(r["records"])
    wall = r["wall_s"]
    res = {"rate": rate, "requests": len(items), "slo": s.to_dict(), "wall_s": wall,
           "responses": r["responses"], "goodput_rps": sum(x.attained() for x in r["records"]) / wall}
    if "events" in r:
        res["events"] = r["events"]
    if before and after and "samples" in r:
        res["windows"] = windows(r["records"], r["samples"], before, after, r["t0"], wall)
    if before and after:
        steps = after["steps"] - before["steps"]
        if after.get("cost_model"):  # what the pool's cost model learned by the end of the point
            res["cost_model"] = after["cost_model"]
        res.update(steps=steps, steps_per_s=steps / wall, switches_per_s=(after["switches"] - before["switches"]) / wall,
                   kv_swapped_out=after["kv_swapped_out"] - before["kv_swapped_out"],
                   timing=where_time_went(before, after, wall, after["engines"]))
        # which models the steps went to: the order of turns shows here when two runs step alike in all (the
        # pipeline across models served 41% where the default served 94% with the same device time a token)
        ms0 = before.get("model_steps", {})
        res["steps_per_model"] = {m: n - ms0.get(m, 0) for m, n in sorted(after.get("model_steps", {}).items())}
        res["priced"] = engine_over_priced(before.get("model_priced", {}), after.get("model_priced", {}))
        if len(after["per_engine"]) > 1:  # each GPU's share: which models it carried, how busy it was
            res["per_engine"] = {eid: {"models": a["models"], "models_before": before["per_engine"].get(eid, {}).get(
                "models"), **where_time_went(before["per_engine"].get(eid, {}), a, wall, 1)}
                for eid, a in after["per_engine"].items()}
    return res


def warm_up(url: str, names: list[str], vocab: int) -> None:
    """One short request per model (host copies attached, kernels compiled, graphs captured): not measured."""
    wu = [WorkItem(0.0, n, 32, 4, f"warmup-{n}") for n in names]
    asyncio.run(replay_http(url, wu, ModelSLO(1e9, 1e9), vocab, drain_s=600.0, seed=12345))


def summarize_points(out: dict, target: float) -> dict:
    first = out["config"]["rate_per_model"]
    out["sweep"] = {p: sorted(pts, key=lambda x: x["rate"]) for p, pts in out["sweep"].items()}
    out["policies"] = {p: x for p, pts in out["sweep"].items() for x in pts if x["rate"] == first}
    out["sustained"] = {p: bracket([(x["rate"], x["slo"]["attainment"]) for x in pts], target)
                        for p, pts in out["sweep"].items()}
    out["ratios"] = bound_ratios(out["sustained"], target)
    return out


def run_serve(models: str = "4x7b,6x1.5b", rate: float | str | list = 0.1, duration: float = 120.0,
              slo_ttft: float = 10.0, slo_tpot: float = 0.1, gpu_budget_gb: float | None = 60.0,
              kv_cache_gb: float | None = 4.0, policies=("token",), seed: int = 0, json_out: Path | str | None = None,
              drain_s: float = 60.0, url: str | None = None, admin_token: str | None = None, target: float = 0.9,
              stop_at_miss: bool = False, cache_dir: str | Path | None = None,
              model_dirs: dict | None = None, device: str = "cuda", cpu_budget_gb: float = 8.0,
              admission: bool = True, workdir: Path | None = None, say=print) -> dict:
    """Each policy at each rate through the HTTP API. With `url`, the running server there is measured (its
    models, its policy) and `models`/`policies` are ignored; else a server is started per policy (models made
    as `bench pool --real` makes them) and every rate of that policy runs on it, one after another."""
    import tempfile

    from controller.keys import hash_key
    from load_tests.live_server import LiveServer
    from model_swapper.host_cache import HostModelCache

    rates = parse_rates(rate)
    slo = ModelSLO(slo_ttft, slo_tpot)
    out = {**header(), "mode": "serve", "config": {
        "models": models, "rate_per_model": rates[0], "rates_per_model": rates, "duration_s": duration,
        "drain_s": drain_s, "slo_ttft_s": slo_ttft, "slo_tpot_s": slo_tpot, "gpu_budget_gb": gpu_budget_gb,
        "kv_region_gb": kv_cache_gb, "seed": seed, "target_attainment": target, "admission": admission,
        "url": url, "note": __doc__.split("\n\n")[1].replace("\n", " ")}, "sweep": {}}
    if url is not None:
        names = [m["id"] for m in httpx.get(url + "/v1/models", timeout=30).json()["data"]]
        out["config"]["models"] = names
        vocab = 256  # ids below every real tokenizer's size
        for r in rates:
            res = run_point(url, admin_token, names, r, slo=slo, duration=duration, drain_s=drain_s, seed=seed,
                            vocab=vocab)
            out["sweep"].setdefault("server", []).append(res)
            # the server's arena and KV region per GPU (as its engines report them after the point: the KV region
            # is carved at the first registration), not this command's defaults; unknown: None
            vram = {(v["budget_bytes"] / 1e9, v["kv_bytes"] / 1e9) for e in (
                    _admin(url, admin_token, "/admin/engines") if admin_token else [])
                    if e["alive"] and (v := (e.get("pool") or {}).get("vram"))}
            out["config"]["gpu_budget_gb"], out["config"]["kv_region_gb"] = (
                vram.pop() if len(vram) == 1 else (None, None))
            summarize_points(out, target)
            write_json(Path(json_out) if json_out else None, out)
        return out
    entries = parse_models(models)
    dirs = ({e.name: Path(model_dirs[e.size]) for e in entries} if model_dirs
            else make_models(entries, Path(cache_dir).expanduser() if cache_dir else bench_models_dir(), say))
    vocab = min(_vocab(d) for d in set(dirs.values()))
    ns = f"bench-serve-{uuid.uuid4().hex[:8]}"
    # this process holds the host copies across the servers of the policies (loaded once, not per server)
    import torch

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    cache = HostModelCache(0.9, namespace=ns)
    t = time.perf_counter()
    for d in sorted(set(dirs.values())):
        cache.get(d, dtype)
    out["host_cache_load_s"] = time.perf_counter() - t
    token = "bench-admin-" + uuid.uuid4().hex
    work = Path(workdir or tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        for p in policies:
            cfg = server_config(dirs, policy=p, slo=slo, gpu_budget_gb=gpu_budget_gb, kv_cache_gb=kv_cache_gb,
                                namespace=ns, admin_hash=hash_key(token), device=device, cpu_budget_gb=cpu_budget_gb,
                                admission=admission)
            t = time.perf_counter()
            with LiveServer(cfg, work / p, ready_timeout=900) as srv:
                warm_up(srv.url, list(dirs), vocab)
                say(f"{p}: server up and warm in {time.perf_counter() - t:.1f}s")
                for r in rates:
                    res = run_point(srv.url, token, list(dirs), r, slo=slo, duration=duration, drain_s=drain_s,
                                    seed=seed, vocab=vocab)
                    out["sweep"].setdefault(p, []).append(res)
                    summarize_points(out, target)
                    s = res["slo"]
                    say(f"{p:8s} rate={r:g}/s/model attainment={s['attainment']:.3f} mean-rule="
                        f"{s['attainment_mean_rule']:.3f} min-model={min(s['per_model'].values(), default=0):.3f} "
                        f"TTFT p50/p99={s['ttft_p50'] or 0:.2f}/{s['ttft_p99'] or 0:.2f}s max-gap p99="
                        f"{s['max_gap_p99'] or 0:.2f}s steps/s={res.get('steps_per_s', 0):.1f} "
                        f"switches/s={res.get('switches_per_s', 0):.1f} responses={res['responses']}")
                    if res.get("timing"):
                        say("  " + " ".join(f"{k}={v:.3g}" for k, v in res["timing"].items()
                                            if isinstance(v, (int, float))))
                        if res["timing"]["round_terms"]:
                            rt = res["timing"]["round_terms"]
                            say("  rounds: " + " ".join(f"{k}={v:.3g}" for k, v in rt.items() if k != "bound")
                                + " bound " + " ".join(f"{k}={v:.2f}" for k, v in rt["bound"].items()))
                        if res["timing"]["turn_ends"]:
                            te = res["timing"]["turn_ends"]
                            say(f"  turns ended: {te['turns']} " + " ".join(f"{k}={te[k]:.3f}" for k in TURN_ENDS))
                        for kind, ph in res["timing"]["step_phases"].items():
                            say(f"  {kind:7s} " + " ".join(f"{k}={v:.3g}" for k, v in ph.items()))
                    if res.get("priced") and res["priced"]["engine_over_priced"] is not None:
                        pr = res["priced"]
                        say(f"  engine/priced all={pr['engine_over_priced']:.3g} " + " ".join(
                            f"{g}={v:.3g}" for g, v in pr["by_size"].items() if v is not None))
                    write_json(Path(json_out) if json_out else None, out)
                    if stop_at_miss and s["attainment"] < target:
                        break
                    _wait_idle(srv.url, token)
    finally:
        cache.close()
    return out


def _vocab(d: Path) -> int:
    """Token ids every part accepts: below both the model's vocabulary and its tokenizer's (the server checks
    prompt ids against the tokenizer)."""
    from transformers import AutoTokenizer

    from model_swapper.model_config import ModelConfig

    return min(ModelConfig.from_pretrained(d).vocab_size, len(AutoTokenizer.from_pretrained(str(d))))


def _wait_idle(url: str, token: str, timeout: float = 120.0) -> None:
    """Between points on one server: until no request is in flight (a point's leftovers do not load the next)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(e["inflight"] == 0 for e in _admin(url, token, "/admin/engines") if e["alive"]):
            return
        time.sleep(0.5)
