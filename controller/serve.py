"""`tokenpool serve`: load the configuration, start engines and the HTTP server."""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

from pydantic import ValidationError

from controller import children
from controller.config import (
    MODEL_NAME,
    REAL_MODEL,
    EngineOptions,
    GPUSettings,
    LoraModule,
    ModelSpec,
    ServerConfig,
    ToolCallParser,
    cache_dir,
    default_models_made,
    usable_name,
)
from controller.heap import YOUNG_THRESHOLD
from controller.keys import hash_key, new_key
from tokenpool import env
from tokenpool.models import (
    SUPPORTED_ARCHS,
    adapter_fit_problem,
    generation_config_problem,
    gguf_value,
    model_dir_problem,
    model_max_positions,
)

if typing.TYPE_CHECKING:
    from controller.tenants import TenantRegistry

log = logging.getLogger("tokenpool")


CACHE_HINT = f" (set {env.CACHE.name} to a folder you may write)"
API_KEY_TENANT = "api-key"  # the tenant --api-key is served as (vLLM's flag: one key for every model)
HF_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
MODEL_NAME_RE = re.compile(MODEL_NAME)  # what ModelSpec takes as a name (and an alias)


def hf_cached(repo_id: str) -> Path:
    """The snapshot of `repo_id` in the local Hugging Face cache (HF_HOME / HF_HUB_CACHE): this server does not
    download. ValueError naming how to get it when it is not there."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        raise ValueError(f"{repo_id} is neither a path nor a model in the local Hugging Face cache ({HF_HUB_CACHE}): "
                         f"download it first (`hf download {repo_id}`); tokenpool serve does not") from None
    if (why := model_dir_problem(path)) is not None:
        raise ValueError(why)
    return path


def gguf_unconverted(dirs: list[Path]) -> list[Path]:
    """The `.gguf` files among `dirs` whose conversion is not in the cache yet (`tokenpool serve` converts them after
    the bind: `convert_gguf_files`)."""
    from controller.config import cache_dir
    from controller.real_model import MARKER, gguf_folder

    files = [Path(d).expanduser().resolve() for d in dirs]
    return [f for f in files if f.suffix == ".gguf" and f.is_file()
            and not (gguf_folder(f, cache_dir()) / MARKER).exists()]


def convert_gguf_files(files: list[Path]) -> None:
    """Convert `files` (`ensure_gguf`, one child process each) into the cache. StartupError: one cannot be."""
    from controller.config import cache_dir
    from controller.real_model import ensure_gguf
    from controller.startup import StartupError

    for f in files:
        try:
            ensure_gguf(f, cache_dir())
        except RuntimeError as e:
            raise StartupError(str(e)) from None
        except OSError as e:  # (the cache cannot be written)
            raise StartupError(f"{f} cannot be converted into {cache_dir()}: {e.strerror or e}{CACHE_HINT}") from None


def check_max_model_len(specs: list[ModelSpec], max_model_len: int | None) -> None:
    """As vLLM refuses a --max-model-len past the model's positions (the engine would clamp it). StartupError."""
    from controller.startup import StartupError

    for s in specs:
        limit = model_max_positions(s.path)
        if max_model_len is not None and limit is not None and max_model_len > limit:
            raise StartupError(f"--max-model-len {max_model_len} is more than model {s.name!r} takes: "
                               f"{limit} tokens (max_position_embeddings in its config.json)")


def gguf_model_path(f: Path, convert: bool = True) -> Path:
    """The folder the `.gguf` file `f` is served from: its conversion (`real_model.ensure_gguf`, once, cached), as
    `tokenpool serve FILE.gguf` and a configuration's `path: FILE.gguf` serve it. `convert=False`: only named when
    not converted yet (`tokenpool serve` converts it after the bind: `convert_gguf_files`), and its first bytes and
    architecture checked. ValueError: it cannot be read, is not a GGUF file of an architecture the engine runs, or
    cannot be converted."""
    from controller.config import cache_dir
    from controller.real_model import ensure_gguf, gguf_folder

    if not convert and gguf_unconverted([f]):
        try:
            with open(f, "rb") as fh:
                magic = fh.read(4)
        except OSError as e:
            raise ValueError(f"{f} cannot be read: {e.strerror or e}") from None
        if magic != b"GGUF":  # (said before the bind, as a conversion would say it)
            raise ValueError(f"{f} cannot be converted: it is not a GGUF file (it does not begin with GGUF)")
        arch = gguf_value(f, "general.architecture")  # (its converted config.json's model_type: said before minutes
        if isinstance(arch, str) and arch not in SUPPORTED_ARCHS:  # of conversion, which model_dir_problem refuses)
            raise ValueError(f"{f}: architecture {arch!r} (its general.architecture) is not supported; supported: "
                             f"{', '.join(SUPPORTED_ARCHS)}")
        return gguf_folder(f.resolve(), cache_dir())
    try:
        return ensure_gguf(f.resolve(), cache_dir())
    except RuntimeError as e:
        raise ValueError(str(e)) from None
    except OSError as e:  # (the cache cannot be written)
        raise ValueError(f"{f} cannot be converted into {cache_dir()}: {e.strerror or e}{CACHE_HINT}") from None


def model_specs(dirs: list[Path], names: list[str], convert: bool = True) -> list[ModelSpec]:
    """Models from `tokenpool serve DIR ...`: `names` gives one name per directory, or (one directory) a name and
    its aliases, as vLLM's --served-model-name does; by default a model is named after its directory. A `.gguf` file
    (as llama.cpp and Ollama keep models) is served from its conversion (`real_model.ensure_gguf`, cached), named
    after the file; a Hugging Face repo id (`org/name`, as `vllm serve` takes it) from the local Hugging Face cache,
    named after the id. `convert=False`: a `.gguf` file not converted yet is named its conversion's folder, which
    is not there yet (`tokenpool serve` converts it after the bind); only its first bytes and architecture are
    checked here."""
    given = [str(d) for d in dirs]
    dirs = [Path(d).expanduser().resolve() for d in dirs]
    default_names = [d.stem if d.suffix == ".gguf" else d.name for d in dirs]
    for i, d in enumerate(dirs):
        if not d.exists() and HF_REPO_ID.fullmatch(given[i]):
            dirs[i], default_names[i] = hf_cached(given[i]), given[i]
            continue
        if d.suffix == ".gguf" and d.is_file():
            pending = not convert and gguf_unconverted([d])  # (converted after the bind: its folder checked then)
            dirs[i] = gguf_model_path(d, convert)
            if pending:
                continue
        if (why := model_dir_problem(dirs[i])) is not None:
            if not dirs[i].exists() and not any(c in given[i] for c in "/\\~") and not given[i].startswith("."):
                # (a bare name, as `ollama run NAME` takes one: said what serve takes instead)
                why += (" (tokenpool serve downloads nothing: it takes a model folder, a .gguf file or a Hugging Face "
                        "repo id, ORG/NAME, in the local cache; `tokenpool serve` with no argument serves "
                        f"{REAL_MODEL}, alias smollm2)")
            raise ValueError(why)
    if names and len(dirs) > 1 and len(names) != len(dirs):
        raise ValueError(f"{len(dirs)} model directories but {len(names)} --served-model-name: give one per directory")
    if names and not dirs:
        raise ValueError("--served-model-name names the MODEL_DIR arguments; none were given")
    every = names if len(dirs) == 1 and names else (names or default_names)
    for n in every:
        given_by = "--served-model-name" if names else "the default name (its directory's)"
        if not MODEL_NAME_RE.fullmatch(n) or len(n) > 128:
            raise ValueError(f"{given_by} {n!r} is not a model name: 1-128 characters of A-Z a-z 0-9 . _ : / -"
                             + ("" if names else "; name it with --served-model-name"))
        try:
            usable_name(n)
        except ValueError as e:
            raise ValueError(f"{given_by}: {e}") from None
    if dup := sorted({n for n in every if every.count(n) > 1}):
        raise ValueError(f"two models would be named {', '.join(map(repr, dup))}: give each its own name with "
                         "--served-model-name" if not names else
                         f"--served-model-name {', '.join(map(repr, dup))} is given twice: names must be unique")
    if len(dirs) == 1 and names:
        return [ModelSpec(name=names[0], path=str(dirs[0]), aliases=names[1:])]
    return [ModelSpec(name=n, path=str(d)) for d, n in zip(dirs, every)]


def add_lora_modules(specs: list[ModelSpec], values: list[str]) -> None:
    """vLLM's --lora-modules onto the MODEL_DIR models: each `NAME=PATH`, or JSON {"name", "path",
    "base_model_name"}. The model is base_model_name (a served name), else the one MODEL_DIR."""
    for v in values:
        base = None
        if v.lstrip().startswith("{"):
            try:
                d = json.loads(v)
                name, path, base = d["name"], d["path"], d.get("base_model_name")
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"--lora-modules {v}: JSON needs \"name\" and \"path\" (and may name "
                                 "\"base_model_name\")") from None
        else:
            name, eq, path = v.partition("=")
            if not eq or not name or not path:
                raise ValueError(f"--lora-modules {v}: give NAME=PATH, or JSON with name, path and base_model_name")
        if base is None:
            if len(specs) != 1:
                raise ValueError(f"--lora-modules {v}: {len(specs)} models are served; say which one it goes over "
                                 "with the JSON form's base_model_name")
            spec = specs[0]
        else:
            spec = next((s for s in specs if base == s.name or base in s.aliases), None)
            if spec is None:
                raise ValueError(f"--lora-modules {v}: base_model_name {base!r} is not one of the MODEL_DIR models "
                                 f"({', '.join(s.name for s in specs)})")
        try:
            spec.lora_modules.append(LoraModule(name=name, path=str(path)))
        except ValidationError:
            raise ValueError(f"--lora-modules {v}: a name is 1-128 characters of A-Z a-z 0-9 . _ : / -") from None


def prepare(config_path: Path | None, host: str | None, port: int | None, model_dirs: list[Path] | None = None,
            served_model_names: list[str] | None = None, gpu_budget_gb: float | None = None,
            api_key: str | None = None, max_model_len: int | None = None,
            dtype: str | None = None, tool_call_parser: str | None = None,
            lora_modules: list[str] | None = None, enable_prefix_caching: bool | None = None,
            max_loras: int | None = None, max_lora_rank: int | None = None, max_num_seqs: int | None = None,
            enforce_eager: bool | None = None, max_num_batched_tokens: int | None = None,
            seed: int | None = None, convert_gguf: bool = True,
            generation_config: str | None = None) -> tuple[ServerConfig, str | None]:
    """The validated config with CLI overrides; a fresh admin token if the config has none (shown once).

    Model directories on the command line are served beside the config's models; without a config they are the
    only models (no demo), on the default loopback listener without auth. As vLLM's flags: `api_key` (every request
    must present it: a tenant "api-key" of every model, auth on), and `max_model_len`/`dtype`/`tool_call_parser`/
    `lora_modules`/`enable_prefix_caching`/`max_loras`/`max_lora_rank`/`max_num_seqs`/`enforce_eager` (no CUDA
    graphs)/`max_num_batched_tokens`/`seed`/`generation_config` for the directories' models. `convert_gguf=False`: a
    `.gguf` file not converted yet is left to the caller (`convert_gguf_files`, then `check_max_model_len` and the
    models' checks)."""
    from controller.startup import StartupError, load_checked, validation_line

    if port is not None and not 0 <= port <= 65535:
        raise StartupError(f"--port {port}: a port is 0 to 65535 (0: any free one)")
    try:
        specs = model_specs(list(model_dirs or []), list(served_model_names or []), convert=convert_gguf)
    except ValueError as e:
        raise StartupError(str(e)) from None
    engine = {"max_model_len": max_model_len, "dtype": dtype, "enable_prefix_caching": enable_prefix_caching,
              "max_loras": max_loras, "max_lora_rank": max_lora_rank, "max_num_seqs": max_num_seqs,
              "cuda_graphs": False if enforce_eager else None, "max_num_batched_tokens": max_num_batched_tokens,
              "seed": seed}  # (EngineOptions fields)
    flags = {"--max-model-len": max_model_len, "--dtype": dtype, "--tool-call-parser": tool_call_parser,
             "--lora-modules": lora_modules or None, "--[no-]enable-prefix-caching": enable_prefix_caching,
             "--max-num-seqs": max_num_seqs, "--enforce-eager": enforce_eager or None, "--max-loras": max_loras,
             "--max-lora-rank": max_lora_rank, "--max-num-batched-tokens": max_num_batched_tokens, "--seed": seed,
             "--generation-config": generation_config}
    if any(v is not None for v in flags.values()) and not specs:
        *names, last = flags
        raise StartupError(f"{', '.join(names)} and {last} apply to the MODEL_DIR arguments; none were given (a "
                           "configuration sets them per model)")
    check_max_model_len(specs, max_model_len)  # (a conversion's folder not made yet: checked once it is)
    try:
        add_lora_modules(specs, lora_modules or [])
    except ValueError as e:
        raise StartupError(str(e)) from None
    known = typing.get_args(ToolCallParser)
    if tool_call_parser is not None and tool_call_parser not in known:
        raise StartupError(f"--tool-call-parser {tool_call_parser}: the ones known are {', '.join(known)}")
    if generation_config is not None:
        if generation_config not in ("auto", "vllm"):
            generation_config = str(Path(generation_config).expanduser().resolve())
        if (why := generation_config_problem(generation_config)) is not None:
            raise StartupError(f"--generation-config: {why}")
    try:
        for s in specs:
            s.tool_call_parser = tool_call_parser  # type: ignore[assignment]
            s.generation_config = generation_config or s.generation_config
            s.engine = EngineOptions.model_validate({**s.engine.model_dump(),
                                                     **{k: v for k, v in engine.items() if v is not None}})
    except ValidationError as e:
        raise StartupError("; ".join(f"--{'-'.join(str(x) for x in err['loc']).replace('_', '-')}: "
                                     f"{err['msg'].removeprefix('Value error, ')}"
                                     for err in e.errors())) from None
    if specs and config_path is None:
        cfg = ServerConfig(auth=api_key is not None)
    else:
        cfg = load_checked(config_path)
    taken = {n for m in cfg.models for n in (m.name, *m.aliases, *m.lora_names)}
    if clash := sorted(taken & {n for s in specs for n in (s.name, *s.aliases, *s.lora_names)}):
        raise StartupError(f"{', '.join(map(repr, clash))}: already a model (or alias) of config {config_path}; "
                           "name the MODEL_DIR otherwise with --served-model-name")
    try:
        if api_key is not None:
            if not api_key:
                raise StartupError("--api-key is empty")
            if any(t.name == API_KEY_TENANT for t in cfg.tenants):
                raise StartupError(f"--api-key is served as a tenant named {API_KEY_TENANT!r}, and config "
                                   f"{config_path} has a tenant of that name: rename it, or give the key there")
            cfg = ServerConfig.model_validate({**cfg.model_dump(), "auth": True, "tenants": [
                *[t.model_dump() for t in cfg.tenants], {"name": API_KEY_TENANT, "key_hashes": [hash_key(api_key)]}]})
        if specs:
            cfg = ServerConfig.model_validate({**cfg.model_dump(), "models": [*cfg.models, *specs]})
    except ValidationError as e:  # (a MODEL_DIR named as a --config model, a tenant named api-key)
        raise StartupError(f"the MODEL_DIR models and --api-key beside config {config_path}: "
                           f"{validation_line(e)}" if config_path else validation_line(e)) from None
    if gpu_budget_gb is not None:
        try:
            cfg.gpus.budget_gb = GPUSettings.model_validate({"budget_gb": gpu_budget_gb}).budget_gb
        except ValidationError as e:
            raise StartupError(f"--gpu-budget {gpu_budget_gb:g}: {validation_line(e).removeprefix('budget_gb: ')} "
                               "(GB)") from None
        from controller.pool import local_devices

        if "cpu" in local_devices(cfg.workers.local):  # (no GPU here, or workers.local: cpu) a CPU worker's arena
            cfg.gpus.cpu_budget_gb = cfg.gpus.budget_gb  # is gpus.cpu_budget_gb: the flag would size nothing
            log.warning("--gpu-budget %g GB is the CPU worker's arena (gpus.cpu_budget_gb): this machine's local "
                        "worker runs on the CPU (%s)", gpu_budget_gb,
                        "workers.local: cpu" if cfg.workers.local == "cpu" else "no GPU found")
    if host is not None:
        cfg.listen.host = host
    if port is not None:
        cfg.listen.port = port
    token = None
    if cfg.admin_token_hash is None:
        token = new_key("tpadmin")
        cfg.admin_token_hash = hash_key(token)
    return cfg, token


def config_gguf_files(models: list[ModelSpec], config_path: Path) -> dict[int, Path]:
    """A configuration's models whose path is a `.gguf` file (a llama-swap user's models are), served as `tokenpool
    serve FILE.gguf` serves one (`gguf_model_path`, not converting): each path set to its conversion's folder. The
    files not converted yet, by the model's index (`tokenpool serve` converts them after the bind). StartupError
    naming the file, the key (models.N.path) and the model: one that cannot be read, or is not a GGUF file of an
    architecture the engine runs."""
    from controller.startup import StartupError

    pending: dict[int, Path] = {}
    for i, m in enumerate(models):
        if m.path is None or Path(m.path).suffix != ".gguf" or not Path(m.path).is_file():
            continue
        if todo := gguf_unconverted([Path(m.path)]):
            pending[i] = todo[0]
        try:
            m.path = str(gguf_model_path(Path(m.path), convert=False))
        except ValueError as e:
            raise StartupError(f"config {config_path}: models.{i}.path: model {m.name!r}: {e}") from None
        m.bound_context()  # (a converted one's config.json; one not converted yet is bounded once it is)
    return pending


def check_config_models(models: list[ModelSpec], config_path: Path) -> dict[int, Path]:
    """Each of a configuration file's models has a directory the engine runs, and its LoRA adapters fit it; else a
    StartupError naming the file, the key (models.N.path) and the model. A `.gguf` file's model is served from its
    conversion (`config_gguf_files`: its path set to the folder); one not converted yet is checked once it is. The
    files not converted yet, by the model's index."""
    from controller.startup import StartupError

    pending = config_gguf_files(models, config_path)
    for i, m in enumerate(models):
        if i in pending:
            continue
        if m.path is not None and (why := model_dir_problem(m.path)) is not None:
            raise StartupError(f"config {config_path}: models.{i}.path: model {m.name!r}: {why}")
        if (why := generation_config_problem(m.generation_config)) is not None:
            raise StartupError(f"config {config_path}: models.{i}.generation_config: model {m.name!r}: {why}")
        for j, lm in enumerate(m.lora_modules):
            if (why := adapter_fit_problem(lm.path, m.path, m.engine.max_lora_rank)) is not None:
                raise StartupError(f"config {config_path}: models.{i}.lora_modules.{j}.path: model {m.name!r}, "
                                   f"LoRA adapter {lm.name!r}: {why}")
    return pending


def check_config(config_path: Path) -> tuple[ServerConfig, dict[str, Path]]:
    """`tokenpool config check FILE`: the configuration as `tokenpool serve --config FILE` reads and checks it before
    it starts anything (keys and values, the models' folders and LoRA adapters, workers.local's GPUs); a StartupError
    saying the first problem. With it, the `.gguf` files not converted yet, by model name: `serve` converts them
    first, the check does not (their folders are checked once converted)."""
    from controller import startup

    cfg = startup.load_checked(config_path)
    pending = check_config_models(cfg.models, config_path)
    startup.check_local_workers(cfg, config_path)
    return cfg, {cfg.models[i].name: f for i, f in pending.items()}


def read_tenants(cfg: ServerConfig) -> TenantRegistry:
    """The tenants `serve` starts with, read once (the server is given them: `shutdown.run`): the configuration's and
    the tenants file's, less those the tenants file keeps revoked (said in a warning each); a StartupError, in one line,
    when the tenants file cannot be read."""
    import yaml

    from controller.startup import StartupError
    from controller.tenants import TenantRegistry

    try:
        return TenantRegistry(cfg.tenants, cfg.auth_enabled, cfg.tenants_file)
    except (OSError, ValueError, yaml.YAMLError) as e:  # (pydantic's ValidationError is a ValueError)
        why = ("; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg'].removeprefix('Value error, ')}" for x in
                         e.errors()) if hasattr(e, "errors") else " ".join(str(e).split()))
        raise StartupError(f"tenants_file {cfg.tenants_file}: {why}") from None


def tenants_at_start(cfg: ServerConfig) -> str:
    """`tokenpool config check`'s word on the tenants `serve` starts with (`read_tenants`), which are named where the
    tenants file keeps them revoked (a configured tenant deleted through the admin API stays so across restarts:
    `TenantRegistry`); a StartupError when the tenants file cannot be read."""
    said = logging.getLogger("tokenpool.tenants")
    was, said.disabled = said.disabled, True  # (what `serve` logs at start of it is said here, in the summary)
    try:
        reg = read_tenants(cfg)
    finally:
        said.disabled = was
    active = reg.all()
    n = len(active)
    out = f"{n} tenant{'' if n == 1 else 's'}"
    from_file = sum(1 for t in active if t.name not in {c.name for c in cfg.tenants})
    if from_file:
        out += f" ({from_file} from the tenants file)"
    revoked = [c.name for c in cfg.tenants if reg.get(c.name) is None]
    keys = [f"{c.name} ({len(c.key_hashes) - len(t.spec.key_hashes)} of {len(c.key_hashes)} keys)"
            for c in cfg.tenants if (t := reg.get(c.name)) is not None and len(t.spec.key_hashes) < len(c.key_hashes)]
    if revoked or keys:
        out += (f"; revoked through the admin API, as {cfg.tenants_file} records: " + ", ".join(revoked + keys)
                + " (remove its entry under `revoked` there to bring it back)")
    return out


def origins_given(values: list[str]) -> list[str]:
    """--allowed-origins: each value an origin, or a JSON list of them as vLLM's flag takes ('["*"]')."""
    from controller.startup import StartupError

    out: list[str] = []
    for v in values:
        if v.lstrip().startswith("["):
            try:
                got = json.loads(v)
            except json.JSONDecodeError as e:
                raise StartupError(f"--allowed-origins {v}: not a JSON list ({e.msg})") from None
            if not isinstance(got, list) or not all(isinstance(o, str) for o in got):
                raise StartupError(f"--allowed-origins {v}: a JSON list of strings, e.g. '[\"*\"]'")
            out += got
        else:
            out.append(v)
    return [o.rstrip("/") for o in out]


def default_banner(cfg: ServerConfig) -> str:
    """The start-up line of the embedded default: what it serves, and whether a key is asked (--api-key)."""
    return (f"no --config and no model directory: serving {REAL_MODEL} (real weights) and the random-weight demo "
            f"models {[m.name for m in cfg.models if m.name != REAL_MODEL]} (made on first run under "
            f"{Path(cfg.models[0].path).parent if cfg.models[0].path else '-'}) "
            f"{'to requests that send the --api-key' if cfg.auth_enabled else 'with NO authentication'}, "
            f"bound to {cfg.listen.host} only")


# The default's models are made in a child process: the conversion and the model factory import torch and
# transformers, which the server's own process otherwise never needs (its tokenizers are read without them, its GPUs
# counted through NVML): ~1-2 s of CPU on a 2-core first run, beside the local worker's start-up, and torch's memory
# held by the server for good.
MAKER = [sys.executable, "-m", "controller.model_factory"]


def ensure_demo_models(cfg: ServerConfig) -> None:
    """`config.ensure_demo_models` in a child process (`MAKER`), when one of the default's models is not made yet (a
    first run); a warm start starts nothing. The child's terminal output (the conversion's line, the progress bars) is
    the server's; its reason, where it fails, comes back through a pipe: a ValueError where a model could not be made
    into its folder (its OSError or ValueError: the cache's to fix), a RuntimeError otherwise."""
    if not cfg.is_default or default_models_made(cfg):
        return
    r, w = os.pipe()
    with open(r, encoding="utf-8", errors="replace") as reason:
        try:  # (its own session, as a worker's: a Ctrl-C for the server is not the child's; children.stop_all ends it,
            # SIGTERM first, which the child unwinds on: a conversion's temporary folder is removed)
            p = subprocess.Popen([*MAKER, "--result-fd", str(w), *(f"{m.name}={m.path}" for m in cfg.models if m.path)],
                                 pass_fds=(w,), start_new_session=True)
        finally:
            os.close(w)
        with children.ended_at_exit(p):
            # the classes this process reads the made models' tokenizers with (`auto_tokenizer_class`: transformers'
            # TokenizersBackend, and Qwen2Tokenizer for the demos' qwen2 and qwen3; without torch), imported while
            # they are made rather than after them, on the way to ready: ~1.5 s of one core on 2 cores, which the
            # making in this process had imported
            from tokenpool import imports

            with contextlib.suppress(ImportError, AttributeError):  # (a hint: the read says what is wrong)
                imports.transformers("TokenizersBackend", "Qwen2Tokenizer")
            why = reason.read().strip()
            p.wait()
    if p.returncode == 2:
        raise ValueError(why or "exit 2")
    if p.returncode != 0:
        raise RuntimeError(why or f"the child making them exited {p.returncode}")


def default_doing(cfg: ServerConfig) -> str:
    """What the default's start-up does before it is ready, as the log's "accepting connections" line says it: a
    warm start makes nothing (it was said as a first run's making all the same)."""
    if default_models_made(cfg):
        return "checking the default's models"
    return "making the default's models (on a first run)"


def make_default_models(cfg: ServerConfig) -> None:
    """The default's models, made on a first run (the real one converted, the demos drawn, in a child process:
    `ensure_demo_models`; ~10 s on 2 cores), then checked: `tokenpool serve` runs it once it listens, so that /health
    answers "starting" meanwhile rather than the port refusing connections. StartupError: they cannot be made."""
    from controller import startup

    try:
        ensure_demo_models(cfg)
    except (OSError, ValueError) as e:  # (ValueError: make_model's refusal of a folder path that is a file)
        why = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise startup.StartupError(f"cannot make the default's models under {Path(cfg.models[0].path or '.').parent}: "
                                   f"{why}{CACHE_HINT}") from None
    except RuntimeError as e:  # (e.g. the SmolLM2 wheel that could not be fetched: its own remedy, not the cache's)
        raise startup.StartupError(f"cannot make the default's models under {Path(cfg.models[0].path or '.').parent}: "
                                   f"{e}") from None
    startup.check_models(cfg)


def convert_then_check(cfg: ServerConfig, files: list[Path], specs: list[ModelSpec], max_model_len: int | None) -> None:
    """`tokenpool serve FILE.gguf`'s conversions (a configuration's `path: FILE.gguf` too), run once it listens
    (/health says "starting" meanwhile, requests wait), then what needs the converted folders: --max-model-len (a
    configuration's engine.max_model_len: bounded) against the model's positions, each model's folder and LoRA
    adapters. StartupError: logged in its line, and the server exits 2."""
    from controller import startup

    convert_gguf_files(files)
    check_max_model_len(specs, max_model_len)
    for m in cfg.models:  # (a configuration's engine.max_model_len, by the converted config.json)
        m.bound_context()
    startup.check_models(cfg)


def collect_as_served() -> None:
    """The cyclic collector's young threshold as the server has it once started (`heap.freeze_long_lived`, from
    `Controller.start`), from the start of `tokenpool serve`: its start-up (uvicorn, the app, the models' tokenizers:
    transformers) made ~130k long-lived objects under the default threshold of 700, ~380 young and 3 full collections
    that rescanned them: ~0.3 s of a 2-core host's CPU, most of it beside the local workers' warm-up (the way to
    ready). The start-up's garbage is collected as before, by `Controller.start` (collect, then freeze)."""
    g0, g1, g2 = gc.get_threshold()
    gc.set_threshold(env.GC_YOUNG.integer() if env.GC_YOUNG.get() else max(YOUNG_THRESHOLD, g0), g1, g2)


def serve(config_path: Path | None = None, host: str | None = None, port: int | None = None,
          model_dirs: list[Path] | None = None, served_model_names: list[str] | None = None,
          gpu_budget_gb: float | None = None, api_key: str | None = None, max_model_len: int | None = None,
          dtype: str | None = None, tool_call_parser: str | None = None, lora_modules: list[str] | None = None,
          enable_prefix_caching: bool | None = None, max_loras: int | None = None,
          max_lora_rank: int | None = None, max_num_seqs: int | None = None, enforce_eager: bool | None = None,
          trust_remote_code: bool = False, allowed_origins: list[str] | None = None,
          max_num_batched_tokens: int | None = None, seed: int | None = None,
          generation_config: str | None = None) -> None:
    collect_as_served()
    from controller import shutdown, startup

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    if bad := env.problems():  # (a worker would fail on it at its first model, leaving a server with none)
        for p in bad:
            log.error("%s", p)
        raise SystemExit(2)
    if trust_remote_code:  # (vLLM's flag, which its users give out of habit)
        log.warning("--trust-remote-code is ignored: tokenpool runs its own llama, qwen2, qwen3 and mistral code, "
                    "never code from a model's folder")
    try:
        unconverted = gguf_unconverted(list(model_dirs or []))  # (converted after the bind, as the default's models)
        cfg, admin_token = prepare(config_path, host, port, model_dirs, served_model_names, gpu_budget_gb, api_key,
                                   max_model_len, dtype, tool_call_parser, lora_modules, enable_prefix_caching,
                                   max_loras, max_lora_rank, max_num_seqs, enforce_eager, max_num_batched_tokens,
                                   seed, convert_gguf=False, generation_config=generation_config)
        if allowed_origins:
            cfg.cors_origins = origins_given(allowed_origins)
        if config_path is not None:  # (a config's models: the file and the key named; the MODEL_DIRs were checked;
            # its .gguf files converted after the bind, as the MODEL_DIRs')
            n = len(cfg.models) - len(model_dirs or [])
            unconverted = list(dict.fromkeys([*check_config_models(cfg.models[:n], config_path).values(),
                                              *unconverted]))  # (a file named twice: converted once)
    except startup.StartupError as e:
        log.error("%s", e)
        raise SystemExit(2) from None
    make_models = None
    if cfg.is_default:
        if host is None:
            cfg.listen.host = "127.0.0.1"
        make_models = functools.partial(make_default_models, cfg)  # (after the bind: /health says "starting")
        make_models.doing = default_doing(cfg)  # type: ignore[attr-defined]
    elif unconverted:  # the same for a .gguf file's conversion (~10 s for a 135M model on 2 cores; minutes for 7B)
        make_models = functools.partial(convert_then_check, cfg, unconverted,
                                        cfg.models[len(cfg.models) - len(model_dirs or []):], max_model_len)
        make_models.doing = f"converting {', '.join(f.name for f in unconverted)} (once)"  # type: ignore[attr-defined]
    try:
        if make_models is None:
            startup.check_models(cfg)
        startup.check_local_workers(cfg, config_path)
    except startup.StartupError as e:
        log.error("%s", e)
        raise SystemExit(2) from None
    try:  # before the admin token file is written: a server already on the port keeps its own file
        probe = shutdown.bind(cfg.listen.host, cfg.listen.port, backlog=1)
    except OSError as e:
        log.error("%s", shutdown.cannot_listen(cfg.listen.host, cfg.listen.port, e))
        raise SystemExit(2) from None
    cfg.listen.port = probe.getsockname()[1]  # --port 0: the free port the kernel gave, which the file is named by
    probe.close()
    if cfg.is_default:  # (after the bind: a port in use is said alone, not after what would have been served there)
        log.warning("%s", default_banner(cfg))
    try:  # (after the bind too, for its warnings; a tenants file edited by hand into one it cannot hold: one line)
        tenants = read_tenants(cfg)
    except startup.StartupError as e:
        log.error("%s", e)
        raise SystemExit(2) from None
    if dead := startup.remove_dead_admin_tokens(cache_dir()):
        log.info("removed the admin token files of servers no longer running (port%s %s) from %s",
                 "s" if len(dead) > 1 else "", ", ".join(map(str, dead)), cache_dir())
    if admin_token is not None:
        try:
            if left := startup.left_admin_token(cfg):
                log.info("%s: the admin token file of a server no longer running, replaced by this run's", left)
        except startup.StartupError as e:
            log.error("%s", e)
            raise SystemExit(2) from None
    token_file = None
    shutdown.hold_signals()  # a signal from here on stops the start-up cleanly (the token file is removed)
    if admin_token is not None:
        try:
            token_file = startup.write_admin_token(cfg, admin_token)
        except OSError as e:
            shutdown.release_signals()
            log.error("cannot write this run's admin token to %s: %s (set admin_token_file, or admin_token_hash, in "
                      "a configuration%s)", startup.admin_token_path(cfg), e.strerror or e,
                      "" if cfg.admin_token_file else f"; or {env.CACHE.name}")
            raise SystemExit(2) from None
        log.warning("admin token for this run written to %s (readable by you only)", token_file)
    if not cfg.models:
        log.warning("no model is configured: add models through the admin API (POST /admin/models, or the "
                    "dashboard's Models page), or give model folders: tokenpool serve DIR")
    if not cfg.auth_enabled:
        loopback = cfg.listen.host in ("127.0.0.1", "localhost", "::1")
        log.warning("authentication is OFF: every caller may use every model%s", "" if loopback else
                    f", and {cfg.listen.host} is reachable from other machines (give tenants, or --api-key)")
    elif not cfg.tenants and not cfg.tenants_file:
        log.warning("authentication is on and no tenant is configured: every request is refused (401) until one is "
                    "made through the admin API (POST /admin/tenants, or the dashboard's Tenants page)")
    try:
        rc = shutdown.run(cfg, make_models, tenants)
    finally:
        shutdown.release_signals()  # (the handlers from before the hold: a library caller's, or the defaults)
        if token_file is not None:
            startup.remove_admin_token(token_file, admin_token)  # type: ignore[arg-type]
    if rc:
        raise SystemExit(rc)


def main(argv: list[str] | None = None) -> None:
    """python -m controller.serve [MODEL_DIR ...] [--config FILE] [--host H] [--port P] (as `tokenpool serve`)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m controller.serve")
    ap.add_argument("model_dirs", nargs="*", type=Path)
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--host", default=None)
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--served-model-name", nargs="+", default=None)
    ap.add_argument("--gpu-budget", type=float, default=None)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--tool-call-parser", default=None)
    ap.add_argument("--lora-modules", nargs="+", default=None)
    ap.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--max-loras", type=int, default=None)
    ap.add_argument("--max-lora-rank", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--enforce-eager", action="store_true", default=None)
    ap.add_argument("--allowed-origins", nargs="+", default=None)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--generation-config", default=None)
    a = ap.parse_args(argv)
    serve(a.config, a.host, a.port, a.model_dirs, a.served_model_name, a.gpu_budget, a.api_key, a.max_model_len,
          a.dtype, a.tool_call_parser, a.lora_modules, a.enable_prefix_caching, a.max_loras, a.max_lora_rank,
          a.max_num_seqs, a.enforce_eager, allowed_origins=a.allowed_origins,
          max_num_batched_tokens=a.max_num_batched_tokens, seed=a.seed, generation_config=a.generation_config)


if __name__ == "__main__":
    main()
