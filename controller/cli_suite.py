"""`tokenpool suite ...`: the fault and load suite (load_tests/faults.py); each command writes one JSON result.

Wired into the main CLI by controller/cli.py (which also makes a bare `tokenpool suite` print this help).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import typer

from controller.ps import base_url

suite_app = typer.Typer(help="Fault and load suite against a live server (its own paced one unless --url).")


def url_option(url: Optional[str]) -> Optional[str]:
    """--url as `base_url` reads it (the client commands', the suite's, bench serve's): one it cannot read is a
    usage error naming the option (click adds the variable it may come from), not a traceback. An empty one given
    (`--url "$HOST"` with HOST unset) is one too: it was None to the client commands (a TypeError's traceback) and
    the suite's own paced server to `suite` (an empty $TOKENPOOL_URL is not given: click reads it as unset)."""
    if url is None:
        return None
    if not url.strip():
        raise typer.BadParameter("empty; give HOST:PORT, :PORT or a URL")
    try:
        return base_url(url)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


URL = typer.Option(None, callback=url_option,  # (as the client commands read it)
                   help="drive this running server (loopback) instead of starting a paced one")
ADMIN = typer.Option(None, "--admin-token", help="with --url: the admin token")
KEY = typer.Option(None, help="with --url: a tenant key (none: auth is off)")
MODEL = typer.Option("pace", help="with --url: the model to request")
def json_path(path: Optional[Path]) -> Optional[Path]:
    """--json's file, refused before a run rather than after it when it cannot be a file (a folder, or under a
    file); missing folders above it are made when it is written."""
    if path is None:
        return None
    if path.is_dir():
        raise typer.BadParameter(f"{path} is a folder; give a file to write the result to")
    above = next((p for p in path.parents if p.exists()), Path("."))
    if not above.is_dir():
        raise typer.BadParameter(f"{path} cannot be written: {above} is not a folder")
    return path


JSON = typer.Option(None, "--json", callback=json_path, help="write the result here (it is printed too)")
EXIT = ("Exit status: 0 when every check came out as expected (skipped cases included; measurements are reported, "
        "not judged), 1 when one did not (said in a line on stderr after the result) or the server could not be "
        "reached, 2 on a usage error or without the test extra.")


def _context():
    try:
        from typer._click.globals import get_current_context  # typer >= 0.2x carries its own click
    except ImportError:
        from click import get_current_context
    return get_current_context()


OWN_PACKAGES = {"tokenpool", "controller", "gpu_pool", "model_swapper", "token_scheduler", "load_tests"}


def needs_test_extra(command):
    """A command of the tools (load_tests), which need the test extra's packages (httpx, schemathesis, ...) that a
    server's install does not have: one missing is a line saying how to install them, exit 2, not a traceback."""

    @functools.wraps(command)  # (typer reads the signature through __wrapped__)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ModuleNotFoundError as e:
            if e.name is None or e.name.partition(".")[0] in OWN_PACKAGES:
                raise
            typer.echo(f"{_context().command_path}: needs the test extra ({e.name} is not installed): "
                       "pip install -e '.[test]' in the repository", err=True)
            raise typer.Exit(2) from None
        except SystemExit as e:  # (a line the tools end with: "cannot reach URL", "URL serves no model", ...)
            if not isinstance(e.code, str) or e.code.startswith("tokenpool "):
                raise
            # (said as `bench serve` says it, the command first: `tokenpool suite corpus: cannot reach URL: ...`)
            path = ["tokenpool", *_context().command_path.split()[1:]]  # (as installed, whatever argv[0] was)
            raise SystemExit(f"{' '.join(path)}: {e.code}") from None

    return run


def failed_checks(result: dict) -> list[str]:
    """What a part's result says went wrong, one phrase each ([]: all as expected; a skipped case is no failure).
    The measurements (dashboards' CPU, block's latency, soak's RSS, timings) are reported, not judged here."""
    r, out = result, []
    part = str(r.get("part", ""))
    if part == "corpus" and r.get("as_expected", 0) < r.get("cases", 0):
        wrong = [x["case"] for x in r.get("results", []) if not x.get("ok")]
        out.append(f"{r['cases'] - r['as_expected']} of {r['cases']} cases not as expected: {', '.join(wrong)}")
    if r.get("server_errors"):  # (corpus, fuzz, overload)
        out.append(f"{r['server_errors']} server errors (5xx)")
    if r.get("findings_total"):
        out.append(f"{r['findings_total']} findings")
    if r.get("accepted_failed_mid_stream"):
        out.append(f"{r['accepted_failed_mid_stream']} accepted requests failed mid-stream")
    if r.get("running_streams_cut_without_done"):
        out.append(f"{r['running_streams_cut_without_done']} streams cut without an error event")
    for flag, said in (("request_after_restart_ok", "no request served after the restart"),
                       ("request_after_ok", "no request served after")):
        if r.get(flag) is False:
            out.append(said)
    if isinstance(r.get("requests_after_ok"), dict) and not all(r["requests_after_ok"].values()):
        out.append("not served after: " + ", ".join(m for m, ok in r["requests_after_ok"].items() if not ok))
    if r.get("victim_process_left"):
        out.append("the killed worker's process is left")
    if r.get("dev_shm_files_leaked"):
        out.append(f"{len(r['dev_shm_files_leaked'])} shared-memory files leaked")
    if "back_to_zero_s" in r and r["back_to_zero_s"] is None or "held_after_s" in r and r["held_after_s"] is None:
        out.append("requests or KV still held after the load")
    return out


def _write(result: dict, json_out: Optional[Path]) -> None:
    """Print the result and write it to --json, headed by date, commit and the command that made it (rebuilt
    from the parsed options, so it is the same however the suite was launched); then, where a check failed, a
    line on stderr saying which and exit 1 (a CI step fails with it)."""
    import datetime as dt

    from load_tests.bench_common import git_commit, write_json

    ctx = _context()
    flag = {p.name: max(p.opts, key=len) for p in ctx.command.params if getattr(p, "opts", None)}
    opts = [f"{flag.get(k, '--' + k)} {v}" for k, v in ctx.params.items()
            if v is not None and k not in ("admin_token", "key")]  # never write a secret into a result
    head = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
            "command": " ".join(["tokenpool", "suite", ctx.info_name or "", *opts]), "device": "cpu"}
    write_json(json_out, {**head, **result})
    if failed := failed_checks(result):
        typer.echo(f"tokenpool suite {ctx.info_name}: failed: {'; '.join(failed)}", err=True)
        raise typer.Exit(1)


@suite_app.command("corpus", epilog=EXIT)
@needs_test_extra
def corpus_cmd(url: Optional[str] = URL, admin_token: Optional[str] = ADMIN, key: Optional[str] = KEY,
               model: str = MODEL, json_out: Optional[Path] = JSON) -> None:
    """Known-bad requests (every defect of issue 16 among them), each with the status it must get."""
    from load_tests.faults import run_corpus, target

    with target(url, admin_token, key, model=model) as t:
        _write(run_corpus(t), json_out)


@suite_app.command("fuzz", epilog=EXIT)
@needs_test_extra
def fuzz_cmd(url: Optional[str] = URL, admin_token: Optional[str] = ADMIN, key: Optional[str] = KEY,
             examples: int = typer.Option(50, help="generated requests per operation and mode"),
             json_out: Optional[Path] = JSON) -> None:
    """schemathesis over the server's OpenAPI, with credentials and without: no 5xx, errors as OpenAI JSON."""
    from load_tests.faults import run_fuzz, target

    # a short context and a fast pace bound the work any generated request can ask for
    with target(url, admin_token, key, pace_s=0.0005, max_num_seqs=256, max_model_len=48) as t:
        _write(run_fuzz(t, examples), json_out)


@suite_app.command("kill", epilog=EXIT)
@needs_test_extra
def kill_cmd(url: Optional[str] = URL, admin_token: Optional[str] = ADMIN, key: Optional[str] = KEY,
             model: str = MODEL, sig: str = typer.Option("KILL", "--signal", help="KILL | STOP"),
             streams: int = typer.Option(8), queued: int = typer.Option(4, help="requests waiting for a slot"),
             max_tokens: int = typer.Option(2000, help="each running stream's (less where the model's context is "
                                            "shorter)"),
             json_out: Optional[Path] = JSON) -> None:
    """A worker SIGKILLed or SIGSTOPped mid-stream: error events, retried queue, restart, leaks."""
    from load_tests.faults import run_kill, target

    if sig.upper().removeprefix("SIG") not in ("KILL", "STOP"):
        raise typer.BadParameter("--signal is KILL or STOP")
    with target(url, admin_token, key, model=model, max_num_seqs=streams, ttft_s=60.0) as t:
        _write(run_kill(t, sig, streams, queued, max_tokens), json_out)


@suite_app.command("pooled-kill", epilog=EXIT)
@needs_test_extra
def pooled_kill_cmd(url: Optional[str] = URL, admin_token: Optional[str] = ADMIN, key: Optional[str] = KEY,
                    models: Optional[str] = typer.Option(None, help="with --url: comma-separated models to stream"),
                    during: str = typer.Option("weights", help="weights (a switch moves weights) | kv (a KV swap-out)"),
                    streams: int = typer.Option(6), queued: int = typer.Option(3),
                    max_tokens: int = typer.Option(300), json_out: Optional[Path] = JSON) -> None:
    """A pooled worker SIGKILLed while it moves weights or KV: error events, retries, restart, leaks. Without
    --url: three tiny factory models over a one-slot CPU arena (every switch is a weight load)."""
    from controller.config import cache_dir
    from load_tests.faults import pooled_config, run_kill, target, tiny_pooled_models

    if during not in ("weights", "kv"):
        raise typer.BadParameter("--during is weights or kv")
    names = models.split(",") if models else None
    if url is not None:
        with target(url, admin_token, key, model=(names or ["-"])[0]) as t:
            _write(run_kill(t, "KILL", streams, queued, max_tokens, during, names), json_out)
        return
    dirs = tiny_pooled_models(cache_dir())
    # A model's batch is full with the streams it gets (the first model gets the most): the queued requests, sent
    # to the first model, wait unstarted until the kill (with the served 64 slots they started beside the running
    # ones, and on a loaded machine were cut mid-reply, which is not retryable).
    per_model = -(-streams // len(dirs))
    cfg = pooled_config(dirs, budget_gb=4 * 2**20 / 1e9, kv_cache_gb=64 * 16 * 512 / 1e9, max_num_seqs=per_model)
    with target(config=cfg, model=next(iter(dirs))) as t:
        _write(run_kill(t, "KILL", streams, queued, max_tokens, during, list(dirs)), json_out)


@suite_app.command("disconnects", epilog=EXIT)
@needs_test_extra
def disconnects_cmd(url: Optional[str] = URL, admin_token: Optional[str] = ADMIN, key: Optional[str] = KEY,
                    model: str = MODEL, streams: int = typer.Option(1000),
                    max_tokens: int = typer.Option(3000, help="each stream's (less where the model's context is "
                                                   "shorter)"),
                    json_out: Optional[Path] = JSON) -> None:
    """N streams dropped after their first token: seconds until KV and running requests are back to zero."""
    from load_tests.faults import run_disconnects, target

    with target(url, admin_token, key, model=model, max_num_seqs=max(64, streams), ttft_s=60.0) as t:
        _write(run_disconnects(t, streams, max_tokens), json_out)


@suite_app.command("drops", epilog=EXIT)
@needs_test_extra
def drops_cmd(url: Optional[str] = URL, admin_token: Optional[str] = ADMIN, key: Optional[str] = KEY,
              models: Optional[str] = typer.Option(None, help="with --url: comma-separated models to spread over"),
              streams: int = typer.Option(300), max_tokens: int = typer.Option(200), seed: int = typer.Option(0),
              json_out: Optional[Path] = JSON) -> None:
    """N streams dropped at random points (right after the request head, after the request, after the response
    head, mid-decode, or read to the end) across models the pool swaps between: what the server still holds after,
    and whether each model still serves. Without --url: three tiny factory models over a one-slot CPU arena."""
    from controller.config import cache_dir
    from load_tests.faults import pooled_config, run_drops, target, tiny_pooled_models

    names = models.split(",") if models else None
    if url is not None:
        with target(url, admin_token, key, model=(names or ["-"])[0]) as t:
            _write(run_drops(t, streams, max_tokens, names, seed), json_out)
        return
    dirs = tiny_pooled_models(cache_dir())
    cfg = pooled_config(dirs, budget_gb=4 * 2**20 / 1e9, kv_cache_gb=64 * 16 * 512 / 1e9)
    with target(config=cfg, model=next(iter(dirs))) as t:
        _write(run_drops(t, streams, max_tokens, list(dirs), seed), json_out)


@suite_app.command("overload", epilog=EXIT)
@needs_test_extra
def overload_cmd(url: Optional[str] = URL, admin_token: Optional[str] = ADMIN, key: Optional[str] = KEY,
                 model: str = MODEL, factor: float = typer.Option(5.0), duration: float = typer.Option(10.0),
                 max_num_seqs: int = typer.Option(16, help="the model's slots (with --url: what the server has)"),
                 pace: float = typer.Option(0.01, help="seconds per token (with --url: the server's pace)"),
                 slo_ttft: float = typer.Option(0.5), json_out: Optional[Path] = JSON) -> None:
    """Arrivals at FACTOR x capacity: the excess gets 429 + Retry-After, accepted requests keep their TTFT."""
    from load_tests.faults import run_overload, target

    with target(url, admin_token, key, model=model, max_num_seqs=max_num_seqs, pace_s=pace, ttft_s=slo_ttft) as t:
        _write(run_overload(t, factor, duration, max_num_seqs=max_num_seqs, pace_s=pace, slo_ttft_s=slo_ttft),
               json_out)


@suite_app.command("soak", epilog=EXIT)
@needs_test_extra
def soak_cmd(url: Optional[str] = URL, admin_token: Optional[str] = ADMIN, key: Optional[str] = KEY,
             model: str = MODEL, pid: Optional[int] = typer.Option(None, help="with --url: the server's pid (RSS)"),
             duration: float = typer.Option(60.0, help="seconds (1800 for the 30-minute soak)"),
             concurrency: int = typer.Option(32), json_out: Optional[Path] = JSON) -> None:
    """Steady load for DURATION seconds: controller and worker RSS over time, errors."""
    from load_tests.faults import run_soak, target

    with target(url, admin_token, key, pid, model=model, ttft_s=30.0) as t:
        _write(run_soak(t, duration, concurrency, sample_s=max(1.0, duration / 60)), json_out)


@suite_app.command("dashboards", epilog=EXIT)
@needs_test_extra
def dashboards_cmd(url: Optional[str] = URL, admin_token: Optional[str] = ADMIN, key: Optional[str] = KEY,
                   model: str = MODEL, pid: Optional[int] = typer.Option(None, help="with --url: the server's pid (CPU)"),
                   streams: int = typer.Option(48, help="concurrent streamed completions (the serving load)"),
                   dashboards: int = typer.Option(50, help="event streams open as the dashboard opens them"),
                   duration: float = typer.Option(20.0, help="seconds per round"),
                   rounds: int = typer.Option(3, help="rounds with and as many without dashboards (medians)"),
                   json_out: Optional[Path] = JSON) -> None:
    """The controller's extra CPU time with DASHBOARDS open dashboards under STREAMS streams (issue 18: < 2%)."""
    from load_tests.dashboard_cost import run_dashboard_cost
    from load_tests.faults import target

    with target(url, admin_token, key, pid, model=model, max_num_seqs=max(64, streams)) as t:
        _write(run_dashboard_cost(t, streams, dashboards, duration, rounds), json_out)


@suite_app.command("block", epilog=EXIT)
@needs_test_extra
def block_cmd(prompt_mb: float = typer.Option(4.0, help="size of the one huge prompt"),
              json_out: Optional[Path] = JSON) -> None:
    """/health latency while the server tokenizes a PROMPT_MB prompt (a factory model's real tokenizer)."""
    import tempfile

    from controller.model_factory import make_model
    from load_tests.faults import run_block, target, tokenizer_config

    with tempfile.TemporaryDirectory(prefix="tokenpool-block-") as d:
        make_model(arch="qwen2", size="tiny", out=Path(d) / "m", seed=0, dtype="fp32", device="cpu", progress=False)
        with target(config=tokenizer_config(str(Path(d) / "m"), int(prompt_mb * 2**20) + (1 << 20)),
                    model="tiny") as t:
            _write(run_block(t, prompt_mb), json_out)


if __name__ == "__main__":
    suite_app()
