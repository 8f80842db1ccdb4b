"""The fault and load suite of issue 16: each part drives a live `tokenpool serve` and returns a JSON-able dict.

    tokenpool suite corpus|fuzz|kill|disconnects|overload|soak [--url URL --admin-token T --key K] [--json F]

Without --url a part starts its own server on loopback (CPU, paced models: `engine: {kind: pace}`, `path:
null`) and stops it after; with --url it drives that server (loopback only: the kill and soak parts signal and
read processes on this machine). Every result carries date, commit and command (load_tests.bench_common).

  corpus       a fixed list of bad requests, each with the status it must get; every error OpenAI JSON
  fuzz         schemathesis over the server's own OpenAPI, with the tenant key (and admin token) and without
  kill         a worker SIGKILLed (or SIGSTOPped) mid-stream: error event latency, queued requests retried,
               restart time, leaked processes and /dev/shm files
  disconnects  N streams dropped after their first token: time until the engine holds nothing for them
  overload     arrivals at `factor` x the measured capacity: 429 + Retry-After for the excess, TTFT of the rest
  soak         steady load for `duration` s: controller and worker RSS over time, errors
  dashboards   the controller's CPU time with and without open dashboards under load (load_tests/dashboard_cost.py)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlparse

import httpx

from load_tests import sse_client

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
SUITE_KEY, SUITE_ADMIN = "key-suite-0123456789abcdef", "admin-suite-0123456789abcdef"


@dataclass
class Target:
    url: str
    admin: str | None = None
    key: str | None = None
    model: str = "pace"
    server_pid: int | None = None
    shm_dir: Path | None = None  # the server's TOKENPOOL_SHM_DIR when it is ours (else /dev/shm, tokenpool* only)
    log_path: Path | None = None  # the server's log, when it is ours

    @property
    def host_port(self) -> tuple[str, int]:
        u = urlparse(self.url)
        return u.hostname or "127.0.0.1", u.port or 80

    def headers(self, key: bool = True) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if key and self.key else {}

    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin}"} if self.admin else {}

    def engines(self) -> list[dict]:
        r = httpx.get(self.url + "/admin/engines", headers=self.admin_headers(), timeout=10)
        r.raise_for_status()
        return r.json()

    def tenant_inflight(self) -> int:
        """The tenants' concurrency slots taken (max_concurrent counts them); 0 where the admin API has none."""
        r = httpx.get(self.url + "/admin/tenants", headers=self.admin_headers(), timeout=10)
        return sum(int(t.get("inflight", 0)) for t in r.json()) if r.status_code == 200 else 0

    def held(self, fresh_s: float = 10.0) -> dict[str, int]:
        """What the controller and the engines still hold: requests, KV blocks (all engines, all models) and the
        tenants' concurrency slots, as they are now: the engines' part comes with their Stats, so this waits (up
        to `fresh_s`) for a view every live engine took after the question (`pool.loop.t`, when its worker took
        it; a worker that does not say is read as it is). It used to read the last view, up to two heartbeats
        old: a zero taken before the requests started, or counts taken before they ended."""
        asked, deadline = time.time(), time.monotonic() + fresh_s
        while True:
            es = self.engines()
            if all(_taken(e) is None or _taken(e) >= asked for e in es if e["alive"]) or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        out = {"inflight": 0, "running": 0, "waiting": 0, "kv_blocks_used": 0, "tenant_inflight": self.tenant_inflight()}
        for e in es:
            if not e["alive"]:
                continue
            out["inflight"] += e["inflight"]
            for s in e["stats"].values():
                out["running"] += int(s.get("num_running", 0))
                out["waiting"] += int(s.get("num_waiting", 0))
                out["kv_blocks_used"] += int(s.get("kv_blocks_used", 0))
        return out


def _taken(e: dict) -> float | None:
    """When the engine's worker took the view /admin/engines shows (wall clock), if it says."""
    t = ((e.get("pool") or {}).get("loop") or {}).get("t")
    return float(t) if isinstance(t, (int, float)) else None


def paced_config(pace_s: float = 0.01, max_num_seqs: int = 64, ttft_s: float = 2.0, max_model_len: int = 4096,
                 **over) -> dict:
    from controller.keys import hash_key

    cfg = {
        "admin_token_hash": hash_key(SUITE_ADMIN),
        "tenants": [{"name": "suite", "key_hashes": [hash_key(SUITE_KEY)]}],
        "workers": {"local": "cpu", "heartbeat_s": 0.25, "dead_after_s": 1.5},
        "autoscaler": {"interval_s": 0.5},
        "shutdown_grace_s": 5,
        "models": [{"name": "pace", "slo": {"ttft_s": ttft_s, "tpot_s": max(0.05, 4 * pace_s)},
                    "engine": {"kind": "pace", "pace_s_per_token": pace_s, "max_num_seqs": max_num_seqs,
                               "max_model_len": max_model_len}}],
    }
    cfg.update(over)
    return cfg


def pooled_config(model_dirs: dict[str, str], budget_gb: float, kv_cache_gb: float,
                  max_num_seqs: int | None = None, **over) -> dict:
    """A server whose one worker pools `model_dirs` in an arena of `budget_gb` (the CPU worker's): more model
    bytes than the arena, so steps of different models move weights in and out, and a small KV region, so idle
    models' KV goes to host pages. `max_num_seqs`: each model's batch slots (unset: the served default)."""
    cfg = paced_config(**over)
    cfg["gpus"] = {"cpu_budget_gb": budget_gb, "kv_cache_gb": kv_cache_gb}
    engine = {} if max_num_seqs is None else {"engine": {"max_num_seqs": max_num_seqs}}
    cfg["models"] = [{"name": n, "path": str(d), "slo": {"ttft_s": 60.0, "tpot_s": 10.0}, **engine}
                     for n, d in model_dirs.items()]
    return cfg


def tiny_pooled_models(cache: Path) -> dict[str, str]:
    """Three tiny factory models of 2 MiB slots each (made once under `cache`)."""
    from controller.model_factory import make_model

    out = {}
    for name, arch, seed in (("pa", "qwen2", 0), ("pb", "qwen3", 0), ("pc", "qwen2", 1)):
        d = cache / f"suite-{arch}-tiny-{seed}"
        if not (d / "config.json").exists():
            make_model(arch=arch, size="tiny", out=d, seed=seed, dtype="fp32", device="cpu", progress=False)
        out[name] = str(d)
    return out


@contextlib.contextmanager
def target(url: str | None = None, admin: str | None = None, key: str | None = None, pid: int | None = None,
           model: str = "pace", config: dict | None = None, **cfg) -> Iterator[Target]:
    """The server a part drives: the one at `url`, or one started here with `config` (default: paced_config
    with `cfg` as its arguments)."""
    if url is not None:
        if urlparse(url).hostname not in LOOPBACK:
            raise SystemExit(f"refusing to drive {url}: loopback only")
        try:  # (nothing there: corpus and overload reported a run of connection errors, exit 0; others a traceback)
            httpx.get(url.rstrip("/") + "/health", timeout=30)
        except httpx.TransportError as e:
            raise SystemExit(f"cannot reach {url}: {e}") from None
        _check_model(url.rstrip("/"), model, key)
        # (no --admin-token: a local server's own, as `tokenpool ps` reads it; without it the corpus's admin cases
        # were 401s reported as failures against the embedded default)
        from controller.config import local_admin_token

        yield Target(url.rstrip("/"), admin if admin is not None else local_admin_token(url), key, model, pid)
        return
    from load_tests.live_server import LiveServer

    ready = config is None or config.get("workers", {}).get("local") != "none"
    shm_root = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="tokenpool-suite-") as d, \
            tempfile.TemporaryDirectory(prefix="tokenpool-suite-shm-", dir=shm_root) as shm, \
            _env(TOKENPOOL_SHM_DIR=shm), \
            LiveServer(config or paced_config(**cfg), Path(d), wait_ready=ready) as srv:
        if not ready:
            _wait_log(srv, "listening on")
        yield Target(srv.url, SUITE_ADMIN, SUITE_KEY, model, srv.proc.pid, Path(shm), srv.log_path)  # type: ignore[union-attr]


def _check_model(url: str, model: str, key: str | None) -> None:
    """A --url server must serve --model (default `pace`, the suite's own paced server's): said in one line, as
    `tokenpool loadtest` says it (`suite corpus --url` of the embedded default counted a 404 per case as its
    results and exited 0). A server that wants a key this run has none for is left to the part's own cases."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        r = httpx.get(f"{url}/v1/models/{quote(model, safe='/')}", headers=headers, timeout=30)
    except httpx.TransportError as e:
        raise SystemExit(f"cannot reach {url}: {e}") from None
    if r.status_code != 404:
        return
    try:
        served = [m["id"] for m in httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"]]
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        served = []
    raise SystemExit(f"{url} serves no model {model!r} (it serves {', '.join(served) or 'none'}): give --model")


@contextlib.contextmanager
def _env(**kv: str) -> Iterator[None]:
    """Environment for the server started inside (LiveServer copies os.environ when it starts)."""
    old = {k: os.environ.get(k) for k in kv}
    os.environ.update(kv)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _wait_log(srv, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in srv.log():
        if time.monotonic() > deadline or srv.proc.poll() is not None:
            raise RuntimeError(f"server did not start:\n{srv.log()}")
        time.sleep(0.1)


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 4)


def _summary(xs: list[float]) -> dict:
    return {"n": len(xs), "p50": _pct(xs, 0.5), "p99": _pct(xs, 0.99), "max": round(max(xs), 4) if xs else None}


def is_openai_error(body: bytes) -> bool:
    try:
        err = json.loads(body)["error"]
        return isinstance(err, dict) and {"message", "type", "param", "code"} <= set(err)
    except (ValueError, KeyError, TypeError):
        return False


def is_error_body(path: str, body: bytes) -> bool:
    """An error as the route's API writes it: Ollama's `{"error": "..."}` under /api/, Anthropic's `{"type": "error",
    "error": {"type", "message"}}` under /v1/messages, OpenAI's error object elsewhere."""
    if path.startswith("/v1/messages"):
        try:
            d = json.loads(body)
            e = d.get("error") if isinstance(d, dict) else None
            return d.get("type") == "error" and isinstance(e, dict) and bool(e.get("type")) and bool(e.get("message"))
        except (ValueError, AttributeError):
            return False
    if not path.startswith("/api/"):
        return is_openai_error(body)
    try:
        d = json.loads(body)
        return isinstance(d, dict) and set(d) == {"error"} and isinstance(d["error"], str) and bool(d["error"])
    except ValueError:
        return False


# --- streams over the lean client ---
class Stream:
    """One streamed request: timestamps of its first token, its end, and how it ended."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.status = 0
        self.retry_after: str | None = None
        self.t_first: float | None = None
        self.t_end: float | None = None
        self.error: str | None = None  # the error event's message
        self.done = False  # saw [DONE]
        self.tokens = 0
        self.body = b""  # the body of a refused request (status != 200)
        self.raw = b""  # the first bytes of the body, whatever they are
        self._buf = b""
        self.conn: sse_client.Connection | None = None

    def feed(self, data: bytes, *_: float) -> None:
        if len(self.raw) < 4096:
            self.raw += data
        self._buf += data
        while b"\n\n" in self._buf:
            ev, self._buf = self._buf.split(b"\n\n", 1)
            if not ev.startswith(b"data: "):
                continue
            payload = ev[6:]
            now = time.monotonic()
            if payload == b"[DONE]":
                self.done, self.t_end = True, now
            elif payload.startswith(b'{"error"'):
                self.error = json.loads(payload)["error"]["message"]
                self.t_end = now
            else:
                self.tokens += 1
                if self.t_first is None:
                    self.t_first = now

    @property
    def ttft(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t0


async def open_stream(t: Target, max_tokens: int, prompt: str = "x", wait: bool = True,
                      s: Stream | None = None, model: str | None = None) -> Stream:
    """Start a streamed completion; with `wait`, return when it has ended (else once its head arrived)."""
    s = s if s is not None else Stream()
    host, port = t.host_port
    try:
        s.conn = conn = await sse_client.connect(host, port)
        done = conn.request("POST", f"{host}:{port}", "/v1/completions", headers=t.headers(), on_data=s.feed,
                            body={"model": model or t.model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
                                  "ignore_eos": True})
        s.status = await conn.head
        s.retry_after = conn.headers.get("retry-after")
        if s.status != 200:
            conn._on_data = None  # keep the error body (its first bytes may have gone to feed already)
            _, _, rest = await done
            s.body = s.raw + rest
            s.t_end = time.monotonic()
            conn.close()
            return s
        if wait:
            await done
            conn.close()
    except (ConnectionError, OSError, asyncio.CancelledError, sse_client.HTTPError) as e:
        s.error = s.error or f"transport: {type(e).__name__}"
        s.t_end = s.t_end or time.monotonic()
    return s


def model_context(t: Target, model: str | None = None) -> int | None:
    """The model's context (max_model_len on its /v1/models card), or None where the card does not say."""
    try:
        r = httpx.get(f"{t.url}/v1/models/{model or t.model}", headers=t.headers(), timeout=10)
        return int(r.json()["max_model_len"])
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


def fit_max_tokens(t: Target, want: int, model: str | None = None) -> int:
    """`want`, or less where the model's context leaves less room beside the one-token prompt: against a real
    server (the default's demo models have 2048) a long stream must not be refused with 400 before it starts, which
    left the part measuring nothing and reporting success."""
    ctx = model_context(t, model)
    return want if ctx is None else max(1, min(want, ctx - 16))


async def _until(pred, timeout: float, every: float = 0.02) -> float | None:
    """Seconds until pred() is true (polled), or None after `timeout`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if await asyncio.to_thread(pred):
            return time.monotonic() - t0
        await asyncio.sleep(every)
    return None


# --- corpus ---
def corpus_cases(model: str, context: int | None = None) -> list[tuple[str, str, str, str, bytes, int]]:
    """(name, method, path, auth, raw body, expected status); auth: 'key' | 'admin' | 'none' | 'wrong'. `context`:
    the model's, which the over-context inputs pass (" x" is a token at least, a word of its own to a BPE
    tokenizer, two to the paced model's bytes; 20,000 "x" were 5,000 tokens of SmolLM2's 8,192: a 200)."""
    over = " x" * ((context or 16384) + 1)
    chat = "/v1/chat/completions"
    cmp_ = "/v1/completions"
    emb = "/v1/embeddings"

    def j(d) -> bytes:
        return json.dumps(d).encode()

    msg = [{"role": "user", "content": "hi"}]
    return [
        ("ok completion", "POST", cmp_, "key", j({"model": model, "prompt": "x", "max_tokens": 1}), 200),
        ("no key", "POST", cmp_, "none", j({"model": model, "prompt": "x"}), 401),
        ("wrong key", "POST", cmp_, "wrong", j({"model": model, "prompt": "x"}), 401),
        ("missing model", "POST", cmp_, "key", j({"model": "no-such-model", "prompt": "x"}), 404),
        ("template via kwargs", "POST", chat, "key", j({"model": model, "messages": msg,
                                                         "chat_template_kwargs": {"chat_template": "{{ 'a' * 8000000 }}"}}), 400),
        ("nested kwargs", "POST", chat, "key", j({"model": model, "messages": msg,
                                                   "chat_template_kwargs": {"x": {"y": [1, 2]}}}), 400),
        ("lone surrogate prompt", "POST", cmp_, "key", j({"model": model, "prompt": "a\ud800"}), 400),
        ("lone surrogate message", "POST", chat, "key", j({"model": model, "messages": [{"role": "user",
                                                                                         "content": "\udfff"}]}), 400),
        ("lone surrogate model", "POST", cmp_, "key", j({"model": "\ud800", "prompt": "x"}), 400),
        ("max_tokens string", "POST", cmp_, "key", j({"model": model, "prompt": "x", "max_tokens": "10"}), 400),
        ("stream yes", "POST", cmp_, "key", j({"model": model, "prompt": "x", "stream": "yes"}), 400),
        ("prompt [[false]]", "POST", cmp_, "key", j({"model": model, "prompt": [[False]]}), 400),
        ("max_tokens 1e400", "POST", cmp_, "key", b'{"model": "%s", "prompt": "x", "max_tokens": 1e400}' % model.encode(),
         400),
        ("temperature NaN", "POST", cmp_, "key", b'{"model": "%s", "prompt": "x", "temperature": NaN}' % model.encode(),
         400),
        ("max_tokens 0", "POST", cmp_, "key", j({"model": model, "prompt": "x", "max_tokens": 0}), 400),
        ("n 10000", "POST", cmp_, "key", j({"model": model, "prompt": "x", "n": 10000}), 400),
        ("token id out of vocab", "POST", cmp_, "key", j({"model": model, "prompt": [2 ** 30]}), 400),
        ("empty prompt", "POST", cmp_, "key", j({"model": model, "prompt": ""}), 400),
        ("prompt over context", "POST", cmp_, "key", j({"model": model, "prompt": over}), 400),
        ("logit_bias out of range", "POST", cmp_, "key", j({"model": model, "prompt": "x", "logit_bias": {"1": 101}}),
         400),
        ("logit_bias id out of vocab", "POST", cmp_, "key",
         j({"model": model, "prompt": "x", "logit_bias": {str(2 ** 30): 1}}), 400),
        ("logit_bias key not an id", "POST", cmp_, "key", j({"model": model, "prompt": "x", "logit_bias": {"a": 1}}),
         400),
        ("tools", "POST", chat, "key", j({"model": model, "messages": msg, "tools": [{"type": "function"}]}), 400),
        ("bad role", "POST", chat, "key", j({"model": model, "messages": [{"role": "wizard", "content": "x"}]}), 400),
        ("no messages", "POST", chat, "key", j({"model": model, "messages": []}), 400),
        ("not json", "POST", cmp_, "key", b"{not json", 400),
        ("not json, no key", "POST", cmp_, "none", b"{not json", 401),
        ("admin not json, no token", "POST", "/admin/models", "none", b"{not json", 401),
        ("admin not json, with token", "POST", "/admin/models", "admin", b"{not json", 400),
        ("json array body", "POST", cmp_, "key", b"[1, 2, 3]", 400),
        ("deeply nested json", "POST", cmp_, "key", b"[" * 100000 + b"]" * 100000, 400),
        ("invalid utf-8", "POST", cmp_, "key", b'{"model": "\xff\xfe", "prompt": "x"}', 400),
        ("empty body", "POST", cmp_, "key", b"", 400),
        ("body over the limit", "POST", cmp_, "key", b'{"prompt": "' + b"x" * (5 << 20) + b'"}', 413),
        ("GET on a POST route", "GET", cmp_, "key", b"", 405),
        ("PUT on a POST route", "PUT", chat, "key", j({}), 405),
        ("unknown path", "GET", "/v1/nothing-here", "key", b"", 404),
        ("model card of a missing model", "GET", "/v1/models/no-such-model", "key", b"", 404),
        ("admin without token", "GET", "/admin/engines", "none", b"", 401),
        ("metrics without token", "GET", "/metrics", "none", b"", 401),
        ("drain a missing engine", "POST", "/admin/engines/no-such-engine/drain", "admin", b"", 404),
        ("empty embedding input", "POST", emb, "key", j({"model": model, "input": ""}), 400),
        ("embedding input [[false]]", "POST", emb, "key", j({"model": model, "input": [[False]]}), 400),
        ("embedding over context", "POST", emb, "key", j({"model": model, "input": over}), 400),
        ("embedding dimensions", "POST", emb, "key", j({"model": model, "input": "x", "dimensions": 1}), 400),
        ("embedding encoding int8", "POST", emb, "key", j({"model": model, "input": "x", "encoding_format": "int8"}),
         400),
    ]


def auth_off(c: httpx.Client) -> bool:
    """Whether the server asks no key of API requests (`tokenpool serve DIR` without --api-key): a model list asked
    with none is answered."""
    try:
        return c.get("/v1/models").status_code == 200
    except httpx.HTTPError:
        return False


def run_corpus(t: Target) -> dict:
    tokens = {"key": t.headers(), "admin": t.admin_headers(), "none": {}, "wrong": {"Authorization": "Bearer nope"}}
    rows, skipped = [], []
    with httpx.Client(base_url=t.url, timeout=60) as c:
        keyless = auth_off(c)
        for name, method, path, who, body, want in corpus_cases(t.model, model_context(t)):
            if who == "key" and not t.key and not keyless:
                continue
            if keyless and who in ("none", "wrong") and want == 401 and not path.startswith("/admin"):
                # (a server without authentication answers them: no failure of its, as they were counted; /metrics
                # too, open on a loopback listener without auth, as the README has it)
                skipped.append({"case": name, "skipped": "auth off"})
                continue
            headers = {**tokens[who], "content-type": "application/json"}
            t0 = time.monotonic()
            try:
                r = c.request(method, path, content=body or None, headers=headers)
                status, ok_json, ra = r.status_code, is_openai_error(r.content), r.headers.get("retry-after")
            except httpx.HTTPError as e:
                status, ok_json, ra = 0, False, None
                name += f" ({type(e).__name__})"
            rows.append({"case": name, "status": status, "expected": want, "ok": status == want,
                         "error_is_openai_json": ok_json if status >= 400 else None, "retry_after": ra,
                         "seconds": round(time.monotonic() - t0, 4)})
    return {"part": "corpus", "cases": len(rows), "as_expected": sum(r["ok"] for r in rows),
            "server_errors": sum(r["status"] >= 500 for r in rows),
            "errors_not_openai_json": sum(r["error_is_openai_json"] is False for r in rows),
            "results": rows, **({"skipped": skipped} if skipped else {})}


# --- fuzz ---
def run_fuzz(t: Target, examples: int = 50, seed: int = 0) -> dict:
    """schemathesis over /openapi.json, once with credentials (tenant key; admin token on /admin and /metrics)
    and once without. Engine ids in drain/resume paths get a prefix, so the fuzzer never drains a real one."""
    import schemathesis

    schema = schemathesis.openapi.from_url(t.url + "/openapi.json")
    out: dict = {"part": "fuzz", "examples_per_operation": examples, "runs": {}}
    for mode in ("credentials", "anonymous"):
        out["runs"][mode] = _fuzz_mode(t, schema, mode, examples, seed)
    out["requests"] = sum(r["requests"] for r in out["runs"].values())
    out["server_errors"] = sum(r["server_errors"] for r in out["runs"].values())
    out["findings_total"] = sum(r["findings_total"] for r in out["runs"].values())
    return out


def _fuzz_mode(t: Target, schema, mode: str, examples: int, seed: int) -> dict:
    from hypothesis import HealthCheck, Phase, given, settings

    statuses: dict[str, int] = {}
    bad: list[dict] = []
    counts = {"health_503": 0, "unexpected_5xx": 0}
    n = 0
    rng = random.Random(seed)

    def call(case) -> None:
        nonlocal n
        if case.path.startswith("/admin/engines/") and case.method.upper() == "POST":
            case.path_parameters = {**(case.path_parameters or {}),
                                    "engine_id": "fuzz-" + str((case.path_parameters or {}).get("engine_id", ""))}
        if case.path.startswith("/admin/models") and case.method.upper() == "DELETE":
            case.path_parameters = {**(case.path_parameters or {}),
                                    "name": "fuzz-" + str((case.path_parameters or {}).get("name", ""))}
        if isinstance(case.body, dict) and "model" in case.body and rng.random() < 0.7:
            case.body["model"] = t.model  # most requests name the real model, to get past the 404
        headers = {}
        if mode == "credentials":
            admin = case.path.startswith("/admin") or case.path == "/metrics"
            headers = t.admin_headers() if admin else t.headers()
        try:
            resp = case.call(base_url=t.url, headers=headers, timeout=60)
        except Exception as e:  # noqa: BLE001 - a transport failure is a finding, not a crash of the suite
            bad.append({"method": case.method, "path": case.path, "error": repr(e)[:300]})
            return
        n += 1
        statuses[str(resp.status_code)] = statuses.get(str(resp.status_code), 0) + 1
        ct = resp.headers.get("content-type") or ""
        ct = ct[0] if isinstance(ct, list) else ct
        ready_503 = case.path == "/health" and resp.status_code == 503
        if ready_503:
            counts["health_503"] += 1
        elif resp.status_code >= 500:
            counts["unexpected_5xx"] += 1
        if (resp.status_code >= 500 and not ready_503) or (
                resp.status_code >= 400 and not ready_503 and not (ct.startswith("application/json")
                                                                   and is_error_body(case.path, resp.content))):
            bad.append({"method": case.method, "path": case.path, "status": resp.status_code,
                        "body": resp.text[:300]})

    for result in schema.get_all_operations():
        op = result.ok()
        test = settings(max_examples=examples, deadline=None, database=None, derandomize=seed == 0,
                        suppress_health_check=list(HealthCheck), phases=[Phase.generate])(
            given(op.as_strategy())(call))
        test()
    return {"requests": n, "statuses": dict(sorted(statuses.items())),
            "server_errors": counts["unexpected_5xx"], "health_not_ready_503": counts["health_503"], "findings": bad[:50], "findings_total": len(bad)}


# --- worker kill / stop ---
def _shm(root: Path | None) -> set[str]:
    """Files under the server's shared-memory directory (or /dev/shm/tokenpool*: other servers' too)."""
    base = root or Path("/dev/shm")
    if not base.is_dir():
        return set()
    tops = [base] if root else [p for p in base.iterdir() if p.name.startswith("tokenpool")]
    out = set()
    for top in tops:
        try:
            out |= {str(p) for p in ([top] if top.is_file() else top.rglob("*")) if p.is_file()}
        except OSError:
            pass
    return out


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _pool_counter(t: Target, key: str) -> int:
    return sum(int((e.get("pool") or {}).get(key, 0)) for e in t.engines() if e["alive"])


async def _kill(t: Target, sig: int, streams: int, queued: int, max_tokens: int, during: str | None = None,
                models: list[str] | None = None) -> dict:
    engines = [e for e in await asyncio.to_thread(t.engines) if e["alive"] and e["pid"]]
    if not engines:
        raise SystemExit("no live engine to signal")
    victim = engines[0]
    shm_before = _shm(t.shm_dir)
    live = [Stream() for _ in range(streams)]
    names = models or [t.model]
    running = [asyncio.ensure_future(open_stream(t, max_tokens, s=s, model=names[i % len(names)]))
               for i, s in enumerate(live)]
    deadline = time.monotonic() + 30
    while not all(s.t_first is not None or s.t_end is not None for s in live) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)  # every running stream has its first token
    # requests that are queued behind the running ones (no token yet) when the worker goes: they must be retried
    waiting = [asyncio.ensure_future(open_stream(t, 5)) for _ in range(queued)]
    await asyncio.sleep(0.05)
    moved = None
    if during is not None:  # the pooled engine: kill while it moves weights (switches) or KV (swap-outs)
        key = {"weights": "switches", "kv": "kv_swapped_out"}[during]
        c0 = await asyncio.to_thread(_pool_counter, t, key)
        grew = await _until(lambda: _pool_counter(t, key) > c0, 30, 0.01)
        moved = {"counter": key, "before": c0, "rose_after_s": grew}
    t_sig = time.monotonic()
    os.kill(victim["pid"], sig)
    results = await asyncio.gather(*running, *waiting)
    run_res, wait_res = results[:streams], results[streams:]
    cut = [s.t_end - t_sig for s in run_res if s.error and s.t_end]

    def restarted() -> bool:
        es = t.engines()
        return any(e["alive"] and e["pid"] != victim["pid"] and e["id"] == victim["id"] and e["models"] and
                   all(m["state"] == "ready" for m in e["models"]) for e in es)

    restart_s = await _until(restarted, 30, 0.05)
    restart_s = None if restart_s is None else round(time.monotonic() - t_sig, 3)
    try:  # a server that cannot serve after the restart must not hang the suite
        ok = await asyncio.wait_for(open_stream(t, 3), 120)
    except asyncio.TimeoutError:
        ok = Stream()
        ok.error = "no answer within 120 s after the restart"
    held = await _until(lambda: not any(t.held().values()), 10)
    if sig == signal.SIGSTOP and _pid_alive(victim["pid"]):
        os.kill(victim["pid"], signal.SIGCONT)  # never leave a stopped process behind
    await asyncio.sleep(0.5)
    return {
        "signal": signal.Signals(sig).name, "victim": {"id": victim["id"], "pid": victim["pid"]},
        "during": during, "pool_activity_before_kill": moved,
        "streams": streams, "queued": queued,
        "running_streams_ended_with_error_event": sum(1 for s in run_res if s.error and s.done),
        "running_streams_cut_without_done": sum(1 for s in run_res if not s.done),
        "error_event_s": _summary(cut),
        # "queued" requests that had their first token before the kill were running, not waiting
        "queued_started_before_kill": sum(1 for s in wait_res if s.t_first is not None and s.t_first < t_sig),
        "queued_requests_completed": sum(1 for s in wait_res if s.done and not s.error and s.tokens),
        "queued_requests_failed": [s.error or s.status for s in wait_res if not (s.done and not s.error)],
        # a failed "queued" request that had tokens was running, not queued, at the kill (not retryable)
        "queued_requests_failed_tokens": [s.tokens for s in wait_res if not (s.done and not s.error)],
        "restart_s": restart_s,
        "request_after_restart_ok": ok.done and not ok.error,
        "held_after_s": None if held is None else round(held, 3),
        "victim_process_left": _pid_alive(victim["pid"]),
        "dev_shm_files_leaked": sorted(_shm(t.shm_dir) - shm_before),
    }


def run_kill(t: Target, sig: str = "KILL", streams: int = 8, queued: int = 4, max_tokens: int = 2000,
             during: str | None = None, models: list[str] | None = None) -> dict:
    signum = {"KILL": signal.SIGKILL, "STOP": signal.SIGSTOP}[sig.upper().removeprefix("SIG")]
    part = "kill" if during is None else f"pooled_kill_during_{during}"
    max_tokens = min(fit_max_tokens(t, max_tokens, n) for n in (models or [t.model]))
    return {"part": part, **asyncio.run(_kill(t, signum, streams, queued, max_tokens, during, models))}


# --- disconnect storm ---
async def _disconnects(t: Target, n: int, max_tokens: int) -> dict:
    live = [Stream() for _ in range(n)]
    tasks = []
    for i, s in enumerate(live):
        tasks.append(asyncio.ensure_future(open_stream(t, max_tokens, s=s)))
        if i % 50 == 49:
            await asyncio.sleep(0.01)  # do not SYN-flood the listen backlog
    deadline = time.monotonic() + 60
    while not all(s.t_first is not None or s.t_end is not None for s in live) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    streaming = sum(1 for s in live if s.t_first is not None and s.t_end is None)
    await _until(lambda: t.held()["running"] >= streaming, 3)  # (a step may not have taken them all in yet)
    peak = await asyncio.to_thread(t.held)
    t_drop = time.monotonic()
    for s in live:
        if s.conn is not None:
            s.conn.close()
    await asyncio.gather(*tasks, return_exceptions=True)
    t_poll = time.monotonic()
    back = await _until(lambda: not any(t.held().values()), 30, 0.02)
    ok = await open_stream(t, 3)
    return {"streams": n, "streaming_when_dropped": streaming, "held_at_peak": peak,
            "back_to_zero_s": None if back is None else round(t_poll - t_drop + back, 3),
            "held_after": await asyncio.to_thread(t.held), "request_after_ok": ok.done and not ok.error,
            "refused": sum(1 for s in live if s.status not in (0, 200)),
            "refused_statuses": {str(k): v for k, v in _count(s.status for s in live if s.status not in (0, 200)).items()}}


def run_disconnects(t: Target, streams: int = 1000, max_tokens: int = 3000) -> dict:
    max_tokens = fit_max_tokens(t, max_tokens)
    return {"part": "disconnects", "max_tokens": max_tokens, **asyncio.run(_disconnects(t, streams, max_tokens))}


# --- drops anywhere ---
DROP_POINTS = ("request_head", "request_sent", "response_head", "mid_stream", "never")


async def _drop_at(t: Target, model: str, prompt: str, max_tokens: int, point: str, after: float) -> tuple[str, int]:
    """One streamed completion on a raw connection, reset (as a client that goes away) at `point`: once its
    request head is sent (`after` s later; its body never comes), once the whole request is sent (`after` s
    later: while it is admitted, placed or prefilled), once the response head came (`after` s later), after
    `after` data events (mid-decode), or `never` (read to its end). (point, status: 0 before a response head)."""
    host, port = t.host_port
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
                       "ignore_eos": True}).encode()
    auth = "".join(f"{k}: {v}\r\n" for k, v in t.headers().items())
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n{auth}"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    status = 0
    try:
        r, w = await asyncio.open_connection(host, port)
    except OSError:
        return point, -1
    try:
        w.write(head)
        await w.drain()
        if point == "request_head":
            await asyncio.sleep(after)
            return point, status
        w.write(body)
        await w.drain()
        if point == "request_sent":
            await asyncio.sleep(after)
            return point, status
        status = int((await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 120)).split()[1])
        if point == "response_head":
            await asyncio.sleep(after)
            return point, status
        events = 0
        while chunk := await asyncio.wait_for(r.read(65536), 120):
            events += chunk.count(b"data: ")
            if point == "mid_stream" and events >= after:
                break
        return point, status
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError):
        return point, status or -1
    finally:
        w.transport.abort()


async def _drops(t: Target, n: int, max_tokens: int, models: list[str], seed: int) -> dict:
    rnd = random.Random(seed)
    tasks = []
    for i in range(n):
        point = rnd.choice(DROP_POINTS)
        after = rnd.randint(1, 20) if point == "mid_stream" else rnd.random() * 0.5
        prompt = "hello " * rnd.choice([1, 50, 300])  # short and long prefills
        tasks.append(asyncio.ensure_future(_drop_at(t, models[i % len(models)], prompt, max_tokens, point, after)))
        if i % 25 == 24:
            await asyncio.sleep(0.02)  # do not SYN-flood the listen backlog
    ends = await asyncio.gather(*tasks)
    t_end = time.monotonic()
    back = await _until(lambda: not any(t.held().values()), 30, 0.05)
    after = {m: await open_stream(t, 3, model=m) for m in models}
    return {"streams": n, "models": models, "ends": {f"{p} {s}": c for (p, s), c in sorted(_count(ends).items())},
            "back_to_zero_s": None if back is None else round(time.monotonic() - t_end, 3),
            "held_after": await asyncio.to_thread(t.held),
            "requests_after_ok": {m: s.done and not s.error for m, s in after.items()}}


def run_drops(t: Target, streams: int = 300, max_tokens: int = 200, models: list[str] | None = None,
              seed: int = 0) -> dict:
    """Streams dropped at random points (DROP_POINTS), across `models` (so a pooled engine swaps under them):
    what the server still holds after, and whether each model still serves."""
    models = models or [t.model]
    max_tokens = min(fit_max_tokens(t, max_tokens, m) for m in models)
    return {"part": "drops", "max_tokens": max_tokens, **asyncio.run(_drops(t, streams, max_tokens, models, seed))}


# --- overload ---
async def _overload(t: Target, factor: float, duration: float, max_tokens: int, capacity_rps: float,
                    slo_ttft_s: float, seed: int) -> dict:
    rate = factor * capacity_rps
    rng = random.Random(seed)
    tasks = []
    t_end = time.monotonic() + duration
    next_t = time.monotonic()
    while next_t < t_end:
        await asyncio.sleep(max(0.0, next_t - time.monotonic()))
        tasks.append(asyncio.ensure_future(open_stream(t, max_tokens)))
        next_t += rng.expovariate(rate)
    res: list[Stream] = await asyncio.gather(*tasks)
    ok = [s for s in res if s.status == 200 and s.done and not s.error]
    r429 = [s for s in res if s.status == 429]
    ttft = [s.ttft for s in ok if s.ttft is not None]
    return {
        "factor": factor, "capacity_rps": round(capacity_rps, 3), "offered_rps": round(rate, 3),
        "duration_s": duration, "requests": len(res), "accepted_ok": len(ok), "rejected_429": len(r429),
        "rejected_429_with_retry_after": sum(1 for s in r429 if s.retry_after and int(s.retry_after) >= 1),
        "rejected_429_openai_json": sum(1 for s in r429 if is_openai_error(s.body)),
        "server_errors": sum(1 for s in res if s.status >= 500),
        "other": {str(k): v for k, v in _count(s.status for s in res if s.status not in (200, 429)).items()},
        "accepted_failed_mid_stream": sum(1 for s in res if s.status == 200 and not (s.done and not s.error)),
        "ttft_accepted_s": _summary(ttft), "slo_ttft_s": slo_ttft_s,
        "accepted_within_ttft_slo": round(sum(1 for x in ttft if x <= slo_ttft_s) / len(ttft), 4) if ttft else None,
    }


def _count(xs) -> dict:
    out: dict = {}
    for x in xs:
        out[x] = out.get(x, 0) + 1
    return out


def run_overload(t: Target, factor: float = 5.0, duration: float = 10.0, max_tokens: int = 50,
                 max_num_seqs: int = 16, pace_s: float = 0.01, slo_ttft_s: float = 0.5, seed: int = 0) -> dict:
    """Capacity of a paced model = max_num_seqs / (max_tokens * pace_s) requests/s; arrivals are Poisson."""
    capacity = max_num_seqs / (max_tokens * pace_s)
    return {"part": "overload", **asyncio.run(_overload(t, factor, duration, max_tokens, capacity, slo_ttft_s,
                                                        seed))}


# --- soak ---
def _rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


async def _soak(t: Target, duration: float, concurrency: int, max_tokens: int, sample_s: float,
                warmup_frac: float) -> dict:
    stop = time.monotonic() + duration
    counts = {"ok": 0, "errors": 0, "statuses": {}}
    errors: list[str] = []

    async def loop() -> None:
        while time.monotonic() < stop:
            s = await open_stream(t, max_tokens)
            if s.status == 200 and s.done and not s.error:
                counts["ok"] += 1
            else:
                counts["errors"] += 1
                if len(errors) < 20:
                    errors.append(f"{s.status} {s.error or s.body[:200]!r}")

    samples = []

    async def sample() -> None:
        t0 = time.monotonic()
        while time.monotonic() < stop:
            engines = await asyncio.to_thread(t.engines)
            row = {"t": round(time.monotonic() - t0, 1), "controller_rss": _rss(t.server_pid) if t.server_pid else None,
                   "workers_rss": {e["id"]: _rss(e["pid"]) for e in engines if e["alive"] and e["pid"]},
                   "ok": counts["ok"]}
            samples.append(row)
            await asyncio.sleep(sample_s)

    await asyncio.gather(sample(), *(loop() for _ in range(concurrency)))
    held = await _until(lambda: not any(t.held().values()), 10)
    warm = [r for r in samples if r["t"] >= warmup_frac * duration] or samples
    ctl = [r["controller_rss"] for r in warm if r["controller_rss"]]
    wk = [sum(v for v in r["workers_rss"].values() if v) for r in warm]
    return {
        "duration_s": duration, "concurrency": concurrency, "max_tokens": max_tokens,
        "requests_ok": counts["ok"], "errors": counts["errors"], "error_samples": errors,
        "warmup_s": round(warmup_frac * duration, 1),
        "controller_rss_start_mb": round(ctl[0] / 2**20, 1) if ctl else None,
        "controller_rss_end_mb": round(ctl[-1] / 2**20, 1) if ctl else None,
        "controller_rss_growth_pct": round(100 * (ctl[-1] - ctl[0]) / ctl[0], 2) if ctl else None,
        "controller_rss_growth_pct_median_halves": _halves(ctl),
        "workers_rss_start_mb": round(wk[0] / 2**20, 1) if wk else None,
        "workers_rss_end_mb": round(wk[-1] / 2**20, 1) if wk else None,
        "workers_rss_growth_pct": round(100 * (wk[-1] - wk[0]) / wk[0], 2) if wk and wk[0] else None,
        "held_after_s": None if held is None else round(held, 3),
        "samples": samples,
    }


def _halves(xs: list[int]) -> float | None:
    """Growth of the median of the second half over the first: a single GC-timed sample does not decide it."""
    if len(xs) < 4:
        return None
    a, b = statistics.median(xs[: len(xs) // 2]), statistics.median(xs[len(xs) // 2:])
    return round(100 * (b - a) / a, 2)


def run_soak(t: Target, duration: float = 60.0, concurrency: int = 32, max_tokens: int = 40,
             sample_s: float = 2.0, warmup_frac: float = 0.2) -> dict:
    return {"part": "soak", **asyncio.run(_soak(t, duration, concurrency, max_tokens, sample_s, warmup_frac))}


# --- event-loop blocking ---
def tokenizer_config(model_dir: str, max_request_bytes: int = 8 << 20) -> dict:
    """A server with no engine and one factory model (128K context): a multi-megabyte prompt is tokenized in full,
    then refused as too long (a smaller one: no engine); the tokenizing is what `block` measures."""
    from controller.keys import hash_key

    return {"admin_token_hash": hash_key(SUITE_ADMIN), "tenants": [{"name": "suite", "key_hashes": [hash_key(SUITE_KEY)]}],
            "workers": {"local": "none"}, "max_request_bytes": max_request_bytes,
            "models": [{"name": "tiny", "path": model_dir, "engine": {"max_model_len": 131072}}]}


async def _block(t: Target, body: dict, probe_s: float) -> dict:
    lat: list[float] = []
    async with httpx.AsyncClient(base_url=t.url, timeout=120) as c:
        await c.get("/health")
        req = asyncio.ensure_future(c.post("/v1/completions", json=body, headers=t.headers()))
        t0 = time.monotonic()
        while not req.done():
            s = time.perf_counter()
            await c.get("/health")
            lat.append(time.perf_counter() - s)
            await asyncio.sleep(probe_s)
        r = await req
    took = time.monotonic() - t0
    return {"request_s": round(took, 3), "request_status": r.status_code, "health_probes": len(lat),
            "health_latency_s": {**_summary(lat), "mean": round(statistics.fmean(lat), 4) if lat else None},
            "health_over_50ms": sum(1 for x in lat if x > 0.05)}


def run_block(t: Target, prompt_mb: float = 4.0, probe_s: float = 0.01) -> dict:
    """/health latency while one huge prompt (and then 64 x 60 KB prompts) is tokenized by the server."""
    unit = "The quick brown fox jumps over the lazy dog 0123456789. "
    big = (unit * int(prompt_mb * 2**20 / len(unit) + 1))[: int(prompt_mb * 2**20) - 64]
    many = [(unit * 1200)[:60_000] for _ in range(64)]
    return {"part": "block", "prompt_mb": prompt_mb, "probe_every_s": probe_s,
            "one_prompt": asyncio.run(_block(t, {"model": t.model, "prompt": big, "max_tokens": 1}, probe_s)),
            "prompt_list_64x60kb": asyncio.run(_block(t, {"model": t.model, "prompt": many, "max_tokens": 1},
                                                      probe_s))}
