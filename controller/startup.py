"""What `tokenpool serve` checks and reports before it serves: config errors as one line, model directories,
and the admin token of a run without one (written to a 0600 file, never to the log)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import ValidationError

from controller.config import ServerConfig, admin_token_file, load_config
from tokenpool.models import adapter_fit_problem, model_dir_problem


class StartupError(Exception):
    """A problem the operator must fix; `tokenpool serve` prints its message as one line and exits 2."""


def validation_line(e: ValidationError) -> str:
    errs = e.errors()
    first = errs[0]
    loc = ".".join(str(x) for x in first.get("loc", ()))
    msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"{loc}: {msg}{more}" if loc else f"{msg}{more}"


def load_checked(path: Path | None) -> ServerConfig:
    """load_config, with every way a file can be wrong turned into a one-line StartupError."""
    where = f"config {path}"
    try:
        return load_config(path)
    except FileNotFoundError:
        raise StartupError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise StartupError(f"{where}: is a directory, not a YAML file") from None
    except PermissionError:
        raise StartupError(f"{where}: permission denied") from None
    except UnicodeDecodeError:
        raise StartupError(f"{where}: not a UTF-8 text file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise StartupError(f"{where}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    except ValidationError as e:
        raise StartupError(f"{where}: {validation_line(e)}") from None
    except (TypeError, AttributeError) as e:  # e.g. a top-level list instead of a mapping
        raise StartupError(f"{where}: expected a mapping of settings ({e})") from None


def check_models(cfg: ServerConfig) -> None:
    """Each model path is a directory holding a config.json of an architecture the engine runs (said precisely when
    not): a server that started would list the model, then fail to load it at every request."""
    for m in cfg.models:
        if m.path is not None and (why := model_dir_problem(m.path)) is not None:
            raise StartupError(f"model {m.name!r}: {why}")
        for lm in m.lora_modules:
            if (why := adapter_fit_problem(lm.path, m.path, m.engine.max_lora_rank)) is not None:
                raise StartupError(f"model {m.name!r}, LoRA adapter {lm.name!r}: {why}")


def check_local_workers(cfg: ServerConfig, config_path: Path | None = None) -> None:
    """workers.local's GPU indices are GPUs this machine has (as CUDA sees them: CUDA_VISIBLE_DEVICES counts): a
    worker started on one that is not there dies at its first CUDA call, and is restarted, again and again."""
    spec = cfg.workers.local
    if not isinstance(spec, list):
        return
    where = f"config {config_path}: " if config_path is not None else ""
    if twice := sorted({i for i in spec if spec.count(i) > 1}):  # (two workers, two arenas, on one device)
        raise StartupError(f"{where}workers.local: GPU {', '.join(map(str, twice))} is given twice; a GPU has one "
                           "worker, which pools every model placed on it")
    from controller.pool import local_devices

    have = [d for d in local_devices("auto") if d != "cpu"]
    if missing := [i for i in spec if f"cuda:{i}" not in have]:
        seen = f"{len(have)} GPU{'' if len(have) == 1 else 's'} (0 to {len(have) - 1})" if have else "no GPU"
        raise StartupError(f"{where}workers.local: GPU {', '.join(map(str, missing))} is not on this machine, which "
                           f"has {seen} as CUDA sees them; give indices it has, or auto, or cpu")


def admin_token_path(cfg: ServerConfig) -> Path:
    return Path(cfg.admin_token_file) if cfg.admin_token_file else admin_token_file(cfg.listen.port)


def write_admin_token(cfg: ServerConfig, token: str) -> Path:
    """Write this run's admin token to a file only its owner can read; the log gets the path, never the token."""
    path = admin_token_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask or an older file said
        os.write(fd, (token + "\n").encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def remove_admin_token(path: Path, token: str) -> None:
    """Remove the token file at exit, unless another run has written its own token there since."""
    try:
        if path.read_text().strip() == token:
            path.unlink()
    except OSError:
        pass
