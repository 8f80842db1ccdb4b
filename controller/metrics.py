"""Prometheus metrics (`tokenpool_` prefix), on a registry owned by the app (no module-level collectors).

Named as vLLM names its own (`vllm:` -> `tokenpool_`) where there is a counterpart: counters end in `_total`,
durations are `_seconds` histograms, fractions are `_ratio` gauges; no gauge ends in `_total` (Prometheus keeps it
for counters; `tokenpool_kv_blocks_total`, the old name of `tokenpool_kv_blocks`, is exported until the next
release). Request metrics are recorded as requests finish (the controller: status, tokens, TTFT/TPOT/e2e; the
serving layer: finish reason, queue/prefill/decode time, prompt and generation length); engine gauges are refreshed
from worker Stats messages; GPU memory and utilization are read at scrape time from gpu_pool.inventory when present.
"""

from __future__ import annotations

import logging

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger("tokenpool.metrics")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class _GPUCollector:
    """GPU memory and utilization from gpu_pool.inventory.list_devices(), if that module is available.

    Only NVIDIA devices (kind "cuda"): a host without one has no GPU series, rather than its CPU and RAM reported
    as GPU 0 (list_devices' fallback). NVML's utilization is a whole percent (0-100), so 1 is 0.01, not 1.0."""

    def collect(self):
        try:
            from gpu_pool.inventory import list_devices
        except ImportError:
            return
        mem_used = GaugeMetricFamily("tokenpool_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"])
        mem_total = GaugeMetricFamily("tokenpool_gpu_memory_total_bytes", "GPU memory", labels=["gpu"])
        util = GaugeMetricFamily("tokenpool_gpu_utilization_ratio", "GPU busy fraction (0-1)", labels=["gpu"])
        try:
            devices = list_devices(cpu_fallback=False)
        except Exception as e:  # noqa: BLE001 - no driver / no GPU: no GPU metrics
            log.debug("list_devices failed: %s", e)
            return
        for d in devices:
            if d.kind != "cuda":
                continue
            idx = str(d.index)
            mem_used.add_metric([idx], float(d.memory_used))
            mem_total.add_metric([idx], float(d.memory_total))
            if d.utilization is not None:
                util.add_metric([idx], float(d.utilization) / 100.0)
        yield from (mem_used, mem_total, util)


class Metrics:
    def __init__(self) -> None:
        # No `<name>_created` series beside each counter and histogram (vLLM turns them off too): they doubled the
        # series a scrape returns. (prometheus_client's switch is process-wide; this process's metrics are these.)
        disable_created_metrics()
        self.registry = r = CollectorRegistry(auto_describe=True)
        # (the dashboard's Tenants view takes its requests/s from this: an Ollama load that succeeded, a client
        # warming a model, inflated it with requests that made nothing for anyone: see request_finished)
        self.requests = Counter("tokenpool_requests_total", "Finished API requests, by status; an Ollama load "
                                "request (nothing to generate: only the model's weights brought in) only if it "
                                "failed (tokenpool_load_requests_total counts each taken on)", ["model", "tenant", "status"],
                                registry=r)
        self.load_requests = Counter("tokenpool_load_requests_total", "Ollama load requests (POST /api/generate or "
                                     "/api/chat with no prompt or messages) that were taken on, by status: 200 the "
                                     "model's weights are in; any other a load that failed (also in "
                                     "tokenpool_requests_total), 499 its client left", ["model", "tenant", "status"],
                                     registry=r)
        self.prompt_tokens = Counter("tokenpool_prompt_tokens_total", "Prompt tokens processed", ["model", "tenant"],
                                     registry=r)
        self.generation_tokens = Counter("tokenpool_generation_tokens_total", "Tokens generated", ["model", "tenant"],
                                         registry=r)
        self.lora_requests = Counter("tokenpool_lora_requests_total", "Finished API requests for a LoRA adapter "
                                     "(also counted under its model)", ["model", "lora", "status"], registry=r)
        self.lora_generation_tokens = Counter("tokenpool_lora_generation_tokens_total", "Tokens generated with a LoRA "
                                              "adapter", ["model", "lora"], registry=r)
        self.ttft = Histogram("tokenpool_time_to_first_token_seconds", "Time to first token", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("tokenpool_time_per_output_token_seconds", "Mean time per output token after the first",
                              ["model"], buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("tokenpool_e2e_request_latency_seconds", "Request latency, arrival to last token",
                             ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("tokenpool_admission_rejections_total", "Requests refused by admission control",
                                ["model", "reason"], registry=r)
        self.queue_depth = Gauge("tokenpool_queue_depth", "Requests waiting for their first token",
                                 ["engine", "model"], registry=r)
        self.running = Gauge("tokenpool_running_requests", "Requests being decoded", ["engine", "model"], registry=r)
        self.kv_used = Gauge("tokenpool_kv_blocks_used", "KV cache blocks in use", ["engine", "model"], registry=r)
        self.kv_blocks = Gauge("tokenpool_kv_blocks", "KV cache blocks (capacity)", ["engine", "model"], registry=r)
        # The same gauge under its old name, whose `_total` suffix Prometheus keeps for counters: exported for one
        # more release beside tokenpool_kv_blocks, then removed
        self.kv_total = Gauge("tokenpool_kv_blocks_total", "Deprecated (removed in the next release): use "
                              "tokenpool_kv_blocks, the same value. KV cache blocks", ["engine", "model"], registry=r)
        self.swaps = Gauge("tokenpool_swapped_requests", "Requests whose KV is swapped out", ["engine", "model"],
                           registry=r)
        self.swap_total = Counter("tokenpool_model_swaps_total", "Weight loads into an engine's VRAM (pooled engine)",
                                  ["engine"], registry=r)
        self.switches = Counter("tokenpool_model_switches_total", "Steps whose model differs from the previous step's",
                                ["engine"], registry=r)
        self.swap_latency = Histogram("tokenpool_model_swap_latency_seconds",
                                      "Step stall waiting for a model's weights at a switch (0 when prefetched)",
                                      ["engine"], buckets=LATENCY_BUCKETS, registry=r)
        self.step = Gauge("tokenpool_engine_step_seconds", "Smoothed engine step time", ["engine"], registry=r)
        self.engines = Gauge("tokenpool_engines", "Engine workers by state", ["state"], registry=r)
        self.engine_restarts = Counter("tokenpool_engine_restarts_total", "Engine workers restarted", registry=r)
        self.replicas = Gauge("tokenpool_model_replicas", "Engines holding each model", ["model"], registry=r)
        self.slo_attainment = Gauge("tokenpool_slo_attainment_ratio",
                                    "Fraction of recent requests within TTFT and TPOT SLO", ["model"], registry=r)
        self.event_stream_cpu = Counter("tokenpool_event_stream_cpu_seconds", "CPU time of the admin event streams' "
                                        "writer: snapshots built, events encoded, written to every open stream "
                                        "(what open dashboards cost, less the kernel's work after the writes)",
                                        registry=r)
        # --- per finished request (OpenAIServing.record) ---
        self.request_success = Counter("tokenpool_request_success_total", "Finished choices by finish reason "
                                       "(stop, length, abort, error)", ["model", "finished_reason"], registry=r)
        self.queue_time = Histogram("tokenpool_request_queue_time_seconds", "Arrival until an engine has the "
                                    "request (admission, routing, model load)", ["model"], buckets=LATENCY_BUCKETS,
                                    registry=r)
        self.prefill_time = Histogram("tokenpool_request_prefill_time_seconds", "Handed to an engine until the "
                                      "first token (the engine's queue and the prefill)", ["model"],
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.decode_time = Histogram("tokenpool_request_decode_time_seconds", "First token until the last",
                                     ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_len = Histogram("tokenpool_request_prompt_tokens", "Prompt tokens per request", ["model"],
                                    buckets=TOKEN_BUCKETS, registry=r)
        self.cache_queries = Counter("tokenpool_prefix_cache_queries_total", "Prompt tokens of finished requests "
                                     "(vLLM's prefix-cache queries)", ["model"], registry=r)
        self.cache_hits = Counter("tokenpool_prefix_cache_hits_total", "Of those, tokens whose KV was found in the "
                                  "prefix cache", ["model"], registry=r)
        self.generation_len = Histogram("tokenpool_request_generation_tokens", "Generated tokens per request "
                                        "(all choices)", ["model"], buckets=TOKEN_BUCKETS, registry=r)
        # --- engine state, from worker Stats ---
        self.kv_usage = Gauge("tokenpool_kv_cache_usage_ratio", "KV cache blocks in use / blocks (0-1)",
                              ["engine", "model"], registry=r)
        self.preemptions = Counter("tokenpool_num_preemptions_total", "Requests preempted (KV swapped to host, or dropped to be recomputed where the host pages are full)",
                                   ["engine", "model"], registry=r)
        self.kv_dropped = Counter("tokenpool_kv_dropped_total", "Of those preemptions, requests whose KV was dropped "
                                  "(the host KV pages full), to be recomputed when they resume", ["engine", "model"],
                                  registry=r)
        # the engine's cumulative counts each counter was last given: (engine, model, stats key) -> count
        self._seen: dict[tuple[str, str, str], float] = {}
        r.register(_GPUCollector())

    def request_finished(self, model: str, tenant: str, status: int, load: bool = False) -> None:
        """An API request that became a generation has ended with `status` (Controller.finished). `load`: Ollama's
        load request (Controller.generate's `load`), counted among the loads; among the requests only when it failed,
        as any failure is (a 503 of a model whose load fails is one a client met), not when it loaded the model:
        it served nobody, and a client that warms each model before use doubled its requests/s. (A load refused
        before it was taken on, a tenant's 429 of its rates, is a refusal: Controller.count_refusal.)"""
        if load:
            self.load_requests.labels(model, tenant, str(status)).inc()
            if status == 200:
                return
        self.requests.labels(model, tenant, str(status)).inc()

    def request_done(self, model: str, finish_reasons: list[str | None], prompt_tokens: int, generation_tokens: int,
                     queue_s: float | None, prefill_s: float | None, decode_s: float | None,
                     cached_tokens: int = 0) -> None:
        """One API request has ended (its choices' finish reasons; None: cut short, counted as abort)."""
        for fr in finish_reasons:
            self.request_success.labels(model, fr or "abort").inc()
        self.prompt_len.labels(model).observe(prompt_tokens)
        self.cache_queries.labels(model).inc(prompt_tokens)
        self.cache_hits.labels(model).inc(cached_tokens)
        self.generation_len.labels(model).observe(generation_tokens)
        for h, v in ((self.queue_time, queue_s), (self.prefill_time, prefill_s), (self.decode_time, decode_s)):
            if v is not None:
                h.labels(model).observe(max(0.0, v))

    def engine_stats(self, engine: str, model: str, s: dict[str, float]) -> None:
        self.queue_depth.labels(engine, model).set(s.get("num_waiting", 0))
        self.running.labels(engine, model).set(s.get("num_running", 0))
        used, total = s.get("kv_blocks_used", 0), s.get("kv_blocks_total", 0)
        self.kv_used.labels(engine, model).set(used)
        self.kv_blocks.labels(engine, model).set(total)
        self.kv_total.labels(engine, model).set(total)
        self.kv_usage.labels(engine, model).set(used / total if total else 0.0)
        self.swaps.labels(engine, model).set(s.get("num_swapped", 0))
        for counter, key in ((self.preemptions, "num_preemptions"), (self.kv_dropped, "num_kv_dropped")):
            if key in s:  # cumulative in the engine: the counter takes what is new
                seen = self._seen.get((engine, model, key), 0.0)
                n = float(s[key])
                counter.labels(engine, model).inc(n - seen if n >= seen else n)  # a restarted engine counts anew
                self._seen[engine, model, key] = n
            else:
                counter.labels(engine, model).inc(0)  # the series exists from the model's first Stats

    def forget_engine_model(self, engine: str, model: str) -> None:
        for g in (self.queue_depth, self.running, self.kv_used, self.kv_blocks, self.kv_total, self.kv_usage,
                  self.swaps, self.preemptions, self.kv_dropped):
            try:
                g.remove(engine, model)
            except KeyError:
                pass
        for key in ("num_preemptions", "num_kv_dropped"):
            self._seen.pop((engine, model, key), None)

    def forget_model(self, model: str) -> None:
        """The gauges of a model no longer served (its counters stay: series by name since the start)."""
        for g in (self.replicas, self.slo_attainment):
            try:
                g.remove(model)
            except KeyError:
                pass

    def forget_engine(self, engine: str, models: list[str]) -> None:
        """Every series of a pruned engine (its per-model gauges, step, loads, switches)."""
        for model in models:
            self.forget_engine_model(engine, model)
        for m in (self.step, self.swap_total, self.switches, self.swap_latency):
            try:
                m.remove(engine)
            except KeyError:
                pass

    def render(self) -> bytes:
        return generate_latest(self.registry)
