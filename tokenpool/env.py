"""Every environment variable tokenpool reads: its name, default and meaning. Read here and nowhere else.

The package sits below every other and imports only the standard library, so every layer may read it (the
CLI and the operator too, without importing torch). Values are read when asked for, not at import, so one set
before the reader runs is seen. Typer options that name an `envvar` (controller/cli.py) take the names from
here, so this file is the whole list.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Var:
    name: str
    default: str | None
    meaning: str
    kind: str = "text"  # "int" or "number": `problem` checks the value parses (`tokenpool serve` refuses to start)
    choices: tuple[str, ...] = ()

    def get(self) -> str | None:
        """The value, or the default when unset (an empty value is a value)."""
        return os.environ.get(self.name, self.default)

    def on(self) -> bool:
        """A switch: anything but "0" is on."""
        return self.get() != "0"

    def checked(self) -> str | None:
        """The value, after `problem`'s check (ValueError naming the variable)."""
        if (p := self.problem()) is not None:
            raise ValueError(p)
        return self.get()

    def integer(self) -> int:
        """An "int" variable's value (ValueError naming the variable when it is not one)."""
        return int(self.checked())

    def number(self) -> float:
        """A "number" variable's value (ValueError naming the variable when it is not one)."""
        return float(self.checked())

    def problem(self) -> str | None:
        """What is wrong with the value set, or None (unset: the default is right)."""
        v = os.environ.get(self.name)
        if v is None or (v == "" and self.default is None):  # (an optional variable set empty: unset)
            return None
        try:
            {"int": int, "number": float}.get(self.kind, str)(v)
        except ValueError:
            want = "an integer" if self.kind == "int" else "a number"
            return f"{self.name}={v!r} is not {want} (default {self.default}: {self.meaning})"
        if self.choices and v not in self.choices:
            return f"{self.name}={v!r} is not one of {', '.join(self.choices)} ({self.meaning})"
        return None


CACHE = Var("TOKENPOOL_CACHE", None, "where the embedded demo's models are made (empty/unset: "
            "~/.cache/tokenpool/models)")
SHM_DIR = Var("TOKENPOOL_SHM_DIR", "/dev/shm", "where the node-shared pinned host regions live (a bigger "
              "tmpfs or hugetlbfs)")
GEMV = Var("TOKENPOOL_GEMV", "1", "0: one-token steps (and small batches) through cuBLAS instead of the Triton "
           "GEMVs (A/B runs)")
GEMV_GLU = Var("TOKENPOOL_GEMV_GLU", "1", "one-token steps do SiLU*mul in the gate_up GEMV's epilogue, down then a "
               "plain GEMV (bit-identical; see llama.py); 0: in down's prologue (A/B runs)")
MEGAKERNEL = Var("TOKENPOOL_MEGAKERNEL", "0", "1: batch-1 decode steps of the models it takes (Hopper, bf16, head_dim 128, "
                 "no q/k norm or sliding window) run as one persistent CUDA kernel, weights streamed into shared memory "
                 "ahead of each layer's dependencies (token_scheduler/model/megakernel.py)")
GEMV_ROWS = Var("TOKENPOOL_GEMV_ROWS", "0", "steps of up to this many tokens (at most 32) run their projections "
                "as Triton GEMVs too (the small-batch kernels; off: slower than cuBLAS until tuned, see llama.py)",
                kind="int")
GEMV_ROWS_MLP = Var("TOKENPOOL_GEMV_ROWS_MLP", "1", "with TOKENPOOL_GEMV_ROWS: 0 keeps the MLP's gate_up and down on "
                    "cuBLAS, only qkv and o through the small-batch kernels (A/B runs; see llama.py)")
GEMV_ROWS_PERSIST = Var("TOKENPOOL_GEMV_ROWS_PERSIST", "0", "with TOKENPOOL_GEMV_ROWS: the small-batch kernels on a "
                        "persistent grid of this many programs an SM (0: one program a tile; measured slower than cuBLAS, "
                        "see triton_gemv.py)", kind="int")
TMA_ROWS = Var("TOKENPOOL_TMA_ROWS", "32", "decode steps of 2 to this many sequences run their projections as Triton "
               "GEMMs fed by TMA, launched with programmatic dependent launch (Hopper and later; see "
               "token_scheduler/model/triton_tma.py); 0: cuBLAS", kind="int")
ATTN_ROPE = Var("TOKENPOOL_ATTN_ROPE", "1", "batched decode steps on cuBLAS do RoPE and the KV write inside the "
                "paged-decode attention kernel (one launch a layer fewer; 1-3% on the H200, see llama.py); 0: off")
ATTN_BLOCKS_PER_ITER = Var("TOKENPOOL_ATTN_BLOCKS_PER_ITER", "4", "cache blocks the Triton paged-decode kernel "
                           "reads an iteration (1, 2, 4 or 8; see token_scheduler/model/triton_decode.py)", kind="int")
ATTN_PREFETCH = Var("TOKENPOOL_ATTN_PREFETCH", "1", "a decode step's paged-decode attention launched with programmatic "
                    "dependent launch (batch 1) loads its first cache tile before waiting on the qkv projection "
                    "(see token_scheduler/model/triton_decode.py); 0: off")
ATTN_PIPE = Var("TOKENPOOL_ATTN_PIPE", "0", "the paged-decode attention loads each cache tile's block ids an iteration "
                "ahead, so its K/V copies are double-buffered (see token_scheduler/model/triton_decode.py); 1: on")
ROWWISE_PREFILL_MAX = Var("TOKENPOOL_ROWWISE_PREFILL_MAX", str(1 << 22), "on CUDA, a prefill chunk of tokens x context up "
                          "to this runs row by row through the batched decode attention, longer ones one SDPA each "
                          "(token_scheduler/runner.py; A/B runs)", kind="int")
PREFILL_GRAPHS = Var("TOKENPOOL_PREFILL_GRAPHS", "1024", "prefill and mixed steps of up to this many rows (and ~2.6 "
                     "TFLOP) that go row by row replay row graphs (0: all eagerly; token_scheduler/runner.py "
                     "ROW_BUCKETS; A/B runs)", kind="int")
PDL = Var("TOKENPOOL_PDL", "1", "0: launch kernels without programmatic dependent launch (A/B runs)")
PDL_EARLY = Var("TOKENPOOL_PDL_EARLY", "1", "one-row steps' kernels under programmatic dependent launch let the next "
                "one in before they wait on the one before (token_scheduler/model/triton_ops.py PDL_EARLY; 0: after)")
STEP_IO = Var("TOKENPOOL_STEP_IO", "1", "a CUDA decode step's inputs uploaded by one Triton kernel, its logits kept "
              "in the model dtype, its sampled ids written to pinned memory by a kernel (see token_scheduler/runner.py "
              "STEP_IO; 0: the copies as before, for A/B runs)")
GRAPH_HOMES = Var("TOKENPOOL_GRAPH_HOMES", "1", "0: weight slots placed by best fit alone, not at offsets their size "
                  "held before, where the CUDA graphs captured for it replay (A/B runs)")
GRAPH_CAP = Var("TOKENPOOL_GRAPH_CAP", "96", "CUDA graphs kept per model shape (their logits live outside the arena); "
                "over it, a capture evicts the least recently replayed one (token_scheduler/runner.py GRAPH_CAP)",
                kind="int")
GPU_LORAS = Var("TOKENPOOL_GPU_LORAS", "8", "LoRA adapter slots a model has on its device (vLLM's --max-loras): a "
                "step over up to this many adapters replays a CUDA graph; an adapter not held takes the least recently "
                "used slot; a step asking for more adds their deltas one by one on the eager forward",
                kind="int")
WORKER_BURST_S = Var("TOKENPOOL_WORKER_BURST_S", "0.05", "the longest run of steps a worker's step thread makes "
                     "without a look at its event loop (0: one step a hand-off; A/B runs)", kind="number")
GRAPH_PRECAPTURE = Var("TOKENPOOL_GRAPH_PRECAPTURE", "0", "1: a pooled engine captures every CUDA-graph bucket of a "
                       "model shape at its first load (compiles and warm-up forwards then, not under load; A/B runs)")
PLAN_AHEAD = Var("TOKENPOOL_PLAN_AHEAD", "1", "a pooled engine plans step N+1 while step N's forward runs (in its "
                 "on_launch) and uses that plan when it is still valid at N+1, else plans as usual (0: off, for A/B "
                 "runs)")
PIPELINE = Var("TOKENPOOL_PIPELINE", "1", "a pooled engine launches a model's next decode step before reading the "
               "one in flight when the early plan (plan-ahead: off, no pipeline either) is exactly its continuation; "
               "anything else completes the step in flight first (0: every step read before the next, for A/B runs)")
CO_STEP = Var("TOKENPOOL_CO_STEP", "1", "a pooled engine launches another model's decode step beside the one in "
              "flight, on a second CUDA stream with graphs of its own (two models' small steps fill each other's "
              "kernel boundaries), and the token policy pairs turns so there is one to launch (0: off, for A/B runs)")
CO_STEP_DEEP = Var("TOKENPOOL_CO_STEP_DEEP", "1", "with TOKENPOOL_CO_STEP: a pooled engine keeps both co-stepped "
                   "models' steps in flight, one a stream, and queues each model's next step behind its own before "
                   "reading the older, so the device never waits for the host between two models' steps (0: one "
                   "step in flight past a step call, for A/B runs)")
PIPELINE_LEARN = Var("TOKENPOOL_PIPELINE_LEARN", "interval", "what the cost model learns of a pipelined step "
                     "(TOKENPOOL_PIPELINE): interval (between completions, less the caller's time; not under the "
                     "device's), device (the device's time alone, CUDA events) or none (not learned: such steps are "
                     "priced by the fit of the steps read at once; A/B runs)", choices=("interval", "device", "none"))
STEP_TRACE = Var("TOKENPOOL_STEP_TRACE", None, "a file a pooled engine appends each step's timing sample to, as CSV "
                 "(model, kind, seqs, new tokens, context tokens, seconds learned or measured, device seconds, the "
                 "caller's gap, whether learned): a diagnostic for A/B runs")
TIME_STEPS = Var("TOKENPOOL_TIME_STEPS", "0", "1: a pooled engine times each step's device work with CUDA events (the "
                 "graph replay or eager forward and its sampling; a pipelined step from its replay's launch or the "
                 "step before's end, whichever is later): bench serve's step_phases dev_ms and "
                 "decode_device_busy_frac. A diagnostic for A/B runs: two events and a read a step")
POLICY_OPTIONS = Var("TOKENPOOL_POLICY_OPTIONS", None, "a JSON object of the policy's options for servers whose "
                     "configuration sets no gpus.policy_options (e.g. '{\"need_margin_s\": 2.0}'; A/B runs)")
NEED_KEEP_TURNS = Var("TOKENPOOL_NEED_KEEP_TURNS", "0", "1: a deadline-rule round whose margin, shrunk to fit under its "
                      "cap, leaves no model a turn keeps the last margin that had turns, instead of pace quotas whose "
                      "round nothing caps (token policy, TokenConfig.need_keep_turns; A/B runs)")
SWITCH_INTERVAL_S = Var("TOKENPOOL_SWITCH_INTERVAL_S", None, "a worker's sys.setswitchinterval (unset: Python's 0.005 "
                        "s): how long a thread that wants the GIL waits before the holder is asked to drop it (A/B runs)",
                        kind="number")
GC_YOUNG = Var("TOKENPOOL_GC_YOUNG", None, "the serving processes' young-generation collection threshold (unset: "
               "50000, or Python's if higher; controller/heap.py; A/B runs)", kind="int")
WORKER_DRAIN_S = Var("TOKENPOOL_WORKER_DRAIN_S", "45", "a remote worker's drain on SIGTERM (python -m controller.worker "
                     "--drain-grace-s): how long its requests in flight get to finish before they are handed to another "
                     "engine or ended; it exits at most 5 s later (keep the sum under a pod's "
                     "terminationGracePeriodSeconds; the operator's workers: GPUPool spec.drainGraceSeconds sets both, "
                     "the pod's 15 s over it, 60 s unset)", kind="number")
JOIN_TOKEN = Var("TOKENPOOL_JOIN_TOKEN", None, "a worker's join token (the controller sets it for the "
                 "local workers it starts)")
ADMIN_TOKEN = Var("TOKENPOOL_ADMIN_TOKEN", None, "the controller's admin token (tokenpool ps/admin commands, "
                  "the operator)")
ADMIN_TOKEN_FILE = Var("TOKENPOOL_ADMIN_TOKEN_FILE", None, "a file holding it (the operator, when "
                       "TOKENPOOL_ADMIN_TOKEN is unset)")
API_KEY = Var("TOKENPOOL_API_KEY", None, "a tenant key the client commands send (tokenpool run, ls, show, pull, loadtest)")
URL = Var("TOKENPOOL_URL", "http://127.0.0.1:8000", "the server the client commands talk to (tokenpool run, ls, ps, "
          "show, stop, pull, loadtest), as Ollama's OLLAMA_HOST: host:port, a URL, or an OpenAI client's base URL ending in /v1")
CONTROLLER_URL = Var("TOKENPOOL_CONTROLLER_URL", "http://tokenpool-controller:8000",
                     "the controller the operator reconciles into")
OPERATOR_RESYNC_S = Var("TOKENPOOL_OPERATOR_RESYNC_S", "30", "seconds between the operator's timer reconciles",
                        kind="number")
POD_NAMESPACE = Var("POD_NAMESPACE", None, "the operator's own namespace (Kubernetes downward API): watched "
                    "when no --namespace is given")
KUBECONFIG = Var("KUBECONFIG", None, "the operator outside a cluster: the first file of this list")
CUDA_VISIBLE_DEVICES = Var("CUDA_VISIBLE_DEVICES", None, "the GPUs CUDA shows a process (indices or GPU-UUIDs; "
                           "empty: none): the controller's count of them for workers.local auto reads it as torch "
                           "would (controller/pool.py local_devices)")
PYTHONPATH = Var("PYTHONPATH", None, "kept for the local workers the controller starts, after the repository")


def problems() -> list[str]:
    """What is wrong with the variables set here (a typed one that does not parse, a value out of its choices)."""
    return [p for v in globals().values() if isinstance(v, Var) and (p := v.problem()) is not None]


def environ_with(**values: str) -> dict[str, str]:
    """The environment for a child process: this one's, with `values` set."""
    return {**os.environ, **values}
